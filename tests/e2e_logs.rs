//! App logs through the CLI on `capstan dev`: the last lines of an app,
//! `--since`, `--instance`, `-o json` and `-f`; errors that name what is
//! wrong; and a canary secret in an app's env that never reaches the
//! platform's own log, even at debug level.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CANARY: &str = "canary-5f1c2e9b7d3a4c6e";

/// Serves its port and prints a numbered line to stdout and one to stderr
/// every 100 ms; says whether it got the canary, without printing it.
fn chatty_spec() -> String {
    capstan_testkit::require_tool("python3", "apt-get install -y python3");
    let script = [
        "import os, socket, sys, time",
        "s = socket.socket()",
        "s.bind(('127.0.0.1', int(os.environ['PORT'])))",
        "s.listen()",
        "print('canary present:', os.environ.get('API_TOKEN') == os.environ.get('EXPECTED'), flush=True)",
        "i = 0",
        "while True:",
        "    print('out', i, flush=True)",
        "    print('err', i, file=sys.stderr, flush=True)",
        "    i += 1",
        "    time.sleep(0.1)",
    ]
    .join("\n");
    format!(
        r#"name = "chatty"
replicas = 1

[run]
command = ["python3", "-c", {script:?}]

[env]
API_TOKEN = "{CANARY}"
EXPECTED = "{CANARY}"

[health]
tcp = true
interval = "200ms"
timeout = "100ms"
"#
    )
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.is_empty()).collect()
}

#[test]
fn app_logs_show_tail_since_instance_json_and_follow_and_no_secret_reaches_platform_logs() {
    let dev = Dev::start_with_env(None, &["--no-docker"], &[("RUST_LOG", "debug")]);
    let spec = spec_file(dev.data_dir(), "chatty.toml", &chatty_spec());
    dev.ok(&["app", "deploy", "-f", &spec, "--timeout", "60s"]);
    let status = dev.json(&["app", "status", "chatty", "-o", "json"]);
    let instance = instance_ids(&status).pop().expect("one instance");
    wait_until("20 lines printed", Duration::from_secs(20), || {
        lines(&dev.ok(&["app", "logs", "chatty", "--tail", "100"])).len() >= 20
    });

    // The last lines, oldest first: time, instance, text; both streams.
    let tail = dev.ok(&["app", "logs", "chatty", "--tail", "6"]);
    let tail = lines(&tail);
    assert_eq!(tail.len(), 6, "{tail:?}");
    assert!(
        tail.iter().all(|l| l.contains(&format!("  {instance}  "))),
        "{tail:?}"
    );
    assert!(
        tail.iter()
            .any(|l| l.ends_with(" out") || l.contains("  out ")),
        "{tail:?}"
    );
    assert!(tail.iter().any(|l| l.contains("  err ")), "{tail:?}");

    // JSON: times in order, the app got its secret.
    let all = dev.ok(&["app", "logs", "chatty", "--tail", "10000", "-o", "json"]);
    let all: Vec<Value> = lines(&all)
        .into_iter()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    assert_eq!(all[0]["text"], "canary present: True", "{:?}", all[0]);
    assert!(
        all.iter()
            .all(|l| l["instance"] == instance.as_str() && l["stream"] == "output")
    );
    let times: Vec<i64> = all.iter().map(|l| l["at_ms"].as_i64().unwrap()).collect();
    assert!(times.iter().all(|t| *t > 0) && times.windows(2).all(|w| w[0] <= w[1]));

    // --since: only recent lines.
    let cutoff = capstan_server::now_ms() - 1_000;
    let recent = dev.ok(&[
        "app", "logs", "chatty", "--since", "1s", "--tail", "10000", "-o", "json",
    ]);
    let recent: Vec<i64> = lines(&recent)
        .into_iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["at_ms"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert!(
        !recent.is_empty() && recent.len() < all.len(),
        "{} of {}",
        recent.len(),
        all.len()
    );
    assert!(
        recent.iter().all(|t| *t >= cutoff - 500),
        "{recent:?} vs {cutoff}"
    );

    // --instance: that one; one that is not the app's is named.
    let one = dev.ok(&[
        "app",
        "logs",
        "chatty",
        "--instance",
        &instance,
        "--tail",
        "3",
    ]);
    assert_eq!(lines(&one).len(), 3);
    let out = dev.cli(&["app", "logs", "chatty", "--instance", "chatty-nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("instance `chatty-nope` of app `chatty`"),
        "{err}"
    );
    let out = dev.cli(&["app", "logs", "nosuch"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("app `nosuch`"));
    let out = dev.cli(&["app", "logs", "chatty", "--since", "90s", "--tail", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tail"));

    // -f: new lines keep coming, none twice.
    let mut follow = Command::new(BIN)
        .args([
            "app",
            "logs",
            "chatty",
            "-f",
            "--tail",
            "1",
            "-o",
            "json",
            "--data-dir",
        ])
        .arg(dev.data_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("capstan app logs -f");
    let mut reader = BufReader::new(follow.stdout.take().unwrap());
    let (started, mut seen) = (Instant::now(), Vec::new());
    let mut line = String::new();
    while seen.len() < 12 && started.elapsed() < Duration::from_secs(20) {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let value: Value = serde_json::from_str(line.trim()).expect("JSON");
        seen.push(value["text"].as_str().unwrap_or_default().to_string());
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen.len() >= 12, "followed lines: {seen:?}");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a line came twice: {seen:?}");
    let numbers: Vec<u32> = seen
        .iter()
        .filter_map(|t| t.strip_prefix("out ").and_then(|n| n.parse().ok()))
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");

    // The platform's own log (debug level, every service) never shows it.
    let platform_log = std::fs::read_to_string(dev.data_dir().join("dev.log")).unwrap();
    assert!(platform_log.len() > 10_000, "a debug log has things in it");
    assert!(
        !platform_log.contains(CANARY),
        "the canary reached the platform log"
    );
    for listing in [
        dev.ok(&["events", "-o", "json", "-n", "500"]),
        dev.ok(&["app", "history", "chatty", "-o", "json"]),
    ] {
        assert!(!listing.contains(CANARY));
    }
}
