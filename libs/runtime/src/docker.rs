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
            nano_cpus: Some(i64::from(spec.cpu_millis) * 1_000_000),
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
