//! Two orchestrators and two schedulers as separate processes on one store:
//! one leads each singleton role; when the leading orchestrator dies, the
//! standby takes over and the app converges; when it is paused past its
//! lease and resumed, it steps down and changes nothing.

mod common;

use std::time::{Duration, Instant};

use common::services::Services;
use common::*;

const LEASE_TTL: &str = "2s";

/// Auth, two schedulers, two orchestrators (`orchestrator-a` leads),
/// router-config and one agent. Every client reaches the second
/// orchestrator and the second scheduler, which serve as standbys.
fn start(broker: &capstan_testkit::rabbitmq::RabbitMq) -> Services {
    let mut services = Services::new(broker.amqp_uri());
    let port = capstan_testkit::free_port;
    let (auth, scheduler_a, scheduler_b, orchestrator_a, orchestrator_b, router, agent, http) = (
        port(),
        port(),
        port(),
        port(),
        port(),
        port(),
        port(),
        port(),
    );
    services.peer("auth", auth);
    services.peer("scheduler", scheduler_b);
    services.peer("orchestrator", orchestrator_b);
    services.peer("router-config", router);
    std::fs::write(services.dir.path().join("http-port"), http.to_string()).unwrap();
    let lease = ["--lease-ttl".to_string(), LEASE_TTL.to_string()];
    services.spawn("auth", "capstan-auth", auth, &[]);
    services.spawn("scheduler-a", "capstan-scheduler", scheduler_a, &lease);
    services.spawn(
        "orchestrator-a",
        "capstan-orchestrator",
        orchestrator_a,
        &lease,
    );
    wait_for_log(&services, "orchestrator-a", "acquired leadership");
    wait_for_log(&services, "scheduler-a", "acquired leadership");
    services.spawn("scheduler-b", "capstan-scheduler", scheduler_b, &lease);
    services.spawn(
        "orchestrator-b",
        "capstan-orchestrator",
        orchestrator_b,
        &lease,
    );
    services.spawn(
        "router-config",
        "capstan-router-config",
        router,
        &["--http-addr".into(), format!("127.0.0.1:{http}")],
    );
    services.spawn_agent("solo", agent);
    services.wait_for_a_ready_node();
    services
}

fn wait_for_log(services: &Services, label: &str, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !services.log(label).contains(line) {
        assert!(
            Instant::now() < deadline,
            "{label} never logged `{line}`:\n{}",
            services.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn healthy_count(services: &Services, app: &str) -> u64 {
    let out = services.cli(&["app", "status", app, "-o", "json"]);
    serde_json::from_slice(&out.stdout)
        .map(|status: serde_json::Value| healthy(&status))
        .unwrap_or(0)
}

fn instance_count(services: &Services, app: &str) -> usize {
    let out = services.cli(&["app", "status", app, "-o", "json"]);
    serde_json::from_slice(&out.stdout)
        .map(|status: serde_json::Value| instance_ids(&status).len())
        .unwrap_or(0)
}

fn deploy(services: &Services, replicas: u32) {
    let spec = spec_file(
        services.dir.path(),
        "ha.toml",
        &whoami_spec("ha", replicas, "hi"),
    );
    let out = services.cli(&["app", "deploy", "-f", &spec]);
    assert!(
        out.status.success(),
        "deploy: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        services.logs()
    );
}

/// Waits until `ha` has exactly `n` instances, all healthy; how long it took.
fn converge(services: &Services, n: usize, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if instance_count(services, "ha") == n && healthy_count(services, "ha") == n as u64 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "ha did not converge to {n} healthy instances in {within:?}:\n{}",
            services.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_standby_orchestrator_takes_over_when_the_leader_dies() {
    let broker = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(capstan_testkit::rabbitmq::RabbitMq::start());
    let mut services = start(&broker);
    assert!(
        !services
            .log("orchestrator-b")
            .contains("acquired leadership"),
        "only one leader"
    );
    deploy(&services, 2);
    converge(&services, 2, Duration::from_secs(20));

    services.kill("orchestrator-a");
    services.kill("scheduler-a");
    // Through the standby (the CLI's orchestrator): more replicas, which only
    // a leading reconciler can start.
    services.cli_until_ok(&["app", "scale", "ha", "3"], Duration::from_secs(5));
    wait_for_log(&services, "orchestrator-b", "acquired leadership");
    wait_for_log(&services, "scheduler-b", "acquired leadership");
    // The lease ran out at most 2 s after the kill; 10 s more to converge.
    converge(&services, 3, Duration::from_secs(12));
}

#[test]
fn a_paused_leader_that_resumes_steps_down_and_changes_nothing() {
    let broker = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(capstan_testkit::rabbitmq::RabbitMq::start());
    let services = start(&broker);
    deploy(&services, 2);
    converge(&services, 2, Duration::from_secs(20));

    services.signal("orchestrator-a", "STOP");
    wait_for_log(&services, "orchestrator-b", "acquired leadership");
    services.cli_until_ok(&["app", "scale", "ha", "3"], Duration::from_secs(5));
    converge(&services, 3, Duration::from_secs(12));

    services.signal("orchestrator-a", "CONT");
    // It finds out at its next renewal or its next write, whichever is first.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = services.log("orchestrator-a");
        if log.contains("stepping down")
            || log.contains("lost leadership")
            || log.contains("fenced off")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resumed leader never noticed:\n{}",
            services.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The new leader keeps leading; nothing the old one did shows: still
    // exactly three healthy instances, over several reconcile passes.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(instance_count(&services, "ha"), 3, "{}", services.logs());
    }
    assert_eq!(
        services
            .log("orchestrator-a")
            .matches("acquired leadership")
            .count(),
        1,
        "the old leader did not take office again while the new one renews"
    );
}
