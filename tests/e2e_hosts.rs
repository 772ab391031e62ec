//! Capstan across hosts: a control plane container (`capstan dev --agents
//! 0`, on a real RabbitMQ) and three `capstan-agent` containers, each with
//! its own hostname and address on a private Docker network, all from the
//! image the Dockerfile builds around this run's binaries. The real Traefik
//! 3 fronts the apps, reading router-config's HTTP provider and confirming
//! each table through its API.
//!
//! One ordered scenario (the images and the cluster are built once): a
//! 6-replica app spread over the agents and reached through Traefik; a
//! rolling update, a scale from 6 to 2 and a node drain under load with no
//! failed request; an agent killed (replaced within 20 s; only requests sent
//! within 1 s of the kill may fail, at most two per client), paused for
//! 45 s, and cut off the network and back, each ending with exactly the
//! desired instances and no duplicate.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use capstan_testkit::traefik::Traefik;
use common::docker::{Network, build_image, docker, docker_ok};
use common::*;
use serde_json::Value;

const AGENTS: [(&str, u8); 3] = [("agent-1", 11), ("agent-2", 12), ("agent-3", 13)];
const AGENT_PORT: u16 = 7005;

struct Cluster {
    net: Network,
    data_dir: tempfile::TempDir,
    keys: tempfile::TempDir,
    fixtures: String,
    endpoints: Value,
    amqp: String,
}

impl Cluster {
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .args(args)
            .output()
            .expect("run capstan")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "capstan {args:?} failed: {}\n--- ctl ---\n{}\n--- agent-1 ---\n{}\n--- events ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.net.logs("ctl"),
            self.net.logs("agent-1"),
            String::from_utf8_lossy(&self.cli(&["events", "-n", "30"]).stdout),
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn status(&self, app: &str) -> Value {
        serde_json::from_str(&self.ok(&["app", "status", app, "-o", "json"])).unwrap()
    }

    /// Healthy instances per node.
    fn placement(&self, app: &str) -> BTreeMap<String, usize> {
        let mut nodes = BTreeMap::new();
        for instance in self.status(app)["instances"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if instance["state"] == "healthy" {
                *nodes
                    .entry(instance["node"].as_str().unwrap_or("").to_string())
                    .or_default() += 1;
            }
        }
        nodes
    }

    fn start_agent(&self, node: &str, ip: u8) {
        let key_file = self.keys.path().join(format!("{node}.key"));
        if !key_file.exists() {
            let key = self.ok(&["key", "create", "--name", node, "--role", "node"]);
            std::fs::write(&key_file, key.trim()).unwrap();
        }
        let keys = format!("{}:/keys:ro", self.keys.path().display());
        let fixtures = format!("{0}:{0}:ro", self.fixtures);
        let (auth, scheduler) = (
            format!("auth={}", self.endpoints["auth"].as_str().unwrap()),
            format!(
                "scheduler={}",
                self.endpoints["scheduler"].as_str().unwrap()
            ),
        );
        let key_path = format!("/keys/{node}.key");
        let listen = format!("0.0.0.0:{AGENT_PORT}");
        self.net.run(
            node,
            ip,
            // Root in its container, so that process apps run as `nobody`.
            &["--user", "0", "-v", &keys, "-v", &fixtures],
            &[
                "capstan-agent",
                "--node-id",
                node,
                "--listen",
                &listen,
                "--node-key-file",
                &key_path,
                "--peer",
                &auth,
                "--peer",
                &scheduler,
                "--bus",
                &self.amqp,
                "--no-docker",
                // No --advertise-addr: the primary interface's address.
            ],
        );
    }

    /// App processes running in each agent container.
    fn processes(&self) -> BTreeMap<String, usize> {
        AGENTS
            .iter()
            .map(|(node, _)| {
                let out = docker(&[
                    "exec",
                    &self.net.container(node),
                    "sh",
                    "-c",
                    "for p in /proc/[0-9]*; do tr '\\0' ' ' <$p/cmdline 2>/dev/null; echo; done | grep -c '^python3 [^ ]*whoami.py'",
                ]);
                let count = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
                (node.to_string(), count)
            })
            .collect()
    }

    /// Waits until the app has exactly `count` healthy instances, none on
    /// `not_on`, one process per instance on the agents and no other.
    fn settle(&self, app: &str, count: usize, not_on: &[&str], timeout: Duration) -> Duration {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < timeout {
            let status = self.status(app);
            let instances = status["instances"].as_array().cloned().unwrap_or_default();
            let healthy: Vec<&Value> = instances
                .iter()
                .filter(|i| i["state"] == "healthy")
                .collect();
            let ids: BTreeSet<&str> = instances.iter().filter_map(|i| i["id"].as_str()).collect();
            let misplaced = healthy
                .iter()
                .any(|i| not_on.contains(&i["node"].as_str().unwrap_or("")));
            let running: usize = self
                .processes()
                .iter()
                .filter(|(node, _)| !not_on.contains(&node.as_str()))
                .map(|(_, n)| n)
                .sum();
            if healthy.len() == count
                && instances.len() == count
                && ids.len() == count
                && !misplaced
                && running == count
            {
                return started.elapsed();
            }
            last = format!(
                "{} healthy of {} instances ({} ids), {running} processes {:?}, misplaced: {misplaced}",
                healthy.len(),
                instances.len(),
                ids.len(),
                self.processes()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "{app} did not settle on {count} instances in {timeout:?}: {last}\n--- ctl ---\n{}",
            self.net.logs("ctl")
        );
    }
}

fn bodies_through(traefik: &Traefik, host: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .filter_map(|_| http_get(traefik.port(), host, "/"))
        .filter(|(code, _)| *code == 200)
        .map(|(_, body)| body)
        .collect()
}

/// Stops a closed-loop client; none of its requests may have failed.
fn finish_load(load: Load, what: &str) {
    let (ok, failures) = load.finish();
    assert!(ok > 50, "{what}: the load ran ({ok} requests)");
    assert!(
        failures.is_empty(),
        "{what}: {} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    eprintln!("{what}: {ok} requests, none failed");
}

/// How long after a host dies requests sent through Traefik may still
/// fail: Traefik's health check (every 500 ms, 400 ms timeout: the apps'
/// own) takes its servers out of rotation within 0.9 s, and until then a
/// dial to them times out (1 s) and the request is retried elsewhere.
const LOSS_WINDOW: Duration = Duration::from_secs(1);
/// Failures one client may see when a host dies: the request it had in
/// flight there, and one written on a kept-alive connection to the host
/// before Traefik read that connection's close. Traefik never replays a
/// request it has written to a server, and no router can tell whether a
/// server that died mid-request acted on it.
const LOSS_PER_CLIENT: usize = 2;

/// Stops the node-loss clients: what fails is only what was sent in the
/// [`LOSS_WINDOW`] after the host died, at most [`LOSS_PER_CLIENT`] each.
fn finish_node_loss(loads: Vec<Load>, killed: Instant) {
    let mut total = 0;
    let mut lost = Vec::new();
    for load in loads {
        let (ok, failures) = load.finish_timed();
        total += ok + failures.len();
        let failures: Vec<(Duration, String)> = failures
            .iter()
            .map(|f| {
                let after = f.sent.saturating_duration_since(killed);
                (after, format!("{f}, sent {after:?} after the kill"))
            })
            .collect();
        let late: Vec<&String> = failures
            .iter()
            .filter(|(after, _)| *after > LOSS_WINDOW)
            .map(|(_, described)| described)
            .collect();
        assert!(
            late.is_empty(),
            "node loss: requests sent more than {LOSS_WINDOW:?} after the kill failed: {late:?}"
        );
        assert!(
            failures.len() <= LOSS_PER_CLIENT,
            "node loss: one client saw {} failures, at most {LOSS_PER_CLIENT} may fail: {failures:?}",
            failures.len()
        );
        lost.extend(failures.into_iter().map(|(_, described)| described));
    }
    assert!(total > 50, "node loss: the load ran ({total} requests)");
    eprintln!(
        "node loss: {total} requests, {} failed: {lost:?}",
        lost.len()
    );
}

#[test]
fn agents_on_three_hosts_behind_traefik_survive_updates_loss_pause_and_partition() {
    build_image();
    let net = Network::create("hosts");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The broker on the host, reachable from the network's gateway.
    let broker = runtime.block_on(capstan_testkit::rabbitmq::RabbitMq::start_on("0.0.0.0"));
    let amqp = broker.amqp_uri_at(&net.gateway());

    // Traefik on the host: the web entry point for the test's load, its
    // API for router-config (in the control plane container) to read.
    let api_port = capstan_testkit::free_port();
    let traefik_api = format!("http://{}:{api_port}", net.gateway());

    // The control plane, as the image's unprivileged user, its data dir
    // bind-mounted so that the CLI here finds endpoints.json and the key.
    let data_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(data_dir.path(), Some(10001), Some(10001)).unwrap();
    let ctl_ip = net.ip(10);
    let volume = format!("{}:/var/lib/capstan/data", data_dir.path().display());
    let (grpc_host, http_addr, provider_addr) = (
        ctl_ip.clone(),
        format!("{ctl_ip}:8080"),
        format!("{ctl_ip}:8081"),
    );
    net.run(
        "ctl",
        10,
        &["-v", &volume, "-e", "RUST_LOG=info"],
        &[
            "capstan",
            "dev",
            "--agents",
            "0",
            "--grpc-host",
            &grpc_host,
            "--http-addr",
            &http_addr,
            "--traefik-provider-addr",
            &provider_addr,
            "--bus",
            &amqp,
            "--traefik-api",
            &traefik_api,
        ],
    );
    let endpoints_file = data_dir.path().join("endpoints.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !endpoints_file.exists() || !data_dir.path().join("admin.key").exists() {
        assert!(
            Instant::now() < deadline,
            "the control plane did not start:\n{}",
            net.logs("ctl")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(300));
    let endpoints: Value =
        serde_json::from_str(&std::fs::read_to_string(&endpoints_file).unwrap()).unwrap();
    let token = stored_secret(data_dir.path(), "router-config/provider-token");
    let traefik = Traefik::start_on(
        "0.0.0.0",
        &format!("http://{provider_addr}/traefik"),
        &token,
        api_port,
    );

    let spec_text = whoami_spec("web", 6, "v1");
    let fixtures = Path::new(&fixture("whoami.py"))
        .parent()
        .unwrap()
        .display()
        .to_string();
    let cluster = Cluster {
        net,
        data_dir,
        keys: tempfile::tempdir().unwrap(),
        fixtures,
        endpoints,
        amqp,
    };
    for (node, ip) in AGENTS {
        cluster.start_agent(node, ip);
    }
    wait_until("three nodes are ready", Duration::from_secs(60), || {
        let nodes: Value =
            serde_json::from_str(&cluster.ok(&["node", "ls", "-o", "json"])).unwrap_or_default();
        nodes
            .as_array()
            .is_some_and(|n| n.iter().filter(|n| n["status"] == "ready").count() == 3)
    });
    // Each agent advertises its own address on the network (the default:
    // its primary interface), and instances are dialled there.
    let nodes: Value = serde_json::from_str(&cluster.ok(&["node", "ls", "-o", "json"])).unwrap();
    for (node, ip) in AGENTS {
        let listed = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == node)
            .unwrap_or_else(|| panic!("{node} in {nodes}"));
        assert_eq!(
            listed["address"],
            format!("{}:{AGENT_PORT}", cluster.net.ip(ip)),
            "{listed}"
        );
    }

    // Six replicas, spread two per host, reached through Traefik.
    let spec = spec_file(cluster.data_dir.path(), "web.toml", &spec_text);
    cluster.ok(&["app", "deploy", "-f", &spec, "--timeout", "90s"]);
    cluster.settle("web", 6, &[], Duration::from_secs(60));
    let placement = cluster.placement("web");
    assert_eq!(
        placement.len(),
        3,
        "spread over the three hosts: {placement:?}"
    );
    assert!(placement.values().all(|n| *n == 2), "{placement:?}");
    // Each instance serves on its own host's address, where routers dial it.
    let ips: BTreeMap<&str, String> = AGENTS
        .iter()
        .map(|(n, ip)| (*n, cluster.net.ip(*ip)))
        .collect();
    for instance in cluster.status("web")["instances"].as_array().unwrap() {
        let node = instance["node"].as_str().unwrap();
        let address = instance["address"].as_str().unwrap();
        assert!(
            address.starts_with(&format!("{}:", ips[node])),
            "{node}'s instance serves on {address}"
        );
    }
    wait_until("Traefik routes all six", Duration::from_secs(30), || {
        bodies_through(&traefik, "web.localhost", 60).len() == 6
    });

    // A rolling update through Traefik under load: nothing fails.
    let load = Load::start(traefik.port(), "web.localhost");
    let update = spec_file(
        cluster.data_dir.path(),
        "web.toml",
        &whoami_spec("web", 6, "v2"),
    );
    cluster.ok(&["app", "deploy", "-f", &update, "--timeout", "120s"]);
    cluster.settle("web", 6, &[], Duration::from_secs(60));
    finish_load(load, "rolling update through Traefik");
    assert!(
        bodies_through(&traefik, "web.localhost", 30)
            .iter()
            .all(|b| b.starts_with("v2"))
    );

    // Scale from 6 to 2 under load: nothing fails.
    let load = Load::start(traefik.port(), "web.localhost");
    cluster.ok(&["app", "scale", "web", "2"]);
    cluster.settle("web", 2, &[], Duration::from_secs(60));
    finish_load(load, "scale 6 -> 2 through Traefik");
    cluster.ok(&["app", "scale", "web", "6"]);
    cluster.settle("web", 6, &[], Duration::from_secs(60));

    // Drain a node under load: its instances move first, nothing fails.
    let load = Load::start(traefik.port(), "web.localhost");
    cluster.ok(&["node", "drain", "agent-3", "--timeout", "120s"]);
    cluster.settle("web", 6, &["agent-3"], Duration::from_secs(60));
    finish_load(load, "node drain through Traefik");
    cluster.ok(&["node", "drain", "agent-3", "--cancel"]);

    // Node loss: the host of two replicas dies. Until the control plane
    // sees it gone, a request Traefik sends there waits out the 1 s dial
    // timeout before its retry: four clients keep the load going.
    let loads: Vec<Load> = (0..4)
        .map(|_| Load::start(traefik.port(), "web.localhost"))
        .collect();
    let killed = Instant::now();
    docker_ok(&["kill", &cluster.net.container("agent-1")]);
    let recovered = cluster.settle("web", 6, &["agent-1"], Duration::from_secs(20));
    eprintln!(
        "node loss: replicas healthy elsewhere {:.1} s after the kill",
        killed.elapsed().min(recovered).as_secs_f64()
    );
    finish_node_loss(loads, killed);
    docker_ok(&["rm", "-f", &cluster.net.container("agent-1")]);
    cluster.start_agent("agent-1", 11);

    // Pause a host for 45 s: its replicas are replaced meanwhile; once it
    // is back, the app has exactly six, with no duplicates.
    wait_until("agent-1 is back", Duration::from_secs(30), || {
        cluster
            .ok(&["node", "ls"])
            .lines()
            .any(|l| l.contains("agent-1") && l.contains("ready"))
    });
    let paused = cluster.net.container("agent-2");
    let pause_started = Instant::now();
    docker_ok(&["pause", &paused]);
    let replaced = cluster.settle("web", 6, &["agent-2"], Duration::from_secs(40));
    std::thread::sleep(Duration::from_secs(45).saturating_sub(pause_started.elapsed()));
    docker_ok(&["unpause", &paused]);
    eprintln!(
        "pause: replicas replaced {:.1} s into a 45 s pause",
        replaced.as_secs_f64()
    );
    wait_until(
        "agent-2 has no instance left",
        Duration::from_secs(60),
        || cluster.processes()["agent-2"] == 0,
    );
    cluster.settle("web", 6, &[], Duration::from_secs(30));

    // Cut a host off the network and back: the same outcome.
    let (cut, cut_ip) = (cluster.net.container("agent-3"), cluster.net.ip(13));
    docker_ok(&["network", "disconnect", &cluster.net.name, &cut]);
    cluster.settle("web", 6, &["agent-3"], Duration::from_secs(40));
    docker_ok(&[
        "network",
        "connect",
        "--ip",
        &cut_ip,
        &cluster.net.name,
        &cut,
    ]);
    wait_until(
        "agent-3 has no instance left",
        Duration::from_secs(60),
        || cluster.processes()["agent-3"] == 0,
    );
    cluster.settle("web", 6, &[], Duration::from_secs(30));
    wait_until(
        "Traefik routes six instances",
        Duration::from_secs(30),
        || bodies_through(&traefik, "web.localhost", 60).len() == 6,
    );

    // Every removal waited for Traefik's confirmation, and got it.
    let log = cluster.net.logs_all("ctl");
    let mut confirmations = traefik_confirmations(&log);
    confirmations.sort_unstable();
    assert!(confirmations.len() >= 10, "{confirmations:?}");
    assert!(!log.contains("did not confirm routing table"), "{log}");
    eprintln!(
        "Traefik confirmed {} tables: p50 {} ms, max {} ms after the table changed",
        confirmations.len(),
        confirmations[confirmations.len() / 2],
        confirmations[confirmations.len() - 1]
    );
    drop(broker);
}
