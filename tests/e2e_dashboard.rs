//! The web dashboard in headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven by Selenium from PyPI): sign in with a key
//! (a wrong one refused), see the empty state, deploy the example app from
//! the UI (a bad field shown at the field first), watch it become healthy,
//! scale it, read its logs, revoke a key, see the audit page, and read it
//! on a phone-sized screen. Screenshots go to `target/browser-artifacts/`.
//! Also, without a browser: the session cookie's flags, CSRF on every
//! change made with a cookie, and no CORS.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

/// The Python with Selenium: `CAPSTAN_BROWSER_PYTHON`, else the venv
/// `.ci/run` makes.
fn browser_python() -> PathBuf {
    let python = std::env::var_os("CAPSTAN_BROWSER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/capstan-browser/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import selenium"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} has no Selenium: run `python3 -m venv /opt/capstan-browser && /opt/capstan-browser/bin/pip install selenium==4.51.0` (or set CAPSTAN_BROWSER_PYTHON)",
        python.display()
    );
    capstan_testkit::require_tool("chromium", "apt-get install -y chromium chromium-driver");
    capstan_testkit::require_tool("chromedriver", "apt-get install -y chromium-driver");
    python
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

#[test]
fn the_dashboard_deploys_scales_reads_logs_and_revokes_a_key() {
    let python = browser_python();
    let dev = Dev::start_with(None, &["--no-docker"]);
    dev.ok(&["key", "create", "--name", "temp-ci", "--role", "viewer"]);
    let admin = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
    let gateway = format!("http://{}", dev.endpoint("gateway"));
    let shots = artifacts();
    let out = Command::new(python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.py"))
        .env("GATEWAY", &gateway)
        .env("ADMIN_KEY", admin.trim())
        .env(
            "SPEC",
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/hello.toml"),
        )
        .env("REVOKE", "temp-ci")
        .env("SHOTS", &shots)
        .output()
        .expect("run the browser test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
    // What the browser did, the platform did.
    let status = dev.status("hello");
    assert_eq!(status["replicas"], 2, "{status}");
    let keys = dev.ok(&["key", "ls", "-o", "json"]);
    assert!(!keys.contains("temp-ci"), "{keys}");
    for shot in [
        "02-empty.png",
        "04-app-healthy.png",
        "05-app-scaled-logs.png",
        "10-phone.png",
    ] {
        assert!(shots.join(shot).exists(), "no {shot}");
    }
}

/// One HTTP/1.0 exchange with the gateway: (status, head, body).
fn http(addr: &str, request: &str) -> (u16, String, String) {
    http_exchange(addr, request, std::time::Duration::from_secs(30))
}

#[test]
fn sessions_need_the_csrf_token_for_changes_and_there_is_no_cors() {
    let dev = Dev::start_with(None, &["--no-docker"]);
    let addr = dev.endpoint("gateway");
    let admin = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
    let body = format!("{{\"api_key\": \"{}\"}}", admin.trim());
    let (status, head, reply) = http(&addr, &gateway_request("POST", "/ui/session", &[], &body));
    assert_eq!(status, 200, "{head}\n{reply}");
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie_line.contains(flag), "{cookie_line}");
    }
    assert!(
        !cookie_line.contains("Secure"),
        "not over TLS, so not Secure: {cookie_line}"
    );
    let session = cookie_line
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let who: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(who["role"], "admin", "{who}");
    let csrf = who["csrf"].as_str().unwrap().to_string();
    let cookie = format!("Cookie: {session}");

    // A read with the cookie alone works.
    let (status, _, apps) = http(
        &addr,
        &gateway_request("GET", "/v1/apps", std::slice::from_ref(&cookie), ""),
    );
    assert_eq!(status, 200, "{apps}");
    // A change with the cookie and no (or a wrong) CSRF token is refused,
    // and nothing is created.
    let spec = r#"{"name": "csrf", "run": {"command": ["sleep", "60"]}}"#;
    for extra in [vec![], vec![format!("X-CSRF-Token: {}", "0".repeat(64))]] {
        let mut headers = vec![cookie.clone(), "Origin: https://evil.example".to_string()];
        headers.extend(extra);
        let (status, head, reply) =
            http(&addr, &gateway_request("POST", "/v1/apps", &headers, spec));
        assert_eq!(status, 403, "{reply}");
        assert!(reply.contains("X-CSRF-Token"), "{reply}");
        assert!(
            !head.to_ascii_lowercase().contains("access-control-allow"),
            "no CORS: {head}"
        );
    }
    let (_, _, apps) = http(
        &addr,
        &gateway_request("GET", "/v1/apps", std::slice::from_ref(&cookie), ""),
    );
    assert!(!apps.contains("\"csrf\""), "{apps}");
    // With the token it works.
    let headers = [cookie.clone(), format!("X-CSRF-Token: {csrf}")];
    let (status, _, reply) = http(&addr, &gateway_request("POST", "/v1/apps", &headers, spec));
    assert_eq!(status, 200, "{reply}");
    // A preflight gets no CORS grant either.
    let (_, head, _) = http(
        &addr,
        &gateway_request(
            "OPTIONS",
            "/v1/apps",
            &[
                "Origin: https://evil.example".into(),
                "Access-Control-Request-Method: POST".into(),
            ],
            "",
        ),
    );
    assert!(
        !head.to_ascii_lowercase().contains("access-control-allow"),
        "{head}"
    );
    // Signing out ends the session.
    let (status, _, _) = http(
        &addr,
        &gateway_request("DELETE", "/ui/session", &headers, ""),
    );
    assert_eq!(status, 204);
    let (status, _, _) = http(&addr, &gateway_request("GET", "/v1/apps", &[cookie], ""));
    assert_eq!(status, 401);
    // The pages come with a CSP that allows this origin only.
    let (status, head, page) = http(&addr, &gateway_request("GET", "/ui/", &[], ""));
    assert_eq!(status, 200);
    assert!(page.contains("/ui/app.js"), "{page}");
    assert!(head.contains("default-src 'self'"), "{head}");
}

/// Twelve sign-ins with a wrong key, each claiming another client address.
fn sign_ins(addr: &str) -> Vec<u16> {
    (0..12)
        .map(|i| {
            let forwarded = format!("X-Forwarded-For: 203.0.113.{i}");
            http(
                addr,
                &gateway_request(
                    "POST",
                    "/ui/session",
                    &[forwarded],
                    r#"{"api_key": "cap_wrong"}"#,
                ),
            )
            .0
        })
        .collect()
}

/// The gateway believes `X-Forwarded-For` and `-Proto` only from the
/// proxies it is told to trust: from anyone else, a made-up client address
/// does not get a fresh sign-in allowance, and a claimed `https` does not
/// make the cookie `Secure`.
#[test]
fn forwarded_headers_count_only_from_trusted_proxies() {
    let untrusted = Dev::start_with(None, &["--no-docker"]);
    let codes = sign_ins(&untrusted.endpoint("gateway"));
    assert!(
        codes.contains(&429),
        "one client, however it names itself, is one bucket: {codes:?}"
    );
    assert!(codes.iter().all(|c| *c == 401 || *c == 429), "{codes:?}");
    let https = ["X-Forwarded-Proto: https".to_string()];
    let sign_in = |dev: &Dev| {
        let admin = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
        let body = format!("{{\"api_key\": \"{}\"}}", admin.trim());
        let (status, head, _) = http(
            &dev.endpoint("gateway"),
            &gateway_request("POST", "/ui/session", &https, &body),
        );
        assert_eq!(status, 200, "{head}");
        head
    };
    // The bucket refills at one a second.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let head = sign_in(&untrusted);
    assert!(!head.contains("Secure"), "a claim from a stranger: {head}");
    drop(untrusted);

    let trusted = Dev::start_with(None, &["--no-docker", "--trusted-proxy", "127.0.0.1"]);
    let codes = sign_ins(&trusted.endpoint("gateway"));
    assert!(
        codes.iter().all(|c| *c == 401),
        "behind a trusted proxy each client is its own: {codes:?}"
    );
    let head = sign_in(&trusted);
    assert!(
        head.contains("; Secure"),
        "TLS at the trusted proxy: {head}"
    );
}
