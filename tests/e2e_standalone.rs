//! The services as separate processes (`capstan-auth`, `capstan-scheduler`,
//! `capstan-orchestrator`, `capstan-router-config`, `capstan-agent`), talking
//! gRPC to each other and events over a real RabbitMQ, driven by the CLI.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn service_binary(name: &str) -> PathBuf {
    let path = Path::new(BIN).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the service binaries first with `cargo build --workspace --bins`",
        path.display()
    );
    path
}

struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn services_run_as_separate_processes() {
    let broker = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(capstan_testkit::rabbitmq::RabbitMq::start());
    let dir = tempfile::tempdir().unwrap();
    let port = |_: &str| capstan_testkit::free_port();
    let (auth, scheduler, orchestrator, router, agent, http) = (
        port("auth"),
        port("scheduler"),
        port("orchestrator"),
        port("router"),
        port("agent"),
        port("http"),
    );
    let peers = [
        ("auth", auth),
        ("scheduler", scheduler),
        ("orchestrator", orchestrator),
        ("router-config", router),
    ];
    let log = std::fs::File::create(dir.path().join("services.log")).unwrap();
    let spawn = |binary: &str, listen: u16, extra: &[String]| -> Child {
        let mut command = Command::new(service_binary(binary));
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{listen}"))
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--amqp-url")
            .arg(broker.amqp_uri())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log.try_clone().unwrap());
        for (name, port) in peers {
            command
                .arg("--peer")
                .arg(format!("{name}=127.0.0.1:{port}"));
        }
        command
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"))
    };
    let mut processes = Processes(Vec::new());
    processes.0.push(spawn("capstan-auth", auth, &[]));
    processes.0.push(spawn("capstan-scheduler", scheduler, &[]));
    processes
        .0
        .push(spawn("capstan-orchestrator", orchestrator, &[]));
    processes.0.push(spawn(
        "capstan-router-config",
        router,
        &["--http-addr".into(), format!("127.0.0.1:{http}")],
    ));
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .env("CAPSTAN_ADDR", format!("127.0.0.1:{orchestrator}"))
            .env("CAPSTAN_AUTH_ADDR", format!("127.0.0.1:{auth}"))
            .env("CAPSTAN_SCHEDULER_ADDR", format!("127.0.0.1:{scheduler}"))
            .env("CAPSTAN_ROUTER_ADDR", format!("127.0.0.1:{router}"))
            .output()
            .unwrap()
    };
    let logs = || std::fs::read_to_string(dir.path().join("services.log")).unwrap_or_default();
    // The admin issues the agent its node key once auth is up.
    let mut node_key = None;
    for _ in 0..150 {
        let out = cli(&["key", "create", "--name", "solo", "--role", "node"]);
        if out.status.success() {
            node_key = Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let node_key = node_key.unwrap_or_else(|| panic!("no node key from auth:\n{}", logs()));
    let key_file = dir.path().join("solo.key");
    std::fs::write(&key_file, node_key).unwrap();
    processes.0.push(spawn(
        "capstan-agent",
        agent,
        &[
            "--node-id".into(),
            "solo".into(),
            "--no-docker".into(),
            "--node-key-file".into(),
            key_file.display().to_string(),
        ],
    ));
    let mut ready = false;
    for _ in 0..150 {
        let out = cli(&["node", "ls", "-o", "json"]);
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"ready\"") {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ready, "the agent never became a ready node:\n{}", logs());

    let spec = spec_file(dir.path(), "solo.toml", &whoami_spec("solo", 2, "hi"));
    let out = cli(&["app", "deploy", "-f", &spec]);
    assert!(
        out.status.success(),
        "deploy failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    let bodies: std::collections::BTreeSet<String> = (0..20)
        .filter_map(|_| http_get(http, "solo.localhost", "/"))
        .filter(|(code, _)| *code == 200)
        .map(|(_, body)| body.trim().to_string())
        .collect();
    assert_eq!(
        bodies.len(),
        2,
        "both instances answer through the proxy: {bodies:?}"
    );
    let events = String::from_utf8_lossy(&cli(&["events", "-n", "200"]).stdout).to_string();
    assert!(
        events.contains("instance.healthy") && events.contains("node.registered"),
        "{events}"
    );

    let out = cli(&["app", "rm", "solo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        http_get(http, "solo.localhost", "/").map(|(c, _)| c),
        Some(404)
    );
}
