//! The reconciler against an in-memory cluster and a store that fail any
//! one step on purpose. After every kind of failure the platform converges
//! to what was asked, no allocation outlives its instance (capacity comes
//! back), and a pass over a converged platform changes nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use capstan_events::MemoryBus;
use capstan_proto::v1::{Allocation, Node, PlaceResponse, Placement};
use capstan_registry::EmbeddedRegistry;
use capstan_rollout::records::{Backoff, Rollout};
use capstan_secrets::{FileSecretStore, Secret};
use capstan_store::MemoryStore;
use capstan_testkit::faulty_store::{FaultyStore, StoreOp};
use capstan_types::AppSpec;
use capstan_types::spec::SpecFormat;

use super::*;
use crate::changes::Pending;

/// A step of the cluster that can be made to fail once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Step {
    Nodes,
    Instances,
    Place,
    Release,
    Allocations,
    Start,
    Stop,
    Sync,
    RecordInstance,
    DeleteInstance,
    WriteApp,
}

const CLUSTER_STEPS: [Step; 8] = [
    Step::Nodes,
    Step::Instances,
    Step::Place,
    Step::Release,
    Step::Allocations,
    Step::Start,
    Step::Stop,
    Step::Sync,
];
const STORE_STEPS: [Step; 3] = [Step::RecordInstance, Step::DeleteInstance, Step::WriteApp];

#[derive(Default)]
struct Faults(Mutex<HashSet<Step>>);

impl Faults {
    fn arm(&self, step: Step) {
        self.0.lock().unwrap().insert(step);
    }

    /// Fails the first call of an armed step.
    fn check(&self, step: Step) -> Result<(), Error> {
        if self.0.lock().unwrap().remove(&step) {
            Err(Error::Unavailable(format!("injected failure of {step:?}")))
        } else {
            Ok(())
        }
    }
}

#[derive(Default)]
struct World {
    nodes: Vec<Node>,
    /// Instances a node has room for.
    slots: usize,
    /// Instance → (node, placed at).
    allocations: BTreeMap<String, (String, i64)>,
    /// Instance → what its node runs.
    running: BTreeMap<String, Instance>,
    now: i64,
    /// The nodes asked for their instances, in order.
    asked: Vec<String>,
    /// `Place` calls.
    places: usize,
    /// Nodes where an instance started or stopped since the last hinted
    /// pass: what those agents' events would name.
    touched: HashSet<String>,
    /// The apps each `Sync` named, in order (none: every app).
    synced: Vec<Vec<String>>,
}

/// The scheduler, agents and router in memory. Instances become healthy
/// the first time their node is observed after they start.
struct FakeCluster {
    world: Mutex<World>,
    faults: Arc<Faults>,
    /// An app whose starts hang once the node runs the instance (a node
    /// that does not answer `StartInstance`), until the gate is opened.
    hold: Mutex<Option<(String, Arc<tokio::sync::Semaphore>)>>,
}

impl FakeCluster {
    fn new(nodes: usize, slots: usize, faults: Arc<Faults>) -> Self {
        let nodes = (1..=nodes)
            .map(|i| Node {
                id: format!("node-{i}"),
                address: format!("127.0.0.{i}:7000"),
                status: NodeStatus::Ready as i32,
                ..Default::default()
            })
            .collect();
        FakeCluster {
            world: Mutex::new(World {
                nodes,
                slots,
                ..Default::default()
            }),
            faults,
            hold: Mutex::default(),
        }
    }

    /// Makes starts of `app` hang until the returned gate gets permits.
    fn hold(&self, app: &str) -> Arc<tokio::sync::Semaphore> {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        *self.hold.lock().unwrap() = Some((app.to_string(), gate.clone()));
        gate
    }
}

#[async_trait]
impl Cluster for FakeCluster {
    async fn nodes(&self) -> Result<Vec<Node>, Error> {
        self.faults.check(Step::Nodes)?;
        Ok(self.world.lock().unwrap().nodes.clone())
    }

    async fn instances(&self, node: &Node) -> Option<Vec<Instance>> {
        self.faults.check(Step::Instances).ok()?;
        let mut world = self.world.lock().unwrap();
        world.asked.push(node.id.clone());
        let mut out = Vec::new();
        for instance in world.running.values_mut().filter(|i| i.node_id == node.id) {
            if instance.state == capstan_proto::v1::InstanceState::Starting as i32 {
                instance.state = capstan_proto::v1::InstanceState::Healthy as i32;
            }
            out.push(instance.clone());
        }
        Some(out)
    }

    async fn place(&self, request: PlaceRequest) -> Result<PlaceResponse, Error> {
        self.faults.check(Step::Place)?;
        let mut world = self.world.lock().unwrap();
        world.places += 1;
        let mut placements = Vec::new();
        let count = request.instance_ids.len();
        for id in request.instance_ids {
            let load = |node: &str, world: &World| {
                world
                    .allocations
                    .values()
                    .filter(|(n, _)| n == node)
                    .count()
            };
            let Some(node) = world
                .nodes
                .iter()
                .filter(|n| load(&n.id, &world) < world.slots)
                .min_by_key(|n| (load(&n.id, &world), n.id.clone()))
                .cloned()
            else {
                break;
            };
            let now = world.now;
            world.allocations.insert(id.clone(), (node.id.clone(), now));
            placements.push(Placement {
                instance_id: id,
                node_id: node.id,
                node_address: node.address,
            });
        }
        let explanation = if placements.len() < count {
            format!(
                "placed {} of {count} instances of {}: every node is full",
                placements.len(),
                request.app
            )
        } else {
            String::new()
        };
        Ok(PlaceResponse {
            placements,
            explanation,
        })
    }

    async fn release(&self, instance_ids: Vec<String>) -> Result<(), Error> {
        self.faults.check(Step::Release)?;
        let mut world = self.world.lock().unwrap();
        for id in instance_ids {
            world.allocations.remove(&id);
        }
        Ok(())
    }

    async fn allocations(&self) -> Result<Vec<Allocation>, Error> {
        self.faults.check(Step::Allocations)?;
        let world = self.world.lock().unwrap();
        Ok(world
            .allocations
            .iter()
            .map(|(id, (node, placed))| Allocation {
                instance_id: id.clone(),
                node_id: node.clone(),
                app: String::new(),
                placed_ms: *placed,
            })
            .collect())
    }

    async fn start(
        &self,
        node_address: &str,
        request: StartInstanceRequest,
    ) -> Result<Instance, Error> {
        self.faults.check(Step::Start)?;
        let app = request
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let instance = self.run_instance(node_address, request)?;
        let gate = self
            .hold
            .lock()
            .unwrap()
            .clone()
            .filter(|(held, _)| *held == app);
        if let Some((_, gate)) = gate {
            let _ = gate.acquire().await;
        }
        Ok(instance)
    }

    async fn stop(&self, _node_address: &str, instance_id: &str) -> Result<(), Error> {
        self.faults.check(Step::Stop)?;
        let mut world = self.world.lock().unwrap();
        if let Some(instance) = world.running.remove(instance_id) {
            world.touched.insert(instance.node_id);
        }
        Ok(())
    }

    async fn sync_routes(&self, apps: Vec<String>) -> Result<(), Error> {
        self.faults.check(Step::Sync)?;
        self.cluster_synced(apps);
        Ok(())
    }
}

impl FakeCluster {
    fn cluster_synced(&self, apps: Vec<String>) {
        self.world.lock().unwrap().synced.push(apps);
    }

    /// Fails one instance `node` runs, as its workload exiting would;
    /// the agent's `instance.failed` names that node, and only it.
    fn fail_one_on(&self, node: &str) -> String {
        let mut world = self.world.lock().unwrap();
        let instance = world
            .running
            .values_mut()
            .find(|i| i.node_id == node)
            .expect("an instance on the node");
        instance.state = capstan_proto::v1::InstanceState::Failed as i32;
        let id = instance.id.clone();
        world.touched = HashSet::from([node.to_string()]);
        id
    }

    fn take_synced(&self) -> Vec<Vec<String>> {
        std::mem::take(&mut self.world.lock().unwrap().synced)
    }

    /// What the node does on `StartInstance`.
    fn run_instance(
        &self,
        node_address: &str,
        request: StartInstanceRequest,
    ) -> Result<Instance, Error> {
        let mut world = self.world.lock().unwrap();
        let node = world
            .nodes
            .iter()
            .find(|n| n.address == node_address)
            .cloned()
            .ok_or_else(|| Error::Unavailable(format!("no node at {node_address}")))?;
        let port = 9000 + world.running.len();
        world.touched.insert(node.id.clone());
        let instance = world
            .running
            .entry(request.instance_id.clone())
            .or_insert_with(|| Instance {
                id: request.instance_id.clone(),
                app: request.spec.map(|s| s.name).unwrap_or_default(),
                node_id: node.id.clone(),
                spec_hash: request.spec_hash,
                state: capstan_proto::v1::InstanceState::Starting as i32,
                address: format!("{}:{port}", node_address.split(':').next().unwrap_or("")),
                ..Default::default()
            });
        Ok(instance.clone())
    }
}

struct Harness {
    reconciler: Reconciler,
    cluster: Arc<FakeCluster>,
    faults: Arc<Faults>,
    store: Arc<FaultyStore>,
    apps: Table<AppRecord>,
    instances: Table<InstanceRecord>,
    now: i64,
    _dir: tempfile::TempDir,
    _shutdown: CancellationToken,
}

impl Harness {
    async fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let faults = Arc::new(Faults::default());
        let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new())));
        let platform = Platform::new(
            Arc::new(EmbeddedRegistry::start(shutdown.child_token())),
            Arc::new(MemoryBus::new()),
            store.clone(),
            Arc::new(FileSecretStore::new(dir.path())),
            Arc::new(capstan_cache::MemoryCache::new()),
            Secret::new("unused"),
        );
        let cluster = Arc::new(FakeCluster::new(2, 4, faults.clone()));
        Harness {
            reconciler: Reconciler::with_cluster(platform.clone(), cluster.clone(), Changes::new()),
            apps: Table::new(platform.store.clone(), APPS),
            instances: Table::new(platform.store.clone(), INSTANCES),
            cluster,
            faults,
            store,
            now: 1_000_000,
            _dir: dir,
            _shutdown: shutdown,
        }
    }

    /// Writes the app `web` as `ApplyApp` would, with `replicas`.
    async fn apply(&self, replicas: u32) {
        self.apply_named("web", replicas).await;
    }

    /// Writes the app `name` as `ApplyApp` would, with `replicas`.
    async fn apply_named(&self, name: &str, replicas: u32) {
        let spec = AppSpec::parse(
            &format!("name = \"{name}\"\nreplicas = {replicas}\n[run]\ncommand = [\"serve\"]\n"),
            SpecFormat::Toml,
        )
        .unwrap();
        let existing = self.apps.get(name).await.unwrap();
        let record = match &existing {
            Some((_, app)) => AppRecord {
                spec: spec.clone(),
                ..app.clone()
            },
            None => AppRecord {
                spec_hash: spec.template_hash(),
                rollout: Rollout::start(spec.template_hash(), self.now),
                stable: None,
                spec,
                deleting: false,
                backoff: Backoff::default(),
                placement_error: String::new(),
                created_ms: self.now,
                updated_ms: self.now,
                autoscale_override: None,
                previous: Vec::new(),
            },
        };
        let expect = existing.map_or(Expect::Absent, |(v, _)| Expect::Version(v));
        self.apps.put(name, &record, expect).await.unwrap();
    }

    /// One reconcile pass, the starts it began, and one orphan collection,
    /// five seconds later.
    async fn pass(&mut self) {
        self.now += 5_000;
        self.cluster.world.lock().unwrap().now = self.now;
        let _ = self.reconciler.reconcile(self.now).await;
        self.reconciler.starts_landed().await;
        let _ = self.reconciler.collect_orphans(self.now).await;
    }

    /// One pass over what changed, five seconds later (the reconciler's
    /// clock too): the hints are what events would name, the nodes where
    /// instances started or stopped since the last pass and `apps`.
    async fn hinted_pass(&mut self, apps: &[&str]) {
        self.now += 5_000;
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        let nodes = {
            let mut world = self.cluster.world.lock().unwrap();
            world.now = self.now;
            std::mem::take(&mut world.touched)
        };
        let hints = Pending {
            apps: apps.iter().map(|a| a.to_string()).collect(),
            nodes,
            ..Pending::default()
        };
        let _ = self.reconciler.reconcile_changes(self.now, hints).await;
        self.reconciler.starts_landed().await;
        let _ = self.reconciler.collect_orphans(self.now).await;
    }

    /// Hinted passes until converged (at most `max`); the first names `apps`.
    async fn converge_hinted(
        &mut self,
        replicas: usize,
        apps: &[&str],
        max: usize,
    ) -> Result<usize, String> {
        let mut why = String::new();
        for n in 1..=max {
            self.hinted_pass(if n == 1 { apps } else { &[] }).await;
            match self.converged(replicas).await {
                Ok(()) => return Ok(n),
                Err(reason) => why = reason,
            }
        }
        Err(why)
    }

    fn take_asked(&self) -> Vec<String> {
        std::mem::take(&mut self.cluster.world.lock().unwrap().asked)
    }

    /// What a user and an operator would check: the rollout completed,
    /// `replicas` instances serve,
    /// the nodes run exactly the recorded instances, and the scheduler holds
    /// allocations for exactly those (no capacity leaked).
    async fn converged(&self, replicas: usize) -> Result<(), String> {
        let rollout = self
            .apps
            .get("web")
            .await
            .unwrap()
            .map(|(_, a)| a.rollout.state);
        if rollout != Some(capstan_rollout::records::RolloutState::Completed) {
            return Err(format!("the rollout is {rollout:?}, not completed"));
        }
        let records = self.instances.values("").await.unwrap();
        let serving = records
            .iter()
            .filter(|r| r.state == InstanceState::Healthy && r.routable && !r.stopping)
            .count();
        let ids: HashSet<String> = records.iter().map(|r| r.id.clone()).collect();
        let world = self.cluster.world.lock().unwrap();
        let running: HashSet<String> = world.running.keys().cloned().collect();
        let allocated: HashSet<String> = world.allocations.keys().cloned().collect();
        if records.len() != replicas || serving != replicas {
            return Err(format!(
                "{serving} of {} records serve, want {replicas}",
                records.len()
            ));
        }
        if running != ids {
            return Err(format!("nodes run {running:?}, records say {ids:?}"));
        }
        if allocated != ids {
            return Err(format!(
                "allocations {allocated:?} differ from records {ids:?}"
            ));
        }
        Ok(())
    }

    /// Makes the next `step` fail, in the cluster or in the store.
    fn arm(&self, step: Step) {
        match step {
            Step::RecordInstance => self.store.arm(StoreOp::Insert, INSTANCES),
            Step::DeleteInstance => self.store.arm(StoreOp::Delete, INSTANCES),
            Step::WriteApp => self.store.arm(StoreOp::Update, APPS),
            cluster => self.faults.arm(cluster),
        }
    }

    /// Passes until converged (at most `max`), or the last reason it is not.
    async fn converge(&mut self, replicas: usize, max: usize) -> Result<usize, String> {
        let mut why = String::new();
        for n in 1..=max {
            self.pass().await;
            match self.converged(replicas).await {
                Ok(()) => return Ok(n),
                Err(reason) => why = reason,
            }
        }
        Err(why)
    }

    /// Everything a pass could change: records with versions, and the world.
    async fn snapshot(&self) -> String {
        let apps = self.apps.list("").await.unwrap();
        let instances = self.instances.list("").await.unwrap();
        let world = self.cluster.world.lock().unwrap();
        format!(
            "{:?}\n{:?}\n{:?}\n{:?}",
            apps.iter().map(|(k, v, _)| (k, v)).collect::<Vec<_>>(),
            instances.iter().map(|(k, v, _)| (k, v)).collect::<Vec<_>>(),
            world.running.keys().collect::<Vec<_>>(),
            world.allocations.keys().collect::<Vec<_>>()
        )
    }
}

/// Allocations are collected once older than the grace: 60 s of 5 s passes.
const PASSES: usize = 40;

#[tokio::test]
async fn every_failure_on_the_way_up_and_down_heals_without_leaking_capacity() {
    for step in CLUSTER_STEPS.into_iter().chain(STORE_STEPS) {
        let mut h = Harness::new().await;
        h.apply(3).await;
        h.arm(step);
        let up = h.converge(3, PASSES).await;
        assert!(
            up.is_ok(),
            "scaling up with {step:?} failing: {}",
            up.unwrap_err()
        );

        // Converged: another pass changes nothing.
        let before = h.snapshot().await;
        h.pass().await;
        assert_eq!(
            h.snapshot().await,
            before,
            "a pass after {step:?} was not idempotent"
        );

        h.apply(1).await;
        h.arm(step);
        let down = h.converge(1, PASSES).await;
        assert!(
            down.is_ok(),
            "scaling down with {step:?} failing: {}",
            down.unwrap_err()
        );
    }
}

#[tokio::test]
async fn an_allocation_whose_record_and_release_both_failed_is_collected() {
    let mut h = Harness::new().await;
    h.apply(2).await;
    // The record write after Place fails, and so does the immediate release:
    // only orphan collection can free that capacity.
    h.arm(Step::RecordInstance);
    h.arm(Step::Release);
    h.pass().await;
    let leaked = {
        let world = h.cluster.world.lock().unwrap();
        world.allocations.len()
    };
    let records = h.instances.values("").await.unwrap().len();
    assert!(leaked > records, "the fault did not leak an allocation");
    let healed = h.converge(2, PASSES).await;
    assert!(healed.is_ok(), "{}", healed.unwrap_err());
}

#[tokio::test]
async fn a_young_allocation_without_a_record_is_not_collected() {
    let h = Harness::new().await;
    // An allocation placed just now, whose record is still being written.
    h.cluster
        .world
        .lock()
        .unwrap()
        .allocations
        .insert("web-young".into(), ("node-1".into(), h.now));
    assert_eq!(
        h.reconciler.collect_orphans(h.now + 1_000).await.unwrap(),
        0
    );
    assert_eq!(
        h.reconciler
            .collect_orphans(h.now + ORPHAN_GRACE_MS + 1)
            .await
            .unwrap(),
        1
    );
}

#[test]
fn only_the_nodes_own_ip_is_routed() {
    assert!(on_node("127.0.0.1:4000", "127.0.0.1:9000"));
    assert!(on_node("10.0.0.5:4000", "10.0.0.5:1"));
    assert!(!on_node("169.254.169.254:80", "10.0.0.5:9000"));
    assert!(!on_node("10.0.0.6:4000", "10.0.0.5:9000"));
    assert!(!on_node("metadata.internal:80", "10.0.0.5:9000"));
    assert!(!on_node("10.0.0.5:4000", ""));
}

#[tokio::test(start_paused = true)]
async fn passes_over_what_changed_converge_and_a_converged_one_asks_no_node() {
    let mut h = Harness::new().await;
    h.apply(3).await;
    let up = h.converge_hinted(3, &["web"], 10).await;
    assert!(up.is_ok(), "scaling up on hints: {}", up.unwrap_err());

    h.take_asked();
    let before = h.snapshot().await;
    h.hinted_pass(&[]).await;
    assert_eq!(
        h.take_asked(),
        Vec::<String>::new(),
        "nothing changed, yet nodes were asked"
    );
    assert_eq!(
        h.snapshot().await,
        before,
        "a pass over no change changed something"
    );

    h.apply(5).await;
    let up = h.converge_hinted(5, &["web"], 10).await;
    assert!(up.is_ok(), "scaling to 5 on hints: {}", up.unwrap_err());
    h.apply(1).await;
    let down = h.converge_hinted(1, &["web"], 10).await;
    assert!(down.is_ok(), "scaling down on hints: {}", down.unwrap_err());
}

#[tokio::test(start_paused = true)]
async fn an_instance_failing_on_one_node_is_replaced_by_asking_that_node_only() {
    let mut h = Harness::new().await;
    h.apply(3).await;
    h.converge(3, PASSES).await.unwrap();
    let failed = h.cluster.fail_one_on("node-1");
    h.take_asked();
    h.hinted_pass(&["web"]).await;
    assert_eq!(h.take_asked(), vec!["node-1".to_string()]);
    let healed = h.converge_hinted(3, &[], 10).await;
    assert!(
        healed.is_ok(),
        "replacing {failed}: {}",
        healed.unwrap_err()
    );
    assert!(h.instances.get(&failed).await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn every_failure_heals_on_hints_alone() {
    for step in CLUSTER_STEPS.into_iter().chain(STORE_STEPS) {
        let mut h = Harness::new().await;
        h.apply(3).await;
        h.arm(step);
        let up = h.converge_hinted(3, &["web"], PASSES).await;
        assert!(
            up.is_ok(),
            "scaling up on hints with {step:?} failing: {}",
            up.unwrap_err()
        );
        h.apply(1).await;
        h.arm(step);
        let down = h.converge_hinted(1, &["web"], PASSES).await;
        assert!(
            down.is_ok(),
            "scaling down on hints with {step:?} failing: {}",
            down.unwrap_err()
        );
    }
}

/// A node that takes its time over `StartInstance` (a slow pull, a hung
/// agent) holds up no other app: the pass that started it returns, later
/// passes replace another app's failed instance and route it, the held
/// instance its node already runs is neither stopped as an orphan nor
/// started twice, and once the node answers, that app converges too.
#[tokio::test(start_paused = true)]
async fn a_start_that_hangs_holds_up_no_other_app() {
    let mut h = Harness::new().await;
    h.apply(1).await;
    h.converge(1, PASSES).await.unwrap();
    let gate = h.cluster.hold("slow");
    h.apply_named("slow", 1).await;

    // A pass over what the events of both apps and their nodes name (the
    // held instance's record is written, but its start has not landed).
    async fn pass_alone(h: &mut Harness) {
        h.now += 5_000;
        let nodes = {
            let mut world = h.cluster.world.lock().unwrap();
            world.now = h.now;
            std::mem::take(&mut world.touched)
        };
        let hints = Pending {
            apps: HashSet::from(["web".to_string(), "slow".to_string()]),
            nodes,
            ..Pending::default()
        };
        let pass = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            h.reconciler.reconcile_changes(h.now, hints),
        )
        .await;
        assert!(pass.is_ok(), "a pass waited for a start that hangs");
        // The starts in flight go as far as they can (the clock is paused:
        // it moves on once every task waits).
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    pass_alone(&mut h).await;

    let failed = {
        let mut world = h.cluster.world.lock().unwrap();
        let instance = world
            .running
            .values_mut()
            .find(|i| i.app == "web")
            .expect("web runs");
        instance.state = capstan_proto::v1::InstanceState::Failed as i32;
        let (id, node) = (instance.id.clone(), instance.node_id.clone());
        world.touched.insert(node);
        id
    };
    let serving = |records: &[InstanceRecord], app: &str| {
        records
            .iter()
            .filter(|r| {
                r.app == app && r.state == InstanceState::Healthy && r.routable && !r.stopping
            })
            .map(|r| r.id.clone())
            .collect::<Vec<_>>()
    };
    let mut replaced = false;
    for _ in 0..6 {
        pass_alone(&mut h).await;
        let records = h.instances.values("").await.unwrap();
        let web = serving(&records, "web");
        if web.len() == 1 && web[0] != failed {
            replaced = true;
            break;
        }
    }
    assert!(
        replaced,
        "web's failed instance was not replaced while slow's start hung"
    );
    let slow_running = |h: &Harness| {
        h.cluster
            .world
            .lock()
            .unwrap()
            .running
            .values()
            .filter(|i| i.app == "slow")
            .count()
    };
    assert_eq!(
        slow_running(&h),
        1,
        "the held instance was stopped as an orphan or started twice"
    );

    gate.add_permits(1_000);
    h.reconciler.starts_landed().await;
    let mut converged = false;
    for _ in 0..6 {
        h.pass().await;
        let records = h.instances.values("").await.unwrap();
        if serving(&records, "slow").len() == 1 && serving(&records, "web").len() == 1 {
            converged = true;
            break;
        }
    }
    assert!(converged, "slow did not converge once its node answered");
    assert_eq!(slow_running(&h), 1);
}

/// More instances than the nodes have room for: the app records why
/// placement fell short (what `app status` and a failing deploy show),
/// although every pass that plans it starts the missing ones again.
#[tokio::test(start_paused = true)]
async fn a_placement_that_falls_short_is_explained_on_the_app() {
    let mut h = Harness::new().await;
    // Two nodes with four slots each.
    h.apply(10).await;
    for _ in 0..PASSES {
        h.pass().await;
    }
    let (_, app) = h.apps.get("web").await.unwrap().expect("web exists");
    assert_eq!(
        app.placement_error, "placed 0 of 2 instances of web: every node is full",
        "{app:#?}"
    );
    let records = h.instances.values("").await.unwrap();
    assert_eq!(records.len(), 8, "the room there is, is used: {records:#?}");
}

/// A start whose placement fell short marks its app when it lands, and the
/// pass that follows plans the app whole; it does not place again at once
/// (nothing freed room in between), only once a tick has gone by: a
/// cluster that is full is asked about once a second, not in a loop.
#[tokio::test(start_paused = true)]
async fn a_placement_that_fell_short_is_tried_again_after_a_tick_not_at_once() {
    let mut h = Harness::new().await;
    h.apply(10).await;
    let places = |h: &Harness| h.cluster.world.lock().unwrap().places;
    async fn pass_now(h: &Harness) {
        let hints = Pending {
            apps: HashSet::from(["web".to_string()]),
            ..Pending::default()
        };
        let _ = h.reconciler.reconcile_changes(h.now, hints).await;
        h.reconciler.starts_landed().await;
    }
    pass_now(&h).await;
    assert_eq!(places(&h), 1);
    // The landing's hint: the app is planned, not placed again.
    pass_now(&h).await;
    pass_now(&h).await;
    assert_eq!(places(&h), 1, "placed again with no time gone by");
    h.now += 1_000;
    pass_now(&h).await;
    assert_eq!(places(&h), 2, "a tick later it is tried again");
}

/// An instance a node reports healthy is routed by the same write that
/// records it healthy: one store write per record per pass, not one to
/// merge what the node said and another to route it (each a commit on the
/// way from healthy to routed).
#[tokio::test(start_paused = true)]
async fn an_instance_seen_healthy_is_recorded_and_routed_in_one_write() {
    let mut h = Harness::new().await;
    h.apply(3).await;
    h.hinted_pass(&["web"]).await;
    let started: HashMap<String, usize> = h
        .instances
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _, record)| {
            assert_eq!(
                record.state,
                InstanceState::Starting,
                "{id} before its node is asked"
            );
            let puts = h.store.puts(INSTANCES, &id);
            (id, puts)
        })
        .collect();
    assert_eq!(started.len(), 3, "the first pass starts three: {started:?}");

    // The nodes the starts touched are what the agents' events name.
    h.hinted_pass(&[]).await;
    let seen = h.instances.list("").await.unwrap();
    assert_eq!(seen.len(), 3);
    for (id, _, record) in seen {
        assert!(
            record.state == InstanceState::Healthy && record.routable,
            "{id} is {:?}, routable: {}",
            record.state,
            record.routable
        );
        let puts = h.store.puts(INSTANCES, &id) - started[&id];
        assert_eq!(
            puts, 1,
            "{id} was written {puts} times in the pass that saw it healthy"
        );
    }
}

/// A node asked because one app's instance changed there reports every app
/// it runs. Only the apps whose records its report changes are planned: a
/// settled app that shares the node is not even read.
#[tokio::test(start_paused = true)]
async fn a_node_asked_for_one_app_plans_no_other_app_it_runs() {
    let mut h = Harness::new().await;
    h.apply_named("web", 2).await;
    h.apply_named("api", 2).await;
    for _ in 0..6 {
        h.pass().await;
    }
    let records = h.instances.values("").await.unwrap();
    assert!(
        records.len() == 4
            && records
                .iter()
                .all(|r| r.state == InstanceState::Healthy && r.routable),
        "both apps serve: {records:?}"
    );
    let failed = {
        let mut world = h.cluster.world.lock().unwrap();
        let on_node_1: HashSet<String> = world
            .running
            .values()
            .filter(|i| i.node_id == "node-1")
            .map(|i| i.app.clone())
            .collect();
        assert_eq!(
            on_node_1,
            HashSet::from(["web".to_string(), "api".to_string()]),
            "node-1 runs both apps"
        );
        let instance = world
            .running
            .values_mut()
            .find(|i| i.node_id == "node-1" && i.app == "web")
            .expect("web on node-1");
        instance.state = capstan_proto::v1::InstanceState::Failed as i32;
        let id = instance.id.clone();
        world.touched = HashSet::from(["node-1".to_string()]);
        id
    };
    let (web_reads, api_reads) = (h.store.gets(APPS, "web"), h.store.gets(APPS, "api"));
    h.hinted_pass(&[]).await;
    assert!(
        h.store.gets(APPS, "web") > web_reads,
        "web, whose instance {failed} failed, was not planned"
    );
    assert_eq!(
        h.store.gets(APPS, "api"),
        api_reads,
        "api, settled on the same node, was read"
    );
    assert!(
        h.instances.get(&failed).await.unwrap().is_none(),
        "web's failed instance {failed} is forgotten, to be replaced"
    );
}

/// An instance that ends by itself while routed (a crash, its node lost)
/// leaves the routing table in the pass that sees it: the router is told,
/// as it is for a drain, rather than finding out on its next periodic
/// rebuild while the proxy still sends requests to the dead address.
#[tokio::test(start_paused = true)]
async fn an_instance_that_fails_while_routed_is_synced_out_of_the_table_in_that_pass() {
    let mut h = Harness::new().await;
    h.apply(2).await;
    h.converge(2, PASSES).await.unwrap();
    let failed = h.cluster.fail_one_on("node-1");
    h.cluster.take_synced();
    h.hinted_pass(&[]).await;
    assert!(
        h.instances.get(&failed).await.unwrap().is_none(),
        "the failed instance {failed} is forgotten"
    );
    assert_eq!(
        h.cluster.take_synced().first(),
        Some(&vec!["web".to_string()]),
        "the router was not told that {failed} left web's routes"
    );
}

/// An instance can turn healthy before its start lands: the agent's event
/// names its node while the record is still being written, so the pass it
/// wakes has no record to merge the report into. The landing itself must
/// then have its node asked again: the pass the reconciler's own hints
/// wake routes it, not the next full sweep seconds later.
#[tokio::test(start_paused = true)]
async fn an_instance_healthy_before_its_start_landed_is_routed_by_the_landings_pass() {
    let mut h = Harness::new().await;
    let gate = h.cluster.hold("web");
    h.apply(1).await;
    let hints = Pending {
        apps: HashSet::from(["web".to_string()]),
        ..Pending::default()
    };
    h.reconciler.reconcile_changes(h.now, hints).await.unwrap();
    // The start runs up to the held answer: the node runs the instance.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;

    // The agent's events name the node; it reports the instance healthy,
    // but its record has not landed.
    let nodes = std::mem::take(&mut h.cluster.world.lock().unwrap().touched);
    assert_eq!(nodes.len(), 1, "the start touched one node: {nodes:?}");
    h.now += 1_000;
    let hints = Pending {
        nodes,
        ..Pending::default()
    };
    h.reconciler.reconcile_changes(h.now, hints).await.unwrap();
    let records = h.instances.values("").await.unwrap();
    assert!(
        records.iter().all(|r| !r.routable),
        "routed before its start landed: {records:?}"
    );

    gate.add_permits(1);
    h.reconciler.starts_landed().await;
    // Only what the reconciler marked itself: no agent event comes again.
    h.now += 1_000;
    let hints = h.reconciler.changes.take();
    h.reconciler.reconcile_changes(h.now, hints).await.unwrap();
    let records = h.instances.values("").await.unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        records[0].state == InstanceState::Healthy && records[0].routable,
        "the landing's pass left {} {:?}, routable: {}",
        records[0].id,
        records[0].state,
        records[0].routable
    );
}
