//! The platform's Prometheus metrics: one registry per process (in `capstan
//! dev` every service's series side by side, told apart by their `service`
//! label), served as the Prometheus text format on `GET /metrics`.
//!
//! - `capstan_rpc_requests_total{service,method,code}` and
//!   `capstan_rpc_duration_seconds{service,method}`: every gRPC call a server
//!   answers (the code is the gRPC status, `OK` when none came with the
//!   response head);
//! - `capstan_reconcile_passes_total{result}`,
//!   `capstan_reconcile_duration_seconds`: the orchestrator's reconciler;
//! - `capstan_placement_duration_seconds`, `capstan_placed_instances_total`:
//!   the scheduler's `Place`;
//! - `capstan_proxy_requests_total{app,instance,class}` and
//!   `capstan_proxy_duration_seconds{app,instance}`: the edge proxy, per app
//!   and instance (class `2xx` ... `5xx`; instance `none` when no upstream
//!   was tried);
//! - `capstan_routes`, `capstan_route_upstreams`: the routing table in force;
//! - `capstan_instance_cpu_ratio{app,instance,node}` (cores used over the
//!   last sample period) and `capstan_instance_memory_bytes`: what each
//!   instance uses, sampled by its agent.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Latency buckets in seconds: 100 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    pub rpc_requests: IntCounterVec,
    pub rpc_duration: HistogramVec,
    pub reconcile_passes: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub placement_duration: Histogram,
    pub placed_instances: IntCounterVec,
    pub proxy_requests: IntCounterVec,
    pub proxy_duration: HistogramVec,
    pub routes: IntGauge,
    pub route_upstreams: IntGauge,
    pub instance_cpu: GaugeVec,
    pub instance_memory: IntGaugeVec,
    pub metric_samples: IntCounter,
    pub autoscale_decisions: IntCounterVec,
}

/// `metric`, registered with `registry` (each name once, at start).
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registered(registry, metric)
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let metric = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        labels,
    )
    .expect("a valid metric");
    registered(registry, metric)
}

fn plain_histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()))
        .expect("a valid metric");
    registered(registry, metric)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let metric = GaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registered(registry, metric)
}

fn int_gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registered(registry, metric)
}

fn plain_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("a valid metric");
    registered(registry, metric)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("a valid metric");
    registered(registry, metric)
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
        let registry = Registry::new();
        let r = &registry;
        Metrics {
            rpc_requests: counter(
                r,
                "capstan_rpc_requests_total",
                "gRPC calls answered, by service, method and status code.",
                &["service", "method", "code"],
            ),
            rpc_duration: histogram(
                r,
                "capstan_rpc_duration_seconds",
                "Time from a gRPC call's arrival to its response head.",
                &["service", "method"],
            ),
            reconcile_passes: counter(
                r,
                "capstan_reconcile_passes_total",
                "Reconcile passes of the orchestrator, by result (ok, error).",
                &["result"],
            ),
            reconcile_duration: plain_histogram(
                r,
                "capstan_reconcile_duration_seconds",
                "Duration of one reconcile pass.",
            ),
            placement_duration: plain_histogram(
                r,
                "capstan_placement_duration_seconds",
                "Duration of one Place call, snapshot to committed claims.",
            ),
            placed_instances: counter(
                r,
                "capstan_placed_instances_total",
                "Instances the scheduler placed, or could not (result: placed, unplaced).",
                &["result"],
            ),
            proxy_requests: counter(
                r,
                "capstan_proxy_requests_total",
                "Requests through the edge proxy, by app, instance and status class.",
                &["app", "instance", "class"],
            ),
            proxy_duration: histogram(
                r,
                "capstan_proxy_duration_seconds",
                "Time from a request's arrival at the edge proxy to its response head.",
                &["app", "instance"],
            ),
            instance_cpu: gauge_vec(
                r,
                "capstan_instance_cpu_ratio",
                "CPU an instance used over the last sample period, in cores.",
                &["app", "instance", "node"],
            ),
            instance_memory: int_gauge_vec(
                r,
                "capstan_instance_memory_bytes",
                "Memory an instance holds (process apps: resident set; image apps: the container's usage).",
                &["app", "instance", "node"],
            ),
            metric_samples: plain_counter(
                r,
                "capstan_metric_samples_total",
                "Samples the metrics service ingested.",
            ),
            autoscale_decisions: counter(
                r,
                "capstan_autoscale_decisions_total",
                "Autoscaler decisions, by result (up, down, hold).",
                &["result"],
            ),
            routes: gauge(r, "capstan_routes", "Apps in the routing table in force."),
            route_upstreams: gauge(
                r,
                "capstan_route_upstreams",
                "Upstreams in the routing table in force.",
            ),
            registry,
        }
    });
    &METRICS
}

impl Metrics {
    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into memory fails only on a metric the registry refused.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }

    pub fn record_rpc(&self, service: &str, method: &str, code: &str, took: Duration) {
        self.rpc_requests
            .with_label_values(&[service, method, code])
            .inc();
        self.rpc_duration
            .with_label_values(&[service, method])
            .observe(took.as_secs_f64());
    }
}

/// The status class of an HTTP status: `2xx`, ..., `5xx`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The name of a gRPC status code, as Prometheus labels usually carry it.
pub fn code_name(code: &str) -> &'static str {
    match code.parse::<i32>().map(tonic::Code::from) {
        Ok(tonic::Code::Ok) => "OK",
        Ok(tonic::Code::Cancelled) => "CANCELLED",
        Ok(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Ok(tonic::Code::DeadlineExceeded) => "DEADLINE_EXCEEDED",
        Ok(tonic::Code::NotFound) => "NOT_FOUND",
        Ok(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Ok(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Ok(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Ok(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Ok(tonic::Code::Aborted) => "ABORTED",
        Ok(tonic::Code::OutOfRange) => "OUT_OF_RANGE",
        Ok(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Ok(tonic::Code::Internal) => "INTERNAL",
        Ok(tonic::Code::Unavailable) => "UNAVAILABLE",
        Ok(tonic::Code::DataLoss) => "DATA_LOSS",
        Ok(tonic::Code::Unauthenticated) => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`; every other path is
/// 404. Each connection is bounded: 10 s to send a request head, one
/// request at a time.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let address = listener.local_addr().ok();
    tracing::info!(address = ?address, "serving Prometheus metrics on /metrics");
    let service = hyper::service::service_fn(|request: http::Request<_>| {
        let response =
            if request.uri().path() == "/metrics" && request.method() == http::Method::GET {
                http::Response::builder()
                    .header(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(metrics().render())))
            } else {
                http::Response::builder()
                    .status(http::StatusCode::NOT_FOUND)
                    .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n")))
            };
        std::future::ready(Ok::<_, Infallible>(response.unwrap_or_default()))
    });
    serve_http1(
        "metrics",
        listener,
        service,
        shutdown,
        Duration::from_secs(2),
    )
    .await;
}

/// Serves HTTP/1.1 with `service` on `listener` until `shutdown`, then lets
/// the connections finish for up to `drain`. Each connection has 10 s to
/// send a request head (no slow-loris), and is closed gracefully on
/// shutdown.
/// The address a request's connection came from, in the request's
/// extensions for services [`serve_http1`] serves.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

pub async fn serve_http1<S, B>(
    what: &'static str,
    listener: TcpListener,
    service: S,
    shutdown: CancellationToken,
    drain: Duration,
) where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("{what} listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Streamed answers (SSE, logs) are many small writes.
        let _ = stream.set_nodelay(true);
        let (service, shutdown) = (service.clone(), shutdown.clone());
        // Each request knows the connection's peer ([`PeerAddr`]).
        let service = hyper::service::service_fn(move |mut request: http::Request<_>| {
            request.extensions_mut().insert(PeerAddr(peer));
            service.call(request)
        });
        tasks.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = &mut connection => {}
                _ = shutdown.cancelled() => connection.as_mut().graceful_shutdown(),
            }
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(drain, tasks.wait()).await;
}

/// Binds `address` for [`serve`], with the error naming the flag.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, capstan_types::Error> {
    TcpListener::bind(address).await.map_err(|e| {
        capstan_types::Error::invalid("metrics_addr", format!("cannot listen on {address}: {e}"))
    })
}

/// Records every call a gRPC server answers in [`Metrics::record_rpc`], and
/// runs it in a `grpc.server` span continuing the caller's trace (health
/// checks excepted: they would drown the traces).
/// Methods of services this server does not serve count as `other`, so a
/// scan of made-up paths cannot grow the series without bound.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    service: &'static str,
    served: std::sync::Arc<Vec<String>>,
}

impl RpcMetricsLayer {
    /// `grpc_names`: the gRPC services (`capstan.v1.Scheduler`, ...) served.
    pub fn new(service: &'static str, grpc_names: &[&str]) -> RpcMetricsLayer {
        let served = grpc_names
            .iter()
            .copied()
            .chain([
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ])
            .map(|name| format!("/{name}/"))
            .collect();
        RpcMetricsLayer {
            service,
            served: std::sync::Arc::new(served),
        }
    }

    fn method(&self, path: &str) -> String {
        let known = self.served.iter().any(|prefix| {
            path.strip_prefix(prefix.as_str())
                .is_some_and(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphanumeric()))
        });
        if known {
            path.to_string()
        } else {
            "other".to_string()
        }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    layer: RpcMetricsLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        let method = self.layer.method(request.uri().path());
        let service = self.layer.service;
        let started = std::time::Instant::now();
        let span = if method.starts_with("/grpc.health.") {
            tracing::Span::none()
        } else {
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = %method,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = service,
            );
            capstan_telemetry::continue_from(&span, request.headers());
            span
        };
        let answer = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                let answer = answer.await;
                let code = match &answer {
                    // An error comes in the response head (trailers-only); a
                    // success, in trailers after the body.
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .map_or("OK", code_name),
                    Err(_) => "UNKNOWN",
                };
                metrics().record_rpc(service, &method, code, started.elapsed());
                answer
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_share_one_series() {
        let layer = RpcMetricsLayer::new("scheduler", &["capstan.v1.Scheduler"]);
        assert_eq!(
            layer.method("/capstan.v1.Scheduler/Place"),
            "/capstan.v1.Scheduler/Place"
        );
        assert_eq!(
            layer.method("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        for made_up in [
            "/capstan.v1.Orchestrator/GetApp",
            "/capstan.v1.Scheduler/",
            "/capstan.v1.Scheduler/Place/../x",
            "/x",
        ] {
            assert_eq!(layer.method(made_up), "other", "{made_up}");
        }
    }

    #[test]
    fn the_text_format_carries_labels() {
        metrics().record_rpc("t", "/capstan.v1.T/M", "OK", Duration::from_millis(3));
        let text = metrics().render();
        assert!(
            text.contains(
                r#"capstan_rpc_requests_total{code="OK",method="/capstan.v1.T/M",service="t"} "#
            ),
            "{text}"
        );
        assert!(
            text.contains("capstan_rpc_duration_seconds_bucket{"),
            "{text}"
        );
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(code_name("7"), "PERMISSION_DENIED");
        assert_eq!(code_name("x"), "UNKNOWN");
    }
}
