//! The services as separate processes (`capstan-auth`, `capstan-scheduler`,
//! `capstan-orchestrator`, `capstan-router-config`, `capstan-metrics`,
//! `capstan-gateway`, `capstan-agent`), talking gRPC to each other and
//! events over a real RabbitMQ, driven by the CLI and over REST.

mod common;

use std::time::Duration;

use common::services::Services;
use common::*;

#[test]
fn services_run_as_separate_processes() {
    let broker = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(capstan_testkit::rabbitmq::RabbitMq::start());
    let mut services = Services::new(broker.amqp_uri());
    let port = capstan_testkit::free_port;
    let (auth, scheduler, orchestrator, router, agent, http, metrics, gateway) = (
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
    services.peer("scheduler", scheduler);
    services.peer("orchestrator", orchestrator);
    services.peer("router-config", router);
    services.peer("metrics", metrics);
    services.spawn("auth", "capstan-auth", auth, &[]);
    services.spawn("scheduler", "capstan-scheduler", scheduler, &[]);
    services.spawn("orchestrator", "capstan-orchestrator", orchestrator, &[]);
    services.spawn(
        "router-config",
        "capstan-router-config",
        router,
        &[
            "--http-addr".into(),
            format!("127.0.0.1:{http}"),
            "--sample-every".into(),
            "1s".into(),
        ],
    );
    services.spawn("metrics", "capstan-metrics", metrics, &[]);
    services.spawn("gateway", "capstan-gateway", gateway, &[]);
    // The admin issues the agent its node key once auth is up.
    services.spawn_agent_with("solo", agent, &["--sample-every".into(), "1s".into()]);
    services.wait_for_a_ready_node();

    let spec = spec_file(
        services.dir.path(),
        "solo.toml",
        &whoami_spec("solo", 2, "hi"),
    );
    let out = services.cli(&["app", "deploy", "-f", &spec]);
    assert!(
        out.status.success(),
        "deploy failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        services.logs()
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
    // The agent's and the proxy's samples reach the metrics service.
    let mut top = serde_json::Value::Null;
    wait_until(
        "app top shows both instances with traffic",
        Duration::from_secs(30),
        || {
            let _ = http_get(http, "solo.localhost", "/");
            let out = services.cli(&["app", "top", "solo", "-o", "json"]);
            top = serde_json::from_slice(&out.stdout).unwrap_or_default();
            top.as_array().is_some_and(|list| {
                list.len() == 2
                    && list.iter().all(|u| u["memory_bytes"].as_u64() > Some(0))
                    && list.iter().any(|u| u["rps"].as_f64() > Some(0.0))
            })
        },
    );
    assert!(top[0]["node"] == "solo", "{top}");
    // The gateway, its own process, answers REST with the caller's key.
    let key = std::fs::read_to_string(services.dir.path().join("admin.key")).unwrap();
    let rest = |key: &str| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", gateway)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        write!(
            stream,
            "GET /v1/apps/solo HTTP/1.0\r\nAuthorization: Bearer {}\r\n\r\n",
            key.trim()
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    };
    let mut answer = String::new();
    wait_until("the gateway answers", Duration::from_secs(30), || {
        answer = rest(&key).unwrap_or_default();
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
    });
    assert!(answer.contains("\"healthy\":2"), "{answer}");
    let denied = rest("not-a-key").unwrap_or_default();
    assert!(
        denied.contains(" 401 ") && denied.contains("application/problem+json"),
        "{denied}"
    );
    let events =
        String::from_utf8_lossy(&services.cli(&["events", "-n", "200"]).stdout).to_string();
    assert!(
        events.contains("instance.healthy") && events.contains("node.registered"),
        "{events}"
    );

    services.cli_until_ok(&["app", "rm", "solo"], Duration::from_secs(1));
    assert_eq!(
        http_get(http, "solo.localhost", "/").map(|(c, _)| c),
        Some(404)
    );
}
