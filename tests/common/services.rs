//! The services as separate processes on one data dir and one real
//! RabbitMQ: start, stop, pause and resume each, read each one's log, and
//! drive them with the CLI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::BIN;

pub fn service_binary(name: &str) -> PathBuf {
    let path = Path::new(BIN).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the service binaries first with `cargo build --workspace --bins`",
        path.display()
    );
    path
}

pub struct Services {
    pub dir: tempfile::TempDir,
    amqp_url: String,
    /// The `--peer` every process gets: one address per service name.
    peers: Vec<(String, u16)>,
    /// Where the CLI finds each service (defaults to the peers).
    addresses: Vec<(String, u16)>,
    /// Flags every process gets.
    common: Vec<String>,
    /// Environment every CLI command gets.
    cli_env: Vec<(String, String)>,
    children: BTreeMap<String, Child>,
}

impl Services {
    pub fn new(amqp_url: String) -> Services {
        Services {
            dir: tempfile::tempdir().unwrap(),
            amqp_url,
            peers: Vec::new(),
            addresses: Vec::new(),
            common: Vec::new(),
            cli_env: Vec::new(),
            children: BTreeMap::new(),
        }
    }

    /// Every process finds service `name` at `port` (registered as healthy).
    pub fn peer(&mut self, name: &str, port: u16) {
        self.peers.push((name.to_string(), port));
    }

    /// The CLI finds service `name` at `port`; no process is told.
    pub fn address(&mut self, name: &str, port: u16) {
        self.addresses.push((name.to_string(), port));
    }

    /// Every process started from now on gets `flags`.
    pub fn common_flags(&mut self, flags: &[&str]) {
        self.common.extend(flags.iter().map(|f| f.to_string()));
    }

    /// Every CLI command from now on gets `name=value` in its environment.
    pub fn cli_env(&mut self, name: &str, value: &str) {
        self.cli_env.push((name.to_string(), value.to_string()));
    }

    pub fn port_of(&self, name: &str) -> u16 {
        self.addresses
            .iter()
            .chain(&self.peers)
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("no peer {name}"))
    }

    pub fn log_path(&self, label: &str) -> PathBuf {
        self.dir.path().join(format!("{label}.log"))
    }

    pub fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.log_path(label)).unwrap_or_default()
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        self.children
            .keys()
            .map(|label| format!("--- {label} ---\n{}", tail(&self.log(label), 30)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts `binary` as `label`, serving on `listen`.
    pub fn spawn(&mut self, label: &str, binary: &str, listen: u16, extra: &[String]) {
        let log = std::fs::File::create(self.log_path(label)).unwrap();
        let mut command = Command::new(service_binary(binary));
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{listen}"))
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--amqp-url")
            .arg(&self.amqp_url)
            .args(&self.common)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (name, port) in &self.peers {
            command
                .arg("--peer")
                .arg(format!("{name}=127.0.0.1:{port}"));
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        self.children.insert(label.to_string(), child);
    }

    pub fn pid(&self, label: &str) -> i32 {
        self.children[label].id() as i32
    }

    pub fn signal(&self, label: &str, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid(label).to_string())
            .status()
            .expect("kill(1) (apt-get install -y procps)");
        assert!(status.success(), "kill -{signal} {label}");
    }

    /// Waits up to `timeout` for `label` to exit; its status, or `None`.
    pub fn wait_exit(
        &mut self,
        label: &str,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        let child = self.children.get_mut(label)?;
        while std::time::Instant::now() < deadline {
            if let Some(status) = child.try_wait().ok().flatten() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill(&mut self, label: &str) {
        if let Some(mut child) = self.children.remove(label) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A CLI command against these services.
    pub fn cli(&self, args: &[&str]) -> Output {
        let address = |name: &str| format!("127.0.0.1:{}", self.port_of(name));
        Command::new(BIN)
            .args(args)
            .arg("--data-dir")
            .arg(self.dir.path())
            .env("CAPSTAN_ADDR", address("orchestrator"))
            .env("CAPSTAN_AUTH_ADDR", address("auth"))
            .env("CAPSTAN_SCHEDULER_ADDR", address("scheduler"))
            .env("CAPSTAN_ROUTER_ADDR", address("router-config"))
            .envs(
                self.peers
                    .iter()
                    .find(|(n, _)| n == "metrics")
                    .map(|(_, port)| ("CAPSTAN_METRICS_SERVICE_ADDR", format!("127.0.0.1:{port}"))),
            )
            .envs(self.cli_env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    }

    /// Retries `args` until it succeeds; its stdout.
    pub fn cli_until_ok(&self, args: &[&str], timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let out = self.cli(args);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "`capstan {}` kept failing: {}\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Issues node `node` its key and starts its agent on `listen`.
    pub fn spawn_agent(&mut self, node: &str, listen: u16) {
        self.spawn_agent_with(node, listen, &[]);
    }

    /// [`Services::spawn_agent`] with more flags.
    pub fn spawn_agent_with(&mut self, node: &str, listen: u16, extra: &[String]) {
        let key = self.cli_until_ok(
            &["key", "create", "--name", node, "--role", "node"],
            Duration::from_secs(30),
        );
        let key_file = self.dir.path().join(format!("{node}.key"));
        std::fs::write(&key_file, key.trim()).unwrap();
        self.spawn(
            &format!("agent-{node}"),
            "capstan-agent",
            listen,
            &[
                "--node-id".into(),
                node.into(),
                "--no-docker".into(),
                // Instances on loopback: a test machine's LAN sees nothing.
                "--advertise-addr".into(),
                "127.0.0.1".into(),
                "--node-key-file".into(),
                key_file.display().to_string(),
            ]
            .into_iter()
            .chain(extra.iter().cloned())
            .collect::<Vec<_>>(),
        );
    }

    /// Waits until `capstan node ls` shows a ready node.
    pub fn wait_for_a_ready_node(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.cli(&["node", "ls", "-o", "json"]);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"ready\"") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no ready node:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        let labels: Vec<String> = self.children.keys().cloned().collect();
        for label in labels {
            // A stopped process must be resumed to die promptly.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(self.pid(&label).to_string())
                .status();
            self.kill(&label);
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
