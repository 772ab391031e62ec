//! Command-line parsing and the commands. Every command talks gRPC to the
//! services; the address and API key come from flags, the environment, or
//! the data dir of a running `capstan dev`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use capstan_authn::{Authed, TokenSource};
use capstan_proto::v1::auth_client::AuthClient;
use capstan_proto::v1::metrics_client::MetricsClient;
use capstan_proto::v1::orchestrator_client::OrchestratorClient;
use capstan_proto::v1::router_config_client::RouterConfigClient;
use capstan_proto::v1::scheduler_client::SchedulerClient;
use capstan_proto::v1::{
    Aggregate, AppStatus, ApplyAppRequest, CreateApiKeyRequest, DeleteAppRequest, DrainNodeRequest,
    GetAppHistoryRequest, GetAppRequest, InstanceUsage, ListApiKeysRequest, ListAppsRequest,
    ListEventsRequest, ListNodesRequest, NodeStatus, QueryRequest, RenderTraefikRequest,
    ResumeAutoscaleRequest, RevokeApiKeyRequest, RolloutState, RotateSigningKeyRequest,
    ScaleAppRequest, TopRequest, WatchEventsRequest,
};
use capstan_secrets::Secret;
use capstan_types::AppSpec;
use capstan_types::spec::SpecFormat;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::dev;

#[derive(Parser)]
#[command(
    name = "capstan",
    version,
    about = "Deploy, scale and route containerised apps across your nodes."
)]
#[command(
    after_help = "Examples:\n  capstan dev\n  capstan app deploy -f examples/hello.toml\n  capstan app status hello\n  curl -H 'Host: hello.localhost' http://127.0.0.1:8080/"
)]
pub struct Args {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

impl Args {
    pub fn is_dev(&self) -> bool {
        matches!(self.command, Command::Dev { .. })
    }
}

#[derive(clap::Args)]
struct Global {
    /// Data dir of `capstan dev`: its endpoints and admin API key are read from here.
    #[arg(long, global = true, env = "CAPSTAN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Orchestrator address (host:port); default: from the data dir.
    #[arg(long, global = true, env = "CAPSTAN_ADDR")]
    addr: Option<String>,
    /// API key; default: the data dir's admin.key.
    #[arg(long, global = true, env = "CAPSTAN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The CA of a cluster's TLS certificates (PEM); with --tls-cert and
    /// --tls-key, the CLI talks mutual TLS to the services.
    #[arg(long, global = true, env = "CAPSTAN_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), from the cluster's CA.
    #[arg(long, global = true, env = "CAPSTAN_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, global = true, env = "CAPSTAN_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

// Parsed once per run: the size of the biggest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the whole platform on this machine, in one process.
    #[command(after_help = "Example:\n  capstan dev --http-addr 127.0.0.1:8080")]
    Dev {
        /// Where the edge proxy listens for app traffic.
        #[arg(long, default_value = "127.0.0.1:8080", env = "CAPSTAN_HTTP_ADDR")]
        http_addr: SocketAddr,
        /// Where events go: `memory` (default) or RabbitMQ,
        /// amqp://user:pass@host:port/vhost, e.g. amqp://guest:guest@127.0.0.1:5672/%2f.
        /// `--amqp-url` and CAPSTAN_AMQP_URL are aliases.
        #[arg(
            long = "bus",
            visible_alias = "amqp-url",
            env = "CAPSTAN_BUS",
            hide_env_values = true
        )]
        bus: Option<String>,
        /// Where Traefik's HTTP provider fetches /traefik.
        #[arg(long, default_value = "127.0.0.1:0")]
        traefik_provider_addr: SocketAddr,
        /// Do not connect to Docker; image apps then fail to start.
        #[arg(long)]
        no_docker: bool,
        /// CPU this node offers, in millicores.
        #[arg(long, default_value_t = 4000)]
        cpu_millis: u32,
        /// Memory this node offers, in MB.
        #[arg(long, default_value_t = 8192)]
        memory_mb: u32,
        /// Run this many agents (nodes), with distinct ids, zones and
        /// capacities; 0 runs the control plane only, for `capstan-agent`s
        /// on other hosts to join.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=dev::MAX_AGENTS as i64))]
        agents: u32,
        /// The address the gRPC services listen on (ports are chosen and
        /// written to endpoints.json in the data dir): 127.0.0.1, or an
        /// address agents on other hosts reach, e.g. 10.0.0.5.
        #[arg(long, default_value = "127.0.0.1", value_parser = parse_grpc_host)]
        grpc_host: std::net::IpAddr,
        /// Placement strategy of apps that do not name one: binpack, spread, least-loaded or round-robin.
        #[arg(long, default_value = "spread", value_parser = parse_strategy)]
        default_strategy: capstan_placement::Strategy,
        /// A load balancer in front of the proxy whose X-Forwarded-* headers
        /// are believed: an IP or CIDR range (repeatable). Others' are replaced.
        #[arg(long = "trusted-proxy", value_parser = parse_trusted_proxy)]
        trusted_proxies: Vec<String>,
        /// How long the API tokens auth issues live (1s to 1h). Clients renew
        /// them by themselves; watch streams end with their token and resume.
        #[arg(long, default_value = "15m", value_parser = capstan_auth::parse_token_ttl)]
        token_ttl: std::time::Duration,
        /// Claims, rate limits and the token denylist: `memory` or
        /// `redis://HOST:PORT[/DB]`, e.g. redis://127.0.0.1:6379/0.
        #[arg(
            long,
            env = "CAPSTAN_CACHE",
            default_value = "memory",
            hide_env_values = true
        )]
        cache: String,
        /// Where state lives: `sqlite:PATH` (default: state.db in the data
        /// dir) or `scylla://HOST[:PORT][,HOST...]/KEYSPACE[?rf=N]`.
        #[arg(long, env = "CAPSTAN_STORE", value_parser = capstan_server::standalone::parse_store_url)]
        store: Option<String>,
        /// Where the services register and find each other: `embedded` or
        /// `consul://HOST:PORT` (ACL token from CONSUL_HTTP_TOKEN).
        #[arg(long, env = "CAPSTAN_REGISTRY", default_value = "embedded", value_parser = capstan_server::standalone::parse_registry_url)]
        registry: String,
        #[command(flatten)]
        traefik: capstan_router_config::ack::TraefikArgs,
        /// Where Prometheus scrapes every service's metrics (`/metrics`).
        #[arg(long, env = "CAPSTAN_METRICS_ADDR", default_value = "127.0.0.1:9464")]
        metrics_addr: SocketAddr,
        /// Where the HTTP gateway serves REST under /v1/ and /openapi.json.
        #[arg(long, env = "CAPSTAN_GATEWAY_ADDR", default_value = "127.0.0.1:8081")]
        gateway_addr: SocketAddr,
        /// The gateway's requests a second per API key or token (bursts of
        /// twice as many); past it, 429 with Retry-After.
        #[arg(long, env = "CAPSTAN_API_RATE", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        api_rate: u32,
        /// How often agents sample each instance's usage and the edge proxy
        /// reports its traffic to the metrics service (1s to 5m).
        #[arg(long, env = "CAPSTAN_SAMPLE_EVERY", default_value = "5s", value_parser = capstan_types::duration::parse_sample_every)]
        sample_every: Duration,
        /// Requests per app the edge proxy holds while an app scaled to
        /// zero starts (past it: 503 with Retry-After).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        wake_queue: u32,
        /// How long such a request waits for an instance (then: 503 with
        /// Retry-After).
        #[arg(long, default_value = "30s", value_parser = parse_wake_timeout)]
        wake_timeout: Duration,
        /// Where process apps' memory_mb and cpu_millis limits come from:
        /// `auto` (a cgroup v2 per instance when this process's cgroup is
        /// delegated to it, else rlimits and a memory watchdog), `off`, or
        /// the path of a cgroup v2 directory it owns.
        #[arg(long, env = "CAPSTAN_CGROUP_ROOT", default_value = "auto", value_parser = capstan_agent::parse_cgroup_root)]
        cgroup_root: capstan_runtime::cgroup::CgroupMode,
    },
    /// Check a service's gRPC health (grpc.health.v1); exit 0 when it is
    /// SERVING. For container health checks.
    #[command(
        after_help = "Examples:\n  capstan health 127.0.0.1:7001\n  capstan health orchestrator:7001 --tls-name orchestrator --tls-ca ca.pem --tls-cert c.pem --tls-key k.pem"
    )]
    Health {
        /// The service's gRPC address, host:port. Default: CAPSTAN_LISTEN
        /// (what the service in this container listens on), with a
        /// wildcard host read as loopback.
        addr: Option<String>,
        /// The service name to ask about; empty: the server as a whole.
        #[arg(long, default_value = "")]
        service: String,
        /// Give up after this long, e.g. 3s.
        #[arg(long, default_value = "3s", value_parser = capstan_types::duration::parse)]
        timeout: std::time::Duration,
        /// With --tls-*: the name the server's certificate carries (its
        /// service name, like `orchestrator`).
        #[arg(long)]
        tls_name: Option<String>,
    },
    /// Deploy and manage apps.
    #[command(subcommand)]
    App(AppCommand),
    /// Show platform events.
    #[command(after_help = "Examples:\n  capstan events\n  capstan events --follow --app hello")]
    Events {
        /// Keep streaming new events.
        #[arg(long, short)]
        follow: bool,
        /// Only this app's events.
        #[arg(long)]
        app: Option<String>,
        /// How many past events to show.
        #[arg(long, short = 'n', default_value_t = 50)]
        limit: u32,
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Show nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Show routing configuration.
    #[command(subcommand)]
    Route(RouteCommand),
    /// Manage API keys (admin).
    #[command(subcommand)]
    Key(KeyCommand),
    /// The audit log (admin): every change asked for and refused.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Projects: what apps and the keys of their people belong to.
    #[command(subcommand)]
    Project(ProjectCommand),
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Create a project (admin). Then give its people keys with
    /// `capstan key create --project NAME --role deployer|viewer`.
    #[command(
        after_help = "Example:\n  capstan project create team-a\n  capstan key create --name alice --project team-a --role deployer"
    )]
    Create {
        /// A DNS label: lowercase letters, digits and `-`.
        name: String,
    },
    /// List the projects this key may see (an admin sees every one).
    Ls {
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Records, oldest first: when, who (key and role), what, and how it ended.
    #[command(after_help = "Examples:\n  capstan audit ls\n  capstan audit ls --since 1h -o json")]
    Ls {
        /// Only records this recent (1s to 90d).
        #[arg(long, value_parser = capstan_types::duration::parse)]
        since: Option<Duration>,
        /// The last this many (1 to 10000).
        #[arg(long, short = 'n', default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        /// Only records about this project.
        #[arg(long)]
        project: Option<String>,
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Checks the hash chain: fails (exit 1) naming the first record that
    /// was changed or removed.
    Verify,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create an API key and print it once; only its digest is stored.
    #[command(
        after_help = "Roles: viewer (reads its project), deployer (deploys, scales, restarts, rolls back\nand deletes its project's apps), admin (everything, every project: keys, nodes, projects),\nnode (an agent joining as node NAME: pass the key to capstan-agent --node-key-file).\n\nExamples:\n  capstan key create --name ci --project team-a --role deployer\n  capstan key create --name node-7 --role node > node-7.key"
    )]
    Create {
        /// The key's name: who or what holds it (a node id for role node).
        #[arg(long)]
        name: String,
        /// viewer, deployer, admin or node.
        #[arg(long)]
        role: String,
        /// The project a viewer or deployer key is for (default: `default`).
        /// Admin and node keys are for every project.
        #[arg(long)]
        project: Option<String>,
    },
    /// List API keys: names, roles and creation times (never the keys).
    Ls {
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Make a new key sign API tokens from now on. Tokens signed with the
    /// old key keep working until they expire (at most an hour).
    RotateSigning,
    /// Revoke an API key by name. It stops working at once, and every
    /// service refuses the tokens issued for it within a second.
    #[command(after_help = "Example:\n  capstan key revoke ci")]
    Revoke {
        /// The key's name, as `capstan key ls` shows it.
        name: String,
    },
}

#[derive(Subcommand)]
enum AppCommand {
    /// Create or update an app from a spec file (.toml, .yaml or .yml).
    #[command(after_help = "Example:\n  capstan app deploy -f examples/hello.toml")]
    Deploy {
        #[arg(long, short)]
        file: PathBuf,
        /// Return once the spec is accepted, without waiting for the rollout.
        #[arg(long)]
        detach: bool,
        /// Give up waiting after this long (e.g. 90s, 5m).
        #[arg(long, default_value = "5m")]
        timeout: String,
    },
    /// List apps.
    Ls {
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Show an app, its rollout and its instances.
    Status {
        name: String,
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Why the platform did what it did to an app, newest first:
    /// placements, rollbacks, replacements, drains.
    #[command(after_help = "Example:\n  capstan app history hello -n 20")]
    History {
        name: String,
        /// How many entries (1 to 1000).
        #[arg(long, short = 'n', default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Live CPU, memory, requests per second and p95 latency per instance
    /// (refreshes every 2 s on a terminal; once with --once or -o json).
    #[command(after_help = "Example:\n  capstan app top\n  capstan app top hello --once")]
    Top {
        /// One app; default: every app.
        name: Option<String>,
        #[arg(long)]
        once: bool,
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// An app's metrics over a time range, as small charts in the terminal.
    #[command(after_help = "Example:\n  capstan app metrics hello --since 15m")]
    Metrics {
        name: String,
        /// How far back (10s to 90d).
        #[arg(long, default_value = "15m", value_parser = capstan_types::duration::parse)]
        since: Duration,
        /// One instance instead of the whole app.
        #[arg(long)]
        instance: Option<String>,
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Replace every instance with a fresh one of the same spec, as a
    /// rolling update under the app's [update] policy; waits for it.
    #[command(after_help = "Example:\n  capstan app restart hello")]
    Restart {
        name: String,
        /// Return once the restart is accepted.
        #[arg(long)]
        detach: bool,
        /// Give up waiting after this long (e.g. 90s, 5m).
        #[arg(long, default_value = "5m", value_parser = capstan_types::duration::parse)]
        timeout: Duration,
    },
    /// Return an app to an earlier template (run, resources, ports, env,
    /// health, placement), as a rolling update; scale and routes stay.
    #[command(
        after_help = "Examples:\n  capstan app rollback hello\n  capstan app rollback hello --to 3f9a0c1d2b4e5f60"
    )]
    Rollback {
        name: String,
        /// The template (see `capstan app status`); default: the one before.
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        detach: bool,
        /// Give up waiting after this long (e.g. 90s, 5m).
        #[arg(long, default_value = "5m", value_parser = capstan_types::duration::parse)]
        timeout: Duration,
    },
    /// What an app's instances printed (stdout and stderr), merged by time.
    #[command(
        after_help = "Examples:\n  capstan app logs hello\n  capstan app logs hello -f --since 10m\n  capstan app logs hello --instance hello-3f9a --tail 20"
    )]
    Logs {
        name: String,
        /// Keep printing new lines (until interrupted, or the key's token
        /// can no longer be renewed).
        #[arg(long, short)]
        follow: bool,
        /// One instance instead of all of them.
        #[arg(long)]
        instance: Option<String>,
        /// Only lines printed this recently (1s to 90d).
        #[arg(long, value_parser = capstan_types::duration::parse)]
        since: Option<Duration>,
        /// The last this many lines of each instance (1 to 10000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        tail: u32,
        /// text: time, instance and line; json: one object per line.
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// The autoscaler of an app with `[autoscale]`: `--resume` hands it the
    /// replica count again after a manual `app scale`.
    #[command(after_help = "Example:\n  capstan app autoscale hello --resume")]
    Autoscale {
        name: String,
        #[arg(long, required = true)]
        resume: bool,
    },
    /// Set the number of replicas (an autoscaled app: pauses its autoscaler
    /// until the next deploy or `app autoscale NAME --resume`).
    #[command(after_help = "Example:\n  capstan app scale hello 5")]
    Scale { name: String, replicas: u32 },
    /// Delete an app: take it out of rotation and stop its instances.
    Rm {
        name: String,
        /// Return without waiting for the instances to stop.
        #[arg(long)]
        detach: bool,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List nodes with their capacity, allocations, status and attributes.
    Ls {
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Stop placing on a node and move its instances elsewhere, one at a
    /// time: each replacement is healthy and routed before the old instance
    /// leaves rotation and stops.
    #[command(
        after_help = "Examples:\n  capstan node drain node-1a2b\n  capstan node drain node-1a2b --cancel"
    )]
    Drain {
        node: String,
        /// Make the node eligible again instead.
        #[arg(long)]
        cancel: bool,
        /// Return once the node is marked, without waiting for it to empty.
        #[arg(long)]
        detach: bool,
        /// Give up waiting after this long (like `5m` or `90s`).
        #[arg(long, default_value = "5m")]
        timeout: String,
    },
}

#[derive(Subcommand)]
enum RouteCommand {
    /// Print the routing table as a Traefik v3 dynamic configuration (JSON).
    Traefik,
}

fn default_data_dir() -> PathBuf {
    match std::env::var_os("XDG_DATA_HOME").or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share").into_os_string())
    }) {
        Some(base) => PathBuf::from(base).join("capstan"),
        None => PathBuf::from(".capstan"),
    }
}

/// Connections to the services, authenticated with one API key.
struct Api {
    endpoints: Option<dev::Endpoints>,
    orchestrator: String,
    tokens: Arc<TokenSource>,
    tls: Option<capstan_server::Tls>,
}

impl Api {
    fn connect(global: &Global) -> Result<Api> {
        let data_dir = global.data_dir.clone().unwrap_or_else(default_data_dir);
        let endpoints: Option<dev::Endpoints> =
            std::fs::read_to_string(dev::endpoints_path(&data_dir))
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok());
        let orchestrator = global
            .addr
            .clone()
            .or_else(|| endpoints.as_ref().map(|e| e.orchestrator.clone()))
            .ok_or_else(|| anyhow!("no Capstan API found: start `capstan dev`, or pass --addr / CAPSTAN_ADDR (data dir: {})", data_dir.display()))?;
        let api_key = match &global.api_key {
            Some(key) => key.clone(),
            None => std::fs::read_to_string(dev::admin_key_path(&data_dir))
                .map(|k| k.trim().to_string())
                .with_context(|| format!("no API key: pass --api-key / CAPSTAN_API_KEY, or run `capstan dev` (reads {})", dev::admin_key_path(&data_dir).display()))?,
        };
        let auth = endpoints
            .as_ref()
            .map(|e| e.auth.clone())
            .unwrap_or_else(|| orchestrator.clone());
        let auth = std::env::var("CAPSTAN_AUTH_ADDR").unwrap_or(auth);
        let tls = match (&global.tls_ca, &global.tls_cert, &global.tls_key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(capstan_server::Tls::load(ca, cert, key)?),
            _ => return Err(anyhow!("--tls-ca, --tls-cert and --tls-key go together")),
        };
        let tokens = TokenSource::new(
            Secret::new(api_key),
            capstan_server::channel_with(&auth, tls.as_ref().map(|t| (t, "auth")))?,
        );
        Ok(Api {
            endpoints,
            orchestrator,
            tokens,
            tls,
        })
    }

    /// `service` is the name the server's certificate must carry (TLS).
    fn channel(&self, address: &str, service: &str) -> Result<Authed> {
        Ok(Authed::new(
            capstan_server::channel_with(address, self.tls.as_ref().map(|t| (t, service)))?,
            self.tokens.clone(),
        ))
    }

    fn orchestrator(&self) -> Result<OrchestratorClient<Authed>> {
        Ok(OrchestratorClient::new(
            self.channel(&self.orchestrator, "orchestrator")?,
        ))
    }

    fn metrics(&self) -> Result<MetricsClient<Authed>> {
        let address = self.service_address("CAPSTAN_METRICS_SERVICE_ADDR", |e| {
            e.metrics_service.clone()
        })?;
        Ok(MetricsClient::new(self.channel(&address, "metrics")?))
    }

    fn service_address(
        &self,
        env: &str,
        pick: impl Fn(&dev::Endpoints) -> String,
    ) -> Result<String> {
        std::env::var(env)
            .ok()
            .or_else(|| self.endpoints.as_ref().map(pick))
            .ok_or_else(|| anyhow!("set {env}: no running `capstan dev` found to read it from"))
    }
}

/// The charts `app metrics` draws: label, metric, aggregate, divisor.
const METRIC_CHARTS: [(&str, &str, Aggregate, f64); 7] = [
    ("rps", "requests", Aggregate::Rate, 1.0),
    ("p95 ms", "latency_ms", Aggregate::P95, 1.0),
    ("5xx/s", "responses_5xx", Aggregate::Rate, 1.0),
    ("cpu %", "cpu_percent", Aggregate::Avg, 1.0),
    ("memory MiB", "memory_bytes", Aggregate::Avg, 1_048_576.0),
    // Image apps only: a process shares its node's network.
    ("net in KiB/s", "net_rx_bytes", Aggregate::Rate, 1024.0),
    ("net out KiB/s", "net_tx_bytes", Aggregate::Rate, 1024.0),
];

/// One line: a bar per step from `since` to `now` (blank where no
/// reading), then the latest and the highest value.
fn chart_line(points: &[(i64, f64)], since_ms: i64, step_ms: i64, now_ms: i64) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if points.is_empty() || step_ms <= 0 {
        return "no readings in this range".to_string();
    }
    let columns = ((now_ms - since_ms) / step_ms).clamp(1, 120) as usize;
    let max = points.iter().map(|(_, v)| *v).fold(0.0_f64, f64::max);
    let mut line = vec![' '; columns];
    for (at, value) in points {
        let column = ((at - since_ms) / step_ms).clamp(0, columns as i64 - 1) as usize;
        let level = if max > 0.0 {
            (value / max * 7.0).round() as usize
        } else {
            0
        };
        line[column] = BARS[level.min(7)];
    }
    let latest = points.last().map_or(0.0, |(_, v)| *v);
    format!(
        "{}  now {}  max {}",
        line.into_iter().collect::<String>(),
        number(latest),
        number(max)
    )
}

fn number(value: f64) -> String {
    if value >= 100.0 || value == value.trunc() {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn usage_json(u: &InstanceUsage) -> Value {
    json!({
        "app": u.app, "instance": u.instance_id, "node": u.node_id, "at_ms": u.at_ms,
        "cpu_percent": u.cpu_percent, "memory_bytes": u.memory_bytes, "rps": u.rps,
        "p95_ms": u.p95_ms, "restarts": u.restarts,
    })
}

fn print_top(instances: &[InstanceUsage]) {
    if instances.is_empty() {
        println!(
            "no readings in the last 30 s: no instance is running, or the agents have not sampled yet (every 5 s)"
        );
        return;
    }
    println!(
        "{:<16} {:<28} {:<14} {:>7} {:>10} {:>8} {:>8} {:>8}",
        "APP", "INSTANCE", "NODE", "CPU%", "MEMORY", "RPS", "P95 MS", "RESTARTS"
    );
    for u in instances {
        println!(
            "{:<16} {:<28} {:<14} {:>7.1} {:>10} {:>8.1} {:>8.1} {:>8}",
            u.app,
            u.instance_id,
            u.node_id,
            u.cpu_percent,
            format!("{:.1} MiB", u.memory_bytes as f64 / 1_048_576.0),
            u.rps,
            u.p95_ms,
            u.restarts
        );
    }
}

/// Turns a gRPC status into an error that reads well.
fn rpc(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unavailable => anyhow!(
            "cannot reach Capstan ({}); is `capstan dev` running?",
            status.message()
        ),
        tonic::Code::Unauthenticated => anyhow!("not authenticated: {}", status.message()),
        _ => anyhow!("{}", status.message()),
    }
}

fn parse_trusted_proxy(text: &str) -> Result<String, String> {
    capstan_router_config::TrustedProxies::parse(&[text.to_string()])?;
    Ok(text.to_string())
}

fn parse_wake_timeout(text: &str) -> Result<Duration, String> {
    capstan_types::duration::parse_within(
        text,
        Duration::from_secs(1)..=Duration::from_secs(300),
        "1s and 5m",
    )
}

fn parse_strategy(text: &str) -> Result<capstan_placement::Strategy, String> {
    capstan_placement::Strategy::parse(text)
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let global = args.global;
    match args.command {
        Command::Dev {
            http_addr,
            bus,
            traefik_provider_addr,
            no_docker,
            cpu_millis,
            memory_mb,
            agents,
            grpc_host,
            default_strategy,
            trusted_proxies,
            token_ttl,
            cache,
            registry,
            store,
            traefik,
            metrics_addr,
            gateway_addr,
            api_rate,
            sample_every,
            wake_queue,
            wake_timeout,
            cgroup_root,
        } => {
            let data_dir = global.data_dir.unwrap_or_else(default_data_dir);
            let trusted_proxies = capstan_router_config::TrustedProxies::parse(&trusted_proxies)
                .map_err(|e| anyhow!("--trusted-proxy: {e}"))?;
            dev::run(dev::DevOptions {
                data_dir,
                http_addr,
                bus: bus
                    .or_else(|| std::env::var("CAPSTAN_AMQP_URL").ok())
                    .filter(|url| !url.is_empty())
                    .unwrap_or_else(|| "memory".to_string()),
                traefik_provider_addr,
                docker: !no_docker,
                cpu_millis,
                memory_mb,
                agents,
                grpc_host,
                default_strategy,
                trusted_proxies,
                token_ttl,
                cache,
                registry,
                store,
                traefik,
                metrics_addr,
                gateway_addr,
                api_rate,
                sample_every,
                wake_queue: wake_queue as usize,
                wake_timeout,
                cgroup_root,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::App(command) => app(&global, command).await,
        Command::Health {
            addr,
            service,
            timeout,
            tls_name,
        } => {
            let addr = match addr {
                Some(addr) => addr,
                None => local_listen_address()?,
            };
            health(&global, &addr, service, timeout, tls_name).await
        }
        Command::Events {
            follow,
            app,
            limit,
            output,
        } => events(&global, follow, app.unwrap_or_default(), limit, output).await,
        Command::Node(NodeCommand::Ls { output }) => nodes(&global, output).await,
        Command::Node(NodeCommand::Drain {
            node,
            cancel,
            detach,
            timeout,
        }) => {
            let timeout =
                capstan_types::duration::parse(&timeout).map_err(|e| anyhow!("--timeout: {e}"))?;
            drain(&global, &node, !cancel, detach, timeout).await
        }
        Command::Key(KeyCommand::Create {
            name,
            role,
            project,
        }) => {
            let api = Api::connect(&global)?;
            let address = api.service_address("CAPSTAN_AUTH_ADDR", |e| e.auth.clone())?;
            let response = AuthClient::new(api.channel(&address, "auth")?)
                .create_api_key(CreateApiKeyRequest {
                    name,
                    role,
                    project: project.unwrap_or_default(),
                })
                .await
                .map_err(rpc)?;
            println!("{}", response.into_inner().api_key);
            Ok(ExitCode::SUCCESS)
        }
        Command::Key(KeyCommand::Ls { output }) => {
            let api = Api::connect(&global)?;
            let address = api.service_address("CAPSTAN_AUTH_ADDR", |e| e.auth.clone())?;
            let keys = AuthClient::new(api.channel(&address, "auth")?)
                .list_api_keys(ListApiKeysRequest {})
                .await
                .map_err(rpc)?
                .into_inner()
                .keys;
            if output == Output::Json {
                let list: Vec<Value> = keys
                    .iter()
                    .map(|k| json!({"name": k.name, "role": k.role, "project": k.project, "created_ms": k.created_ms}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<32} {:<9} {:<20} CREATED", "NAME", "ROLE", "PROJECT");
                for key in &keys {
                    let project = if key.project.is_empty() {
                        "*"
                    } else {
                        &key.project
                    };
                    println!(
                        "{:<32} {:<9} {:<20} {}",
                        key.name,
                        key.role,
                        project,
                        format_time(key.created_ms)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Project(command) => {
            let api = Api::connect(&global)?;
            let address = api.service_address("CAPSTAN_AUTH_ADDR", |e| e.auth.clone())?;
            let mut client = AuthClient::new(api.channel(&address, "auth")?);
            match command {
                ProjectCommand::Create { name } => {
                    let project = client
                        .create_project(capstan_proto::v1::CreateProjectRequest { name })
                        .await
                        .map_err(rpc)?
                        .into_inner();
                    println!("created project {}", project.name);
                }
                ProjectCommand::Ls { output } => {
                    let projects = client
                        .list_projects(capstan_proto::v1::ListProjectsRequest {})
                        .await
                        .map_err(rpc)?
                        .into_inner()
                        .projects;
                    if output == Output::Json {
                        let list: Vec<Value> = projects
                            .iter()
                            .map(|p| json!({"name": p.name, "created_ms": p.created_ms, "created_by": p.created_by}))
                            .collect();
                        println!("{}", serde_json::to_string_pretty(&list)?);
                    } else {
                        println!("{:<32} {:<20} CREATED", "NAME", "BY");
                        for p in &projects {
                            let created = if p.created_ms == 0 {
                                "(built in)".to_string()
                            } else {
                                format_time(p.created_ms)
                            };
                            println!("{:<32} {:<20} {}", p.name, p.created_by, created);
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(command) => {
            let api = Api::connect(&global)?;
            let address = api.service_address("CAPSTAN_AUTH_ADDR", |e| e.auth.clone())?;
            let mut client = AuthClient::new(api.channel(&address, "auth")?);
            match command {
                AuditCommand::Ls {
                    since,
                    limit,
                    project,
                    output,
                } => {
                    let since_ms = since_ms(since)?;
                    let records = client
                        .list_audit(capstan_proto::v1::ListAuditRequest {
                            since_ms,
                            limit,
                            project: project.unwrap_or_default(),
                        })
                        .await
                        .map_err(rpc)?
                        .into_inner()
                        .records;
                    if output == Output::Json {
                        let list: Vec<Value> = records
                            .iter()
                            .map(|r| {
                                json!({
                                    "seq": r.seq, "at": format_time(r.at_ms), "at_ms": r.at_ms,
                                    "actor": r.actor, "role": r.role, "method": r.method,
                                    "target": r.target, "summary": r.summary, "result": r.result,
                                    "project": r.project, "hash": r.hash,
                                })
                            })
                            .collect();
                        println!("{}", serde_json::to_string_pretty(&list)?);
                    } else if records.is_empty() {
                        println!("no changes recorded yet");
                    } else {
                        for r in &records {
                            let who = if r.role.is_empty() {
                                r.actor.clone()
                            } else {
                                format!("{} ({})", r.actor, r.role)
                            };
                            println!(
                                "{:>6}  {}  {:<22} {:<28} {:<14} {}{}",
                                r.seq,
                                format_time(r.at_ms),
                                who,
                                r.method,
                                r.target,
                                r.result,
                                if r.summary.is_empty() {
                                    String::new()
                                } else {
                                    format!(" — {}", r.summary)
                                }
                            );
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                AuditCommand::Verify => {
                    let verdict = client
                        .verify_audit(capstan_proto::v1::VerifyAuditRequest {})
                        .await
                        .map_err(rpc)?
                        .into_inner();
                    if verdict.intact {
                        println!("the audit log is intact: {} records", verdict.records);
                        Ok(ExitCode::SUCCESS)
                    } else {
                        eprintln!(
                            "error: the audit log was tampered with: {}",
                            verdict.problem
                        );
                        Ok(ExitCode::FAILURE)
                    }
                }
            }
        }
        Command::Key(KeyCommand::RotateSigning) => {
            let api = Api::connect(&global)?;
            let address = api.service_address("CAPSTAN_AUTH_ADDR", |e| e.auth.clone())?;
            let kid = AuthClient::new(api.channel(&address, "auth")?)
                .rotate_signing_key(RotateSigningKeyRequest {})
                .await
                .map_err(rpc)?
                .into_inner()
                .kid;
            println!(
                "key {kid} is published now and signs new tokens in about 10 s (once every service can verify it); tokens signed before stay valid until they expire"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Key(KeyCommand::Revoke { name }) => {
            let api = Api::connect(&global)?;
            let address = api.service_address("CAPSTAN_AUTH_ADDR", |e| e.auth.clone())?;
            let revoked = AuthClient::new(api.channel(&address, "auth")?)
                .revoke_api_key(RevokeApiKeyRequest { name: name.clone() })
                .await
                .map_err(rpc)?
                .into_inner()
                .revoked_tokens;
            println!("revoked API key `{name}` and {revoked} live tokens");
            Ok(ExitCode::SUCCESS)
        }
        Command::Route(RouteCommand::Traefik) => {
            let api = Api::connect(&global)?;
            let address =
                api.service_address("CAPSTAN_ROUTER_ADDR", |e| e.router_config.clone())?;
            let response = RouterConfigClient::new(api.channel(&address, "router-config")?)
                .render_traefik(RenderTraefikRequest {})
                .await
                .map_err(rpc)?;
            println!("{}", response.into_inner().json);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn app(global: &Global, command: AppCommand) -> Result<ExitCode> {
    match command {
        AppCommand::Deploy {
            file,
            detach,
            timeout,
        } => {
            let path = file.display().to_string();
            let timeout =
                capstan_types::duration::parse(&timeout).map_err(|e| anyhow!("--timeout: {e}"))?;
            let format = SpecFormat::from_path(&path).map_err(|e| anyhow!("{e}"))?;
            let text = std::fs::read_to_string(&file).with_context(|| format!("read {path}"))?;
            let spec = match AppSpec::parse(&text, format) {
                Ok(spec) => spec,
                Err(capstan_types::Error::Invalid(errors)) => {
                    eprintln!("error: {path} is not a valid app spec:");
                    for e in errors {
                        eprintln!("  {}: {}", e.field, e.reason);
                    }
                    return Ok(ExitCode::from(2));
                }
                Err(e) => return Err(anyhow!("{e}")),
            };
            let api = Api::connect(global)?;
            let mut client = api.orchestrator()?;
            // The root of the deploy's trace (with OTEL_EXPORTER_OTLP_ENDPOINT
            // set): the orchestrator, and the reconciler's placing and
            // starting of the rollout's instances, continue it.
            let span = tracing::info_span!("capstan app deploy", app = %spec.name);
            let response = tracing::Instrument::instrument(
                client.apply_app(ApplyAppRequest {
                    spec: Some(capstan_proto::spec_to_wire(&spec)),
                }),
                span,
            )
            .await
            .map_err(rpc)?
            .into_inner();
            let verb = if response.created {
                "created"
            } else if response.changed {
                "updated"
            } else {
                "unchanged"
            };
            let hash = response.app.map(|a| a.spec_hash).unwrap_or_default();
            println!("app {} {verb} (template {hash})", spec.name);
            if detach {
                return Ok(ExitCode::SUCCESS);
            }
            wait_for_rollout(&mut client, &spec.name, &hash, timeout).await
        }
        AppCommand::Ls { output } => {
            let api = Api::connect(global)?;
            let apps = api
                .orchestrator()?
                .list_apps(ListAppsRequest {})
                .await
                .map_err(rpc)?
                .into_inner()
                .apps;
            if output == Output::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&Value::Array(
                        apps.iter().map(app_json).collect()
                    ))?
                );
            } else {
                println!(
                    "{:<24} {:<16} {:>8} {:>8} {:<12} HOSTS",
                    "NAME", "PROJECT", "REPLICAS", "HEALTHY", "ROLLOUT"
                );
                for app in &apps {
                    let spec = app.spec.clone().unwrap_or_default();
                    let hosts = spec.route.map(|r| r.hosts.join(",")).unwrap_or_default();
                    println!(
                        "{:<24} {:<16} {:>8} {:>8} {:<12} {}",
                        spec.name,
                        spec.project,
                        spec.replicas,
                        app.healthy,
                        rollout_state(app),
                        hosts
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AppCommand::History {
            name,
            limit,
            output,
        } => {
            let api = Api::connect(global)?;
            let entries = api
                .orchestrator()?
                .get_app_history(GetAppHistoryRequest { app: name, limit })
                .await
                .map_err(rpc)?
                .into_inner()
                .entries;
            if output == Output::Json {
                let list: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        json!({
                            "id": e.id, "app": e.app, "at": format_time(e.at_ms),
                            "at_ms": e.at_ms, "kind": e.kind, "inputs": e.inputs,
                            "rule": e.rule, "result": e.result, "reason": e.reason,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if entries.is_empty() {
                println!("no decisions recorded for this app yet");
            } else {
                for e in &entries {
                    println!("{}  {:<11}  {}", format_time(e.at_ms), e.kind, e.reason);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AppCommand::Top { name, once, output } => {
            let api = Api::connect(global)?;
            let mut client = api.metrics()?;
            let live = !once
                && output == Output::Text
                && std::io::IsTerminal::is_terminal(&std::io::stdout());
            loop {
                let instances = client
                    .top(TopRequest {
                        app: name.clone().unwrap_or_default(),
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner()
                    .instances;
                if output == Output::Json {
                    let list: Vec<Value> = instances.iter().map(usage_json).collect();
                    println!("{}", serde_json::to_string_pretty(&list)?);
                    return Ok(ExitCode::SUCCESS);
                }
                if live {
                    // Clear the screen and go home.
                    print!("\x1b[2J\x1b[H");
                }
                print_top(&instances);
                if !live {
                    return Ok(ExitCode::SUCCESS);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
                }
            }
        }
        AppCommand::Restart {
            name,
            detach,
            timeout,
        } => {
            let api = Api::connect(global)?;
            let mut client = api.orchestrator()?;
            let app = client
                .restart_app(capstan_proto::v1::RestartAppRequest { name: name.clone() })
                .await
                .map_err(rpc)?
                .into_inner();
            let restarts = app.spec.as_ref().map_or(0, |s| s.restarts);
            println!(
                "app {name}: rolling restart {restarts} (template {})",
                app.spec_hash
            );
            follow_unless_detached(&mut client, &name, &app, detach, timeout).await
        }
        AppCommand::Rollback {
            name,
            to,
            detach,
            timeout,
        } => {
            let api = Api::connect(global)?;
            let mut client = api.orchestrator()?;
            let app = client
                .rollback_app(capstan_proto::v1::RollbackAppRequest {
                    name: name.clone(),
                    to_template: to.unwrap_or_default(),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            println!("app {name}: rolling back to template {}", app.spec_hash);
            follow_unless_detached(&mut client, &name, &app, detach, timeout).await
        }
        AppCommand::Logs {
            name,
            follow,
            instance,
            since,
            tail,
            output,
        } => {
            let since_ms = since_ms(since)?;
            let api = Api::connect(global)?;
            let mut stream = api
                .orchestrator()?
                .app_logs(capstan_proto::v1::AppLogsRequest {
                    app: name,
                    instance_id: instance.unwrap_or_default(),
                    tail,
                    since_ms,
                    follow,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            while let Some(line) = stream.message().await.map_err(rpc)? {
                let written = if output == Output::Json {
                    writeln!(
                        stdout,
                        "{}",
                        json!({
                            "app": line.app, "instance": line.instance_id,
                            "at": (line.at_ms > 0).then(|| format_time(line.at_ms)),
                            "at_ms": line.at_ms, "stream": line.stream, "text": line.text,
                        })
                    )
                } else {
                    let at = if line.at_ms > 0 {
                        format_time(line.at_ms)
                    } else {
                        "-".to_string()
                    };
                    writeln!(stdout, "{at}  {}  {}", line.instance_id, line.text)
                };
                // A closed pipe (`| head`) ends the command quietly.
                if written.and_then(|()| stdout.flush()).is_err() {
                    break;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AppCommand::Metrics {
            name,
            since,
            instance,
            output,
        } => {
            if !(Duration::from_secs(10)..=Duration::from_secs(90 * 86_400)).contains(&since) {
                return Err(anyhow!("--since: must be 10s to 90d"));
            }
            let api = Api::connect(global)?;
            let mut client = api.metrics()?;
            let now = capstan_server::now_ms();
            let since_ms = now - since.as_millis() as i64;
            let mut charts = Vec::new();
            for (label, metric, aggregate, scale) in METRIC_CHARTS {
                let response = client
                    .query(QueryRequest {
                        app: name.clone(),
                        instance_id: instance.clone().unwrap_or_default(),
                        metric: metric.to_string(),
                        aggregate: aggregate as i32,
                        since_ms,
                        until_ms: now,
                        step_ms: 0,
                        by_instance: false,
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                charts.push((label, metric, scale, response));
            }
            if output == Output::Json {
                let list: Vec<Value> = charts
                    .iter()
                    .map(|(label, metric, _, r)| {
                        let points: Vec<Value> = r
                            .series
                            .iter()
                            .flat_map(|s| &s.points)
                            .map(|p| json!({"at_ms": p.at_ms, "value": p.value}))
                            .collect();
                        json!({"chart": label, "metric": metric, "resolution": r.resolution,
                               "step_ms": r.step_ms, "points": points})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            let step = charts.first().map_or(0, |(_, _, _, r)| r.step_ms);
            let resolution = charts
                .first()
                .map_or("raw".to_string(), |(_, _, _, r)| r.resolution.clone());
            println!(
                "{name}{}  last {}  (one column per {}, from {} data)",
                instance.map(|i| format!(" / {i}")).unwrap_or_default(),
                capstan_types::duration::format(since),
                capstan_types::duration::format(Duration::from_millis(step)),
                resolution
            );
            for (label, _, scale, response) in &charts {
                let points: Vec<(i64, f64)> = response
                    .series
                    .iter()
                    .flat_map(|s| &s.points)
                    .map(|p| (p.at_ms, p.value / scale))
                    .collect();
                println!(
                    "  {label:<12} {}",
                    chart_line(&points, since_ms, response.step_ms as i64, now)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AppCommand::Autoscale { name, resume: _ } => {
            let api = Api::connect(global)?;
            let app = api
                .orchestrator()?
                .resume_autoscale(ResumeAutoscaleRequest { name: name.clone() })
                .await
                .map_err(rpc)?
                .into_inner();
            let replicas = app.spec.map_or(0, |s| s.replicas);
            println!("app {name}: autoscaling resumed (now {replicas} replicas)");
            Ok(ExitCode::SUCCESS)
        }
        AppCommand::Status { name, output } => {
            let api = Api::connect(global)?;
            let app = api
                .orchestrator()?
                .get_app(GetAppRequest { name })
                .await
                .map_err(rpc)?
                .into_inner();
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&app_json(&app))?);
            } else {
                print_status(&app);
            }
            Ok(ExitCode::SUCCESS)
        }
        AppCommand::Scale { name, replicas } => {
            let api = Api::connect(global)?;
            let app = api
                .orchestrator()?
                .scale_app(ScaleAppRequest {
                    name: name.clone(),
                    replicas,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            println!("app {name} scaled to {replicas} replicas");
            if app.autoscale_override.is_some() {
                println!(
                    "autoscaling is paused until the next deploy or `capstan app autoscale {name} --resume`"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AppCommand::Rm { name, detach } => {
            let api = Api::connect(global)?;
            let mut client = api.orchestrator()?;
            client
                .delete_app(DeleteAppRequest { name: name.clone() })
                .await
                .map_err(rpc)?;
            if !detach {
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    match client.get_app(GetAppRequest { name: name.clone() }).await {
                        Err(status) if status.code() == tonic::Code::NotFound => break,
                        Err(status) => return Err(rpc(status)),
                        Ok(_) if Instant::now() > deadline => {
                            return Err(anyhow!("app {name} is still being deleted after 120s"));
                        }
                        Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }
            println!("app {name} deleted");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn rollout_state(app: &AppStatus) -> &'static str {
    if app.deleting {
        return "deleting";
    }
    match app
        .rollout
        .as_ref()
        .and_then(|r| RolloutState::try_from(r.state).ok())
    {
        Some(RolloutState::InProgress) => "in_progress",
        Some(RolloutState::Completed) => "completed",
        Some(RolloutState::RolledBack) => "rolled_back",
        Some(RolloutState::Failed) => "failed",
        _ => "unknown",
    }
}

fn state_name(state: i32) -> &'static str {
    capstan_proto::state_from_wire(state).map_or("unknown", |s| s.as_str())
}

fn app_json(app: &AppStatus) -> Value {
    let spec = app.spec.clone().unwrap_or_default();
    let rollout = app.rollout.clone().unwrap_or_default();
    json!({
        "name": spec.name,
        "project": spec.project,
        "replicas": spec.replicas,
        "healthy": app.healthy,
        "spec_hash": app.spec_hash,
        "previous_templates": app.previous_templates,
        "deleting": app.deleting,
        "placement_error": app.placement_error,
        "hosts": spec.route.map(|r| r.hosts).unwrap_or_default(),
        "autoscale": spec.autoscale.as_ref().map(|a| json!({
            "min": a.min, "max": a.max,
            "paused_by": app.autoscale_override.as_ref().map(|o| o.by.clone()),
            "paused_at_ms": app.autoscale_override.as_ref().map(|o| o.at_ms),
        })),
        "rollout": {
            "state": rollout_state(app),
            "target_hash": rollout.target_hash,
            "message": rollout.message,
            "updated": rollout.updated,
            "desired": rollout.desired,
        },
        "instances": app.instances.iter().map(|i| json!({
            "id": i.id,
            "node": i.node_id,
            "state": state_name(i.state),
            "address": i.address,
            "routable": i.routable,
            "spec_hash": i.spec_hash,
            "message": i.message,
        })).collect::<Vec<_>>(),
    })
}

fn print_status(app: &AppStatus) {
    let spec = app.spec.clone().unwrap_or_default();
    let rollout = app.rollout.clone().unwrap_or_default();
    println!("app:       {}", spec.name);
    println!(
        "replicas:  {} desired, {} healthy",
        spec.replicas, app.healthy
    );
    println!("template:  {}", app.spec_hash);
    if !app.previous_templates.is_empty() {
        println!(
            "earlier:   {} (`capstan app rollback {} --to TEMPLATE`)",
            app.previous_templates.join(", "),
            spec.name
        );
    }
    println!(
        "hosts:     {}",
        spec.route.map(|r| r.hosts.join(", ")).unwrap_or_default()
    );
    if let Some(autoscale) = &spec.autoscale {
        let paused = match &app.autoscale_override {
            Some(o) => format!(
                "; paused: scaled to {} by {} at {} (resumes on the next deploy or `capstan app autoscale {} --resume`)",
                o.replicas,
                o.by,
                format_time(o.at_ms),
                spec.name
            ),
            None => String::new(),
        };
        println!(
            "autoscale: {} to {} replicas{paused}",
            autoscale.min, autoscale.max
        );
    }
    println!("rollout:   {} {}", rollout_state(app), rollout.message);
    if !app.placement_error.is_empty() {
        println!("placement: {}", app.placement_error);
    }
    println!();
    println!(
        "{:<24} {:<18} {:<10} {:<22} {:<8} MESSAGE",
        "INSTANCE", "NODE", "STATE", "ADDRESS", "ROUTED"
    );
    for i in &app.instances {
        println!(
            "{:<24} {:<18} {:<10} {:<22} {:<8} {}",
            i.id,
            i.node_id,
            state_name(i.state),
            i.address,
            if i.routable { "yes" } else { "no" },
            i.message
        );
    }
}

/// A `--since` (1s to 90d) as ms since the epoch; none: 0 (all).
fn since_ms(since: Option<Duration>) -> Result<i64> {
    match since {
        None => Ok(0),
        Some(since)
            if (Duration::from_secs(1)..=Duration::from_secs(90 * 86_400)).contains(&since) =>
        {
            Ok(capstan_server::now_ms() - since.as_millis() as i64)
        }
        Some(_) => Err(anyhow!("--since: must be 1s to 90d")),
    }
}

/// After a change that started a rollout: done at once with `detach`,
/// else waits for the rollout to end.
async fn follow_unless_detached(
    client: &mut OrchestratorClient<Authed>,
    name: &str,
    app: &AppStatus,
    detach: bool,
    timeout: Duration,
) -> Result<ExitCode> {
    if detach {
        return Ok(ExitCode::SUCCESS);
    }
    wait_for_rollout(client, name, &app.spec_hash, timeout).await
}

async fn wait_for_rollout(
    client: &mut OrchestratorClient<Authed>,
    name: &str,
    hash: &str,
    timeout: Duration,
) -> Result<ExitCode> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let app = client
            .get_app(GetAppRequest {
                name: name.to_string(),
            })
            .await
            .map_err(rpc)?
            .into_inner();
        let rollout = app.rollout.clone().unwrap_or_default();
        let replicas = app.spec.as_ref().map_or(0, |s| s.replicas);
        let progress = format!(
            "rollout {}: {} of {replicas} updated, {} healthy",
            rollout_state(&app),
            rollout.updated,
            app.healthy
        );
        if progress != last {
            println!("{progress}");
            last = progress;
        }
        let state = RolloutState::try_from(rollout.state).unwrap_or(RolloutState::Unspecified);
        if rollout.target_hash == hash
            && state == RolloutState::InProgress
            && !app.placement_error.is_empty()
        {
            // Like Nomad's blocked evaluations: the orchestrator keeps
            // trying (a node may join), but the user learns now.
            eprintln!(
                "error: deploy of {name} cannot be placed: {}",
                app.placement_error
            );
            eprintln!("the platform keeps retrying; see `capstan app status {name}`");
            return Ok(ExitCode::FAILURE);
        }
        if rollout.target_hash == hash {
            match state {
                RolloutState::Completed if app.healthy >= replicas => {
                    println!("app {name} is running: {} healthy instances", app.healthy);
                    return Ok(ExitCode::SUCCESS);
                }
                RolloutState::RolledBack | RolloutState::Failed => {
                    eprintln!("error: deploy of {name} failed: {}", rollout.message);
                    return Ok(ExitCode::FAILURE);
                }
                _ => {}
            }
        } else if app.spec_hash != hash {
            eprintln!(
                "error: app {name} changed to template {} while waiting",
                app.spec_hash
            );
            return Ok(ExitCode::FAILURE);
        }
        if Instant::now() > deadline {
            eprintln!(
                "error: deploy of {name} did not finish within {}: {}",
                capstan_types::duration::format(timeout),
                rollout.message
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

fn print_event(event: &capstan_proto::v1::Event, output: Output) {
    if output == Output::Json {
        let line = json!({
            "id": event.id, "time_ms": event.time_ms, "kind": event.kind, "app": event.app,
            "instance": event.instance_id, "node": event.node_id, "message": event.message,
            "actor": event.actor, "actor_role": event.actor_role,
        });
        println!("{line}");
    } else {
        let subject = [
            event.app.as_str(),
            event.instance_id.as_str(),
            event.node_id.as_str(),
        ]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
        let by = if event.actor.is_empty() {
            String::new()
        } else {
            format!(" (by {} as {})", event.actor, event.actor_role)
        };
        println!(
            "{} {:<20} {:<40} {}{by}",
            format_time(event.time_ms),
            event.kind,
            subject,
            event.message
        );
    }
}

async fn events(
    global: &Global,
    follow: bool,
    app: String,
    limit: u32,
    output: Output,
) -> Result<ExitCode> {
    use futures::StreamExt;
    let api = Api::connect(global)?;
    let mut client = api.orchestrator()?;
    if follow {
        // A watch ends when its token expires (or when it fell behind): open
        // it again with a fresh token and enough history to cover the gap,
        // printing each event once.
        let mut printed = capstan_events::Deduper::new(10_000);
        let mut history = limit;
        loop {
            let mut stream = client
                .watch_events(WatchEventsRequest {
                    app: app.clone(),
                    history,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            history = 500;
            let ended = loop {
                match stream.next().await {
                    Some(Ok(event)) => {
                        if printed.first_time(&event.id) {
                            print_event(&event, output);
                        }
                    }
                    Some(Err(status)) => break status,
                    None => return Ok(ExitCode::SUCCESS),
                }
            };
            match ended.code() {
                tonic::Code::Unauthenticated | tonic::Code::DataLoss => continue,
                _ => return Err(rpc(ended)),
            }
        }
    } else {
        let events = client
            .list_events(ListEventsRequest { app, limit })
            .await
            .map_err(rpc)?
            .into_inner()
            .events;
        for event in &events {
            print_event(event, output);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn nodes(global: &Global, output: Output) -> Result<ExitCode> {
    let api = Api::connect(global)?;
    let address = api.service_address("CAPSTAN_SCHEDULER_ADDR", |e| e.scheduler.clone())?;
    let nodes = SchedulerClient::new(api.channel(&address, "scheduler")?)
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(rpc)?
        .into_inner()
        .nodes;
    let status =
        |n: &capstan_proto::v1::Node| match (n.status == NodeStatus::Ready as i32, n.draining) {
            (false, _) => "down",
            (true, true) => "draining",
            (true, false) => "ready",
        };
    if output == Output::Json {
        let list: Vec<Value> = nodes
            .iter()
            .map(|n| {
                let (cap, alloc) = (
                    n.capacity.unwrap_or_default(),
                    n.allocated.unwrap_or_default(),
                );
                json!({
                    "id": n.id, "address": n.address, "status": status(n), "draining": n.draining,
                    "instances": n.instances,
                    "capacity": {"cpu_millis": cap.cpu_millis, "memory_mb": cap.memory_mb},
                    "allocated": {"cpu_millis": alloc.cpu_millis, "memory_mb": alloc.memory_mb},
                    "labels": n.labels,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        println!(
            "{:<22} {:<8} {:>9} {:>15} {:>19} {:<21} ATTRIBUTES",
            "NODE", "STATUS", "INSTANCES", "CPU (alloc/cap)", "MEMORY (alloc/cap)", "ADDRESS"
        );
        for n in &nodes {
            let (cap, alloc) = (
                n.capacity.unwrap_or_default(),
                n.allocated.unwrap_or_default(),
            );
            let mut labels: Vec<String> =
                n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            println!(
                "{:<22} {:<8} {:>9} {:>15} {:>19} {:<21} {}",
                n.id,
                status(n),
                n.instances,
                format!("{}m/{}m", alloc.cpu_millis, cap.cpu_millis),
                format!("{}/{} MB", alloc.memory_mb, cap.memory_mb),
                n.address,
                labels.join(",")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn drain(
    global: &Global,
    node: &str,
    enable: bool,
    detach: bool,
    timeout: Duration,
) -> Result<ExitCode> {
    let api = Api::connect(global)?;
    let address = api.service_address("CAPSTAN_SCHEDULER_ADDR", |e| e.scheduler.clone())?;
    let mut client = SchedulerClient::new(api.channel(&address, "scheduler")?);
    let marked = client
        .drain_node(DrainNodeRequest {
            node_id: node.to_string(),
            enable,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    if !enable {
        println!("node {node} is eligible for new instances again");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "node {node} is draining: {} instances to move",
        marked.instances
    );
    if detach {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + timeout;
    let mut last = marked.instances;
    loop {
        let nodes = client
            .list_nodes(ListNodesRequest {})
            .await
            .map_err(rpc)?
            .into_inner()
            .nodes;
        let Some(current) = nodes.iter().find(|n| n.id == node) else {
            return Err(anyhow!("node {node} disappeared while draining"));
        };
        if current.instances == 0 {
            println!("node {node} is drained");
            return Ok(ExitCode::SUCCESS);
        }
        if current.instances != last {
            println!("node {node}: {} instances left", current.instances);
            last = current.instances;
        }
        if Instant::now() > deadline {
            eprintln!(
                "error: node {node} still runs {} instances after {}; it stays draining",
                current.instances,
                capstan_types::duration::format(timeout)
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// CAPSTAN_LISTEN as a dialable address: `0.0.0.0:7001` → `127.0.0.1:7001`.
fn local_listen_address() -> Result<String> {
    let listen = std::env::var("CAPSTAN_LISTEN")
        .map_err(|_| anyhow!("ADDR: pass the address, or set CAPSTAN_LISTEN"))?;
    let mut addr: SocketAddr = listen
        .parse()
        .map_err(|e| anyhow!("CAPSTAN_LISTEN: `{listen}` is not host:port: {e}"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(addr.to_string())
}

/// `capstan health`: one grpc.health.v1 Check, no credentials needed.
async fn health(
    global: &Global,
    addr: &str,
    service: String,
    timeout: std::time::Duration,
    tls_name: Option<String>,
) -> Result<ExitCode> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let tls = match (&global.tls_ca, &global.tls_cert, &global.tls_key) {
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => Some(capstan_server::Tls::load(ca, cert, key)?),
        _ => return Err(anyhow!("--tls-ca, --tls-cert and --tls-key go together")),
    };
    let name = tls_name.unwrap_or_default();
    if tls.is_some() && name.is_empty() {
        return Err(anyhow!(
            "--tls-name: the service name the server's certificate carries is needed with --tls-*"
        ));
    }
    let channel = capstan_server::channel_with(addr, tls.as_ref().map(|t| (t, name.as_str())))?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let call = client.check(tonic_health::pb::HealthCheckRequest { service });
    let answer = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| anyhow!("{addr}: no answer in {timeout:?}"))?
        .map_err(|status| anyhow!("{addr}: {}", status.message()))?;
    let status = answer.into_inner().status();
    println!("{addr}: {}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A `--grpc-host`: an address others can dial, which the embedded registry
/// hands out as is (so not 0.0.0.0).
fn parse_grpc_host(text: &str) -> Result<std::net::IpAddr, String> {
    let ip: std::net::IpAddr = text
        .parse()
        .map_err(|e| format!("`{text}` is not an IP address: {e}"))?;
    if ip.is_unspecified() {
        return Err(format!(
            "`{text}` cannot be dialled: give the address agents reach this host at"
        ));
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_as_rfc3339() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn the_grpc_host_must_be_dialable() {
        assert_eq!(parse_grpc_host("10.0.0.5").unwrap().to_string(), "10.0.0.5");
        assert!(
            parse_grpc_host("0.0.0.0")
                .unwrap_err()
                .contains("cannot be dialled")
        );
        assert!(parse_grpc_host("[::]").is_err());
        assert!(parse_grpc_host("host").unwrap_err().contains("not an IP"));
    }
}
