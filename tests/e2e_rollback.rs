//! `capstan app rollback`: back to the template before, or to a named
//! earlier one, as a rolling update under load; scale stays; bad and
//! unknown templates are named.

mod common;

use common::*;

#[test]
fn rollback_returns_an_earlier_template_and_keeps_the_scale() {
    let dev = Dev::start_with(None, &["--no-docker"]);
    let deploy = |greeting: &str| {
        let spec = spec_file(
            dev.data_dir(),
            &format!("{greeting}.toml"),
            &whoami_spec("web", 2, greeting),
        );
        dev.ok(&["app", "deploy", "-f", &spec, "--timeout", "60s"]);
        dev.json(&["app", "status", "web", "-o", "json"])["spec_hash"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let greets = |want: &str| {
        dev.get("web.localhost")
            .is_some_and(|(code, body)| code == 200 && body.contains(want))
    };
    let out = dev.cli(&["app", "rollback", "nosuch"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("app `nosuch`"));
    let v1 = deploy("v1");
    let out = dev.cli(&["app", "rollback", "web"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no earlier template"),
        "{out:?}"
    );
    let v2 = deploy("v2");
    let v3 = deploy("v3");
    assert!(greets("v3"));
    dev.ok(&["app", "scale", "web", "3"]);
    let status = dev.json(&["app", "status", "web", "-o", "json"]);
    assert_eq!(status["previous_templates"], serde_json::json!([v2, v1]));

    // Back one, under load: v2 serves, scale stays at 3, nothing failed.
    // The load runs from before the rollback to after it, however quickly
    // the rollout goes.
    let load = Load::start(dev.http_port, "web.localhost");
    load.served(10);
    let out = dev.ok(&["app", "rollback", "web", "--timeout", "60s"]);
    load.served(11);
    let (ok, failures) = load.finish();
    assert!(
        out.contains(&format!("rolling back to template {v2}")),
        "{out}"
    );
    assert!(
        ok > 20 && failures.is_empty(),
        "{ok} ok, failed: {failures:?}"
    );
    assert!(greets("v2"));
    let status = dev.json(&["app", "status", "web", "-o", "json"]);
    assert_eq!(status["spec_hash"], v2.as_str());
    assert_eq!(status["replicas"], 3, "a rollback keeps the scale");
    assert_eq!(status["previous_templates"], serde_json::json!([v3, v1]));

    // To a named one; then bad and unknown names.
    dev.ok(&["app", "rollback", "web", "--to", &v1, "--timeout", "60s"]);
    assert!(greets("v1"));
    let out = dev.cli(&["app", "rollback", "web", "--to", "../etc"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("to_template"),
        "{out:?}"
    );
    let out = dev.cli(&["app", "rollback", "web", "--to", "0123456789abcdef"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("template 0123456789abcdef of app `web`") && err.contains(&v2),
        "{err}"
    );
    let history = dev.ok(&["app", "history", "web"]);
    assert!(
        history.contains(&format!("rolled back by hand to template {v1}")),
        "{history}"
    );
}
