use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use capstan_placement::Strategy;
use capstan_store::{MemoryStore, Versioned};
use proptest::prelude::{ProptestConfig, prop, prop_assert, prop_assert_eq, proptest};

use super::*;

/// A store that yields before every operation, so that concurrent plans
/// interleave, and counts the conflicts it reports.
struct Racing {
    inner: MemoryStore,
    conflicts: AtomicUsize,
    /// Pages read of the node and allocation tables: what a snapshot costs.
    node_scans: AtomicUsize,
}

impl Racing {
    fn new() -> Arc<Racing> {
        Arc::new(Racing {
            inner: MemoryStore::new(),
            conflicts: AtomicUsize::new(0),
            node_scans: AtomicUsize::new(0),
        })
    }
}

impl Racing {
    fn count<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Conflict { .. }) = &result {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

#[async_trait]
impl Store for Racing {
    async fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError> {
        tokio::task::yield_now().await;
        self.inner.get(table, key).await
    }
    async fn put(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        tokio::task::yield_now().await;
        let result = self.inner.put(table, key, value, expect).await;
        self.count(result)
    }
    async fn write(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<std::time::Duration>,
    ) -> Result<(), StoreError> {
        tokio::task::yield_now().await;
        self.inner.write(table, key, value, ttl).await
    }
    async fn delete(&self, table: &str, key: &str, version: u64) -> Result<(), StoreError> {
        tokio::task::yield_now().await;
        let result = self.inner.delete(table, key, version).await;
        self.count(result)
    }
    async fn remove(&self, table: &str, key: &str) -> Result<(), StoreError> {
        tokio::task::yield_now().await;
        self.inner.remove(table, key).await
    }
    async fn scan(
        &self,
        table: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<capstan_store::Page, StoreError> {
        tokio::task::yield_now().await;
        if table == "nodes" || table == "node_allocations" {
            self.node_scans.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.scan(table, prefix, after, limit).await
    }
    async fn fenced(
        &self,
        fence: &capstan_store::Fence,
        mutation: capstan_store::Mutation,
    ) -> Result<Option<u64>, StoreError> {
        tokio::task::yield_now().await;
        self.inner.fenced(fence, mutation).await
    }
}

fn record(id: &str, cpu_millis: u32, memory_mb: u32, zone: &str) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        address: "127.0.0.1:1".into(),
        capacity: Resources {
            cpu_millis,
            memory_mb,
        },
        labels: [("zone".to_string(), zone.to_string())].into(),
        last_heartbeat_ms: NOW,
        ttl_ms: 0,
        down_reported: false,
        draining: false,
    }
}

const NOW: i64 = 1_000_000;

fn input(app: &str, ids: &[&str], memory_mb: u32) -> PlaceInput {
    PlaceInput {
        app: app.into(),
        instance_ids: ids.iter().map(|s| s.to_string()).collect(),
        resources: Resources {
            cpu_millis: 100,
            memory_mb,
        },
        host_ports: Vec::new(),
        placement: PlacementSpec::default(),
    }
}

async fn add_nodes(placer: &Placer, nodes: &[NodeRecord]) {
    for n in nodes {
        placer.nodes.write(&n.id, n, None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_schedulers_never_overcommit_a_node() {
    let store = Racing::new();
    let nodes = [
        record("a", 100_000, 1000, "eu"),
        record("b", 100_000, 1000, "eu"),
        record("c", 100_000, 1000, "us"),
    ];
    // Two schedulers, one store: each places 40 single instances of 100 MB
    // into room for 30.
    let schedulers = [
        Placer::new(store.clone(), Strategy::Binpack),
        Placer::new(store.clone(), Strategy::Binpack),
    ];
    add_nodes(&schedulers[0], &nodes).await;
    let mut tasks = Vec::new();
    for (s, placer) in schedulers.iter().enumerate() {
        for i in 0..40 {
            let placer = placer.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("s{s}-{i}");
                placer
                    .place(&input("web", &[id.as_str()], 100), NOW)
                    .await
                    .unwrap()
                    .placed
                    .len()
            }));
        }
    }
    let mut placed = 0;
    for task in tasks {
        placed += task.await.unwrap();
    }
    let cluster = schedulers[0].cluster().await.unwrap();
    let mut stored = 0;
    for n in &nodes {
        let total = cluster.allocations_of(&n.id).total();
        assert!(
            total.memory_mb <= n.capacity.memory_mb,
            "{} over-committed: {total:?}",
            n.id
        );
        stored += cluster.allocations_of(&n.id).instances.len();
    }
    assert_eq!(placed, 30, "every bit of room is used, no more");
    assert_eq!(stored, 30);
    assert!(
        store.conflicts.load(Ordering::Relaxed) > 0,
        "the schedulers never raced: the test proves nothing"
    );
}

#[tokio::test]
async fn unmet_constraints_are_explained() {
    let store = Arc::new(MemoryStore::new());
    let placer = Placer::new(store, Strategy::Spread);
    add_nodes(
        &placer,
        &[record("a", 1000, 1000, "eu"), record("b", 1000, 100, "us")],
    )
    .await;
    let mut r = input("web", &["w1", "w2"], 500);
    r.placement.constraints = vec![capstan_placement::Constraint::parse("zone == us").unwrap()];
    let outcome = placer.place(&r, NOW).await.unwrap();
    assert!(outcome.placed.is_empty());
    assert_eq!(
        outcome.explanation,
        "placed 0 of 2 instances of web: of 2 nodes, 1 filtered by constraint zone == us; 1 exhausted memory"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Placing the same instance ids again returns the same nodes and
    /// writes nothing.
    #[test]
    fn replanning_a_satisfied_request_changes_nothing(
        sizes in prop::collection::vec((1u32..8, 0usize..3), 1..6),
        count in 1usize..12,
        strategy in prop::sample::select(Strategy::ALL.to_vec()),
        memory_mb in 50u32..400,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let placer = Placer::new(Arc::new(MemoryStore::new()), strategy);
            let nodes: Vec<NodeRecord> = sizes
                .iter()
                .enumerate()
                .map(|(i, (size, zone))| {
                    record(&format!("n{i}"), 4000, size * 256, ["eu", "us", "ap"][*zone])
                })
                .collect();
            add_nodes(&placer, &nodes).await;
            let ids: Vec<String> = (0..count).map(|i| format!("i{i}")).collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let request = input("web", &ids, memory_mb);
            let first = placer.place(&request, NOW).await.unwrap();
            let before = placer.allocations.list("").await.unwrap();
            // Only what was placed counts as satisfied.
            let placed: Vec<&str> = first.placed.iter().map(|p| p.instance_id.as_str()).collect();
            let again = placer.place(&input("web", &placed, memory_mb), NOW).await.unwrap();
            let after = placer.allocations.list("").await.unwrap();
            prop_assert_eq!(&first.placed, &again.placed);
            prop_assert_eq!(before, after);
            prop_assert!(again.explanation.is_empty());
            Ok(())
        })?;
    }
}

/// A request does not read every node: within the snapshot's age, a second
/// Place and a Release read no node table at all.
#[tokio::test]
async fn requests_plan_on_a_reused_snapshot_instead_of_reading_every_node() {
    let store = Racing::new();
    let placer = Placer::new(store.clone(), Strategy::Binpack);
    let nodes: Vec<NodeRecord> = (0..50)
        .map(|i| record(&format!("n{i:02}"), 10_000, 4096, "eu"))
        .collect();
    add_nodes(&placer, &nodes).await;
    let first = placer
        .place(&input("web", &["w1"], 100), NOW)
        .await
        .unwrap();
    assert_eq!(first.placed.len(), 1);
    let scans = store.node_scans.load(Ordering::Relaxed);
    assert!(scans > 0, "the first request reads the nodes");
    let second = placer
        .place(&input("web", &["w2"], 100), NOW)
        .await
        .unwrap();
    assert_eq!(second.placed.len(), 1);
    // Placing w1 again is answered from the snapshot; w1 and w2 are released
    // through their claims.
    let again = placer
        .place(&input("web", &["w1"], 100), NOW)
        .await
        .unwrap();
    assert_eq!(again.placed, first.placed);
    let released = placer.release(&["w1".into(), "w2".into()]).await.unwrap();
    assert_eq!(released.len(), 2);
    assert_eq!(
        store.node_scans.load(Ordering::Relaxed),
        scans,
        "no request after the first listed the nodes"
    );
    assert!(
        placer.placements.list("").await.unwrap().is_empty(),
        "claims go with releases"
    );
}

/// A replica whose snapshot predates a placement by another replica places
/// the same instance where the other did, not a second time.
#[tokio::test]
async fn a_stale_snapshot_never_places_an_instance_twice() {
    let store = Racing::new();
    let (a, b) = (
        Placer::new(store.clone(), Strategy::Spread),
        Placer::new(store.clone(), Strategy::Spread),
    );
    add_nodes(
        &a,
        &[
            record("x", 10_000, 4096, "eu"),
            record("y", 10_000, 4096, "eu"),
        ],
    )
    .await;
    // Both take a snapshot of empty nodes.
    a.place(&input("warm", &["warm-a"], 100), NOW)
        .await
        .unwrap();
    b.place(&input("warm", &["warm-b"], 100), NOW)
        .await
        .unwrap();
    let placed_by_a = a.place(&input("web", &["w1"], 100), NOW).await.unwrap();
    let placed_by_b = b.place(&input("web", &["w1"], 100), NOW).await.unwrap();
    assert_eq!(placed_by_b.placed, placed_by_a.placed);
    let copies: usize = a
        .allocations
        .values("")
        .await
        .unwrap()
        .iter()
        .filter(|n| n.instances.contains_key("w1"))
        .count();
    assert_eq!(copies, 1, "w1 holds capacity on one node only");
}

/// A claim whose node row never listed the instance: while young it means a
/// placement under way (nothing is placed twice); once old, a crash left it,
/// and the instance is placed.
#[tokio::test]
async fn claims_left_by_a_crash_expire_and_young_ones_are_waited_for() {
    let store = Racing::new();
    let placer = Placer::new(store.clone(), Strategy::Binpack);
    add_nodes(
        &placer,
        &[
            record("x", 10_000, 4096, "eu"),
            record("y", 10_000, 4096, "eu"),
        ],
    )
    .await;
    let claim = |at_ms| Claim {
        node: "y".into(),
        at_ms,
    };
    placer
        .placements
        .put("w1", &claim(NOW), Expect::Absent)
        .await
        .unwrap();
    let waiting = placer
        .place(&input("web", &["w1"], 100), NOW)
        .await
        .unwrap();
    assert!(waiting.placed.is_empty(), "{:?}", waiting.placed);
    let later = NOW + CLAIM_GRACE.as_millis() as i64;
    let mut alive = [
        record("x", 10_000, 4096, "eu"),
        record("y", 10_000, 4096, "eu"),
    ];
    for node in &mut alive {
        node.last_heartbeat_ms = later;
    }
    add_nodes(&placer, &alive).await;
    let placed = placer
        .place(&input("web", &["w1"], 100), later)
        .await
        .unwrap();
    assert_eq!(placed.placed.len(), 1);
    let (_, new_claim) = placer.placements.get("w1").await.unwrap().unwrap();
    assert_eq!(
        new_claim.node, placed.placed[0].node_id,
        "the new claim names where it went"
    );
    // At start, the index drops old claims no row lists and claims rows
    // that have none.
    placer.placements.remove("w1").await.unwrap();
    placer
        .placements
        .put("ghost", &claim(NOW), Expect::Absent)
        .await
        .unwrap();
    assert_eq!(placer.index_placements(later).await.unwrap(), 1);
    assert!(placer.placements.get("ghost").await.unwrap().is_none());
    assert!(placer.placements.get("w1").await.unwrap().is_some());
}
