//! The built-in edge proxy: Host-based routing, round robin over healthy
//! upstreams, pooled keep-alive connections, `X-Forwarded-*` headers.
//!
//! Unknown host → 404; a known app with nothing healthy → 503. A request that
//! could not reach an upstream and has no body is retried once on the next
//! upstream. Requests in flight are counted per upstream, so a removed
//! upstream can be drained before its instance is stopped.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::table::RouteTable;

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
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
    table: RwLock<Arc<Compiled>>,
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    traffic: Mutex<HashMap<(String, String), Traffic>>,
    /// Requests waiting for a woken app, per app.
    waiting: Mutex<HashMap<String, usize>>,
    /// Bumped on every applied table: waiters look again.
    generation: tokio::sync::watch::Sender<u64>,
    /// Where the names of apps to wake go (router-config asks the
    /// orchestrator); unset: nothing is woken.
    waker: std::sync::OnceLock<tokio::sync::mpsc::Sender<String>>,
    client: Client<HttpConnector, ProxyBody>,
    limits: HttpLimits,
    trusted: TrustedProxies,
}

struct Compiled {
    table: RouteTable,
    hosts: BTreeMap<String, usize>,
    next: Vec<AtomicUsize>,
}

impl EdgeProxy {
    pub fn new(limits: HttpLimits, trusted: TrustedProxies) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(connector);
        Arc::new(EdgeProxy {
            table: RwLock::new(Arc::new(compile(RouteTable::default()))),
            in_flight: Mutex::default(),
            traffic: Mutex::default(),
            waiting: Mutex::default(),
            generation: tokio::sync::watch::Sender::new(0),
            waker: std::sync::OnceLock::new(),
            client,
            limits,
            trusted,
        })
    }

    /// What was served per (app, instance) since the last call.
    pub fn take_traffic(&self) -> HashMap<(String, String), Traffic> {
        std::mem::take(&mut *self.traffic.lock().expect("traffic lock poisoned"))
    }

    pub fn apply(&self, table: RouteTable) {
        let metrics = capstan_server::metrics::metrics();
        metrics.routes.set(table.routes.len() as i64);
        metrics
            .route_upstreams
            .set(table.addresses().count() as i64);
        let generation = table.generation;
        *self.table.write().expect("table lock poisoned") = Arc::new(compile(table));
        self.generation.send_replace(generation);
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
            let compiled = self.table.read().expect("table lock poisoned").clone();
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
        self.table
            .read()
            .expect("table lock poisoned")
            .table
            .clone()
    }

    /// Addresses that still have requests in flight but that the table in
    /// force no longer routes to (whichever rebuild removed them).
    pub fn draining(&self) -> Vec<String> {
        let table = self.table.read().expect("table lock poisoned").clone();
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

    fn track(&self, address: &str) -> InFlight {
        let counter = self
            .in_flight
            .lock()
            .expect("in-flight lock poisoned")
            .entry(address.to_string())
            .or_default()
            .clone();
        counter.fetch_add(1, Ordering::AcqRel);
        InFlight(counter)
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
        if let Some((app, instance)) = served {
            let metrics = capstan_server::metrics::metrics();
            let class = capstan_server::metrics::status_class(response.status().as_u16());
            metrics
                .proxy_requests
                .with_label_values(&[app.as_str(), instance.as_str(), class])
                .inc();
            let took = started.elapsed().as_secs_f64();
            metrics
                .proxy_duration
                .with_label_values(&[app.as_str(), instance.as_str()])
                .observe(took);
            let status = response.status().as_u16();
            let mut traffic = self.traffic.lock().expect("traffic lock poisoned");
            let entry = traffic.entry((app, instance)).or_default();
            entry.requests += 1;
            entry.responses_4xx += u64::from((400..500).contains(&status));
            entry.responses_5xx += u64::from(status >= 500);
            let ms = took * 1000.0;
            entry.latency_sum_ms += ms;
            entry.latency_buckets[capstan_metrics::model::latency_bucket(ms)] += 1;
        }
        response
    }

    /// The response, and the app and instance that answered it (`none`
    /// when no instance was tried).
    async fn forward(
        &self,
        request: Request<Incoming>,
        remote: SocketAddr,
    ) -> (Response<ProxyBody>, Option<(String, String)>) {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri().host())
            .unwrap_or_default()
            .to_string();
        let hostname = strip_port(&host).to_ascii_lowercase();
        let mut compiled = self.table.read().expect("table lock poisoned").clone();
        if let Some(&i) = compiled.hosts.get(&hostname) {
            let route = &compiled.table.routes[i];
            if route.upstreams.is_empty() && route.wakeable {
                let app = route.app.clone();
                match self.wake_and_wait(&app, &hostname).await {
                    Ok(woken) => compiled = woken,
                    Err(response) => return (response, Some((app, "none".to_string()))),
                }
            }
        }
        let Some(&route_idx) = compiled.hosts.get(&hostname) else {
            let response = text(
                StatusCode::NOT_FOUND,
                format!("capstan: no app is routed for host `{hostname}`\n"),
            );
            return (response, None);
        };
        let route = &compiled.table.routes[route_idx];
        let mut served = (route.app.clone(), "none".to_string());
        if route.upstreams.is_empty() {
            let response = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "capstan: app `{}` has no healthy instances right now\n",
                    route.app
                ),
            );
            return (response, Some(served));
        }
        let start = compiled.next[route_idx].fetch_add(1, Ordering::Relaxed);
        let retryable = is_retryable(&request);
        let (parts, body) = request.into_parts();
        let mut body = Some(body.boxed());
        let attempts = if retryable {
            route.upstreams.len().min(2)
        } else {
            1
        };
        for attempt in 0..attempts {
            let upstream = &route.upstreams[(start + attempt) % route.upstreams.len()];
            let mut outgoing = Request::builder()
                .method(parts.method.clone())
                .version(http::Version::HTTP_11);
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            outgoing = outgoing.uri(format!("http://{}{path}", upstream.address));
            let Some(headers) = outgoing.headers_mut() else {
                break;
            };
            for (name, value) in &parts.headers {
                if !HOP_BY_HOP.contains(&name.as_str()) {
                    headers.append(name, value.clone());
                }
            }
            forwarded_headers(headers, &host, remote, self.trusted.contains(remote.ip()));
            let outgoing_body = if retryable {
                Empty::new().map_err(|never| match never {}).boxed()
            } else {
                body.take()
                    .unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed())
            };
            let Ok(outgoing) = outgoing.body(outgoing_body) else {
                break;
            };
            served.1.clone_from(&upstream.instance_id);
            let guard = self.track(&upstream.address);
            let answered =
                tokio::time::timeout(self.limits.upstream_timeout, self.client.request(outgoing))
                    .await;
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
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    for name in HOP_BY_HOP {
                        parts.headers.remove(name);
                    }
                    let response = Response::from_parts(
                        parts,
                        Tracked {
                            inner: body,
                            _guard: guard,
                        }
                        .boxed(),
                    );
                    return (response, Some(served));
                }
                Err(e) => {
                    tracing::debug!(upstream = %upstream.address, "upstream request failed: {e}");
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

fn compile(table: RouteTable) -> Compiled {
    let hosts = table.host_index();
    let next = table.routes.iter().map(|_| AtomicUsize::new(0)).collect();
    Compiled { table, hosts, next }
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
    host: &str,
    remote: SocketAddr,
    trusted_peer: bool,
) {
    let client_ip = remote.ip().to_string();
    let previous = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .filter(|_| trusted_peer);
    let forwarded_for = match previous {
        Some(previous) => format!("{previous}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    if !(trusted_peer && headers.contains_key("x-forwarded-host"))
        && let Ok(value) = HeaderValue::from_str(host)
    {
        headers.insert("x-forwarded-host", value);
    }
    if !(trusted_peer && headers.contains_key("x-forwarded-proto")) {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
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

struct Tracked {
    inner: Incoming,
    _guard: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
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
            let connection = builder.serve_connection(TokioIo::new(stream), service);
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
        forwarded_headers(&mut headers, "app.example", remote, false);
        assert_eq!(headers["x-forwarded-for"], "203.0.113.9");
        assert_eq!(headers["x-forwarded-proto"], "http");
        let mut headers = http::HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        forwarded_headers(&mut headers, "app.example", remote, true);
        assert_eq!(headers["x-forwarded-for"], "1.2.3.4, 203.0.113.9");
        assert_eq!(headers["x-forwarded-proto"], "https");
    }

    #[test]
    fn strips_ports_from_hosts() {
        assert_eq!(strip_port("hello.localhost:8080"), "hello.localhost");
        assert_eq!(strip_port("hello.localhost"), "hello.localhost");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
