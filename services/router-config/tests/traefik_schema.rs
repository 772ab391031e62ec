//! What we emit for Traefik validates against Traefik v3's published schema
//! (`../shared/contracts`), and reads as a user would expect.

use capstan_router_config::table::{Route, RouteTable, Upstream};
use capstan_router_config::traefik;

fn schema() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/contracts/traefik-v3-file-provider.schema.json"
    );
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {path}: {e} (shared/ must sit beside the repo)"));
    serde_json::from_str(&text).expect("schema is JSON")
}

fn table() -> RouteTable {
    RouteTable {
        generation: 3,
        routes: vec![
            Route {
                app: "hello".into(),
                project: "default".into(),
                hosts: vec!["hello.localhost".into(), "hi.example.com".into()],
                health: Some(capstan_router_config::table::RouteHealth {
                    path: "/healthz".into(),
                    interval_ms: 1000,
                    timeout_ms: 500,
                }),
                wakeable: false,
                upstreams: vec![
                    Upstream {
                        instance_id: "hello-1".into(),
                        address: "127.0.0.1:4001".into(),
                    },
                    Upstream {
                        instance_id: "hello-2".into(),
                        address: "127.0.0.1:4002".into(),
                    },
                ]
                .into(),
            },
            Route {
                app: "idle".into(),
                project: "default".into(),
                hosts: vec!["idle.localhost".into()],
                health: None,
                wakeable: false,
                upstreams: Vec::new().into(),
            },
        ],
    }
}

#[test]
fn rendered_config_validates_against_the_traefik_v3_schema() {
    let document = traefik::render(&table());
    let validator = jsonschema::validator_for(&schema()).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(&document)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "invalid Traefik config: {errors:#?}\n{document:#}"
    );
}

#[test]
fn schema_catches_a_broken_document() {
    // Guards the test above: the validator must be able to fail.
    let mut document = traefik::render(&table());
    document["http"]["services"]["capstan-hello"]["loadBalancer"]["servers"] =
        serde_json::json!([]);
    let validator = jsonschema::validator_for(&schema()).unwrap();
    assert!(!validator.is_valid(&document));
}

#[test]
fn routers_match_hosts_and_services_list_upstreams() {
    let document = traefik::render(&table());
    let router = &document["http"]["routers"]["capstan-hello"];
    assert_eq!(
        router["rule"],
        "Host(`hello.localhost`) || Host(`hi.example.com`)"
    );
    assert_eq!(router["service"], "capstan-hello");
    let servers = &document["http"]["services"]["capstan-hello"]["loadBalancer"]["servers"];
    assert_eq!(servers[0]["url"], "http://127.0.0.1:4001");
    assert_eq!(servers[1]["url"], "http://127.0.0.1:4002");
    // Traefik repeats the app's HTTP check, so it drops a dead server itself.
    assert_eq!(
        document["http"]["services"]["capstan-hello"]["loadBalancer"]["healthCheck"],
        serde_json::json!({ "path": "/healthz", "interval": "1000ms", "timeout": "500ms" })
    );
    // Every router retries on the next server; every service dials with a
    // short timeout.
    assert_eq!(router["middlewares"], serde_json::json!([traefik::RETRY]));
    assert_eq!(
        document["http"]["serversTransports"][traefik::TRANSPORT]["forwardingTimeouts"]["dialTimeout"],
        traefik::DIAL_TIMEOUT
    );
    assert!(
        document["http"]["routers"].get("capstan-idle").is_none(),
        "apps with no server are left out"
    );
}

#[test]
fn no_routes_render_as_an_empty_document() {
    // Real Traefik refuses `{"http":{"routers":{},"services":{}}}` ("routers
    // cannot be a standalone element") and keeps its old table; `{}` clears
    // it. tests/e2e_traefik.rs checks this against Traefik itself.
    let document = traefik::render(&RouteTable::default());
    assert_eq!(document, serde_json::json!({}));
    let validator = jsonschema::validator_for(&schema()).unwrap();
    assert!(validator.is_valid(&document));
}
