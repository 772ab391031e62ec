//! Every bench binary once, at a tiny size, against a real `capstan dev`:
//! benchmarks are not timed tests, but their code must not rot. Each must
//! print its JSON with the figures it promises.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn bench(name: &str, args: &[&str]) -> Value {
    let binary = std::path::Path::new(BIN).with_file_name(name);
    let out = Command::new(&binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{name} printed no JSON ({e}): {stdout}"))
}

#[test]
fn the_gateway_and_metrics_benches_run_and_report_their_figures() {
    let dev = Dev::start_with(None, &["--no-docker", "--api-rate", "100000"]);
    let dir = dev.data_dir().display().to_string();
    let gateway = bench(
        "capstan-gateway-bench",
        &["--data-dir", &dir, "--seconds", "0.3", "--connections", "1"],
    );
    for side in [
        &gateway["gateway_overhead"]["grpc_direct"],
        &gateway["gateway_overhead"]["gateway"],
        &gateway["token_verification"]["auth_off"],
        &gateway["token_verification"]["verified"],
    ] {
        assert!(side["requests"].as_u64().unwrap() > 0, "{gateway}");
        assert!(side["p99_ms"].as_f64().unwrap() > 0.0, "{gateway}");
    }
    assert!(gateway["gateway_overhead"]["rps_ratio"].as_f64().unwrap() > 0.0);

    let metrics = bench(
        "capstan-metrics-bench",
        &["--data-dir", &dir, "--samples", "4000", "--rounds", "1"],
    );
    assert!(
        metrics["service_samples_per_s"].as_f64().unwrap() > 0.0,
        "{metrics}"
    );
    assert!(metrics["ratio"].as_f64().unwrap() > 0.0, "{metrics}");
}

/// The proxy bench starts its own backend and peers: nginx, HAProxy and
/// wrk from apt (`apt-get install -y nginx haproxy wrk nghttp2-client`).
#[test]
fn the_proxy_bench_runs_beside_nginx_and_haproxy_and_reports_ratios() {
    let report = bench(
        "capstan-proxy-bench",
        &[
            "--seconds",
            "1",
            "--warmup",
            "0",
            "--connections",
            "4",
            "--footings",
            "one-core",
            "--rounds",
            "2",
        ],
    );
    let footing = &report["one-core"];
    assert_eq!(footing["rounds"].as_u64(), Some(2), "{report}");
    for proxy in ["capstan", "nginx", "haproxy"] {
        let http1 = &footing[proxy]["http1"];
        assert!(http1["rps"].as_f64().unwrap() > 0.0, "{report}");
        assert_eq!(http1["errors"].as_u64(), Some(0), "{proxy}: {report}");
        assert!(http1["p99_ms"].as_f64().unwrap() > 0.0, "{report}");
        assert_eq!(
            http1["rps_by_round"].as_array().map(Vec::len),
            Some(2),
            "{report}"
        );
        assert!(
            http1["cpu0_us_per_request"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        assert!(
            footing[proxy]["http2"]["rps"].as_f64().unwrap() > 0.0,
            "{report}"
        );
    }
    assert_eq!(
        footing["capstan"]["http2"]["errors"].as_u64(),
        Some(0),
        "{report}"
    );
    assert!(footing["ratios"]["http1_rps_vs_nginx"].as_f64().unwrap() > 0.0);
}

/// The scale bench starts its own control plane and simulated nodes.
#[test]
fn the_scale_bench_deploys_onto_simulated_nodes_and_reports_its_figures() {
    let report = bench(
        "capstan-scale-bench",
        &[
            "--nodes",
            "3,6",
            "--instances",
            "60",
            "--per-app",
            "20",
            "--route-instances",
            "6",
            "--timeout-secs",
            "120",
        ],
    );
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{report}");
    for run in runs {
        let deploy = &run["deploy"];
        assert_eq!(deploy["apps"].as_u64(), Some(3), "{report}");
        assert_eq!(deploy["events_lost"].as_bool(), Some(false), "{report}");
        for figure in ["placed_per_second", "running_per_second", "store_mib"] {
            assert!(deploy[figure].as_f64().unwrap() > 0.0, "{figure}: {report}");
        }
        assert!(
            deploy["app_deploy_to_all_running_ms"]["p99"]
                .as_f64()
                .unwrap()
                > 0.0,
            "{report}"
        );
        assert!(
            deploy["cpu_seconds"]["control_plane"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        assert!(
            deploy["process_rss_mib"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        for mode in ["burst", "paced"] {
            let routes = &run["route_propagation"][mode];
            assert_eq!(routes["instances"].as_u64(), Some(6), "{mode}: {report}");
            assert!(
                routes["healthy_to_routed_ms"]["p99"].as_f64().unwrap() >= 0.0,
                "{mode}: {report}"
            );
        }
    }
    assert_eq!(runs[1]["nodes"].as_u64(), Some(6), "{report}");
}
