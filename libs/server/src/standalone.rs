//! One service per process: what each `capstan-<service>` binary shares.
//!
//! Until the Consul and Vault adapters land, a standalone service finds its
//! peers from `--peer NAME=HOST:PORT` flags (taken as healthy), keeps state in
//! the SQLite store and secrets in the 0600 file of `--data-dir` (shared by the
//! services of one host), and exchanges events over RabbitMQ (`--amqp-url`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use capstan_events::RabbitBus;
use capstan_registry::{Check, EmbeddedRegistry, Registration, ServiceRegistry};
use capstan_secrets::{FileSecretStore, Secret, SecretStore};
use capstan_store::SqliteStore;
use capstan_types::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Platform;

pub const SERVICE_KEY_PATH: &str = "capstan/service-key";
/// Peers named on the command line stay registered this long between renewals.
const PEER_TTL: Duration = Duration::from_secs(3600);

#[derive(clap::Args, Debug, Clone)]
pub struct StandaloneArgs {
    /// Where to serve gRPC.
    #[arg(long, env = "CAPSTAN_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// State store (state.db) and secrets (secrets.json), shared by the services of this host.
    #[arg(long, env = "CAPSTAN_DATA_DIR")]
    pub data_dir: PathBuf,
    /// RabbitMQ for events: amqp://user:pass@host:port/vhost.
    #[arg(long, env = "CAPSTAN_AMQP_URL", hide_env_values = true)]
    pub amqp_url: String,
    /// Another service's address, NAME=HOST:PORT (repeatable): auth, scheduler,
    /// orchestrator, router-config.
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<(String, String)>,
}

fn parse_peer(text: &str) -> Result<(String, String), String> {
    let (name, address) = text.split_once('=').ok_or("expected NAME=HOST:PORT")?;
    address
        .parse::<SocketAddr>()
        .map_err(|e| format!("`{address}`: {e}"))?;
    if name.is_empty() {
        return Err("the NAME part is empty".into());
    }
    Ok((name.to_string(), address.to_string()))
}

/// Reads the service key, creating it when `create` (the auth service does;
/// the others wait for it).
pub async fn service_key(secrets: &dyn SecretStore, create: bool) -> anyhow::Result<Secret> {
    for _ in 0..300 {
        if let Some(key) = secrets.get(SERVICE_KEY_PATH).await? {
            return Ok(key);
        }
        if create {
            let key = Secret::new(capstan_authn::generate_api_key());
            secrets.put(SERVICE_KEY_PATH, key.clone()).await?;
            return Ok(key);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow!(
        "no service key in the secret store after 30s: start capstan-auth with the same --data-dir first"
    ))
}

async fn platform(
    args: &StandaloneArgs,
    create_key: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<Platform> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create {}", args.data_dir.display()))?;
    let store = Arc::new(SqliteStore::open(&args.data_dir.join("state.db"))?);
    let secrets = Arc::new(FileSecretStore::new(&args.data_dir));
    let bus = RabbitBus::connect(&args.amqp_url)
        .await
        .context("connect to RabbitMQ")?;
    let registry = Arc::new(EmbeddedRegistry::start(shutdown.child_token()));
    for (name, address) in &args.peers {
        let id = format!("peer-{name}");
        let check = Check::Ttl { ttl: PEER_TTL };
        registry
            .register(Registration {
                id: id.clone(),
                name: name.clone(),
                address: address.clone(),
                tags: vec![],
                check,
            })
            .await?;
        registry.pass_ttl(&id).await?;
    }
    let key = service_key(secrets.as_ref(), create_key).await?;
    Ok(Platform::new(registry, bus, store, secrets, key))
}

/// The body of every `capstan-<service>` main: crypto provider, telemetry,
/// runtime, platform, listener, signals, graceful drain.
pub fn main<F, Fut>(
    name: &'static str,
    args: StandaloneArgs,
    creates_service_key: bool,
    serve: F,
) -> ExitCode
where
    F: FnOnce(Platform, TcpListener, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _telemetry = capstan_telemetry::init(name, "info");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let platform = platform(&args, creates_service_key, &shutdown).await?;
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listen on {}", args.listen))?;
        tracing::info!(service = name, address = %listener.local_addr()?, "starting");
        let signals = shutdown.clone();
        tokio::spawn(async move {
            let mut terminate =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(terminate) => terminate,
                    Err(_) => return,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            signals.cancel();
        });
        serve(platform, listener, shutdown)
            .await
            .map_err(|e| anyhow!("{e}"))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
