//! The audit log on `capstan dev`: who changed what, when and how it
//! ended, refused attempts included; env values never in it; and
//! `capstan audit verify` finds a record changed or removed in the store.

mod common;

use common::*;
use serde_json::Value;

fn records(dev: &Dev) -> Vec<Value> {
    serde_json::from_str::<Value>(&dev.ok(&["audit", "ls", "-n", "1000", "-o", "json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn find<'a>(records: &'a [Value], method: &str, actor: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["method"] == method && r["actor"] == actor)
        .unwrap_or_else(|| panic!("no {method} by {actor} in {records:#?}"))
}

/// Runs SQL on the stopped platform's store (python3's sqlite3).
fn sql(dev: &Dev, statement: &str, args: &[&str]) {
    let script = "import sqlite3, sys\ndb = sqlite3.connect(sys.argv[1])\ndb.execute(sys.argv[2], sys.argv[3:])\ndb.commit()\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dev.data_dir().join("state.db"))
        .arg(statement)
        .args(args)
        .output()
        .expect("python3 (apt-get install -y python3)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_change_and_refusal_is_recorded_and_tampering_is_found() {
    let mut dev = Dev::start_with(None, &["--no-docker"]);
    let deployer = dev
        .ok(&["key", "create", "--name", "deployer", "--role", "deployer"])
        .trim()
        .to_string();
    let viewer = dev
        .ok(&["key", "create", "--name", "watcher", "--role", "viewer"])
        .trim()
        .to_string();
    let v1 = spec_file(
        dev.data_dir(),
        "v1.toml",
        &whoami_spec("web", 1, "secret-v1"),
    );
    dev.ok(&[
        "app",
        "deploy",
        "-f",
        &v1,
        "--timeout",
        "60s",
        "--api-key",
        &deployer,
    ]);
    dev.ok(&["app", "scale", "web", "2", "--api-key", &deployer]);
    let out = dev.cli(&["app", "scale", "web", "5", "--api-key", &viewer]);
    assert!(!out.status.success());
    let v2 = spec_file(
        dev.data_dir(),
        "v2.toml",
        &whoami_spec("web", 2, "secret-v2"),
    );
    dev.ok(&[
        "app",
        "deploy",
        "-f",
        &v2,
        "--detach",
        "--api-key",
        &deployer,
    ]);
    let out = dev.cli(&["app", "scale", "nosuch", "1", "--api-key", &deployer]);
    assert!(!out.status.success());

    let all = records(&dev);
    let key = find(&all, "Auth/CreateApiKey", "admin");
    assert_eq!(
        (key["target"].as_str(), key["result"].as_str()),
        (Some("deployer"), Some("ok"))
    );
    let created = find(&all, "Orchestrator/ApplyApp", "deployer");
    assert_eq!(created["role"], "deployer");
    assert_eq!(created["project"], "default", "{created}");
    assert!(
        created["summary"]
            .as_str()
            .unwrap()
            .starts_with("created: 1 replicas"),
        "{created}"
    );
    let scaled = find(&all, "Orchestrator/ScaleApp", "deployer");
    assert_eq!(
        (scaled["target"].as_str(), scaled["summary"].as_str()),
        (Some("web"), Some("replicas 2"))
    );
    let refused = find(&all, "Orchestrator/ScaleApp", "watcher");
    assert_eq!(refused["role"], "viewer");
    assert!(
        refused["result"].as_str().unwrap().starts_with("denied: "),
        "{refused}"
    );
    let updated = all
        .iter()
        .filter(|r| r["method"] == "Orchestrator/ApplyApp")
        .nth(1)
        .expect("the second deploy");
    assert!(
        updated["summary"]
            .as_str()
            .unwrap()
            .starts_with("env GREETING ("),
        "{updated}"
    );
    let failed = all
        .iter()
        .find(|r| r["target"] == "nosuch")
        .expect("the failed scale");
    assert!(
        failed["result"]
            .as_str()
            .unwrap()
            .starts_with("failed (NotFound)"),
        "{failed}"
    );
    let text = serde_json::to_string(&all).unwrap();
    assert!(
        !text.contains("secret-v1") && !text.contains("secret-v2"),
        "env values leaked"
    );
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
    let listing = dev.ok(&["audit", "ls"]);
    assert!(
        listing.contains("watcher (viewer)") && listing.contains("denied"),
        "{listing}"
    );
    // By project: the deploys were `default`'s; another project has none.
    let by_project = |project: &str| -> Vec<Value> {
        serde_json::from_str::<Value>(&dev.ok(&[
            "audit",
            "ls",
            "-n",
            "1000",
            "--project",
            project,
            "-o",
            "json",
        ]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
    };
    let defaults = by_project("default");
    assert!(
        defaults
            .iter()
            .any(|r| r["method"] == "Orchestrator/ApplyApp")
    );
    assert!(defaults.iter().all(|r| r["project"] == "default"));
    dev.ok(&["project", "create", "quiet"]);
    assert!(
        by_project("quiet")
            .iter()
            .all(|r| r["method"] == "Auth/CreateProject")
    );
    let out = dev.cli(&["audit", "ls", "--project", "../etc"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("project"),
        "a bad project name is refused, naming the field"
    );
    let out = dev.cli(&["audit", "ls", "--api-key", &deployer]);
    assert!(!out.status.success(), "only admins read the audit log");
    // That refusal (an admin-only method) is recorded too.
    let now = records(&dev);
    let peek = find(&now, "Auth/ListAudit", "deployer");
    assert!(
        peek["result"].as_str().unwrap().starts_with("denied: "),
        "{peek}"
    );
    let verdict = dev.ok(&["audit", "verify"]);
    assert!(
        verdict.contains(&format!("intact: {} records", now.len())),
        "{verdict}"
    );

    // Change record 2 in the store: found.
    dev.stop();
    let key2 = format!("{:020}", 2);
    sql(
        &dev,
        "UPDATE rows SET value = CAST(replace(CAST(value AS TEXT), 'admin', 'mallory') AS BLOB) WHERE tbl = 'audit' AND key = ?",
        &[&key2],
    );
    dev.restart();
    let out = dev.cli(&["audit", "verify"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("record 2 was changed"), "{err}");

    // Remove record 3 instead (record 2 back as it was): found too.
    dev.stop();
    sql(
        &dev,
        "UPDATE rows SET value = CAST(replace(CAST(value AS TEXT), 'mallory', 'admin') AS BLOB) WHERE tbl = 'audit' AND key = ?",
        &[&key2],
    );
    sql(
        &dev,
        "DELETE FROM rows WHERE tbl = 'audit' AND key = ?",
        &[&format!("{:020}", 3)],
    );
    dev.restart();
    let out = dev.cli(&["audit", "verify"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("record 3 is missing"),
        "{err}"
    );
}
