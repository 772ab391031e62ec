//! `capstan dev`: every service in one process, each a real gRPC server on
//! its own loopback port, wired with the embedded adapters (in-process
//! registry, SQLite store, file secrets, in-memory bus or RabbitMQ).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use capstan_secrets::{FileSecretStore, SecretStore};
use capstan_server::Platform;
use capstan_types::Resources;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// Leases of the singleton roles. One process holds them all, so this only
/// matters when a standalone replica joins the same store.
const LEASE_TTL: Duration = Duration::from_secs(10);
/// How long a backend named by a flag may take to answer at start.
const BACKEND_WAIT: Duration = Duration::from_secs(10);

pub struct DevOptions {
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    /// `memory` or an amqp:// URL.
    pub bus: String,
    pub traefik_provider_addr: SocketAddr,
    pub docker: bool,
    pub cpu_millis: u32,
    pub memory_mb: u32,
    /// Agents (nodes) to run in this process; 0 runs the control plane
    /// only, for agents that join over the network.
    pub agents: u32,
    /// The address the services' gRPC servers listen on (port chosen by
    /// the kernel): 127.0.0.1, or an address agents on other hosts reach.
    pub grpc_host: std::net::IpAddr,
    pub default_strategy: capstan_placement::Strategy,
    /// Peers whose `X-Forwarded-*` headers the edge proxy believes.
    pub trusted_proxies: capstan_router_config::TrustedProxies,
    /// How long the tokens auth issues live.
    pub token_ttl: std::time::Duration,
    /// The `--cache` URL: `memory` or `redis://...`.
    pub cache: String,
    /// The `--registry` URL: `embedded` or `consul://...`.
    pub registry: String,
    /// The `--store` URL; `None`: state.db in the data dir.
    pub store: Option<String>,
    /// Traefik in front, whose API confirms each table before a drain.
    pub traefik: capstan_router_config::ack::TraefikArgs,
    /// Where `/metrics` is served, for every service of this process.
    pub metrics_addr: SocketAddr,
    /// Where the HTTP gateway listens.
    pub gateway_addr: SocketAddr,
    /// Its requests a second per credential.
    pub api_rate: u32,
    /// How often usage is sampled and traffic reported.
    pub sample_every: Duration,
    /// Requests per app held while an app scaled to zero starts.
    pub wake_queue: usize,
    /// How long they wait.
    pub wake_timeout: Duration,
    /// Where process apps' limits come from (`--cgroup-root`).
    pub cgroup_root: capstan_runtime::cgroup::CgroupMode,
}

/// Most agents `capstan dev` runs in one process.
pub const MAX_AGENTS: u32 = 16;

/// The agents of an embedded platform: the first keeps the data dir's node
/// id (so a one-agent data dir keeps its workloads), the others add `-N`.
/// Each gets a zone label cycling through a, b, c, and a capacity that
/// shrinks with its index, so that placement has real differences to see.
fn agent_configs(
    options: &DevOptions,
    base_id: &str,
    cgroups: Option<capstan_runtime::cgroup::Cgroups>,
) -> Vec<capstan_agent::AgentConfig> {
    (1..=options.agents)
        .map(|i| {
            let node_id = if i == 1 {
                base_id.to_string()
            } else {
                format!("{base_id}-{i}")
            };
            let share = |full: u32| {
                (u64::from(full) * u64::from(options.agents + 1 - i) / u64::from(options.agents))
                    .max(1) as u32
            };
            let zone = ["a", "b", "c"][(i as usize - 1) % 3];
            let state_dir = options.data_dir.join("agents").join(&node_id);
            capstan_agent::AgentConfig {
                work_root: capstan_agent::default_work_root(&node_id, &state_dir),
                run_as: capstan_agent::DEFAULT_RUN_AS.to_string(),
                state_dir,
                node_id,
                capacity: Resources {
                    cpu_millis: share(options.cpu_millis),
                    memory_mb: share(options.memory_mb),
                },
                labels: [
                    ("capstan.io/mode".to_string(), "dev".to_string()),
                    ("zone".to_string(), format!("zone-{zone}")),
                ]
                .into(),
                docker: options.docker,
                // One machine: instances serve on loopback only.
                advertise_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                sample_every: options.sample_every,
                // Instance ids are unique: the agents share one root.
                cgroups: cgroups.clone(),
                // `capstan __log-writer ...` (main.rs).
                log_writer: std::env::current_exe().ok(),
            }
        })
        .collect()
}

/// Where each service of a running `capstan dev` listens; the CLI reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    pub orchestrator: String,
    pub scheduler: String,
    pub router_config: String,
    pub auth: String,
    pub proxy: String,
    pub traefik_provider: String,
    /// Where Prometheus scrapes `/metrics` (every service's series).
    #[serde(default)]
    pub metrics: String,
    /// The metrics service (gRPC): samples, queries, top.
    #[serde(default)]
    pub metrics_service: String,
    /// The HTTP gateway (REST under /v1/, /openapi.json).
    #[serde(default)]
    pub gateway: String,
    pub pid: u32,
}

pub fn endpoints_path(data_dir: &Path) -> PathBuf {
    data_dir.join("endpoints.json")
}

pub fn admin_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.key")
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the {what}"))
}

/// A started embedded platform: its services run until [`Running::stop`].
pub struct Running {
    pub platform: Platform,
    pub endpoints: Endpoints,
    /// The ids of the agents it runs.
    pub node_ids: Vec<String>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    failed: Arc<std::sync::Mutex<Option<String>>>,
}

type ServiceFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), capstan_types::Error>> + Send>>;

impl Running {
    /// Runs `future` beside the services; its failure stops them all.
    pub fn spawn(&self, name: &'static str, future: ServiceFuture) {
        let shutdown = self.shutdown.clone();
        let failed = self.failed.clone();
        self.tasks.spawn(async move {
            if let Err(e) = future.await {
                tracing::error!("{name} stopped: {e}; shutting down");
                failed
                    .lock()
                    .expect("failure lock poisoned")
                    .get_or_insert(format!("{name} failed: {e}"));
                shutdown.cancel();
            }
        });
    }

    /// Cancelled when the platform stops (or a service failed).
    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops every service and waits for them (at most a grace period);
    /// the first service failure, if any, is the error.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("services still busy after {SHUTDOWN_GRACE:?}; exiting anyway");
        }
        match self.failed.lock().expect("failure lock poisoned").take() {
            Some(failure) => bail!("{failure}"),
            None => Ok(()),
        }
    }
}

/// Starts every service of the embedded platform, and the agents of
/// `options`; it runs until the result is stopped.
pub async fn start(options: &DevOptions) -> Result<Running> {
    let data_dir = &options.data_dir;
    capstan_secrets::ensure_private_dir(data_dir)
        .with_context(|| format!("make data dir {} private (0700)", data_dir.display()))?;
    if let Ok(text) = std::fs::read_to_string(endpoints_path(data_dir))
        && let Ok(previous) = serde_json::from_str::<Endpoints>(&text)
        && previous.pid != std::process::id()
        && Path::new(&format!("/proc/{}", previous.pid)).exists()
        && std::fs::read_to_string(format!("/proc/{}/comm", previous.pid))
            .is_ok_and(|c| c.trim() == "capstan")
    {
        bail!(
            "another capstan dev (pid {}) is using {}; stop it first",
            previous.pid,
            data_dir.display()
        );
    }

    // Every URL is checked before any backend is dialled (and here, not by
    // clap, whose errors would show a password).
    capstan_events::parse_bus_url(&options.bus).map_err(|e| anyhow::anyhow!("--bus: {e}"))?;
    capstan_cache::parse_url(&options.cache).map_err(|e| anyhow::anyhow!("{e}"))?;
    let shutdown = CancellationToken::new();
    let store =
        capstan_server::standalone::open_store(options.store.as_deref(), data_dir, BACKEND_WAIT)
            .await
            .context("open the state store")?;
    let secrets: Arc<dyn SecretStore> = Arc::new(FileSecretStore::new(data_dir));
    let bus = capstan_server::standalone::open_bus(Some(&options.bus), BACKEND_WAIT).await?;
    let (registry, locks) =
        capstan_server::standalone::open_registry(&options.registry, &shutdown, BACKEND_WAIT)
            .await?;
    let cache_url = capstan_cache::redact(&options.cache);
    let cache = capstan_server::standalone::connect_backend(
        "the cache (--cache)",
        &cache_url,
        BACKEND_WAIT,
        || capstan_cache::connect(&options.cache),
    )
    .await?;

    let service_key = capstan_server::standalone::service_key(secrets.as_ref(), true).await?;
    let node_id = capstan_secrets::read_or_create_private_file(&data_dir.join("node-id"), || {
        capstan_server::new_id("node")
    })
    .context("read the node id")?;
    let platform =
        Platform::new(registry, bus, store, secrets, cache, service_key).with_locks(locks);
    capstan_auth::bootstrap_keys(&platform, data_dir).await?;

    let loopback = SocketAddr::new(options.grpc_host, 0);
    let auth_listener = bind(loopback, "auth service").await?;
    let scheduler_listener = bind(loopback, "scheduler").await?;
    let router_listener = bind(loopback, "router-config service").await?;
    let orchestrator_listener = bind(loopback, "orchestrator").await?;
    let metrics_service_listener = bind(loopback, "metrics service").await?;
    let mut agent_listeners = Vec::new();
    for _ in 0..options.agents {
        agent_listeners.push(bind(loopback, "agent").await?);
    }
    let proxy_listener = bind(
        options.http_addr,
        "edge proxy (use --http-addr to pick another)",
    )
    .await?;
    let provider_listener =
        bind(options.traefik_provider_addr, "Traefik provider endpoint").await?;
    let metrics_listener = bind(
        options.metrics_addr,
        "Prometheus metrics (use --metrics-addr to pick another)",
    )
    .await?;
    let gateway_listener = bind(
        options.gateway_addr,
        "HTTP gateway (use --gateway-addr to pick another)",
    )
    .await?;

    let endpoints = Endpoints {
        orchestrator: orchestrator_listener.local_addr()?.to_string(),
        scheduler: scheduler_listener.local_addr()?.to_string(),
        router_config: router_listener.local_addr()?.to_string(),
        auth: auth_listener.local_addr()?.to_string(),
        proxy: proxy_listener.local_addr()?.to_string(),
        traefik_provider: provider_listener.local_addr()?.to_string(),
        metrics: metrics_listener.local_addr()?.to_string(),
        metrics_service: metrics_service_listener.local_addr()?.to_string(),
        gateway: gateway_listener.local_addr()?.to_string(),
        pid: std::process::id(),
    };

    let running = Running {
        platform: platform.clone(),
        endpoints,
        node_ids: Vec::new(),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
        failed: Arc::default(),
    };
    let spawn = |name, future| running.spawn(name, future);
    running.tasks.spawn(capstan_server::metrics::serve(
        metrics_listener,
        shutdown.clone(),
    ));
    spawn(
        "auth",
        Box::pin(capstan_auth::run(
            platform.clone(),
            options.token_ttl,
            auth_listener,
            shutdown.clone(),
        )),
    );
    spawn(
        "scheduler",
        Box::pin(capstan_scheduler::run(
            platform.clone(),
            capstan_scheduler::SchedulerConfig {
                default_strategy: options.default_strategy,
                lease_ttl: LEASE_TTL,
            },
            scheduler_listener,
            shutdown.clone(),
        )),
    );
    spawn(
        "orchestrator",
        Box::pin(capstan_orchestrator::run(
            platform.clone(),
            capstan_orchestrator::OrchestratorOptions {
                lease_ttl: LEASE_TTL,
                autoscale_every: options.sample_every,
            },
            orchestrator_listener,
            shutdown.clone(),
        )),
    );
    spawn(
        "gateway",
        Box::pin(capstan_gateway::run(
            // Its callers' tokens only: never the service key.
            platform.with_api_key(capstan_secrets::Secret::new("")),
            capstan_gateway::GatewayOptions {
                requests_per_second: options.api_rate,
                // The same proxies the edge proxy believes (--trusted-proxy).
                trusted_proxies: options.trusted_proxies.clone(),
            },
            gateway_listener,
            shutdown.clone(),
        )),
    );
    spawn(
        "metrics",
        Box::pin(capstan_metrics::run(
            platform.clone(),
            Arc::new(capstan_metrics::RingStore::default()),
            metrics_service_listener,
            shutdown.clone(),
        )),
    );
    spawn(
        "router-config",
        Box::pin(capstan_router_config::run(
            platform.clone(),
            capstan_router_config::RouterOptions {
                proxy: Some(proxy_listener),
                provider: Some(provider_listener),
                traefik_apis: options.traefik.apis(),
                traefik_confirm_timeout: options.traefik.traefik_confirm_timeout,
                traefik_in_flight_grace: options.traefik.traefik_in_flight_grace,
                traffic_every: options.sample_every,
                limits: capstan_router_config::HttpLimits {
                    wake_queue: options.wake_queue,
                    wake_timeout: options.wake_timeout,
                    ..Default::default()
                },
                ..capstan_router_config::RouterOptions::new(options.trusted_proxies.clone())
            },
            router_listener,
            shutdown.clone(),
        )),
    );
    let cgroups = capstan_agent::cgroups(&options.cgroup_root)
        .map_err(|reason| anyhow::anyhow!("--cgroup-root: {reason}"))?;
    let agents = agent_configs(options, &node_id, cgroups);
    let node_ids: Vec<String> = agents.iter().map(|a| a.node_id.clone()).collect();
    for (agent, listener) in agents.into_iter().zip(agent_listeners) {
        // Each agent calls with its own node key: it may act only as itself.
        let node = capstan_types::NodeId::parse("node_id", &agent.node_id)?;
        let node_platform = platform.with_api_key(capstan_auth::node_key(&platform, &node).await?);
        spawn(
            "agent",
            Box::pin(capstan_agent::run(
                node_platform,
                agent,
                listener,
                shutdown.clone(),
            )),
        );
    }

    capstan_secrets::write_private_file(
        &endpoints_path(data_dir),
        serde_json::to_string_pretty(&running.endpoints)?.as_bytes(),
    )?;
    Ok(Running {
        node_ids,
        ..running
    })
}

pub async fn run(options: DevOptions) -> Result<()> {
    let running = start(&options).await?;
    let (data_dir, endpoints, node_ids) =
        (&options.data_dir, &running.endpoints, &running.node_ids);
    match node_ids.len() {
        0 => println!(
            "Capstan is running (embedded mode, control plane only: agents join with --peer scheduler={} --peer auth={}).",
            endpoints.scheduler, endpoints.auth
        ),
        1 => println!("Capstan is running (embedded mode, node {}).", node_ids[0]),
        _ => println!(
            "Capstan is running (embedded mode, nodes {}).",
            node_ids.join(", ")
        ),
    }
    println!(
        "  apps:     http://{}  (route by Host header)",
        endpoints.proxy
    );
    println!(
        "  API:      {} (gRPC; the CLI finds it in {})",
        endpoints.orchestrator,
        data_dir.display()
    );
    println!(
        "  API key:  {} (admin, mode 0600; the CLI reads it from there)",
        admin_key_path(data_dir).display()
    );
    println!(
        "  Traefik:  http://{}/traefik (HTTP provider; bearer token in secrets.json)",
        endpoints.traefik_provider
    );
    println!(
        "  metrics:  http://{}/metrics (Prometheus)",
        endpoints.metrics
    );
    println!(
        "Deploy the example:  capstan app deploy -f examples/hello.toml --data-dir {}",
        data_dir.display()
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = running.shutdown();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = terminate.recv() => tracing::info!("terminated; shutting down"),
        _ = shutdown.cancelled() => {}
    }
    let stopped = running.stop().await;
    let _ = std::fs::remove_file(endpoints_path(data_dir));
    stopped?;
    println!(
        "Capstan stopped. Running instances keep running and are re-adopted on the next `capstan dev`."
    );
    Ok(())
}
