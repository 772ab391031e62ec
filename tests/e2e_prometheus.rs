//! The platform's Prometheus metrics, scraped by a real Prometheus (apt
//! `prometheus`) from `capstan dev`'s `--metrics-addr`, and read back
//! through Prometheus' query API; and the compose scrape config checked by
//! the real promtool.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const INSTALL: &str = "apt-get install -y prometheus";

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` (host:port) every second.
    fn start(target: &str) -> Prometheus {
        capstan_testkit::require_tool("prometheus", INSTALL);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: capstan\n    honor_labels: true\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = capstan_testkit::free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start prometheus: {e}; install it with: {INSTALL}"));
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Vec<Value> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let Some((200, body)) = http_get(
            self.port,
            "127.0.0.1",
            &format!("/api/v1/query?query={encoded}"),
        ) else {
            return Vec::new();
        };
        serde_json::from_str::<Value>(&body).unwrap_or_default()["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The sum of a query's values.
    fn value(&self, promql: &str) -> f64 {
        self.query(promql)
            .iter()
            .filter_map(|series| series["value"][1].as_str()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_the_platform_and_per_app_series() {
    let dev = Dev::start(None);
    let metrics = dev.endpoints()["metrics"].as_str().unwrap().to_string();
    let spec = spec_file(dev.data_dir(), "p.toml", &whoami_spec("prom", 2, "hi"));
    dev.ok(&["app", "deploy", "-f", &spec]);
    wait_until("the app answers", Duration::from_secs(30), || {
        dev.get("prom.localhost")
            .is_some_and(|(code, _)| code == 200)
    });
    for _ in 0..20 {
        assert_eq!(dev.get("prom.localhost").map(|(code, _)| code), Some(200));
    }
    let _ = dev.get("nobody.localhost");

    // The text format, as served: per-app series with app and instance.
    let port: u16 = metrics.rsplit_once(':').unwrap().1.parse().unwrap();
    let (code, text) = http_get(port, "127.0.0.1", "/metrics").expect("/metrics answers");
    assert_eq!(code, 200);
    let ids = instance_ids(&dev.status("prom"));
    assert!(
        ids.iter().any(|id| text.contains(&format!(
            "capstan_proxy_requests_total{{app=\"prom\",class=\"2xx\",instance=\"{id}\"}}"
        ))),
        "no per-instance series for {ids:?}:\n{text}"
    );
    assert!(
        !text.contains("nobody.localhost"),
        "a made-up Host header became a series"
    );
    for series in [
        "capstan_rpc_requests_total{code=\"OK\",method=\"/capstan.v1.Orchestrator/ApplyApp\",service=\"orchestrator\"}",
        "capstan_rpc_duration_seconds_bucket{method=\"/capstan.v1.Scheduler/Place\"",
        "capstan_reconcile_passes_total{result=\"ok\"}",
        "capstan_placement_duration_seconds_count",
        "capstan_proxy_duration_seconds_bucket{app=\"prom\"",
        "capstan_route_upstreams 2",
    ] {
        assert!(text.contains(series), "no {series}:\n{text}");
    }

    // Each instance's usage, sampled by its agent every 5 s: memory held,
    // and CPU (cores) once two samples exist.
    wait_until(
        "the agent has sampled both instances twice",
        Duration::from_secs(30),
        || {
            let Some((200, text)) = http_get(port, "127.0.0.1", "/metrics") else {
                return false;
            };
            ids.iter().all(|id| {
                let held = text.lines().any(|l| {
                    l.starts_with("capstan_instance_memory_bytes{app=\"prom\"")
                        && l.contains(&format!("instance=\"{id}\""))
                        && l.rsplit(' ')
                            .next()
                            .and_then(|v| v.parse::<f64>().ok())
                            .is_some_and(|v| v > 1e6)
                });
                let cpu = text.lines().any(|l| {
                    l.starts_with("capstan_instance_cpu_ratio{app=\"prom\"")
                        && l.contains(&format!("instance=\"{id}\""))
                });
                held && cpu
            })
        },
    );

    // A real Prometheus scrapes it; its query API returns Capstan's series.
    let prometheus = Prometheus::start(&metrics);
    wait_until(
        "Prometheus has scraped Capstan",
        Duration::from_secs(60),
        || prometheus.value("capstan_proxy_requests_total{app=\"prom\",class=\"2xx\"}") >= 20.0,
    );
    let by_instance = prometheus.query("capstan_proxy_requests_total{app=\"prom\"}");
    assert!(
        by_instance
            .iter()
            .all(|s| ids.iter().any(|id| s["metric"]["instance"] == id.as_str())),
        "the series keep the app instance as `instance`: {by_instance:?}"
    );
    assert!(
        prometheus.value(
            "capstan_rpc_requests_total{service=\"orchestrator\",method=\"/capstan.v1.Orchestrator/ApplyApp\"}"
        ) >= 1.0
    );
    assert!(prometheus.value("capstan_reconcile_passes_total") >= 1.0);
    assert!(prometheus.value("capstan_instance_memory_bytes{app=\"prom\"}") > 2e6);
}

#[test]
fn the_compose_scrape_config_is_valid_for_promtool() {
    capstan_testkit::require_tool("promtool", INSTALL);
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/infra/prometheus/prometheus.yml"
    );
    let out = Command::new("promtool")
        .args(["check", "config", config])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every Capstan service of the compose file is scraped.
    let text = std::fs::read_to_string(config).unwrap();
    let compose =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
            .unwrap();
    for service in COMPOSE_CAPSTAN_SERVICES {
        assert!(
            compose.contains(&format!("\n  {service}:\n")),
            "{service} in the compose file"
        );
        assert!(
            text.contains(&format!("{service}:9464")),
            "{service} is not scraped"
        );
    }
}
