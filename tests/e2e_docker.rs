//! The main job, end to end, with an image app on the real Docker engine
//! (image built here from a static busybox).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::*;

fn busybox_spec(replicas: u32, greeting: &str) -> String {
    let image = capstan_testkit::docker::busybox_image();
    format!(
        r#"name = "box"
replicas = {replicas}

[run]
image = "{image}"
args = ["httpd", "-f", "-p", "8080", "-h", "/www"]

[resources]
cpu_millis = 100
memory_mb = 32

[[ports]]
name = "http"
container_port = 8080

[env]
GREETING = "{greeting}"

[health]
http_path = "/cgi-bin/whoami"
interval = "500ms"
timeout = "400ms"

[route]
hosts = ["box.localhost"]
"#
    )
}

fn whoami(dev: &Dev, n: usize) -> BTreeSet<String> {
    (0..n)
        .filter_map(|_| http_get(dev.http_port, "box.localhost", "/cgi-bin/whoami"))
        .filter(|(code, _)| *code == 200)
        .map(|(_, body)| body.trim().to_string())
        .collect()
}

fn containers(dev: &Dev) -> Vec<String> {
    let filter = format!("label=io.capstan.node={}", dev.node_id());
    let out = Command::new("docker")
        .args(["ps", "-q", "--filter", &filter])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[test]
fn docker_app_deploy_scale_kill_update_delete() {
    let dev = Dev::start_with(None, &["--sample-every", "1s"]);
    let spec = spec_file(dev.data_dir(), "box.toml", &busybox_spec(3, "hello"));
    let out = dev.ok(&["app", "deploy", "-f", &spec]);
    assert!(out.contains("3 healthy instances"), "{out}");
    let status = dev.status("box");
    let expected: BTreeSet<String> = instance_ids(&status)
        .iter()
        .map(|id| format!("hello from {id}"))
        .collect();
    assert_eq!(
        whoami(&dev, 30),
        expected,
        "every container answers through the proxy"
    );
    assert_eq!(
        dev.get("box.localhost").unwrap(),
        (200, "hello from busybox\n".to_string())
    );
    assert_eq!(containers(&dev).len(), 3);

    // Docker's stats reach the metrics service, network bytes included.
    wait_until(
        "network bytes of the containers are charted",
        Duration::from_secs(30),
        || {
            let _ = dev.get("box.localhost");
            let charts: serde_json::Value = serde_json::from_str(
                &dev.ok(&["app", "metrics", "box", "--since", "1m", "-o", "json"]),
            )
            .unwrap();
            ["net in KiB/s", "net out KiB/s", "memory MiB"]
                .iter()
                .all(|name| {
                    charts.as_array().unwrap().iter().any(|c| {
                        c["chart"] == *name && c["points"].as_array().is_some_and(|p| !p.is_empty())
                    })
                })
        },
    );

    // Containers run locked down.
    let inspect = Command::new("docker")
        .args(["inspect", "--format", "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.Config.User}} {{.HostConfig.Memory}}"])
        .arg(&containers(&dev)[0])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "true [ALL] 65534:65534 33554432"
    );

    dev.ok(&["app", "scale", "box", "4"]);
    wait_until("4 healthy containers", Duration::from_secs(60), || {
        healthy(&dev.status("box")) == 4
    });
    assert_eq!(containers(&dev).len(), 4);

    let load = Load::start(dev.http_port, "box.localhost");
    let victim = containers(&dev)[0].clone();
    assert!(
        Command::new("docker")
            .args(["kill", &victim])
            .output()
            .unwrap()
            .status
            .success()
    );
    wait_until(
        "the killed container is replaced",
        Duration::from_secs(60),
        || healthy(&dev.status("box")) == 4 && !containers(&dev).contains(&victim),
    );
    let (ok, failures) = load.finish();
    assert!(
        ok > 20 && failures.is_empty(),
        "traffic continued through the kill: {ok} ok, {failures:?}"
    );

    let load = Load::start(dev.http_port, "box.localhost");
    load.served(10);
    let updated = spec_file(dev.data_dir(), "box2.toml", &busybox_spec(4, "bonjour"));
    dev.ok(&["app", "deploy", "-f", &updated]);
    load.served(11);
    let (ok, failures) = load.finish();
    assert!(ok > 20, "traffic flowed during the update: {ok}");
    assert!(
        failures.is_empty(),
        "requests failed during the rolling update: {failures:?}"
    );
    assert!(
        whoami(&dev, 20)
            .iter()
            .all(|b| b.starts_with("bonjour from"))
    );

    dev.ok(&["app", "rm", "box"]);
    assert_eq!(dev.get("box.localhost").unwrap().0, 404);
    assert!(containers(&dev).is_empty(), "containers left after delete");
}
