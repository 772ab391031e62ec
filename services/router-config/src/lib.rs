//! The router-config service. It builds the routing table from the
//! orchestrator's healthy, routable instances, applies it to the built-in
//! edge proxy, and renders it as Traefik v3 dynamic configuration (over gRPC
//! and over HTTP for Traefik's HTTP provider).
//!
//! It rebuilds on `Sync` (the reconciler's, for the apps whose routes a
//! pass changed), on `routes.updated` and `app.*` events (once for all
//! that are queued), and every [`REBUILD_EVERY`] regardless (events are
//! hints; the orchestrator's state is the truth). Instance events are not
//! among them: an instance enters or leaves the routes only by a record
//! the reconciler writes, and it tells the router then, so a rebuild on
//! the agent's event would read the record before that write.
//! `Sync` returns only after the new table is applied, every router in front
//! has confirmed that it no longer routes to removed upstreams, and their
//! requests in flight have finished: that is how an instance leaves rotation
//! before it is stopped (ARCHITECTURE.md, "Drain-safe cutover").

pub mod ack;
pub mod proxy;
pub mod table;
pub mod traefik;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use capstan_authn::{Policy, RequireAuthLayer};
use capstan_proto::v1::orchestrator_client::OrchestratorClient;
use capstan_proto::v1::router_config_server::{RouterConfig, RouterConfigServer};
use capstan_proto::v1::{
    GetRoutesRequest, ListEndpointsRequest, RenderTraefikRequest, RenderTraefikResponse,
    SyncRequest,
};
use capstan_secrets::Secret;
use capstan_server::{Platform, Service};
use capstan_types::Error;
use capstan_types::id::MAX_NAMED_APPS;
use http::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::proxy::EdgeProxy;
pub use crate::proxy::{HttpLimits, TrustedProxies};
use crate::table::{Route, RouteTable, Upstream};

pub const REBUILD_EVERY: Duration = Duration::from_secs(2);
/// How long `Sync` waits for requests in flight to a removed upstream.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `Sync` waits for Traefik to confirm a table before the drain
/// goes ahead anyway (and a `routes.unconfirmed` event says so).
pub const TRAEFIK_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long requests Traefik sent to a server before it stopped routing to
/// it get to finish: Traefik does not say what it has in flight.
pub const TRAEFIK_IN_FLIGHT_GRACE: Duration = Duration::from_secs(1);
/// A waiting request asks the orchestrator to wake its app at most this
/// often (WakeApp is idempotent; this spares it a burst).
pub const WAKE_EVERY: Duration = Duration::from_secs(1);
/// How often the edge proxy's traffic is reported unless told otherwise
/// (the agents' sampling period).
pub const TRAFFIC_EVERY: Duration = Duration::from_secs(5);
const PROVIDER_TOKEN_PATH: &str = "router-config/provider-token";

pub struct RouterOptions {
    /// Where the edge proxy listens; `None` runs no proxy (Traefik routes instead).
    pub proxy: Option<TcpListener>,
    /// Where Traefik's HTTP provider fetches `/traefik`; `None` serves nothing.
    pub provider: Option<TcpListener>,
    pub limits: HttpLimits,
    /// Peers whose `X-Forwarded-*` headers the proxy believes.
    pub trusted_proxies: TrustedProxies,
    /// Consul KV to keep Traefik's Consul KV provider's keys in; `None`
    /// writes nothing.
    pub traefik_kv: Option<capstan_registry::ConsulKv>,
    /// Traefik instances whose API must confirm a table before `Sync`
    /// returns (what they actually route, whichever provider feeds them).
    pub traefik_apis: Vec<ack::TraefikApi>,
    pub traefik_confirm_timeout: Duration,
    pub traefik_in_flight_grace: Duration,
    /// How often what the edge proxy served goes to the metrics service.
    pub traffic_every: Duration,
}

impl RouterOptions {
    /// No proxy, no provider, no Traefik: fill in what the caller runs.
    pub fn new(trusted_proxies: TrustedProxies) -> RouterOptions {
        RouterOptions {
            proxy: None,
            provider: None,
            limits: HttpLimits::default(),
            trusted_proxies,
            traefik_kv: None,
            traefik_apis: Vec::new(),
            traefik_confirm_timeout: TRAEFIK_CONFIRM_TIMEOUT,
            traefik_in_flight_grace: TRAEFIK_IN_FLIGHT_GRACE,
            traffic_every: TRAFFIC_EVERY,
        }
    }
}

/// One Traefik in front, the newest table generation it has confirmed, and
/// the servers that table allowed: Traefik routes within them.
struct Downstream {
    api: ack::TraefikApi,
    confirmed: std::sync::atomic::AtomicU64,
    within: std::sync::Mutex<Option<std::collections::BTreeSet<String>>>,
}

#[derive(Clone)]
struct Router {
    platform: Platform,
    proxy: Arc<EdgeProxy>,
    /// Serializes rebuilds, so generations only go up.
    rebuilding: Arc<Mutex<()>>,
    /// Poked when the table changes.
    changed: Arc<tokio::sync::Notify>,
    traefik: Arc<Vec<Downstream>>,
    traefik_confirm_timeout: Duration,
    traefik_in_flight_grace: Duration,
}

/// Which routes a rebuild reads again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    Every,
    /// These apps' routes only: an app not found has none.
    Apps(std::collections::BTreeSet<String>),
}

impl Scope {
    /// `apps`, or every app when none (or too many) are named.
    fn of(apps: impl IntoIterator<Item = String>) -> Scope {
        let apps: std::collections::BTreeSet<String> = apps.into_iter().collect();
        if apps.is_empty() || apps.len() > MAX_NAMED_APPS {
            Scope::Every
        } else {
            Scope::Apps(apps)
        }
    }

    /// The routes after a read of this scope found `fetched`: those of the
    /// apps in scope are replaced (an app in scope not found loses its
    /// route), the others stay as they are. In app order.
    fn apply(&self, current: &[Route], fetched: Vec<Route>) -> Vec<Route> {
        let mut routes: Vec<Route> = match self {
            Scope::Every => fetched,
            Scope::Apps(apps) => current
                .iter()
                .filter(|route| !apps.contains(&route.app))
                .cloned()
                .chain(
                    fetched
                        .into_iter()
                        .filter(|route| apps.contains(&route.app)),
                )
                .collect(),
        };
        routes.sort_by(|a, b| a.app.cmp(&b.app));
        routes
    }
}

impl Router {
    async fn fetch(&self, scope: &Scope) -> Result<Vec<Route>, Error> {
        let channel = self.platform.client("orchestrator").await?;
        let apps = match scope {
            Scope::Every => Vec::new(),
            Scope::Apps(apps) => apps.iter().cloned().collect(),
        };
        let response = OrchestratorClient::new(channel)
            .list_endpoints(ListEndpointsRequest { apps })
            .await
            .map_err(capstan_proto::into_error)?
            .into_inner();
        let mut routes: Vec<Route> = response
            .apps
            .into_iter()
            .map(|app| {
                let mut upstreams: Vec<Upstream> = app
                    .endpoints
                    .into_iter()
                    .map(|e| Upstream {
                        instance_id: e.instance_id,
                        address: e.address,
                    })
                    .collect();
                upstreams.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
                let health = (!app.health_path.is_empty()).then(|| table::RouteHealth {
                    path: app.health_path.clone(),
                    interval_ms: app.health_interval_ms,
                    timeout_ms: app.health_timeout_ms,
                });
                Route {
                    app: app.app,
                    project: app.project,
                    hosts: app.hosts,
                    upstreams: upstreams.into(),
                    health,
                    wakeable: app.wakeable,
                }
            })
            .collect();
        routes.sort_by(|a, b| a.app.cmp(&b.app));
        Ok(routes)
    }

    /// Fetches the endpoints of `scope` and applies them if they changed.
    /// Returns the table in force. Rebuilds read and apply one at a time,
    /// so an older read never replaces a newer one.
    async fn rebuild(&self, scope: &Scope) -> Result<RouteTable, Error> {
        let _rebuilding = self.rebuilding.lock().await;
        let fetched = self.fetch(scope).await?;
        let current = self.proxy.table();
        let routes = scope.apply(&current.routes, fetched);
        let mut next = RouteTable {
            generation: current.generation + 1,
            routes,
        };
        next.share_unchanged(&current);
        if next.same_routes(&current) {
            return Ok(current);
        }
        self.proxy.apply(next.clone());
        self.changed.notify_one();
        tracing::info!(
            generation = next.generation,
            routes = next.routes.len(),
            "routing table updated"
        );
        Ok(next)
    }

    /// Waits for requests in flight to upstreams the table no longer has,
    /// whichever rebuild removed them (level, not edge: a periodic rebuild
    /// may have dropped an upstream just before this `Sync`).
    async fn drain(&self) {
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        loop {
            let draining = self.proxy.draining();
            if draining.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    upstreams = ?draining,
                    "requests still in flight to removed upstreams after {DRAIN_TIMEOUT:?}"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every Traefik in front routes to nothing outside `table`
    /// (newer upstreams may still be missing there: that loses no request),
    /// then gives what it sent before that [`TRAEFIK_IN_FLIGHT_GRACE`].
    /// A table that only adds servers to the last one a Traefik confirmed
    /// needs nothing from it: it already routes within that one.
    /// A Traefik that does not confirm in time is reported in a
    /// `routes.unconfirmed` event, and the drain goes ahead.
    async fn confirm_downstream(&self, table: &RouteTable) {
        let allowed: std::collections::BTreeSet<String> =
            table.addresses().map(|a| format!("http://{a}")).collect();
        let waits = self.traefik.iter().map(|downstream| {
            let allowed = &allowed;
            async move {
                use std::sync::atomic::Ordering;
                if downstream.confirmed.load(Ordering::Acquire) >= table.generation {
                    return;
                }
                {
                    let mut within = downstream.within.lock().expect("within lock poisoned");
                    if within.as_ref().is_some_and(|w| w.is_subset(allowed)) {
                        *within = Some(allowed.clone());
                        downstream
                            .confirmed
                            .fetch_max(table.generation, Ordering::AcqRel);
                        return;
                    }
                }
                match downstream
                    .api
                    .confirm_only(allowed, self.traefik_confirm_timeout)
                    .await
                {
                    Ok(took) => {
                        tokio::time::sleep(self.traefik_in_flight_grace).await;
                        *downstream.within.lock().expect("within lock poisoned") =
                            Some(allowed.clone());
                        downstream
                            .confirmed
                            .fetch_max(table.generation, Ordering::AcqRel);
                        tracing::info!(
                            traefik = downstream.api.url(),
                            generation = table.generation,
                            confirm_ms = took.as_millis() as u64,
                            "Traefik confirmed the routing table"
                        );
                    }
                    Err(reason) => {
                        let message = format!(
                            "Traefik at {} did not confirm routing table {}; removed instances drain anyway: {reason}",
                            downstream.api.url(),
                            table.generation
                        );
                        tracing::warn!("{message}");
                        let event = capstan_types::Event::new(
                            capstan_server::new_id("ev"),
                            capstan_server::now_ms(),
                            capstan_types::EventKind::RoutesUnconfirmed,
                        )
                        .message(&message);
                        self.platform.emit(event).await;
                    }
                }
            }
        });
        futures::future::join_all(waits).await;
    }
}

fn table_to_wire(table: &RouteTable) -> capstan_proto::v1::RouteTable {
    capstan_proto::v1::RouteTable {
        generation: table.generation,
        routes: table
            .routes
            .iter()
            .map(|r| capstan_proto::v1::Route {
                app: r.app.clone(),
                project: r.project.clone(),
                hosts: r.hosts.clone(),
                upstreams: r
                    .upstreams
                    .iter()
                    .map(|u| capstan_proto::v1::Upstream {
                        instance_id: u.instance_id.clone(),
                        address: u.address.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The routes the caller may see: a caller confined to a project sees
/// that project's apps only.
fn visible_table<T>(request: &Request<T>, mut table: RouteTable) -> Result<RouteTable, Status> {
    let caller = capstan_authn::caller(request).map_err(capstan_proto::status)?;
    table
        .routes
        .retain(|route| caller.in_project(&route.project));
    Ok(table)
}

#[tonic::async_trait]
impl RouterConfig for Router {
    async fn get_routes(
        &self,
        request: Request<GetRoutesRequest>,
    ) -> Result<Response<capstan_proto::v1::RouteTable>, Status> {
        let app = &request.get_ref().app;
        let only = if app.is_empty() {
            None
        } else {
            Some(capstan_types::AppName::parse("app", app).map_err(capstan_proto::status)?)
        };
        let mut table = self.proxy.table();
        if let Some(only) = only {
            table.routes.retain(|route| route.app == only.as_str());
            // As every method about one app: another project's is refused,
            // not answered as if it had no route.
            let caller = capstan_authn::caller(&request).map_err(capstan_proto::status)?;
            for route in &table.routes {
                caller
                    .check_project(&route.app, &route.project)
                    .map_err(capstan_proto::status)?;
            }
        }
        let table = visible_table(&request, table)?;
        Ok(Response::new(table_to_wire(&table)))
    }

    async fn sync(
        &self,
        request: Request<SyncRequest>,
    ) -> Result<Response<capstan_proto::v1::RouteTable>, Status> {
        let apps = capstan_types::AppName::parse_list("apps", &request.into_inner().apps)
            .map_err(capstan_proto::status)?;
        let scope = Scope::of(apps.into_iter().map(|app| app.to_string()));
        let mut table = self.rebuild(&scope).await.map_err(capstan_proto::status)?;
        self.confirm_downstream(&table).await;
        self.drain().await;
        // The routes it was asked about: a pass that syncs one app pays for
        // that app's upstreams, not for the whole table's.
        if let Scope::Apps(apps) = &scope {
            table.routes.retain(|route| apps.contains(&route.app));
        }
        Ok(Response::new(table_to_wire(&table)))
    }

    async fn render_traefik(
        &self,
        request: Request<RenderTraefikRequest>,
    ) -> Result<Response<RenderTraefikResponse>, Status> {
        let table = visible_table(&request, self.proxy.table())?;
        let json = serde_json::to_string_pretty(&traefik::render(&table))
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RenderTraefikResponse { json }))
    }
}

/// The bearer token Traefik's HTTP provider sends (its `headers` option).
pub async fn provider_token(platform: &Platform) -> Result<Secret, Error> {
    capstan_secrets::get_or_create(platform.secrets.as_ref(), PROVIDER_TOKEN_PATH, || {
        Secret::new(capstan_authn::generate_api_key())
    })
    .await
    .map_err(Error::internal)
}

/// Keeps Traefik's keys in Consul KV equal to the table in force: at
/// start (which also removes keys a previous run left), on every change,
/// and every [`REBUILD_EVERY`] after a failed write.
async fn publish_to_consul_kv(
    router: Router,
    kv: capstan_registry::ConsulKv,
    shutdown: CancellationToken,
) {
    let mut published: Option<std::collections::BTreeMap<String, String>> = None;
    loop {
        let wanted = traefik::kv_pairs(&traefik::render(&router.proxy.table()));
        if published.as_ref() != Some(&wanted) {
            let prefix = format!("{}/", traefik::KV_ROOT);
            match kv.sync(&prefix, &wanted, traefik::kv_owned).await {
                Ok(synced) => {
                    tracing::info!(
                        set = synced.set,
                        deleted = synced.deleted,
                        transactions = synced.transactions,
                        "routing table written to Consul KV"
                    );
                    published = Some(wanted);
                }
                Err(e) => tracing::warn!("routing table not written to Consul KV, retrying: {e}"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = router.changed.notified() => {}
            _ = tokio::time::sleep(REBUILD_EVERY), if published.is_none() => {}
        }
    }
}

/// Every `every`, sends what the edge proxy served per app and instance to
/// the metrics service: requests, 4xx and 5xx responses (counts over the
/// period) and the latency histogram, zeros for routed instances that
/// served nothing. Metrics are hints: a batch the
/// metrics service does not take is dropped.
async fn report_traffic(router: Router, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut traffic = router.proxy.take_traffic();
        // Every routed instance reports, idle ones with zeros: "no
        // requests" is a reading (the autoscaler scales down and to zero
        // on it), where no sample at all means no edge proxy saw the app.
        for route in &router.proxy.table().routes {
            for upstream in route.upstreams.iter() {
                traffic
                    .entry((route.app.clone(), upstream.instance_id.clone()))
                    .or_default();
            }
        }
        if traffic.is_empty() {
            continue;
        }
        let samples = traffic_samples(traffic, capstan_server::now_ms());
        router.platform.report_samples(samples).await;
    }
}

/// Asks the orchestrator to wake the apps requests wait for, each at most
/// once per [`WAKE_EVERY`] (a burst of first requests is one wake).
async fn wake_apps(
    router: Router,
    mut apps: tokio::sync::mpsc::Receiver<String>,
    shutdown: CancellationToken,
) {
    let mut asked: std::collections::HashMap<String, tokio::time::Instant> = Default::default();
    loop {
        let app = tokio::select! {
            _ = shutdown.cancelled() => return,
            app = apps.recv() => match app {
                Some(app) => app,
                None => return,
            },
        };
        let now = tokio::time::Instant::now();
        asked.retain(|_, at| now.duration_since(*at) < WAKE_EVERY);
        if asked.contains_key(&app) {
            continue;
        }
        asked.insert(app.clone(), now);
        let woken = async {
            let channel = router.platform.client("orchestrator").await?;
            OrchestratorClient::new(channel)
                .wake_app(capstan_proto::v1::WakeAppRequest { name: app.clone() })
                .await
                .map(|r| r.into_inner().woken)
                .map_err(capstan_proto::into_error)
        };
        match woken.await {
            Ok(true) => {
                tracing::info!(app = %app, "woke an app scaled to zero for a waiting request")
            }
            Ok(false) => {}
            Err(e) => {
                // Ask again on the next request.
                asked.remove(&app);
                tracing::warn!(app = %app, "could not wake the app: {e}");
            }
        }
    }
}

/// The readings of one period's traffic: four per (app, instance).
pub fn traffic_samples(
    traffic: std::collections::HashMap<(String, String), proxy::Traffic>,
    at_ms: i64,
) -> Vec<capstan_proto::v1::InstanceReadings> {
    use capstan_proto::v1::{InstanceReadings, MetricName, Reading};
    let reading = |metric: MetricName, value: f64, buckets: Vec<u64>| Reading {
        metric: metric as i32,
        value,
        buckets,
    };
    traffic
        .into_iter()
        .map(|((app, instance_id), t)| InstanceReadings {
            app,
            instance_id,
            node_id: String::new(),
            at_ms,
            readings: vec![
                reading(MetricName::Requests, t.requests as f64, Vec::new()),
                reading(MetricName::Responses4xx, t.responses_4xx as f64, Vec::new()),
                reading(MetricName::Responses5xx, t.responses_5xx as f64, Vec::new()),
                reading(
                    MetricName::LatencyMs,
                    t.latency_sum_ms,
                    t.latency_buckets.to_vec(),
                ),
            ],
        })
        .collect()
}

/// Anyone with a key may read the table; only the orchestrator triggers a
/// sync (it blocks until in-flight requests drain).
pub fn policy() -> Policy {
    Policy::new()
        .read("/capstan.v1.RouterConfig/GetRoutes")
        .read("/capstan.v1.RouterConfig/RenderTraefik")
        .services("/capstan.v1.RouterConfig/Sync")
}

/// Serves router-config on `listener`, plus the proxy and provider endpoints
/// in `options`, until `shutdown`.
pub async fn run(
    platform: Platform,
    options: RouterOptions,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let router = Router {
        platform: platform.clone(),
        proxy: EdgeProxy::new(options.limits, options.trusted_proxies.clone()),
        rebuilding: Arc::default(),
        changed: Arc::default(),
        traefik: Arc::new(
            options
                .traefik_apis
                .iter()
                .map(|api| Downstream {
                    api: api.clone(),
                    confirmed: Default::default(),
                    within: Default::default(),
                })
                .collect(),
        ),
        traefik_confirm_timeout: options.traefik_confirm_timeout,
        traefik_in_flight_grace: options.traefik_in_flight_grace,
    };
    let tasks = tokio_util::task::TaskTracker::new();

    let (waker, woken) = tokio::sync::mpsc::channel(64);
    router.proxy.set_waker(waker);
    tasks.spawn(wake_apps(router.clone(), woken, shutdown.clone()));

    if let Some(proxy_listener) = options.proxy {
        // Only a proxy that serves reports traffic: zeros from one that
        // does not would read as an idle app.
        tasks.spawn(report_traffic(
            router.clone(),
            options.traffic_every,
            shutdown.clone(),
        ));
        let proxy = router.proxy.clone();
        let handler = move |request, remote| proxy.clone().handle(request, remote);
        tasks.spawn(proxy::serve(
            proxy_listener,
            handler,
            shutdown.clone(),
            Duration::from_secs(10),
            options.limits,
        ));
    }
    if let Some(provider_listener) = options.provider {
        let expected = format!("Bearer {}", provider_token(&platform).await?.expose());
        let proxy = router.proxy.clone();
        let handler = move |request: http::Request<hyper::body::Incoming>, _remote| {
            let presented = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map_or(&b""[..], |v| v.as_bytes());
            let authorized = capstan_authn::constant_time_eq(presented, expected.as_bytes());
            let response = if !authorized {
                proxy::text(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token\n".into(),
                )
            } else if request.uri().path() != "/traefik" {
                proxy::text(
                    StatusCode::NOT_FOUND,
                    "the Traefik provider document is at /traefik\n".into(),
                )
            } else {
                let mut response =
                    proxy::text(StatusCode::OK, traefik::render(&proxy.table()).to_string());
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                response
            };
            std::future::ready(response)
        };
        tasks.spawn(proxy::serve(
            provider_listener,
            handler,
            shutdown.clone(),
            Duration::from_secs(1),
            options.limits,
        ));
    }

    if let Some(kv) = options.traefik_kv {
        tasks.spawn(publish_to_consul_kv(router.clone(), kv, shutdown.clone()));
    }

    let rebuilder = router.clone();
    let rebuild_shutdown = shutdown.clone();
    tasks.spawn(async move {
        let mut subscription = None;
        let mut tick = tokio::time::interval(REBUILD_EVERY);
        loop {
            if subscription.is_none() {
                // A private watch, not a shared queue: every replica keeps
                // its own table, so each must see every hint.
                subscription = rebuilder.platform.bus.watch(&["routes.updated", "app.#"]).await.ok();
            }
            let scope = tokio::select! {
                _ = rebuild_shutdown.cancelled() => return,
                _ = tick.tick() => Scope::Every,
                delivery = async { subscription.as_mut().expect("checked above").next().await }, if subscription.is_some() => {
                    match delivery {
                        Some(delivery) => {
                            // Events are hints: one rebuild reads the routes
                            // of every app the events already queued name,
                            // and the periodic rebuild reads them all.
                            let mut apps = vec![delivery.event.app.clone()];
                            let _ = delivery.ack().await;
                            if let Some(subscription) = subscription.as_mut() {
                                while let Some(Some(queued)) = futures::FutureExt::now_or_never(subscription.next()) {
                                    apps.push(queued.event.app.clone());
                                    let _ = queued.ack().await;
                                }
                            }
                            if apps.iter().any(String::is_empty) {
                                Scope::Every
                            } else {
                                Scope::of(apps)
                            }
                        }
                        None => {
                            subscription = None;
                            Scope::Every
                        }
                    }
                }
            };
            if let Err(e) = rebuilder.rebuild(&scope).await {
                tracing::debug!("routing table not rebuilt: {e}");
            }
        }
    });

    let policy = policy();
    let service = Service {
        name: "router-config",
        instance_id: capstan_server::new_id("router-config"),
        grpc_names: vec!["capstan.v1.RouterConfig"],
        routes: tonic::service::Routes::new(RouterConfigServer::new(router)),
        auth: RequireAuthLayer::new(platform.verifier(), policy),
    };
    let result = capstan_server::serve(&platform, service, listener, shutdown).await;
    tasks.close();
    tasks.wait().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(app: &str, upstreams: &[&str]) -> Route {
        Route {
            app: app.into(),
            project: "default".into(),
            hosts: vec![format!("{app}.localhost")],
            upstreams: upstreams
                .iter()
                .map(|id| Upstream {
                    instance_id: id.to_string(),
                    address: format!("127.0.0.1:{}", 4000 + id.len()),
                })
                .collect::<Vec<_>>()
                .into(),
            health: None,
            wakeable: false,
        }
    }

    /// A rebuild of one app shares every other app's upstream list with the
    /// table before it (so copying, comparing and compiling the table cost
    /// what changed), and a list read again unchanged is shared too.
    #[test]
    fn a_table_built_from_the_last_shares_what_did_not_change() {
        let current = RouteTable {
            generation: 1,
            routes: vec![route("a", &["a-1", "a-2"]), route("b", &["b-1"])],
        };
        let scope = Scope::of(["b".to_string()]);
        let mut next = RouteTable {
            generation: 2,
            routes: scope.apply(&current.routes, vec![route("b", &["b-1", "b-22"])]),
        };
        next.share_unchanged(&current);
        assert!(Arc::ptr_eq(
            &next.routes[0].upstreams,
            &current.routes[0].upstreams
        ));
        assert!(!Arc::ptr_eq(
            &next.routes[1].upstreams,
            &current.routes[1].upstreams
        ));
        assert_eq!(next.routes[1].upstreams.len(), 2);

        let fetched = vec![route("a", &["a-1", "a-2"]), route("b", &["b-1", "b-22"])];
        let mut again = RouteTable {
            generation: 3,
            routes: Scope::Every.apply(&next.routes, fetched),
        };
        again.share_unchanged(&next);
        for (read, last) in again.routes.iter().zip(&next.routes) {
            assert!(
                Arc::ptr_eq(&read.upstreams, &last.upstreams),
                "{}",
                read.app
            );
        }
    }

    #[test]
    fn a_scoped_read_replaces_its_apps_routes_and_keeps_the_others() {
        let current = vec![route("api", &["api-1"]), route("web", &["web-1"])];
        let scope = Scope::of(["web".to_string(), "new".to_string()]);
        let next = scope.apply(
            &current,
            vec![route("web", &["web-1", "web-22"]), route("new", &["new-1"])],
        );
        assert_eq!(
            next,
            vec![
                route("api", &["api-1"]),
                route("new", &["new-1"]),
                route("web", &["web-1", "web-22"]),
            ]
        );
    }

    #[test]
    fn an_app_in_scope_that_was_not_found_loses_its_route() {
        let current = vec![route("api", &["api-1"]), route("web", &["web-1"])];
        let next = Scope::of(["web".to_string()]).apply(&current, Vec::new());
        assert_eq!(next, vec![route("api", &["api-1"])]);
    }

    #[test]
    fn a_read_of_every_app_is_the_whole_table_and_so_is_one_of_too_many() {
        let current = vec![route("api", &["api-1"])];
        assert_eq!(
            Scope::Every.apply(&current, vec![route("web", &["web-1"])]),
            vec![route("web", &["web-1"])]
        );
        assert_eq!(Scope::of(Vec::new()), Scope::Every);
        let many = (0..=MAX_NAMED_APPS).map(|i| format!("app-{i}"));
        assert_eq!(Scope::of(many), Scope::Every);
    }

    #[test]
    fn routes_fetched_outside_the_scope_are_not_taken() {
        let current = vec![route("api", &["api-1"])];
        let next = Scope::of(["web".to_string()]).apply(
            &current,
            vec![route("api", &["api-9"]), route("web", &["web-1"])],
        );
        assert_eq!(
            next,
            vec![route("api", &["api-1"]), route("web", &["web-1"])]
        );
    }
}
