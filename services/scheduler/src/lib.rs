//! The scheduler service: the node registry, fed by agent registrations and
//! heartbeats, and placement ([`placement::place`], pure) with the resulting
//! allocations recorded in the store.
//!
//! A node whose heartbeat is older than [`NODE_TTL`] is down: it gets no new
//! placements, and a `node.down` event tells the orchestrator to replace its
//! instances.

pub mod placer;

use std::collections::HashMap;
use std::time::Duration;

use capstan_authn::{Access, Policy, RequireAuthLayer};
use capstan_placement::Strategy;
use capstan_proto::v1::scheduler_server::{Scheduler, SchedulerServer};
use capstan_proto::v1::{
    DrainNodeRequest, HeartbeatRequest, HeartbeatResponse, ListAllocationsRequest,
    ListAllocationsResponse, ListNodesRequest, ListNodesResponse, Node, NodeStatus, PlaceRequest,
    PlaceResponse, Placement, RegisterNodeRequest, ReleaseRequest, ReleaseResponse,
};
use capstan_server::{Platform, Service, now_ms};
use capstan_store::{Expect, Table};
use capstan_types::{AppName, Error, Event, EventKind, InstanceId, NodeId};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub use placer::{
    MAX_HEARTBEATS_PER_SECOND, NODE_TTL, NodeAllocations, NodeRecord, PlaceInput, Placer,
    heartbeat_interval, heartbeat_ttl,
};

/// How the scheduler service runs.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// The strategy of apps that do not name one.
    pub default_strategy: Strategy,
    /// Lease of the node watcher, which one replica runs at a time.
    pub lease_ttl: Duration,
}

/// The singleton role of the node watcher (marks nodes down).
pub const NODE_WATCHER_ROLE: &str = "scheduler.node-watcher";

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            default_strategy: Strategy::Spread,
            lease_ttl: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
struct SchedulerApi {
    platform: Platform,
    placer: Placer,
    node_count: NodeCount,
}

/// How many nodes are registered, counted at most every
/// [`NodeCount::RECOUNT_EVERY`]: what the heartbeat interval is set by,
/// without a scan per heartbeat.
#[derive(Clone, Default)]
struct NodeCount(std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, usize)>>>);

impl NodeCount {
    const RECOUNT_EVERY: Duration = Duration::from_secs(10);

    async fn get(&self, nodes: &Table<NodeRecord>) -> usize {
        let counted = *self.0.lock().expect("node count lock poisoned");
        if let Some((at, count)) = counted
            && at.elapsed() < Self::RECOUNT_EVERY
        {
            return count;
        }
        match nodes.list("").await {
            Ok(listed) => {
                let count = listed.len();
                *self.0.lock().expect("node count lock poisoned") =
                    Some((std::time::Instant::now(), count));
                count
            }
            // The last count, else the smallest interval: a heartbeat must not fail on it.
            Err(_) => counted.map_or(0, |(_, count)| count),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    capstan_proto::status(Error::internal(e))
}

impl SchedulerApi {
    fn nodes(&self) -> &Table<NodeRecord> {
        &self.placer.nodes
    }

    /// Publishes `node.down` once per outage of each node.
    async fn report_down_nodes(&self) -> Result<(), Error> {
        let now = now_ms();
        for (id, version, mut node) in self.nodes().list("").await.map_err(Error::internal)? {
            if !node.is_ready(now) && !node.down_reported {
                node.down_reported = true;
                if self
                    .nodes()
                    .put(&id, &node, Expect::Version(version))
                    .await
                    .is_ok()
                {
                    tracing::warn!(node = %id, "node missed its heartbeat TTL; marking it down");
                    self.platform
                        .emit(
                            Event::new(capstan_server::new_id("ev"), now, EventKind::NodeDown)
                                .node(&id)
                                .message("missed heartbeat TTL"),
                        )
                        .await;
                }
            }
        }
        Ok(())
    }

    async fn node_status(&self, id: &str) -> Result<Node, Status> {
        let (_, node) = self
            .nodes()
            .get(id)
            .await
            .map_err(internal)?
            .ok_or_else(|| capstan_proto::status(Error::NotFound(format!("node {id}"))))?;
        let allocations = self
            .placer
            .allocations
            .get(id)
            .await
            .map_err(internal)?
            .map(|(_, a)| a)
            .unwrap_or_default();
        Ok(node_to_wire(&node, &allocations, now_ms()))
    }
}

#[tonic::async_trait]
impl Scheduler for SchedulerApi {
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let caller = capstan_authn::caller(&request).map_err(capstan_proto::status)?;
        let node_id = NodeId::parse("id", &request.get_ref().id).map_err(capstan_proto::status)?;
        as_itself(caller, &node_id)?;
        let r = request.into_inner();
        if r.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(capstan_proto::status(Error::invalid(
                "address",
                "must be host:port",
            )));
        }
        check_labels(&r.labels).map_err(capstan_proto::status)?;
        let capacity = capstan_proto::resources_from_wire(r.capacity);
        if capacity.cpu_millis == 0 || capacity.memory_mb == 0 {
            return Err(capstan_proto::status(Error::invalid(
                "capacity",
                "cpu_millis and memory_mb must be > 0",
            )));
        }
        let labels: std::collections::BTreeMap<String, String> = r.labels.into_iter().collect();
        let (_, record) = self
            .nodes()
            .update(&r.id, |existing| {
                Some(NodeRecord {
                    id: r.id.clone(),
                    address: r.address.clone(),
                    capacity,
                    labels: labels.clone(),
                    last_heartbeat_ms: now_ms(),
                    // The first heartbeat comes after the agent's default interval.
                    ttl_ms: NODE_TTL.as_millis() as u64,
                    down_reported: false,
                    // A drain outlives the agent's restart.
                    draining: existing.is_some_and(|n| n.draining),
                })
            })
            .await
            .map_err(internal)?
            .ok_or_else(|| internal("node registration wrote nothing"))?;
        tracing::info!(node = %r.id, address = %record.address, "node registered");
        self.platform
            .emit(
                Event::new(
                    capstan_server::new_id("ev"),
                    now_ms(),
                    EventKind::NodeRegistered,
                )
                .node(&r.id),
            )
            .await;
        Ok(Response::new(self.node_status(&record.id).await?))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = capstan_authn::caller(&request).map_err(capstan_proto::status)?;
        let node_id =
            NodeId::parse("node_id", &request.get_ref().node_id).map_err(capstan_proto::status)?;
        as_itself(caller, &node_id)?;
        let Some((version, mut node)) = self.nodes().get(&node_id).await.map_err(internal)? else {
            return Ok(Response::new(HeartbeatResponse {
                known: false,
                next_heartbeat_ms: 0,
            }));
        };
        let every = heartbeat_interval(self.node_count.get(self.nodes()).await);
        node.last_heartbeat_ms = now_ms();
        node.ttl_ms = heartbeat_ttl(every).as_millis() as u64;
        node.down_reported = false;
        // A lost race means a concurrent heartbeat or registration already refreshed it.
        let _ = self
            .nodes()
            .put(&node_id, &node, Expect::Version(version))
            .await;
        Ok(Response::new(HeartbeatResponse {
            known: true,
            next_heartbeat_ms: every.as_millis() as u32,
        }))
    }

    async fn list_nodes(
        &self,
        _: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let cluster = self.placer.cluster().await.map_err(capstan_proto::status)?;
        let now = now_ms();
        Ok(Response::new(ListNodesResponse {
            nodes: cluster
                .nodes
                .iter()
                .map(|n| node_to_wire(n, &cluster.allocations_of(&n.id), now))
                .collect(),
        }))
    }

    async fn place(
        &self,
        request: Request<PlaceRequest>,
    ) -> Result<Response<PlaceResponse>, Status> {
        let r = request.into_inner();
        AppName::parse("app", &r.app).map_err(capstan_proto::status)?;
        for (i, id) in r.instance_ids.iter().enumerate() {
            InstanceId::parse(&format!("instance_ids[{i}]"), id).map_err(capstan_proto::status)?;
        }
        let mut host_ports = Vec::new();
        for (i, port) in r.host_ports.iter().enumerate() {
            match u16::try_from(*port) {
                Ok(p) if p > 0 => host_ports.push(p),
                _ => {
                    return Err(capstan_proto::status(Error::invalid(
                        format!("host_ports[{i}]"),
                        "must be between 1 and 65535",
                    )));
                }
            }
        }
        let input = PlaceInput {
            app: r.app,
            instance_ids: r.instance_ids,
            resources: capstan_proto::resources_from_wire(r.resources),
            host_ports,
            placement: capstan_proto::placement_from_wire(r.placement.unwrap_or_default())
                .map_err(capstan_proto::status)?,
        };
        let started = std::time::Instant::now();
        let outcome = self
            .placer
            .place(&input, now_ms())
            .await
            .map_err(capstan_proto::status)?;
        let metrics = capstan_server::metrics::metrics();
        metrics
            .placement_duration
            .observe(started.elapsed().as_secs_f64());
        let placed = outcome.placed.len();
        metrics
            .placed_instances
            .with_label_values(&["placed"])
            .inc_by(placed as u64);
        metrics
            .placed_instances
            .with_label_values(&["unplaced"])
            .inc_by(input.instance_ids.len().saturating_sub(placed) as u64);
        if !outcome.explanation.is_empty() {
            tracing::info!(app = %input.app, "placement fell short: {}", outcome.explanation);
        }
        Ok(Response::new(PlaceResponse {
            placements: outcome
                .placed
                .into_iter()
                .map(|p| Placement {
                    instance_id: p.instance_id,
                    node_id: p.node_id,
                    node_address: p.node_address,
                })
                .collect(),
            explanation: outcome.explanation,
        }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let caller = capstan_authn::caller(&request)
            .map_err(capstan_proto::status)?
            .clone();
        let ids = request.into_inner().instance_ids;
        for (i, id) in ids.iter().enumerate() {
            InstanceId::parse(&format!("instance_ids[{i}]"), id).map_err(capstan_proto::status)?;
        }
        let released = self
            .placer
            .release(&ids)
            .await
            .map_err(capstan_proto::status)?;
        for (instance, node) in released {
            self.platform
                .emit(
                    Event::new(
                        capstan_server::new_id("ev"),
                        now_ms(),
                        EventKind::AllocationReleased,
                    )
                    .instance(instance)
                    .node(node)
                    .actor(&caller.sub, caller.role.as_str()),
                )
                .await;
        }
        Ok(Response::new(ReleaseResponse {}))
    }

    async fn list_allocations(
        &self,
        _: Request<ListAllocationsRequest>,
    ) -> Result<Response<ListAllocationsResponse>, Status> {
        let mut allocations = Vec::new();
        for (node_id, _, node) in self.placer.allocations.list("").await.map_err(internal)? {
            for (instance_id, a) in node.instances {
                allocations.push(capstan_proto::v1::Allocation {
                    instance_id,
                    node_id: node_id.clone(),
                    app: a.app,
                    placed_ms: a.placed_ms,
                });
            }
        }
        Ok(Response::new(ListAllocationsResponse { allocations }))
    }

    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let audit = capstan_server::audit::begin(
            &request,
            "Scheduler/DrainNode",
            &request.get_ref().node_id,
        );
        let summary = if request.get_ref().enable {
            "enable".to_string()
        } else {
            "drain".to_string()
        };
        let result = self.drain_node_inner(request).await;
        audit.finish(&self.platform.store, &result, summary).await;
        result
    }
}

/// Node labels are stored and evaluated on every placement: bounded.
fn check_labels(labels: &HashMap<String, String>) -> Result<(), Error> {
    use capstan_types::spec::limits::{MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_NODE_LABELS};
    if labels.len() > MAX_NODE_LABELS {
        return Err(Error::invalid(
            "labels",
            format!("at most {MAX_NODE_LABELS} allowed, got {}", labels.len()),
        ));
    }
    for (key, value) in labels {
        if key.is_empty() || key.len() > MAX_LABEL_KEY_LEN {
            return Err(Error::invalid(
                "labels",
                format!("keys must be 1 to {MAX_LABEL_KEY_LEN} bytes"),
            ));
        }
        if value.len() > MAX_LABEL_VALUE_LEN {
            return Err(Error::invalid(
                format!("labels.{key}"),
                format!(
                    "at most {MAX_LABEL_VALUE_LEN} bytes allowed, got {}",
                    value.len()
                ),
            ));
        }
    }
    Ok(())
}

/// A node may register and heartbeat only as itself.
fn as_itself(caller: &capstan_authn::Claims, node_id: &NodeId) -> Result<(), Status> {
    match caller.node_id() {
        Some(own) if own == node_id.as_str() => Ok(()),
        _ => Err(capstan_proto::status(Error::PermissionDenied(format!(
            "`{}` may act only as its own node, not as `{node_id}`",
            caller.sub
        )))),
    }
}

fn node_to_wire(node: &NodeRecord, allocations: &NodeAllocations, now: i64) -> Node {
    Node {
        id: node.id.clone(),
        address: node.address.clone(),
        capacity: Some(capstan_proto::resources_to_wire(node.capacity)),
        allocated: Some(capstan_proto::resources_to_wire(allocations.total())),
        labels: node.labels.clone().into_iter().collect(),
        status: if node.is_ready(now) {
            NodeStatus::Ready
        } else {
            NodeStatus::Down
        } as i32,
        last_heartbeat_ms: node.last_heartbeat_ms,
        instances: allocations.instances.len() as u32,
        draining: node.draining,
    }
}

/// Nodes register and heartbeat as themselves; placement is internal;
/// draining a node is an admin's call.
pub fn policy() -> Policy {
    Policy::new()
        .nodes("/capstan.v1.Scheduler/RegisterNode")
        .nodes("/capstan.v1.Scheduler/Heartbeat")
        .users("/capstan.v1.Scheduler/ListNodes", Access::Read, true)
        .services("/capstan.v1.Scheduler/Place")
        .services("/capstan.v1.Scheduler/Release")
        .services("/capstan.v1.Scheduler/ListAllocations")
        .admin("/capstan.v1.Scheduler/DrainNode")
}

/// Serves the scheduler on `listener` until `shutdown`.
pub async fn run(
    platform: Platform,
    config: SchedulerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let api = SchedulerApi {
        placer: Placer::new(platform.store.clone(), config.default_strategy),
        platform: platform.clone(),
        node_count: NodeCount::default(),
    };
    migrate_allocations(&platform).await?;
    let indexed = api
        .placer
        .index_placements(capstan_server::now_ms())
        .await?;
    if indexed > 0 {
        tracing::info!(indexed, "placement index built from the node rows");
    }
    let instance_id = capstan_server::new_id("scheduler");
    let election = platform.election(NODE_WATCHER_ROLE, &instance_id, config.lease_ttl);
    let watcher = {
        let api = api.clone();
        tokio::spawn(election.lead(shutdown.clone(), move |store, term| {
            let api = SchedulerApi {
                placer: api.placer.clone(),
                platform: api.platform.with_store(store),
                node_count: api.node_count.clone(),
            };
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = term.cancelled() => return,
                        _ = tick.tick() => {
                            if let Err(e) = api.report_down_nodes().await {
                                tracing::warn!("failed to check node heartbeats: {e}");
                            }
                        }
                    }
                }
            }
        }))
    };
    let policy = policy();
    let service = Service {
        name: "scheduler",
        instance_id,
        grpc_names: vec!["capstan.v1.Scheduler"],
        routes: tonic::service::Routes::new(SchedulerServer::new(api)),
        auth: RequireAuthLayer::new(platform.verifier(), policy),
    };
    let result = capstan_server::serve(&platform, service, listener, shutdown).await;
    watcher.abort();
    result
}

/// Folds the one-row-per-instance `allocations` table of earlier versions
/// into per-node rows, once.
async fn migrate_allocations(platform: &Platform) -> Result<(), Error> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct OldAllocation {
        node_id: String,
        app: String,
        resources: capstan_types::Resources,
    }
    let old: Table<OldAllocation> = Table::new(platform.store.clone(), "allocations");
    let rows = old.list("").await.map_err(Error::internal)?;
    if rows.is_empty() {
        return Ok(());
    }
    let new: Table<NodeAllocations> = Table::new(platform.store.clone(), "node_allocations");
    let mut by_node: HashMap<String, NodeAllocations> = HashMap::new();
    for (id, _, a) in &rows {
        by_node
            .entry(a.node_id.clone())
            .or_default()
            .instances
            .insert(
                id.clone(),
                placer::Allocation {
                    app: a.app.clone(),
                    resources: a.resources,
                    ports: Vec::new(),
                    placed_ms: 0,
                },
            );
    }
    for (node, allocations) in by_node {
        let mut merged = new
            .get(&node)
            .await
            .map_err(Error::internal)?
            .map(|(_, a)| a)
            .unwrap_or_default();
        merged.instances.extend(allocations.instances);
        new.write(&node, &merged, None)
            .await
            .map_err(Error::internal)?;
    }
    for (id, _, _) in rows {
        old.remove(&id).await.map_err(Error::internal)?;
    }
    tracing::info!("migrated allocations to per-node rows");
    Ok(())
}

/// The mutating calls' bodies; the trait methods record each in the
/// audit log around them.
impl SchedulerApi {
    async fn drain_node_inner(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let caller = capstan_authn::caller(&request)
            .map_err(capstan_proto::status)?
            .clone();
        let r = request.into_inner();
        NodeId::parse("node_id", &r.node_id).map_err(capstan_proto::status)?;
        let mut found = false;
        let changed = self
            .nodes()
            .update(&r.node_id, |node| {
                found = node.is_some();
                let node = node.filter(|n| n.draining != r.enable)?;
                Some(NodeRecord {
                    draining: r.enable,
                    ..node.clone()
                })
            })
            .await
            .map_err(internal)?;
        if !found {
            return Err(capstan_proto::status(Error::NotFound(format!(
                "node {}",
                r.node_id
            ))));
        }
        if changed.is_some() {
            tracing::info!(node = %r.node_id, draining = r.enable, by = %caller.sub, "node eligibility changed");
            let kind = if r.enable {
                EventKind::NodeDrainStarted
            } else {
                EventKind::NodeDrainCancelled
            };
            self.platform
                .emit(
                    Event::new(capstan_server::new_id("ev"), now_ms(), kind)
                        .node(&r.node_id)
                        .actor(&caller.sub, caller.role.as_str()),
                )
                .await;
        }
        Ok(Response::new(self.node_status(&r.node_id).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_labels_are_bounded() {
        let many: HashMap<String, String> = (0..65)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(
            check_labels(&many)
                .unwrap_err()
                .to_string()
                .contains("labels: at most 64")
        );
        let long = HashMap::from([("zone".to_string(), "x".repeat(257))]);
        assert!(
            check_labels(&long)
                .unwrap_err()
                .to_string()
                .contains("labels.zone")
        );
        let fine = HashMap::from([("zone".to_string(), "eu-1".to_string())]);
        assert!(check_labels(&fine).is_ok());
    }

    #[test]
    fn heartbeats_slow_down_as_the_cluster_grows_within_bounds() {
        let s = Duration::from_secs;
        // Up to 250 nodes: every second, a node down after the usual 5 s.
        assert_eq!(heartbeat_interval(0), s(1));
        assert_eq!(heartbeat_interval(250), s(1));
        assert_eq!(heartbeat_ttl(heartbeat_interval(250)), NODE_TTL);
        // Past it, at most 250 heartbeats a second in all.
        assert_eq!(heartbeat_interval(500), s(2));
        assert_eq!(heartbeat_interval(5_000), s(20));
        assert_eq!(heartbeat_ttl(s(20)), s(60));
        assert_eq!(heartbeat_interval(1_000_000), s(60));
    }

    #[test]
    fn a_node_is_ready_for_its_own_ttl() {
        let node = |ttl_ms| NodeRecord {
            id: "n1".into(),
            address: "127.0.0.1:1".into(),
            capacity: capstan_types::Resources {
                cpu_millis: 1,
                memory_mb: 1,
            },
            labels: Default::default(),
            last_heartbeat_ms: 1_000,
            ttl_ms,
            down_reported: false,
            draining: false,
        };
        // Records written before the field existed keep the 5 s.
        assert!(node(0).is_ready(6_000));
        assert!(!node(0).is_ready(6_001));
        assert!(node(60_000).is_ready(61_000));
        assert!(!node(60_000).is_ready(61_001));
        let old: NodeRecord = serde_json::from_value(serde_json::json!({
            "id": "n1", "address": "127.0.0.1:1",
            "capacity": {"cpu_millis": 1, "memory_mb": 1},
            "labels": {}, "last_heartbeat_ms": 1000
        }))
        .unwrap();
        assert_eq!(old.ttl_ms, 0);
    }
}
