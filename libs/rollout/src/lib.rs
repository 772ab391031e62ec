//! The orchestrator's pure core: what to do with each app, decided from
//! desired and observed state alone.
//!
//! - [`plan`]: the per-app planner (start, route, drain, forget), with the
//!   rolling-update and availability rules.
//! - [`machine`]: the rollout state machine: progress, completion,
//!   rollback, failure, and restart backoff, as a function from an app
//!   record and what a reconcile pass saw to the next record and its events.
//! - [`records`]: the stored shapes both work on.
//! - [`autoscale`]: the autoscaler's decision (HPA's ratio rule with
//!   tolerance, cooldowns, scale-down stabilisation, no flapping), with the
//!   reason a person reads.
//!
//! Nothing here does I/O, reads a clock or depends on an async runtime
//! (`tests/purity.rs` holds the manifest to that); callers pass `now`.

pub mod autoscale;
pub mod machine;
pub mod plan;
pub mod records;
