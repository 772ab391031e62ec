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
    assert!(total_rps > 1.0, "rps {total_rps} after {ok} requests");
    assert!(seen.iter().all(|u| u["node"] == dev.node_id().as_str()));
    assert!(
        seen.iter().all(|u| u["p95_ms"].as_f64().unwrap() > 0.0),
        "{seen:?}"
    );

    // The text table names the columns and the instances.
    let text = dev.ok(&["app", "top", "--once"]);
    assert!(text.contains("RPS") && text.contains(&ids[0]), "{text}");

    // Range queries: every chart has points; requests add up.
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
    // Samples of the last period may still be on their way.
    assert!(
        served <= ok as f64 + 0.5 && served >= ok as f64 * 0.5,
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
