//! The decision journal through the CLI: every placement, node drain and
//! rollback of an app is an entry with its inputs, the rule, the result and
//! a reason a person reads; `capstan app history` shows them newest first,
//! as text and as JSON. (Replacements of instances lost with their node:
//! tests/e2e_multinode.rs.)

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn history(dev: &Dev, app: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(&dev.ok(&["app", "history", app, "-o", "json"]))
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

#[test]
fn placements_drains_and_rollbacks_are_journaled_with_their_reasons() {
    let dev = Dev::start_with(None, &["--agents", "2", "--no-docker"]);
    assert!(
        dev.ok(&["app", "history", "hist"])
            .contains("no decisions recorded"),
        "an app with no history says so"
    );
    let spec = spec_file(dev.data_dir(), "h.toml", &whoami_spec("hist", 2, "v1"));
    dev.ok(&["app", "deploy", "-f", &spec, "--timeout", "60s"]);

    // The placement: what was asked, the rule, where the instances went.
    let entries = history(&dev, "hist");
    let placement = entries
        .iter()
        .find(|e| e["kind"] == "placement")
        .unwrap_or_else(|| panic!("no placement: {entries:#?}"));
    assert_eq!(placement["inputs"]["requested"], "2");
    assert!(placement["rule"].as_str().unwrap().starts_with("strategy "));
    let reason = placement["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("placed 2 of 2 instances on "),
        "{reason}"
    );

    // A node drain moves its instance, and the journal says why.
    let status = dev.status("hist");
    let node = status["instances"][0]["node"].as_str().unwrap().to_string();
    dev.ok(&["node", "drain", &node, "--timeout", "60s"]);
    let entries = history(&dev, "hist");
    let drain = entries
        .iter()
        .find(|e| e["kind"] == "drain")
        .unwrap_or_else(|| panic!("no drain: {entries:#?}"));
    assert_eq!(drain["inputs"]["node"], node.as_str());
    assert_eq!(
        drain["reason"],
        format!(
            "moved {} off {node}: the node is draining",
            drain["inputs"]["instance"].as_str().unwrap()
        )
    );
    dev.ok(&["node", "drain", &node, "--cancel"]);

    // A version that cannot start rolls back, and the journal says why.
    let broken = whoami_spec("hist", 2, "v2")
        .lines()
        .map(|line| {
            if line.starts_with("command = ") {
                r#"command = ["python3", "-c", "raise SystemExit(3)"]"#.to_string()
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let broken = spec_file(dev.data_dir(), "broken.toml", &broken);
    let _ = dev.cli(&["app", "deploy", "-f", &broken, "--timeout", "60s"]);
    wait_until("the rollback is journaled", Duration::from_secs(60), || {
        history(&dev, "hist")
            .iter()
            .any(|e| e["kind"] == "rollback")
    });
    let entries = history(&dev, "hist");
    let rollback = entries.iter().find(|e| e["kind"] == "rollback").unwrap();
    assert!(
        rollback["reason"]
            .as_str()
            .unwrap()
            .contains("rolled back to"),
        "{rollback:#}"
    );
    assert!(!rollback["rule"].as_str().unwrap().is_empty());

    // Newest first, and the text form is one readable line per entry.
    let times: Vec<i64> = entries
        .iter()
        .map(|e| e["at_ms"].as_i64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    let text = dev.ok(&["app", "history", "hist", "-n", "100"]);
    assert!(
        text.lines()
            .any(|l| l.contains("rollback") && l.contains("rolled back to")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("drain") && l.contains("the node is draining"))
    );
    let bad = dev.cli(&["app", "history", "Not_An_App"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("app"));
}
