//! The placement engine: a pure function from a cluster [`Snapshot`] and a
//! [`Request`] to a [`Plan`], with a precise [`Explanation`] when it falls
//! short. It does no I/O and reads no clock; randomness comes from the
//! caller's seed, so the same input and seed give the same plan.
//!
//! How a placement is decided:
//! 1. **Filters**, cheapest first: eligibility (down, draining), constraints,
//!    `distinct_hosts`, host ports, memory, CPU. Constraints that do not
//!    look at `node.id` are evaluated once per node *class* (nodes with
//!    identical attributes) and cached for the request.
//! 2. **Candidates**: the fast path scores at most `max(2, ⌈log₂ N⌉)`
//!    feasible nodes, found through an index instead of a scan: binpack
//!    walks the free-memory index from the tightest fit up, least-loaded
//!    from the emptiest down, spread walks the nodes that hold the fewest
//!    instances of the app, round-robin continues after the last node it
//!    used. The exhaustive mode scores every feasible node; the benchmark
//!    runs both on the same input.
//! 3. **Score**: integers, ties broken by node order (node id), so plans
//!    are deterministic.

pub mod constraint;
mod engine;
mod snapshot;

pub use constraint::{Constraint, Version};
pub use engine::{Engine, Explanation, Mode, Plan, Reject};
pub use snapshot::{Eligibility, NodeSpec, Snapshot};

/// CPU and memory. u64 so that sums over a large cluster cannot overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Best fit: the node left fullest by the placement.
    Binpack,
    /// Even across nodes, or across the values of an attribute.
    Spread,
    /// The node left emptiest by the placement.
    LeastLoaded,
    /// The next feasible node after the last one this engine used.
    RoundRobin,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::Binpack,
        Strategy::Spread,
        Strategy::LeastLoaded,
        Strategy::RoundRobin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Binpack => "binpack",
            Strategy::Spread => "spread",
            Strategy::LeastLoaded => "least-loaded",
            Strategy::RoundRobin => "round-robin",
        }
    }

    pub fn parse(text: &str) -> Result<Strategy, String> {
        Strategy::ALL
            .into_iter()
            .find(|s| s.name() == text)
            .ok_or_else(|| {
                format!(
                    "unknown strategy `{text}`: use binpack, spread, least-loaded or round-robin"
                )
            })
    }
}

/// Spread across the values of an attribute (`zone`), optionally with
/// target percentages per value. Values without a target share what the
/// targets leave of 100% evenly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spread {
    pub attribute: String,
    pub targets: Vec<(String, u32)>,
}

/// What to place.
#[derive(Debug, Clone)]
pub struct Request {
    pub app: String,
    pub count: u32,
    pub resources: Resources,
    /// Host ports every instance binds: two instances never share a port on
    /// a node.
    pub ports: Vec<u16>,
    pub constraints: Vec<Constraint>,
    /// At most one instance of the app per node.
    pub distinct_hosts: bool,
    pub strategy: Strategy,
    /// For [`Strategy::Spread`]: the attribute to spread across; `None`
    /// spreads across nodes.
    pub spread: Option<Spread>,
    /// Penalise nodes that already run instances of the app.
    pub anti_affinity: bool,
}

impl Request {
    pub fn new(app: impl Into<String>, count: u32, resources: Resources) -> Request {
        Request {
            app: app.into(),
            count,
            resources,
            ports: Vec::new(),
            constraints: Vec::new(),
            distinct_hosts: false,
            strategy: Strategy::Spread,
            spread: None,
            anti_affinity: true,
        }
    }
}
