//! The main job, end to end, with a process app: the real `capstan dev`
//! (events over a real RabbitMQ broker) driven through the real CLI.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn deploy_scale_kill_update_delete() {
    let broker = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(capstan_testkit::rabbitmq::RabbitMq::start());
    let dev = Dev::start(Some(broker.amqp_uri()));
    let mut follow = std::process::Command::new(BIN)
        .args(["events", "--follow", "-o", "json", "--data-dir"])
        .arg(dev.data_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // 1. Deploy 3 replicas: reachable through the proxy, answers from all 3.
    let spec = spec_file(dev.data_dir(), "web.toml", &whoami_spec("web", 3, "hello"));
    let out = dev.ok(&["app", "deploy", "-f", &spec]);
    assert!(
        out.contains("app web is running: 3 healthy instances"),
        "{out}"
    );
    let status = dev.status("web");
    assert_eq!(healthy(&status), 3);
    assert_eq!(status["rollout"]["state"], "completed");
    let bodies = dev.bodies("web.localhost", 30);
    let expected: std::collections::BTreeSet<String> = instance_ids(&status)
        .iter()
        .map(|id| format!("hello from {id}"))
        .collect();
    assert_eq!(bodies, expected, "round robin reaches every instance");
    assert_eq!(dev.live_pids().len(), 3);

    // 2. Scale to 5.
    dev.ok(&["app", "scale", "web", "5"]);
    wait_until("5 healthy instances", Duration::from_secs(30), || {
        healthy(&dev.status("web")) == 5
    });
    wait_until("5 instances answer", Duration::from_secs(10), || {
        dev.bodies("web.localhost", 40).len() == 5
    });

    // 3. Kill an instance: it is replaced, traffic continues.
    let load = Load::start(dev.http_port, "web.localhost");
    let victim = dev.process_records()[0].clone();
    let victim_id = victim["workload"]["instance_id"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = victim["pid"].as_i64().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -KILL -- -{pid} failed");
    wait_until(
        "the killed instance is replaced",
        Duration::from_secs(30),
        || {
            let status = dev.status("web");
            healthy(&status) == 5 && !instance_ids(&status).contains(&victim_id)
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failures) = load.finish();
    assert!(ok > 50, "traffic continued: {ok} ok");
    assert!(
        failures.is_empty(),
        "requests failed while an instance died: {failures:?}"
    );

    // 4. Rolling update under continuous requests: zero failed requests.
    let load = Load::start(dev.http_port, "web.localhost");
    std::thread::sleep(Duration::from_millis(300));
    let updated = spec_file(
        dev.data_dir(),
        "web2.toml",
        &whoami_spec("web", 5, "bonjour"),
    );
    let out = dev.ok(&["app", "deploy", "-f", &updated]);
    assert!(out.contains("rollout completed"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failures) = load.finish();
    assert!(ok > 100, "requests kept flowing during the update: {ok}");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the rolling update: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
    let bodies = dev.bodies("web.localhost", 30);
    assert!(
        bodies.iter().all(|b| b.starts_with("bonjour from")),
        "old instances still serve: {bodies:?}"
    );
    assert_eq!(dev.live_pids().len(), 5);

    // 5. Delete: the host returns 404 and nothing is left running.
    dev.ok(&["app", "rm", "web"]);
    let (code, body) = dev.get("web.localhost").unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("no app is routed for host `web.localhost`"),
        "{body}"
    );
    assert!(
        dev.live_pids().is_empty(),
        "processes left: {:?}",
        dev.live_pids()
    );
    assert!(dev.process_records().is_empty());
    assert_eq!(dev.ok(&["app", "ls", "-o", "json"]).trim(), "[]");

    // Every state change was an event, streamed live over RabbitMQ.
    let _ = follow.kill();
    let output = follow.wait_with_output().unwrap();
    let kinds: std::collections::BTreeSet<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    for kind in [
        "app.created",
        "app.updated",
        "app.scaled",
        "app.deleted",
        "instance.scheduled",
        "instance.started",
        "instance.healthy",
        "instance.stopped",
        "instance.failed",
        "rollout.started",
        "rollout.progressed",
        "rollout.completed",
    ] {
        assert!(kinds.contains(kind), "no {kind} event in {kinds:?}");
    }
}

#[test]
fn bad_specs_are_rejected_with_the_field_and_change_nothing() {
    let dev = Dev::start(None);
    let good = spec_file(dev.data_dir(), "good.toml", &whoami_spec("keep", 1, "hi"));
    dev.ok(&["app", "deploy", "-f", &good]);
    let before = dev.ok(&["app", "ls", "-o", "json"]);
    let cases = [
        (
            "unknown.toml",
            whoami_spec("keep", 1, "hi").replace("replicas = 1", "replicas = 1\ncolour = \"red\""),
            "colour: unknown field",
        ),
        (
            "type.toml",
            whoami_spec("keep", 1, "hi").replace("replicas = 1", "replicas = \"one\""),
            "replicas: invalid type",
        ),
        (
            "range.toml",
            whoami_spec("keep", 1, "hi").replace("replicas = 1", "replicas = 100000"),
            "replicas: must be between 0 and 1000",
        ),
        (
            "norun.toml",
            "name = \"keep\"\n".to_string(),
            "run: missing",
        ),
        (
            "both.toml",
            whoami_spec("keep", 1, "hi").replace("[run]\n", "[run]\nimage = \"busybox:latest\"\n"),
            "run: set exactly one of `command` and `image`, not both",
        ),
        (
            "duration.toml",
            whoami_spec("keep", 1, "hi").replace("interval = \"500ms\"", "interval = \"fast\""),
            "health.interval:",
        ),
        (
            "name.toml",
            whoami_spec("keep", 1, "hi").replace("name = \"keep\"", "name = \"Not_A_Label\""),
            "name: `Not_A_Label` is not a DNS label",
        ),
        (
            "ports.toml",
            format!(
                "{}\n[[ports]]\nname = \"http\"\n\n[[ports]]\nname = \"http\"\n",
                whoami_spec("keep", 1, "hi")
            ),
            "ports[1].name: duplicate port name",
        ),
    ];
    for (file, text, expected) in cases {
        let path = spec_file(dev.data_dir(), file, &text);
        let out = dev.cli(&["app", "deploy", "-f", &path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file} was accepted: {stderr}");
        assert!(
            stderr.contains(expected),
            "{file}: expected `{expected}` in:\n{stderr}"
        );
    }
    assert_eq!(
        dev.ok(&["app", "ls", "-o", "json"]),
        before,
        "a rejected spec changed the app list"
    );
}

#[test]
fn a_failing_update_rolls_back_by_itself() {
    let dev = Dev::start(None);
    let good = spec_file(dev.data_dir(), "app.toml", &whoami_spec("roll", 2, "v1"));
    dev.ok(&["app", "deploy", "-f", &good]);
    let broken = whoami_spec("roll", 2, "v2").replace(
        "command = [\"python3\", ",
        "command = [\"python3\", \"-c\", \"import sys; sys.exit(3)\", ",
    );
    let broken = spec_file(dev.data_dir(), "broken.toml", &broken);
    let load = Load::start(dev.http_port, "roll.localhost");
    let out = dev.cli(&["app", "deploy", "-f", &broken]);
    let (ok, failures) = load.finish();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failing rollout must exit non-zero"
    );
    assert!(stderr.contains("rolled back"), "{stderr}");
    assert!(
        failures.is_empty() && ok > 0,
        "the old version kept serving: {ok} ok, {failures:?}"
    );
    let status = dev.status("roll");
    assert_eq!(status["rollout"]["state"], "rolled_back");
    wait_until(
        "the old version serves again",
        Duration::from_secs(20),
        || healthy(&dev.status("roll")) == 2,
    );
    assert!(
        dev.bodies("roll.localhost", 10)
            .iter()
            .all(|b| b.starts_with("v1 from"))
    );
    let events = dev.ok(&["events", "--app", "roll", "-n", "500"]);
    assert!(events.contains("rollout.rolled_back"), "{events}");
}

#[test]
fn restart_readopts_without_duplicates_or_orphans() {
    let mut dev = Dev::start(None);
    let spec = spec_file(dev.data_dir(), "keep.toml", &whoami_spec("keep", 3, "hi"));
    dev.ok(&["app", "deploy", "-f", &spec]);
    let gone = spec_file(dev.data_dir(), "gone.toml", &whoami_spec("gone", 2, "hi"));
    dev.ok(&["app", "deploy", "-f", &gone]);
    let before: Vec<String> = instance_ids(&dev.status("keep"));

    // A crash: the platform dies, the workloads do not.
    dev.crash();
    assert_eq!(
        dev.live_pids().len(),
        5,
        "workloads outlive a crash of capstan dev"
    );
    dev.restart();
    wait_until("3 healthy after restart", Duration::from_secs(30), || {
        healthy(&dev.status("keep")) == 3
    });
    assert_eq!(
        instance_ids(&dev.status("keep")),
        before,
        "running instances are re-adopted, not replaced"
    );
    assert_eq!(dev.live_pids().len(), 5, "no duplicates after restart");

    // Delete one app, then restart gracefully: nothing of it comes back.
    dev.ok(&["app", "rm", "gone"]);
    dev.stop();
    dev.restart();
    wait_until("keep stays at 3", Duration::from_secs(30), || {
        healthy(&dev.status("keep")) == 3
    });
    // The deleted app's processes are stopped as orphans: wait for that
    // condition rather than sleeping and counting.
    wait_until(
        "exactly the desired count runs",
        Duration::from_secs(30),
        || dev.live_pids().len() == 3,
    );
    assert_eq!(dev.get("gone.localhost").unwrap().0, 404);
    assert_eq!(dev.bodies("keep.localhost", 20).len(), 3);
    dev.ok(&["app", "rm", "keep"]);
    assert!(dev.live_pids().is_empty());
}

#[test]
fn every_call_needs_a_valid_token() {
    let dev = Dev::start(None);
    let out = std::process::Command::new(BIN)
        .args(["app", "ls", "--api-key", "cap_not-a-real-key", "--data-dir"])
        .arg(dev.data_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a valid API key"), "{stderr}");
    // The admin key file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dev.data_dir().join("admin.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(dev.cli(&["app", "ls"]).status.success());
}

#[test]
fn dev_refuses_a_busy_data_dir_or_port() {
    let dev = Dev::start(None);
    let second = std::process::Command::new(BIN)
        .args(["dev", "--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dev.data_dir())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another capstan dev") && stderr.contains("stop it first"),
        "{stderr}"
    );

    let other = tempfile::tempdir().unwrap();
    let clash = std::process::Command::new(BIN)
        .args([
            "dev",
            "--http-addr",
            &format!("127.0.0.1:{}", dev.http_port),
            "--data-dir",
        ])
        .arg(other.path())
        .output()
        .unwrap();
    assert!(!clash.status.success());
    let stderr = String::from_utf8_lossy(&clash.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot listen on 127.0.0.1:{} for the edge proxy",
            dev.http_port
        )),
        "{stderr}"
    );
}
