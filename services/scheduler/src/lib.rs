//! The scheduler service: the node registry, fed by agent registrations and
//! heartbeats, and placement ([`placement::place`], pure) with the resulting
//! allocations recorded in the store.
//!
//! A node whose heartbeat is older than [`NODE_TTL`] is down: it gets no new
//! placements, and a `node.down` event tells the orchestrator to replace its
//! instances.

pub mod placement;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use capstan_authn::{Policy, RequireAuthLayer};
use capstan_proto::v1::scheduler_server::{Scheduler, SchedulerServer};
use capstan_proto::v1::{
    HeartbeatRequest, HeartbeatResponse, ListNodesRequest, ListNodesResponse, Node, NodeStatus,
    PlaceRequest, PlaceResponse, Placement, RegisterNodeRequest, ReleaseRequest, ReleaseResponse,
};
use capstan_server::{Platform, Service, now_ms};
use capstan_store::{Expect, Table};
use capstan_types::{Error, Event, EventKind, Resources};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub const NODE_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub address: String,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
    pub last_heartbeat_ms: i64,
    /// Set once `node.down` was published for the current outage.
    #[serde(default)]
    pub down_reported: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Allocation {
    pub node_id: String,
    pub app: String,
    pub resources: Resources,
}

#[derive(Clone)]
struct SchedulerApi {
    platform: Platform,
    nodes: Table<NodeRecord>,
    allocations: Table<Allocation>,
    /// One placement at a time: two concurrent plans never over-commit a node.
    placing: Arc<Mutex<()>>,
}

fn internal(e: impl std::fmt::Display) -> Status {
    capstan_proto::status(Error::internal(e))
}

fn is_ready(node: &NodeRecord, now: i64) -> bool {
    now - node.last_heartbeat_ms <= NODE_TTL.as_millis() as i64
}

impl SchedulerApi {
    async fn snapshot(&self) -> Result<(Vec<NodeRecord>, Vec<(String, Allocation)>), Status> {
        let nodes = self
            .nodes
            .list("")
            .await
            .map_err(internal)?
            .into_iter()
            .map(|(_, _, n)| n)
            .collect();
        let allocations = self
            .allocations
            .list("")
            .await
            .map_err(internal)?
            .into_iter()
            .map(|(k, _, a)| (k, a))
            .collect();
        Ok((nodes, allocations))
    }

    /// Publishes `node.down` once per outage of each node.
    async fn report_down_nodes(&self) -> Result<(), Error> {
        let now = now_ms();
        for (id, version, mut node) in self.nodes.list("").await.map_err(Error::internal)? {
            if !is_ready(&node, now) && !node.down_reported {
                node.down_reported = true;
                if self
                    .nodes
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
}

#[tonic::async_trait]
impl Scheduler for SchedulerApi {
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let r = request.into_inner();
        if let Err(reason) = capstan_types::spec::check_dns_label(&r.id) {
            return Err(capstan_proto::status(Error::invalid("id", reason)));
        }
        if r.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(capstan_proto::status(Error::invalid(
                "address",
                "must be host:port",
            )));
        }
        let capacity = capstan_proto::resources_from_wire(r.capacity);
        if capacity.cpu_millis == 0 || capacity.memory_mb == 0 {
            return Err(capstan_proto::status(Error::invalid(
                "capacity",
                "cpu_millis and memory_mb must be > 0",
            )));
        }
        let record = NodeRecord {
            id: r.id.clone(),
            address: r.address,
            capacity,
            labels: r.labels.into_iter().collect(),
            last_heartbeat_ms: now_ms(),
            down_reported: false,
        };
        self.nodes
            .put(&r.id, &record, Expect::Any)
            .await
            .map_err(internal)?;
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
        let (_, allocations) = self.snapshot().await?;
        Ok(Response::new(node_to_wire(&record, &allocations, now_ms())))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let node_id = request.into_inner().node_id;
        let Some((version, mut node)) = self.nodes.get(&node_id).await.map_err(internal)? else {
            return Ok(Response::new(HeartbeatResponse { known: false }));
        };
        node.last_heartbeat_ms = now_ms();
        node.down_reported = false;
        // A lost race means a concurrent heartbeat or registration already refreshed it.
        let _ = self
            .nodes
            .put(&node_id, &node, Expect::Version(version))
            .await;
        Ok(Response::new(HeartbeatResponse { known: true }))
    }

    async fn list_nodes(
        &self,
        _: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let (nodes, allocations) = self.snapshot().await?;
        let now = now_ms();
        Ok(Response::new(ListNodesResponse {
            nodes: nodes
                .iter()
                .map(|n| node_to_wire(n, &allocations, now))
                .collect(),
        }))
    }

    async fn place(
        &self,
        request: Request<PlaceRequest>,
    ) -> Result<Response<PlaceResponse>, Status> {
        let r = request.into_inner();
        let need = capstan_proto::resources_from_wire(r.resources);
        let _placing = self.placing.lock().await;
        let (nodes, allocations) = self.snapshot().await?;
        let now = now_ms();
        let ready: Vec<&NodeRecord> = nodes.iter().filter(|n| is_ready(n, now)).collect();
        let mut placements = Vec::new();
        let mut todo = Vec::new();
        for id in r.instance_ids {
            // Placing an instance twice returns its first placement.
            match allocations.iter().find(|(k, _)| *k == id) {
                Some((_, a)) => {
                    let address = nodes
                        .iter()
                        .find(|n| n.id == a.node_id)
                        .map(|n| n.address.clone())
                        .unwrap_or_default();
                    placements.push(Placement {
                        instance_id: id,
                        node_id: a.node_id.clone(),
                        node_address: address,
                    });
                }
                None => todo.push(id),
            }
        }
        let snapshots: Vec<placement::NodeSnapshot> = ready
            .iter()
            .map(|n| {
                let mut snapshot = placement::NodeSnapshot {
                    id: n.id.clone(),
                    capacity: n.capacity,
                    allocated: Resources {
                        cpu_millis: 0,
                        memory_mb: 0,
                    },
                    apps: BTreeMap::new(),
                };
                for (_, a) in allocations.iter().filter(|(_, a)| a.node_id == n.id) {
                    snapshot.allocated.cpu_millis += a.resources.cpu_millis;
                    snapshot.allocated.memory_mb += a.resources.memory_mb;
                    *snapshot.apps.entry(a.app.clone()).or_default() += 1;
                }
                snapshot
            })
            .collect();
        let (chosen, explanation) = placement::place(&snapshots, &r.app, need, todo.len());
        for (id, node_idx) in todo.into_iter().zip(chosen) {
            let node = ready[node_idx];
            let allocation = Allocation {
                node_id: node.id.clone(),
                app: r.app.clone(),
                resources: need,
            };
            self.allocations
                .put(&id, &allocation, Expect::Absent)
                .await
                .map_err(internal)?;
            placements.push(Placement {
                instance_id: id,
                node_id: node.id.clone(),
                node_address: node.address.clone(),
            });
        }
        Ok(Response::new(PlaceResponse {
            placements,
            explanation: explanation.unwrap_or_default(),
        }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        for id in request.into_inner().instance_ids {
            self.allocations
                .delete(&id, Expect::Any)
                .await
                .map_err(internal)?;
        }
        Ok(Response::new(ReleaseResponse {}))
    }
}

fn node_to_wire(node: &NodeRecord, allocations: &[(String, Allocation)], now: i64) -> Node {
    let mine: Vec<&Allocation> = allocations
        .iter()
        .map(|(_, a)| a)
        .filter(|a| a.node_id == node.id)
        .collect();
    let allocated = Resources {
        cpu_millis: mine.iter().map(|a| a.resources.cpu_millis).sum(),
        memory_mb: mine.iter().map(|a| a.resources.memory_mb).sum(),
    };
    Node {
        id: node.id.clone(),
        address: node.address.clone(),
        capacity: Some(capstan_proto::resources_to_wire(node.capacity)),
        allocated: Some(capstan_proto::resources_to_wire(allocated)),
        labels: node.labels.clone().into_iter().collect(),
        status: if is_ready(node, now) {
            NodeStatus::Ready
        } else {
            NodeStatus::Down
        } as i32,
        last_heartbeat_ms: node.last_heartbeat_ms,
        instances: mine.len() as u32,
    }
}

/// Serves the scheduler on `listener` until `shutdown`.
pub async fn run(
    platform: Platform,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let api = SchedulerApi {
        platform: platform.clone(),
        nodes: Table::new(platform.store.clone(), "nodes"),
        allocations: Table::new(platform.store.clone(), "allocations"),
        placing: Arc::default(),
    };
    let watcher = {
        let api = api.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = api.report_down_nodes().await {
                            tracing::warn!("failed to check node heartbeats: {e}");
                        }
                    }
                }
            }
        })
    };
    let policy = Policy::new().read("/capstan.v1.Scheduler/ListNodes");
    let service = Service {
        name: "scheduler",
        instance_id: capstan_server::new_id("scheduler"),
        grpc_names: vec!["capstan.v1.Scheduler"],
        routes: tonic::service::Routes::new(SchedulerServer::new(api)),
        auth: RequireAuthLayer::new(platform.verifier(), policy),
    };
    let result = capstan_server::serve(&platform, service, listener, shutdown).await;
    watcher.abort();
    result
}
