//! The container-runtime port: start, stop, observe and re-adopt workloads.
//!
//! - [`ProcessDriver`] runs a program directly (argv, never a shell), in its
//!   own process group, with a cleared environment.
//! - [`DockerDriver`] runs an image through the Docker Engine API, locked
//!   down: all capabilities dropped, no new privileges, read-only root,
//!   memory, CPU and PID limits, published on 127.0.0.1 only.
//!
//! Both survive a restart of the agent: [`Driver::list`] finds what a previous
//! run started, so the agent re-adopts instead of duplicating.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use capstan_types::InstanceId;
use serde::{Deserialize, Serialize};

pub mod cgroup;
pub mod contract;
mod docker;
pub mod logs;
mod process;

pub use docker::DockerDriver;
pub use process::{ProcessDriver, Sandbox};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Program {
    /// argv; `${PORT}`, `${CAPSTAN_HOST_IP}` and `${CAPSTAN_ADDR}` in any
    /// element become the host port, the node's address and both.
    Process { argv: Vec<String> },
    Image {
        image: String,
        args: Vec<String>,
        container_port: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub instance_id: InstanceId,
    pub app: String,
    pub spec_hash: String,
    pub program: Program,
    pub env: BTreeMap<String, String>,
    /// The node address the workload serves on (the agent's
    /// `--advertise-addr`; 127.0.0.1 in `capstan dev`): `CAPSTAN_HOST_IP`
    /// in its environment. Routers reach it at `host_ip:host_port`.
    pub host_ip: std::net::IpAddr,
    /// The port on `host_ip` that serves the workload; `PORT` in its
    /// environment, with `CAPSTAN_ADDR` = `host_ip:host_port`.
    pub host_port: u16,
    pub cpu_millis: u32,
    pub memory_mb: u32,
}

/// What a driver knows of a workload it started, also after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub instance_id: InstanceId,
    pub app: String,
    pub spec_hash: String,
    pub host_port: u16,
}

/// What a workload has used: CPU time since it started, memory now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    /// Bytes received and sent since the workload started, where the
    /// runtime counts them per workload (Docker: the container's
    /// interfaces; a process shares the node's network, so `None`).
    pub network: Option<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadStatus {
    Running,
    Exited {
        code: Option<i64>,
        reason: String,
    },
    /// The driver has no such workload.
    Missing,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("failed to start `{program}`: {reason}")]
    Start { program: String, reason: String },
    #[error("{0} is not available: {1}")]
    Unavailable(&'static str, String),
    #[error("driver I/O failed: {0}")]
    Io(String),
}

#[async_trait]
pub trait Driver: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn start(&self, spec: &WorkloadSpec) -> Result<Workload, DriverError>;
    /// Asks the workload to stop, kills it after `grace`, forgets it.
    /// Stopping an unknown workload succeeds.
    async fn stop(&self, instance_id: &InstanceId, grace: Duration) -> Result<(), DriverError>;
    async fn status(&self, instance_id: &InstanceId) -> Result<WorkloadStatus, DriverError>;
    /// Every workload this driver started and has not stopped, running or not.
    async fn list(&self) -> Result<Vec<Workload>, DriverError>;
    /// What each running workload uses now (process apps: their process
    /// group, from /proc; image apps: Docker's stats). Workloads that are
    /// not running are left out.
    async fn usage(&self) -> Result<Vec<(InstanceId, Usage)>, DriverError>;
}

/// `${NAME}` → its value, for each of the [`platform_env`] variables, in
/// every argument (`${PORT}`, `${CAPSTAN_HOST_IP}`, ...). Nothing else is
/// expanded: no shell ever sees the arguments.
pub fn substitute(args: &[String], vars: &[(&'static str, String)]) -> Vec<String> {
    args.iter()
        .map(|arg| {
            vars.iter().fold(arg.clone(), |arg, (name, value)| {
                arg.replace(&format!("${{{name}}}"), value)
            })
        })
        .collect()
}

/// The variables every workload gets beside its own: `PORT`,
/// `CAPSTAN_HOST_IP`, `CAPSTAN_ADDR`, `CAPSTAN_INSTANCE_ID`, `CAPSTAN_APP`.
/// `port` is the one the workload listens on (inside a container, the
/// container port).
pub fn platform_env(spec: &WorkloadSpec, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("PORT", port.to_string()),
        ("CAPSTAN_HOST_IP", spec.host_ip.to_string()),
        (
            "CAPSTAN_ADDR",
            std::net::SocketAddr::new(spec.host_ip, spec.host_port).to_string(),
        ),
        ("CAPSTAN_INSTANCE_ID", spec.instance_id.to_string()),
        ("CAPSTAN_APP", spec.app.clone()),
    ]
}
