//! Enforced limits: a process app that holds more than its `memory_mb` is
//! killed and reported failed, out of memory, while the node and its other
//! apps carry on.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn an_app_past_its_memory_limit_fails_out_of_memory_and_the_node_carries_on() {
    let dev = Dev::start_with(None, &["--no-docker"]);
    let steady = spec_file(dev.data_dir(), "s.toml", &whoami_spec("steady", 1, "v1"));
    dev.ok(&["app", "deploy", "-f", &steady, "--timeout", "60s"]);
    // Serves its port, then allocates 400 MiB, 10 MiB at a time.
    let hog = r#"name = "hog"
replicas = 1

[run]
command = ["python3", "-c", "import socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', int(__import__('os').environ['PORT'])))\ns.listen()\ntime.sleep(1)\nheld = [bytearray(10 * 1024 * 1024) for _ in range(40)]\ntime.sleep(60)\n"]

[resources]
memory_mb = 48

[health]
tcp = true
interval = "200ms"
timeout = "100ms"

[update]
progress_deadline = "30s"
"#;
    let file = spec_file(dev.data_dir(), "h.toml", hog);
    let _ = dev.cli(&["app", "deploy", "-f", &file, "--timeout", "5s"]);
    let mut failure = String::new();
    wait_until(
        "the hog is reported failed, out of memory",
        Duration::from_secs(60),
        || {
            // One JSON object per line.
            let text = dev.ok(&["events", "-o", "json", "--app", "hog", "-n", "100"]);
            let events: Vec<Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            match events.iter().find(|e| e["kind"] == "instance.failed") {
                Some(event) => {
                    failure = event["message"].as_str().unwrap_or_default().to_string();
                    true
                }
                None => false,
            }
        },
    );
    // Which of the two enforces it depends on the host (cgroup v2
    // delegated to the agent, or not): both say so in these words.
    let by_watchdog = failure.starts_with("out of memory: it held ")
        && failure.ends_with("over its memory_mb (48 MiB), and was killed");
    let by_kernel = failure
        .starts_with("out of memory: it reached its memory_mb (48 MiB) and the kernel killed it");
    assert!(by_watchdog || by_kernel, "{failure}");
    // The node and the other app are unaffected.
    assert_eq!(dev.get("steady.localhost").map(|(s, _)| s), Some(200));
    let nodes = dev.ok(&["node", "ls"]);
    assert!(nodes.contains("ready"), "{nodes}");
}
