//! Discovery latency: from an instance registering (and its TTL check
//! passing) to a blocked watcher returning with it, on the embedded
//! registry and on the Consul adapter against the Consul double (an
//! in-process stand-in for a Consul agent, so this measures our client and
//! the HTTP round trips, not Consul itself), in the same run. Prints one
//! JSON object.
//!
//! `cargo bench -p capstan-registry --bench discovery -- [--samples N]`

use std::time::{Duration, Instant};

use capstan_registry::{Check, ConsulRegistry, EmbeddedRegistry, Registration, ServiceRegistry};
use capstan_testkit::consul_double::ConsulDouble;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Microseconds from `register` + `pass_ttl` to the watcher's return.
async fn sample(registry: &'static dyn ServiceRegistry, i: usize) -> f64 {
    let name = format!("bench-svc-{i}");
    let (index, _) = registry
        .watch(&name, 0, Duration::from_secs(1))
        .await
        .unwrap();
    let watcher = tokio::spawn({
        let name = name.clone();
        async move {
            loop {
                let (_, instances) = registry
                    .watch(&name, index, Duration::from_secs(10))
                    .await
                    .unwrap();
                if !instances.is_empty() {
                    return Instant::now();
                }
            }
        }
    });
    // Let the watcher block first.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let started = Instant::now();
    registry
        .register(Registration {
            id: format!("{name}-1"),
            name: name.clone(),
            address: "127.0.0.1:9".into(),
            tags: vec![],
            check: Check::Ttl {
                ttl: Duration::from_secs(60),
            },
        })
        .await
        .unwrap();
    registry.pass_ttl(&format!("{name}-1")).await.unwrap();
    let notified = watcher.await.unwrap();
    registry.deregister(&format!("{name}-1")).await.unwrap();
    notified.duration_since(started).as_secs_f64() * 1e6
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn measure(registry: &'static dyn ServiceRegistry, samples: usize) -> serde_json::Value {
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        latencies.push(sample(registry, i).await);
    }
    latencies.sort_by(f64::total_cmp);
    serde_json::json!({
        "p50_us": percentile(&latencies, 0.5).round(),
        "p99_us": percentile(&latencies, 0.99).round(),
        "max_us": latencies.last().copied().unwrap_or_default().round(),
    })
}

#[tokio::main]
async fn main() {
    let samples = arg("--samples", 200);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let embedded: &'static EmbeddedRegistry =
        Box::leak(Box::new(EmbeddedRegistry::start(shutdown.clone())));
    let double = ConsulDouble::start().await;
    let consul: &'static ConsulRegistry =
        Box::leak(Box::new(ConsulRegistry::new(&double.url(), None).unwrap()));
    // Warm up, then measure each.
    measure(embedded, 10).await;
    measure(consul, 10).await;
    let embedded_result = measure(embedded, samples).await;
    let consul_result = measure(consul, samples).await;
    println!(
        "{}",
        serde_json::json!({
            "bench": "discovery: register -> watcher notified",
            "samples": samples,
            "embedded": embedded_result,
            "consul_adapter_on_the_double": consul_result,
        })
    );
    shutdown.cancel();
}
