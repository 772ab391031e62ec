//! The gRPC surface as any client sees it: health and reflection on every
//! service, tokens required and roles enforced, the Traefik provider
//! endpoint, and the proxy's answers when nothing is healthy.

mod common;

use std::time::Duration;

use capstan_proto::v1::auth_client::AuthClient;
use capstan_proto::v1::orchestrator_client::OrchestratorClient;
use capstan_proto::v1::router_config_client::RouterConfigClient;
use capstan_proto::v1::{
    ApplyAppRequest, CreateApiKeyRequest, GetRoutesRequest, IssueTokenRequest, ListAppsRequest,
};
use common::*;
use tonic::Code;

fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| w[..1].to_uppercase() + &w[1..])
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reflection_and_authorisation() {
    let dev = tokio::task::spawn_blocking(|| Dev::start(None))
        .await
        .unwrap();
    let endpoints = dev.endpoints();

    for service in ["orchestrator", "scheduler", "router_config", "auth"] {
        let address = endpoints[service].as_str().unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel(address));
        let response = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await;
        assert_eq!(
            response.expect("health needs no token").into_inner().status,
            1,
            "{service} is SERVING"
        );

        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let request = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(channel(address))
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .expect("reflection needs no token")
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("{service}: no service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n.starts_with("capstan.v1.")),
            "{service} reflects {names:?}"
        );

        // grpcio-reflection and Evans speak only v1alpha.
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
        let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(AlphaRequest::ListServices(String::new())),
        };
        let mut stream = AlphaClient::new(channel(address))
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
        let Some(AlphaResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("{service}: no v1alpha service list");
        };
        let alpha: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert_eq!(alpha, names, "{service}: v1alpha lists what v1 lists");
        let own = format!("capstan.v1.{}", pascal(service));
        let capstan: Vec<&String> = names.iter().filter(|n| n.starts_with("capstan.")).collect();
        assert_eq!(capstan, [&own], "{service} lists only what it serves");
        for reflection in [
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == reflection),
                "{service}: {reflection} in {names:?}"
            );
        }
    }

    let orchestrator = endpoints["orchestrator"].as_str().unwrap();
    let mut client = OrchestratorClient::new(channel(orchestrator));
    let missing = client.list_apps(ListAppsRequest {}).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    let garbage = client
        .list_apps(with_token(ListAppsRequest {}, "not.a.jwt"))
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), Code::Unauthenticated);

    // An admin creates a viewer key; the viewer may read but not write.
    let admin_key = std::fs::read_to_string(dev.data_dir().join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    let mut auth = AuthClient::new(channel(endpoints["auth"].as_str().unwrap()));
    let admin = auth
        .issue_token(IssueTokenRequest { api_key: admin_key })
        .await
        .unwrap()
        .into_inner()
        .token;
    let viewer_key = auth
        .create_api_key(with_token(
            CreateApiKeyRequest {
                name: "ci-viewer".into(),
                role: "viewer".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let bad_role = auth
        .create_api_key(with_token(
            CreateApiKeyRequest {
                name: "x".into(),
                role: "root".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_role.code(), Code::InvalidArgument);
    assert!(
        bad_role.message().contains("role:"),
        "{}",
        bad_role.message()
    );
    let viewer = auth
        .issue_token(IssueTokenRequest {
            api_key: viewer_key,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert!(
        client
            .list_apps(with_token(ListAppsRequest {}, &viewer))
            .await
            .is_ok()
    );
    let spec = capstan_types::AppSpec::parse(
        &whoami_spec("nope", 1, "x"),
        capstan_types::spec::SpecFormat::Toml,
    )
    .unwrap();
    let denied = client
        .apply_app(with_token(
            ApplyAppRequest {
                spec: Some(capstan_proto::spec_to_wire(&spec)),
            },
            &viewer,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied_key = auth
        .create_api_key(with_token(
            CreateApiKeyRequest {
                name: "y".into(),
                role: "admin".into(),
                ..Default::default()
            },
            &viewer,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied_key.code(), Code::PermissionDenied);

    // Validation errors come back as INVALID_ARGUMENT naming the field.
    let mut bad = capstan_proto::spec_to_wire(&spec);
    bad.replicas = 5000;
    let invalid = client
        .apply_app(with_token(ApplyAppRequest { spec: Some(bad) }, &admin))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid
            .message()
            .contains("replicas: must be between 0 and 1000"),
        "{}",
        invalid.message()
    );
    drop(dev);
}

#[test]
fn traefik_config_and_proxy_answers() {
    let dev = Dev::start(None);
    let spec = spec_file(dev.data_dir(), "t.toml", &whoami_spec("tr", 1, "hi"));
    dev.ok(&["app", "deploy", "-f", &spec]);

    let document: serde_json::Value =
        serde_json::from_str(&dev.ok(&["route", "traefik"])).expect("route traefik prints JSON");
    assert_eq!(
        document["http"]["routers"]["capstan-tr"]["rule"],
        "Host(`tr.localhost`)"
    );
    let address = dev.status("tr")["instances"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        document["http"]["services"]["capstan-tr"]["loadBalancer"]["servers"][0]["url"],
        format!("http://{address}")
    );

    // The same document over HTTP for Traefik's provider, behind its bearer token.
    let endpoints = dev.endpoints();
    let provider = endpoints["traefik_provider"].as_str().unwrap();
    let port: u16 = provider.rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(http_get(port, "x", "/traefik").unwrap().0, 401);
    let token = stored_secret(dev.data_dir(), "router-config/provider-token");
    let mut stream = std::net::TcpStream::connect(provider).unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "GET /traefik HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    let body: serde_json::Value =
        serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body, document);

    // Nothing healthy: 503 with a clear body. Unknown host: 404.
    dev.ok(&["app", "scale", "tr", "0"]);
    wait_until("the app has no instance", Duration::from_secs(20), || {
        instance_ids(&dev.status("tr")).is_empty()
    });
    wait_until("the proxy answers 503", Duration::from_secs(10), || {
        dev.get("tr.localhost").is_some_and(|(code, _)| code == 503)
    });
    let (_, body) = dev.get("tr.localhost").unwrap();
    assert_eq!(
        body,
        "capstan: app `tr` has no healthy instances right now\n"
    );
    assert_eq!(dev.get("nobody.localhost").unwrap().0, 404);
}

/// `ListEndpoints` naming apps (what a reconcile pass's `Sync` makes the
/// router read): the named apps' routes only, an app that does not exist
/// simply absent, nothing named means every app, and a bad name or too
/// many names are refused with the field named. `GetRoutes` naming one app
/// likewise.
#[test]
fn list_endpoints_names_the_apps_it_reads() {
    use capstan_proto::v1::ListEndpointsRequest;

    let dev = Dev::start_with(None, &["--no-docker"]);
    for name in ["alpha", "beta"] {
        let spec = spec_file(
            dev.data_dir(),
            &format!("{name}.toml"),
            &whoami_spec(name, 1, "hi"),
        );
        dev.ok(&["app", "deploy", "-f", &spec, "--timeout", "60s"]);
    }
    let endpoints = dev.endpoints();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let admin = admin_token(&dev).await;
        let mut client =
            OrchestratorClient::new(channel(endpoints["orchestrator"].as_str().unwrap()));
        let list = |apps: Vec<String>| with_token(ListEndpointsRequest { apps }, &admin);
        let names = |response: capstan_proto::v1::ListEndpointsResponse| {
            let mut names: Vec<(String, usize)> = response
                .apps
                .into_iter()
                .map(|a| (a.app, a.endpoints.len()))
                .collect();
            names.sort();
            names
        };

        let alpha = client
            .list_endpoints(list(vec!["alpha".into(), "gone".into(), "alpha".into()]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(names(alpha), [("alpha".to_string(), 1)]);
        let every = client
            .list_endpoints(list(vec![]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            names(every),
            [("alpha".to_string(), 1), ("beta".to_string(), 1)]
        );

        let bad = client
            .list_endpoints(list(vec!["beta".into(), "../etc".into()]))
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
        assert!(bad.message().contains("apps"), "{}", bad.message());
        let many = client
            .list_endpoints(list((0..1_001).map(|i| format!("app-{i}")).collect()))
            .await
            .unwrap_err();
        assert_eq!(many.code(), Code::InvalidArgument, "{many:?}");
        assert!(
            many.message().contains("apps") && many.message().contains("1001"),
            "{}",
            many.message()
        );

        // `GetRoutes` for one app: its route alone; none asked: every route.
        let mut router =
            RouterConfigClient::new(channel(endpoints["router_config"].as_str().unwrap()));
        let routes = |app: &str| with_token(GetRoutesRequest { app: app.into() }, &admin);
        let apps_of = |table: capstan_proto::v1::RouteTable| {
            table
                .routes
                .into_iter()
                .map(|r| (r.app, r.upstreams.len()))
                .collect::<Vec<_>>()
        };
        let beta = router
            .get_routes(routes("beta"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(apps_of(beta), [("beta".to_string(), 1)]);
        let gone = router
            .get_routes(routes("gone"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(apps_of(gone), []);
        let every = router.get_routes(routes("")).await.unwrap().into_inner();
        assert_eq!(
            apps_of(every),
            [("alpha".to_string(), 1), ("beta".to_string(), 1)]
        );
        let bad = router.get_routes(routes("../etc")).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
        assert!(bad.message().contains("app"), "{}", bad.message());
    });
}
