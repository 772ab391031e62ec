//! `capstan-metrics`: the metrics service in its own process.

use std::sync::Arc;

use clap::Parser;

/// Ingests usage and traffic samples; answers range queries and watches.
#[derive(Parser)]
#[command(name = "capstan-metrics", version)]
struct Args {
    #[command(flatten)]
    standalone: capstan_server::standalone::StandaloneArgs,
    /// Where samples and rollups live: `memory` (this process, bounded;
    /// lost on restart) or scylla://HOST[:PORT][,...]/KEYSPACE[?rf=N].
    #[arg(long, env = "CAPSTAN_METRICS_STORE", default_value = "memory")]
    metrics_store: String,
    /// Rows the `memory` store keeps at most (about 200 bytes each).
    #[arg(long, default_value_t = capstan_metrics::store::DEFAULT_MAX_ROWS)]
    metrics_max_rows: usize,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let (url, max_rows) = (args.metrics_store, args.metrics_max_rows);
    if url != "memory"
        && let Err(e) = capstan_store::scylla::parse_url(&url)
    {
        eprintln!("error: --metrics-store: {e} (or `memory`)");
        return std::process::ExitCode::from(2);
    }
    capstan_server::standalone::main(
        "capstan-metrics",
        args.standalone,
        capstan_server::standalone::Credential::ServiceKey,
        |platform, listener, shutdown| async move {
            let store: Arc<dyn capstan_metrics::MetricsStore> = if url == "memory" {
                Arc::new(capstan_metrics::RingStore::new(max_rows))
            } else {
                Arc::new(capstan_metrics::scylla::ScyllaMetricsStore::connect(&url).await?)
            };
            capstan_metrics::run(platform, store, listener, shutdown).await
        },
    )
}
