//! Capstan's domain types: the app spec and its validation, instance states,
//! platform events and the one error type every service returns.
//!
//! This crate is pure. It never does I/O and depends on no async runtime,
//! RPC framework or database client; `Cargo.toml` is the proof.

pub mod duration;
pub mod error;
pub mod event;
pub mod id;
pub mod instance;
pub mod spec;

pub use error::{Error, FieldError, Result};
pub use event::{Event, EventKind};
pub use id::{AppName, InstanceId, KeyName, NodeId, ProjectName};
pub use instance::InstanceState;
pub use spec::{
    AppSpec, HealthCheck, HealthSpec, PortSpec, Resources, RouteSpec, Run, RunSpec, UpdateSpec,
};

/// Milliseconds since the Unix epoch; the one clock format stored and sent.
pub type UnixMillis = i64;
