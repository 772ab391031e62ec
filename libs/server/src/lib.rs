//! How every Capstan service serves and calls.
//!
//! [`serve`] runs a service's gRPC routes with `grpc.health.v1`, server
//! reflection and [`capstan_authn::RequireAuthLayer`], registers the instance
//! in the registry with a TTL check it keeps passing, and drains on shutdown.
//! [`Platform`] holds the infrastructure ports a service is given and makes
//! authenticated clients of other services, found through the registry.

pub mod audit;
pub mod leader;
pub mod metrics;
pub mod projects;
pub mod tls;
pub mod trusted;

pub use tls::Tls;
pub mod standalone;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use capstan_authn::{Authed, KeySource, RequireAuthLayer, TokenSource, Verifier, VerifyingKeys};
use capstan_cache::Cache;
use capstan_events::EventBus;
use capstan_proto::v1::GetVerificationKeysRequest;
use capstan_proto::v1::auth_client::AuthClient;
use capstan_registry::{Check, Registration, ServiceRegistry};
use capstan_secrets::{Secret, SecretStore};
use capstan_store::Store;
use capstan_types::{Error, Event};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// How long a registered instance stays passing without a heartbeat.
const REGISTRY_TTL: Duration = Duration::from_secs(6);
/// How long to wait for a dependency to appear in the registry.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The infrastructure a service is given: one adapter per port.
#[derive(Clone)]
pub struct Platform {
    pub registry: Arc<dyn ServiceRegistry>,
    pub bus: Arc<dyn EventBus>,
    pub store: Arc<dyn Store>,
    pub secrets: Arc<dyn SecretStore>,
    /// Claims, rate limits and the token denylist, shared by replicas.
    pub cache: Arc<dyn Cache>,
    /// The API key this service calls others with: the service key, or an
    /// agent's node key (whose tokens name the node).
    pub api_key: Secret,
    /// The host others reach this process at when it listens on a wildcard.
    advertise_host: Option<String>,
    /// TLS for every server and client of this process (mutual: peers show
    /// certificates from the same CA).
    tls: Option<Tls>,
    /// Vault's transit engine, when secrets live in Vault: auth signs
    /// tokens there, so the private key never leaves Vault.
    pub transit: Option<Arc<dyn capstan_secrets::Transit>>,
    /// The failure domain this process runs in, tagged on its registrations.
    zone: Option<String>,
    /// Calls other services as its certificate names it (needs `tls`).
    by_certificate: bool,
    /// Who holds a singleton role; `None`: lease rows in the store.
    locks: Option<Arc<dyn capstan_registry::Locks>>,
    tokens: Arc<tokio::sync::OnceCell<Arc<TokenSource>>>,
    /// One multiplexed HTTP/2 channel per address, reused by every call.
    channels: Arc<std::sync::Mutex<std::collections::HashMap<String, Channel>>>,
    /// The healthy instances of each service called, kept current by a
    /// blocking watch per service; calls take turns among them.
    endpoints: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<Endpoints>>>>,
}

impl Platform {
    pub fn new(
        registry: Arc<dyn ServiceRegistry>,
        bus: Arc<dyn EventBus>,
        store: Arc<dyn Store>,
        secrets: Arc<dyn SecretStore>,
        cache: Arc<dyn Cache>,
        api_key: Secret,
    ) -> Self {
        Platform {
            registry,
            bus,
            store,
            secrets,
            cache,
            api_key,
            advertise_host: None,
            tls: None,
            transit: None,
            locks: None,
            zone: None,
            by_certificate: false,
            tokens: Arc::default(),
            channels: Arc::default(),
            endpoints: Arc::default(),
        }
    }

    /// The same platform calling with another API key (an agent's node key).
    pub fn with_api_key(&self, api_key: Secret) -> Platform {
        Platform {
            api_key,
            tokens: Arc::default(),
            ..self.clone()
        }
    }

    /// The same platform, registering its servers under `host` when they
    /// listen on a wildcard address.
    pub fn with_advertise_host(mut self, host: Option<String>) -> Platform {
        self.advertise_host = host;
        self
    }

    /// The same platform, serving and calling over mutual TLS.
    pub fn with_tls(mut self, tls: Option<Tls>) -> Platform {
        self.tls = tls;
        self.channels = Arc::default();
        self
    }

    pub fn with_transit(mut self, transit: Option<Arc<dyn capstan_secrets::Transit>>) -> Platform {
        self.transit = transit;
        self
    }

    /// The same platform, registering its servers in `zone`.
    pub fn with_zone(mut self, zone: Option<String>) -> Platform {
        self.zone = zone;
        self
    }

    /// The same platform, electing leaders with `locks` (Consul's).
    pub fn with_locks(mut self, locks: Option<Arc<dyn capstan_registry::Locks>>) -> Platform {
        self.locks = locks;
        self
    }

    /// A candidate for the singleton `role`, fenced in this platform's store.
    pub fn election(&self, role: &str, holder: &str, ttl: std::time::Duration) -> leader::Election {
        match &self.locks {
            Some(locks) => {
                leader::Election::with_locks(locks.clone(), self.store.clone(), role, holder, ttl)
            }
            None => leader::Election::new(self.store.clone(), role, holder, ttl),
        }
    }

    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// The address others reach a server listening on `local` at.
    pub fn advertised(&self, local: SocketAddr) -> Result<String, Error> {
        if !local.ip().is_unspecified() {
            return Ok(local.to_string());
        }
        match &self.advertise_host {
            Some(host) if host.contains(':') => Ok(format!("[{host}]:{}", local.port())),
            Some(host) => Ok(format!("{host}:{}", local.port())),
            None => Err(Error::invalid(
                "advertise_host",
                format!(
                    "the server listens on {local}, which nobody can dial: pass --advertise-host (the host others reach it at)"
                ),
            )),
        }
    }

    /// The same platform writing through `store` (a leader's fenced store).
    pub fn with_store(&self, store: Arc<dyn Store>) -> Platform {
        Platform {
            store,
            ..self.clone()
        }
    }

    /// A channel to a healthy instance of `service`, with no credentials.
    /// A channel to one healthy instance of `service`, taking turns among
    /// them; waits up to 30 s for one to be healthy.
    pub async fn channel(&self, service: &str) -> Result<Channel, Error> {
        let endpoints = {
            let mut watched = self.endpoints.lock().expect("endpoints lock poisoned");
            watched
                .entry(service.to_string())
                .or_insert_with(|| Endpoints::watch(self.registry.clone(), service))
                .clone()
        };
        let address = endpoints.next(service).await?;
        self.cached_channel(&address, service)
    }

    /// A channel to `service` that carries this platform's token, or over
    /// mutual TLS between services, its certificate alone.
    pub async fn client(&self, service: &str) -> Result<Authed, Error> {
        let channel = self.channel(service).await?;
        self.authed(channel).await
    }

    /// A channel to a known address (an agent), authenticated as [`Self::client`].
    pub async fn client_at(&self, address: &str) -> Result<Authed, Error> {
        let channel = self.cached_channel(address, "agent")?;
        self.authed(channel).await
    }

    async fn authed(&self, channel: Channel) -> Result<Authed, Error> {
        if self.by_certificate && self.tls.is_some() {
            return Ok(Authed::by_certificate(channel));
        }
        Ok(Authed::new(channel, self.tokens().await?))
    }

    /// The same platform, calling as the service its TLS certificate names
    /// rather than with a token (servers refuse service tokens over TLS).
    pub fn with_certificate_principal(mut self, by_certificate: bool) -> Platform {
        self.by_certificate = by_certificate;
        self
    }

    /// `service` is the name the peer's certificate must carry under TLS.
    fn cached_channel(&self, address: &str, service: &str) -> Result<Channel, Error> {
        let mut channels = self.channels.lock().expect("channel cache lock poisoned");
        // Channels made with TLS material that has since been renewed are
        // dropped: new ones present the new certificate.
        let generation = self.tls.as_ref().map_or(0, Tls::generation);
        let key = format!("{service}@{address}#{generation}");
        if let Some(channel) = channels.get(&key) {
            return Ok(channel.clone());
        }
        let current = format!("#{generation}");
        channels.retain(|k, _| k.ends_with(&current));
        let channel = channel_with(address, self.tls.as_ref().map(|tls| (tls, service)))?;
        channels.insert(key, channel.clone());
        Ok(channel)
    }

    async fn tokens(&self) -> Result<Arc<TokenSource>, Error> {
        Ok(self
            .tokens
            .get_or_try_init(|| async {
                Ok::<_, Error>(TokenSource::new(
                    self.api_key.clone(),
                    self.channel("auth").await?,
                ))
            })
            .await?
            .clone())
    }

    /// A verifier whose keys come from the auth service and which refuses
    /// tokens on the cache's denylist.
    pub fn verifier(&self) -> Arc<Verifier> {
        Arc::new(
            Verifier::new(Arc::new(AuthKeys {
                platform: self.clone(),
            }))
            .with_revocations(self.cache.clone()),
        )
    }

    /// Sends readings to the metrics service, in calls of at most 1,000
    /// readings. Metrics are hints, like events: what the service does not
    /// take is dropped (and logged at debug), never retried.
    pub async fn report_samples(&self, instances: Vec<capstan_proto::v1::InstanceReadings>) {
        let client = match self.client("metrics").await {
            Ok(channel) => capstan_proto::v1::metrics_client::MetricsClient::new(channel),
            Err(e) => {
                tracing::debug!("metrics service unreachable, samples dropped: {e}");
                return;
            }
        };
        let mut batches = vec![Vec::new()];
        let mut readings = 0;
        for instance in instances {
            if readings + instance.readings.len() > 1_000 && readings > 0 {
                batches.push(Vec::new());
                readings = 0;
            }
            readings += instance.readings.len();
            batches
                .last_mut()
                .expect("one batch at least")
                .push(instance);
        }
        for instances in batches.into_iter().filter(|b| !b.is_empty()) {
            let request = capstan_proto::v1::IngestRequest { instances };
            if let Err(e) = client.clone().ingest(request).await {
                tracing::debug!("metric samples not taken: {}", e.message());
                return;
            }
        }
    }

    /// Publishes an event. Events are hints: a failure is logged, and the
    /// state it describes is already committed, so reconcilers still see it.
    pub async fn emit(&self, event: Event) {
        for attempt in 1..=3 {
            match self.bus.publish(&event).await {
                Ok(()) => return,
                Err(e) if attempt == 3 => {
                    tracing::warn!(kind = %event.kind, "failed to publish event: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100 * attempt)).await,
            }
        }
    }
}

/// The healthy instances of one service, as a blocking watch on the
/// registry last saw them (Consul's `?index=` queries), and whose turn is
/// next.
struct Endpoints {
    healthy: tokio::sync::watch::Receiver<Vec<String>>,
    turn: std::sync::atomic::AtomicUsize,
}

impl Endpoints {
    /// Starts watching `service`; the watch ends once nobody holds this.
    fn watch(registry: Arc<dyn ServiceRegistry>, service: &str) -> Arc<Endpoints> {
        let (tx, rx) = tokio::sync::watch::channel(Vec::new());
        let name = service.to_string();
        tokio::spawn(async move {
            let mut index = 0;
            while !tx.is_closed() {
                match registry.watch(&name, index, Duration::from_secs(30)).await {
                    Ok((next, instances)) => {
                        index = next;
                        let addresses: Vec<String> =
                            instances.into_iter().map(|i| i.address).collect();
                        tx.send_if_modified(|current| {
                            let changed = *current != addresses;
                            if changed {
                                *current = addresses;
                            }
                            changed
                        });
                    }
                    Err(e) => {
                        tracing::debug!(service = %name, "registry watch failed, retrying: {e}");
                        index = 0;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Arc::new(Endpoints {
            healthy: rx,
            turn: Default::default(),
        })
    }

    /// The next healthy instance's address, round robin.
    async fn next(&self, service: &str) -> Result<String, Error> {
        let mut healthy = self.healthy.clone();
        let ready = tokio::time::timeout(
            RESOLVE_TIMEOUT,
            healthy.wait_for(|addresses| !addresses.is_empty()),
        )
        .await;
        let addresses = match ready {
            Ok(Ok(addresses)) => addresses.clone(),
            _ => {
                return Err(Error::Unavailable(format!(
                    "registry unavailable: no healthy `{service}` within {RESOLVE_TIMEOUT:?}"
                )));
            }
        };
        let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(addresses[turn % addresses.len()].clone())
    }
}

/// A lazily connecting channel to `host:port`.
pub fn channel_to(address: &str) -> Result<Channel, Error> {
    channel_with(address, None)
}

/// A lazily connecting channel to `address`; over TLS when given, checking
/// that the server's certificate names `service`.
pub fn channel_with(address: &str, tls: Option<(&Tls, &str)>) -> Result<Channel, Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|e| Error::invalid("address", format!("`{address}`: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true);
    if let Some((tls, service)) = tls {
        endpoint = endpoint
            .tls_config(tls.client(service))
            .map_err(|e| Error::invalid("tls", e.to_string()))?;
    }
    Ok(endpoint.connect_lazy())
}

struct AuthKeys {
    platform: Platform,
}

#[async_trait]
impl KeySource for AuthKeys {
    async fn fetch(&self) -> Result<VerifyingKeys, Error> {
        let channel = self.platform.channel("auth").await?;
        let response = AuthClient::new(channel)
            .get_verification_keys(GetVerificationKeysRequest {})
            .await
            .map_err(capstan_proto::into_error)?
            .into_inner();
        Ok(response
            .keys
            .into_iter()
            .filter_map(|k| Some((k.kid, <[u8; 32]>::try_from(k.public_key.as_slice()).ok()?)))
            .collect())
    }
}

/// The limits of every gRPC server; the README's "Limits" table lists them.
#[derive(Debug, Clone, Copy)]
pub struct GrpcLimits {
    /// Longest a unary call (or a stream's opening) may take. Above the
    /// slowest legitimate call: `StopInstance` waits up to 30 s of grace.
    pub timeout: Duration,
    /// Calls served at once on one connection; more wait.
    pub concurrency_per_connection: usize,
    /// Concurrent HTTP/2 streams per connection (watch streams included).
    pub max_concurrent_streams: u32,
    /// HTTP/2 pings that find dead peers, and how long a ping may go unanswered.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub tcp_keepalive: Duration,
    /// On shutdown, how long the server keeps serving after it left the
    /// registry (and turned NOT_SERVING), so that clients' watches drop it
    /// before it stops accepting.
    pub leave_delay: Duration,
    /// Then, how long calls in flight get to finish before their
    /// connections are closed.
    pub drain_timeout: Duration,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        GrpcLimits {
            timeout: Duration::from_secs(60),
            concurrency_per_connection: 256,
            max_concurrent_streams: 256,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
            leave_delay: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// What to serve and under which name.
pub struct Service {
    /// The registry name: `orchestrator`, `scheduler`, ...
    pub name: &'static str,
    /// Unique among instances of the service.
    pub instance_id: String,
    /// The gRPC service names, for health status.
    pub grpc_names: Vec<&'static str>,
    pub routes: tonic::service::Routes,
    pub auth: RequireAuthLayer,
}

/// The connections `listener` accepts, with Nagle's algorithm off, for a
/// server fed its own stream (tonic's `tcp_nodelay` applies only to
/// listeners it binds itself). A gRPC answer is several small writes; with
/// Nagle on, the last waits for the peer's delayed ACK (40 ms on Linux),
/// and every hop of the control plane paid it.
pub fn accepted(
    listener: Arc<TcpListener>,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY not set on an accepted connection: {e}");
            }
            stream
        });
        Some((accepted, listener))
    })
}

/// Answers gRPC health with NOT_SERVING on `listener` (and nothing else)
/// until `ready` fires, so probes see a process that is up but waiting for
/// its backends. Returns once it stopped accepting; the caller then serves
/// for real on the same listener.
pub async fn serve_not_ready(
    listener: Arc<TcpListener>,
    tls: Option<Tls>,
    ready: CancellationToken,
) -> Result<(), Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let accepted = accepted(listener);
    let router = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(5))
        .add_service(health_service);
    let signal = ready.cancelled_owned();
    match &tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.accept(accepted), signal)
                .await
        }
        None => router.serve_with_incoming_shutdown(accepted, signal).await,
    }
    .map_err(|e| Error::Internal(format!("health server failed: {e}")))
}

/// Serves until `shutdown`, then leaves: out of the registry and NOT_SERVING
/// first, still serving for [`GrpcLimits::leave_delay`] while clients move
/// to other instances, then no new calls and at most
/// [`GrpcLimits::drain_timeout`] for the calls in flight.
pub async fn serve(
    platform: &Platform,
    service: Service,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    serve_with(platform, service, listener, shutdown, GrpcLimits::default()).await
}

/// [`serve`] within explicit limits.
pub async fn serve_with(
    platform: &Platform,
    service: Service,
    listener: TcpListener,
    shutdown: CancellationToken,
    limits: GrpcLimits,
) -> Result<(), Error> {
    let address: SocketAddr = listener.local_addr().map_err(Error::internal)?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in &service.grpc_names {
        health_reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    // v1 and v1alpha both: grpcio-reflection and Evans speak only v1alpha.
    // Each lists what this server serves, not every service in the protos.
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(capstan_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in service.grpc_names.iter().copied() {
            builder = builder.with_service_name(name);
        }
        builder
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let reflection_v1 = reflection().build_v1().map_err(Error::internal)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(Error::internal)?;
    let routes = service
        .routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    platform
        .registry
        .register(Registration {
            id: service.instance_id.clone(),
            name: service.name.to_string(),
            address: platform.advertised(address)?,
            tags: registration_tags(platform.zone.as_deref()),
            check: Check::Ttl { ttl: REGISTRY_TTL },
        })
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    let heartbeat = {
        let registry = platform.registry.clone();
        let id = service.instance_id.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REGISTRY_TTL / 3);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = registry.pass_ttl(&id).await {
                            tracing::warn!("failed to renew registry check: {e}");
                        }
                    }
                }
            }
        })
    };
    tracing::info!(service = service.name, %address, "serving gRPC");
    let accepted = accepted(Arc::new(listener));
    let router = tonic::transport::Server::builder()
        .timeout(limits.timeout)
        .concurrency_limit_per_connection(limits.concurrency_per_connection)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .tcp_keepalive(Some(limits.tcp_keepalive))
        .layer(metrics::RpcMetricsLayer::new(
            service.name,
            &service.grpc_names,
        ))
        .layer({
            // Refused changes go to the audit log too.
            let store = platform.store.clone();
            service
                .auth
                .with_denial_hook(Arc::new(move |path, claims, reason| {
                    audit::denied(store.clone(), path, claims, reason)
                }))
        })
        .add_routes(routes);
    let stop_accepting = CancellationToken::new();
    let signal = stop_accepting.clone().cancelled_owned();
    let serving: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> = match &platform
        .tls
    {
        // TLS terminated here, with the certificate in force per connection.
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(tls.accept(accepted), signal)),
        None => Box::pin(router.serve_with_incoming_shutdown(accepted, signal)),
    };
    let mut serving = serving;
    let leave = async {
        shutdown.cancelled().await;
        heartbeat.abort();
        for name in &service.grpc_names {
            health_reporter
                .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        if let Err(e) = platform.registry.deregister(&service.instance_id).await {
            tracing::warn!(service = service.name, "could not leave the registry: {e}");
        }
        tracing::info!(service = service.name, "left the registry; draining");
        tokio::time::sleep(limits.leave_delay).await;
        stop_accepting.cancel();
    };
    let result = tokio::select! {
        result = &mut serving => result,
        () = leave => match tokio::time::timeout(limits.drain_timeout, &mut serving).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    service = service.name,
                    "calls still in flight after {:?}; closing their connections",
                    limits.drain_timeout
                );
                Ok(())
            }
        },
    };
    heartbeat.abort();
    let _ = platform.registry.deregister(&service.instance_id).await;
    result.map_err(|e| Error::Internal(format!("{} server failed: {e}", service.name)))
}

/// A random id with a readable prefix: `web-3f9c2a1b`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// A server's registry tags: `grpc`, its version and, when set, its zone
/// (Consul shows tags; the Consul adapter also puts the version in meta).
pub fn registration_tags(zone: Option<&str>) -> Vec<String> {
    let mut tags = vec![
        "grpc".to_string(),
        format!("version={}", env!("CARGO_PKG_VERSION")),
    ];
    if let Some(zone) = zone {
        tags.push(format!("zone={zone}"));
    }
    tags
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;
    use capstan_registry::EmbeddedRegistry;

    async fn register(registry: &EmbeddedRegistry, id: &str, address: &str) {
        registry
            .register(Registration {
                id: id.into(),
                name: "scheduler".into(),
                address: address.into(),
                tags: vec![],
                check: Check::Ttl {
                    ttl: Duration::from_secs(60),
                },
            })
            .await
            .unwrap();
        registry.pass_ttl(id).await.unwrap();
    }

    /// Calls take turns among the healthy instances, and follow the
    /// registry when one leaves, without anyone resolving again.
    #[tokio::test]
    async fn calls_take_turns_among_healthy_instances_and_follow_changes() {
        let shutdown = CancellationToken::new();
        let registry = Arc::new(EmbeddedRegistry::start(shutdown.child_token()));
        register(&registry, "s1", "10.0.0.1:1").await;
        register(&registry, "s2", "10.0.0.2:1").await;
        let endpoints = Endpoints::watch(registry.clone(), "scheduler");
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(endpoints.next("scheduler").await.unwrap());
        }
        seen.sort();
        assert_eq!(
            seen,
            ["10.0.0.1:1", "10.0.0.1:1", "10.0.0.2:1", "10.0.0.2:1"]
        );
        registry.deregister("s1").await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let picks: Vec<String> = [
                endpoints.next("scheduler").await.unwrap(),
                endpoints.next("scheduler").await.unwrap(),
            ]
            .into();
            if picks.iter().all(|a| a == "10.0.0.2:1") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "still calling s1");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
    }
}

#[cfg(test)]
mod accept_tests {
    use super::*;
    use futures::StreamExt;

    /// gRPC answers in several small writes (headers, data, trailers):
    /// with Nagle's algorithm on, the last of them waits for the client's
    /// delayed ACK, 40 ms on Linux, on every call.
    #[tokio::test]
    async fn served_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut incoming = Box::pin(accepted(Arc::new(listener)));
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let served = incoming.next().await.unwrap().unwrap();
        assert!(
            served.nodelay().unwrap(),
            "TCP_NODELAY is off on an accepted connection"
        );
    }
}
