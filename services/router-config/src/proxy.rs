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
use hyper_util::rt::{TokioExecutor, TokioIo};
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

pub struct EdgeProxy {
    table: RwLock<Arc<Compiled>>,
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    client: Client<HttpConnector, ProxyBody>,
}

struct Compiled {
    table: RouteTable,
    hosts: BTreeMap<String, usize>,
    next: Vec<AtomicUsize>,
}

impl EdgeProxy {
    pub fn new() -> Arc<Self> {
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
            client,
        })
    }

    pub fn apply(&self, table: RouteTable) {
        *self.table.write().expect("table lock poisoned") = Arc::new(compile(table));
    }

    pub fn table(&self) -> RouteTable {
        self.table
            .read()
            .expect("table lock poisoned")
            .table
            .clone()
    }

    /// Requests in flight to `address`.
    pub fn in_flight(&self, address: &str) -> usize {
        self.in_flight
            .lock()
            .expect("in-flight lock poisoned")
            .get(address)
            .map_or(0, |c| c.load(Ordering::Acquire))
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

    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        remote: SocketAddr,
    ) -> Response<ProxyBody> {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri().host())
            .unwrap_or_default()
            .to_string();
        let hostname = strip_port(&host).to_ascii_lowercase();
        let compiled = self.table.read().expect("table lock poisoned").clone();
        let Some(&route_idx) = compiled.hosts.get(&hostname) else {
            return text(
                StatusCode::NOT_FOUND,
                format!("capstan: no app is routed for host `{hostname}`\n"),
            );
        };
        let route = &compiled.table.routes[route_idx];
        if route.upstreams.is_empty() {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "capstan: app `{}` has no healthy instances right now\n",
                    route.app
                ),
            );
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
            forwarded_headers(headers, &host, remote);
            let outgoing_body = if retryable {
                Empty::new().map_err(|never| match never {}).boxed()
            } else {
                body.take()
                    .unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed())
            };
            let Ok(outgoing) = outgoing.body(outgoing_body) else {
                break;
            };
            let guard = self.track(&upstream.address);
            match self.client.request(outgoing).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    for name in HOP_BY_HOP {
                        parts.headers.remove(name);
                    }
                    return Response::from_parts(
                        parts,
                        Tracked {
                            inner: body,
                            _guard: guard,
                        }
                        .boxed(),
                    );
                }
                Err(e) => {
                    tracing::debug!(upstream = %upstream.address, "upstream request failed: {e}");
                }
            }
        }
        text(
            StatusCode::BAD_GATEWAY,
            format!("capstan: no instance of `{}` answered\n", route.app),
        )
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

fn forwarded_headers(headers: &mut http::HeaderMap, host: &str, remote: SocketAddr) {
    let client_ip = remote.ip().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(previous) => format!("{previous}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    if let Ok(value) = HeaderValue::from_str(host) {
        headers.insert("x-forwarded-host", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
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

/// Serves HTTP/1.1 and HTTP/2 with `handler` until `shutdown`, then gives
/// open connections up to `grace` to finish.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    handler: F,
    shutdown: CancellationToken,
    grace: Duration,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let connections = tokio_util::task::TaskTracker::new();
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
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(request, remote).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
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
    fn strips_ports_from_hosts() {
        assert_eq!(strip_port("hello.localhost:8080"), "hello.localhost");
        assert_eq!(strip_port("hello.localhost"), "hello.localhost");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
