//! The reconciler: observe (agents' instance lists), merge into stored
//! instance records, plan each app ([`crate::plan`]), act, then advance each
//! app's rollout ([`capstan_rollout::machine`]). Level-triggered: it runs
//! every second and on events, and a second run over a converged platform
//! does nothing. It reaches the rest of the platform only through
//! [`Cluster`], so every step can be failed on purpose in tests.
//!
//! Instance records are written with compare-and-set on the version read in
//! the same pass: a record changed by anyone else meanwhile is left for the
//! next pass, never overwritten.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use capstan_proto::v1::{Instance, NodeStatus, PlaceRequest, StartInstanceRequest};
use capstan_rollout::machine::{self, Next, Progress};
use capstan_server::{Platform, new_id, now_ms};
use capstan_store::{Expect, StoreError, Table};
use capstan_types::{Error, Event, EventKind, InstanceState};
use futures::future::join_all;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, GrpcCluster};
use crate::journal::JournalEntry;
use crate::plan::{self, Action, InstanceView};
use crate::records::{APPS, AppRecord, INSTANCES, InstanceRecord};

const TICK: Duration = Duration::from_secs(1);
/// Where each pass records its start (and proves it still leads).
const PASSES: &str = "reconciler_passes";
/// How long an instance may stay pending before its node must report it.
const PENDING_GRACE_MS: i64 = 30_000;
/// Orphaned allocations are collected every this many passes ...
const COLLECT_EVERY_PASSES: u32 = 30;
/// ... when older than this: younger ones may belong to a start whose
/// instance record is still being written.
pub const ORPHAN_GRACE_MS: i64 = 60_000;

#[derive(Clone)]
pub struct Reconciler {
    platform: Platform,
    cluster: Arc<dyn Cluster>,
    apps: Table<AppRecord>,
    instances: Table<InstanceRecord>,
    journal: crate::journal::Journal,
}

struct Observation {
    ready_nodes: HashSet<String>,
    /// Nodes being drained: their instances move elsewhere.
    draining_nodes: HashSet<String>,
    /// Instances reported by each reachable node.
    reported: HashMap<String, Vec<Instance>>,
    node_addresses: HashMap<String, String>,
}

/// Instance records of one pass with the versions they were read at.
struct Records {
    table: Table<InstanceRecord>,
    versions: HashMap<String, u64>,
}

impl Records {
    /// Writes `record` if nobody changed it since this pass read it.
    async fn update(&mut self, record: &InstanceRecord) -> Result<bool, Error> {
        let Some(version) = self.versions.get(&record.id).copied() else {
            return Ok(false);
        };
        match self
            .table
            .put(&record.id, record, Expect::Version(version))
            .await
        {
            Ok(next) => {
                self.versions.insert(record.id.clone(), next);
                Ok(true)
            }
            Err(StoreError::Conflict { .. }) => {
                tracing::debug!(instance = %record.id, "record changed concurrently; next pass");
                Ok(false)
            }
            Err(e) => Err(Error::internal(e)),
        }
    }

    /// Deletes `id` if nobody changed it since this pass read it.
    async fn delete(&mut self, id: &str) -> Result<(), Error> {
        let Some(version) = self.versions.get(id).copied() else {
            return Ok(());
        };
        match self.table.delete(id, version).await {
            Ok(_) | Err(StoreError::Conflict { .. }) => {
                self.versions.remove(id);
                Ok(())
            }
            Err(e) => Err(Error::internal(e)),
        }
    }
}

impl Reconciler {
    pub fn new(platform: Platform) -> Self {
        let cluster = Arc::new(GrpcCluster::new(platform.clone()));
        Self::with_cluster(platform, cluster)
    }

    /// A reconciler over any [`Cluster`]: the platform is used for the
    /// store and to publish events.
    pub fn with_cluster(platform: Platform, cluster: Arc<dyn Cluster>) -> Self {
        Reconciler {
            apps: Table::new(platform.store.clone(), APPS),
            instances: Table::new(platform.store.clone(), INSTANCES),
            journal: crate::journal::Journal::new(platform.store.clone()),
            platform,
            cluster,
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
            let started = std::time::Instant::now();
            let result = self.reconcile(now_ms()).await;
            let metrics = capstan_server::metrics::metrics();
            metrics
                .reconcile_duration
                .observe(started.elapsed().as_secs_f64());
            let outcome = if result.is_ok() { "ok" } else { "error" };
            metrics.reconcile_passes.with_label_values(&[outcome]).inc();
            if let Err(e) = result {
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
        let allocations = self.cluster.allocations().await?;
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
        let count = orphans.len();
        self.cluster.release(orphans).await?;
        Ok(count)
    }

    async fn observe(&self) -> Result<Observation, Error> {
        let nodes = self.cluster.nodes().await?;
        let ready: Vec<_> = nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Ready as i32)
            .collect();
        let lists = join_all(ready.iter().map(|node| async move {
            let instances = self.cluster.instances(node).await?;
            Some((node.id.clone(), instances))
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

    /// One pass over every app, at time `now`.
    pub async fn reconcile(&self, now: i64) -> Result<(), Error> {
        // A write before any decision: through a leader's fenced store it
        // fails once a newer leader took over, so a leader that was paused
        // and resumes calls no scheduler or agent either.
        self.platform
            .store
            .write(PASSES, "last", now.to_string().into_bytes(), None)
            .await
            .map_err(|e| Error::Unavailable(format!("not the leader any more: {e}")))?;
        let observation = self.observe().await?;
        let apps: HashMap<String, (u64, AppRecord)> = self
            .apps
            .list("")
            .await
            .map_err(Error::internal)?
            .into_iter()
            .map(|(k, v, r)| (k, (v, r)))
            .collect();
        let listed = self.instances.list("").await.map_err(Error::internal)?;
        let mut store = Records {
            table: self.instances.clone(),
            versions: listed.iter().map(|(k, v, _)| (k.clone(), *v)).collect(),
        };
        let mut records: Vec<InstanceRecord> = listed.into_iter().map(|(_, _, r)| r).collect();

        // Merge what the nodes report into the records.
        let mut observed: HashMap<&str, &Instance> = HashMap::new();
        for instances in observation.reported.values() {
            for instance in instances {
                observed.insert(instance.id.as_str(), instance);
            }
        }
        for record in &mut records {
            let before = record.clone();
            merge(
                record,
                observed.get(record.id.as_str()).copied(),
                &observation,
                now,
            );
            if *record != before {
                record.updated_ms = now;
                store.update(record).await?;
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

        let mut routes = 0usize;
        let mut drains = Vec::new();
        let mut starts = Vec::new();
        let mut progress: HashMap<String, Progress> = HashMap::new();
        for name in &names {
            let instances = by_app.remove(name).unwrap_or_default();
            let app = apps.get(name).map(|(_, a)| a);
            let view = machine::app_view(app, now);
            let views: Vec<InstanceView> = instances
                .iter()
                .map(|r| instance_view(r, &observation.draining_nodes))
                .collect();
            let seen = progress.entry(name.clone()).or_default();
            for action in plan::plan(&view, &views) {
                let record = |id: &str| instances.iter().find(|r| r.id == id).cloned();
                match action {
                    Action::Route(id) => {
                        if let Some(mut r) = record(&id) {
                            r.routable = true;
                            r.updated_ms = now;
                            if store.update(&r).await? {
                                seen.became_healthy = true;
                                routes += 1;
                            }
                        }
                    }
                    Action::Drain(id) => {
                        if let Some(mut r) = record(&id) {
                            if !r.stopping || r.routable {
                                r.stopping = true;
                                r.routable = false;
                                r.updated_ms = now;
                                if !store.update(&r).await? {
                                    continue;
                                }
                                if observation.draining_nodes.contains(&r.node_id) {
                                    self.journal
                                        .record(
                                            JournalEntry::new(&r.app, now, "drain")
                                                .input("instance", &r.id)
                                                .input("node", &r.node_id)
                                                .rule("a draining node's instances move: replacement first, then the old one leaves rotation and stops")
                                                .result(format!("{} leaves rotation and stops", r.id))
                                                .reason(format!(
                                                    "moved {} off {}: the node is draining",
                                                    r.id, r.node_id
                                                )),
                                        )
                                        .await;
                                }
                            }
                            drains.push(r);
                        }
                    }
                    Action::Forget(id) => {
                        if let Some(r) = record(&id) {
                            if r.spec_hash == view.target_hash
                                && matches!(r.state, InstanceState::Failed | InstanceState::Lost)
                            {
                                seen.failures += 1;
                            }
                            if r.state == InstanceState::Lost {
                                self.journal
                                    .record(
                                        JournalEntry::new(&r.app, now, "replacement")
                                            .input("instance", &r.id)
                                            .input("node", &r.node_id)
                                            .input("observed", &r.message)
                                            .rule("an instance lost with its node is forgotten and the count restored elsewhere")
                                            .result(format!("{} forgotten; a replacement is placed", r.id))
                                            .reason(format!(
                                                "replacing {} on {}: {}",
                                                r.id,
                                                r.node_id,
                                                if r.message.is_empty() { "its node was lost" } else { &r.message }
                                            )),
                                    )
                                    .await;
                                self.emit(
                                    Event::new(new_id("ev"), now, EventKind::InstanceFailed)
                                        .app(&r.app)
                                        .instance(&r.id)
                                        .node(&r.node_id)
                                        .message(&r.message),
                                )
                                .await;
                            }
                            if let Err(e) = self.forget(&r, &observation, &mut store).await {
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
        if routes > 0 || !drains.is_empty() {
            match self.cluster.sync_routes().await {
                Ok(()) => {
                    for record in &drains {
                        self.finish_drain(record, &observation, &mut store).await;
                    }
                }
                Err(e) => tracing::warn!("router sync failed; stopping nothing this pass: {e}"),
            }
        }

        for (app, count) in starts {
            let placement_error = self.start(&app, count, now).await;
            progress
                .entry(app.spec.name.to_string())
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
                let seen = progress.remove(name).unwrap_or_default();
                self.advance(name, *version, app, &instances, &seen, now)
                    .await;
            }
        }
        Ok(())
    }

    async fn emit(&self, event: Event) {
        self.platform.emit(event).await;
    }

    async fn stop_on_node(&self, address: &str, instance_id: &str) -> bool {
        match self.cluster.stop(address, instance_id).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(instance = %instance_id, "failed to stop instance: {e}");
                false
            }
        }
    }

    /// Removes an instance that ended by itself: best-effort stop on its
    /// node, then its allocation, then its record. The record goes only
    /// once the allocation is freed, so a failure is retried next pass.
    async fn forget(
        &self,
        record: &InstanceRecord,
        observation: &Observation,
        store: &mut Records,
    ) -> Result<(), Error> {
        if observation.reported.contains_key(&record.node_id)
            && let Some(address) = observation.node_addresses.get(&record.node_id)
        {
            self.stop_on_node(address, &record.id).await;
        }
        self.cluster.release(vec![record.id.clone()]).await?;
        store.delete(&record.id).await
    }

    async fn finish_drain(
        &self,
        record: &InstanceRecord,
        observation: &Observation,
        store: &mut Records,
    ) {
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
        if let Err(e) = self.cluster.release(vec![record.id.clone()]).await {
            tracing::warn!(instance = %record.id, "failed to release allocation; retrying next pass: {e}");
            return;
        }
        if let Err(e) = store.delete(&record.id).await {
            tracing::warn!(instance = %record.id, "failed to delete instance record: {e}");
        }
    }

    /// Places and starts `count` instances; returns why placement fell short.
    /// Places and starts `count` instances; while the app's rollout is in
    /// progress, in a span of the trace of the request that started it.
    async fn start(&self, app: &AppRecord, count: u32, now: i64) -> String {
        use tracing::Instrument;
        let span = match &app.rollout.trace {
            Some(trace) if app.rollout.state == crate::records::RolloutState::InProgress => {
                let span = tracing::info_span!(
                    "reconcile.start_instances",
                    app = %app.spec.name,
                    count,
                    rollout = %app.rollout.target_hash,
                );
                capstan_telemetry::follow(&span, trace);
                span
            }
            _ => tracing::Span::none(),
        };
        self.start_traced(app, count, now).instrument(span).await
    }

    async fn start_traced(&self, app: &AppRecord, count: u32, now: i64) -> String {
        let ids: Vec<String> = (0..count).map(|_| new_id(&app.spec.name)).collect();
        let request = PlaceRequest {
            app: app.spec.name.to_string(),
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
        let placed = match self.cluster.place(request).await {
            Ok(placed) => placed,
            Err(e) => return format!("scheduler unavailable: {e}"),
        };
        self.journal_placement(app, count, &placed, now).await;
        let starts = placed.placements.iter().map(|placement| async move {
            let mut record = InstanceRecord {
                id: placement.instance_id.clone(),
                app: app.spec.name.to_string(),
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
            let version = match self
                .instances
                .put(&record.id, &record, Expect::Absent)
                .await
            {
                Ok(version) => version,
                Err(e) => {
                    // Nothing refers to the allocation: free it now (orphan
                    // collection catches it if this fails too).
                    tracing::warn!("failed to record instance: {e}");
                    if let Err(e) = self.cluster.release(vec![record.id.clone()]).await {
                        tracing::warn!(instance = %record.id, "failed to release allocation: {e}");
                    }
                    return;
                }
            };
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
            match self.cluster.start(&placement.node_address, request).await {
                Ok(instance) => {
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
            if let Err(e) = self
                .instances
                .put(&record.id, &record, Expect::Version(version))
                .await
            {
                // The next pass observes the instance on its node instead.
                tracing::warn!("failed to update instance record: {e}");
            }
        });
        join_all(starts).await;
        placed.explanation
    }

    /// Advances one app's rollout and bookkeeping (compare-and-set: a lost
    /// race is retried on the next pass), then publishes what changed.
    async fn advance(
        &self,
        name: &str,
        version: u64,
        app: &AppRecord,
        instances: &[InstanceView],
        progress: &Progress,
        now: i64,
    ) {
        match machine::advance(app, instances, progress, now) {
            Next::Unchanged => {}
            Next::Delete => {
                if self.apps.delete(name, version).await.is_ok() {
                    tracing::info!(app = name, "app deleted");
                }
            }
            Next::Write { app, events } => {
                if self
                    .apps
                    .put(name, &app, Expect::Version(version))
                    .await
                    .is_ok()
                {
                    for (kind, message) in &events {
                        if *kind == EventKind::RolloutRolledBack {
                            self.journal
                                .record(
                                    JournalEntry::new(name, now, "rollback")
                                        .input("failed_template", &app.rollout.target_hash)
                                        .input("restored_template", &app.spec_hash)
                                        .rule("a rollout whose new instances fail three times, or that makes no progress within progress_deadline, returns to the last completed template")
                                        .result(format!("template {} restored", app.spec_hash))
                                        .reason(message.clone()),
                                )
                                .await;
                        }
                    }
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
        }
    }
}

impl Reconciler {
    /// Journals a `Place`: what was asked, by which strategy, and where the
    /// instances went (or why not all of them found a node).
    async fn journal_placement(
        &self,
        app: &AppRecord,
        count: u32,
        placed: &capstan_proto::v1::PlaceResponse,
        now: i64,
    ) {
        let strategy = match (app.spec.placement.strategy, &app.spec.placement.spread_by) {
            (Some(strategy), _) => strategy.name().to_string(),
            (None, Some(_)) => "spread".to_string(),
            (None, None) => "the cluster's default".to_string(),
        };
        let nodes: Vec<&str> = placed
            .placements
            .iter()
            .map(|p| p.node_id.as_str())
            .collect();
        let reason = if nodes.len() as u32 == count {
            format!(
                "placed {count} of {count} instances on {} ({strategy})",
                nodes.join(", ")
            )
        } else {
            format!(
                "placed {} of {count} instances: {}",
                nodes.len(),
                placed.explanation
            )
        };
        self.journal
            .record(
                JournalEntry::new(&app.spec.name, now, "placement")
                    .input("requested", count)
                    .input("cpu_millis", app.spec.resources.cpu_millis)
                    .input("memory_mb", app.spec.resources.memory_mb)
                    .input("constraints", app.spec.placement.constraints.len())
                    .rule(format!(
                        "strategy {strategy}: filter by constraints and capacity, then score"
                    ))
                    .result(if nodes.is_empty() {
                        "no node".to_string()
                    } else {
                        nodes.join(", ")
                    })
                    .reason(reason),
            )
            .await;
    }
}

/// Folds what a node reports (or does not) into an instance record.
fn merge(
    record: &mut InstanceRecord,
    seen: Option<&Instance>,
    observation: &Observation,
    now: i64,
) {
    match seen {
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
mod tests;
