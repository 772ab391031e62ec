//! The reconciler: observe (agents' instance lists), merge into stored
//! instance records, plan each app ([`crate::plan`]), act. Level-triggered:
//! it runs every second and on events, and a second run over a converged
//! platform does nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use capstan_proto::v1::agent_client::AgentClient;
use capstan_proto::v1::router_config_client::RouterConfigClient;
use capstan_proto::v1::scheduler_client::SchedulerClient;
use capstan_proto::v1::{
    ListAllocationsRequest, ListInstancesRequest, ListNodesRequest, NodeStatus, PlaceRequest,
    ReleaseRequest, StartInstanceRequest, StopInstanceRequest, SyncRequest,
};
use capstan_server::{Platform, new_id, now_ms};
use capstan_store::{Expect, Table};
use capstan_types::{Error, Event, EventKind, InstanceState};
use futures::future::join_all;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::plan::{self, Action, AppView, InstanceView};
use crate::records::{APPS, AppRecord, INSTANCES, InstanceRecord, Rollout, RolloutState};

const TICK: Duration = Duration::from_secs(1);
/// Failures of new instances after which a rollout is abandoned.
const ROLLOUT_MAX_FAILURES: u32 = 3;
/// How long an instance may stay pending before its node must report it.
const PENDING_GRACE_MS: i64 = 30_000;
const STOP_GRACE: Duration = Duration::from_secs(10);
const BACKOFF_MAX_MS: i64 = 30_000;
/// Orphaned allocations are collected every this many passes ...
const COLLECT_EVERY_PASSES: u32 = 30;
/// ... when older than this: younger ones may belong to a start whose
/// instance record is still being written.
const ORPHAN_GRACE_MS: i64 = 60_000;

#[derive(Clone)]
pub struct Reconciler {
    platform: Platform,
    apps: Table<AppRecord>,
    instances: Table<InstanceRecord>,
}

struct Observation {
    ready_nodes: HashSet<String>,
    /// Nodes being drained: their instances move elsewhere.
    draining_nodes: HashSet<String>,
    /// Instances reported by each reachable node.
    reported: HashMap<String, Vec<capstan_proto::v1::Instance>>,
    node_addresses: HashMap<String, String>,
}

/// Changes to one app record decided during a pass, applied with CAS.
#[derive(Default)]
struct AppChanges {
    failures: u32,
    became_healthy: bool,
    placement_error: Option<String>,
}

impl Reconciler {
    pub fn new(platform: Platform) -> Self {
        Reconciler {
            apps: Table::new(platform.store.clone(), APPS),
            instances: Table::new(platform.store.clone(), INSTANCES),
            platform,
        }
    }

    pub async fn run(self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let mut passes = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
            if let Err(e) = self.reconcile().await {
                tracing::warn!("reconcile pass failed: {e}");
            }
            passes = passes.wrapping_add(1);
            if passes.is_multiple_of(COLLECT_EVERY_PASSES) {
                match self.collect_orphans(now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("released {n} orphaned allocations"),
                    Err(e) => tracing::warn!("collecting orphaned allocations failed: {e}"),
                }
            }
        }
    }

    /// Releases allocations that no instance record refers to (a record
    /// deleted while the scheduler was unreachable, a record write that
    /// failed after `Place`). Level-triggered: it compares what the scheduler
    /// holds with the records, so every leak is found whatever caused it.
    pub async fn collect_orphans(&self, now: i64) -> Result<usize, Error> {
        let mut scheduler = SchedulerClient::new(self.platform.client("scheduler").await?);
        let allocations = scheduler
            .list_allocations(ListAllocationsRequest {})
            .await
            .map_err(capstan_proto::into_error)?
            .into_inner()
            .allocations;
        // Records are read after the allocations: a record written in
        // between is seen, so its allocation is never taken for an orphan.
        let records: HashSet<String> = self
            .instances
            .list("")
            .await
            .map_err(Error::internal)?
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        let orphans: Vec<String> = allocations
            .into_iter()
            .filter(|a| !records.contains(&a.instance_id) && now - a.placed_ms > ORPHAN_GRACE_MS)
            .map(|a| a.instance_id)
            .collect();
        if orphans.is_empty() {
            return Ok(0);
        }
        scheduler
            .release(ReleaseRequest {
                instance_ids: orphans.clone(),
            })
            .await
            .map_err(capstan_proto::into_error)?;
        Ok(orphans.len())
    }

    async fn observe(&self) -> Result<Observation, Error> {
        let nodes = SchedulerClient::new(self.platform.client("scheduler").await?)
            .list_nodes(ListNodesRequest {})
            .await
            .map_err(capstan_proto::into_error)?
            .into_inner()
            .nodes;
        let ready: Vec<_> = nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Ready as i32)
            .collect();
        let lists = join_all(ready.iter().map(|node| async move {
            let channel = self.platform.client_at(&node.address).await.ok()?;
            let mut request = tonic::Request::new(ListInstancesRequest {});
            request.set_timeout(Duration::from_secs(3));
            let response = AgentClient::new(channel)
                .list_instances(request)
                .await
                .ok()?;
            Some((node.id.clone(), response.into_inner().instances))
        }))
        .await;
        Ok(Observation {
            ready_nodes: ready.iter().map(|n| n.id.clone()).collect(),
            draining_nodes: nodes
                .iter()
                .filter(|n| n.draining)
                .map(|n| n.id.clone())
                .collect(),
            reported: lists.into_iter().flatten().collect(),
            node_addresses: nodes
                .iter()
                .map(|n| (n.id.clone(), n.address.clone()))
                .collect(),
        })
    }

    /// One pass over every app.
    pub async fn reconcile(&self) -> Result<(), Error> {
        let observation = self.observe().await?;
        let now = now_ms();
        let apps: HashMap<String, (u64, AppRecord)> = self
            .apps
            .list("")
            .await
            .map_err(Error::internal)?
            .into_iter()
            .map(|(k, v, r)| (k, (v, r)))
            .collect();
        let mut records = self.instances.values("").await.map_err(Error::internal)?;

        // Merge what the nodes report into the records.
        let mut observed: HashMap<&str, &capstan_proto::v1::Instance> = HashMap::new();
        for instances in observation.reported.values() {
            for instance in instances {
                observed.insert(instance.id.as_str(), instance);
            }
        }
        for record in &mut records {
            let before = record.clone();
            match observed.get(record.id.as_str()) {
                Some(seen) => {
                    if let Some(state) = capstan_proto::state_from_wire(seen.state)
                        && state != InstanceState::Stopping
                    {
                        record.state = state;
                    }
                    record.message.clone_from(&seen.message);
                    match observation.node_addresses.get(&record.node_id) {
                        Some(node) if on_node(&seen.address, node) => {
                            record.address.clone_from(&seen.address);
                        }
                        _ => {
                            // An agent reports addresses; only its own IP is routed.
                            record.address.clear();
                            record.message = format!(
                                "not routed: address `{}` is not on node {}'s registered IP",
                                seen.address, record.node_id
                            );
                        }
                    }
                }
                None if record.state.is_terminal() => {}
                // Its node answers but no longer runs it (past the grace a new instance gets).
                None if observation.reported.contains_key(&record.node_id)
                    && (record.state != InstanceState::Pending
                        || now - record.created_ms > PENDING_GRACE_MS) =>
                {
                    record.state = InstanceState::Lost;
                    record.message = format!("node {} no longer runs it", record.node_id);
                }
                None if !observation.ready_nodes.contains(&record.node_id) => {
                    record.state = InstanceState::Lost;
                    record.message = format!("node {} is down", record.node_id);
                }
                None => {}
            }
            if *record != before {
                record.updated_ms = now;
                self.instances
                    .put(&record.id, record, Expect::Any)
                    .await
                    .map_err(Error::internal)?;
            }
        }

        // Workloads no record refers to: left over from deleted apps or lost records.
        let known: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        for (node_id, instances) in &observation.reported {
            for orphan in instances.iter().filter(|i| !known.contains(i.id.as_str())) {
                tracing::info!(instance = %orphan.id, node = %node_id, "stopping orphaned instance");
                if let Some(address) = observation.node_addresses.get(node_id) {
                    self.stop_on_node(address, &orphan.id).await;
                }
            }
        }

        let mut by_app: HashMap<String, Vec<InstanceRecord>> = HashMap::new();
        for record in records {
            by_app.entry(record.app.clone()).or_default().push(record);
        }
        let mut names: Vec<String> = apps
            .keys()
            .chain(by_app.keys())
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        names.sort();

        let mut routes = Vec::new();
        let mut drains = Vec::new();
        let mut starts = Vec::new();
        let mut changes: HashMap<String, AppChanges> = HashMap::new();
        for name in &names {
            let instances = by_app.remove(name).unwrap_or_default();
            let app = apps.get(name).map(|(_, a)| a);
            let view = app_view(app, now);
            let views: Vec<InstanceView> = instances
                .iter()
                .map(|r| instance_view(r, &observation.draining_nodes))
                .collect();
            let change = changes.entry(name.clone()).or_default();
            for action in plan::plan(&view, &views) {
                let record = |id: &str| instances.iter().find(|r| r.id == id).cloned();
                match action {
                    Action::Route(id) => {
                        if let Some(mut r) = record(&id) {
                            r.routable = true;
                            r.updated_ms = now;
                            self.instances
                                .put(&id, &r, Expect::Any)
                                .await
                                .map_err(Error::internal)?;
                            change.became_healthy = true;
                            routes.push(id);
                        }
                    }
                    Action::Drain(id) => {
                        if let Some(mut r) = record(&id) {
                            if !r.stopping || r.routable {
                                r.stopping = true;
                                r.routable = false;
                                r.updated_ms = now;
                                self.instances
                                    .put(&id, &r, Expect::Any)
                                    .await
                                    .map_err(Error::internal)?;
                            }
                            drains.push(r);
                        }
                    }
                    Action::Forget(id) => {
                        if let Some(r) = record(&id) {
                            if r.spec_hash == view.target_hash
                                && matches!(r.state, InstanceState::Failed | InstanceState::Lost)
                            {
                                change.failures += 1;
                            }
                            if r.state == InstanceState::Lost {
                                self.emit(
                                    Event::new(new_id("ev"), now, EventKind::InstanceFailed)
                                        .app(&r.app)
                                        .instance(&r.id)
                                        .node(&r.node_id)
                                        .message(&r.message),
                                )
                                .await;
                            }
                            if let Err(e) = self.forget(&r, &observation).await {
                                tracing::warn!(instance = %r.id, "failed to forget instance; retrying next pass: {e}");
                            }
                        }
                    }
                    Action::Start(count) => {
                        if let Some(app) = app {
                            starts.push((app.clone(), count));
                        }
                    }
                }
            }
        }

        // Out of rotation first, then stopped: the router drops drained
        // instances and waits for their requests before anything is killed.
        if !routes.is_empty() || !drains.is_empty() {
            let synced = match self.platform.client("router-config").await {
                Ok(channel) => RouterConfigClient::new(channel)
                    .sync(SyncRequest {})
                    .await
                    .map_err(capstan_proto::into_error),
                Err(e) => Err(e),
            };
            match synced {
                Ok(_) => {
                    join_all(drains.iter().map(|r| self.finish_drain(r, &observation))).await;
                }
                Err(e) => tracing::warn!("router sync failed; stopping nothing this pass: {e}"),
            }
        }

        for (app, count) in starts {
            let placement_error = self.start(&app, count).await;
            changes
                .entry(app.spec.name.clone())
                .or_default()
                .placement_error = Some(placement_error);
        }

        let mut after: HashMap<String, Vec<InstanceView>> = HashMap::new();
        for record in self.instances.values("").await.map_err(Error::internal)? {
            after
                .entry(record.app.clone())
                .or_default()
                .push(instance_view(&record, &observation.draining_nodes));
        }
        for name in &names {
            if let Some((version, app)) = apps.get(name) {
                let instances = after.remove(name).unwrap_or_default();
                let change = changes.remove(name).unwrap_or_default();
                self.update_app(name, *version, app.clone(), &instances, change, now)
                    .await?;
            }
        }
        Ok(())
    }

    async fn emit(&self, event: Event) {
        self.platform.emit(event).await;
    }

    async fn stop_on_node(&self, address: &str, instance_id: &str) -> bool {
        let Ok(channel) = self.platform.client_at(address).await else {
            return false;
        };
        let request = StopInstanceRequest {
            instance_id: instance_id.to_string(),
            grace_ms: STOP_GRACE.as_millis() as u64,
        };
        match AgentClient::new(channel).stop_instance(request).await {
            Ok(_) => true,
            Err(status) => {
                tracing::warn!(instance = %instance_id, "failed to stop instance: {}", status.message());
                false
            }
        }
    }

    /// Frees an instance's allocation. Its record goes only after this
    /// succeeds, so a failure leaves the record (and the retry) in place.
    async fn release(&self, id: &str) -> Result<(), Error> {
        SchedulerClient::new(self.platform.client("scheduler").await?)
            .release(ReleaseRequest {
                instance_ids: vec![id.to_string()],
            })
            .await
            .map_err(capstan_proto::into_error)?;
        Ok(())
    }

    /// Removes an instance that ended by itself: best-effort stop on its node,
    /// then its allocation and record.
    async fn forget(
        &self,
        record: &InstanceRecord,
        observation: &Observation,
    ) -> Result<(), Error> {
        if observation.reported.contains_key(&record.node_id)
            && let Some(address) = observation.node_addresses.get(&record.node_id)
        {
            self.stop_on_node(address, &record.id).await;
        }
        self.release(&record.id).await?;
        self.instances
            .delete(&record.id, Expect::Any)
            .await
            .map_err(Error::internal)?;
        Ok(())
    }

    async fn finish_drain(&self, record: &InstanceRecord, observation: &Observation) {
        // The node's address now: an agent may have restarted on another port.
        let stopped = match observation.node_addresses.get(&record.node_id) {
            Some(address) if observation.ready_nodes.contains(&record.node_id) => {
                self.stop_on_node(address, &record.id).await
            }
            _ => true,
        };
        if !stopped {
            return;
        }
        if let Err(e) = self.release(&record.id).await {
            tracing::warn!(instance = %record.id, "failed to release allocation; retrying next pass: {e}");
            return;
        }
        if let Err(e) = self.instances.delete(&record.id, Expect::Any).await {
            tracing::warn!(instance = %record.id, "failed to delete instance record: {e}");
        }
    }

    /// Places and starts `count` instances; returns why placement fell short.
    async fn start(&self, app: &AppRecord, count: u32) -> String {
        let ids: Vec<String> = (0..count).map(|_| new_id(&app.spec.name)).collect();
        let request = PlaceRequest {
            app: app.spec.name.clone(),
            instance_ids: ids,
            resources: Some(capstan_proto::resources_to_wire(app.spec.resources)),
            placement: Some(capstan_proto::placement_to_wire(&app.spec.placement)),
            host_ports: app
                .spec
                .ports
                .iter()
                .filter_map(|p| p.host_port.map(u32::from))
                .collect(),
        };
        let placed = match self.platform.client("scheduler").await {
            Ok(channel) => SchedulerClient::new(channel)
                .place(request)
                .await
                .map_err(capstan_proto::into_error),
            Err(e) => Err(e),
        };
        let placed = match placed {
            Ok(response) => response.into_inner(),
            Err(e) => return format!("scheduler unavailable: {e}"),
        };
        let now = now_ms();
        let starts = placed.placements.iter().map(|placement| async move {
            let mut record = InstanceRecord {
                id: placement.instance_id.clone(),
                app: app.spec.name.clone(),
                node_id: placement.node_id.clone(),
                spec_hash: app.spec_hash.clone(),
                state: InstanceState::Pending,
                address: String::new(),
                routable: false,
                stopping: false,
                message: String::new(),
                created_ms: now,
                updated_ms: now,
            };
            if let Err(e) = self
                .instances
                .put(&record.id, &record, Expect::Absent)
                .await
            {
                // Nothing refers to the allocation: free it now (orphan
                // collection catches it if this fails too).
                tracing::warn!("failed to record instance: {e}");
                if let Err(e) = self.release(&record.id).await {
                    tracing::warn!(instance = %record.id, "failed to release allocation: {e}");
                }
                return;
            }
            self.emit(
                Event::new(new_id("ev"), now, EventKind::InstanceScheduled)
                    .app(&record.app)
                    .instance(&record.id)
                    .node(&record.node_id),
            )
            .await;
            let request = StartInstanceRequest {
                instance_id: record.id.clone(),
                spec_hash: record.spec_hash.clone(),
                spec: Some(capstan_proto::spec_to_wire(&app.spec)),
            };
            let result = match self.platform.client_at(&placement.node_address).await {
                Ok(channel) => AgentClient::new(channel)
                    .start_instance(request)
                    .await
                    .map_err(capstan_proto::into_error),
                Err(e) => Err(e),
            };
            match result {
                Ok(instance) => {
                    let instance = instance.into_inner();
                    record.state = capstan_proto::state_from_wire(instance.state)
                        .unwrap_or(InstanceState::Starting);
                    if on_node(&instance.address, &placement.node_address) {
                        record.address = instance.address;
                    }
                }
                Err(e) => {
                    record.state = InstanceState::Failed;
                    record.message = e.to_string();
                }
            }
            record.updated_ms = now_ms();
            if let Err(e) = self.instances.put(&record.id, &record, Expect::Any).await {
                tracing::warn!("failed to update instance record: {e}");
            }
        });
        join_all(starts).await;
        placed.explanation
    }

    /// Advances the rollout, backoff and bookkeeping of one app (CAS; a lost
    /// race is retried on the next pass).
    async fn update_app(
        &self,
        name: &str,
        version: u64,
        mut app: AppRecord,
        instances: &[InstanceView],
        change: AppChanges,
        now: i64,
    ) -> Result<(), Error> {
        let before = app.clone();
        if app.deleting {
            if instances.is_empty() {
                self.apps.delete(name, Expect::Version(version)).await.ok();
                tracing::info!(app = name, "app deleted");
            }
            return Ok(());
        }
        if change.failures > 0 {
            app.backoff.failures += change.failures;
            let delay = (500i64 << app.backoff.failures.min(16)).min(BACKOFF_MAX_MS);
            app.backoff.until_ms = now + delay;
        }
        if change.became_healthy {
            app.backoff = Default::default();
        }
        if let Some(error) = change.placement_error {
            app.placement_error = error;
        }
        let view = app_view(Some(&app), now);
        let mut events = Vec::new();
        if app.rollout.state == RolloutState::InProgress {
            if app.rollout.target_hash == app.spec_hash {
                app.rollout.failures += change.failures;
            }
            let updated = plan::updated(&view, instances);
            let stalled = now - app.rollout.progress_ms
                > app.spec.update.progress_deadline.as_millis() as i64;
            if app.rollout.failures >= ROLLOUT_MAX_FAILURES || stalled {
                let reason = if stalled {
                    format!(
                        "no progress within {}",
                        capstan_types::duration::format(app.spec.update.progress_deadline)
                    )
                } else {
                    format!("{} new instances failed", app.rollout.failures)
                };
                match app
                    .stable
                    .clone()
                    .filter(|s| s.template_hash() != app.spec_hash)
                {
                    Some(stable) => {
                        let failed_hash = app.spec_hash.clone();
                        app.spec_hash = stable.template_hash();
                        app.spec = stable;
                        app.rollout = Rollout {
                            state: RolloutState::RolledBack,
                            message: format!(
                                "rollout of {failed_hash} failed ({reason}); rolled back to {}",
                                app.spec_hash
                            ),
                            ..Rollout::start(failed_hash, now)
                        };
                        events.push((EventKind::RolloutRolledBack, app.rollout.message.clone()));
                    }
                    None => {
                        app.rollout.state = RolloutState::Failed;
                        app.rollout.message =
                            format!("rollout of {} failed: {reason}", app.rollout.target_hash);
                        events.push((EventKind::RolloutFailed, app.rollout.message.clone()));
                    }
                }
            } else if plan::rollout_done(&view, instances) {
                app.rollout.state = RolloutState::Completed;
                app.rollout.updated = updated;
                app.rollout.message =
                    format!("{updated} of {} instances updated", app.spec.replicas);
                app.stable = Some(app.spec.clone());
                events.push((EventKind::RolloutCompleted, app.rollout.message.clone()));
            } else if updated > app.rollout.updated {
                app.rollout.updated = updated;
                app.rollout.progress_ms = now;
                app.rollout.message =
                    format!("{updated} of {} instances updated", app.spec.replicas);
                events.push((EventKind::RolloutProgressed, app.rollout.message.clone()));
            }
        }
        if app != before {
            app.updated_ms = now;
            if self
                .apps
                .put(name, &app, Expect::Version(version))
                .await
                .is_ok()
            {
                for (kind, message) in events {
                    self.emit(
                        Event::new(new_id("ev"), now, kind)
                            .app(name)
                            .message(message),
                    )
                    .await;
                }
            }
        }
        Ok(())
    }
}

/// Whether an instance address an agent reported is on that agent's own
/// registered IP: a node cannot point the router at anything else.
pub fn on_node(address: &str, node_address: &str) -> bool {
    match (
        address.parse::<std::net::SocketAddr>(),
        node_address.parse::<std::net::SocketAddr>(),
    ) {
        (Ok(address), Ok(node)) => address.ip() == node.ip(),
        _ => false,
    }
}

fn app_view(app: Option<&AppRecord>, now: i64) -> AppView {
    match app {
        Some(app) => AppView {
            replicas: app.spec.replicas,
            target_hash: app.spec_hash.clone(),
            max_surge: app.spec.update.max_surge,
            max_unavailable: app.spec.update.max_unavailable,
            deleting: app.deleting,
            may_start: now >= app.backoff.until_ms,
        },
        // Instances of an app that no longer exists are removed.
        None => AppView {
            replicas: 0,
            target_hash: String::new(),
            max_surge: 0,
            max_unavailable: 0,
            deleting: true,
            may_start: false,
        },
    }
}

fn instance_view(record: &InstanceRecord, draining_nodes: &HashSet<String>) -> InstanceView {
    InstanceView {
        id: record.id.clone(),
        spec_hash: record.spec_hash.clone(),
        state: record.state,
        routable: record.routable,
        stopping: record.stopping,
        migrating: draining_nodes.contains(&record.node_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_nodes_own_ip_is_routed() {
        assert!(on_node("127.0.0.1:4000", "127.0.0.1:9000"));
        assert!(on_node("10.0.0.5:4000", "10.0.0.5:1"));
        assert!(!on_node("169.254.169.254:80", "10.0.0.5:9000"));
        assert!(!on_node("10.0.0.6:4000", "10.0.0.5:9000"));
        assert!(!on_node("metadata.internal:80", "10.0.0.5:9000"));
        assert!(!on_node("10.0.0.5:4000", ""));
    }
}
