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
/// Peers named on the command line are taken as healthy: their TTL check is
/// renewed every third of this for as long as the process runs.
const PEER_TTL: Duration = Duration::from_secs(30);

#[derive(clap::Args, Clone)]
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

/// Redacts the AMQP URL's password: `Debug` output reaches logs.
impl std::fmt::Debug for StandaloneArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandaloneArgs")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("amqp_url", &capstan_events::redact_url(&self.amqp_url))
            .field("peers", &self.peers)
            .finish()
    }
}

/// What a standalone service calls other services with.
pub enum Credential {
    /// The service key, created if absent (the auth service).
    CreateServiceKey,
    /// The service key, waited for until the auth service has created it.
    ServiceKey,
    /// An agent's node key, read from this file (`capstan key create
    /// --role node --name NODE` prints one).
    NodeKeyFile(PathBuf),
}

/// Registers `--peer` services and keeps them passing until `shutdown`.
pub async fn register_peers(
    registry: Arc<dyn ServiceRegistry>,
    peers: &[(String, String)],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut ids = Vec::new();
    for (name, address) in peers {
        let id = format!("peer-{name}");
        registry
            .register(Registration {
                id: id.clone(),
                name: name.clone(),
                address: address.clone(),
                tags: vec![],
                check: Check::Ttl { ttl: PEER_TTL },
            })
            .await?;
        registry.pass_ttl(&id).await?;
        ids.push(id);
    }
    if ids.is_empty() {
        return Ok(());
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PEER_TTL / 3);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for id in &ids {
                if let Err(e) = registry.pass_ttl(id).await {
                    tracing::warn!(peer = %id, "failed to renew peer registration: {e}");
                }
            }
        }
    });
    Ok(())
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
    if create {
        return Ok(
            capstan_secrets::get_or_create(secrets, SERVICE_KEY_PATH, || {
                Secret::new(capstan_authn::generate_api_key())
            })
            .await?,
        );
    }
    for _ in 0..300 {
        if let Some(key) = secrets.get(SERVICE_KEY_PATH).await? {
            return Ok(key.value);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow!(
        "no service key in the secret store after 30s: start capstan-auth with the same --data-dir first"
    ))
}

async fn platform(
    args: &StandaloneArgs,
    credential: &Credential,
    shutdown: &CancellationToken,
) -> anyhow::Result<Platform> {
    capstan_secrets::ensure_private_dir(&args.data_dir)
        .with_context(|| format!("make data dir {} private (0700)", args.data_dir.display()))?;
    let store = Arc::new(SqliteStore::open(&args.data_dir.join("state.db"))?);
    let secrets = Arc::new(FileSecretStore::new(&args.data_dir));
    let bus = RabbitBus::connect(&args.amqp_url)
        .await
        .context("connect to RabbitMQ")?;
    let registry: Arc<dyn ServiceRegistry> =
        Arc::new(EmbeddedRegistry::start(shutdown.child_token()));
    register_peers(registry.clone(), &args.peers, shutdown.child_token()).await?;
    let key = match credential {
        Credential::CreateServiceKey => service_key(secrets.as_ref(), true).await?,
        Credential::ServiceKey => service_key(secrets.as_ref(), false).await?,
        Credential::NodeKeyFile(path) => Secret::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("read the node key from {}", path.display()))?
                .trim(),
        ),
    };
    Ok(Platform::new(registry, bus, store, secrets, key))
}

/// The body of every `capstan-<service>` main: crypto provider, telemetry,
/// runtime, platform, listener, signals, graceful drain.
pub fn main<F, Fut>(
    name: &'static str,
    args: StandaloneArgs,
    credential: Credential,
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
        let platform = platform(&args, &credential, &shutdown).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peers_stay_registered_for_as_long_as_the_process_runs() {
        let shutdown = CancellationToken::new();
        let registry: Arc<dyn ServiceRegistry> =
            Arc::new(EmbeddedRegistry::start(shutdown.child_token()));
        let peers = [("auth".to_string(), "127.0.0.1:7001".to_string())];
        register_peers(registry.clone(), &peers, shutdown.child_token())
            .await
            .unwrap();
        for hours in 1..=3 {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            let found = capstan_registry::resolve(registry.as_ref(), "auth", Duration::ZERO).await;
            assert!(
                found.is_ok_and(|i| i.address == "127.0.0.1:7001"),
                "peer gone after {hours} h"
            );
        }
        shutdown.cancel();
    }
}
