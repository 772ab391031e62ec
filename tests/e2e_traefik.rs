//! Capstan fronted by the real Traefik 3: Traefik's HTTP provider reads
//! router-config's document (behind its bearer token), accepts it with no
//! routes at all, routes a deployed app, and drops the route when the app
//! has nothing healthy.

mod common;

use std::time::Duration;

use capstan_testkit::traefik::Traefik;
use common::*;

#[test]
fn real_traefik_accepts_every_document_and_routes_the_app() {
    let dev = Dev::start(None);
    let endpoints = dev.endpoints();
    let provider = endpoints["traefik_provider"].as_str().unwrap();
    let token = stored_secret(dev.data_dir(), "router-config/provider-token");
    let traefik = Traefik::start(&format!("http://{provider}/traefik"), &token);

    // No app yet: Traefik must accept the empty document, not retry it.
    let first = traefik.wait_for_configurations(1, Duration::from_secs(20));
    assert_eq!(traefik.provider_errors(), Vec::<String>::new());
    assert!(
        first[0]["http"]["routers"]
            .as_object()
            .is_none_or(|r| r.is_empty()),
        "{first:?}"
    );

    let spec = spec_file(
        dev.data_dir(),
        "t.toml",
        &whoami_spec("tr", 2, "via-traefik"),
    );
    dev.ok(&["app", "deploy", "-f", &spec]);
    wait_until("Traefik routes the app", Duration::from_secs(30), || {
        http_get(traefik.port(), "tr.localhost", "/")
            .is_some_and(|(code, body)| code == 200 && body.contains("via-traefik"))
    });

    // Nothing healthy: the route leaves Traefik's table again (404), and
    // Traefik still accepts the document.
    dev.ok(&["app", "scale", "tr", "0"]);
    wait_until("Traefik drops the route", Duration::from_secs(30), || {
        http_get(traefik.port(), "tr.localhost", "/").is_some_and(|(code, _)| code == 404)
    });
    assert_eq!(traefik.provider_errors(), Vec::<String>::new());
}

/// Traefik in front, a 3-replica app under a closed-loop client, a rolling
/// update: no request fails. Router-config holds each old instance until
/// Traefik's API shows that Traefik no longer routes to it, so Capstan never
/// stops a server Traefik still sends requests to.
#[test]
fn a_rolling_update_through_real_traefik_fails_no_request() {
    let api_port = capstan_testkit::free_port();
    let traefik_api = format!("http://127.0.0.1:{api_port}");
    let dev = Dev::start_with(None, &["--traefik-api", &traefik_api]);
    let endpoints = dev.endpoints();
    let provider = endpoints["traefik_provider"].as_str().unwrap();
    let token = stored_secret(dev.data_dir(), "router-config/provider-token");
    let traefik = Traefik::start_with_api(&format!("http://{provider}/traefik"), &token, api_port);

    let spec = spec_file(dev.data_dir(), "r.toml", &whoami_spec("roll", 3, "v1"));
    dev.ok(&["app", "deploy", "-f", &spec]);
    wait_until("Traefik routes all three", Duration::from_secs(60), || {
        (0..30)
            .filter_map(|_| http_get(traefik.port(), "roll.localhost", "/"))
            .filter(|(code, body)| *code == 200 && body.starts_with("v1"))
            .map(|(_, body)| body)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            == 3
    });

    let load = Load::start(traefik.port(), "roll.localhost");
    let spec = spec_file(dev.data_dir(), "r.toml", &whoami_spec("roll", 3, "v2"));
    dev.ok(&["app", "deploy", "-f", &spec]);
    wait_until("Traefik routes only v2", Duration::from_secs(30), || {
        (0..20).all(|_| {
            http_get(traefik.port(), "roll.localhost", "/")
                .is_some_and(|(code, body)| code == 200 && body.starts_with("v2"))
        })
    });
    let (ok, failures) = load.finish();
    assert!(ok > 200, "the load ran: {ok} requests");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed through Traefik during the rolling update: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Router-config waited for Traefik on every removal, and Traefik
    // confirmed each time (no routes.unconfirmed event).
    let log = std::fs::read_to_string(dev.data_dir().join("dev.log")).unwrap();
    let confirmations = traefik_confirmations(&log);
    assert!(
        confirmations.len() >= 3,
        "router-config waited for Traefik at each of the three removals: {confirmations:?}"
    );
    let events = dev.ok(&["events", "-n", "500"]);
    assert!(!events.contains("routes.unconfirmed"), "{events}");
    eprintln!(
        "rolling update through Traefik: {ok} requests, 0 failed; Traefik confirmed tables in {confirmations:?} ms"
    );
}

/// A Traefik that never confirms (its API does not answer) delays a drain
/// by the confirmation timeout, not forever, and the drain is recorded as
/// unconfirmed.
#[test]
fn a_traefik_that_never_confirms_delays_the_drain_by_the_timeout_only() {
    let silent = format!("http://127.0.0.1:{}", capstan_testkit::free_port());
    let dev = Dev::start_with(
        None,
        &["--traefik-api", &silent, "--traefik-confirm-timeout", "2s"],
    );
    let spec = spec_file(dev.data_dir(), "u.toml", &whoami_spec("unconf", 1, "v1"));
    dev.ok(&["app", "deploy", "-f", &spec]);
    wait_until("the app is healthy", Duration::from_secs(60), || {
        healthy(&dev.status("unconf")) == 1
    });
    dev.ok(&["app", "scale", "unconf", "0"]);
    wait_until("the instance is gone", Duration::from_secs(30), || {
        instance_ids(&dev.status("unconf")).is_empty()
    });
    let events = dev.ok(&["events", "-n", "500"]);
    assert!(
        events.contains("routes.unconfirmed") && events.contains(&silent),
        "{events}"
    );
}

/// `curl` through Traefik: (exit code, `-i` output).
fn curl(args: &[&str]) -> (i32, String) {
    capstan_testkit::require_tool("curl", "apt-get install -y curl");
    let out = std::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The compose file's Traefik routes (`infra/traefik/dynamic/gateway.yml`,
/// read by the real Traefik) put the gateway behind TLS: a self-signed
/// certificate by default, plain HTTP redirected; the gateway believes
/// Traefik's `X-Forwarded-Proto` (the session cookie is `Secure`), and a
/// client's own `X-Forwarded-For` does not get through Traefik.
#[test]
fn the_gateway_answers_through_real_traefik_over_tls() {
    let dev = Dev::start_with(None, &["--no-docker", "--trusted-proxy", "127.0.0.1"]);
    let gateway = format!("http://{}", dev.endpoint("gateway"));
    let dynamic = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/traefik/dynamic");
    let traefik = Traefik::start_with_files(
        &dynamic,
        &[
            ("CAPSTAN_DOMAIN", "capstan.localhost"),
            ("CAPSTAN_GATEWAY_URL", &gateway),
            ("CAPSTAN_TLS_RESOLVER", ""),
        ],
    );
    let host = "api.capstan.localhost";
    let https = |path: &str| format!("https://{host}:{}{path}", traefik.tls_port());
    let resolve = format!("{host}:{}:127.0.0.1", traefik.tls_port());
    let resolve_web = format!("{host}:{}:127.0.0.1", traefik.port());
    wait_until(
        "the gateway answers through Traefik",
        Duration::from_secs(30),
        || {
            curl(&["-k", "--resolve", &resolve, &https("/healthz")])
                .1
                .contains("200")
        },
    );

    // A self-signed certificate: refused unless the client says -k.
    let (code, out) = curl(&["--resolve", &resolve, &https("/healthz")]);
    assert_eq!(code, 60, "curl: the certificate is not trusted: {out}");
    let (_, out) = curl(&["-k", "--resolve", &resolve, &https("/openapi.json")]);
    assert!(out.contains("\"openapi\":\"3.1.0\""), "{out}");
    // Plain HTTP redirects to HTTPS.
    let (_, out) = curl(&[
        "--resolve",
        &resolve_web,
        &format!("http://{host}:{}/ui/", traefik.port()),
    ]);
    assert!(
        out.starts_with("HTTP/1.1 301") || out.starts_with("HTTP/1.1 308"),
        "{out}"
    );
    assert!(out.to_lowercase().contains("location: https://"), "{out}");

    // Traefik says the client came over TLS, and the gateway trusts it.
    let admin = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
    let body = format!("{{\"api_key\": \"{}\"}}", admin.trim());
    let (_, out) = curl(&[
        "-k",
        "--resolve",
        &resolve,
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
        &https("/ui/session"),
    ]);
    let cookie = out
        .lines()
        .find(|l| l.to_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no session cookie: {out}"));
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );

    // A client naming itself in X-Forwarded-For is still one client to the
    // gateway: Traefik does not pass an untrusted peer's header on.
    let mut limited = false;
    for i in 0..14 {
        let (_, out) = curl(&[
            "-k",
            "--resolve",
            &resolve,
            "-H",
            &format!("X-Forwarded-For: 203.0.113.{i}"),
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"api_key": "cap_wrong"}"#,
            &https("/ui/session"),
        ]);
        limited |= out.starts_with("HTTP/2 429") || out.starts_with("HTTP/1.1 429");
    }
    assert!(
        limited,
        "forged X-Forwarded-For values spread sign-ins over buckets"
    );
}
