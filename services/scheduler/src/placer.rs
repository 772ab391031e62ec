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

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use capstan_placement::{Eligibility, Engine, Mode, NodeSpec, Request, Snapshot, Spread, Strategy};
use capstan_store::{Expect, Store, StoreError, Table};
use capstan_types::spec::PlacementSpec;
use capstan_types::{Error, Resources};
use serde::{Deserialize, Serialize};

pub const NODE_TTL: Duration = Duration::from_secs(5);
/// Plan-commit rounds before a request gives up on conflicts.
const ROUNDS: usize = 4;
/// Compare-and-set retries per node within a round.
const CAS_RETRIES: usize = 8;

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
    /// Ineligible for new instances; the orchestrator moves its instances.
    #[serde(default)]
    pub draining: bool,
}

impl NodeRecord {
    pub fn is_ready(&self, now: i64) -> bool {
        now - self.last_heartbeat_ms <= NODE_TTL.as_millis() as i64
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
    state: Table<String>,
    default_strategy: Strategy,
}

/// The latest rows: nodes and their allocations with versions.
pub struct Cluster {
    pub nodes: Vec<NodeRecord>,
    pub allocations: HashMap<String, (u64, NodeAllocations)>,
}

impl Cluster {
    pub fn allocations_of(&self, node: &str) -> NodeAllocations {
        self.allocations
            .get(node)
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
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
            state: Table::new(store, "scheduler_state"),
            default_strategy,
        }
    }

    pub async fn cluster(&self) -> Result<Cluster, Error> {
        let nodes = self.nodes.values("").await.map_err(store_error)?;
        let allocations = self
            .allocations
            .list("")
            .await
            .map_err(store_error)?
            .into_iter()
            .map(|(k, v, a)| (k, (v, a)))
            .collect();
        Ok(Cluster { nodes, allocations })
    }

    /// Places every instance id that has no node yet. Idempotent: an id
    /// placed before keeps its node, and a request whose ids are all placed
    /// changes nothing.
    pub async fn place(&self, input: &PlaceInput, now: i64) -> Result<PlaceOutcome, Error> {
        // Fails on a bad request before anything is read.
        let mut request = compile(input, self.default_strategy, 0)?;
        let mut outcome = PlaceOutcome::default();
        for round in 0..ROUNDS {
            let cluster = self.cluster().await?;
            let address = |node: &str| {
                cluster
                    .nodes
                    .iter()
                    .find(|n| n.id == node)
                    .map(|n| n.address.clone())
                    .unwrap_or_default()
            };
            let mut todo = Vec::new();
            for id in &input.instance_ids {
                let existing = cluster
                    .allocations
                    .iter()
                    .find(|(_, (_, a))| a.instances.contains_key(id));
                match existing {
                    Some((node, _)) => {
                        if !outcome.placed.iter().any(|p| &p.instance_id == id) {
                            outcome.placed.push(Placed {
                                instance_id: id.clone(),
                                node_id: node.clone(),
                                node_address: address(node),
                            });
                        }
                    }
                    None => todo.push(id.clone()),
                }
            }
            if todo.is_empty() {
                outcome.explanation.clear();
                break;
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
            for (node, ids) in by_node {
                let committed = self.commit(&node, &ids, input, &request, now).await?;
                conflicted |= committed.len() < ids.len();
                outcome
                    .placed
                    .extend(committed.into_iter().map(|instance_id| Placed {
                        instance_id,
                        node_address: address(&node),
                        node_id: node.clone(),
                    }));
            }
            outcome.explanation = plan.explanation.map(|e| e.to_string()).unwrap_or_default();
            if !conflicted {
                break;
            }
            tracing::debug!(app = %input.app, round, "plan conflicted with a concurrent one; re-planning");
        }
        Ok(outcome)
    }

    /// Commits `ids` to `node` after verifying each against the node's
    /// latest allocations; returns the ids that were committed.
    async fn commit(
        &self,
        node: &str,
        ids: &[String],
        input: &PlaceInput,
        request: &Request,
        now: i64,
    ) -> Result<Vec<String>, Error> {
        for _ in 0..CAS_RETRIES {
            let Some((_, record)) = self.nodes.get(node).await.map_err(store_error)? else {
                return Ok(Vec::new());
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
                return Ok(committed);
            }
            match self.allocations.put(node, &allocations, expect).await {
                Ok(_) => return Ok(committed),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(store_error(e)),
            }
        }
        Ok(Vec::new())
    }

    /// Frees the allocations of `ids`, wherever they are.
    /// Returns each freed (instance, node); releasing what holds nothing is
    /// a no-op.
    pub async fn release(&self, ids: &[String]) -> Result<Vec<(String, String)>, Error> {
        let mut released = Vec::new();
        for _ in 0..CAS_RETRIES {
            let mut conflicted = false;
            for (node, version, mut allocations) in
                self.allocations.list("").await.map_err(store_error)?
            {
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
                return Ok(released);
            }
        }
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
