//! The end-to-end harness: runs the real `capstan` binary (`capstan dev` and
//! CLI commands) against a throwaway data dir, and talks HTTP to its proxy.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_capstan");

pub mod docker;
pub mod services;

pub struct Dev {
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    amqp_url: Option<String>,
    /// Extra `capstan dev` flags, like `--agents 3`.
    extra: Vec<String>,
    /// Extra environment of `capstan dev` and of every CLI command.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Dev {
    pub fn start(amqp_url: Option<String>) -> Dev {
        Dev::start_with(amqp_url, &[])
    }

    pub fn start_with(amqp_url: Option<String>, extra: &[&str]) -> Dev {
        Dev::start_with_env(amqp_url, extra, &[])
    }

    /// With `env` in the environment of `capstan dev` and of every CLI
    /// command (like `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn start_with_env(amqp_url: Option<String>, extra: &[&str], env: &[(&str, &str)]) -> Dev {
        let dir = tempfile::tempdir().expect("temp dir");
        let http_port = capstan_testkit::free_port();
        let mut dev = Dev {
            dir,
            http_port,
            amqp_url,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        dev.spawn();
        dev
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// What `capstan dev` wrote to `endpoints.json`.
    pub fn endpoints(&self) -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(self.data_dir().join("endpoints.json"))
                .expect("endpoints.json"),
        )
        .expect("endpoints.json is JSON")
    }

    /// One service's address from `endpoints.json` (`auth`, `router_config` ...).
    pub fn endpoint(&self, service: &str) -> String {
        self.endpoints()[service]
            .as_str()
            .unwrap_or_else(|| panic!("no {service} in endpoints.json"))
            .to_string()
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.data_dir().join("endpoints.json"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir().join("dev.log"))
            .expect("log");
        let mut command = Command::new(BIN);
        command
            .args(["dev", "--data-dir"])
            .arg(self.data_dir())
            .args(["--http-addr", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--gateway-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(url) = &self.amqp_url {
            command.args(["--amqp-url", url]);
        }
        command.args(&self.extra);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(command.spawn().expect("start capstan dev"));
        wait_until("capstan dev answers", Duration::from_secs(60), || {
            self.data_dir().join("endpoints.json").exists()
                && self.cli(&["node", "ls", "-o", "json"]).status.success()
        });
        let agents: usize = self
            .extra
            .iter()
            .position(|a| a == "--agents")
            .and_then(|i| self.extra.get(i + 1)?.parse().ok())
            .unwrap_or(1);
        wait_until("the nodes are ready", Duration::from_secs(30), || {
            let nodes = self.json(&["node", "ls", "-o", "json"]);
            nodes
                .as_array()
                .is_some_and(|n| n.iter().filter(|n| n["status"] == "ready").count() >= agents)
        });
    }

    /// Stops `capstan dev` the way a crash would (SIGKILL), workloads untouched.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops `capstan dev` gracefully (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.spawn();
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run capstan")
    }

    /// Runs a command that must succeed and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`capstan {}` failed ({}):\nstdout: {}\nstderr: {}\n--- dev log tail ---\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    pub fn status(&self, app: &str) -> Value {
        self.json(&["app", "status", app, "-o", "json"])
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.data_dir().join("dev.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// GET through the edge proxy with a Host header: (status, body).
    pub fn get(&self, host: &str) -> Option<(u16, String)> {
        http_get(self.http_port, host, "/")
    }

    /// Distinct bodies seen over `n` requests.
    pub fn bodies(&self, host: &str, n: usize) -> BTreeSet<String> {
        (0..n)
            .filter_map(|_| self.get(host))
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| b.trim().to_string())
            .collect()
    }

    pub fn node_id(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("node-id"))
            .expect("node-id")
            .trim()
            .to_string()
    }

    /// Process records the agent's driver holds: one per running process instance.
    pub fn process_records(&self) -> Vec<Value> {
        let dir = self
            .data_dir()
            .join("agents")
            .join(self.node_id())
            .join("processes");
        let mut records: Vec<Value> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
                    .collect()
            })
            .unwrap_or_default();
        records.sort_by_key(|r| {
            r["workload"]["instance_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        });
        records
    }

    /// Live process groups started for this data dir.
    pub fn live_pids(&self) -> Vec<i32> {
        self.process_records()
            .iter()
            .filter_map(|r| r["pid"].as_i64())
            .map(|p| p as i32)
            .filter(|p| is_running(*p))
            .collect()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- capstan dev log (last 40 lines) ---\n{}",
                self.log_tail()
            );
        }
        self.crash();
        // Leave nothing behind, even when a test failed half-way.
        for pid in self.live_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        if let Ok(node) = std::fs::read_to_string(self.data_dir().join("node-id")) {
            let filter = format!("label=io.capstan.node={}", node.trim());
            if let Ok(out) = Command::new("docker")
                .args(["ps", "-aq", "--filter", &filter])
                .output()
            {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("docker").args(["rm", "-f", id]).output();
                }
            }
        }
    }
}

pub fn is_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

pub fn http_get(port: u16, host: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    // HTTP/1.0: the answer comes unchunked, ending at close.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.get(9..12)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {timeout:?} waiting until {what}");
}

/// Sends requests back to back until stopped; counts outcomes.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<Failure>>>,
    thread: Option<JoinHandle<()>>,
}

/// A request of a [`Load`] that did not get a 200.
#[derive(Debug, Clone)]
pub struct Failure {
    /// When the request was sent.
    pub sent: Instant,
    /// How long its answer (or the lack of one) took.
    pub took: Duration,
    /// What came back: `Some((status, body))`, or `None` for no answer.
    pub outcome: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} after {:?}", self.outcome, self.took)
    }
}

impl Load {
    pub fn start(port: u16, host: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, o, f, host) = (stop.clone(), ok.clone(), failures.clone(), host.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let sent = Instant::now();
                match http_get(port, &host, "/") {
                    Some((200, _)) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    other => f.lock().unwrap().push(Failure {
                        sent,
                        took: sent.elapsed(),
                        outcome: format!("{other:?}"),
                    }),
                }
            }
        });
        Load {
            stop,
            ok,
            failures,
            thread: Some(thread),
        }
    }

    /// Waits until `more` further requests have been served (panics after
    /// 30 s): the load then provably ran from before this call to after it.
    pub fn served(&self, more: usize) {
        let target = self.ok.load(Ordering::Relaxed) + more;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.ok.load(Ordering::Relaxed) < target {
            assert!(
                std::time::Instant::now() < deadline,
                "the load served {} of {target} requests in 30 s; failures: {:?}",
                self.ok.load(Ordering::Relaxed),
                self.failures.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Stops the load and returns (ok, failures).
    pub fn finish(self) -> (usize, Vec<String>) {
        let (ok, failures) = self.finish_timed();
        (ok, failures.iter().map(Failure::to_string).collect())
    }

    /// Stops the load and returns (ok, failures with their times).
    pub fn finish_timed(mut self) -> (usize, Vec<Failure>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
        )
    }
}

/// A test fixture, copied where an unprivileged app user can read it: the
/// agent (root in CI) runs process apps as `nobody`, and a clone of the repo
/// may sit under a home directory nobody else can enter.
pub fn fixture(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let dir = std::env::temp_dir().join(format!("capstan-fixtures-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the fixtures dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod fixtures dir");
    let copy = dir.join(name);
    std::fs::copy(&source, &copy).expect("copy the fixture");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).expect("chmod fixture");
    copy
}

/// Writes a spec file into `dir` and returns its path.
pub fn spec_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write spec");
    path.display().to_string()
}

pub fn whoami_spec(name: &str, replicas: u32, greeting: &str) -> String {
    capstan_testkit::require_tool("python3", "apt-get install -y python3");
    format!(
        r#"name = "{name}"
replicas = {replicas}

[run]
command = ["python3", "{script}"]

[env]
GREETING = "{greeting}"

[health]
http_path = "/"
interval = "500ms"
timeout = "400ms"
unhealthy_after = 2

[route]
hosts = ["{name}.localhost"]

[update]
max_surge = 1
max_unavailable = 0
progress_deadline = "30s"
"#,
        script = fixture("whoami.py").display()
    )
}

pub fn instance_ids(status: &Value) -> Vec<String> {
    status["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

pub fn healthy(status: &Value) -> u64 {
    status["healthy"].as_u64().unwrap_or(0)
}

/// A secret from the data dir's file store (`secrets.json`: each path holds
/// `{"value", "version"}`), as the platform's own services read it.
pub fn stored_secret(data_dir: &Path, path: &str) -> String {
    let secrets: Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir.join("secrets.json")).expect("secrets.json"),
    )
    .expect("secrets.json is JSON");
    secrets[path]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("no secret {path} in secrets.json"))
        .to_string()
}

/// A lazily connecting gRPC channel to `address`, without credentials.
pub fn channel(address: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("a valid address")
        .connect_lazy()
}

/// A token for `api_key` from `dev`'s auth service.
pub async fn token(dev: &Dev, api_key: String) -> String {
    capstan_proto::v1::auth_client::AuthClient::new(channel(&dev.endpoint("auth")))
        .issue_token(capstan_proto::v1::IssueTokenRequest { api_key })
        .await
        .expect("a token for the key")
        .into_inner()
        .token
}

/// An admin token, from the key `capstan dev` writes to its data dir.
pub async fn admin_token(dev: &Dev) -> String {
    let key = std::fs::read_to_string(dev.data_dir().join("admin.key")).expect("read admin.key");
    token(dev, key.trim().to_string()).await
}

/// `message` with `authorization: Bearer <token>`.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::try_from(format!("Bearer {token}")).expect("a valid token"),
    );
    request
}

/// How long each Traefik confirmation of a routing table took, in ms, from
/// router-config's log lines.
pub fn traefik_confirmations(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("Traefik confirmed the routing table"))
        .filter_map(|l| {
            l.split("confirm_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The Capstan services of docker-compose.yml (backends aside).
pub const COMPOSE_CAPSTAN_SERVICES: [&str; 10] = [
    "auth",
    "scheduler-1",
    "scheduler-2",
    "orchestrator-1",
    "orchestrator-2",
    "router-config",
    "metrics",
    "gateway",
    "agent-1",
    "agent-2",
];

/// The access policy of each Capstan gRPC service, by its full name.
pub fn policy_of(service: &str) -> capstan_authn::Policy {
    match service {
        "capstan.v1.Agent" => capstan_agent::policy(),
        "capstan.v1.Auth" => capstan_auth::policy(),
        "capstan.v1.Metrics" => capstan_metrics::policy(),
        "capstan.v1.Orchestrator" => capstan_orchestrator::policy(),
        "capstan.v1.RouterConfig" => capstan_router_config::policy(),
        "capstan.v1.Scheduler" => capstan_scheduler::policy(),
        other => panic!("service {other} has no policy in this test: add it"),
    }
}

/// An HTTP/1.0 request to the gateway (`Host: api.localhost`, a JSON body).
pub fn gateway_request(method: &str, path: &str, headers: &[String], body: &str) -> String {
    let mut text = format!("{method} {path} HTTP/1.0\r\nHost: api.localhost\r\n");
    for header in headers {
        text += header;
        text += "\r\n";
    }
    text + &format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Sends a raw HTTP/1.0 `request` to `addr`: (status, head, body). The
/// answer ends at close, or once nothing has come for `quiet` (a stream).
pub fn http_exchange(addr: &str, request: &str, quiet: Duration) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(quiet)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(n) = stream.read(&mut chunk) {
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
    }
    let response = String::from_utf8_lossy(&response).to_string();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}
