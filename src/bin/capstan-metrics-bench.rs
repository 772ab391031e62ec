//! Ingest throughput of the metrics service: samples per second through
//! its gRPC `Ingest` (authenticated, validated, rolled up, stored in the
//! embedded ring), beside raw `RingStore::write`s of the same rows into the
//! same kind of store, in the same run.
//!
//! Needs a running `capstan dev` (pass its `--data-dir`): the bench calls
//! as a service, with the service key from the data dir's secret store.
//!
//!   capstan-metrics-bench --data-dir DIR [--samples 200000] [--batch 1000] [--rounds 3]
//!
//! Prints one JSON object.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use capstan_authn::{Authed, TokenSource};
use capstan_metrics::model::{Metric, Resolution, Rollup, Row, SeriesKey};
use capstan_metrics::{MetricsStore, RingStore};
use capstan_proto::v1::metrics_client::MetricsClient;
use capstan_proto::v1::{IngestRequest, Sample};
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 200_000)]
    samples: usize,
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// The median round is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Batches in flight at once over gRPC.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

#[derive(serde::Deserialize)]
struct Endpoints {
    auth: String,
    metrics_service: String,
}

/// `count` samples over 100 apps x 10 instances, two metrics each, all
/// within the last minute.
fn samples(count: usize, round: usize) -> Vec<Sample> {
    let now = capstan_server::now_ms();
    (0..count)
        .map(|i| Sample {
            app: format!("bench-{}", i % 100),
            instance_id: format!("bench-{}-{}", i % 100, (i / 100) % 10),
            node_id: "bench-node".into(),
            at_ms: now - 60_000 + ((i / 1000) as i64) + round as i64,
            metric: if i % 2 == 0 {
                "cpu_percent"
            } else {
                "memory_bytes"
            }
            .into(),
            value: (i % 97) as f64,
            buckets: Vec::new(),
        })
        .collect()
}

fn rows(samples: &[Sample]) -> Vec<Row> {
    samples
        .iter()
        .map(|s| Row {
            key: SeriesKey {
                app: s.app.clone(),
                metric: if s.metric == "cpu_percent" {
                    Metric::CpuPercent
                } else {
                    Metric::MemoryBytes
                },
                instance: s.instance_id.clone(),
            },
            start_ms: s.at_ms,
            writer: String::new(),
            node: s.node_id.clone(),
            rollup: Rollup::of(s.value, Vec::new()),
        })
        .collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let batch = args.batch.clamp(1, capstan_metrics::MAX_BATCH);
    let path = args.data_dir.join("endpoints.json");
    let endpoints: Endpoints =
        serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!("{}: {e}; is `capstan dev` running there?", path.display())
        })?)?;
    let secrets = capstan_secrets::FileSecretStore::new(&args.data_dir);
    let key = capstan_server::standalone::service_key(&secrets, false).await?;
    let tokens = TokenSource::new(key, capstan_server::channel_to(&endpoints.auth)?);
    let client = MetricsClient::new(Authed::new(
        capstan_server::channel_to(&endpoints.metrics_service)?,
        tokens,
    ));

    let mut service_rates = Vec::new();
    let mut raw_rates = Vec::new();
    // One store across rounds, as the service keeps one.
    let store = RingStore::default();
    for round in 0..args.rounds.max(1) {
        let data = samples(args.samples, round);
        let batches: Vec<Vec<Sample>> = data.chunks(batch).map(<[Sample]>::to_vec).collect();

        // Raw: the same rows straight into a ring store, batch by batch.
        let raw: Vec<Vec<Row>> = batches.iter().map(|b| rows(b)).collect();
        let started = Instant::now();
        for rows in &raw {
            store.write(Resolution::Raw, rows).await?;
        }
        raw_rates.push(args.samples as f64 / started.elapsed().as_secs_f64());

        // Through the service: gRPC, auth, validation, rollups, the store.
        let queue = Arc::new(tokio::sync::Mutex::new(batches));
        let started = Instant::now();
        let workers: Vec<_> = (0..args.concurrency.max(1))
            .map(|_| {
                let (queue, mut client) = (queue.clone(), client.clone());
                tokio::spawn(async move {
                    loop {
                        let Some(samples) = queue.lock().await.pop() else {
                            return Ok::<_, tonic::Status>(());
                        };
                        client.ingest(IngestRequest { samples }).await?;
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await??;
        }
        service_rates.push(args.samples as f64 / started.elapsed().as_secs_f64());
    }
    let (service, raw) = (median(service_rates), median(raw_rates));
    println!(
        "{}",
        json!({
            "bench": "metrics_ingest",
            "samples_per_round": args.samples,
            "batch": batch,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "service_samples_per_s": service.round(),
            "raw_store_samples_per_s": raw.round(),
            "ratio": (service / raw * 1000.0).round() / 1000.0,
        })
    );
    Ok(())
}
