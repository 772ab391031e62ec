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
use capstan_cache::{Cache, CacheUrl};
use capstan_events::RabbitBus;
use capstan_registry::{Check, EmbeddedRegistry, Locks, Registration, ServiceRegistry};
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
    /// Where events go: `memory` (this process only) or RabbitMQ,
    /// amqp://user:pass@host:port/vhost, e.g.
    /// amqp://capstan:secret@10.0.0.5:5672/%2f. `--amqp-url` and
    /// CAPSTAN_AMQP_URL are aliases.
    #[arg(
        long = "bus",
        visible_alias = "amqp-url",
        env = "CAPSTAN_BUS",
        hide_env_values = true
    )]
    pub bus: Option<String>,
    /// Another service's address, NAME=HOST:PORT (repeatable): auth, scheduler,
    /// orchestrator, router-config.
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<(String, String)>,
    /// Where services register and find each other: `embedded` (this
    /// process; peers from --peer) or `consul://HOST:PORT` (a Consul agent,
    /// e.g. consul://127.0.0.1:8500; ACL token from CONSUL_HTTP_TOKEN).
    #[arg(long, env = "CAPSTAN_REGISTRY", default_value = "embedded", value_parser = parse_registry_url)]
    pub registry: String,
    /// The host other services reach this one at, when --listen is a
    /// wildcard address (0.0.0.0 or [::]), e.g. 10.0.0.5.
    #[arg(long, env = "CAPSTAN_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Serve Prometheus metrics (`/metrics`) here, e.g. 0.0.0.0:9464.
    #[arg(long, env = "CAPSTAN_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// The failure domain (zone, rack) this service runs in, tagged on its
    /// registration as `zone=ZONE`, e.g. eu-west-1a.
    #[arg(long, env = "CAPSTAN_ZONE", value_parser = parse_zone)]
    pub zone: Option<String>,
    /// Where state lives: `sqlite:PATH` (default: state.db in --data-dir;
    /// one host only) or `scylla://HOST[:PORT][,HOST...]/KEYSPACE[?rf=N]`,
    /// e.g. scylla://10.0.0.1,10.0.0.2/capstan.
    #[arg(long, env = "CAPSTAN_STORE", value_parser = parse_store_url)]
    pub store: Option<String>,
    /// Where secrets live: `file:PATH` (a 0600 JSON file in PATH; default:
    /// --data-dir) or `vault://HOST:PORT` / `vault+https://HOST:PORT` (KV v2
    /// at `secret/`, AppRole login), e.g. vault://10.0.0.5:8200.
    #[arg(long, env = "CAPSTAN_SECRETS")]
    pub secrets: Option<String>,
    /// The AppRole role_id (with --secrets vault://...).
    #[arg(long, env = "CAPSTAN_VAULT_ROLE_ID_FILE")]
    pub vault_role_id_file: Option<PathBuf>,
    /// A response-wrapping token whose answer holds the secret_id; it is
    /// unwrapped once at start (with --secrets vault://...).
    #[arg(long, env = "CAPSTAN_VAULT_SECRET_ID_FILE")]
    pub vault_secret_id_file: Option<PathBuf>,
    /// The CA every Capstan certificate comes from (PEM). With --tls-cert
    /// and --tls-key, every gRPC server and client of this process uses
    /// mutual TLS: peers must show a certificate from this CA, and servers'
    /// certificates must name their service (SAN DNS:scheduler, ...).
    #[arg(long, env = "CAPSTAN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This service's certificate (PEM), naming the service.
    #[arg(long, env = "CAPSTAN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This service's private key (PEM).
    #[arg(long, env = "CAPSTAN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Take this service's certificate from Vault's PKI engine instead of
    /// files: the role to issue from, e.g. capstan-scheduler (with --secrets
    /// vault://...). The certificate names the service, the CA is the
    /// engine's, and it is renewed at 2/3 of its lifetime without a restart.
    #[arg(long, env = "CAPSTAN_TLS_VAULT_PKI", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub tls_vault_pki: Option<String>,
    /// Claims, rate limits and the token denylist: `memory` (this process
    /// only) or `redis://HOST:PORT[/DB]` (shared by every replica), e.g.
    /// redis://10.0.0.5:6379/0.
    #[arg(
        long,
        env = "CAPSTAN_CACHE",
        default_value = "memory",
        hide_env_values = true
    )]
    pub cache: String,
    /// How long to keep retrying a backend (RabbitMQ, Redis) that does not
    /// answer at start before giving up, e.g. 30s.
    #[arg(long, env = "CAPSTAN_BACKEND_WAIT", default_value = "30s", value_parser = parse_wait)]
    pub backend_wait: Duration,
    /// Lease of a singleton role (the orchestrator's reconciler, the
    /// scheduler's node watcher): a standby takes over this long after the
    /// leader stops renewing, e.g. 10s.
    #[arg(long, env = "CAPSTAN_LEASE_TTL", default_value = "10s", value_parser = parse_lease_ttl)]
    pub lease_ttl: Duration,
}

fn parse_lease_ttl(text: &str) -> Result<Duration, String> {
    capstan_types::duration::parse_within(
        text,
        Duration::from_millis(300)..=Duration::from_secs(300),
        "300ms and 5m",
    )
}

/// The bus `--bus` (or CAPSTAN_AMQP_URL) names; connecting to RabbitMQ is
/// retried for `wait`. The URL is checked here, not by clap, whose errors
/// would show its password.
pub async fn open_bus(
    url: Option<&str>,
    wait: Duration,
) -> anyhow::Result<Arc<dyn capstan_events::EventBus>> {
    let url = match url {
        Some(url) => url.to_string(),
        None => std::env::var("CAPSTAN_AMQP_URL")
            .ok()
            .filter(|url| !url.is_empty())
            .ok_or_else(|| {
                anyhow!("--bus is required: `memory` or amqp://user:pass@host:port/vhost")
            })?,
    };
    match capstan_events::parse_bus_url(&url).map_err(|e| anyhow!("--bus: {e}"))? {
        capstan_events::BusUrl::Memory => Ok(Arc::new(capstan_events::MemoryBus::new())),
        capstan_events::BusUrl::Amqp(url) => {
            let shown = capstan_events::redact_url(&url);
            let bus = connect_backend("RabbitMQ (--bus)", &shown, wait, || {
                RabbitBus::connect(&url)
            })
            .await?;
            Ok(bus)
        }
    }
}

/// Checks a `--registry` URL (clap value parser).
pub fn parse_registry_url(text: &str) -> Result<String, String> {
    if text == "embedded" {
        return Ok(text.to_string());
    }
    capstan_registry::consul::parse_url(text)
        .map(|_| text.to_string())
        .map_err(|e| format!("{e}; expected `embedded` or consul://HOST:PORT"))
}

/// A registry, and the locks that go with it (`None`: lease rows in the store).
pub type OpenedRegistry = (Arc<dyn ServiceRegistry>, Option<Arc<dyn Locks>>);

/// The registry a `--registry` URL names, and its locks; a remote one is
/// waited for (up to `wait`) before anything registers in it.
pub async fn open_registry(
    url: &str,
    shutdown: &CancellationToken,
    wait: Duration,
) -> anyhow::Result<OpenedRegistry> {
    if url == "embedded" {
        return Ok((
            Arc::new(EmbeddedRegistry::start(shutdown.child_token())),
            None,
        ));
    }
    let token = std::env::var("CONSUL_HTTP_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let consul = capstan_registry::ConsulRegistry::new(url, token)
        .map_err(|e| anyhow!("--registry: {e}"))?;
    connect_backend("the registry (--registry)", url, wait, || {
        consul.healthy("auth")
    })
    .await?;
    let locks = Arc::new(capstan_registry::ConsulLocks::new(consul.agent().clone()));
    Ok((Arc::new(consul), Some(locks)))
}

/// Checks a `--store` URL (clap value parser).
pub fn parse_store_url(text: &str) -> Result<String, String> {
    if let Some(path) = text.strip_prefix("sqlite:") {
        if path.is_empty() {
            return Err("`sqlite:` needs a file, e.g. sqlite:/var/lib/capstan/state.db".into());
        }
        return Ok(text.to_string());
    }
    capstan_store::scylla::parse_url(text)
        .map(|_| text.to_string())
        .map_err(|e| format!("{e}; expected sqlite:PATH or scylla://HOST/KEYSPACE"))
}

/// The store a `--store` URL names (default: state.db in `data_dir`).
pub async fn open_store(
    url: Option<&str>,
    data_dir: &std::path::Path,
    wait: Duration,
) -> anyhow::Result<Arc<dyn capstan_store::Store>> {
    match url {
        None => Ok(Arc::new(SqliteStore::open(&data_dir.join("state.db"))?)),
        Some(url) if url.starts_with("sqlite:") => Ok(Arc::new(SqliteStore::open(
            std::path::Path::new(&url["sqlite:".len()..]),
        )?)),
        Some(url) => Ok(Arc::new(
            connect_backend("ScyllaDB (--store)", url, wait, || {
                capstan_store::ScyllaStore::connect(url)
            })
            .await?,
        )),
    }
}

/// Secrets, and Vault's transit and PKI engines when they live in Vault.
pub struct OpenedSecrets {
    pub store: Arc<dyn SecretStore>,
    pub transit: Option<Arc<dyn capstan_secrets::Transit>>,
    pub certificates: Option<Arc<dyn capstan_secrets::CertificateIssuer>>,
}

/// The secret store `--secrets` names (default: the file in --data-dir).
pub async fn open_secrets(args: &StandaloneArgs) -> anyhow::Result<OpenedSecrets> {
    let url = args.secrets.as_deref().unwrap_or("");
    let file = |dir: &std::path::Path| OpenedSecrets {
        store: Arc::new(FileSecretStore::new(dir)),
        transit: None,
        certificates: None,
    };
    if url.is_empty() {
        return Ok(file(&args.data_dir));
    }
    if let Some(path) = url.strip_prefix("file:") {
        if path.is_empty() {
            return Err(anyhow!(
                "--secrets: `file:` needs a directory, e.g. file:/var/lib/capstan"
            ));
        }
        return Ok(file(std::path::Path::new(path)));
    }
    if !url.starts_with("vault") {
        return Err(anyhow!(
            "--secrets: `{url}` is neither file:PATH nor vault://HOST:PORT"
        ));
    }
    let address = capstan_secrets::vault::parse_url(url)?;
    let (Some(role_id_file), Some(secret_id_file)) =
        (&args.vault_role_id_file, &args.vault_secret_id_file)
    else {
        return Err(anyhow!(
            "--secrets {url} needs --vault-role-id-file and --vault-secret-id-file"
        ));
    };
    let config = capstan_secrets::VaultConfig {
        address,
        role_id_file: role_id_file.clone(),
        secret_id_file: secret_id_file.clone(),
        approle_mount: "approle".into(),
        kv_mount: "secret".into(),
        prefix: "capstan".into(),
    };
    // The wrapped secret_id is single-use: wait (with retries) until Vault
    // answers, then log in once.
    connect_backend("Vault (--secrets)", url, args.backend_wait, || {
        capstan_secrets::vault::ping(&config.address)
    })
    .await?;
    let vault = Arc::new(capstan_secrets::VaultSecretStore::login(config).await?);
    Ok(OpenedSecrets {
        store: vault.clone(),
        transit: Some(vault.clone()),
        certificates: Some(vault),
    })
}

fn parse_zone(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(text.to_string())
    } else {
        Err("a zone is 1 to 63 letters, digits, `-`, `_` or `.`".into())
    }
}

fn parse_wait(text: &str) -> Result<Duration, String> {
    capstan_types::duration::parse(text)
}

/// Connects to a backend, retrying with exponential backoff (100 ms to
/// 2 s) for up to `bound`, with a log line per failed attempt. After the
/// bound the error names the backend, its address and the last failure.
pub async fn connect_backend<T, E, F, Fut>(
    what: &str,
    address: &str,
    bound: Duration,
    mut connect: F,
) -> anyhow::Result<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let error = match connect().await {
            Ok(connected) => return Ok(connected),
            Err(e) => e.to_string(),
        };
        let now = tokio::time::Instant::now();
        if now + delay > deadline {
            return Err(anyhow!(
                "{what} at {address} did not answer within {bound:?} ({attempt} attempts): {error}"
            ));
        }
        tracing::warn!(backend = what, %address, attempt, "not ready, retrying in {delay:?}: {error}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Redacts the AMQP URL's password: `Debug` output reaches logs.
impl std::fmt::Debug for StandaloneArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandaloneArgs")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("bus", &self.bus.as_deref().map(capstan_events::redact_url))
            .field("peers", &self.peers)
            .field("registry", &self.registry)
            .field("advertise_host", &self.advertise_host)
            .field("zone", &self.zone)
            .field("store", &self.store)
            .field("secrets", &self.secrets)
            .field("vault_role_id_file", &self.vault_role_id_file)
            .field("vault_secret_id_file", &self.vault_secret_id_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_vault_pki", &self.tls_vault_pki)
            .field("cache", &capstan_cache::redact(&self.cache))
            .field("backend_wait", &self.backend_wait)
            .field("lease_ttl", &self.lease_ttl)
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
    /// None of its own: every call it makes carries its caller's token
    /// (the HTTP gateway). Least privilege: it never holds the service key.
    CallersOnly,
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

/// This service's certificate from Vault's PKI engine, renewed at 2/3 of
/// its lifetime (retried every 30 s while Vault does not answer) until
/// `shutdown`.
pub async fn vault_certificate(
    issuer: Arc<dyn capstan_secrets::CertificateIssuer>,
    role: String,
    service: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<crate::Tls> {
    let issued = issuer
        .issue(&role, service)
        .await
        .map_err(|e| anyhow!("--tls-vault-pki {role}: {e}"))?;
    let tls = crate::Tls::from_pem(&issued.ca, &issued.certificate, issued.private_key.expose())
        .map_err(|e| anyhow!("--tls-vault-pki {role}: Vault's certificate does not load: {e}"))?;
    tracing::info!(%role, service, expires_at = issued.expires_at, "certificate issued by Vault PKI");
    let renewing = tls.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        let mut expires_at = issued.expires_at;
        let mut issued_at = crate::now_ms() / 1000;
        loop {
            let lifetime = (expires_at - issued_at).max(3);
            let wait = Duration::from_secs((lifetime * 2 / 3) as u64);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            loop {
                let renewed = issuer
                    .issue(&role, &service)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|issued| {
                        renewing
                            .install(&issued.ca, &issued.certificate, issued.private_key.expose())
                            .map(|()| issued.expires_at)
                            .map_err(|e| e.to_string())
                    });
                match renewed {
                    Ok(next) => {
                        tracing::info!(%role, expires_at = next, "certificate renewed by Vault PKI");
                        issued_at = crate::now_ms() / 1000;
                        expires_at = next;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%role, "certificate renewal failed, retrying in 30s: {e}");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                        }
                    }
                }
            }
        }
    });
    Ok(tls)
}

/// Checks every URL before any backend is dialled (here, not in clap,
/// whose errors would show a password): bad input changes nothing.
fn check_urls(args: &StandaloneArgs) -> anyhow::Result<()> {
    if let Some(bus) = &args.bus {
        capstan_events::parse_bus_url(bus).map_err(|e| anyhow!("--bus: {e}"))?;
    }
    capstan_cache::parse_url(&args.cache).map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The TLS files of `args`, read once at start.
fn load_tls(args: &StandaloneArgs) -> anyhow::Result<Option<crate::Tls>> {
    match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (None, None, None) => Ok(None),
        (Some(ca), Some(cert), Some(key)) => Ok(Some(
            crate::Tls::load(ca, cert, key).map_err(|e| anyhow!("{e}"))?,
        )),
        _ => Err(anyhow!("--tls-ca, --tls-cert and --tls-key go together")),
    }
}

async fn platform(
    args: &StandaloneArgs,
    credential: &Credential,
    shutdown: &CancellationToken,
    tls: Option<crate::Tls>,
    opened: Option<OpenedSecrets>,
) -> anyhow::Result<Platform> {
    capstan_secrets::ensure_private_dir(&args.data_dir)
        .with_context(|| format!("make data dir {} private (0700)", args.data_dir.display()))?;
    let store = open_store(args.store.as_deref(), &args.data_dir, args.backend_wait).await?;
    let opened = match opened {
        Some(opened) => opened,
        None => open_secrets(args).await?,
    };
    let (secrets, transit) = (opened.store, opened.transit);
    let bus = open_bus(args.bus.as_deref(), args.backend_wait).await?;
    let cache: Arc<dyn Cache> = match capstan_cache::parse_url(&args.cache)? {
        CacheUrl::Memory => Arc::new(capstan_cache::MemoryCache::new()),
        CacheUrl::Redis(url) => {
            let shown = capstan_cache::redact(&url);
            Arc::new(
                connect_backend("Redis (--cache)", &shown, args.backend_wait, || {
                    capstan_cache::RedisCache::connect(&url, "capstan")
                })
                .await?,
            )
        }
    };
    let (registry, locks) = open_registry(&args.registry, shutdown, args.backend_wait).await?;
    register_peers(registry.clone(), &args.peers, shutdown.child_token()).await?;
    // Over mutual TLS a service is its certificate: it needs no service key.
    let by_certificate = tls.is_some()
        && !matches!(
            credential,
            Credential::NodeKeyFile(_) | Credential::CallersOnly
        );
    let key = match credential {
        Credential::CreateServiceKey => service_key(secrets.as_ref(), true).await?,
        Credential::ServiceKey if by_certificate => Secret::new(""),
        Credential::ServiceKey => service_key(secrets.as_ref(), false).await?,
        Credential::CallersOnly => Secret::new(""),
        Credential::NodeKeyFile(path) => Secret::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("read the node key from {}", path.display()))?
                .trim(),
        ),
    };
    Ok(Platform::new(registry, bus, store, secrets, cache, key)
        .with_advertise_host(args.advertise_host.clone())
        .with_zone(args.zone.clone())
        .with_tls(tls)
        .with_transit(transit)
        .with_locks(locks)
        .with_certificate_principal(by_certificate))
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
        check_urls(&args)?;
        let shutdown = CancellationToken::new();
        // With Vault PKI the certificate comes from Vault, so Vault is
        // reached before listening; otherwise from files, read here.
        let (tls, opened) = match &args.tls_vault_pki {
            Some(role) => {
                let opened = open_secrets(&args).await?;
                let issuer = opened.certificates.clone().ok_or_else(|| {
                    anyhow!("--tls-vault-pki needs --secrets vault://HOST:PORT")
                })?;
                let service = name.trim_start_matches("capstan-");
                let tls = vault_certificate(issuer, role.clone(), service, shutdown.clone()).await?;
                (Some(tls), Some(opened))
            }
            None => {
                let tls = load_tls(&args)?;
                if let Some(tls) = &tls {
                    // Renewed certificates take effect without a restart.
                    tokio::spawn(
                        tls.clone()
                            .watch(crate::tls::RELOAD_EVERY, shutdown.clone()),
                    );
                }
                (tls, None)
            }
        };
        // Listen at once, answering health with NOT_SERVING until every
        // backend answered: probes tell "up, waiting" from "down".
        let listener = Arc::new(
            TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("listen on {}", args.listen))?,
        );
        tracing::info!(service = name, address = %listener.local_addr()?, "listening; NOT_SERVING until every backend answers");
        let ready = CancellationToken::new();
        let mut waiting = tokio::spawn(crate::serve_not_ready(
            listener.clone(),
            tls.clone(),
            ready.clone(),
        ));
        let platform = platform(&args, &credential, &shutdown, tls, opened).await;
        ready.cancel();
        // Connections to the waiting server get a GOAWAY; do not wait long
        // for a client that keeps one open.
        if tokio::time::timeout(Duration::from_secs(2), &mut waiting)
            .await
            .is_err()
        {
            waiting.abort();
            let _ = waiting.await;
        }
        let platform = platform?;
        let listener = Arc::try_unwrap(listener)
            .map_err(|_| anyhow!("the listener is still held by the health server"))?;
        tracing::info!(service = name, "every backend answered; starting");
        if let Some(address) = args.metrics_addr {
            let listener = crate::metrics::bind(address).await?;
            tokio::spawn(crate::metrics::serve(listener, shutdown.clone()));
        }
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
