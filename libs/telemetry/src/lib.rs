//! Logging and tracing for every binary.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`). When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans also go to that collector over
//! OTLP/gRPC, tagged with the service name.
//!
//! Traces cross processes as W3C trace context (`traceparent`) in gRPC
//! metadata: [`inject`] on the way out (every authenticated client does
//! it), [`extract`] on the way in (every server), and [`traceparent`] /
//! [`follow`] to carry one across a queue or a stored record (a deploy's
//! rollout is one trace from the CLI to the agents).

use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes spans when dropped; keep it alive for the life of `main`.
pub struct Guard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    /// The exporter's gRPC channel lives here: `init` runs before the
    /// binary's own runtime exists, and must not depend on it.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset.
pub fn init(service_name: &'static str, default_filter: &str) -> Guard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // rustify (under vaultrs) logs every non-2xx answer at ERROR,
        // a missing secret included; the Vault adapter reports what
        // matters itself.
        EnvFilter::new(format!("{default_filter},rustify=off"))
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: files, journald and `docker logs`
        // get plain text that grep and log shippers read.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let (provider, runtime) = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => match otlp_provider(service_name, &endpoint) {
            Ok((provider, runtime)) => (Some(provider), Some(runtime)),
            Err(e) => {
                eprintln!("warning: OpenTelemetry export disabled: {e}");
                (None, None)
            }
        },
        _ => (None, None),
    };
    // Spans go to the collector at `info` whatever the log level: the CLI
    // logs only warnings, yet its deploy is the root of a trace.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service_name))
            .with_filter(EnvFilter::new(
                "info,rustify=off,h2=off,hyper=off,tower=off",
            ))
    });
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Guard {
        provider,
        _runtime: runtime,
    }
}

/// The tracer provider, and the one-thread runtime its exporter's channel
/// runs on (the batch processor exports from a thread of its own).
fn otlp_provider(
    service_name: &'static str,
    endpoint: &str,
) -> Result<
    (
        opentelemetry_sdk::trace::SdkTracerProvider,
        tokio::runtime::Runtime,
    ),
    Box<dyn std::error::Error>,
> {
    use opentelemetry_otlp::WithExportConfig;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()?;
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    Ok((provider, runtime))
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes the current span's trace context into `headers` (`traceparent`,
/// `tracestate`); nothing when there is no sampled span.
pub fn inject(headers: &mut http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers));
    });
}

/// The trace context a caller sent in `headers`; the empty context when it
/// sent none (or a malformed one, which is ignored).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    })
}

/// The current span's `traceparent`, to store with work done later.
pub fn traceparent() -> Option<String> {
    let mut headers = http::HeaderMap::new();
    inject(&mut headers);
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Makes `span` a child of the trace a stored `traceparent` names.
pub fn follow(span: &tracing::Span, traceparent: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_str(traceparent) {
        headers.insert("traceparent", value);
        let _ = span.set_parent(extract(&headers));
    }
}

/// Makes `span` a child of the trace the caller sent in `headers`.
pub fn continue_from(span: &tracing::Span, headers: &http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let _ = span.set_parent(extract(headers));
}
