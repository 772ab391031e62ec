//! `capstan app restart`: every instance replaced by a fresh one of the
//! same spec, as a rolling update, with no request dropped; a later deploy
//! of the same file restarts nothing.

mod common;

use common::*;

#[test]
fn a_rolling_restart_replaces_every_instance_without_dropping_a_request() {
    let dev = Dev::start_with(None, &["--no-docker"]);
    let spec = spec_file(dev.data_dir(), "web.toml", &whoami_spec("web", 2, "v1"));
    dev.ok(&["app", "deploy", "-f", &spec, "--timeout", "60s"]);
    let before = dev.json(&["app", "status", "web", "-o", "json"]);
    let (old_ids, old_hash) = (instance_ids(&before), before["spec_hash"].clone());
    assert_eq!(old_ids.len(), 2);

    // Requests flow before the restart starts and after it ends, so every
    // moment of it is under load (a fast restart serves few in between).
    let load = Load::start(dev.http_port, "web.localhost");
    load.served(20);
    let out = dev.ok(&["app", "restart", "web", "--timeout", "60s"]);
    assert!(out.contains("rolling restart 1"), "{out}");
    assert!(
        out.contains("app web is running: 2 healthy instances"),
        "{out}"
    );
    load.served(20);
    let (_, failures) = load.finish();
    assert!(failures.is_empty(), "failed requests: {failures:?}");

    let after = dev.json(&["app", "status", "web", "-o", "json"]);
    let new_ids = instance_ids(&after);
    assert_eq!(new_ids.len(), 2);
    assert!(
        new_ids.iter().all(|id| !old_ids.contains(id)),
        "every instance is new: {old_ids:?} -> {new_ids:?}"
    );
    assert_ne!(after["spec_hash"], old_hash, "a restart is a new template");

    // The same file again: the app keeps its restart, nothing is replaced.
    dev.ok(&["app", "deploy", "-f", &spec, "--timeout", "60s"]);
    let again = dev.json(&["app", "status", "web", "-o", "json"]);
    assert_eq!(again["spec_hash"], after["spec_hash"]);
    assert_eq!(instance_ids(&again), new_ids);

    let out = dev.cli(&["app", "restart", "nosuch"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("app `nosuch`"));
}
