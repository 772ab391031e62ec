//! The admission policy: what weakens isolation (a fixed host port below
//! 1024, a privileged port of the node) only an admin may deploy; an
//! deployer is refused with PERMISSION_DENIED naming the field, over gRPC
//! (the CLI) and over REST alike, and nothing is created.

mod common;

use common::*;

#[test]
fn only_an_admin_may_deploy_a_privileged_host_port() {
    let dev = Dev::start_with(None, &["--no-docker"]);
    let deployer = dev
        .ok(&["key", "create", "--name", "deployer", "--role", "deployer"])
        .trim()
        .to_string();
    let privileged = whoami_spec("low", 1, "v1").replace(
        "[health]",
        "[[ports]]\nname = \"http\"\nhost_port = 80\n\n[health]",
    );
    let file = spec_file(dev.data_dir(), "low.toml", &privileged);

    let out = dev.cli(&[
        "app",
        "deploy",
        "-f",
        &file,
        "--detach",
        "--api-key",
        &deployer,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied")
            && err.contains("ports[0].host_port")
            && err.contains("only an admin"),
        "{err}"
    );
    let apps = dev.ok(&["app", "ls", "-o", "json"]);
    assert!(!apps.contains("\"low\""), "nothing was created: {apps}");

    // An unprivileged port is the deployer's to deploy.
    let fine = privileged.replace("host_port = 80", "host_port = 18099");
    let fine = spec_file(
        dev.data_dir(),
        "fine.toml",
        &fine.replace("\"low\"", "\"fine\""),
    );
    dev.ok(&[
        "app",
        "deploy",
        "-f",
        &fine,
        "--detach",
        "--api-key",
        &deployer,
    ]);

    // The admin may.
    dev.ok(&["app", "deploy", "-f", &file, "--detach"]);
    let apps = dev.ok(&["app", "ls", "-o", "json"]);
    assert!(apps.contains("\"low\""), "{apps}");
}
