//! The reconciler: observe (agents' instance lists), merge into stored
//! instance records, plan each app ([`crate::plan`]), act, then advance each
//! app's rollout ([`capstan_rollout::machine`]). Level-triggered: it runs
//! every second and on events, and a second run over a converged platform
//! does nothing. Most passes look only where events point
//! ([`crate::changes`]); a full sweep over every node and app backs them up
//! (ADR 19). It reaches the rest of the platform only through [`Cluster`],
//! so every step can be failed on purpose in tests.
//!
//! Instance records are written with compare-and-set on the version read in
//! the same pass: a record changed by anyone else meanwhile is left for the
//! next pass, never overwritten.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use capstan_proto::v1::{Instance, Node, NodeStatus, PlaceRequest, StartInstanceRequest};
use capstan_rollout::machine::{self, Next, Progress};
use capstan_server::{Platform, new_id, now_ms};
use capstan_store::{Expect, StoreError, Table};
use capstan_types::{Error, Event, EventKind, InstanceState};
use futures::future::join_all;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::changes::{Changes, Pending};
use crate::cluster::{Cluster, GrpcCluster};
use crate::journal::JournalEntry;
use crate::plan::{self, Action, InstanceView};
use crate::records::{APPS, AppRecord, INSTANCES, InstanceRecord, RolloutState};

const TICK: Duration = Duration::from_secs(1);
/// A full sweep (every ready node observed, every record and app read) runs
/// at least this often ...
const FULL_SWEEP: Duration = Duration::from_secs(5);
/// ... and waits at least this many times as long as the last one took, so
/// that sweeps take at most a fifth of the reconciler's time however many
/// nodes there are (at 5,000 nodes a sweep is 5,000 `ListInstances`).
const FULL_SWEEP_SPACING: u32 = 4;
/// Between node events, the node list is read again at least this often.
const NODES_EVERY: Duration = TICK;
/// An app that has not converged is looked at again at least this often,
/// hint or no hint: backoff, rollout deadlines and grace periods run on time.
const UNSETTLED_EVERY: Duration = TICK;
/// More apps than this in one pass, and it lists the apps table instead of
/// reading them one by one.
const GET_APPS_MAX: usize = 256;
/// Apps whose placement and starts run at once (more wait for a slot).
const START_CONCURRENCY: usize = 16;
/// How long a reconciler that stops waits for its starts in flight.
const LANDING_GRACE: Duration = Duration::from_secs(10);
/// Where each pass records its start (and proves it still leads).
const PASSES: &str = "reconciler_passes";
/// How long an instance may stay pending before its node must report it.
const PENDING_GRACE_MS: i64 = 30_000;
/// Orphaned allocations are collected this often ...
const COLLECT_EVERY: Duration = Duration::from_secs(30);
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
    known: Arc<tokio::sync::Mutex<Known>>,
    /// Marked when a start lands: each record's node, so the next pass
    /// asks it again, and once the start is over, its app, so it is
    /// planned again at once.
    changes: Arc<Changes>,
    /// What starts in flight have written, for the next pass to take in.
    landed: Arc<std::sync::Mutex<Vec<Landed>>>,
    /// The starts in flight: a pass decides them and does not wait for them.
    starting: TaskTracker,
    start_slots: Arc<Semaphore>,
}

/// What a start in flight reports back, in order: each instance's record
/// as it is written, then that the app's start is over.
enum Landed {
    Record(Written),
    /// The start is over: why placement fell short (empty: it did not),
    /// and the time (ms) of the pass that decided it.
    Done {
        app: String,
        explanation: String,
        at: i64,
    },
}

struct Observation {
    ready_nodes: HashSet<String>,
    /// Nodes being drained: their instances move elsewhere.
    draining_nodes: HashSet<String>,
    /// Instances reported by each node asked this pass that answered.
    reported: HashMap<String, Vec<Instance>>,
    /// Ready nodes asked this pass that did not answer.
    unreachable: HashSet<String>,
    node_addresses: HashMap<String, String>,
}

impl Observation {
    /// Whether a call to `node` may reach it: ready, and not just found
    /// unreachable.
    fn reachable(&self, node: &str) -> bool {
        self.ready_nodes.contains(node) && !self.unreachable.contains(node)
    }
}

/// What the leading reconciler knows between passes: every instance record
/// as it last read or wrote it (it is their only writer, always by
/// compare-and-set), the node list, and the apps that have not converged.
/// Trusted only while `complete`: a write that lost a race or failed clears
/// it, and the next pass is a full sweep that reads everything again.
#[derive(Default)]
struct Known {
    records: HashMap<String, (u64, InstanceRecord)>,
    by_app: HashMap<String, BTreeSet<String>>,
    by_node: HashMap<String, HashSet<String>>,
    complete: bool,
    nodes: Vec<Node>,
    nodes_read: Option<Instant>,
    /// Ready nodes that did not answer the last time they were asked: asked
    /// again in the next pass.
    unanswered: HashSet<String>,
    /// Apps not converged, with when a pass last looked at each.
    unsettled: HashMap<String, Instant>,
    /// Apps whose start is in flight, with the ids it starts. Their records
    /// are incomplete until it lands, so a pass only routes their healthy
    /// instances: it starts, drains and forgets none, nor advances their
    /// rollout, and their instances on nodes are not orphans.
    starting: HashMap<String, HashSet<String>>,
    /// What passes saw of apps in flight (and why their placement fell
    /// short), for the pass that plans them whole.
    carried: HashMap<String, Progress>,
    /// Apps whose last start fell short of placing them all, with the
    /// pass time (ms) that decided it: placed again only [`UNSETTLED_EVERY`]
    /// later (the landing's hint plans the app, but nothing it freed would
    /// let it fit).
    short: HashMap<String, i64>,
}

impl Known {
    fn insert(&mut self, version: u64, record: InstanceRecord) {
        self.remove(&record.id);
        self.by_app
            .entry(record.app.clone())
            .or_default()
            .insert(record.id.clone());
        self.by_node
            .entry(record.node_id.clone())
            .or_default()
            .insert(record.id.clone());
        self.records.insert(record.id.clone(), (version, record));
    }

    fn remove(&mut self, id: &str) {
        let Some((_, record)) = self.records.remove(id) else {
            return;
        };
        if let Some(ids) = self.by_app.get_mut(&record.app) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_app.remove(&record.app);
            }
        }
        if let Some(ids) = self.by_node.get_mut(&record.node_id) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_node.remove(&record.node_id);
            }
        }
    }

    /// [`Known::insert`], unless what is known is newer: a start landing
    /// after a full sweep read its record, or after a pass wrote it again.
    fn insert_newer(&mut self, version: u64, record: InstanceRecord) {
        if self
            .records
            .get(&record.id)
            .is_none_or(|(known, _)| *known < version)
        {
            self.insert(version, record);
        }
    }

    /// Takes in what starts in flight wrote; returns the apps whose start
    /// is over.
    fn land(&mut self, landed: Vec<Landed>) -> Vec<String> {
        let mut done = Vec::new();
        for landing in landed {
            match landing {
                Landed::Record(Some((version, record))) => self.insert_newer(version, record),
                Landed::Record(None) => self.complete = false,
                Landed::Done {
                    app,
                    explanation,
                    at,
                } => {
                    self.starting.remove(&app);
                    if explanation.is_empty() {
                        self.short.remove(&app);
                    } else {
                        self.short.insert(app.clone(), at);
                    }
                    self.carried.entry(app.clone()).or_default().placement_error =
                        Some(explanation);
                    done.push(app);
                }
            }
        }
        done
    }

    /// Replaces everything with the records just listed.
    fn reload(&mut self, listed: Vec<(String, u64, InstanceRecord)>) {
        self.records.clear();
        self.by_app.clear();
        self.by_node.clear();
        for (_, version, record) in listed {
            self.insert(version, record);
        }
        self.complete = true;
    }

    /// `app`'s records, in id order.
    fn of_app<'a>(&'a self, app: &str) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
        self.by_app
            .get(app)
            .into_iter()
            .flatten()
            .filter_map(|id| self.records.get(id).map(|(_, r)| r))
    }

    /// Writes `record` if nobody changed it since it was read or written here.
    async fn update(
        &mut self,
        table: &Table<InstanceRecord>,
        record: &InstanceRecord,
    ) -> Result<bool, Error> {
        let written = self.update_all(table, std::slice::from_ref(record)).await?;
        Ok(written.first().copied().unwrap_or(false))
    }

    /// [`Known::update`] for many records at once (the store may commit
    /// them together); returns which were written.
    async fn update_all(
        &mut self,
        table: &Table<InstanceRecord>,
        records: &[InstanceRecord],
    ) -> Result<Vec<bool>, Error> {
        let writes = records.iter().map(|record| {
            let version = self.records.get(&record.id).map(|(v, _)| *v);
            async move {
                match version {
                    Some(version) => Some(
                        table
                            .put(&record.id, record, Expect::Version(version))
                            .await,
                    ),
                    None => None,
                }
            }
        });
        let outcomes = join_all(writes).await;
        let mut written = Vec::with_capacity(records.len());
        let mut failed = None;
        for (record, outcome) in records.iter().zip(outcomes) {
            match outcome {
                Some(Ok(next)) => {
                    self.insert(next, record.clone());
                    written.push(true);
                }
                None => written.push(false),
                Some(Err(StoreError::Conflict { .. })) => {
                    tracing::debug!(instance = %record.id, "record changed concurrently; next pass");
                    self.complete = false;
                    written.push(false);
                }
                Some(Err(e)) => {
                    self.complete = false;
                    failed = Some(e);
                    written.push(false);
                }
            }
        }
        match failed {
            Some(e) => Err(Error::internal(e)),
            None => Ok(written),
        }
    }

    /// Deletes `id` if nobody changed it since it was read or written here.
    async fn delete(&mut self, table: &Table<InstanceRecord>, id: &str) -> Result<(), Error> {
        let Some(version) = self.records.get(id).map(|(v, _)| *v) else {
            return Ok(());
        };
        match table.delete(id, version).await {
            Ok(_) => {
                self.remove(id);
                Ok(())
            }
            Err(StoreError::Conflict { .. }) => {
                self.remove(id);
                self.complete = false;
                Ok(())
            }
            Err(e) => {
                self.complete = false;
                Err(Error::internal(e))
            }
        }
    }
}

/// What one start wrote: the record and its version, or `None` when a
/// write failed and what the store holds is not known.
type Written = Option<(u64, InstanceRecord)>;

impl Reconciler {
    /// A reconciler of `platform` that passes over what `changes` marks.
    pub fn new(platform: Platform, changes: Arc<Changes>) -> Self {
        let cluster = Arc::new(GrpcCluster::new(platform.clone()));
        Self::with_cluster(platform, cluster, changes)
    }

    /// A reconciler over any [`Cluster`]: the platform is used for the
    /// store and to publish events.
    pub fn with_cluster(
        platform: Platform,
        cluster: Arc<dyn Cluster>,
        changes: Arc<Changes>,
    ) -> Self {
        Reconciler {
            apps: Table::new(platform.store.clone(), APPS),
            instances: Table::new(platform.store.clone(), INSTANCES),
            journal: crate::journal::Journal::new(platform.store.clone()),
            platform,
            cluster,
            known: Arc::default(),
            changes,
            landed: Arc::default(),
            starting: TaskTracker::new(),
            start_slots: Arc::new(Semaphore::new(START_CONCURRENCY)),
        }
    }

    /// Returns once no start is in flight.
    pub async fn starts_landed(&self) {
        self.starting.close();
        self.starting.wait().await;
        self.starting.reopen();
    }

    /// Reconciles until `shutdown`: a pass over what changed whenever
    /// something is marked (and every [`TICK`]), a full sweep when it is
    /// due. Returns once the starts in flight are over too, or after
    /// [`LANDING_GRACE`] (what they write after that goes through the
    /// leader's fenced store, so it fails once another replica leads).
    pub async fn run(self, shutdown: CancellationToken) {
        self.reconcile_until(&shutdown).await;
        if tokio::time::timeout(LANDING_GRACE, self.starts_landed())
            .await
            .is_err()
        {
            tracing::warn!("starts still in flight {LANDING_GRACE:?} after the reconciler stopped");
        }
    }

    async fn reconcile_until(&self, shutdown: &CancellationToken) {
        let changes = self.changes.clone();
        let mut last_sweep: Option<(Instant, Duration)> = None;
        let mut last_collect = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.marked() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
            let pending = changes.take();
            let sweep = last_sweep
                .is_none_or(|(at, took)| at.elapsed() >= FULL_SWEEP.max(took * FULL_SWEEP_SPACING));
            let started = Instant::now();
            let result = if sweep {
                self.reconcile(now_ms()).await
            } else {
                self.reconcile_changes(now_ms(), pending).await
            };
            if sweep {
                last_sweep = Some((started, started.elapsed()));
            }
            let metrics = capstan_server::metrics::metrics();
            metrics
                .reconcile_duration
                .observe(started.elapsed().as_secs_f64());
            let outcome = if result.is_ok() { "ok" } else { "error" };
            metrics.reconcile_passes.with_label_values(&[outcome]).inc();
            if let Err(e) = result {
                tracing::warn!("reconcile pass failed: {e}");
            }
            if last_collect.elapsed() >= COLLECT_EVERY {
                last_collect = Instant::now();
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

    /// Asks the ready nodes in `only` (every ready node when `None`) what
    /// they run.
    async fn observe(&self, nodes: &[Node], only: Option<&HashSet<String>>) -> Observation {
        let ready: Vec<&Node> = nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Ready as i32)
            .collect();
        let asked = ready
            .iter()
            .filter(|n| only.is_none_or(|only| only.contains(&n.id)));
        let lists = join_all(
            asked.map(|node| async move { (node.id.clone(), self.cluster.instances(node).await) }),
        )
        .await;
        let mut reported = HashMap::new();
        let mut unreachable = HashSet::new();
        for (id, list) in lists {
            match list {
                Some(instances) => {
                    reported.insert(id, instances);
                }
                None => {
                    unreachable.insert(id);
                }
            }
        }
        Observation {
            ready_nodes: ready.iter().map(|n| n.id.clone()).collect(),
            draining_nodes: nodes
                .iter()
                .filter(|n| n.draining)
                .map(|n| n.id.clone())
                .collect(),
            reported,
            unreachable,
            node_addresses: nodes
                .iter()
                .map(|n| (n.id.clone(), n.address.clone()))
                .collect(),
        }
    }

    /// A full sweep at time `now`: every ready node observed, every app and
    /// instance record read, every app planned.
    pub async fn reconcile(&self, now: i64) -> Result<(), Error> {
        self.locked_pass(now, None).await
    }

    /// A pass over what `changes` names: those apps, the nodes named and
    /// those whose entry in the node list changed (with every app that has
    /// instances there), and the apps that have not converged. Nothing else
    /// is read, so a pass costs what changed, not the size of the cluster.
    /// A full sweep instead while what this leader knows is incomplete.
    pub async fn reconcile_changes(&self, now: i64, changes: Pending) -> Result<(), Error> {
        self.locked_pass(now, Some(changes)).await
    }

    /// A pass over `changes`, or a full sweep when there are none or what
    /// this leader knows is incomplete. A failed pass leaves it incomplete:
    /// the hints it took are gone, so the next pass sweeps.
    async fn locked_pass(&self, now: i64, changes: Option<Pending>) -> Result<(), Error> {
        let mut known = self.known.lock().await;
        let landed = std::mem::take(&mut *self.landed.lock().expect("landed lock poisoned"));
        let done = known.land(landed);
        let scope = changes
            .filter(|c| known.complete && !c.everything)
            .map(|mut c| {
                c.apps.extend(done);
                c
            });
        let result = self.pass(now, scope, &mut known).await;
        if result.is_err() {
            known.complete = false;
        }
        result
    }

    /// One pass: over everything when `changes` is `None`.
    async fn pass(
        &self,
        now: i64,
        changes: Option<Pending>,
        known: &mut Known,
    ) -> Result<(), Error> {
        let began = Instant::now();
        // A write before any decision: through a leader's fenced store it
        // fails once a newer leader took over, so a leader that was paused
        // and resumes calls no scheduler or agent either.
        self.platform
            .store
            .write(PASSES, "last", now.to_string().into_bytes(), None)
            .await
            .map_err(|e| Error::Unavailable(format!("not the leader any more: {e}")))?;

        let read_nodes = match &changes {
            None => true,
            Some(changes) => {
                changes.node_list || known.nodes_read.is_none_or(|t| t.elapsed() >= NODES_EVERY)
            }
        };
        let mut moved_nodes = HashSet::new();
        if read_nodes {
            let nodes = self.cluster.nodes().await?;
            moved_nodes = node_changes(&known.nodes, &nodes);
            known.nodes = nodes;
            known.nodes_read = Some(Instant::now());
        }
        let observe: Option<HashSet<String>> = changes.as_ref().map(|c| {
            c.nodes
                .iter()
                .chain(&moved_nodes)
                .chain(&known.unanswered)
                .cloned()
                .collect()
        });
        let fenced = began.elapsed();
        let observation = self.observe(&known.nodes, observe.as_ref()).await;
        known.unanswered.clone_from(&observation.unreachable);
        let observed_at = began.elapsed();

        let mut observed: HashMap<&str, &Instance> = HashMap::new();
        for instances in observation.reported.values() {
            for instance in instances {
                observed.insert(instance.id.as_str(), instance);
            }
        }
        let full = changes.is_none();
        let apps: HashMap<String, (u64, AppRecord)>;
        let names: Vec<String>;
        match changes {
            None => {
                apps = self
                    .apps
                    .list("")
                    .await
                    .map_err(Error::internal)?
                    .into_iter()
                    .map(|(k, v, r)| (k, (v, r)))
                    .collect();
                known.reload(self.instances.list("").await.map_err(Error::internal)?);
                names = apps
                    .keys()
                    .chain(known.by_app.keys())
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
            }
            Some(changes) => {
                let mut scope: BTreeSet<String> = changes.apps.into_iter().collect();
                // Every app on a node whose entry in the node list changed;
                // of the nodes asked, the apps whose records their reports
                // change (a node reports every app it runs, and asking it
                // for one must not plan the others).
                for node in &moved_nodes {
                    for id in known.by_node.get(node).into_iter().flatten() {
                        if let Some((_, record)) = known.records.get(id) {
                            scope.insert(record.app.clone());
                        }
                    }
                }
                for node in observation.reported.keys() {
                    for id in known.by_node.get(node).into_iter().flatten() {
                        if let Some((_, record)) = known.records.get(id)
                            && !scope.contains(&record.app)
                        {
                            let mut merged = record.clone();
                            merge(
                                &mut merged,
                                observed.get(id.as_str()).copied(),
                                &observation,
                                now,
                            );
                            if merged != *record {
                                scope.insert(record.app.clone());
                            }
                        }
                    }
                }
                scope.extend(
                    known
                        .unsettled
                        .iter()
                        .filter(|(_, looked)| looked.elapsed() >= UNSETTLED_EVERY)
                        .map(|(app, _)| app.clone()),
                );
                apps = self.read_apps(&scope).await?;
                names = scope.into_iter().collect();
            }
        }

        // Merge what the nodes report into the records.
        let mut by_app: HashMap<String, Vec<InstanceRecord>> = HashMap::new();
        // Records whose merge changed them, written with the routes below
        // in one group: an instance seen healthy is recorded and routed by
        // one write.
        let mut writes: BTreeMap<String, InstanceRecord> = BTreeMap::new();
        // Apps with a record that left the routes or came back by what its
        // node said (a crash, a lost node, an address no longer on the
        // node): the router is told in this pass, as for a drain.
        let mut rerouted: BTreeSet<String> = BTreeSet::new();
        for name in &names {
            let mut records: Vec<InstanceRecord> = known.of_app(name).cloned().collect();
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
                    if record.in_routes() != before.in_routes() {
                        rerouted.insert(name.clone());
                    }
                    writes.insert(record.id.clone(), record.clone());
                }
            }
            by_app.insert(name.clone(), records);
        }
        let merged = writes.len();
        let merged_at = began.elapsed();

        // Workloads no record refers to: left over from deleted apps or lost
        // records (a start in flight may not have landed its record yet).
        let in_flight: HashSet<&String> = known.starting.values().flatten().collect();
        for (node_id, instances) in &observation.reported {
            for orphan in instances
                .iter()
                .filter(|i| !known.records.contains_key(&i.id) && !in_flight.contains(&i.id))
            {
                tracing::info!(instance = %orphan.id, node = %node_id, "stopping orphaned instance");
                if let Some(address) = observation.node_addresses.get(node_id) {
                    self.stop_on_node(address, &orphan.id).await;
                }
            }
        }

        let mut to_route: HashSet<String> = HashSet::new();
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
            let in_flight = known.starting.contains_key(name);
            for action in plan::plan(&view, &views) {
                if in_flight && !matches!(action, Action::Route(_)) {
                    continue;
                }
                let record = |id: &str| instances.iter().find(|r| r.id == id).cloned();
                match action {
                    Action::Route(id) => {
                        if let Some(mut r) = record(&id) {
                            r.routable = true;
                            r.updated_ms = now;
                            to_route.insert(id.clone());
                            writes.insert(id, r);
                        }
                    }
                    Action::Drain(id) => {
                        if let Some(mut r) = record(&id) {
                            if !r.stopping || r.routable {
                                // Written now, with what the merge changed:
                                // the drain is journaled once it is recorded.
                                writes.remove(&id);
                                r.stopping = true;
                                r.routable = false;
                                r.updated_ms = now;
                                if !known.update(&self.instances, &r).await? {
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
                        writes.remove(&id);
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
                            if let Err(e) = self.forget(&r, &observation, known).await {
                                tracing::warn!(instance = %r.id, "failed to forget instance; retrying next pass: {e}");
                            }
                        }
                    }
                    Action::Start(count) => {
                        if known
                            .short
                            .get(name)
                            .is_some_and(|at| now - at < UNSETTLED_EVERY.as_millis() as i64)
                        {
                            continue;
                        }
                        if let Some(app) = app {
                            starts.push((app.clone(), count));
                        }
                    }
                }
            }
        }

        // What the nodes reported and what goes into rotation: written
        // together.
        let mut routed: BTreeSet<String> = BTreeSet::new();
        let writes: Vec<InstanceRecord> = writes.into_values().collect();
        let written = known.update_all(&self.instances, &writes).await?;
        for (record, written) in writes.iter().zip(written) {
            if written && to_route.contains(&record.id) {
                progress
                    .entry(record.app.clone())
                    .or_default()
                    .became_healthy = true;
                routed.insert(record.app.clone());
            }
        }
        routed.extend(drains.iter().map(|r| r.app.clone()));
        routed.extend(rerouted);
        let planned_at = began.elapsed();
        let routed_apps = routed.len();

        // Out of rotation first, then stopped: the router drops drained
        // instances and waits for their requests before anything is killed.
        // It reads again only the routes of the apps named (all of them
        // when there are too many to name).
        // `Sync` reaches one router-config; a `routes.updated` per app tells
        // every other replica (and any that `Sync` did not reach) to read
        // those routes again.
        if !routed.is_empty() {
            let apps: Vec<String> = if routed.len() > capstan_types::id::MAX_NAMED_APPS {
                Vec::new()
            } else {
                routed.into_iter().collect()
            };
            match self.cluster.sync_routes(apps.clone()).await {
                Ok(()) => {
                    for record in &drains {
                        self.finish_drain(record, &observation, known).await;
                    }
                }
                Err(e) => tracing::warn!("router sync failed; stopping nothing this pass: {e}"),
            }
            let updated = |app: Option<&String>| {
                let event = Event::new(new_id("ev"), now, EventKind::RoutesUpdated);
                match app {
                    Some(app) => event.app(app),
                    None => event,
                }
            };
            if apps.is_empty() {
                self.emit(updated(None)).await;
            }
            for app in &apps {
                self.emit(updated(Some(app))).await;
            }
        }

        tracing::debug!(
            full,
            apps = names.len(),
            nodes = observation.reported.len(),
            merged,
            routed = to_route.len(),
            routed_apps,
            fence_us = fenced.as_micros() as u64,
            observe_us = (observed_at - fenced).as_micros() as u64,
            merge_us = (merged_at - observed_at).as_micros() as u64,
            plan_us = (planned_at - merged_at).as_micros() as u64,
            sync_us = (began.elapsed() - planned_at).as_micros() as u64,
            "reconcile pass"
        );

        // Starts go on after the pass: a slow node holds up no other app.
        // What an app's start saw is taken in by the pass that plans the
        // app whole (none was in flight when it planned), even when that
        // pass starts it again.
        let partial: HashSet<String> = names
            .iter()
            .filter(|name| known.starting.contains_key(*name))
            .cloned()
            .collect();
        for (app, count) in starts {
            self.start_in_flight(app, count, now, known);
        }

        if full {
            known.unsettled.clear();
            known.short.retain(|app, _| apps.contains_key(app));
        }
        for name in &names {
            let seen = progress.remove(name).unwrap_or_default();
            if partial.contains(name) {
                let carried = known.carried.entry(name.clone()).or_default();
                carried.failures = carried.failures.saturating_add(seen.failures);
                carried.became_healthy |= seen.became_healthy;
                known.unsettled.insert(name.clone(), Instant::now());
                continue;
            }
            let seen = match known.carried.remove(name) {
                Some(carried) => Progress {
                    failures: carried.failures.saturating_add(seen.failures),
                    became_healthy: carried.became_healthy || seen.became_healthy,
                    placement_error: seen.placement_error.or(carried.placement_error),
                },
                None => seen,
            };
            let instances: Vec<InstanceView> = known
                .of_app(name)
                .map(|r| instance_view(r, &observation.draining_nodes))
                .collect();
            let app = apps.get(name);
            let moved = match app {
                Some((version, app)) => {
                    self.advance(name, *version, app, &instances, &seen, now)
                        .await
                }
                None => false,
            };
            if !moved
                && !known.starting.contains_key(name)
                && settled(app.map(|(_, a)| a), &instances)
            {
                known.unsettled.remove(name);
            } else {
                known.unsettled.insert(name.clone(), Instant::now());
            }
        }
        Ok(())
    }

    /// The records of the apps in `names` that exist: one read each, or one
    /// list of the table when there are many.
    async fn read_apps(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<HashMap<String, (u64, AppRecord)>, Error> {
        if names.len() > GET_APPS_MAX {
            return Ok(self
                .apps
                .list("")
                .await
                .map_err(Error::internal)?
                .into_iter()
                .filter(|(k, _, _)| names.contains(k))
                .map(|(k, v, r)| (k, (v, r)))
                .collect());
        }
        let mut apps = HashMap::new();
        for name in names {
            if let Some(found) = self.apps.get(name).await.map_err(Error::internal)? {
                apps.insert(name.clone(), found);
            }
        }
        Ok(apps)
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
        known: &mut Known,
    ) -> Result<(), Error> {
        if observation.reachable(&record.node_id)
            && let Some(address) = observation.node_addresses.get(&record.node_id)
        {
            self.stop_on_node(address, &record.id).await;
        }
        self.cluster.release(vec![record.id.clone()]).await?;
        known.delete(&self.instances, &record.id).await
    }

    async fn finish_drain(
        &self,
        record: &InstanceRecord,
        observation: &Observation,
        known: &mut Known,
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
        if let Err(e) = known.delete(&self.instances, &record.id).await {
            tracing::warn!(instance = %record.id, "failed to delete instance record: {e}");
        }
    }

    /// Places and starts `count` instances of `app` in a task of its own
    /// (up to [`START_CONCURRENCY`] apps at once). Each record it writes
    /// lands in `known` in the next pass, and the app is marked when the
    /// start is over, so that pass plans it whole.
    fn start_in_flight(&self, app: AppRecord, count: u32, now: i64, known: &mut Known) {
        let name = app.spec.name.to_string();
        let ids: Vec<String> = (0..count).map(|_| new_id(&name)).collect();
        known
            .starting
            .insert(name.clone(), ids.iter().cloned().collect());
        let this = self.clone();
        self.starting.spawn(async move {
            // The semaphore is never closed.
            let _slot = this.start_slots.acquire().await;
            let explanation = this.start(&app, ids, now).await;
            this.landed
                .lock()
                .expect("landed lock poisoned")
                .push(Landed::Done {
                    app: name.clone(),
                    explanation,
                    at: now,
                });
            this.changes.app(&name);
        });
    }

    /// Places and starts instances `ids`; returns why placement fell
    /// short. While the app's rollout is in progress, in a span of the
    /// trace of the request that started it.
    async fn start(&self, app: &AppRecord, ids: Vec<String>, now: i64) -> String {
        use tracing::Instrument;
        let count = ids.len() as u32;
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
        self.start_traced(app, ids, now).instrument(span).await
    }

    async fn start_traced(&self, app: &AppRecord, ids: Vec<String>, now: i64) -> String {
        let count = ids.len() as u32;
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
            let written = self.start_one(app, placement, now).await;
            self.landed
                .lock()
                .expect("landed lock poisoned")
                .push(Landed::Record(written));
            // The instance may have turned healthy before its record landed
            // (the pass its node's event woke had nothing to merge it
            // into): the pass that takes the record in asks the node again.
            self.changes.node(&placement.node_id);
        });
        join_all(starts).await;
        placed.explanation
    }

    /// Records, starts and records again one placed instance.
    async fn start_one(
        &self,
        app: &AppRecord,
        placement: &capstan_proto::v1::Placement,
        now: i64,
    ) -> Written {
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
                return None;
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
        match self
            .instances
            .put(&record.id, &record, Expect::Version(version))
            .await
        {
            Ok(version) => Some((version, record)),
            Err(e) => {
                // The next pass observes the instance on its node instead.
                tracing::warn!("failed to update instance record: {e}");
                None
            }
        }
    }

    /// Advances one app's rollout and bookkeeping (compare-and-set: a lost
    /// race is retried on the next pass), then publishes what changed.
    /// Returns whether there was anything to advance.
    async fn advance(
        &self,
        name: &str,
        version: u64,
        app: &AppRecord,
        instances: &[InstanceView],
        progress: &Progress,
        now: i64,
    ) -> bool {
        match machine::advance(app, instances, progress, now) {
            Next::Unchanged => false,
            Next::Delete => {
                if self.apps.delete(name, version).await.is_ok() {
                    tracing::info!(app = name, "app deleted");
                }
                true
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
                true
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

/// The nodes that joined, left, or changed status, address or drain
/// between two reads of the node list.
fn node_changes(before: &[Node], after: &[Node]) -> HashSet<String> {
    let key = |n: &Node| (n.status, n.address.clone(), n.draining);
    let before: HashMap<&str, _> = before.iter().map(|n| (n.id.as_str(), key(n))).collect();
    let mut changed: HashSet<String> = after
        .iter()
        .filter(|n| before.get(n.id.as_str()) != Some(&key(n)))
        .map(|n| n.id.clone())
        .collect();
    let now: HashSet<&str> = after.iter().map(|n| n.id.as_str()).collect();
    changed.extend(
        before
            .keys()
            .filter(|id| !now.contains(*id))
            .map(|id| id.to_string()),
    );
    changed
}

/// Whether an app is where it was asked to be, with nothing for a pass to
/// do until something changes: all its replicas of the current template,
/// healthy and in rotation, no rollout running; or, gone, nothing left of it.
fn settled(app: Option<&AppRecord>, instances: &[InstanceView]) -> bool {
    let Some(app) = app else {
        return instances.is_empty();
    };
    !app.deleting
        && app.rollout.state != RolloutState::InProgress
        && instances.len() == app.spec.replicas as usize
        && instances.iter().all(|i| {
            i.spec_hash == app.spec_hash
                && i.state == InstanceState::Healthy
                && i.routable
                && !i.stopping
                && !i.migrating
        })
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
