//! The per-node agent. It starts and stops instances through a driver
//! (process or Docker), supervises each (exit detection, HTTP/TCP health
//! checks) and reports what it observes through `ListInstances` and events.
//!
//! The agent keeps one file per instance in its state dir, so after a restart
//! it re-adopts running workloads and stops leftovers it has no record of.
//! It never decides what should run: that is the orchestrator's job.

mod health;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_authn::{Policy, RequireAuthLayer};
use capstan_proto::v1::MetricName;
use capstan_proto::v1::agent_server::{Agent, AgentServer};
use capstan_proto::v1::scheduler_client::SchedulerClient;
use capstan_proto::v1::{
    HeartbeatRequest, Instance, ListInstancesRequest, ListInstancesResponse, RegisterNodeRequest,
    StartInstanceRequest, StopInstanceRequest, StopInstanceResponse,
};
use capstan_runtime::{
    DockerDriver, Driver, ProcessDriver, Program, Sandbox, WorkloadSpec, WorkloadStatus,
};
use capstan_server::{Platform, Service, now_ms};
use capstan_types::{AppSpec, Error, Event, EventKind, InstanceId, InstanceState, Resources, Run};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// A starting instance is probed 2 ms after it starts, then at doubling
/// waits up to 20 ms, until it first passes: a refused connection costs
/// next to nothing, and readiness is seen within a few ms of the app's.
const STARTING_PROBE_FIRST: Duration = Duration::from_millis(2);
const STARTING_PROBE_MAX: Duration = Duration::from_millis(20);
/// Heartbeats go every second unless the scheduler asks for longer (large
/// clusters), never longer than a minute.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const MAX_HEARTBEAT_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Stable across restarts: the agent re-adopts workloads by it.
    pub node_id: String,
    pub state_dir: PathBuf,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
    /// Connect to the local Docker engine for image apps.
    pub docker: bool,
    /// The user process apps run as when the agent is root.
    pub run_as: String,
    /// Where process apps get their working directories: outside the data
    /// dir, traversable by `run_as`.
    pub work_root: PathBuf,
    /// The address other hosts reach this node's instances at: instances
    /// bind to it and routers dial `advertise_ip:port`.
    pub advertise_ip: IpAddr,
    /// How often each instance's CPU and memory are sampled.
    pub sample_every: Duration,
    /// Where process apps' limits come from: a cgroup v2 the agent owns
    /// (`cgroup::CgroupMode::resolve`), else rlimits and the memory watchdog.
    pub cgroups: Option<capstan_runtime::cgroup::Cgroups>,
    /// A binary that is a log writer when called with `__log-writer`
    /// (`capstan_runtime::logs`): the agent's own. `None`: apps write
    /// their log directly, unstamped and unrotated.
    pub log_writer: Option<PathBuf>,
}

/// `--cgroup-root`: `auto`, `off` or an absolute path.
pub fn parse_cgroup_root(text: &str) -> Result<capstan_runtime::cgroup::CgroupMode, String> {
    capstan_runtime::cgroup::CgroupMode::parse("--cgroup-root", text).map_err(|e| e.to_string())
}

/// The cgroups process apps' limits come from under `mode`: with `auto`,
/// none (and the reason in the log) when the host does not delegate one;
/// a path that cannot be used is an error.
pub fn cgroups(
    mode: &capstan_runtime::cgroup::CgroupMode,
) -> Result<Option<capstan_runtime::cgroup::Cgroups>, String> {
    use capstan_runtime::cgroup::CgroupMode;
    match (mode, mode.resolve()) {
        (_, Ok(cgroups)) => Ok(Some(cgroups)),
        (CgroupMode::At(_), Err(reason)) => Err(reason),
        (_, Err(reason)) => {
            tracing::info!("process app limits without cgroup v2: {reason}");
            Ok(None)
        }
    }
}

/// How often an agent samples its instances' usage unless told otherwise.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The address of the interface the default route leaves by: the node's
/// primary address, what `--advertise-addr` defaults to. No packet is sent
/// (a UDP socket is only connected, to a TEST-NET-1 address).
pub fn primary_address() -> Result<IpAddr, String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.connect("192.0.2.1:9").map_err(|e| {
        format!("no default route to find the primary interface by ({e}); pass --advertise-addr")
    })?;
    let ip = socket.local_addr().map_err(|e| e.to_string())?.ip();
    if ip.is_unspecified() {
        return Err("the primary interface has no address; pass --advertise-addr".into());
    }
    Ok(ip)
}

fn localhost() -> IpAddr {
    std::net::Ipv4Addr::LOCALHOST.into()
}

/// The user process apps run as by default.
pub const DEFAULT_RUN_AS: &str = "nobody";

/// Where a node's process apps work by default: under /var/lib/capstan/work
/// when the agent is root (apps run as another user and must reach it, but
/// never the data dir), else in the agent's state dir (apps run as the
/// agent's user and could read its files anyway).
pub fn default_work_root(node_id: &str, state_dir: &std::path::Path) -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/lib/capstan/work").join(node_id)
    } else {
        state_dir.join("work")
    }
}

/// What the agent persists per instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstanceFile {
    instance_id: InstanceId,
    spec_hash: String,
    spec: AppSpec,
    /// Files from before `--advertise-addr` served on 127.0.0.1.
    #[serde(default = "localhost")]
    host_ip: IpAddr,
    host_port: u16,
}

impl InstanceFile {
    fn address(&self) -> SocketAddr {
        SocketAddr::new(self.host_ip, self.host_port)
    }
}

struct Tracked {
    file: InstanceFile,
    state: InstanceState,
    message: String,
    updated_ms: i64,
    stop: CancellationToken,
}

#[derive(Clone)]
struct AgentApi {
    inner: Arc<Inner>,
}

struct Inner {
    platform: Platform,
    config: AgentConfig,
    /// What runs process apps: the [`ProcessDriver`], or the driver a
    /// bench or test hands [`run_with_driver`].
    process: Arc<dyn Driver>,
    /// Where process apps' logs are: `None` for a driver that keeps none.
    process_logs: Option<Arc<ProcessDriver>>,
    docker: Option<DockerDriver>,
    docker_error: String,
    instances: Mutex<HashMap<InstanceId, Tracked>>,
}

impl Inner {
    fn instances_dir(&self) -> PathBuf {
        self.config.state_dir.join("instances")
    }

    /// An instance's file; the id type keeps it inside the instances dir.
    fn instance_file(&self, instance_id: &InstanceId) -> PathBuf {
        self.instances_dir().join(format!("{instance_id}.json"))
    }

    fn driver(&self, spec: &AppSpec) -> Result<&dyn Driver, Error> {
        if spec.is_image() {
            match &self.docker {
                Some(docker) => Ok(docker),
                None => Err(Error::FailedPrecondition(format!(
                    "image apps need Docker on node {}: {}",
                    self.config.node_id, self.docker_error
                ))),
            }
        } else {
            Ok(self.process.as_ref())
        }
    }

    fn event(&self, kind: EventKind, file: &InstanceFile, message: impl Into<String>) -> Event {
        Event::new(capstan_server::new_id("ev"), now_ms(), kind)
            .app(&file.spec.name)
            .instance(&file.instance_id)
            .node(&self.config.node_id)
            .message(message)
    }

    /// Moves an instance to `state` and publishes the matching event.
    async fn transition(&self, id: &InstanceId, state: InstanceState, message: String) {
        let event = {
            let mut instances = self.instances.lock().expect("instances lock poisoned");
            let Some(tracked) = instances.get_mut(id) else {
                return;
            };
            if tracked.state == state {
                return;
            }
            tracked.state = state;
            tracked.message = message.clone();
            tracked.updated_ms = now_ms();
            let kind = match state {
                InstanceState::Healthy => EventKind::InstanceHealthy,
                InstanceState::Unhealthy => EventKind::InstanceUnhealthy,
                InstanceState::Failed | InstanceState::Lost => EventKind::InstanceFailed,
                InstanceState::Stopped => EventKind::InstanceStopped,
                _ => return,
            };
            self.event(kind, &tracked.file, message)
        };
        self.platform.emit(event).await;
    }

    fn to_wire(&self, tracked: &Tracked) -> Instance {
        Instance {
            id: tracked.file.instance_id.to_string(),
            app: tracked.file.spec.name.to_string(),
            node_id: self.config.node_id.clone(),
            spec_hash: tracked.file.spec_hash.clone(),
            state: capstan_proto::state_to_wire(tracked.state) as i32,
            address: tracked.file.address().to_string(),
            routable: false,
            message: tracked.message.clone(),
            updated_at_ms: tracked.updated_ms,
        }
    }

    /// Starts supervising an instance; returns its wire form.
    fn track(self: &Arc<Self>, file: InstanceFile, state: InstanceState) -> Instance {
        let stop = CancellationToken::new();
        let id = file.instance_id.clone();
        let tracked = Tracked {
            file,
            state,
            message: String::new(),
            updated_ms: now_ms(),
            stop: stop.clone(),
        };
        let wire = self.to_wire(&tracked);
        self.instances
            .lock()
            .expect("instances lock poisoned")
            .insert(id.clone(), tracked);
        let inner = self.clone();
        tokio::spawn(async move { inner.supervise(id, stop).await });
        wire
    }

    /// Watches one instance until it stops: exit detection and health checks.
    async fn supervise(self: Arc<Self>, id: InstanceId, stop: CancellationToken) {
        let Some(file) = self
            .instances
            .lock()
            .expect("instances lock poisoned")
            .get(&id)
            .map(|t| t.file.clone())
        else {
            return;
        };
        let health = file.spec.health.clone();
        let Ok(driver) = self.driver(&file.spec) else {
            return;
        };
        // `passing`: the last probe passed. Failures count in a row.
        let (mut passing, mut failures) = (false, 0u32);
        let mut ever_healthy = false;
        let mut starting_wait = STARTING_PROBE_FIRST;
        loop {
            let wait = if ever_healthy {
                health.interval
            } else {
                starting_wait.min(health.interval)
            };
            starting_wait = (starting_wait * 2).min(STARTING_PROBE_MAX);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match driver.status(&id).await {
                Ok(WorkloadStatus::Running) => {}
                Ok(WorkloadStatus::Exited { reason, .. }) => {
                    self.transition(&id, InstanceState::Failed, reason).await;
                    return;
                }
                Ok(WorkloadStatus::Missing) => {
                    self.transition(&id, InstanceState::Failed, "workload disappeared".into())
                        .await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(instance = %id, "failed to read workload status: {e}");
                    continue;
                }
            }
            if health::probe(&health.check, file.address(), health.timeout).await {
                failures = 0;
                if !passing {
                    passing = true;
                    ever_healthy = true;
                    self.transition(&id, InstanceState::Healthy, String::new())
                        .await;
                }
            } else {
                failures += 1;
                passing = false;
                if ever_healthy && failures >= health.unhealthy_after {
                    self.transition(
                        &id,
                        InstanceState::Unhealthy,
                        format!("failed {failures} health checks in a row"),
                    )
                    .await;
                }
            }
        }
    }

    async fn start(
        self: &Arc<Self>,
        instance_id: InstanceId,
        spec_hash: String,
        spec: AppSpec,
    ) -> Result<Instance, Error> {
        if let Some(tracked) = self
            .instances
            .lock()
            .expect("instances lock poisoned")
            .get(&instance_id)
        {
            return Ok(self.to_wire(tracked));
        }
        let driver = self.driver(&spec)?;
        // A fixed host port was checked for conflicts by the scheduler.
        let host_port = match spec.ports.first().and_then(|p| p.host_port) {
            Some(port) => port,
            None => free_port(self.config.advertise_ip)?,
        };
        let program = match &spec.run {
            Run::Image { image, args } => Program::Image {
                image: image.clone(),
                args: args.clone(),
                container_port: spec
                    .ports
                    .first()
                    .and_then(|p| p.container_port)
                    .unwrap_or(host_port),
            },
            Run::Process { command } => Program::Process {
                argv: command.clone(),
            },
        };
        let workload = WorkloadSpec {
            instance_id: instance_id.clone(),
            app: spec.name.to_string(),
            spec_hash: spec_hash.clone(),
            program,
            env: spec.env.clone(),
            host_ip: self.config.advertise_ip,
            host_port,
            cpu_millis: spec.resources.cpu_millis,
            memory_mb: spec.resources.memory_mb,
        };
        let file = InstanceFile {
            instance_id: instance_id.clone(),
            spec_hash,
            spec,
            host_ip: self.config.advertise_ip,
            host_port,
        };
        let bytes = serde_json::to_vec(&file).map_err(Error::internal)?;
        write_private(self.instance_file(&instance_id), bytes).await?;
        if let Err(e) = driver.start(&workload).await {
            let _ = tokio::fs::remove_file(self.instance_file(&instance_id)).await;
            let event = self.event(EventKind::InstanceFailed, &file, e.to_string());
            self.platform.emit(event).await;
            return Err(Error::FailedPrecondition(e.to_string()));
        }
        tracing::info!(instance = %instance_id, app = %file.spec.name, port = host_port, "instance started");
        let event = self.event(
            EventKind::InstanceStarted,
            &file,
            format!("listening on {}", file.address()),
        );
        // Answer with what was started: a concurrent StopInstance may
        // already have removed the entry by the time the event is out.
        let started = self.track(file, InstanceState::Starting);
        self.platform.emit(event).await;
        Ok(started)
    }

    async fn stop(&self, instance_id: &InstanceId, grace: Duration) -> Result<(), Error> {
        let tracked = {
            let mut instances = self.instances.lock().expect("instances lock poisoned");
            instances.get_mut(instance_id).map(|t| {
                t.state = InstanceState::Stopping;
                t.stop.cancel();
                t.file.clone()
            })
        };
        match &tracked {
            Some(file) => self
                .driver(&file.spec)?
                .stop(instance_id, grace)
                .await
                .map_err(Error::internal)?,
            None => {
                // Not ours (any more): make sure no driver still runs it.
                self.process
                    .stop(instance_id, grace)
                    .await
                    .map_err(Error::internal)?;
                if let Some(docker) = &self.docker {
                    docker
                        .stop(instance_id, grace)
                        .await
                        .map_err(Error::internal)?;
                }
            }
        }
        let _ = tokio::fs::remove_file(self.instance_file(instance_id)).await;
        self.instances
            .lock()
            .expect("instances lock poisoned")
            .remove(instance_id);
        if let Some(file) = tracked {
            tracing::info!(instance = %instance_id, "instance stopped");
            self.platform
                .emit(self.event(EventKind::InstanceStopped, &file, ""))
                .await;
        }
        Ok(())
    }

    /// After a restart: re-adopt what still runs, report what died, stop
    /// workloads nothing refers to.
    async fn adopt(self: &Arc<Self>) -> Result<(), Error> {
        let dir = self.instances_dir();
        let files = tokio::task::spawn_blocking(move || read_instance_files(&dir))
            .await
            .map_err(Error::internal)??;
        let known: Vec<InstanceId> = files.iter().map(|f| f.instance_id.clone()).collect();
        for file in files {
            let status = match self.driver(&file.spec) {
                Ok(driver) => driver
                    .status(&file.instance_id)
                    .await
                    .unwrap_or(WorkloadStatus::Missing),
                Err(_) => WorkloadStatus::Missing,
            };
            let id = file.instance_id.clone();
            match status {
                WorkloadStatus::Running => {
                    tracing::info!(instance = %id, "re-adopted running instance");
                    self.track(file, InstanceState::Starting);
                }
                WorkloadStatus::Exited { reason, .. } => {
                    self.track(file, InstanceState::Starting);
                    self.transition(
                        &id,
                        InstanceState::Failed,
                        format!("exited while the agent was down: {reason}"),
                    )
                    .await;
                }
                WorkloadStatus::Missing => {
                    self.track(file, InstanceState::Starting);
                    self.transition(
                        &id,
                        InstanceState::Failed,
                        "gone after agent restart".into(),
                    )
                    .await;
                }
            }
        }
        let mut leftovers = self.process.list().await.map_err(Error::internal)?;
        if let Some(docker) = &self.docker {
            leftovers.extend(docker.list().await.map_err(Error::internal)?);
        }
        for workload in leftovers
            .into_iter()
            .filter(|w| !known.contains(&w.instance_id))
        {
            tracing::warn!(instance = %workload.instance_id, "stopping a workload with no instance record");
            self.stop(&workload.instance_id, Duration::from_secs(5))
                .await?;
        }
        Ok(())
    }

    /// Samples what each instance uses every `sample_every`, into the
    /// process's `capstan_instance_*` gauges (CPU as cores used since the
    /// previous sample; the series of an instance that is gone are
    /// removed) and to the metrics service (CPU in percent of what the
    /// instance reserves, memory, and a restart for each instance that
    /// failed since: the orchestrator replaces it). Metrics are hints: a
    /// batch the metrics service does not take is dropped.
    async fn sample(self: Arc<Self>, shutdown: CancellationToken) {
        let metrics = capstan_server::metrics::metrics();
        let node = self.config.node_id.clone();
        let mut previous: HashMap<InstanceId, (tokio::time::Instant, f64, String)> = HashMap::new();
        let mut network: HashMap<InstanceId, (u64, u64)> = HashMap::new();
        let mut failed_reported: std::collections::HashSet<InstanceId> = Default::default();
        let mut tick = tokio::time::interval(self.config.sample_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut usage = match self.process.usage().await {
                Ok(usage) => usage,
                Err(e) => {
                    tracing::debug!("process usage not sampled: {e}");
                    Vec::new()
                }
            };
            if let Some(docker) = &self.docker {
                match docker.usage().await {
                    Ok(more) => usage.extend(more),
                    Err(e) => tracing::debug!("container usage not sampled: {e}"),
                }
            }
            let at_ms = now_ms();
            // One group of readings per instance.
            let mut samples: HashMap<InstanceId, capstan_proto::v1::InstanceReadings> =
                HashMap::new();
            let mut sample = |app: &str, id: &InstanceId, metric: MetricName, value: f64| {
                samples
                    .entry(id.clone())
                    .or_insert_with(|| capstan_proto::v1::InstanceReadings {
                        app: app.to_string(),
                        instance_id: id.to_string(),
                        node_id: node.clone(),
                        at_ms,
                        readings: Vec::new(),
                    })
                    .readings
                    .push(capstan_proto::v1::Reading {
                        metric: metric as i32,
                        value,
                        buckets: Vec::new(),
                    });
            };
            // (app, reserved cores) of every instance, and a restart for
            // each that failed since the last sample.
            let apps: HashMap<InstanceId, (String, f64)> = {
                let instances = self.instances.lock().expect("instances lock poisoned");
                for (id, tracked) in instances.iter() {
                    if matches!(tracked.state, InstanceState::Failed)
                        && failed_reported.insert(id.clone())
                    {
                        sample(&tracked.file.spec.name, id, MetricName::Restarts, 1.0);
                    }
                }
                failed_reported.retain(|id| instances.contains_key(id));
                instances
                    .iter()
                    .map(|(id, t)| {
                        let millis = t.file.spec.resources.cpu_millis;
                        let cores = if millis == 0 {
                            1.0
                        } else {
                            f64::from(millis) / 1000.0
                        };
                        (id.clone(), (t.file.spec.name.to_string(), cores))
                    })
                    .collect()
            };
            let now = tokio::time::Instant::now();
            let mut seen = HashMap::new();
            for (id, used) in usage {
                let Some((app, reserved)) = apps.get(&id) else {
                    continue;
                };
                let labels = [app.as_str(), id.as_str(), node.as_str()];
                metrics
                    .instance_memory
                    .with_label_values(&labels)
                    .set(used.memory_bytes.min(i64::MAX as u64) as i64);
                sample(app, &id, MetricName::MemoryBytes, used.memory_bytes as f64);
                if let Some((at, cpu, _)) = previous.get(&id) {
                    let wall = now.duration_since(*at).as_secs_f64();
                    if wall > 0.0 {
                        let cores = ((used.cpu_seconds - cpu) / wall).max(0.0);
                        metrics.instance_cpu.with_label_values(&labels).set(cores);
                        sample(app, &id, MetricName::CpuPercent, cores * 100.0 / reserved);
                    }
                }
                // A restarted container counts from zero again.
                if let Some((rx, tx)) = used.network
                    && let Some((rx0, tx0)) = network.insert(id.clone(), (rx, tx))
                {
                    let (rx, tx) = (rx.saturating_sub(rx0), tx.saturating_sub(tx0));
                    sample(app, &id, MetricName::NetRxBytes, rx as f64);
                    sample(app, &id, MetricName::NetTxBytes, tx as f64);
                }
                seen.insert(id, (now, used.cpu_seconds, app.clone()));
            }
            for (id, (_, _, app)) in &previous {
                if !seen.contains_key(id) {
                    let labels = [app.as_str(), id.as_str(), node.as_str()];
                    let _ = metrics.instance_memory.remove_label_values(&labels);
                    let _ = metrics.instance_cpu.remove_label_values(&labels);
                }
            }
            network.retain(|id, _| seen.contains_key(id));
            previous = seen;
            if !samples.is_empty() {
                self.platform
                    .report_samples(samples.into_values().collect())
                    .await;
            }
        }
    }

    /// Registers the node, then heartbeats at the interval the scheduler
    /// asks for; registers again if the scheduler forgot it.
    async fn heartbeat(self: Arc<Self>, address: String, shutdown: CancellationToken) {
        let mut registered = false;
        let mut every = Duration::ZERO;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            every = HEARTBEAT_EVERY;
            let client = match self.platform.client("scheduler").await {
                Ok(channel) => SchedulerClient::new(channel),
                Err(e) => {
                    tracing::warn!("scheduler unreachable: {e}");
                    continue;
                }
            };
            let result = if registered {
                let mut client = client;
                client
                    .heartbeat(HeartbeatRequest {
                        node_id: self.config.node_id.clone(),
                    })
                    .await
                    .map(|r| {
                        let r = r.into_inner();
                        every = next_heartbeat(r.next_heartbeat_ms);
                        r.known
                    })
            } else {
                let mut client = client;
                client
                    .register_node(RegisterNodeRequest {
                        id: self.config.node_id.clone(),
                        address: address.clone(),
                        capacity: Some(capstan_proto::resources_to_wire(self.config.capacity)),
                        labels: node_attributes(&self.config).into_iter().collect(),
                    })
                    .await
                    .map(|_| true)
            };
            match result {
                Ok(known) => registered = known,
                Err(status) => {
                    tracing::warn!(node = %self.config.node_id, "heartbeat failed: {}", status.message());
                    registered = false;
                }
            }
        }
    }
}

/// The wait before the next heartbeat, as the scheduler asked (0: the
/// default), within 1 s to 60 s whatever it says.
fn next_heartbeat(ms: u32) -> Duration {
    match ms {
        0 => HEARTBEAT_EVERY,
        ms => Duration::from_millis(u64::from(ms)).clamp(HEARTBEAT_EVERY, MAX_HEARTBEAT_EVERY),
    }
}

/// What the node reports about itself for placement constraints, under the
/// operator's labels (which win on a clash): `kernel.name`,
/// `kernel.version`, `cpu.arch`, `capstan.version`, `driver.process`,
/// `driver.docker`.
pub fn node_attributes(config: &AgentConfig) -> BTreeMap<String, String> {
    let mut attributes = BTreeMap::from([
        ("kernel.name".to_string(), std::env::consts::OS.to_string()),
        ("cpu.arch".to_string(), std::env::consts::ARCH.to_string()),
        (
            "capstan.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("driver.process".to_string(), "true".to_string()),
        ("driver.docker".to_string(), config.docker.to_string()),
    ]);
    if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        attributes.insert("kernel.version".to_string(), release.trim().to_string());
    }
    attributes.extend(config.labels.clone());
    attributes
}

/// Every readable instance file in `dir`; unreadable ones (a bad id, bad
/// JSON) are logged and skipped.
fn read_instance_files(dir: &std::path::Path) -> Result<Vec<InstanceFile>, Error> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::internal)?.flatten() {
        match std::fs::read(entry.path()).map(|b| serde_json::from_slice::<InstanceFile>(&b)) {
            Ok(Ok(file)) => files.push(file),
            _ => {
                tracing::warn!(path = %entry.path().display(), "ignoring unreadable instance file")
            }
        }
    }
    Ok(files)
}

/// Writes an instance file, readable by the agent's user only: it holds
/// the app's environment.
async fn write_private(path: PathBuf, bytes: Vec<u8>) -> Result<(), Error> {
    tokio::task::spawn_blocking(move || capstan_secrets::write_private_file(&path, &bytes))
        .await
        .map_err(Error::internal)?
        .map_err(Error::internal)
}

fn free_port(ip: IpAddr) -> Result<u16, Error> {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Unavailable(format!("no free port: {e}")))
}

#[tonic::async_trait]
impl Agent for AgentApi {
    async fn start_instance(
        &self,
        request: Request<StartInstanceRequest>,
    ) -> Result<Response<Instance>, Status> {
        let r = request.into_inner();
        let instance_id =
            InstanceId::parse("instance_id", &r.instance_id).map_err(capstan_proto::status)?;
        let spec = r
            .spec
            .ok_or_else(|| capstan_proto::status(Error::invalid("spec", "missing")))
            .and_then(|s| capstan_proto::spec_from_wire(s).map_err(capstan_proto::status))?;
        let instance = self
            .inner
            .start(instance_id, r.spec_hash, spec)
            .await
            .map_err(capstan_proto::status)?;
        Ok(Response::new(instance))
    }

    async fn stop_instance(
        &self,
        request: Request<StopInstanceRequest>,
    ) -> Result<Response<StopInstanceResponse>, Status> {
        let r = request.into_inner();
        let instance_id =
            InstanceId::parse("instance_id", &r.instance_id).map_err(capstan_proto::status)?;
        let grace = Duration::from_millis(r.grace_ms.clamp(100, 30_000));
        self.inner
            .stop(&instance_id, grace)
            .await
            .map_err(capstan_proto::status)?;
        Ok(Response::new(StopInstanceResponse {}))
    }

    type LogsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<capstan_proto::v1::LogLine, Status>> + Send>,
    >;

    async fn logs(
        &self,
        request: Request<capstan_proto::v1::InstanceLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let r = request.into_inner();
        let instance_id =
            InstanceId::parse("instance_id", &r.instance_id).map_err(capstan_proto::status)?;
        let (app, image) = {
            let instances = self
                .inner
                .instances
                .lock()
                .expect("instances lock poisoned");
            let tracked = instances.get(&instance_id).ok_or_else(|| {
                Status::not_found(format!(
                    "instance {instance_id} does not run on node {}",
                    self.inner.config.node_id
                ))
            })?;
            (
                tracked.file.spec.name.to_string(),
                tracked.file.spec.is_image(),
            )
        };
        let tail = r.tail as usize;
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        let line = {
            let (app, id) = (app.clone(), instance_id.to_string());
            move |stream: &str, line: capstan_runtime::logs::LogLine| capstan_proto::v1::LogLine {
                app: app.clone(),
                instance_id: id.clone(),
                at_ms: line.at_ms,
                stream: stream.to_string(),
                text: line.text,
            }
        };
        if image {
            let docker = self.inner.docker.as_ref().ok_or_else(|| {
                Status::failed_precondition(format!(
                    "image apps need Docker on node {}: {}",
                    self.inner.config.node_id, self.inner.docker_error
                ))
            })?;
            let mut lines = docker.logs(&instance_id, tail, r.since_ms, r.follow);
            tokio::spawn(async move {
                while let Some(item) = lines.recv().await {
                    let sent = match item {
                        Ok((stream, l)) => sender.send(Ok(line(stream, l))).await,
                        Err(e) => sender.send(Err(Status::unavailable(e.to_string()))).await,
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            });
        } else {
            let Some(logs) = &self.inner.process_logs else {
                return Err(Status::failed_precondition(format!(
                    "the {} driver of node {} keeps no logs",
                    self.inner.process.name(),
                    self.inner.config.node_id
                )));
            };
            let path = logs.log_path(&instance_id);
            let (since, follow) = (r.since_ms, r.follow);
            tokio::spawn(async move {
                let read = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || {
                        capstan_runtime::logs::read_then_follow(&path, since, tail)
                    })
                    .await
                };
                let Ok((history, mut follower)) = read else {
                    return;
                };
                for l in history {
                    if sender.send(Ok(line("output", l))).await.is_err() {
                        return;
                    }
                }
                if !follow {
                    return;
                }
                loop {
                    tokio::select! {
                        _ = sender.closed() => return,
                        _ = tokio::time::sleep(LOG_POLL_EVERY) => {}
                    }
                    let Some(new) = follower.poll() else {
                        // The instance was stopped: its logs are gone.
                        return;
                    };
                    for l in new {
                        if sender.send(Ok(line("output", l))).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn list_instances(
        &self,
        _: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        let instances = self
            .inner
            .instances
            .lock()
            .expect("instances lock poisoned");
        let mut list: Vec<Instance> = instances.values().map(|t| self.inner.to_wire(t)).collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        drop(instances);
        Ok(Response::new(ListInstancesResponse {
            node_id: self.inner.config.node_id.clone(),
            instances: list,
        }))
    }
}

/// Only Capstan's services (the orchestrator) may call an agent: these
/// calls start arbitrary programs and hand them apps' environment.
pub fn policy() -> Policy {
    Policy::new()
        .services("/capstan.v1.Agent/StartInstance")
        .services("/capstan.v1.Agent/StopInstance")
        .services("/capstan.v1.Agent/ListInstances")
        .services("/capstan.v1.Agent/Logs")
}

/// How often a followed process log is checked for new lines.
const LOG_POLL_EVERY: Duration = Duration::from_millis(200);

/// Serves the agent on `listener` until `shutdown`. Workloads keep running
/// when the agent stops; the next start re-adopts them.
pub async fn run(
    platform: Platform,
    config: AgentConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let sandbox = if nix::unistd::geteuid().is_root() {
        Sandbox::as_user(&config.run_as, &config.work_root).map_err(Error::internal)?
    } else {
        tracing::warn!(
            "the agent is not root, so process apps run as its own user and can read its files; run it as root to isolate them"
        );
        Sandbox::same_user(&config.work_root)
    };
    let mut process = ProcessDriver::new(&config.state_dir.join("processes"), sandbox)
        .map_err(Error::internal)?;
    if let Some(cgroups) = config.cgroups.clone() {
        process = process.with_cgroups(cgroups);
    }
    if let Some(binary) = config.log_writer.clone() {
        process = process.with_log_writer(binary);
    }
    tracing::info!(node = %config.node_id, "process app limits: {}", process.limits());
    let process = Arc::new(process);
    serve(
        platform,
        config,
        process.clone(),
        Some(process),
        listener,
        shutdown,
    )
    .await
}

/// [`run`] with `driver` in place of the process driver: how benches and
/// tests run many simulated nodes (`capstan-sim`). No binary of the
/// platform calls it, so no flag or config selects another driver.
pub async fn run_with_driver(
    platform: Platform,
    config: AgentConfig,
    driver: Arc<dyn Driver>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    serve(platform, config, driver, None, listener, shutdown).await
}

async fn serve(
    platform: Platform,
    config: AgentConfig,
    process: Arc<dyn Driver>,
    process_logs: Option<Arc<ProcessDriver>>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (docker, docker_error) = if config.docker {
        match DockerDriver::connect(&config.node_id).await {
            Ok(docker) => (Some(docker), String::new()),
            Err(e) => {
                tracing::warn!(
                    "Docker is not available; image apps will not start on this node: {e}"
                );
                (None, e.to_string())
            }
        }
    } else {
        (None, "Docker is disabled for this agent".to_string())
    };
    let inner = Arc::new(Inner {
        platform: platform.clone(),
        config,
        process,
        process_logs,
        docker,
        docker_error,
        instances: Mutex::default(),
    });
    tokio::fs::create_dir_all(inner.instances_dir())
        .await
        .map_err(Error::internal)?;
    inner.adopt().await?;
    let address = platform.advertised(listener.local_addr().map_err(Error::internal)?)?;
    let heartbeat = tokio::spawn(inner.clone().heartbeat(address, shutdown.clone()));
    let sampler = tokio::spawn(inner.clone().sample(shutdown.clone()));
    let policy = policy();
    let service = Service {
        name: "agent",
        instance_id: inner.config.node_id.clone(),
        grpc_names: vec!["capstan.v1.Agent"],
        routes: tonic::service::Routes::new(AgentServer::new(AgentApi {
            inner: inner.clone(),
        })),
        auth: RequireAuthLayer::new(platform.verifier(), policy),
    };
    let result = capstan_server::serve(&platform, service, listener, shutdown).await;
    heartbeat.abort();
    sampler.abort();
    // Stop supervising; the workloads themselves keep running.
    for tracked in inner
        .instances
        .lock()
        .expect("instances lock poisoned")
        .values()
    {
        tracked.stop.cancel();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_interval_the_scheduler_asks_for_is_bounded() {
        assert_eq!(next_heartbeat(0), HEARTBEAT_EVERY);
        assert_eq!(next_heartbeat(20_000), Duration::from_secs(20));
        assert_eq!(next_heartbeat(1), HEARTBEAT_EVERY);
        assert_eq!(next_heartbeat(u32::MAX), MAX_HEARTBEAT_EVERY);
    }
}
