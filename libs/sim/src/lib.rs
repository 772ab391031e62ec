//! [`SimDriver`]: a runtime driver that starts no program, for benches and
//! tests that need many nodes on one machine (`capstan-scale-bench`).
//!
//! Each workload it "starts" is a tiny HTTP responder on the workload's
//! `host_ip:host_port`, listening once the configured delay has passed: the
//! agent's real health probes see it come up, as they would an app that
//! takes that long to start. A program `exit N` (argv) reports exit code
//! `N` after the delay instead.
//!
//! It is never selectable in a platform binary: no binary of the platform
//! depends on this crate (`tests/sim_not_in_platform.rs` checks the built
//! binaries), and the agent takes it only through
//! `capstan_agent::run_with_driver`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use capstan_runtime::{
    Driver, DriverError, Program, Usage, Workload, WorkloadSpec, WorkloadStatus,
};
use capstan_types::InstanceId;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What [`Driver::name`] says; the binaries test looks for it.
pub const NAME: &str = "capstan-sim: simulated workloads (benches and tests only)";

/// The resident memory each simulated workload reports.
pub const SIMULATED_MEMORY_BYTES: u64 = 1 << 20;

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nsim";

struct SimWorkload {
    workload: Workload,
    ready_at: Instant,
    /// `Some(code)`: the program was `exit N`.
    exit: Option<i64>,
    responder: JoinHandle<()>,
}

impl Drop for SimWorkload {
    fn drop(&mut self) {
        self.responder.abort();
    }
}

/// The simulated workloads of one node; [`SimDriver::reopen`] gives a
/// second driver over the same node, as after an agent restart.
#[derive(Clone)]
pub struct SimDriver {
    delay: Duration,
    workloads: Arc<Mutex<HashMap<InstanceId, SimWorkload>>>,
}

impl SimDriver {
    /// Workloads come up (or exit) `delay` after they are started.
    pub fn new(delay: Duration) -> Self {
        SimDriver {
            delay,
            workloads: Arc::default(),
        }
    }

    /// A fresh driver over this one's workloads.
    pub fn reopen(&self) -> Self {
        self.clone()
    }

    fn workloads(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, SimWorkload>> {
        self.workloads.lock().expect("sim workloads lock poisoned")
    }
}

/// `exit N` → `Some(N)`; any other program runs until stopped.
fn exit_code(program: &Program) -> Result<Option<i64>, String> {
    let Program::Process { argv } = program else {
        return Ok(None);
    };
    match argv.as_slice() {
        [exit, code] if exit == "exit" => code
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("`exit {code}`: the code must be an integer")),
        _ => Ok(None),
    }
}

/// Answers every connection with a 200 once `ready_at` has passed.
async fn respond(listener: tokio::net::TcpListener, ready_at: Instant) {
    tokio::time::sleep_until(ready_at).await;
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            // Out of descriptors, most likely: back off, as a server would.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = stream.write_all(RESPONSE).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[async_trait]
impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn start(&self, spec: &WorkloadSpec) -> Result<Workload, DriverError> {
        let start_error = |reason: String| DriverError::Start {
            program: format!("{:?}", spec.program),
            reason,
        };
        if let Some(existing) = self.workloads().get(&spec.instance_id) {
            return Ok(existing.workload.clone());
        }
        let exit = exit_code(&spec.program).map_err(start_error)?;
        let ready_at = Instant::now() + self.delay;
        let responder = match exit {
            Some(_) => tokio::spawn(async {}),
            None => {
                // Bound now, so the port is the workload's from the start;
                // connections queue unanswered until it is ready.
                let address = std::net::SocketAddr::new(spec.host_ip, spec.host_port);
                let listener = tokio::net::TcpListener::bind(address)
                    .await
                    .map_err(|e| start_error(format!("listen on {address}: {e}")))?;
                tokio::spawn(respond(listener, ready_at))
            }
        };
        let workload = Workload {
            instance_id: spec.instance_id.clone(),
            app: spec.app.clone(),
            spec_hash: spec.spec_hash.clone(),
            host_port: spec.host_port,
        };
        self.workloads()
            .entry(spec.instance_id.clone())
            .or_insert(SimWorkload {
                workload: workload.clone(),
                ready_at,
                exit,
                responder,
            });
        Ok(workload)
    }

    async fn stop(&self, instance_id: &InstanceId, _grace: Duration) -> Result<(), DriverError> {
        self.workloads().remove(instance_id);
        Ok(())
    }

    async fn status(&self, instance_id: &InstanceId) -> Result<WorkloadStatus, DriverError> {
        Ok(match self.workloads().get(instance_id) {
            None => WorkloadStatus::Missing,
            Some(w) => match w.exit {
                Some(code) if Instant::now() >= w.ready_at => WorkloadStatus::Exited {
                    code: Some(code),
                    reason: format!("exited with code {code} (simulated)"),
                },
                _ => WorkloadStatus::Running,
            },
        })
    }

    async fn list(&self) -> Result<Vec<Workload>, DriverError> {
        Ok(self
            .workloads()
            .values()
            .map(|w| w.workload.clone())
            .collect())
    }

    async fn usage(&self) -> Result<Vec<(InstanceId, Usage)>, DriverError> {
        let now = Instant::now();
        Ok(self
            .workloads()
            .iter()
            .filter(|(_, w)| w.exit.is_none() || now < w.ready_at)
            .map(|(id, _)| {
                (
                    id.clone(),
                    Usage {
                        cpu_seconds: 0.0,
                        memory_bytes: SIMULATED_MEMORY_BYTES,
                        network: None,
                    },
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_programs_name_their_code() {
        let argv = |a: &[&str]| Program::Process {
            argv: a.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(exit_code(&argv(&["exit", "3"])), Ok(Some(3)));
        assert_eq!(exit_code(&argv(&["serve"])), Ok(None));
        assert!(
            exit_code(&argv(&["exit", "three"]))
                .unwrap_err()
                .contains("must be an integer")
        );
    }
}
