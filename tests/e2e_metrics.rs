//! The metrics service through the CLI on `capstan dev`: what the agents
//! sample and what the edge proxy serves shows up in `capstan app top` and
//! `capstan app metrics`; bad queries are refused with the field named.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn top(dev: &Dev, app: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(&dev.ok(&["app", "top", app, "-o", "json"]))
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

#[test]
fn usage_and_traffic_reach_top_and_metrics() {
    let dev = Dev::start_with(None, &["--no-docker", "--sample-every", "1s"]);
    let spec = spec_file(dev.data_dir(), "m.toml", &whoami_spec("metered", 2, "v1"));
    dev.ok(&["app", "deploy", "-f", &spec, "--timeout", "60s"]);
    let ids = instance_ids(&dev.status("metered"));

    // Traffic for a few sample periods.
    let load = Load::start(dev.http_port, "metered.localhost");
    let mut seen = Vec::new();
    wait_until(
        "top shows both instances with traffic and memory",
        Duration::from_secs(30),
        || {
            seen = top(&dev, "metered");
            seen.len() == 2
                && seen.iter().all(|u| {
                    u["rps"].as_f64().unwrap() > 0.0
                        && u["memory_bytes"].as_u64().unwrap() > 1_000_000
                })
        },
    );
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let mut listed: Vec<String> = seen
        .iter()
        .map(|u| u["instance"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(listed, expected, "top lists the app's instances");
    let total_rps: f64 = seen.iter().map(|u| u["rps"].as_f64().unwrap()).sum();
    // Top's rate is over its 30 s window: it cannot count more requests
    // than were served.
    assert!(
        total_rps > 0.0 && total_rps * 30.0 <= ok as f64 + 0.5,
        "rps {total_rps} after {ok} requests"
    );
    assert!(seen.iter().all(|u| u["node"] == dev.node_id().as_str()));
    assert!(
        seen.iter().all(|u| u["p95_ms"].as_f64().unwrap() > 0.0),
        "{seen:?}"
    );

    // The text table names the columns and the instances.
    let text = dev.ok(&["app", "top", "--once"]);
    assert!(text.contains("RPS") && text.contains(&ids[0]), "{text}");

    // Range queries: every chart has points; requests add up (once the
    // proxy has reported its last period: two periods of 1 s).
    std::thread::sleep(Duration::from_millis(2_500));
    let charts: Value = serde_json::from_str(
        &dev.ok(&["app", "metrics", "metered", "--since", "2m", "-o", "json"]),
    )
    .unwrap();
    let chart = |name: &str| {
        charts
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["chart"] == name)
            .unwrap_or_else(|| panic!("no chart {name}: {charts}"))
            .clone()
    };
    for name in ["rps", "p95 ms", "cpu %", "memory MiB"] {
        let points = chart(name)["points"].as_array().unwrap().len();
        assert!(points > 0, "chart {name} has no points: {charts}");
    }
    assert_eq!(chart("rps")["resolution"], "raw");
    let step_s = chart("rps")["step_ms"].as_f64().unwrap() / 1000.0;
    let served: f64 = chart("rps")["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap() * step_s)
        .sum();
    // Every request served is in the chart, once.
    assert!(
        (served - ok as f64).abs() < 0.5,
        "the rps chart adds up to {served} requests, {ok} were served"
    );
    let text = dev.ok(&["app", "metrics", "metered", "--since", "2m"]);
    assert!(text.contains("rps") && text.contains("max"), "{text}");

    // Bad input names the field and changes nothing.
    let out = dev.cli(&["app", "metrics", "metered", "--since", "5s"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--since"),
        "{out:?}"
    );
    let out = dev.cli(&["app", "top", "Not_An_App"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("app"), "{stderr}");
}

/// The metrics API over gRPC: a viewer watches samples arrive live and gets
/// field-named errors for bad queries; only agents and services may ingest.
#[test]
fn the_metrics_api_streams_samples_and_refuses_what_it_should() {
    use capstan_proto::v1::auth_client::AuthClient;
    use capstan_proto::v1::metrics_client::MetricsClient;
    use capstan_proto::v1::{
        Aggregate, CreateApiKeyRequest, IngestRequest, InstanceReadings, MetricName, QueryRequest,
        Reading, WatchRequest,
    };
    use tonic::Code;

    let dev = Dev::start_with(None, &["--no-docker", "--sample-every", "1s"]);
    let spec = spec_file(dev.data_dir(), "w.toml", &whoami_spec("watched", 1, "v1"));
    dev.ok(&["app", "deploy", "-f", &spec, "--timeout", "60s"]);
    let endpoints = dev.endpoints();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let admin = admin_token(&dev).await;
        let mut auth = AuthClient::new(channel(endpoints["auth"].as_str().unwrap()));
        let viewer_key = auth
            .create_api_key(with_token(
                CreateApiKeyRequest {
                    name: "watcher".into(),
                    role: "viewer".into(),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .api_key;
        let viewer = token(&dev, viewer_key).await;
        let mut metrics =
            MetricsClient::new(channel(endpoints["metrics_service"].as_str().unwrap()));

        // Live samples of the app, as the agent sends them.
        let mut stream = metrics
            .watch(with_token(
                WatchRequest {
                    app: "watched".into(),
                },
                &viewer,
            ))
            .await
            .unwrap()
            .into_inner();
        let sample = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("a sample within 20 s")
            .unwrap()
            .expect("the stream is open");
        assert_eq!(sample.app, "watched");
        assert!(
            [
                "cpu_percent",
                "memory_bytes",
                "requests",
                "responses_4xx",
                "responses_5xx",
                "latency_ms"
            ]
            .contains(&sample.metric.as_str()),
            "{sample:?}"
        );
        // The agent's own readings (the proxy's may come first): the
        // query below asks for one of them.
        let mut metric = sample.metric;
        while metric != "memory_bytes" {
            metric = tokio::time::timeout(Duration::from_secs(20), stream.message())
                .await
                .expect("the agent's memory sample within 20 s")
                .unwrap()
                .expect("the stream is open")
                .metric;
        }

        // Users may not ingest: not even an admin can forge readings.
        let forged = InstanceReadings {
            app: "watched".into(),
            instance_id: "watched-1".into(),
            node_id: String::new(),
            at_ms: capstan_server::now_ms(),
            readings: vec![Reading {
                metric: MetricName::CpuPercent as i32,
                value: 1000.0,
                buckets: vec![],
            }],
        };
        let denied = metrics
            .ingest(with_token(
                IngestRequest {
                    instances: vec![forged],
                },
                &admin,
            ))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

        // Bad queries name the field.
        let query = |metric: &str, aggregate: Aggregate, since_ms: i64| QueryRequest {
            app: "watched".into(),
            instance_id: String::new(),
            metric: metric.into(),
            aggregate: aggregate as i32,
            since_ms,
            until_ms: 0,
            step_ms: 0,
            by_instance: false,
        };
        let now = capstan_server::now_ms();
        for (request, field) in [
            (query("cpu", Aggregate::Avg, now - 60_000), "metric"),
            (
                query("cpu_percent", Aggregate::P95, now - 60_000),
                "aggregate",
            ),
            (
                query("cpu_percent", Aggregate::Unspecified, now - 60_000),
                "aggregate",
            ),
            (query("cpu_percent", Aggregate::Avg, 0), "since_ms"),
            (
                query("cpu_percent", Aggregate::Avg, now + 60_000),
                "since_ms",
            ),
        ] {
            let error = metrics
                .query(with_token(request, &viewer))
                .await
                .unwrap_err();
            assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
            assert!(
                error.message().contains(field),
                "{field}: {}",
                error.message()
            );
        }
        let unauthenticated = metrics
            .query(query("cpu_percent", Aggregate::Avg, now - 60_000))
            .await
            .unwrap_err();
        assert_eq!(unauthenticated.code(), Code::Unauthenticated);
        // A good one answers with points.
        let answer = metrics
            .query(with_token(
                query("memory_bytes", Aggregate::Max, now - 60_000),
                &viewer,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.resolution, "raw");
        assert!(
            answer.series.iter().any(|s| !s.points.is_empty()),
            "{answer:?}"
        );
    });
}
