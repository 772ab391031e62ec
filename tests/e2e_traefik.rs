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
