//! Several nodes end to end: `capstan dev --agents 3`, and a separate
//! `capstan-agent` process joining a running `capstan dev`. Placement
//! (spread, constraints and their explanations), node drain under load, and
//! a node that dies.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn nodes_of(status: &Value) -> Vec<String> {
    status["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["node"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn node_ls(dev: &Dev) -> BTreeMap<String, Value> {
    dev.json(&["node", "ls", "-o", "json"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|n| (n["id"].as_str().unwrap_or_default().to_string(), n))
        .collect()
}

#[test]
fn three_agents_spread_explain_and_drain_without_failed_requests() {
    let dev = Dev::start_with(None, &["--agents", "3", "--no-docker"]);

    // Three nodes with distinct ids, zones and capacities.
    let nodes = node_ls(&dev);
    assert_eq!(nodes.len(), 3, "{nodes:#?}");
    let zones: BTreeSet<&str> = nodes
        .values()
        .filter_map(|n| n["labels"]["zone"].as_str())
        .collect();
    assert_eq!(zones.len(), 3, "{nodes:#?}");
    let memory: BTreeSet<u64> = nodes
        .values()
        .filter_map(|n| n["capacity"]["memory_mb"].as_u64())
        .collect();
    assert_eq!(memory.len(), 3, "capacities differ: {nodes:#?}");
    assert!(
        nodes
            .values()
            .all(|n| n["labels"]["kernel.name"] == "linux"),
        "agents report their attributes: {nodes:#?}"
    );

    // Spread (the default): one instance per node.
    let spec = spec_file(dev.data_dir(), "web.toml", &whoami_spec("web", 3, "hi"));
    dev.ok(&["app", "deploy", "-f", &spec, "--timeout", "60s"]);
    let placed: BTreeSet<String> = nodes_of(&dev.status("web")).into_iter().collect();
    assert_eq!(placed.len(), 3, "spread across 3 nodes: {placed:?}");

    // A constraint no node meets: the deploy fails and says why.
    let pinned = whoami_spec("pinned", 1, "hi").replace(
        "[update]",
        "[placement]\nconstraints = [\"zone == zone-x\"]\n\n[update]",
    );
    let pinned = spec_file(dev.data_dir(), "pinned.toml", &pinned);
    let out = dev.cli(&["app", "deploy", "-f", &pinned, "--timeout", "60s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "deploy must fail: {stderr}");
    assert!(
        stderr.contains(
            "placed 0 of 1 instances of pinned: of 3 nodes, 3 filtered by constraint zone == zone-x"
        ),
        "{stderr}"
    );
    let status = dev.ok(&["app", "status", "pinned"]);
    assert!(
        status.contains("placement: placed 0 of 1 instances of pinned"),
        "{status}"
    );
    // More memory than two instances can get: one runs, the other is explained.
    let big = whoami_spec("big", 2, "hi")
        .replace("[update]", "[resources]\nmemory_mb = 7000\n\n[update]");
    let big = spec_file(dev.data_dir(), "big.toml", &big);
    let out = dev.cli(&["app", "deploy", "-f", &big, "--timeout", "60s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("instances of big: of 3 nodes, 3 exhausted memory"),
        "{stderr}"
    );
    dev.ok(&["app", "rm", "big"]);
    dev.ok(&["app", "rm", "pinned"]);

    // Drain a node under continuous requests: nothing fails.
    let victim = nodes_of(&dev.status("web"))[0].clone();
    let load = Load::start(dev.http_port, "web.localhost");
    std::thread::sleep(Duration::from_millis(300));
    let out = dev.ok(&["node", "drain", &victim, "--timeout", "90s"]);
    assert!(out.contains(&format!("node {victim} is drained")), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failures) = load.finish();
    assert!(ok > 50, "traffic flowed during the drain: {ok}");
    assert!(
        failures.is_empty(),
        "{} requests failed during the drain: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        dev.log_tail()
    );
    let status = dev.status("web");
    assert_eq!(healthy(&status), 3, "{status:#}");
    assert!(!nodes_of(&status).contains(&victim), "{status:#}");
    let drained = &node_ls(&dev)[&victim];
    assert_eq!(drained["status"], "draining");
    assert_eq!(drained["instances"], 0);

    // New work stays off a draining node; cancelling makes it eligible.
    dev.ok(&["app", "scale", "web", "6"]);
    wait_until(
        "web has 6 healthy instances",
        Duration::from_secs(60),
        || healthy(&dev.status("web")) == 6,
    );
    assert!(!nodes_of(&dev.status("web")).contains(&victim));
    dev.ok(&["node", "drain", &victim, "--cancel"]);
    assert_eq!(node_ls(&dev)[&victim]["status"], "ready");
}

/// Kills `child` and the process groups of the instances it started.
fn kill_node(agent: &mut Child, state_dir: &Path) {
    let _ = agent.kill();
    let _ = agent.wait();
    for entry in std::fs::read_dir(state_dir.join("processes"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let record: Value =
            serde_json::from_slice(&std::fs::read(entry.path()).unwrap_or_default())
                .unwrap_or(Value::Null);
        if let Some(pid) = record["pid"].as_i64() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

#[test]
fn a_separate_agent_joins_and_its_instances_come_back_elsewhere_when_it_dies() {
    let broker = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(capstan_testkit::rabbitmq::RabbitMq::start());
    let dev = Dev::start_with(Some(broker.amqp_uri()), &["--agents", "2", "--no-docker"]);
    let endpoints: Value = serde_json::from_slice(
        &std::fs::read(dev.data_dir().join("endpoints.json")).expect("endpoints.json"),
    )
    .unwrap();
    let agent_binary = Path::new(BIN).with_file_name("capstan-agent");
    assert!(
        agent_binary.exists(),
        "{} is missing: build the service binaries first with `cargo build --workspace --bins`",
        agent_binary.display()
    );
    // An admin issues the joining node its key: it may act only as `joiner`.
    let node_key = dev.data_dir().join("joiner.key");
    std::fs::write(
        &node_key,
        dev.ok(&["key", "create", "--name", "joiner", "--role", "node"]),
    )
    .unwrap();
    let log = std::fs::File::create(dev.data_dir().join("joiner.log")).unwrap();
    let mut joiner = Command::new(&agent_binary)
        .arg("--node-key-file")
        .arg(&node_key)
        .args([
            "--node-id",
            "joiner",
            "--no-docker",
            "--label",
            "zone=zone-j",
        ])
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", capstan_testkit::free_port()))
        .arg("--data-dir")
        .arg(dev.data_dir())
        .args(["--amqp-url", &broker.amqp_uri()])
        .arg("--peer")
        .arg(format!("auth={}", endpoints["auth"].as_str().unwrap()))
        .arg("--peer")
        .arg(format!(
            "scheduler={}",
            endpoints["scheduler"].as_str().unwrap()
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start capstan-agent");
    wait_until(
        "the joiner is a ready node",
        Duration::from_secs(30),
        || {
            node_ls(&dev)
                .get("joiner")
                .is_some_and(|n| n["status"] == "ready" && n["labels"]["zone"] == "zone-j")
        },
    );

    let spec = spec_file(dev.data_dir(), "web.toml", &whoami_spec("web", 3, "hi"));
    dev.ok(&["app", "deploy", "-f", &spec, "--timeout", "60s"]);
    let placed = nodes_of(&dev.status("web"));
    assert!(
        placed.contains(&"joiner".to_string()),
        "spread uses the joiner: {placed:?}"
    );

    kill_node(&mut joiner, &dev.data_dir().join("agents").join("joiner"));
    wait_until(
        "the joiner's instance is replaced on the other nodes",
        Duration::from_secs(60),
        || {
            let status = dev.status("web");
            healthy(&status) == 3 && !nodes_of(&status).contains(&"joiner".to_string())
        },
    );
    assert_eq!(node_ls(&dev)["joiner"]["status"], "down");
    let bodies = dev.bodies("web.localhost", 30);
    assert_eq!(bodies.len(), 3, "three live instances answer: {bodies:?}");
    let events = dev.ok(&["events", "-o", "json", "--app", "web", "-n", "200"]);
    assert!(events.contains("node joiner is down"), "{events}");
    // The journal says why the instance was replaced, in a person's words.
    let history: serde_json::Value =
        serde_json::from_str(&dev.ok(&["app", "history", "web", "-o", "json"])).unwrap();
    let replacement = history
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "replacement")
        .unwrap_or_else(|| panic!("no replacement entry: {history:#}"));
    assert_eq!(replacement["inputs"]["node"], "joiner", "{replacement:#}");
    let reason = replacement["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("replacing web-") && reason.contains("on joiner"),
        "{reason}"
    );
}
