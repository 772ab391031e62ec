//! Cluster mode on one machine: every service a separate process, two
//! orchestrators and two schedulers, finding each other through Consul and
//! taking their secrets from Vault with AppRole (the Consul and Vault
//! doubles: wire-level stand-ins that follow the documented APIs; neither
//! can be installed here), with events on a real RabbitMQ and claims, rate
//! limits and revocations on a real Redis, every gRPC hop over mutual TLS
//! with certificates the test makes. No `--peer` flag, no secret on disk.
//! An app is deployed and reached.

mod common;

use std::time::Duration;

use capstan_testkit::consul_double::ConsulDouble;
use capstan_testkit::vault_double::VaultDouble;
use common::services::Services;
use common::*;

/// Runs infra/vault/init.sh against the double: policies, roles, and a
/// role_id and wrapped secret_id per service in `out`.
fn init_vault(vault: &VaultDouble, out: &std::path::Path) {
    capstan_testkit::require_tool("curl", "apt-get install -y curl");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/vault/init.sh");
    let init = std::process::Command::new("bash")
        .arg(script)
        .arg(out)
        .env("VAULT_ADDR", vault.address())
        .env("VAULT_TOKEN", vault.root_token())
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
}

fn vault_flags(dir: &std::path::Path, service: &str) -> Vec<String> {
    vec![
        "--vault-role-id-file".into(),
        dir.join(format!("{service}.role-id")).display().to_string(),
        "--vault-secret-id-file".into(),
        dir.join(format!("{service}.secret-id"))
            .display()
            .to_string(),
    ]
}

#[test]
fn the_services_run_on_consul_vault_rabbitmq_and_redis() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let broker = runtime.block_on(capstan_testkit::rabbitmq::RabbitMq::start());
    let redis = runtime.block_on(capstan_testkit::redis::Redis::start());
    let consul = runtime.block_on(ConsulDouble::start());
    let vault = runtime.block_on(VaultDouble::start());
    let mut services = Services::new(broker.amqp_uri());
    let files = tempfile::tempdir().unwrap();
    services.common_flags(&[
        "--registry",
        &consul.url(),
        "--secrets",
        &vault.url(),
        "--cache",
        &redis.url(),
        "--lease-ttl",
        "2s",
    ]);
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
    // The CLI is pointed at one of each; the services find each other.
    for (name, port) in [
        ("auth", auth),
        ("scheduler", scheduler_b),
        ("orchestrator", orchestrator_b),
        ("router-config", router),
    ] {
        services.address(name, port);
    }
    // A second run for the second replicas: each wrapped secret_id opens once.
    let (first, second) = (files.path().join("a"), files.path().join("b"));
    init_vault(&vault, &first);
    init_vault(&vault, &second);
    // One CA, Vault PKI's (init.sh made it); each certificate names its
    // service (SAN DNS:<service>). The control plane takes its certificates
    // from Vault; the agent and the CLI bring files from the same CA.
    let certs = tempfile::tempdir().unwrap();
    let cli = vault.pki_files(certs.path(), "capstan-cli");
    services.cli_env("CAPSTAN_TLS_CA", &cli.ca.display().to_string());
    services.cli_env("CAPSTAN_TLS_CERT", &cli.cert.display().to_string());
    services.cli_env("CAPSTAN_TLS_KEY", &cli.key.display().to_string());
    let flags = |dir: &std::path::Path, service: &str| {
        let mut flags = vault_flags(dir, service);
        if service == "agent" {
            let tls = vault.pki_files(certs.path(), service);
            flags.extend([
                "--tls-ca".to_string(),
                tls.ca.display().to_string(),
                "--tls-cert".to_string(),
                tls.cert.display().to_string(),
                "--tls-key".to_string(),
                tls.key.display().to_string(),
            ]);
        } else {
            flags.extend(["--tls-vault-pki".to_string(), format!("capstan-{service}")]);
        }
        flags
    };
    let auth_flags = flags(&first, "auth");
    let scheduler_flags = [flags(&first, "scheduler"), flags(&second, "scheduler")];
    let orchestrator_flags = [
        flags(&first, "orchestrator"),
        flags(&second, "orchestrator"),
    ];
    let mut router_flags = flags(&first, "router-config");
    router_flags.extend([
        "--http-addr".to_string(),
        format!("127.0.0.1:{http}"),
        "--traefik-kv".to_string(),
        consul.url(),
        "--zone".to_string(),
        "eu-1a".to_string(),
    ]);
    let agent_flags = flags(&first, "agent");
    services.spawn("auth", "capstan-auth", auth, &auth_flags);
    services.spawn(
        "scheduler-a",
        "capstan-scheduler",
        scheduler_a,
        &scheduler_flags[0],
    );
    services.spawn(
        "scheduler-b",
        "capstan-scheduler",
        scheduler_b,
        &scheduler_flags[1],
    );
    services.spawn(
        "orchestrator-a",
        "capstan-orchestrator",
        orchestrator_a,
        &orchestrator_flags[0],
    );
    services.spawn(
        "orchestrator-b",
        "capstan-orchestrator",
        orchestrator_b,
        &orchestrator_flags[1],
    );
    services.spawn(
        "router-config",
        "capstan-router-config",
        router,
        &router_flags,
    );
    services.spawn_agent_with("solo", agent, &agent_flags);
    services.wait_for_a_ready_node();

    // Every service registered itself in Consul, with a TTL check it keeps
    // passing; both replicas of the doubled ones.
    let registered: Vec<serde_json::Value> = consul
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/agent/service/register")
        .filter_map(|r| serde_json::from_str(&r.body).ok())
        .collect();
    for (name, port) in [
        ("auth", auth),
        ("scheduler", scheduler_a),
        ("scheduler", scheduler_b),
        ("orchestrator", orchestrator_a),
        ("orchestrator", orchestrator_b),
        ("router-config", router),
    ] {
        assert!(
            registered
                .iter()
                .any(|body| body["Name"] == name && body["Port"] == port),
            "{name} on {port} registered in Consul:\n{}",
            services.logs()
        );
    }
    // Version and zone go in the tags.
    let router_registration = registered
        .iter()
        .find(|body| body["Name"] == "router-config")
        .unwrap();
    let tags = router_registration["Tags"].as_array().unwrap();
    assert!(tags.iter().any(|t| t == "zone=eu-1a"), "{tags:?}");
    assert!(
        tags.iter()
            .any(|t| t.as_str().is_some_and(|t| t.starts_with("version="))),
        "{tags:?}"
    );
    assert!(
        consul
            .requests()
            .iter()
            .any(|r| r.path.starts_with("/v1/agent/check/pass/service:")),
        "TTL checks are kept passing"
    );
    // One leader per singleton role, each holding a Consul lock (a session
    // plus a KV acquire) that names it.
    for role in [
        capstan_orchestrator::RECONCILER_ROLE,
        capstan_scheduler::NODE_WATCHER_ROLE,
    ] {
        let key = format!("{}/{role}", capstan_registry::lock::CONSUL_LOCK_PREFIX);
        wait_until(
            "the role is locked in Consul",
            Duration::from_secs(10),
            || consul.lock_holder(&key).is_some(),
        );
        let holder = consul.kv(&key).unwrap_or_default();
        assert!(
            holder.starts_with(role.split('.').next().unwrap()),
            "{role} held by {holder}"
        );
    }
    // Every gRPC port is mutual TLS: plaintext is refused.
    for port in [auth, scheduler_a, orchestrator_b, router, agent] {
        let plaintext = runtime.block_on(async {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&format!(
                "127.0.0.1:{port}"
            )));
            tokio::time::timeout(
                Duration::from_secs(5),
                health.check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                }),
            )
            .await
        });
        assert!(
            !matches!(plaintext, Ok(Ok(_))),
            "port {port} answered plaintext"
        );
    }
    // Secrets came from Vault, every request within the documented API, and
    // none of them is on disk.
    assert_eq!(vault.violations(), Vec::<String>::new());
    assert!(
        vault.logins() >= 7,
        "every process logged in: {}",
        vault.logins()
    );
    assert!(
        !services.dir.path().join("secrets.json").exists(),
        "no secrets file beside the services"
    );
    // Every control-plane process took its certificate from Vault PKI.
    let issued: Vec<String> = vault
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v1/pki/issue/"))
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(issued.len(), 6, "{issued:?}");
    // Tokens are signed by Vault transit: no signing key in KV or on disk.
    let vault_requests = vault.requests();
    assert!(
        vault_requests
            .iter()
            .any(|r| r.path == "/v1/transit/sign/capstan-jwt"),
        "auth signs with transit"
    );
    assert!(
        !vault_requests
            .iter()
            .any(|r| r.path.contains("signing-key")),
        "no signing key stored anywhere"
    );

    let spec = spec_file(
        services.dir.path(),
        "c.toml",
        &whoami_spec("c", 2, "in-cluster"),
    );
    let out = services.cli(&["app", "deploy", "-f", &spec]);
    assert!(
        out.status.success(),
        "deploy: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        services.logs()
    );
    wait_until(
        "the app answers through the proxy",
        Duration::from_secs(20),
        || {
            http_get(http, "c.localhost", "/")
                .is_some_and(|(code, body)| code == 200 && body.contains("in-cluster"))
        },
    );
    // Traefik's Consul KV provider finds the app under `traefik/`, routed
    // to both instances.
    wait_until(
        "the app's router is in Consul KV",
        Duration::from_secs(10),
        || {
            let tree = consul.kv_tree("traefik/http/");
            tree.get("traefik/http/routers/capstan-c/rule")
                .is_some_and(|rule| rule == "Host(`c.localhost`)")
                && tree
                    .keys()
                    .filter(|k| {
                        k.starts_with("traefik/http/services/capstan-c/loadBalancer/servers/")
                    })
                    .count()
                    == 2
        },
    );

    // SIGTERM to a scheduler under load: it leaves Consul first, finishes
    // its calls and exits within 10 s; the orchestrators' calls go to the
    // other scheduler, and a scale-up (which places through the scheduler)
    // completes with no request through the proxy failing.
    let load = Load::start(http, "c.localhost");
    let terminated = std::time::Instant::now();
    services.signal("scheduler-a", "TERM");
    let scale = services.cli(&["app", "scale", "c", "3"]);
    assert!(
        scale.status.success(),
        "scale after SIGTERM: {}\n{}",
        String::from_utf8_lossy(&scale.stderr),
        services.logs()
    );
    wait_until("three healthy instances", Duration::from_secs(30), || {
        let status = services.cli(&["app", "status", "c", "-o", "json"]);
        serde_json::from_slice::<serde_json::Value>(&status.stdout).is_ok_and(|s| healthy(&s) == 3)
    });
    let exited = services
        .wait_exit("scheduler-a", Duration::from_secs(12))
        .expect("scheduler-a exited within its leave delay and drain timeout");
    assert!(
        exited.success(),
        "scheduler-a: {exited}\n{}",
        services.log("scheduler-a")
    );
    eprintln!(
        "SIGTERM: scheduler-a gone {:.1} s after the signal",
        terminated.elapsed().as_secs_f64()
    );
    let log = services.log("scheduler-a");
    assert!(log.contains("left the registry; draining"), "{log}");
    assert!(
        consul
            .requests()
            .iter()
            .any(|r| r.path.starts_with("/v1/agent/service/deregister/scheduler")),
        "scheduler-a left Consul"
    );
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed",
        failures.len(),
        ok + failures.len()
    );

    let out = services.cli(&["app", "rm", "c"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "the app's keys leave Consul KV",
        Duration::from_secs(20),
        || consul.kv_tree("traefik/").is_empty(),
    );
    let transactions = consul
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/txn")
        .count();
    assert!(transactions >= 2, "{transactions} transactions");
    drop(services);
    drop(consul);
    drop(vault);
    drop(runtime);
}

#[test]
fn a_bad_registry_url_names_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::services::service_binary("capstan-auth"))
        .args([
            "--registry",
            "zookeeper://x:1",
            "--amqp-url",
            "amqp://127.0.0.1:1/%2f",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--registry"), "{stderr}");
    assert!(stderr.contains("zookeeper://x:1"), "{stderr}");
}

#[test]
fn bad_store_and_secrets_urls_name_their_flags() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--store", "cassandra://db/ks"),
        ("--store", "scylla://db/1bad"),
        ("--secrets", "consul://x:1"),
        ("--bus", "kafka://broker:9092"),
        ("--bus", "amqp://capstan:hunter2@:5672"),
        ("--cache", "memcached://x:1"),
        ("--cache", "redis://:hunter2@"),
    ] {
        let bus: &[&str] = if flag == "--bus" {
            &[]
        } else {
            &["--bus", "amqp://127.0.0.1:1/%2f"]
        };
        let out = std::process::Command::new(common::services::service_binary("capstan-auth"))
            .args([flag, value, "--backend-wait", "300ms"])
            .args(bus)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "{flag}: the password leaked: {stderr}"
        );
    }
}

/// A bad URL is refused before any backend is dialled, even one (Vault,
/// for its certificate) that is reached before the others.
#[test]
fn a_bad_url_is_refused_before_vault_is_dialled() {
    let dir = tempfile::tempdir().unwrap();
    let port = capstan_testkit::free_port();
    let out = std::process::Command::new(common::services::service_binary("capstan-auth"))
        .args(["--bus", "kafka://broker:9092"])
        .args(["--secrets", &format!("vault://127.0.0.1:{port}")])
        .args(["--tls-vault-pki", "capstan-auth"])
        .args(["--vault-role-id-file", "/nonexistent/role-id"])
        .args(["--vault-secret-id-file", "/nonexistent/secret-id"])
        .args(["--backend-wait", "20s"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--bus"), "{stderr}");
    assert!(
        !stderr.contains("not ready, retrying"),
        "Vault was dialled first: {stderr}"
    );
}

#[test]
fn a_broker_that_is_down_at_start_is_retried_then_named() {
    let dir = tempfile::tempdir().unwrap();
    let port = capstan_testkit::free_port();
    let out = std::process::Command::new(common::services::service_binary("capstan-auth"))
        .args([
            "--bus",
            &format!("amqp://capstan:hunter2@127.0.0.1:{port}/%2f"),
        ])
        .args(["--backend-wait", "1s"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("RabbitMQ (--bus)"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(
        stderr.contains("retrying"),
        "each attempt is logged: {stderr}"
    );
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
}

/// A service whose backend is not up yet listens and says NOT_SERVING, and
/// turns SERVING once the backend answers.
#[test]
fn health_says_not_serving_until_every_backend_answers() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (listen, redis_port) = (capstan_testkit::free_port(), capstan_testkit::free_port());
    let mut auth = std::process::Command::new(common::services::service_binary("capstan-auth"))
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--bus", "memory"])
        .args(["--cache", &format!("redis://127.0.0.1:{redis_port}/0")])
        .args(["--backend-wait", "60s"])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = |runtime: &tokio::runtime::Runtime| {
        runtime.block_on(async {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&format!(
                "127.0.0.1:{listen}"
            )));
            tokio::time::timeout(
                Duration::from_secs(2),
                health.check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                }),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|r| r.into_inner().status)
        })
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    wait_until(
        "health answers NOT_SERVING while Redis is down",
        Duration::from_secs(20),
        || status(&runtime) == Some(ServingStatus::NotServing as i32),
    );
    let redis = runtime.block_on(capstan_testkit::redis::Redis::start_on(redis_port));
    wait_until(
        "health answers SERVING once Redis is up",
        Duration::from_secs(30),
        || status(&runtime) == Some(ServingStatus::Serving as i32),
    );
    let _ = auth.kill();
    let _ = auth.wait();
    drop(redis);
}
