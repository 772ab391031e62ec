//! Projects, end to end on `capstan dev`: every gRPC method users may call
//! and every REST route, × a viewer and a deployer of project `team-a`,
//! × an app of their own project and one of `team-b`. Generated from the
//! compiled descriptors and the gateway's route table, so a new method or
//! route is covered the day it is added:
//! - a method about one app (a `name` or `app` field) is refused
//!   (PERMISSION_DENIED, 403) for the other project's app, whatever the
//!   role, and admitted for the caller's own when the role allows it;
//! - every other method answers only with what the caller's project holds:
//!   the other project's app and the other project never appear in it.

mod common;

use std::time::Duration;

use capstan_authn::{Access, Rule};
use common::*;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, Value as Field};

const OWN_GRPC: &str = "mine";
const OWN_REST: &str = "mine-rest";
const OTHER: &str = "theirs";
const OTHER_PROJECT: &str = "team-b";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Viewer,
    Deployer,
}

impl Who {
    fn allows(self, access: Access) -> bool {
        match self {
            Who::Viewer => access == Access::Read,
            Who::Deployer => access <= Access::Write,
        }
    }
}

/// The endpoints.json name of a gRPC service.
fn endpoint_name(service: &str) -> &'static str {
    match service {
        "capstan.v1.Auth" => "auth",
        "capstan.v1.Metrics" => "metrics_service",
        "capstan.v1.Orchestrator" => "orchestrator",
        "capstan.v1.RouterConfig" => "router_config",
        "capstan.v1.Scheduler" => "scheduler",
        other => panic!("no endpoint for {other}"),
    }
}

/// The field naming the app a method is about, if it has one.
fn target_field(method: &MethodDescriptor) -> Option<&'static str> {
    let input = method.input();
    ["name", "app"]
        .into_iter()
        .find(|f| input.get_field_by_name(f).is_some())
        .or_else(|| input.get_field_by_name("spec").map(|_| "spec"))
}

/// The request of `method` about app `target`: its app field set, the
/// rest left at defaults (a call may then be invalid, but never before the
/// project is checked).
fn request(method: &MethodDescriptor, target: &str) -> DynamicMessage {
    let mut message = DynamicMessage::new(method.input());
    match target_field(method) {
        Some("spec") => {
            let field = method.input().get_field_by_name("spec").unwrap();
            let prost_reflect::Kind::Message(spec) = field.kind() else {
                panic!("spec is a message")
            };
            let mut inner = DynamicMessage::new(spec);
            inner.set_field_by_name("name", Field::String(target.into()));
            message.set_field(&field, Field::Message(inner));
        }
        Some(name) => message.set_field_by_name(name, Field::String(target.into())),
        None => {}
    }
    message
}

/// Calls `method` as `token`; a stream answers with its first message
/// (or nothing within a second).
async fn invoke(
    dev: &Dev,
    method: &MethodDescriptor,
    message: DynamicMessage,
    token: &str,
) -> Result<String, tonic::Status> {
    let service = method.parent_service().full_name().to_string();
    let mut grpc = tonic::client::Grpc::new(channel(&dev.endpoint(endpoint_name(&service))));
    grpc.ready().await.expect("channel ready");
    let path: http::uri::PathAndQuery = format!("/{service}/{}", method.name()).parse().unwrap();
    let request = with_token(bytes::Bytes::from(message.encode_to_vec()), token);
    let decode = |bytes: bytes::Bytes| {
        let reply = DynamicMessage::decode(method.output(), bytes).expect("a reply decodes");
        serde_json::to_string(&reply).unwrap()
    };
    if method.is_server_streaming() {
        let mut stream = grpc
            .server_streaming(request, path, capstan_gateway::RawCodec)
            .await?
            .into_inner();
        match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
            Ok(Ok(Some(bytes))) => Ok(decode(bytes)),
            Ok(Ok(None)) | Err(_) => Ok(String::new()),
            Ok(Err(status)) => Err(status),
        }
    } else {
        grpc.unary(request, path, capstan_gateway::RawCodec)
            .await
            .map(|r| decode(r.into_inner()))
    }
}

/// Every method any user role may call, DeleteApp last (it removes the
/// caller's own app).
fn user_methods(pool: &DescriptorPool) -> Vec<(MethodDescriptor, Access)> {
    let mut methods = Vec::new();
    for service in pool.services() {
        if !service.full_name().starts_with("capstan.v1.") {
            continue;
        }
        let policy = policy_of(service.full_name());
        for method in service.methods() {
            let path = format!("/{}/{}", service.full_name(), method.name());
            if let Some(Rule::Users { access, .. }) = policy.rule_for(&path) {
                methods.push((method, access));
            }
        }
    }
    methods.sort_by_key(|(m, _)| m.name() == "DeleteApp");
    methods
}

fn deploy(dev: &Dev, name: &str, project: &str) {
    let spec = format!("project = \"{project}\"\n{}", whoami_spec(name, 1, "hi"));
    let file = spec_file(dev.data_dir(), &format!("{name}.toml"), &spec);
    dev.ok(&["app", "deploy", "-f", &file, "--detach"]);
}

/// One request to the gateway as `key`: (status, head and body); a stream
/// is read until it has been quiet for 1.5 s.
fn rest(addr: &str, method: &str, path: &str, key: &str, body: &str) -> (u16, String) {
    let request = gateway_request(
        method,
        path,
        &[format!("Authorization: Bearer {key}")],
        body,
    );
    let (status, head, body) = http_exchange(addr, &request, Duration::from_millis(1500));
    (status, format!("{head}\r\n\r\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_and_route_keeps_each_project_to_itself() {
    let dev = tokio::task::block_in_place(|| Dev::start_with(None, &["--no-docker"]));
    let (viewer_key, deployer_key) = tokio::task::block_in_place(|| {
        dev.ok(&["project", "create", "team-a"]);
        dev.ok(&["project", "create", OTHER_PROJECT]);
        let key = |name: &str, role: &str| {
            dev.ok(&[
                "key",
                "create",
                "--name",
                name,
                "--project",
                "team-a",
                "--role",
                role,
            ])
            .trim()
            .to_string()
        };
        let keys = (key("ann", "viewer"), key("dan", "deployer"));
        deploy(&dev, OWN_GRPC, "team-a");
        deploy(&dev, OWN_REST, "team-a");
        deploy(&dev, OTHER, OTHER_PROJECT);
        keys
    });
    let viewer = token(&dev, viewer_key.clone()).await;
    let deployer = token(&dev, deployer_key.clone()).await;
    let pool = capstan_gateway::descriptors();
    let methods = user_methods(&pool);
    assert!(methods.len() >= 25, "only {} user methods", methods.len());

    let mut failures = Vec::new();
    let mut checked = 0;
    for (method, access) in &methods {
        let path = format!("{}/{}", method.parent_service().name(), method.name());
        for (who, token) in [(Who::Viewer, &viewer), (Who::Deployer, &deployer)] {
            let targets: Vec<Option<&str>> = match target_field(method) {
                Some(_) => vec![Some(OTHER), Some(OWN_GRPC)],
                None => vec![None],
            };
            for target in targets {
                checked += 1;
                let message = request(method, target.unwrap_or_default());
                let result = invoke(&dev, method, message, token).await;
                let denied = matches!(&result, Err(s) if s.code() == tonic::Code::PermissionDenied);
                let case = format!("{path} as {who:?} about {}", target.unwrap_or("(all)"));
                match target {
                    Some(OTHER) if !denied => {
                        failures.push(format!("{case}: not refused: {result:?}"))
                    }
                    Some(OTHER) => {}
                    _ if who.allows(*access) && denied => {
                        failures.push(format!("{case}: refused: {result:?}"))
                    }
                    _ if !who.allows(*access) && !denied => {
                        failures.push(format!("{case}: admitted a role it should not: {result:?}"))
                    }
                    _ => {}
                }
                if let (None, Ok(reply)) = (target, &result)
                    && (reply.contains(&format!("\"{OTHER}")) || reply.contains(OTHER_PROJECT))
                {
                    failures.push(format!("{case}: shows the other project: {reply}"));
                }
            }
        }
    }

    // The filters are not empty answers: the caller's own app is listed.
    let listed = invoke(
        &dev,
        &pool
            .get_service_by_name("capstan.v1.Orchestrator")
            .unwrap()
            .methods()
            .find(|m| m.name() == "ListApps")
            .unwrap(),
        DynamicMessage::new(
            pool.get_message_by_name("capstan.v1.ListAppsRequest")
                .unwrap(),
        ),
        &viewer,
    )
    .await
    .unwrap();
    assert!(listed.contains(OWN_REST), "{listed}");

    // Every REST route, the same way (through the gateway, so each
    // service's own rule decides).
    let addr = dev.endpoint("gateway");
    let mut routes: Vec<_> = capstan_gateway::routes::ROUTES.iter().collect();
    routes.sort_by_key(|r| r.method == http::Method::DELETE);
    for route in routes {
        let method = pool
            .get_service_by_name(route.rpc.split('/').next().unwrap())
            .and_then(|s| {
                s.methods()
                    .find(|m| route.rpc.ends_with(&format!("/{}", m.name())))
            })
            .unwrap_or_else(|| panic!("{} is no method", route.rpc));
        let path = format!("/{}", route.rpc);
        let service = route.rpc.split('/').next().unwrap();
        let access = match policy_of(service).rule_for(&path) {
            Some(Rule::Users { access, .. }) => access,
            other => panic!("{} {} calls {path} ({other:?})", route.method, route.path),
        };
        let fields = capstan_gateway::routes::path_fields(route.path);
        for (who, key) in [(Who::Viewer, &viewer_key), (Who::Deployer, &deployer_key)] {
            let targets: Vec<Option<&str>> = if fields.iter().any(|f| *f == "name" || *f == "app")
                || target_field(&method) == Some("spec")
            {
                vec![Some(OTHER), Some(OWN_REST)]
            } else {
                vec![None]
            };
            for target in targets {
                checked += 1;
                let mut url = route.path.to_string();
                for field in &fields {
                    let value = match *field {
                        "name" | "app" => target.unwrap_or_default(),
                        _ => "node-x",
                    };
                    url = url.replace(&format!("{{{field}}}"), value);
                }
                use capstan_gateway::routes::Body;
                let body = match (route.body, target) {
                    (Body::None, _) => String::new(),
                    (Body::Field("spec"), Some(t)) => format!("{{\"name\": \"{t}\"}}"),
                    (Body::Whole, Some(t)) if target_field(&method) == Some("spec") => {
                        format!("{{\"spec\": {{\"name\": \"{t}\"}}}}")
                    }
                    _ => "{}".to_string(),
                };
                let (status, reply) = tokio::task::block_in_place(|| {
                    rest(&addr, route.method.as_str(), &url, key, &body)
                });
                let case = format!("{} {url} as {who:?}", route.method);
                let denied = status == 403;
                match target {
                    Some(OTHER) if !denied => failures.push(format!("{case}: {status}, not 403")),
                    Some(OTHER) => {}
                    _ if who.allows(access) && (denied || status == 401) => {
                        failures.push(format!("{case}: refused: {reply}"))
                    }
                    _ if !who.allows(access) && !denied => {
                        failures.push(format!("{case}: {status} for a role it should refuse"))
                    }
                    _ => {}
                }
                if target.is_none()
                    && status == 200
                    && (reply.contains(&format!("\"{OTHER}")) || reply.contains(OTHER_PROJECT))
                {
                    failures.push(format!("{case}: shows the other project: {reply}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} cases:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // An admin sees both projects; the keys say which project they are for.
    let apps = tokio::task::block_in_place(|| dev.ok(&["app", "ls", "-o", "json"]));
    assert!(apps.contains(OTHER), "{apps}");
    let keys = tokio::task::block_in_place(|| dev.ok(&["key", "ls", "-o", "json"]));
    assert!(keys.contains("\"project\": \"team-a\""), "{keys}");
}
