//! The built-in edge proxy: Host-based routing, round robin over healthy
//! upstreams, pooled keep-alive connections, `X-Forwarded-*` headers.
//!
//! Unknown host → 404; a known app with nothing healthy → 503. A request that
//! could not reach an upstream and has no body is retried once on the next
//! upstream. Requests in flight are counted per upstream, so a removed
//! upstream can be drained before its instance is stopped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::table::{Route, RouteTable};
use crate::upstream::{Lease, Pool, PoolSettings};

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Named once: a header looked up by `&str` is parsed and hashed anew on
/// every call, which was a tenth of the proxy's work per request.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// The limits of Capstan's HTTP servers (the edge proxy and the Traefik
/// provider endpoint). Every one is explicit; the README's "Limits" table
/// lists them.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Time to receive a request's headers. hyper runs the same timer while
    /// a keep-alive connection waits for its next request, so it is also the
    /// idle timeout: a slowloris client is cut off after it.
    pub header_read_timeout: Duration,
    /// Open client connections; a connection past this is closed at once.
    pub max_connections: usize,
    /// Time for an upstream to answer with its headers; then 504.
    pub upstream_timeout: Duration,
    /// Bytes of buffered request head (HTTP/1).
    pub max_header_bytes: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub max_h2_streams: u32,
    /// Requests per app that wait while an app scaled to zero starts;
    /// past it, 503 with `Retry-After`.
    pub wake_queue: usize,
    /// How long such a request waits for an instance; then 503 with
    /// `Retry-After`.
    pub wake_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(15),
            max_connections: 10_000,
            upstream_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_h2_streams: 256,
            wake_queue: 100,
            wake_timeout: Duration::from_secs(30),
        }
    }
}

pub use capstan_server::trusted::TrustedProxies;

/// What the proxy served for one (app, instance) since it was last taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Traffic {
    pub requests: u64,
    pub responses_4xx: u64,
    pub responses_5xx: u64,
    /// Sum of the latencies, ms.
    pub latency_sum_ms: f64,
    /// Counts per bucket of `capstan_metrics::model::LATENCY_BOUNDS_MS`.
    pub latency_buckets: [u64; capstan_metrics::model::LATENCY_BUCKETS],
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            requests: 0,
            responses_4xx: 0,
            responses_5xx: 0,
            latency_sum_ms: 0.0,
            latency_buckets: [0; capstan_metrics::model::LATENCY_BUCKETS],
        }
    }
}

pub struct EdgeProxy {
    /// The table in force, swapped whole: a request reads it without a lock.
    table: ArcSwap<Compiled>,
    /// Requests in flight per upstream address, kept across tables so a
    /// removed upstream can be drained; each compiled upstream holds its
    /// counter, so a request touches no map.
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// What was served per (app, instance), resolved the same way.
    stats: Mutex<HashMap<(String, String), Arc<Stats>>>,
    /// Requests waiting for a woken app, per app.
    waiting: Mutex<HashMap<String, usize>>,
    /// Bumped on every applied table: waiters look again.
    generation: tokio::sync::watch::Sender<u64>,
    /// Where the names of apps to wake go (router-config asks the
    /// orchestrator); unset: nothing is woken.
    waker: std::sync::OnceLock<tokio::sync::mpsc::Sender<String>>,
    /// Keep-alive connections per upstream address, shared by every route
    /// that lists it; dropped with the last table that does.
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    pool_settings: PoolSettings,
    limits: HttpLimits,
    trusted: TrustedProxies,
}

/// A routing table made ready to serve: host lookup by hash, and each
/// route's and upstream's counters resolved when the table is applied.
struct Compiled {
    table: RouteTable,
    hosts: HashMap<String, usize, foldhash::fast::RandomState>,
    /// Shared with the last table for each route whose upstream list it
    /// shares (`RouteTable::share_unchanged`): applying a table compiles
    /// only the routes that changed.
    routes: Vec<Arc<CompiledRoute>>,
}

struct CompiledRoute {
    next: AtomicUsize,
    /// (app, `none`): requests that no instance answered.
    unserved: Arc<Stats>,
    upstreams: Vec<CompiledUpstream>,
}

struct CompiledUpstream {
    /// `None` when the address is not a valid authority: never tried.
    pool: Option<Arc<Pool>>,
    in_flight: Arc<AtomicUsize>,
    stats: Arc<Stats>,
}

/// One (app, instance)'s Prometheus series and traffic since last taken.
/// The series are resolved on first use, so an instance that served
/// nothing has none.
struct Stats {
    app: String,
    instance: String,
    requests: [std::sync::OnceLock<prometheus::IntCounter>; 5],
    duration: std::sync::OnceLock<prometheus::Histogram>,
    traffic: Mutex<Traffic>,
}

impl Stats {
    fn new(app: &str, instance: &str) -> Self {
        Stats {
            app: app.to_string(),
            instance: instance.to_string(),
            requests: Default::default(),
            duration: std::sync::OnceLock::new(),
            traffic: Mutex::default(),
        }
    }

    fn record(&self, status: u16, took: Duration) {
        let metrics = capstan_server::metrics::metrics();
        let class = capstan_server::metrics::status_class(status);
        let slot = usize::from(class.as_bytes()[0] - b'1').min(4);
        self.requests[slot]
            .get_or_init(|| {
                metrics.proxy_requests.with_label_values(&[
                    self.app.as_str(),
                    self.instance.as_str(),
                    class,
                ])
            })
            .inc();
        let seconds = took.as_secs_f64();
        self.duration
            .get_or_init(|| {
                metrics
                    .proxy_duration
                    .with_label_values(&[self.app.as_str(), self.instance.as_str()])
            })
            .observe(seconds);
        let mut traffic = self.traffic.lock().expect("traffic lock poisoned");
        traffic.requests += 1;
        traffic.responses_4xx += u64::from((400..500).contains(&status));
        traffic.responses_5xx += u64::from(status >= 500);
        let ms = seconds * 1000.0;
        traffic.latency_sum_ms += ms;
        traffic.latency_buckets[capstan_metrics::model::latency_bucket(ms)] += 1;
    }
}

impl EdgeProxy {
    pub fn new(limits: HttpLimits, trusted: TrustedProxies) -> Arc<Self> {
        let proxy = Arc::new(EdgeProxy {
            table: ArcSwap::from_pointee(Compiled {
                table: RouteTable::default(),
                hosts: HashMap::default(),
                routes: Vec::new(),
            }),
            in_flight: Mutex::default(),
            stats: Mutex::default(),
            waiting: Mutex::default(),
            generation: tokio::sync::watch::Sender::new(0),
            waker: std::sync::OnceLock::new(),
            pools: Mutex::default(),
            pool_settings: PoolSettings::default(),
            limits,
            trusted,
        });
        // Idle connections of upstreams no request uses are closed too;
        // the sweep ends with the proxy.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&proxy);
            let every = proxy.pool_settings.idle_timeout / 2;
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(proxy) = weak.upgrade() else { return };
                    proxy.expire_idle();
                }
            });
        }
        proxy
    }

    /// Closes the upstream connections idle past their time.
    fn expire_idle(&self) {
        let pools: Vec<Arc<Pool>> = self
            .pools
            .lock()
            .expect("pool map lock poisoned")
            .values()
            .cloned()
            .collect();
        for pool in pools {
            pool.expire();
        }
    }

    /// Idle keep-alive connections to `address` (for tests).
    pub fn idle_connections(&self, address: &str) -> usize {
        self.pools
            .lock()
            .expect("pool map lock poisoned")
            .get(address)
            .map_or(0, |pool| pool.idle_count())
    }

    /// What was served per (app, instance) since the last call.
    pub fn take_traffic(&self) -> HashMap<(String, String), Traffic> {
        let mut taken = HashMap::new();
        self.stats
            .lock()
            .expect("stats lock poisoned")
            .retain(|key, stats| {
                let traffic =
                    std::mem::take(&mut *stats.traffic.lock().expect("traffic lock poisoned"));
                if traffic.requests > 0 {
                    taken.insert(key.clone(), traffic);
                }
                // Still in a table someone serves with.
                Arc::strong_count(stats) > 1
            });
        taken
    }

    pub fn apply(&self, table: RouteTable) {
        let metrics = capstan_server::metrics::metrics();
        metrics.routes.set(table.routes.len() as i64);
        metrics
            .route_upstreams
            .set(table.addresses().count() as i64);
        let generation = table.generation;
        let compiled = self.compile(table);
        self.table.store(Arc::new(compiled));
        // Counters no table refers to and nothing is in flight on.
        self.in_flight
            .lock()
            .expect("in-flight lock poisoned")
            .retain(|_, counter| Arc::strong_count(counter) > 1);
        // Pools only the map holds: their idle connections close now (one
        // a response still reads closes when that response ends).
        self.pools
            .lock()
            .expect("pool map lock poisoned")
            .retain(|_, pool| Arc::strong_count(pool) > 1);
        self.generation.send_replace(generation);
    }

    fn compile(&self, table: RouteTable) -> Compiled {
        let mut in_flight = self.in_flight.lock().expect("in-flight lock poisoned");
        let mut stats = self.stats.lock().expect("stats lock poisoned");
        let mut pools = self.pools.lock().expect("pool map lock poisoned");
        let settings = self.pool_settings;
        let mut pool_of = |address: &str| -> Option<Arc<Pool>> {
            if let Some(pool) = pools.get(address) {
                return Some(pool.clone());
            }
            let authority: Authority = address.parse().ok()?;
            let pool = Arc::new(Pool::new(authority, settings));
            pools.insert(address.to_string(), pool.clone());
            Some(pool)
        };
        let mut stats_of = |app: &str, instance: &str| {
            stats
                .entry((app.to_string(), instance.to_string()))
                .or_insert_with(|| Arc::new(Stats::new(app, instance)))
                .clone()
        };
        let previous = self.table.load_full();
        let compiled_before: HashMap<&str, (&Route, &Arc<CompiledRoute>)> = previous
            .table
            .routes
            .iter()
            .zip(&previous.routes)
            .map(|(route, compiled)| (route.app.as_str(), (route, compiled)))
            .collect();
        let routes = table
            .routes
            .iter()
            .map(|route| {
                if let Some((before, compiled)) = compiled_before.get(route.app.as_str())
                    && Arc::ptr_eq(&before.upstreams, &route.upstreams)
                {
                    return Arc::clone(compiled);
                }
                Arc::new(CompiledRoute {
                    next: AtomicUsize::new(0),
                    unserved: stats_of(&route.app, "none"),
                    upstreams: route
                        .upstreams
                        .iter()
                        .map(|upstream| CompiledUpstream {
                            pool: pool_of(&upstream.address),
                            in_flight: in_flight
                                .entry(upstream.address.clone())
                                .or_default()
                                .clone(),
                            stats: stats_of(&route.app, &upstream.instance_id),
                        })
                        .collect(),
                })
            })
            .collect();
        let hosts = table.host_index().into_iter().collect();
        Compiled {
            table,
            hosts,
            routes,
        }
    }

    /// Where to send the names of apps a request waits for.
    pub fn set_waker(&self, waker: tokio::sync::mpsc::Sender<String>) {
        let _ = self.waker.set(waker);
    }

    /// For a request to a wakeable app with no upstream: takes a place in
    /// the app's queue, asks for the app to be woken, and waits until the
    /// host's route has an upstream (the table to route with), or answers
    /// 503 with `Retry-After` when the queue is full or the wait times out.
    async fn wake_and_wait(
        &self,
        app: &str,
        hostname: &str,
    ) -> Result<Arc<Compiled>, Response<ProxyBody>> {
        let unavailable = |retry_after: &'static str, why: String| {
            let mut response = text(StatusCode::SERVICE_UNAVAILABLE, why);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(retry_after));
            response
        };
        let Some(_place) = QueuePlace::take(&self.waiting, app, self.limits.wake_queue) else {
            return Err(unavailable(
                "1",
                format!(
                    "capstan: app `{app}` is starting and {} requests already wait for it; retry shortly\n",
                    self.limits.wake_queue
                ),
            ));
        };
        let mut generation = self.generation.subscribe();
        if let Some(waker) = self.waker.get() {
            let _ = waker.try_send(app.to_string());
        }
        let deadline = tokio::time::Instant::now() + self.limits.wake_timeout;
        loop {
            let compiled = self.table.load_full();
            match compiled.hosts.get(hostname) {
                Some(&i)
                    if compiled.table.routes[i].upstreams.is_empty()
                        && compiled.table.routes[i].wakeable => {}
                // Upstreams, or the route changed: route with this table.
                _ => return Ok(compiled),
            }
            let changed = tokio::time::timeout_at(deadline, generation.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                return Err(unavailable(
                    "5",
                    format!(
                        "capstan: app `{app}` did not start within {:?}; retry shortly\n",
                        self.limits.wake_timeout
                    ),
                ));
            }
        }
    }

    pub fn table(&self) -> RouteTable {
        self.table.load().table.clone()
    }

    /// Addresses that still have requests in flight but that the table in
    /// force no longer routes to (whichever rebuild removed them).
    pub fn draining(&self) -> Vec<String> {
        let table = self.table.load_full();
        self.in_flight
            .lock()
            .expect("in-flight lock poisoned")
            .iter()
            .filter(|(address, count)| {
                count.load(Ordering::Acquire) > 0
                    && !table.table.addresses().any(|a| a == address.as_str())
            })
            .map(|(address, _)| address.clone())
            .collect()
    }

    /// Routes one request, and records it per app and instance
    /// (`capstan_proxy_*`; requests for hosts no app has are not recorded
    /// per host: the Host header is the client's to make up).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        remote: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = std::time::Instant::now();
        let (response, served) = self.forward(request, remote).await;
        if let Some(stats) = served {
            stats.record(response.status().as_u16(), started.elapsed());
        }
        response
    }

    /// The response, and the (app, instance) it is counted for (the
    /// app's `none` when no instance was tried; nothing for an unknown
    /// host).
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        remote: SocketAddr,
    ) -> (Response<ProxyBody>, Option<Arc<Stats>>) {
        let host = match request.headers().get(header::HOST) {
            Some(value) => value.clone(),
            None => request
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .unwrap_or_else(|| HeaderValue::from_static("")),
        };
        let hostname = strip_port(host.to_str().unwrap_or_default());
        let lowered;
        let hostname = if hostname.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = hostname.to_ascii_lowercase();
            lowered.as_str()
        } else {
            hostname
        };
        let mut compiled = self.table.load_full();
        if let Some(&i) = compiled.hosts.get(hostname) {
            let route = &compiled.table.routes[i];
            if route.upstreams.is_empty() && route.wakeable {
                let unserved = compiled.routes[i].unserved.clone();
                let app = route.app.clone();
                match self.wake_and_wait(&app, hostname).await {
                    Ok(woken) => compiled = woken,
                    Err(response) => return (response, Some(unserved)),
                }
            }
        }
        let Some(&route_idx) = compiled.hosts.get(hostname) else {
            let response = text(
                StatusCode::NOT_FOUND,
                format!("capstan: no app is routed for host `{hostname}`\n"),
            );
            return (response, None);
        };
        let route = &compiled.table.routes[route_idx];
        let ready = &compiled.routes[route_idx];
        if ready.upstreams.is_empty() {
            let response = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "capstan: app `{}` has no healthy instances right now\n",
                    route.app
                ),
            );
            return (response, Some(ready.unserved.clone()));
        }
        let start = ready.next.fetch_add(1, Ordering::Relaxed);
        let upgrade = wants_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
        let retryable = upgrade.is_none() && is_retryable(&request);
        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
        forwarded_headers(
            &mut parts.headers,
            &host,
            remote,
            self.trusted.contains(remote.ip()),
        );
        if !parts.headers.contains_key(header::HOST) {
            // HTTP/2 carries the host in `:authority`; the upstream is HTTP/1.1.
            parts.headers.insert(header::HOST, host.clone());
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut body = Some(body.boxed());
        let attempts = if retryable {
            ready.upstreams.len().min(2)
        } else {
            1
        };
        let mut served = ready.unserved.clone();
        for attempt in 0..attempts {
            let upstream = &ready.upstreams[(start + attempt) % ready.upstreams.len()];
            let Some(pool) = &upstream.pool else {
                continue;
            };
            // Origin form (`/path?query`): the connection is the upstream's.
            let uri = http::Uri::from(path.clone());
            let outgoing_body = if retryable {
                Empty::new().map_err(|never| match never {}).boxed()
            } else {
                body.take()
                    .unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed())
            };
            let mut outgoing = Request::new(outgoing_body);
            *outgoing.method_mut() = parts.method.clone();
            *outgoing.uri_mut() = uri;
            *outgoing.version_mut() = http::Version::HTTP_11;
            *outgoing.headers_mut() = if attempt + 1 < attempts {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            served = upstream.stats.clone();
            upstream.in_flight.fetch_add(1, Ordering::AcqRel);
            let guard = InFlight(upstream.in_flight.clone());
            let answered =
                tokio::time::timeout(self.limits.upstream_timeout, pool.send(outgoing)).await;
            let Ok(answered) = answered else {
                let response = text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "capstan: `{}` did not answer within {:?}\n",
                        route.app, self.limits.upstream_timeout
                    ),
                );
                return (response, Some(served));
            };
            match answered {
                Ok((response, lease)) => {
                    if let Some(client_side) = upgrade
                        && response.status() == StatusCode::SWITCHING_PROTOCOLS
                    {
                        return (tunnel(client_side, response, guard), Some(served));
                    }
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers, false);
                    let response = Response::from_parts(
                        parts,
                        Tracked {
                            inner: body,
                            lease: Some(lease),
                            _guard: guard,
                        }
                        .boxed(),
                    );
                    return (response, Some(served));
                }
                Err(e) => {
                    tracing::debug!(upstream = %pool.authority(), "upstream request failed: {e}");
                }
            }
        }
        let response = text(
            StatusCode::BAD_GATEWAY,
            format!("capstan: no instance of `{}` answered\n", route.app),
        );
        (response, Some(served))
    }
}

/// A request asking to switch protocols (`Connection: upgrade` with an
/// `Upgrade` header), such as a WebSocket handshake.
fn wants_upgrade(headers: &http::HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// The upstream agreed to switch protocols: answers the client with its
/// 101 (and its headers, `Upgrade` and `Connection` kept), then copies
/// bytes both ways until either side closes. The request counts as in
/// flight until then.
fn tunnel(
    client_side: hyper::upgrade::OnUpgrade,
    mut response: Response<Incoming>,
    guard: InFlight,
) -> Response<ProxyBody> {
    let upstream_side = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        let _guard = guard;
        let (Ok(client), Ok(upstream)) = tokio::join!(client_side, upstream_side) else {
            return;
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    });
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, Empty::new().map_err(|never| match never {}).boxed())
}

/// Removes the hop-by-hop headers, and those `Connection` names (RFC 9110
/// §7.6.1). With `keep_upgrade`, `Connection: upgrade` and `Upgrade` stay
/// so the upstream can switch protocols.
fn strip_hop_by_hop(headers: &mut http::HeaderMap, keep_upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        // The names `Connection` lists beyond the fixed hop-by-hop set
        // (usually none: `keep-alive`, `close`, `upgrade`).
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|token| {
                !token.is_empty()
                    && !token.eq_ignore_ascii_case("close")
                    && !HOP_BY_HOP
                        .iter()
                        .any(|name| token.eq_ignore_ascii_case(name.as_str()))
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    // One pass over the (few) headers instead of a lookup per name.
    if headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        for name in HOP_BY_HOP.iter() {
            if keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
                continue;
            }
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// A place in an app's wake queue, given back on drop.
struct QueuePlace<'a> {
    queues: &'a Mutex<HashMap<String, usize>>,
    app: String,
}

impl<'a> QueuePlace<'a> {
    fn take(queues: &'a Mutex<HashMap<String, usize>>, app: &str, bound: usize) -> Option<Self> {
        {
            let mut waiting = queues.lock().expect("wake queue lock poisoned");
            let waiting = waiting.entry(app.to_string()).or_default();
            if *waiting >= bound {
                return None;
            }
            *waiting += 1;
        }
        Some(QueuePlace {
            queues,
            app: app.to_string(),
        })
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        let mut queues = self.queues.lock().expect("wake queue lock poisoned");
        if let Some(waiting) = queues.get_mut(&self.app) {
            *waiting -= 1;
            if *waiting == 0 {
                queues.remove(&self.app);
            }
        }
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: `[::1]:8080`.
        return rest.split_once(']').map_or(host, |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Safe to send twice: an idempotent method and no body.
fn is_retryable(request: &Request<Incoming>) -> bool {
    matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) && request.body().size_hint().exact() == Some(0)
        && !request.headers().contains_key(header::TRANSFER_ENCODING)
}

/// Sets `X-Forwarded-For`, `-Host` and `-Proto`. A trusted peer's values
/// are extended (its own client is the real one); anyone else's are
/// replaced by what this proxy saw.
fn forwarded_headers(
    headers: &mut http::HeaderMap,
    host: &HeaderValue,
    remote: SocketAddr,
    trusted_peer: bool,
) {
    let previous = headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .filter(|_| trusted_peer);
    let mut forwarded_for = String::with_capacity(previous.map_or(0, |p| p.len() + 2) + 15);
    if let Some(previous) = previous {
        forwarded_for.push_str(previous);
        forwarded_for.push_str(", ");
    }
    push_ip(&mut forwarded_for, remote.ip());
    if let Ok(value) = HeaderValue::try_from(forwarded_for) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if !(trusted_peer && headers.contains_key(&X_FORWARDED_HOST)) {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    if !(trusted_peer && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
}

/// Appends `ip` as text. IPv4 is written digit by digit: `Display` goes
/// through the formatter, over a thousand instructions a request here.
fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

pub fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Counts a request in flight until its response body is done.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An upstream's response body: gives its connection back once read to
/// its end, and counts the request in flight until then.
struct Tracked {
    inner: Incoming,
    /// Taken when the body ended; dropped unreleased (closing the
    /// connection) when the body is given up part-way.
    lease: Option<Lease>,
    _guard: InFlight,
}

impl Tracked {
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // hyper does not poll a body that says it is over (HEAD, 204, 304,
        // `Content-Length: 0`), and may stop at the frame that ends it.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves HTTP/1.1 and HTTP/2 with `handler` within `limits` until
/// `shutdown`, then gives open connections up to `grace` to finish.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    handler: F,
    shutdown: CancellationToken,
    grace: Duration,
    limits: HttpLimits,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let connections = tokio_util::task::TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_h2_streams)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "connection limit reached; closing a new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let builder = builder.clone();
        connections.spawn(async move {
            let _slot = slot;
            // The auto builder sniffs HTTP/1 or HTTP/2 from the first bytes
            // with no timer of its own: bound that wait too.
            let mut first = [0u8; 1];
            if tokio::time::timeout(limits.header_read_timeout, stream.peek(&mut first))
                .await
                .is_err()
            {
                return;
            }
            let service = hyper::service::service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(request, remote).await) }
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after {grace:?}; closing them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers_from_untrusted_peers_are_replaced() {
        let remote: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        forwarded_headers(
            &mut headers,
            &HeaderValue::from_static("app.example"),
            remote,
            false,
        );
        assert_eq!(headers["x-forwarded-for"], "203.0.113.9");
        assert_eq!(headers["x-forwarded-proto"], "http");
        let mut headers = http::HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        forwarded_headers(
            &mut headers,
            &HeaderValue::from_static("app.example"),
            remote,
            true,
        );
        assert_eq!(headers["x-forwarded-for"], "1.2.3.4, 203.0.113.9");
        assert_eq!(headers["x-forwarded-proto"], "https");
    }

    /// Applying a table that shares an app's upstream list with the last
    /// one keeps that app's compiled route (its counters and round-robin
    /// position); a changed list is compiled anew.
    #[tokio::test]
    async fn applying_a_table_compiles_only_the_routes_whose_upstreams_changed() {
        let proxy = EdgeProxy::new(HttpLimits::default(), TrustedProxies::default());
        let route = |app: &str, ids: &[&str]| Route {
            app: app.into(),
            project: "default".into(),
            hosts: vec![format!("{app}.test")],
            upstreams: ids
                .iter()
                .map(|id| crate::table::Upstream {
                    instance_id: id.to_string(),
                    address: "127.0.0.1:4000".into(),
                })
                .collect::<Vec<_>>()
                .into(),
            health: None,
            wakeable: false,
        };
        let first = RouteTable {
            generation: 1,
            routes: vec![route("a", &["a-1"]), route("b", &["b-1"])],
        };
        proxy.apply(first.clone());
        let before = proxy.table.load_full();
        let second = RouteTable {
            generation: 2,
            routes: vec![first.routes[0].clone(), route("b", &["b-1", "b-2"])],
        };
        proxy.apply(second);
        let after = proxy.table.load_full();
        assert!(
            Arc::ptr_eq(&before.routes[0], &after.routes[0]),
            "a was compiled again"
        );
        assert!(
            !Arc::ptr_eq(&before.routes[1], &after.routes[1]),
            "b kept a stale route"
        );
        assert_eq!(after.routes[1].upstreams.len(), 2);
    }

    #[test]
    fn client_addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "192.168.100.9",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.1",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut written = String::new();
            push_ip(&mut written, ip);
            assert_eq!(written, ip.to_string());
        }
    }

    #[test]
    fn strips_ports_from_hosts() {
        assert_eq!(strip_port("hello.localhost:8080"), "hello.localhost");
        assert_eq!(strip_port("hello.localhost"), "hello.localhost");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
