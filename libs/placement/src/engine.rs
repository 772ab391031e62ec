//! Filters, candidates and scores; see the crate docs for the overview.

use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use crate::snapshot::{Eligibility, SIDE, Snapshot, bucket_of};
use crate::{Request, Strategy};

/// How many candidates the fast path scores: what Nomad scores.
pub fn sample_size(eligible: u32) -> usize {
    let log2 = u32::BITS - eligible.saturating_sub(1).leading_zeros();
    (log2 as usize).max(2)
}

/// Nodes the binpack and least-loaded walks examine before they settle for
/// fewer than `k` candidates.
const WALK_BUDGET_MIN: usize = 64;
/// One unit of fitness: a node left completely full.
const FULL: i64 = 1_000_000;
/// Score taken off per instance of the same app already on a node.
const ANTI_AFFINITY_PENALTY: i64 = FULL / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Score a logarithmic sample of feasible nodes found through indexes.
    Fast,
    /// Score every feasible node: the reference the fast path is held to.
    Exhaustive,
}

/// Why a node cannot take an instance; the first filter that fails wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reject {
    Down,
    Draining,
    /// Index into the request's constraints.
    Constraint(usize),
    DistinctHosts,
    Port(u16),
    Memory,
    Cpu,
}

/// The engine's state between requests: its random stream and the
/// round-robin cursor. Same seed, same snapshots, same requests: same plans.
#[derive(Debug, Clone)]
pub struct Engine {
    mode: Mode,
    rng: u64,
    cursor: Option<Box<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Node index per placed instance, in placement order.
    pub nodes: Vec<usize>,
    /// Set when fewer than `count` instances were placed.
    pub explanation: Option<Explanation>,
}

/// Why a request was not fully placed, counted per filter over all nodes
/// at the moment placement stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub app: String,
    pub wanted: u32,
    pub placed: u32,
    pub nodes: usize,
    /// (reason, nodes) in filter order.
    pub rejected: Vec<(String, u32)>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "placed {} of {} instances of {}: ",
            self.placed, self.wanted, self.app
        )?;
        if self.nodes == 0 {
            return f.write_str("no nodes are registered");
        }
        let plural = if self.nodes == 1 { "node" } else { "nodes" };
        write!(f, "of {} {plural}, ", self.nodes)?;
        let reasons: Vec<String> = self
            .rejected
            .iter()
            .map(|(reason, n)| format!("{n} {reason}"))
            .collect();
        if reasons.is_empty() {
            f.write_str("none was rejected")
        } else {
            f.write_str(&reasons.join("; "))
        }
    }
}

/// A request compiled against one snapshot.
struct Ctx<'r> {
    request: &'r Request,
    app: u32,
    /// Per class: 0 not yet evaluated, 1 feasible, 2 + i rejected by
    /// constraint i.
    class_state: Vec<u32>,
    /// Class-level constraints with their attribute's string id (None: no
    /// node has the attribute).
    class_constraints: Vec<(usize, Option<u32>)>,
    node_constraints: Vec<usize>,
    /// For attribute spread, computed once per request: each class's value
    /// of the attribute, and the values some feasible class has.
    spread_classes: Option<SpreadClasses>,
}

/// Per class, its value of the spread attribute (a string id; None when
/// unset); and the values at least one feasible class has.
type SpreadClasses = (Rc<[Option<u32>]>, Vec<Option<u32>>);

impl<'r> Ctx<'r> {
    fn new(snapshot: &mut Snapshot, request: &'r Request) -> Ctx<'r> {
        let mut ctx = Ctx {
            request,
            app: snapshot.app_id(&request.app),
            class_state: vec![0; snapshot.classes.len()],
            class_constraints: Vec::new(),
            node_constraints: Vec::new(),
            spread_classes: None,
        };
        for (i, c) in request.constraints.iter().enumerate() {
            if c.is_per_node() {
                ctx.node_constraints.push(i);
            } else {
                ctx.class_constraints
                    .push((i, snapshot.strings.get(&c.attribute)));
            }
        }
        ctx
    }

    fn class_ok(&mut self, snapshot: &Snapshot, class: u32) -> Result<(), Reject> {
        let state = &mut self.class_state[class as usize];
        if *state == 0 {
            *state = 1;
            let attributes = &snapshot.classes[class as usize].attributes;
            for &(i, key) in &self.class_constraints {
                let value = key.and_then(|key| {
                    attributes
                        .binary_search_by_key(&key, |&(k, _)| k)
                        .ok()
                        .map(|at| snapshot.strings.resolve(attributes[at].1))
                });
                if !self.request.constraints[i].holds(value) {
                    *state = 2 + i as u32;
                    break;
                }
            }
        }
        match *state {
            1 => Ok(()),
            rejected => Err(Reject::Constraint((rejected - 2) as usize)),
        }
    }

    fn check(&mut self, snapshot: &Snapshot, index: usize) -> Result<(), Reject> {
        let node = &snapshot.nodes[index];
        match node.eligibility {
            Eligibility::Down => return Err(Reject::Down),
            Eligibility::Draining => return Err(Reject::Draining),
            Eligibility::Eligible => {}
        }
        self.class_ok(snapshot, node.class)?;
        for &i in &self.node_constraints {
            if !self.request.constraints[i].holds(Some(&node.id)) {
                return Err(Reject::Constraint(i));
            }
        }
        if self.request.distinct_hosts && self.count_on(snapshot, index) > 0 {
            return Err(Reject::DistinctHosts);
        }
        for port in &self.request.ports {
            if node.ports.binary_search(port).is_ok() {
                return Err(Reject::Port(*port));
            }
        }
        let need = self.request.resources;
        if node.allocated.memory_mb + need.memory_mb > node.capacity.memory_mb {
            return Err(Reject::Memory);
        }
        if node.allocated.cpu_millis + need.cpu_millis > node.capacity.cpu_millis {
            return Err(Reject::Cpu);
        }
        Ok(())
    }

    fn count_on(&self, snapshot: &Snapshot, index: usize) -> u32 {
        snapshot.app_nodes[self.app as usize]
            .get(&(index as u32))
            .copied()
            .unwrap_or(0)
    }

    /// How full node `index` would be after the placement, 0..=FULL.
    fn fitness(&self, snapshot: &Snapshot, index: usize) -> i64 {
        let node = &snapshot.nodes[index];
        let need = self.request.resources;
        let fraction = |used: u64, cap: u64| -> i64 {
            ((used as u128 * FULL as u128) / cap.max(1) as u128).min(FULL as u128) as i64
        };
        (fraction(
            node.allocated.cpu_millis + need.cpu_millis,
            node.capacity.cpu_millis,
        ) + fraction(
            node.allocated.memory_mb + need.memory_mb,
            node.capacity.memory_mb,
        )) / 2
    }

    fn penalty(&self, snapshot: &Snapshot, index: usize) -> i64 {
        if self.request.anti_affinity {
            ANTI_AFFINITY_PENALTY * self.count_on(snapshot, index) as i64
        } else {
            0
        }
    }

    /// Higher is better. Spread's group deficit is scored by the caller.
    fn score(&self, snapshot: &Snapshot, index: usize) -> (i64, i64) {
        match self.request.strategy {
            Strategy::Binpack => (
                self.fitness(snapshot, index) - self.penalty(snapshot, index),
                0,
            ),
            Strategy::LeastLoaded | Strategy::RoundRobin => (
                FULL - self.fitness(snapshot, index) - self.penalty(snapshot, index),
                0,
            ),
            Strategy::Spread => (
                -(self.count_on(snapshot, index) as i64),
                FULL - self.fitness(snapshot, index),
            ),
        }
    }
}

/// Spread across an attribute: the groups and how far each is below its
/// target share, for the next placement.
struct Groups {
    /// Attribute value (string id; None = unset) per class.
    class_value: Rc<[Option<u32>]>,
    /// (deficit, value) for values with a class that passes the
    /// constraints, best first.
    order: Vec<(i64, Option<u32>)>,
}

impl Engine {
    pub fn new(seed: u64, mode: Mode) -> Engine {
        Engine {
            mode,
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
            cursor: None,
        }
    }

    /// Continues a round-robin rotation after node `cursor`.
    pub fn with_cursor(mut self, cursor: Option<String>) -> Engine {
        self.cursor = cursor.map(Into::into);
        self
    }

    /// The last node round-robin placed on: persist it to keep rotating.
    pub fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref()
    }

    fn next_random(&mut self) -> u64 {
        // SplitMix64.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Places `request.count` instances, recording each in `snapshot` as it
    /// goes (so later requests see them). Stops at the first instance that
    /// fits nowhere and explains why.
    pub fn place(&mut self, snapshot: &mut Snapshot, request: &Request) -> Plan {
        let mut ctx = Ctx::new(snapshot, request);
        let app = ctx.app;
        let mut nodes = Vec::with_capacity(request.count as usize);
        for _ in 0..request.count {
            match self.choose(snapshot, &mut ctx) {
                Some(index) => {
                    snapshot.add_by_id(index, app, request.resources, &request.ports);
                    if request.strategy == Strategy::RoundRobin {
                        self.cursor = Some(snapshot.nodes[index].id.clone());
                    }
                    nodes.push(index);
                }
                None => {
                    let explanation = explain(snapshot, &mut ctx, nodes.len() as u32);
                    return Plan {
                        nodes,
                        explanation: Some(explanation),
                    };
                }
            }
        }
        Plan {
            nodes,
            explanation: None,
        }
    }

    /// Why node `index` cannot take one more instance of `request` now:
    /// the check a committer runs against the latest state.
    pub fn check(snapshot: &mut Snapshot, index: usize, request: &Request) -> Result<(), String> {
        Ctx::new(snapshot, request)
            .check(snapshot, index)
            .map_err(|reject| reason(request, reject))
    }

    fn choose(&mut self, snapshot: &Snapshot, ctx: &mut Ctx) -> Option<usize> {
        let strategy = ctx.request.strategy;
        if strategy == Strategy::RoundRobin {
            return self.round_robin(snapshot, ctx);
        }
        let groups = match (&ctx.request.spread, strategy) {
            (Some(spread), Strategy::Spread) if spread.attribute != crate::constraint::NODE_ID => {
                Some(groups(snapshot, ctx))
            }
            _ => None,
        };
        match self.mode {
            Mode::Exhaustive => exhaustive(snapshot, ctx, groups.as_ref()),
            Mode::Fast => {
                let k = sample_size(snapshot.eligible);
                // Each source is complete: it comes back empty only when no
                // node in the cluster can take the instance.
                let candidates = match strategy {
                    Strategy::Binpack => walk(snapshot, ctx, k, true),
                    Strategy::LeastLoaded => walk(snapshot, ctx, k, false),
                    _ => match &groups {
                        Some(groups) => groups
                            .order
                            .iter()
                            .find_map(|&(_, value)| {
                                let found = self.level_scan(snapshot, ctx, k, |class| {
                                    groups.class_value[class as usize] == value
                                });
                                (!found.is_empty()).then_some(found)
                            })
                            .unwrap_or_default(),
                        None => self.level_scan(snapshot, ctx, k, |_| true),
                    },
                };
                best(snapshot, ctx, candidates.into_iter())
            }
        }
    }

    fn round_robin(&mut self, snapshot: &Snapshot, ctx: &mut Ctx) -> Option<usize> {
        let n = snapshot.len();
        let start = match &self.cursor {
            Some(id) => match snapshot.nodes.binary_search_by(|node| node.id.cmp(id)) {
                Ok(i) => i + 1,
                Err(i) => i,
            },
            None => 0,
        };
        (0..n)
            .map(|offset| (start + offset) % n)
            .find(|&index| ctx.check(snapshot, index).is_ok())
    }

    /// Up to `k` feasible nodes holding the fewest instances of the app, in
    /// the classes `allowed` admits. Exact: it only moves to nodes with more
    /// instances when no node with fewer is feasible.
    fn level_scan(
        &mut self,
        snapshot: &Snapshot,
        ctx: &mut Ctx,
        k: usize,
        allowed: impl Fn(u32) -> bool,
    ) -> Vec<usize> {
        let mut found = Vec::new();
        let classes = snapshot.classes.len();
        if classes == 0 {
            return found;
        }
        let counts = &snapshot.app_nodes[ctx.app as usize];
        let first = (self.next_random() % classes as u64) as usize;
        for c in (0..classes).map(|i| (first + i) % classes) {
            if !allowed(c as u32) || ctx.class_ok(snapshot, c as u32).is_err() {
                continue;
            }
            let members = &snapshot.classes[c].nodes;
            let offset = (self.next_random() % members.len() as u64) as usize;
            for i in 0..members.len() {
                let index = members[(offset + i) % members.len()];
                if counts.contains_key(&index) {
                    continue;
                }
                if ctx.check(snapshot, index as usize).is_ok() {
                    found.push(index as usize);
                    if found.len() == k {
                        return found;
                    }
                }
            }
        }
        if !found.is_empty() {
            return found;
        }
        let mut holders: Vec<(u32, u32)> = counts
            .iter()
            .filter(|&(&index, _)| allowed(snapshot.nodes[index as usize].class))
            .map(|(&index, &count)| (count, index))
            .collect();
        holders.sort_unstable();
        let mut level = None;
        for (count, index) in holders {
            if level.is_some_and(|l| l != count) {
                break;
            }
            if ctx.check(snapshot, index as usize).is_ok() {
                level = Some(count);
                found.push(index as usize);
                if found.len() == k {
                    break;
                }
            }
        }
        found
    }
}

/// Walks the free-resource grid by diagonals (free CPU bucket + free memory
/// bucket): up from the tightest fit for binpack, down from the emptiest for
/// least-loaded. Only cells at or above the request's own buckets can fit,
/// so full nodes are never looked at. Returns up to `k` feasible nodes; past
/// the budget it takes the first it finds; an empty result means no node in
/// the cluster fits.
fn walk(snapshot: &Snapshot, ctx: &mut Ctx, k: usize, tightest_first: bool) -> Vec<usize> {
    let need = ctx.request.resources;
    let (sc, sm) = (bucket_of(need.cpu_millis), bucket_of(need.memory_mb));
    let budget = WALK_BUDGET_MIN.max(16 * k);
    let mut examined = 0;
    let mut found = Vec::with_capacity(k);
    let diagonals = sc + sm..=2 * (SIDE - 1);
    let diagonals: Box<dyn Iterator<Item = usize>> = if tightest_first {
        Box::new(diagonals)
    } else {
        Box::new(diagonals.rev())
    };
    for d in diagonals {
        let first = sc.max(d.saturating_sub(SIDE - 1));
        let last = (SIDE - 1).min(d - sm);
        for c in first..=last {
            let m = d - c;
            if snapshot.rows[c] & (1 << m) == 0 {
                continue;
            }
            for &index in &snapshot.cells[c * SIDE + m] {
                examined += 1;
                if ctx.check(snapshot, index as usize).is_ok() {
                    found.push(index as usize);
                    if found.len() == k || examined >= budget {
                        return found;
                    }
                }
            }
        }
        if examined >= budget && !found.is_empty() {
            return found;
        }
    }
    found
}

/// The best of `candidates` by the strategy's score; ties go to the lower
/// node index (node id order).
fn best(snapshot: &Snapshot, ctx: &Ctx, candidates: impl Iterator<Item = usize>) -> Option<usize> {
    candidates
        .map(|index| (ctx.score(snapshot, index), std::cmp::Reverse(index)))
        .max()
        .map(|(_, std::cmp::Reverse(index))| index)
}

fn exhaustive(snapshot: &Snapshot, ctx: &mut Ctx, groups: Option<&Groups>) -> Option<usize> {
    // ((group deficit, strategy score), node index)
    type Scored = ((i64, (i64, i64)), usize);
    let mut best_node: Option<Scored> = None;
    for index in 0..snapshot.len() {
        if ctx.check(snapshot, index).is_err() {
            continue;
        }
        let deficit = groups.map_or(0, |g| {
            let value = g.class_value[snapshot.nodes[index].class as usize];
            g.order
                .iter()
                .find(|(_, v)| *v == value)
                .map_or(i64::MIN, |(d, _)| *d)
        });
        let key = (deficit, ctx.score(snapshot, index));
        if best_node.as_ref().is_none_or(|(b, _)| key > *b) {
            best_node = Some((key, index));
        }
    }
    best_node.map(|(_, index)| index)
}

fn groups(snapshot: &Snapshot, ctx: &mut Ctx) -> Groups {
    let spread = ctx
        .request
        .spread
        .as_ref()
        .expect("groups are only built for attribute spread");
    if ctx.spread_classes.is_none() {
        let key = snapshot.strings.get(&spread.attribute);
        let class_value: Rc<[Option<u32>]> = snapshot
            .classes
            .iter()
            .map(|class| {
                key.and_then(|key| {
                    class
                        .attributes
                        .binary_search_by_key(&key, |&(k, _)| k)
                        .ok()
                        .map(|at| class.attributes[at].1)
                })
            })
            .collect();
        // A value counts when one of its classes passes the constraints.
        let mut feasible: BTreeMap<Option<u32>, ()> = BTreeMap::new();
        for (class, value) in class_value.iter().enumerate() {
            if !feasible.contains_key(value) && ctx.class_ok(snapshot, class as u32).is_ok() {
                feasible.insert(*value, ());
            }
        }
        ctx.spread_classes = Some((class_value, feasible.into_keys().collect()));
    }
    let (class_value, values) = ctx.spread_classes.clone().expect("computed just above");
    let mut counts: BTreeMap<Option<u32>, i64> = values.iter().map(|&v| (v, 0)).collect();
    let mut total = 1;
    for (&index, &count) in &snapshot.app_nodes[ctx.app as usize] {
        let value = class_value[snapshot.nodes[index as usize].class as usize];
        if let Some(c) = counts.get_mut(&value) {
            *c += count as i64;
        }
        total += count as i64;
    }
    let value_name = |v: Option<u32>| v.map(|v| snapshot.strings.resolve(v));
    let targeted: i64 = spread
        .targets
        .iter()
        .filter(|(name, _)| counts.keys().any(|&v| value_name(v) == Some(name.as_str())))
        .map(|(_, pct)| *pct as i64)
        .sum();
    let untargeted = counts
        .keys()
        .filter(|&&v| {
            !spread
                .targets
                .iter()
                .any(|(n, _)| value_name(v) == Some(n.as_str()))
        })
        .count() as i64;
    let share = if untargeted > 0 {
        (100 - targeted).max(0) * 1000 / untargeted
    } else {
        0
    };
    let mut order: Vec<(i64, Option<u32>)> = counts
        .iter()
        .map(|(&value, &count)| {
            let pct_milli = spread
                .targets
                .iter()
                .find(|(n, _)| value_name(value) == Some(n.as_str()))
                .map_or(share, |(_, pct)| *pct as i64 * 1000);
            (pct_milli * total - 100_000 * count, value)
        })
        .collect();
    // Largest deficit first; ties by value name for determinism.
    order.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| value_name(a.1).cmp(&value_name(b.1)))
    });
    Groups { class_value, order }
}

fn reason(request: &Request, reject: Reject) -> String {
    match reject {
        Reject::Down => "down".to_string(),
        Reject::Draining => "draining".to_string(),
        Reject::Constraint(i) => format!("filtered by constraint {}", request.constraints[i]),
        Reject::DistinctHosts => "already run an instance (distinct_hosts)".to_string(),
        Reject::Port(port) => format!("have host port {port} in use"),
        Reject::Memory => "exhausted memory".to_string(),
        Reject::Cpu => "exhausted cpu".to_string(),
    }
}

fn explain(snapshot: &Snapshot, ctx: &mut Ctx, placed: u32) -> Explanation {
    let mut tally: BTreeMap<Reject, u32> = BTreeMap::new();
    for index in 0..snapshot.len() {
        if let Err(reject) = ctx.check(snapshot, index) {
            *tally.entry(reject).or_default() += 1;
        }
    }
    Explanation {
        app: ctx.request.app.clone(),
        wanted: ctx.request.count,
        placed,
        nodes: snapshot.len(),
        rejected: tally
            .into_iter()
            .map(|(reject, n)| (reason(ctx.request, reject), n))
            .collect(),
    }
}

#[cfg(test)]
mod tests;
