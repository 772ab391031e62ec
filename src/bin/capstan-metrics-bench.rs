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
use capstan_metrics::model::{Resolution, Rollup, Row, SeriesKey};
use capstan_metrics::{MetricsStore, RingStore};
use capstan_proto::v1::metrics_client::MetricsClient;
use capstan_proto::v1::{IngestRequest, InstanceReadings, MetricName, Reading};
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

/// Readings of 1,000 instances (100 apps x 10), four each: what an agent
/// and the edge proxy send of an instance every period (CPU, memory,
/// requests, 5xx), at times within the last minute; `count` readings in
/// all.
fn samples(count: usize, round: usize) -> Vec<InstanceReadings> {
    let now = capstan_server::now_ms();
    let metrics = [
        MetricName::CpuPercent,
        MetricName::MemoryBytes,
        MetricName::Requests,
        MetricName::Responses5xx,
    ];
    (0..count.div_ceil(metrics.len()))
        .map(|i| InstanceReadings {
            app: format!("bench-{}", i % 100),
            instance_id: format!("bench-{}-{}", i % 100, (i / 100) % 10),
            node_id: "bench-node".into(),
            at_ms: now - 60_000 + ((i / 1000) as i64) + round as i64,
            readings: metrics
                .iter()
                .map(|metric| Reading {
                    metric: *metric as i32,
                    value: (i % 97) as f64,
                    buckets: Vec::new(),
                })
                .collect(),
        })
        .collect()
}

/// The rows the service stores of `instances`, for the raw peer.
fn rows(instances: &[InstanceReadings]) -> Vec<Row> {
    instances
        .iter()
        .flat_map(|i| {
            i.readings.iter().map(|r| Row {
                key: SeriesKey {
                    app: i.app.clone(),
                    metric: capstan_metrics::metric_from_wire(r.metric).expect("a known metric"),
                    instance: i.instance_id.clone(),
                },
                start_ms: i.at_ms,
                writer: String::new(),
                node: i.node_id.clone(),
                rollup: Rollup::of(r.value, Vec::new()),
            })
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
    // One connection per worker, as each agent and edge proxy has its own.
    let clients = (0..args.concurrency.max(1))
        .map(|_| {
            Ok(MetricsClient::new(Authed::new(
                capstan_server::channel_to(&endpoints.metrics_service)?,
                tokens.clone(),
            )))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut service_rates = Vec::new();
    let mut raw_rates = Vec::new();
    // One store across rounds, as the service keeps one.
    let store = RingStore::default();
    for round in 0..args.rounds.max(1) {
        let data = samples(args.samples, round);
        // `batch` readings a call, whole instances.
        let per_call = (batch / 4).max(1);
        let batches: Vec<Vec<InstanceReadings>> = data
            .chunks(per_call)
            .map(<[InstanceReadings]>::to_vec)
            .collect();
        let readings: usize = data.iter().map(|i| i.readings.len()).sum();

        // Raw: the same rows straight into a ring store, batch by batch.
        let raw: Vec<Vec<Row>> = batches.iter().map(|b| rows(b)).collect();
        let started = Instant::now();
        for rows in &raw {
            store.write(Resolution::Raw, rows).await?;
        }
        raw_rates.push(readings as f64 / started.elapsed().as_secs_f64());

        // Through the service: gRPC, auth, validation, rollups, the store.
        let queue = Arc::new(tokio::sync::Mutex::new(batches));
        let started = Instant::now();
        let workers: Vec<_> = clients
            .iter()
            .map(|client| {
                let (queue, mut client) = (queue.clone(), client.clone());
                tokio::spawn(async move {
                    loop {
                        let Some(instances) = queue.lock().await.pop() else {
                            return Ok::<_, tonic::Status>(());
                        };
                        client.ingest(IngestRequest { instances }).await?;
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await??;
        }
        service_rates.push(readings as f64 / started.elapsed().as_secs_f64());
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
