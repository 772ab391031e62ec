use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerStateStatusEnum, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, StopContainerOptions,
};
use capstan_types::InstanceId;

use crate::{
    Driver, DriverError, Program, Usage, Workload, WorkloadSpec, WorkloadStatus, substitute,
};

const LABEL_INSTANCE: &str = "io.capstan.instance";
const LABEL_APP: &str = "io.capstan.app";
const LABEL_NODE: &str = "io.capstan.node";
const LABEL_HASH: &str = "io.capstan.spec-hash";
const LABEL_PORT: &str = "io.capstan.host-port";

/// Runs images through the Docker Engine API. Containers carry labels naming
/// their node and instance: that is all the state, so a restarted agent lists
/// its containers by label and re-adopts them.
pub struct DockerDriver {
    docker: Docker,
    node_id: String,
}

fn unavailable(e: impl std::fmt::Display) -> DriverError {
    DriverError::Unavailable("docker", e.to_string())
}

fn container_name(node_id: &str, instance_id: &str) -> String {
    format!("capstan-{node_id}-{instance_id}")
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl DockerDriver {
    async fn force_remove(&self, name: &str) -> Result<(), bollard::errors::Error> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        self.docker.remove_container(name, Some(options)).await
    }

    /// Connects to the local engine (DOCKER_HOST or the default socket) and
    /// negotiates the API version with it.
    pub async fn connect(node_id: &str) -> Result<Self, DriverError> {
        let docker = Docker::connect_with_local_defaults().map_err(unavailable)?;
        let docker = docker.negotiate_version().await.map_err(unavailable)?;
        docker.ping().await.map_err(unavailable)?;
        Ok(DockerDriver {
            docker,
            node_id: node_id.to_string(),
        })
    }
}

impl DockerDriver {
    /// What a container printed, through the logs API, as (stream, line):
    /// the last `tail` lines (0: all) from `since_ms` on, then with
    /// `follow` each new one. Lines arrive on the returned channel; the
    /// reading stops when it is dropped.
    pub fn logs(
        &self,
        instance_id: &InstanceId,
        tail: usize,
        since_ms: i64,
        follow: bool,
    ) -> tokio::sync::mpsc::Receiver<Result<(&'static str, crate::logs::LogLine), DriverError>>
    {
        use futures::StreamExt;
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        let docker = self.docker.clone();
        let name = container_name(&self.node_id, instance_id.as_str());
        let options = bollard::query_parameters::LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            // The API counts whole seconds; lines are filtered to the ms below.
            since: i32::try_from(since_ms / 1000).unwrap_or(i32::MAX),
            timestamps: true,
            tail: if tail == 0 {
                "all".into()
            } else {
                tail.to_string()
            },
            ..Default::default()
        };
        tokio::spawn(async move {
            let mut stream = docker.logs(&name, Some(options));
            let mut partial: HashMap<&'static str, Vec<u8>> = HashMap::new();
            while let Some(item) = stream.next().await {
                let (kind, bytes) = match item {
                    Ok(bollard::container::LogOutput::StdOut { message }) => ("stdout", message),
                    Ok(bollard::container::LogOutput::StdErr { message }) => ("stderr", message),
                    Ok(bollard::container::LogOutput::Console { message }) => ("stdout", message),
                    Ok(bollard::container::LogOutput::StdIn { .. }) => continue,
                    Err(e) => {
                        let _ = sender.send(Err(unavailable(e))).await;
                        return;
                    }
                };
                let pending = partial.entry(kind).or_default();
                pending.extend_from_slice(&bytes);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let line = docker_log_line(&line);
                    if line.at_ms < since_ms {
                        continue;
                    }
                    if sender.send(Ok((kind, line))).await.is_err() {
                        return;
                    }
                }
            }
        });
        receiver
    }
}

/// A line of the logs API with `timestamps`: an RFC 3339 time in UTC
/// (`2026-12-01T15:14:28.123456789Z`), a space, the text.
fn docker_log_line(line: &[u8]) -> crate::logs::LogLine {
    let line = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(line));
    match line.split_once(' ') {
        Some((time, text)) if rfc3339_utc_ms(time).is_some() => crate::logs::LogLine {
            at_ms: rfc3339_utc_ms(time).unwrap_or_default(),
            text: text.to_string(),
        },
        _ => crate::logs::LogLine {
            at_ms: 0,
            text: line.into_owned(),
        },
    }
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
fn rfc3339_utc_ms(text: &str) -> Option<i64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (clock, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut clock = clock.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (clock.next()??, clock.next()??, clock.next()??);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let millis: i64 = format!("{fraction:0<3}")[..3].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
}

#[async_trait]
impl Driver for DockerDriver {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn start(&self, spec: &WorkloadSpec) -> Result<Workload, DriverError> {
        let Program::Image {
            image,
            args,
            container_port,
        } = &spec.program
        else {
            return Err(DriverError::Start {
                program: spec.app.clone(),
                reason: "not an image workload".into(),
            });
        };
        let workload = Workload {
            instance_id: spec.instance_id.clone(),
            app: spec.app.clone(),
            spec_hash: spec.spec_hash.clone(),
            host_port: spec.host_port,
        };
        let name = container_name(&self.node_id, &spec.instance_id);
        if let Ok(WorkloadStatus::Running) = self.status(&spec.instance_id).await {
            return Ok(workload);
        }
        // A stopped leftover under the same name would block the create.
        let _ = self.force_remove(&name).await;

        let port_key = format!("{container_port}/tcp");
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.extend(
            crate::platform_env(spec, *container_port)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}")),
        );
        let labels = HashMap::from([
            (LABEL_INSTANCE.to_string(), spec.instance_id.to_string()),
            (LABEL_APP.to_string(), spec.app.clone()),
            (LABEL_NODE.to_string(), self.node_id.clone()),
            (LABEL_HASH.to_string(), spec.spec_hash.clone()),
            (LABEL_PORT.to_string(), spec.host_port.to_string()),
        ]);
        let host_config = HostConfig {
            port_bindings: Some(HashMap::from([(
                port_key.clone(),
                Some(vec![PortBinding {
                    host_ip: Some(spec.host_ip.to_string()),
                    host_port: Some(spec.host_port.to_string()),
                }]),
            )])),
            memory: Some(i64::from(spec.memory_mb) * 1024 * 1024),
            // Docker turns NanoCPUs into a CFS quota, which has a floor.
            nano_cpus: Some(
                i64::from(crate::cgroup::enforced_cpu_millis(spec.cpu_millis)) * 1_000_000,
            ),
            pids_limit: Some(256),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_string(),
                "rw,noexec,nosuid,size=16m".to_string(),
            )])),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: if args.is_empty() {
                None
            } else {
                Some(substitute(
                    args,
                    &crate::platform_env(spec, *container_port),
                ))
            },
            env: Some(env),
            labels: Some(labels),
            exposed_ports: Some(vec![port_key]),
            user: Some("65534:65534".into()),
            host_config: Some(host_config),
            ..Default::default()
        };
        let start_err = |reason: String| DriverError::Start {
            program: image.clone(),
            reason,
        };
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| start_err(e.to_string()))?;
        if let Err(e) = self.docker.start_container(&name, None).await {
            let _ = self.force_remove(&name).await;
            return Err(start_err(e.to_string()));
        }
        Ok(workload)
    }

    async fn stop(&self, instance_id: &InstanceId, grace: Duration) -> Result<(), DriverError> {
        let name = container_name(&self.node_id, instance_id);
        let seconds = i32::try_from(grace.as_secs().max(1)).unwrap_or(i32::MAX);
        match self
            .docker
            .stop_container(
                &name,
                Some(StopContainerOptions {
                    t: Some(seconds),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            Err(e) => return Err(unavailable(e)),
        }
        match self.force_remove(&name).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 409: removal already in progress.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn status(&self, instance_id: &InstanceId) -> Result<WorkloadStatus, DriverError> {
        let name = container_name(&self.node_id, instance_id);
        let inspect = match self.docker.inspect_container(&name, None).await {
            Ok(inspect) => inspect,
            Err(e) if is_not_found(&e) => return Ok(WorkloadStatus::Missing),
            Err(e) => return Err(unavailable(e)),
        };
        let state = inspect.state.unwrap_or_default();
        match state.status {
            Some(ContainerStateStatusEnum::RUNNING) | Some(ContainerStateStatusEnum::CREATED) => {
                Ok(WorkloadStatus::Running)
            }
            _ => {
                let code = state.exit_code;
                let reason = if state.oom_killed == Some(true) {
                    "killed: out of memory".to_string()
                } else {
                    format!("exited with code {}", code.unwrap_or(-1))
                };
                Ok(WorkloadStatus::Exited { code, reason })
            }
        }
    }

    async fn list(&self) -> Result<Vec<Workload>, DriverError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_NODE}={}", self.node_id)],
        )]);
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(unavailable)?;
        let mut out: Vec<Workload> = containers
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels?;
                Some(Workload {
                    instance_id: InstanceId::try_from(labels.get(LABEL_INSTANCE)?.clone()).ok()?,
                    app: labels.get(LABEL_APP)?.clone(),
                    spec_hash: labels.get(LABEL_HASH).cloned().unwrap_or_default(),
                    host_port: labels.get(LABEL_PORT)?.parse().ok()?,
                })
            })
            .collect();
        out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(out)
    }

    async fn usage(&self) -> Result<Vec<(InstanceId, Usage)>, DriverError> {
        use futures::StreamExt;
        let mut out = Vec::new();
        for workload in self.list().await? {
            if !matches!(
                self.status(&workload.instance_id).await,
                Ok(WorkloadStatus::Running)
            ) {
                continue;
            }
            let name = container_name(&self.node_id, &workload.instance_id);
            let options = bollard::query_parameters::StatsOptions {
                stream: false,
                one_shot: true,
            };
            let Some(Ok(stats)) = self.docker.stats(&name, Some(options)).next().await else {
                continue;
            };
            let cpu_ns = stats
                .cpu_stats
                .and_then(|c| c.cpu_usage)
                .and_then(|u| u.total_usage)
                .unwrap_or(0);
            let memory = stats.memory_stats.and_then(|m| m.usage).unwrap_or(0);
            let network = stats.networks.map(|networks| {
                networks.values().fold((0u64, 0u64), |(rx, tx), n| {
                    (rx + n.rx_bytes.unwrap_or(0), tx + n.tx_bytes.unwrap_or(0))
                })
            });
            out.push((
                workload.instance_id,
                Usage {
                    cpu_seconds: cpu_ns as f64 / 1e9,
                    memory_bytes: memory,
                    network,
                },
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_log_times_are_read_to_the_millisecond() {
        assert_eq!(rfc3339_utc_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_utc_ms("2026-12-01T15:14:28.123456789Z"),
            Some(1_796_138_068_123)
        );
        assert_eq!(
            rfc3339_utc_ms("2024-02-29T00:00:01.5Z"),
            Some(1_709_164_801_500)
        );
        assert_eq!(rfc3339_utc_ms("2026-13-01T00:00:00Z"), None);
        assert_eq!(rfc3339_utc_ms("yesterday"), None);
        let line = docker_log_line(b"2026-12-01T15:14:28.5Z hello there\n");
        assert_eq!(
            (line.at_ms, line.text.as_str()),
            (1_796_138_068_500, "hello there")
        );
        assert_eq!(docker_log_line(b"no time\n").at_ms, 0);
    }
}
