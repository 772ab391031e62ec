//! `capstan-scale-bench`: the control plane at scale.
//!
//! For each node count it starts the real services of `capstan dev`
//! (gRPC servers, SQLite store, in-memory bus, embedded registry: the
//! `capstan::dev` library) and that many simulated nodes: real agents
//! (`capstan_agent::run_with_driver`) over the `capstan-sim` driver, which
//! starts no program and answers on each instance's port after a delay. It
//! deploys apps totalling `--instances` through the orchestrator's gRPC API
//! and prints one JSON document:
//!
//! - instances placed per second and placed-and-running per second;
//! - p50/p99 per app from `ApplyApp` to all its instances running;
//! - CPU seconds of the control plane's threads and of the simulated
//!   nodes', and the process's RSS (both run in this process: the RSS is
//!   an upper bound of the control plane's);
//! - the store's size on disk;
//! - route propagation: from an instance turning healthy to the routing
//!   table the edge proxy and Traefik read holding it, over
//!   `--route-instances` instances deployed at once (`burst`) and as many
//!   added one at a time (`paced`).
//!
//! The control plane runs on its own runtime (threads `capstan-cp`), the
//! nodes on another (`capstan-sim`), so each one's CPU is read per thread
//! from /proc. Timestamps of `instance.*` events come from the agents'
//! clock, which is this process's.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capstan_authn::{Authed, TokenSource};
use capstan_proto::v1::orchestrator_client::OrchestratorClient;
use capstan_proto::v1::router_config_client::RouterConfigClient;
use capstan_proto::v1::scheduler_client::SchedulerClient;
use capstan_proto::v1::{
    ApplyAppRequest, GetAppRequest, GetRoutesRequest, ListNodesRequest, NodeStatus,
    WatchEventsRequest,
};
use capstan_secrets::Secret;
use capstan_types::spec::SpecFormat;
use capstan_types::{AppSpec, NodeId, Resources};
use clap::Parser;
use serde_json::json;
use tokio_stream::StreamExt;

/// Deploys apps onto simulated nodes through the real control plane; prints JSON.
#[derive(Parser)]
#[command(name = "capstan-scale-bench")]
struct Args {
    /// Node counts, one run each (comma-separated).
    #[arg(long, default_value = "500,5000", value_delimiter = ',')]
    nodes: Vec<u32>,
    /// Instances deployed in each run.
    #[arg(long, default_value_t = 100_000)]
    instances: u32,
    /// Replicas per app (at most 1000, the spec's limit).
    #[arg(long, default_value_t = 1000)]
    per_app: u32,
    /// How long a simulated instance takes to answer after it is started.
    #[arg(long, default_value_t = 20)]
    start_delay_ms: u64,
    /// Instances of each app whose route propagation is measured, deployed
    /// at once and added one at a time (0: skip).
    #[arg(long, default_value_t = 200)]
    route_instances: u32,
    /// How long a deploy may take before the run fails.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
}

/// Each simulated node's capacity; instances ask for [`INSTANCE`].
const NODE: Resources = Resources {
    cpu_millis: 8000,
    memory_mb: 16384,
};
const INSTANCE_CPU_MILLIS: u32 = 10;
const INSTANCE_MEMORY_MB: u32 = 16;
/// How often simulated nodes sample usage: scheduling is what is measured.
const SAMPLE_EVERY: Duration = Duration::from_secs(60);
/// Health checks of the deployed apps, after they first pass.
const HEALTH_INTERVAL: &str = "60s";

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let _telemetry = capstan_telemetry::init("capstan-scale-bench", "warn");
    if args.per_app == 0 || args.per_app > capstan_types::spec::MAX_REPLICAS {
        bail!("--per-app: must be between 1 and 1000");
    }
    let most_nodes = args.nodes.iter().copied().max().unwrap_or(0);
    if most_nodes == 0 || most_nodes > 60_000 {
        bail!("--nodes: each count must be between 1 and 60000");
    }
    // Placement would fall short and the run would wait for its timeout.
    let fewest_nodes = args.nodes.iter().copied().min().unwrap_or(0);
    let per_node = (NODE.cpu_millis / INSTANCE_CPU_MILLIS).min(NODE.memory_mb / INSTANCE_MEMORY_MB);
    let wanted = u64::from(args.instances) + 2 * u64::from(args.route_instances);
    if wanted > u64::from(fewest_nodes) * u64::from(per_node) {
        bail!(
            "--nodes: {fewest_nodes} nodes hold {} instances ({per_node} each), fewer than the {wanted} asked (--instances and twice --route-instances)",
            u64::from(fewest_nodes) * u64::from(per_node)
        );
    }
    let descriptors = raise_open_files(wanted + u64::from(most_nodes) * 3 + 1_000)?;
    let control = runtime("capstan-cp")?;
    let nodes = runtime("capstan-sim")?;
    let mut runs = Vec::new();
    for &count in &args.nodes {
        runs.push(run(&control, &nodes, count, &args)?);
    }
    let report = json!({
        "bench": "capstan-scale-bench",
        "driver": capstan_sim::NAME,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "open_files_limit": descriptors,
        "instances": args.instances,
        "per_app": args.per_app,
        "start_delay_ms": args.start_delay_ms,
        "runs": runs,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    control.shutdown_timeout(Duration::from_secs(5));
    nodes.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}

fn runtime(name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()?)
}

/// Raises RLIMIT_NOFILE to `wanted` (every simulated instance holds a
/// listening socket); the limit in force.
fn raise_open_files(wanted: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= wanted {
        return Ok(soft);
    }
    let raised = setrlimit(Resource::RLIMIT_NOFILE, wanted.max(hard), wanted.max(hard))
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard, hard));
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < wanted {
        bail!(
            "this run needs about {wanted} open files (a listening socket per simulated instance, a listener and connections per node); the limit is {soft} and raising it failed ({raised:?}): raise `ulimit -n` (root with CAP_SYS_RESOURCE can), or deploy fewer instances"
        );
    }
    Ok(soft)
}

/// CPU seconds of this process's threads, by name prefix.
fn thread_cpu() -> HashMap<&'static str, f64> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut by_group: HashMap<&'static str, f64> = HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_group;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // utime and stime are fields 14 and 15 of stat(5); 3 is fields[0].
        let used = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        let (Some(user), Some(system)) = (used(11), used(12)) else {
            continue;
        };
        let group = if name.starts_with("capstan-cp") {
            "control_plane"
        } else if name.starts_with("capstan-sim") {
            "simulated_nodes"
        } else {
            "other"
        };
        *by_group.entry(group).or_default() += (user + system) / ticks;
    }
    by_group
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn store_bytes(dir: &Path) -> u64 {
    ["state.db", "state.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// Node `i` serves its instances on its own loopback address, as each
/// real node has its own: 100,000 instances do not fit one address's ports.
fn node_ip(i: u32) -> IpAddr {
    let i = i + 1;
    IpAddr::V4(Ipv4Addr::new(
        127,
        1 + (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8,
    ))
}

fn spec(name: &str, replicas: u32) -> anyhow::Result<AppSpec> {
    let text = format!(
        "name = \"{name}\"\nreplicas = {replicas}\n[run]\ncommand = [\"serve\"]\n[[ports]]\nname = \"http\"\n[resources]\ncpu_millis = {INSTANCE_CPU_MILLIS}\nmemory_mb = {INSTANCE_MEMORY_MB}\n[health]\ninterval = \"{HEALTH_INTERVAL}\"\ntimeout = \"1s\"\n[route]\nhosts = [\"{name}.scale.localhost\"]\n"
    );
    Ok(AppSpec::parse(&text, SpecFormat::Toml)?)
}

/// Per app: which of its instances were scheduled and when each was
/// first healthy (events are at-least-once: repeats are ignored). An app
/// counts as placed when its last `instance.scheduled` arrives (the
/// event's own time is its reconcile pass's start), and as healthy at the
/// time its agent stamped on the last `instance.healthy`.
#[derive(Default)]
struct Seen {
    scheduled: HashSet<String>,
    healthy: HashMap<String, i64>,
    all_scheduled_ms: Option<i64>,
    all_healthy_ms: Option<i64>,
}

fn now_ms() -> i64 {
    capstan_server::now_ms()
}

struct Clients {
    orchestrator: OrchestratorClient<Authed>,
    scheduler: SchedulerClient<Authed>,
    router: RouterConfigClient<Authed>,
}

fn clients(data_dir: &Path, endpoints: &capstan::dev::Endpoints) -> anyhow::Result<Clients> {
    let api_key = std::fs::read_to_string(capstan::dev::admin_key_path(data_dir))?
        .trim()
        .to_string();
    let tokens = TokenSource::new(
        Secret::new(api_key),
        capstan_server::channel_to(&endpoints.auth)?,
    );
    Ok(Clients {
        orchestrator: OrchestratorClient::new(Authed::new(
            capstan_server::channel_to(&endpoints.orchestrator)?,
            tokens.clone(),
        ))
        .max_decoding_message_size(256 << 20),
        scheduler: SchedulerClient::new(Authed::new(
            capstan_server::channel_to(&endpoints.scheduler)?,
            tokens.clone(),
        ))
        .max_decoding_message_size(256 << 20),
        router: RouterConfigClient::new(Authed::new(
            capstan_server::channel_to(&endpoints.router_config)?,
            tokens,
        ))
        .max_decoding_message_size(256 << 20),
    })
}

fn run(
    control: &tokio::runtime::Runtime,
    nodes: &tokio::runtime::Runtime,
    count: u32,
    args: &Args,
) -> anyhow::Result<serde_json::Value> {
    let data = tempfile::tempdir()?;
    // The simulated nodes' state dirs: each real node has its own disk, so
    // here they share tmpfs rather than fsync one disk 100,000 times.
    let node_dirs = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir())?;
    let unspecified = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let options = capstan::dev::DevOptions {
        data_dir: data.path().to_path_buf(),
        http_addr: unspecified,
        bus: "memory".into(),
        traefik_provider_addr: unspecified,
        docker: false,
        cpu_millis: NODE.cpu_millis,
        memory_mb: NODE.memory_mb,
        agents: 0,
        grpc_host: Ipv4Addr::LOCALHOST.into(),
        default_strategy: capstan_placement::Strategy::Spread,
        trusted_proxies: capstan_router_config::TrustedProxies::parse(&[])
            .map_err(anyhow::Error::msg)?,
        token_ttl: Duration::from_secs(3600),
        cache: "memory".into(),
        registry: "embedded".into(),
        store: None,
        traefik: capstan_router_config::ack::TraefikArgs {
            traefik_api: Vec::new(),
            traefik_confirm_timeout: Duration::from_secs(30),
            traefik_in_flight_grace: Duration::from_secs(1),
        },
        metrics_addr: unspecified,
        gateway_addr: unspecified,
        api_rate: 1_000_000,
        sample_every: SAMPLE_EVERY,
        wake_queue: 64,
        wake_timeout: Duration::from_secs(30),
        cgroup_root: capstan_runtime::cgroup::CgroupMode::Off,
    };
    let running = control
        .block_on(capstan::dev::start(&options))
        .context("start the control plane")?;
    let platform = running.platform.clone();
    let endpoints = running.endpoints.clone();

    // The bench's own token first: the agents, all on this host's one
    // address, share auth's per-address limit while they join.
    let mut clients = nodes.block_on(async {
        let mut clients = clients(data.path(), &endpoints)?;
        clients.scheduler.list_nodes(ListNodesRequest {}).await?;
        anyhow::Ok(clients)
    })?;
    let setup = Instant::now();
    let mut keys = Vec::new();
    for i in 0..count {
        let node = NodeId::parse("node_id", &format!("sim-{i:05}"))?;
        let key = control.block_on(capstan_auth::node_key(&platform, &node))?;
        keys.push((node, key));
    }
    let delay = Duration::from_millis(args.start_delay_ms);
    {
        let _context = nodes.enter();
        for (i, (node, key)) in keys.into_iter().enumerate() {
            // The agent on its node's address: the control plane routes
            // only to instances on the IP their node registered with.
            let listener = nodes.block_on(tokio::net::TcpListener::bind((node_ip(i as u32), 0)))?;
            let state_dir = node_dirs.path().join(node.as_str());
            let config = capstan_agent::AgentConfig {
                node_id: node.to_string(),
                work_root: state_dir.join("work"),
                state_dir,
                capacity: NODE,
                labels: [("zone".to_string(), format!("zone-{}", i % 3))].into(),
                docker: false,
                run_as: capstan_agent::DEFAULT_RUN_AS.to_string(),
                advertise_ip: node_ip(i as u32),
                sample_every: SAMPLE_EVERY,
                cgroups: None,
                log_writer: None,
            };
            running.spawn(
                "simulated agent",
                Box::pin(capstan_agent::run_with_driver(
                    platform.with_api_key(key),
                    config,
                    Arc::new(capstan_sim::SimDriver::new(delay)),
                    listener,
                    running.shutdown(),
                )),
            );
        }
    }
    let timeout = Duration::from_secs(args.timeout_secs);
    let measured = nodes.block_on(async {
        let deadline = Instant::now() + timeout;
        loop {
            let listed = clients
                .scheduler
                .list_nodes(ListNodesRequest {})
                .await?
                .into_inner()
                .nodes;
            let ready = listed
                .iter()
                .filter(|n| n.status == NodeStatus::Ready as i32)
                .count();
            if ready == count as usize {
                break;
            }
            if Instant::now() > deadline {
                bail!("{ready} of {count} simulated nodes registered in {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let setup_s = setup.elapsed().as_secs_f64();
        let deployed = deploy(&mut clients, data.path(), args, deadline).await?;
        let routes = if args.route_instances > 0 {
            Some(route_propagation(&mut clients, args, deadline).await?)
        } else {
            None
        };
        anyhow::Ok((setup_s, deployed, routes))
    });
    let stopped = control.block_on(running.stop());
    let (setup_s, deployed, routes) = measured?;
    stopped?;
    Ok(json!({
        "nodes": count,
        "setup_seconds": round(setup_s, 2),
        "deploy": deployed,
        "route_propagation": routes,
    }))
}

/// Applies the apps back to back, then waits until every instance is
/// healthy; the figures of the deploy.
async fn deploy(
    clients: &mut Clients,
    data_dir: &Path,
    args: &Args,
    deadline: Instant,
) -> anyhow::Result<serde_json::Value> {
    let apps: Vec<(String, u32)> = (0..args.instances.div_ceil(args.per_app))
        .map(|k| {
            let replicas = args.per_app.min(args.instances - k * args.per_app);
            (format!("scale-{k:04}"), replicas)
        })
        .collect();
    let wanted: HashMap<String, u32> = apps.iter().cloned().collect();
    let mut events = clients
        .orchestrator
        .watch_events(WatchEventsRequest {
            app: String::new(),
            history: 0,
        })
        .await?
        .into_inner();
    let cpu_before = thread_cpu();
    let started = Instant::now();
    let started_ms = now_ms();
    let mut applied_ms: HashMap<String, i64> = HashMap::new();
    for (name, replicas) in &apps {
        clients
            .orchestrator
            .apply_app(ApplyAppRequest {
                spec: Some(capstan_proto::spec_to_wire(&spec(name, *replicas)?)),
            })
            .await
            .with_context(|| format!("apply {name}"))?;
        applied_ms.insert(name.clone(), now_ms());
    }
    let applied_s = started.elapsed().as_secs_f64();
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut peak_rss_kib = status_kib("VmRSS:");
    let mut peak_files = open_files();
    // Per app, once its events say all healthy: polls GetApp until the
    // store agrees (the truth, and what a user sees); when it did.
    let mut confirming = tokio::task::JoinSet::new();
    let mut events_done = 0usize;
    let mut events_lost = false;
    while events_done < apps.len() {
        let wait = deadline.saturating_duration_since(Instant::now());
        let event = match tokio::time::timeout(wait.min(Duration::from_secs(10)), events.next())
            .await
        {
            Ok(Some(Ok(event))) => event,
            // The stream fell more than its buffer behind: the events are
            // no longer a complete count, so what is left is read from the
            // store (`GetApp`), the truth, and the event-timed figures are
            // left out.
            Ok(Some(Err(status))) if status.code() == tonic::Code::DataLoss => {
                eprintln!(
                    "scale-bench: {}; the apps not yet healthy are polled with GetApp",
                    status.message()
                );
                events_lost = true;
                for (name, replicas) in &apps {
                    if seen.get(name).is_none_or(|s| s.all_healthy_ms.is_none()) {
                        confirming.spawn(confirm(
                            clients.orchestrator.clone(),
                            name.clone(),
                            *replicas,
                            deadline,
                        ));
                    }
                }
                break;
            }
            Ok(Some(Err(status))) => return Err(status.into()),
            Ok(None) => bail!("the event stream ended"),
            Err(_) => {
                if Instant::now() >= deadline {
                    bail!(
                        "{events_done} of {} apps fully healthy after {:?}",
                        apps.len(),
                        started.elapsed()
                    );
                }
                eprintln!(
                    "scale-bench: {events_done} of {} apps fully healthy after {:.0?}",
                    apps.len(),
                    started.elapsed()
                );
                // What the store says of the apps still short.
                for (name, replicas) in &apps {
                    if seen.get(name).is_some_and(|s| s.all_healthy_ms.is_some()) {
                        continue;
                    }
                    let status = clients
                        .orchestrator
                        .get_app(GetAppRequest { name: name.clone() })
                        .await?
                        .into_inner();
                    let mut states: HashMap<String, usize> = HashMap::new();
                    for i in &status.instances {
                        *states
                            .entry(format!("{}:{}", i.state, i.message))
                            .or_default() += 1;
                    }
                    eprintln!(
                        "scale-bench: {name}: {} of {replicas} healthy in the store; {} placement error {:?}; states {states:?}",
                        status.healthy,
                        status.instances.len(),
                        status.placement_error
                    );
                    // The store is the truth: an app healthy there whose
                    // events did not all come is done, without event times.
                    if status.healthy >= *replicas {
                        events_lost = true;
                        seen.entry(name.clone()).or_default().all_healthy_ms = Some(now_ms());
                        events_done += 1;
                        confirming.spawn(confirm(
                            clients.orchestrator.clone(),
                            name.clone(),
                            *replicas,
                            deadline,
                        ));
                    }
                }
                continue;
            }
        };
        let Some(replicas) = wanted.get(&event.app) else {
            continue;
        };
        let app = seen.entry(event.app.clone()).or_default();
        match event.kind.as_str() {
            "instance.scheduled" => {
                app.scheduled.insert(event.instance_id.clone());
                if app.scheduled.len() == *replicas as usize && app.all_scheduled_ms.is_none() {
                    app.all_scheduled_ms = Some(now_ms());
                }
            }
            "instance.healthy" => {
                app.healthy
                    .entry(event.instance_id.clone())
                    .or_insert(event.time_ms);
                if app.healthy.len() == *replicas as usize && app.all_healthy_ms.is_none() {
                    app.all_healthy_ms = Some(event.time_ms);
                    events_done += 1;
                    peak_rss_kib = peak_rss_kib.max(status_kib("VmRSS:"));
                    peak_files = peak_files.max(open_files());
                    confirming.spawn(confirm(
                        clients.orchestrator.clone(),
                        event.app.clone(),
                        *replicas,
                        deadline,
                    ));
                }
            }
            _ => {}
        }
    }
    let mut running_ms: HashMap<String, i64> = HashMap::new();
    while let Some(confirmed) = confirming.join_next().await {
        let (name, at) = confirmed??;
        running_ms.insert(name, at);
    }
    let cpu_after = thread_cpu();
    let last_scheduled = seen.values().filter_map(|s| s.all_scheduled_ms).max();
    let last_healthy = seen.values().filter_map(|s| s.all_healthy_ms).max();
    let last_running = running_ms.values().copied().max();
    let elapsed = |until: Option<i64>| until.map(|t| ((t - started_ms) as f64 / 1000.0).max(1e-3));
    let per_second =
        |until: Option<i64>| elapsed(until).map(|s| round(f64::from(args.instances) / s, 0));
    let mut to_running: Vec<f64> = running_ms
        .iter()
        .filter_map(|(name, at)| Some((at - applied_ms.get(name)?) as f64))
        .collect();
    let cpu = |group: &str| {
        round(
            cpu_after.get(group).copied().unwrap_or(0.0)
                - cpu_before.get(group).copied().unwrap_or(0.0),
            2,
        )
    };
    let (last_scheduled, last_healthy) = if events_lost {
        (None, None)
    } else {
        (last_scheduled, last_healthy)
    };
    Ok(json!({
        "apps": apps.len(),
        "events_lost": events_lost,
        "apply_seconds": round(applied_s, 2),
        "placed_seconds": elapsed(last_scheduled).map(|s| round(s, 2)),
        "healthy_seconds": elapsed(last_healthy).map(|s| round(s, 2)),
        "running_seconds": elapsed(last_running).map(|s| round(s, 2)),
        "placed_per_second": per_second(last_scheduled),
        "healthy_per_second": per_second(last_healthy),
        "running_per_second": per_second(last_running),
        "app_deploy_to_all_running_ms": {
            "p50": round(percentile(&mut to_running, 50.0), 1),
            "p99": round(percentile(&mut to_running, 99.0), 1),
        },
        "cpu_seconds": {
            "control_plane": cpu("control_plane"),
            "simulated_nodes": cpu("simulated_nodes"),
            "other": cpu("other"),
        },
        "process_rss_mib": round(peak_rss_kib as f64 / 1024.0, 1),
        "process_peak_rss_mib": round(status_kib("VmHWM:") as f64 / 1024.0, 1),
        "open_files_peak": peak_files,
        "store_mib": round(store_bytes(data_dir) as f64 / (1024.0 * 1024.0), 1),
    }))
}

/// Polls `GetApp` until the store shows `replicas` healthy instances of
/// `name`; returns when.
async fn confirm(
    mut client: OrchestratorClient<Authed>,
    name: String,
    replicas: u32,
    deadline: Instant,
) -> anyhow::Result<(String, i64)> {
    loop {
        let status = client
            .get_app(GetAppRequest { name: name.clone() })
            .await?
            .into_inner();
        if status.healthy >= replicas {
            return Ok((name, now_ms()));
        }
        if Instant::now() >= deadline {
            bail!(
                "{name}: {} of {replicas} healthy in the store",
                status.healthy
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The addresses of `app`'s upstreams in the table the edge proxy routes
/// by (router-config's `GetRoutes`, that app's route only: a read costs
/// what it measures, not the whole table).
async fn published_servers(
    router: &mut RouterConfigClient<Authed>,
    app: &str,
) -> anyhow::Result<HashSet<String>> {
    let table = router
        .get_routes(GetRoutesRequest { app: app.into() })
        .await?
        .into_inner();
    Ok(table
        .routes
        .into_iter()
        .filter(|route| route.app == app)
        .flat_map(|route| route.upstreams)
        .map(|upstream| upstream.address)
        .collect())
}

/// Route propagation twice, over `--route-instances` instances each:
/// `burst`, one app of that many replicas deployed at once (each instance
/// waits behind the others' starts, probes and writes: a deploy's
/// throughput), and `paced`, one app scaled up one replica at a time, each
/// once the last is published (an instance alone: the latency of the path
/// itself).
async fn route_propagation(
    clients: &mut Clients,
    args: &Args,
    deadline: Instant,
) -> anyhow::Result<serde_json::Value> {
    let wanted = args.route_instances;

    let name = "route-burst";
    let healthy = healthy_times(clients, name).await?;
    apply(clients, name, wanted).await?;
    let mut published = Published::default();
    published
        .until(&mut clients.router, name, wanted, deadline)
        .await?;
    let burst = propagation(clients, name, healthy, &published).await?;

    let name = "route-paced";
    let healthy = healthy_times(clients, name).await?;
    let mut published = Published::default();
    for replicas in 1..=wanted {
        apply(clients, name, replicas).await?;
        published
            .until(&mut clients.router, name, replicas, deadline)
            .await?;
    }
    let paced = propagation(clients, name, healthy, &published).await?;
    Ok(json!({ "burst": burst, "paced": paced }))
}

async fn apply(clients: &mut Clients, name: &str, replicas: u32) -> anyhow::Result<()> {
    clients
        .orchestrator
        .apply_app(ApplyAppRequest {
            spec: Some(capstan_proto::spec_to_wire(&spec(name, replicas)?)),
        })
        .await?;
    Ok(())
}

/// Instance id -> first healthy (ms), from the agents' `instance.healthy`
/// events about `app`, collected until the task is aborted.
struct Healthy {
    times: Arc<std::sync::Mutex<HashMap<String, i64>>>,
    collector: tokio::task::JoinHandle<()>,
}

async fn healthy_times(clients: &mut Clients, app: &str) -> anyhow::Result<Healthy> {
    let mut events = clients
        .orchestrator
        .watch_events(WatchEventsRequest {
            app: app.into(),
            history: 0,
        })
        .await?
        .into_inner();
    let times = Arc::new(std::sync::Mutex::new(HashMap::<String, i64>::new()));
    let collector = {
        let times = times.clone();
        tokio::spawn(async move {
            while let Some(Ok(event)) = events.next().await {
                if event.kind == "instance.healthy" {
                    times
                        .lock()
                        .expect("healthy lock poisoned")
                        .entry(event.instance_id)
                        .or_insert(event.time_ms);
                }
            }
        })
    };
    Ok(Healthy { times, collector })
}

/// Server address -> first seen in the published table (ms).
#[derive(Default)]
struct Published {
    first_seen: HashMap<String, i64>,
    polls: u64,
}

impl Published {
    /// Reads the table every millisecond until it holds `wanted` servers
    /// of `app`.
    async fn until(
        &mut self,
        router: &mut RouterConfigClient<Authed>,
        app: &str,
        wanted: u32,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        loop {
            let servers = published_servers(router, app).await?;
            let at = now_ms();
            self.polls += 1;
            let count = servers.len();
            for server in servers {
                self.first_seen.entry(server).or_insert(at);
            }
            if count >= wanted as usize {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{count} of {wanted} {app} instances published");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Per instance of `app`: from its `instance.healthy` to its address in
/// the published table.
async fn propagation(
    clients: &mut Clients,
    app: &str,
    healthy: Healthy,
    published: &Published,
) -> anyhow::Result<serde_json::Value> {
    let status = clients
        .orchestrator
        .get_app(GetAppRequest { name: app.into() })
        .await?
        .into_inner();
    tokio::time::sleep(Duration::from_millis(200)).await;
    healthy.collector.abort();
    let times = healthy.times.lock().expect("healthy lock poisoned").clone();
    let mut delays: Vec<f64> = status
        .instances
        .iter()
        .filter_map(|i| Some((published.first_seen.get(&i.address)? - times.get(&i.id)?) as f64))
        .collect();
    let measured = delays.len();
    Ok(json!({
        "instances": measured,
        "table_polls": published.polls,
        "healthy_to_routed_ms": {
            "p50": round(percentile(&mut delays, 50.0), 1),
            "p99": round(percentile(&mut delays, 99.0), 1),
            "max": round(percentile(&mut delays, 100.0), 1),
        },
    }))
}
