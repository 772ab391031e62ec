//! Placement with optimistic concurrency, Nomad's way: compute a plan on a
//! snapshot without holding a lock, then commit it node by node, each
//! commit verified against that node's latest allocations and written with
//! compare-and-set. A conflicting node is re-read and re-verified; an
//! instance that no longer fits is left out and re-planned on a fresh
//! snapshot. Two schedulers sharing a store therefore never over-commit a
//! node, and neither needs a lock the other holds.
//!
//! The truth for capacity is one row per node (`node_allocations/<node>`)
//! listing every instance placed there: a placement is an insert into that
//! row, a release a removal from it.
//!
//! A request does not read every node: plans are made on a snapshot of the
//! nodes and their allocations that is reused for up to [`SNAPSHOT_MAX_AGE`]
//! (taken afresh after a conflict, and updated with this scheduler's own
//! commits), because every commit is verified against the node's latest row
//! anyway. What a stale snapshot cannot tell, whether an instance id was
//! placed a moment ago by another replica, the placement index answers:
//! `placements/<instance>` names the node, claimed with compare-and-set
//! before the node's row is written, and is believed only when that row
//! holds the instance (a claim older than [`CLAIM_GRACE`] without it was
//! left by a crash and is dropped).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use capstan_placement::{Eligibility, Engine, Mode, NodeSpec, Request, Snapshot, Spread, Strategy};
use capstan_store::{Expect, Store, StoreError, Table};
use capstan_types::spec::PlacementSpec;
use capstan_types::{Error, Resources};
use serde::{Deserialize, Serialize};

/// How long a node stays ready after a heartbeat in a cluster small enough
/// for 1 s heartbeats; larger ones get [`heartbeat_ttl`] of their interval.
pub const NODE_TTL: Duration = Duration::from_secs(5);
/// Heartbeats the scheduler asks for in all, a second: past this many
/// nodes each heartbeats less often (Nomad's `max_heartbeats_per_second`),
/// so that no cluster size turns heartbeats into most of the work.
pub const MAX_HEARTBEATS_PER_SECOND: u64 = 250;
/// The interval's bounds: a small cluster heartbeats every second, and no
/// node waits more than a minute.
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(60);

/// The interval each of `nodes` nodes heartbeats at.
pub fn heartbeat_interval(nodes: usize) -> Duration {
    let ms = (nodes as u64).saturating_mul(1000) / MAX_HEARTBEATS_PER_SECOND;
    Duration::from_millis(ms).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
}

/// How long a node heartbeating every `interval` stays ready: three
/// intervals, and never less than [`NODE_TTL`].
pub fn heartbeat_ttl(interval: Duration) -> Duration {
    NODE_TTL.max(interval * 3)
}
/// Plan-commit rounds before a request gives up on conflicts.
const ROUNDS: usize = 4;
/// Compare-and-set retries per node within a round.
const CAS_RETRIES: usize = 8;
/// How long a snapshot is reused for planning.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);
/// How long a placement claim may wait for its node's row to list it.
pub const CLAIM_GRACE: Duration = Duration::from_secs(10);
const PLACEMENTS: &str = "placements";

/// `placements/<instance>`: the node an instance was (being) placed on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claim {
    pub node: String,
    pub at_ms: i64,
}

/// Where an instance id stands, as far as placing it again goes.
enum Standing {
    Placed(String),
    /// Claimed by a placement whose node row is not written yet.
    InProgress,
    Free,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub address: String,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
    pub last_heartbeat_ms: i64,
    /// How long after `last_heartbeat_ms` the node is ready; 0 (records of
    /// earlier versions): [`NODE_TTL`].
    #[serde(default)]
    pub ttl_ms: u64,
    /// Set once `node.down` was published for the current outage.
    #[serde(default)]
    pub down_reported: bool,
    /// Ineligible for new instances; the orchestrator moves its instances.
    #[serde(default)]
    pub draining: bool,
}

impl NodeRecord {
    pub fn is_ready(&self, now: i64) -> bool {
        let ttl = match self.ttl_ms {
            0 => NODE_TTL.as_millis() as u64,
            ttl => ttl,
        };
        now - self.last_heartbeat_ms <= i64::try_from(ttl).unwrap_or(i64::MAX)
    }

    fn eligibility(&self, now: i64) -> Eligibility {
        if !self.is_ready(now) {
            Eligibility::Down
        } else if self.draining {
            Eligibility::Draining
        } else {
            Eligibility::Eligible
        }
    }

    /// What the engine sees: the labels plus `node.id`.
    fn spec(&self, now: i64) -> NodeSpec {
        let mut attributes = self.labels.clone();
        attributes.insert(
            capstan_placement::constraint::NODE_ID.into(),
            self.id.clone(),
        );
        NodeSpec {
            id: self.id.clone(),
            capacity: engine_resources(self.capacity),
            attributes,
            eligibility: self.eligibility(now),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub app: String,
    pub resources: Resources,
    #[serde(default)]
    pub ports: Vec<u16>,
    /// When it was committed (0 in rows older than the field): orphan
    /// collection leaves young allocations alone, whose instance record may
    /// not be written yet.
    #[serde(default)]
    pub placed_ms: i64,
}

/// Every instance placed on one node, keyed by instance id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAllocations {
    pub instances: BTreeMap<String, Allocation>,
}

impl NodeAllocations {
    pub fn total(&self) -> Resources {
        let mut total = Resources {
            cpu_millis: 0,
            memory_mb: 0,
        };
        for a in self.instances.values() {
            total.cpu_millis += a.resources.cpu_millis;
            total.memory_mb += a.resources.memory_mb;
        }
        total
    }
}

fn engine_resources(r: Resources) -> capstan_placement::Resources {
    capstan_placement::Resources {
        cpu_millis: r.cpu_millis.into(),
        memory_mb: r.memory_mb.into(),
    }
}

/// A request as the scheduler's API receives it.
#[derive(Debug, Clone)]
pub struct PlaceInput {
    pub app: String,
    pub instance_ids: Vec<String>,
    pub resources: Resources,
    pub host_ports: Vec<u16>,
    pub placement: PlacementSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub instance_id: String,
    pub node_id: String,
    /// The node agent's address as of the snapshot.
    pub node_address: String,
}

#[derive(Debug, Clone, Default)]
pub struct PlaceOutcome {
    /// Every requested instance that has a node, including ones placed by
    /// an earlier call with the same id.
    pub placed: Vec<Placed>,
    /// Why the rest did not fit; empty when all did.
    pub explanation: String,
}

/// Builds the engine's request, naming the field of a bad constraint.
pub fn compile(input: &PlaceInput, default: Strategy, count: u32) -> Result<Request, Error> {
    let placement = &input.placement;
    Ok(Request {
        app: input.app.clone(),
        count,
        resources: engine_resources(input.resources),
        ports: input.host_ports.clone(),
        constraints: placement.constraints.clone(),
        distinct_hosts: placement.distinct_hosts,
        strategy: placement.strategy_or(default),
        spread: placement.spread_by.as_ref().map(|attribute| Spread {
            attribute: attribute.clone(),
            targets: placement
                .spread_targets
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        }),
        anti_affinity: placement.anti_affinity,
    })
}

fn store_error(e: StoreError) -> Error {
    Error::internal(e)
}

#[derive(Clone)]
pub struct Placer {
    pub nodes: Table<NodeRecord>,
    pub allocations: Table<NodeAllocations>,
    placements: Table<Claim>,
    state: Table<String>,
    default_strategy: Strategy,
    /// The last snapshot and when it was read.
    snapshot: Arc<std::sync::Mutex<Option<Cached>>>,
}

/// A snapshot and when it was read.
type Cached = (tokio::time::Instant, Arc<Cluster>);

/// The latest rows: nodes and their allocations with versions.
/// Cheap to clone (the rows are shared): a commit puts its node's new row
/// into a copy without copying any other row.
#[derive(Clone)]
pub struct Cluster {
    pub nodes: Arc<Vec<NodeRecord>>,
    pub allocations: HashMap<String, (u64, Arc<NodeAllocations>)>,
}

impl Cluster {
    pub fn allocations_of(&self, node: &str) -> NodeAllocations {
        self.allocations
            .get(node)
            .map(|(_, a)| NodeAllocations::clone(a))
            .unwrap_or_default()
    }

    /// Where each of `ids` the snapshot holds is placed: one look at every
    /// allocation, whatever the number of ids.
    fn placed_of(&self, ids: &[String]) -> HashMap<String, String> {
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut placed = HashMap::new();
        for (node, (_, allocations)) in &self.allocations {
            for id in allocations.instances.keys() {
                if wanted.contains(id.as_str()) {
                    placed.insert(id.clone(), node.clone());
                }
            }
        }
        placed
    }

    /// The engine's view: eligibility from heartbeats and drains, and every
    /// allocation, including those on nodes that went away.
    pub fn snapshot(&self, now: i64) -> Snapshot {
        let mut snapshot = Snapshot::new(self.nodes.iter().map(|n| n.spec(now)).collect());
        for (node, (_, allocations)) in &self.allocations {
            if let Some(index) = snapshot.index_of(node) {
                for a in allocations.instances.values() {
                    snapshot.add(index, &a.app, engine_resources(a.resources), &a.ports);
                }
            }
        }
        snapshot
    }
}

const ROUND_ROBIN_CURSOR: &str = "round-robin-cursor";

impl Placer {
    pub fn new(store: Arc<dyn Store>, default_strategy: Strategy) -> Placer {
        Placer {
            nodes: Table::new(store.clone(), "nodes"),
            allocations: Table::new(store.clone(), "node_allocations"),
            placements: Table::new(store.clone(), PLACEMENTS),
            state: Table::new(store, "scheduler_state"),
            default_strategy,
            snapshot: Arc::default(),
        }
    }

    /// A snapshot for planning: the cached one while it is young, unless
    /// `fresh`.
    async fn planning_snapshot(&self, fresh: bool) -> Result<Arc<Cluster>, Error> {
        if !fresh
            && let Some((at, cluster)) = self.snapshot.lock().expect("snapshot lock").as_ref()
            && at.elapsed() < SNAPSHOT_MAX_AGE
        {
            return Ok(cluster.clone());
        }
        let cluster = Arc::new(self.cluster().await?);
        *self.snapshot.lock().expect("snapshot lock") =
            Some((tokio::time::Instant::now(), cluster.clone()));
        Ok(cluster)
    }

    /// Puts the node rows a placement round just committed into the cached
    /// snapshot: one copy of the snapshot per round, not one per node.
    fn remember(&self, rows: Vec<(String, u64, NodeAllocations)>) {
        if rows.is_empty() {
            return;
        }
        if let Some((_, cluster)) = self.snapshot.lock().expect("snapshot lock").as_mut() {
            let mut updated = Cluster::clone(cluster);
            for (node, version, allocations) in rows {
                updated
                    .allocations
                    .insert(node, (version, Arc::new(allocations)));
            }
            *cluster = Arc::new(updated);
        }
    }

    /// Forgets the cached snapshot (after a release).
    fn forget(&self) {
        *self.snapshot.lock().expect("snapshot lock") = None;
    }

    /// Whether `id` is placed, from the snapshot, else from its claim and
    /// the claimed node's latest row.
    async fn standing(
        &self,
        id: &str,
        placed: &HashMap<String, String>,
        now: i64,
    ) -> Result<Standing, Error> {
        if let Some(node) = placed.get(id) {
            return Ok(Standing::Placed(node.clone()));
        }
        let Some((version, claim)) = self.placements.get(id).await.map_err(store_error)? else {
            return Ok(Standing::Free);
        };
        let listed = self
            .allocations
            .get(&claim.node)
            .await
            .map_err(store_error)?
            .is_some_and(|(_, a)| a.instances.contains_key(id));
        if listed {
            return Ok(Standing::Placed(claim.node));
        }
        if now - claim.at_ms < CLAIM_GRACE.as_millis() as i64 {
            return Ok(Standing::InProgress);
        }
        // Left by a placement that died between its claim and its commit.
        match self.placements.delete(id, version).await {
            Ok(()) | Err(StoreError::Conflict { .. }) => Ok(Standing::Free),
            Err(e) => Err(store_error(e)),
        }
    }

    /// Claims every instance the node rows list but no claim names (rows
    /// from before the index), and drops claims older than [`CLAIM_GRACE`]
    /// that no row lists (left by crashes). Run at start; idempotent.
    pub async fn index_placements(&self, now: i64) -> Result<usize, Error> {
        let rows = self.allocations.list("").await.map_err(store_error)?;
        for (id, version, claim) in self.placements.list("").await.map_err(store_error)? {
            let listed = rows
                .iter()
                .any(|(node, _, a)| *node == claim.node && a.instances.contains_key(&id));
            if !listed && now - claim.at_ms >= CLAIM_GRACE.as_millis() as i64 {
                match self.placements.delete(&id, version).await {
                    Ok(()) | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(store_error(e)),
                }
            }
        }
        let mut indexed = 0;
        for (node, _, allocations) in rows {
            for id in allocations.instances.keys() {
                let claim = Claim {
                    node: node.clone(),
                    at_ms: now,
                };
                match self.placements.put(id, &claim, Expect::Absent).await {
                    Ok(_) => indexed += 1,
                    Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(store_error(e)),
                }
            }
        }
        Ok(indexed)
    }

    pub async fn cluster(&self) -> Result<Cluster, Error> {
        let nodes = self.nodes.values("").await.map_err(store_error)?;
        let allocations = self
            .allocations
            .list("")
            .await
            .map_err(store_error)?
            .into_iter()
            .map(|(k, v, a)| (k, (v, Arc::new(a))))
            .collect();
        Ok(Cluster {
            nodes: Arc::new(nodes),
            allocations,
        })
    }

    /// Places every instance id that has no node yet. Idempotent: an id
    /// placed before keeps its node, and a request whose ids are all placed
    /// changes nothing.
    pub async fn place(&self, input: &PlaceInput, now: i64) -> Result<PlaceOutcome, Error> {
        // Fails on a bad request before anything is read.
        let mut request = compile(input, self.default_strategy, 0)?;
        let mut outcome = PlaceOutcome::default();
        for round in 0..ROUNDS {
            let cluster = self.planning_snapshot(round > 0).await?;
            let addresses: HashMap<&str, &str> = cluster
                .nodes
                .iter()
                .map(|n| (n.id.as_str(), n.address.as_str()))
                .collect();
            let address = |node: &str| addresses.get(node).copied().unwrap_or_default().to_string();
            let placed = cluster.placed_of(&input.instance_ids);
            let done: HashSet<String> = outcome
                .placed
                .iter()
                .map(|p| p.instance_id.clone())
                .collect();
            let mut todo = Vec::new();
            let mut in_progress = false;
            for id in &input.instance_ids {
                if done.contains(id) {
                    continue;
                }
                match self.standing(id, &placed, now).await? {
                    Standing::Placed(node) => outcome.placed.push(Placed {
                        instance_id: id.clone(),
                        node_address: address(&node),
                        node_id: node,
                    }),
                    Standing::InProgress => in_progress = true,
                    Standing::Free => todo.push(id.clone()),
                }
            }
            if todo.is_empty() {
                if !in_progress {
                    outcome.explanation.clear();
                    break;
                }
                continue;
            }
            request.count = todo.len() as u32;
            let mut snapshot = cluster.snapshot(now);
            let cursor = self
                .state
                .get(ROUND_ROBIN_CURSOR)
                .await
                .map_err(store_error)?
                .map(|(_, c)| c);
            let mut engine = Engine::new(seed(&todo), Mode::Fast).with_cursor(cursor);
            let plan = engine.place(&mut snapshot, &request);
            if request.strategy == Strategy::RoundRobin
                && let Some(cursor) = engine.cursor()
            {
                // Best effort: a lost cursor only restarts the rotation.
                let _ = self
                    .state
                    .write(ROUND_ROBIN_CURSOR, &cursor.to_string(), None)
                    .await;
            }
            let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (id, &index) in todo.iter().zip(&plan.nodes) {
                by_node
                    .entry(snapshot.node_id(index).to_string())
                    .or_default()
                    .push(id.clone());
            }
            let mut conflicted = false;
            let mut rows = Vec::new();
            for (node, ids) in by_node {
                let committed = self.commit(&node, &ids, input, &request, now).await;
                let committed = match committed {
                    Ok((committed, row)) => {
                        rows.extend(row);
                        committed
                    }
                    Err(e) => {
                        self.remember(rows);
                        return Err(e);
                    }
                };
                conflicted |= committed.len() < ids.len();
                outcome
                    .placed
                    .extend(committed.into_iter().map(|instance_id| Placed {
                        instance_id,
                        node_address: address(&node),
                        node_id: node.clone(),
                    }));
            }
            self.remember(rows);
            outcome.explanation = plan.explanation.map(|e| e.to_string()).unwrap_or_default();
            // A reused snapshot may miss a node that joined or freed up since:
            // before saying something does not fit, look again.
            let short_on_a_reused_snapshot = round == 0 && !outcome.explanation.is_empty();
            if !conflicted && !in_progress && !short_on_a_reused_snapshot {
                break;
            }
            tracing::debug!(app = %input.app, round, "plan conflicted with a concurrent one; re-planning");
        }
        Ok(outcome)
    }

    /// Commits `ids` to `node` after verifying each against the node's
    /// latest allocations; returns the ids that were committed and the
    /// node's row as written, if it was.
    async fn commit(
        &self,
        node: &str,
        ids: &[String],
        input: &PlaceInput,
        request: &Request,
        now: i64,
    ) -> Result<(Vec<String>, Option<(String, u64, NodeAllocations)>), Error> {
        let mut claimed: Vec<String> = Vec::new();
        for _ in 0..CAS_RETRIES {
            let Some((_, record)) = self.nodes.get(node).await.map_err(store_error)? else {
                return Ok((Vec::new(), None));
            };
            let latest = self.allocations.get(node).await.map_err(store_error)?;
            let (expect, mut allocations) = match latest {
                Some((version, a)) => (Expect::Version(version), a),
                None => (Expect::Absent, NodeAllocations::default()),
            };
            let mut single = Snapshot::new(vec![record.spec(now)]);
            for a in allocations.instances.values() {
                single.add(0, &a.app, engine_resources(a.resources), &a.ports);
            }
            let mut committed = Vec::new();
            for id in ids {
                if allocations.instances.contains_key(id) {
                    committed.push(id.clone());
                    continue;
                }
                if !claimed.contains(id) {
                    let claim = Claim {
                        node: node.to_string(),
                        at_ms: now,
                    };
                    match self.placements.put(id, &claim, Expect::Absent).await {
                        Ok(_) => claimed.push(id.clone()),
                        // Another placement of this id is under way or done:
                        // the next round finds out which.
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => return Err(store_error(e)),
                    }
                }
                if let Err(reason) = Engine::check(&mut single, 0, request) {
                    tracing::debug!(node, instance = %id, "placement no longer fits: {reason}");
                    continue;
                }
                single.add(0, &input.app, request.resources, &request.ports);
                allocations.instances.insert(
                    id.clone(),
                    Allocation {
                        app: input.app.clone(),
                        resources: input.resources,
                        ports: input.host_ports.clone(),
                        placed_ms: now,
                    },
                );
                committed.push(id.clone());
            }
            if committed.is_empty() {
                break;
            }
            match self.allocations.put(node, &allocations, expect).await {
                Ok(version) => {
                    self.unclaim(claimed.iter().filter(|id| !committed.contains(id)))
                        .await;
                    return Ok((committed, Some((node.to_string(), version, allocations))));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => {
                    self.unclaim(claimed.iter()).await;
                    return Err(store_error(e));
                }
            }
        }
        self.unclaim(claimed.iter()).await;
        Ok((Vec::new(), None))
    }

    /// Drops claims this placement took but did not commit (best effort:
    /// one left behind is dropped after [`CLAIM_GRACE`]).
    async fn unclaim(&self, ids: impl Iterator<Item = &String>) {
        for id in ids {
            if let Err(e) = self.placements.remove(id).await {
                tracing::debug!(instance = %id, "claim not dropped: {e}");
            }
        }
    }

    /// Frees the allocations of `ids`, wherever they are.
    /// Returns each freed (instance, node); releasing what holds nothing is
    /// a no-op.
    pub async fn release(&self, ids: &[String]) -> Result<Vec<(String, String)>, Error> {
        let mut released = Vec::new();
        // The nodes the claims name; every node when an id has no claim
        // (placed before the index, or never).
        let mut nodes = std::collections::BTreeSet::new();
        let mut unclaimed = false;
        for id in ids {
            match self.placements.get(id).await.map_err(store_error)? {
                Some((_, claim)) => {
                    nodes.insert(claim.node);
                }
                None => unclaimed = true,
            }
        }
        for _ in 0..CAS_RETRIES {
            let mut conflicted = false;
            let rows = if unclaimed {
                self.allocations.list("").await.map_err(store_error)?
            } else {
                let mut rows = Vec::new();
                for node in &nodes {
                    if let Some((version, allocations)) =
                        self.allocations.get(node).await.map_err(store_error)?
                    {
                        rows.push((node.clone(), version, allocations));
                    }
                }
                rows
            };
            for (node, version, mut allocations) in rows {
                let freed: Vec<String> = allocations
                    .instances
                    .keys()
                    .filter(|id| ids.contains(id))
                    .cloned()
                    .collect();
                if freed.is_empty() {
                    continue;
                }
                allocations.instances.retain(|id, _| !ids.contains(id));
                let written = if allocations.instances.is_empty() {
                    self.allocations.delete(&node, version).await
                } else {
                    self.allocations
                        .put(&node, &allocations, Expect::Version(version))
                        .await
                        .map(|_| ())
                };
                match written {
                    Ok(()) => released.extend(freed.into_iter().map(|id| (id, node.clone()))),
                    Err(StoreError::Conflict { .. }) => conflicted = true,
                    Err(e) => return Err(store_error(e)),
                }
            }
            if !conflicted {
                self.forget();
                self.unclaim(ids.iter()).await;
                return Ok(released);
            }
        }
        self.forget();
        Err(Error::Unavailable(
            "release kept conflicting with concurrent placements; retry".into(),
        ))
    }
}

/// A seed per request, stable for the same instance ids.
fn seed(ids: &[String]) -> u64 {
    let mut hasher = DefaultHasher::new();
    ids.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests;
