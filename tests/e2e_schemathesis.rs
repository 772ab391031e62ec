//! Schemathesis (from PyPI) against the gateway's own `/openapi.json` on
//! `capstan dev`, with the admin key: it generates requests for every
//! operation from the document (and chains them by its links) and fails on
//! any 5xx or any response the document does not describe.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

const INSTALL: &str = "python3 -m venv /opt/capstan-schemathesis && /opt/capstan-schemathesis/bin/pip install schemathesis==4.32.5";

fn schemathesis() -> PathBuf {
    let binary = std::env::var_os("CAPSTAN_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/capstan-schemathesis/bin/schemathesis"));
    let ok = Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} does not run: {INSTALL} (or set CAPSTAN_SCHEMATHESIS)",
        binary.display()
    );
    binary
}

#[test]
fn schemathesis_finds_no_server_error_and_no_response_off_the_schema() {
    let binary = schemathesis();
    // Its thousand requests are not to hit the per-credential rate limit.
    let dev = Dev::start_with(None, &["--no-docker", "--api-rate", "100000"]);
    let admin = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
    let url = format!("http://{}/openapi.json", dev.endpoint("gateway"));
    let out = Command::new(binary)
        .args(["run", &url])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", admin.trim()),
        ])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args([
            "--max-examples",
            "15",
            "--request-timeout",
            "20",
            "--seed",
            "1",
        ])
        // Streams never end, and revoking the admin key would leave
        // nothing to test with (both are covered by e2e_gateway).
        .args(["--exclude-path-regex", "/stream$"])
        .args(["--exclude-operation-id", "capstan_v1_Auth_RevokeApiKey"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run schemathesis");
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains(" passed"), "{report}");
    assert!(!report.contains("failed"), "{report}");
}
