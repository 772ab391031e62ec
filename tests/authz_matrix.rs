//! Every gRPC method Capstan serves × every kind of caller, generated from
//! the compiled service descriptors. A method added to a .proto without an
//! access rule in its service's `policy()` fails here (and is denied to
//! everybody at run time); so does a rule that admits someone the table
//! below does not.

mod common;

use capstan_authn::{Claims, Role};
use common::policy_of;
use prost::Message;

/// Who may call each method: `-` anonymous, `v` viewer, `o` deployer,
/// `a` admin, `s` Capstan's services, `n` a node (agent).
const EXPECTED: &[(&str, &str)] = &[
    ("/capstan.v1.Agent/StartInstance", "s"),
    ("/capstan.v1.Agent/StopInstance", "s"),
    ("/capstan.v1.Agent/ListInstances", "s"),
    ("/capstan.v1.Agent/Logs", "s"),
    ("/capstan.v1.Auth/IssueToken", "-voasn"),
    ("/capstan.v1.Auth/GetVerificationKeys", "-voasn"),
    ("/capstan.v1.Auth/CreateApiKey", "a"),
    ("/capstan.v1.Auth/ListApiKeys", "a"),
    ("/capstan.v1.Auth/RevokeApiKey", "a"),
    ("/capstan.v1.Auth/RotateSigningKey", "a"),
    ("/capstan.v1.Auth/ListAudit", "a"),
    ("/capstan.v1.Auth/VerifyAudit", "a"),
    ("/capstan.v1.Auth/CreateProject", "a"),
    ("/capstan.v1.Auth/ListProjects", "voa"),
    ("/capstan.v1.Orchestrator/ApplyApp", "oa"),
    ("/capstan.v1.Orchestrator/GetApp", "voa"),
    ("/capstan.v1.Orchestrator/ListApps", "voas"),
    ("/capstan.v1.Orchestrator/ScaleApp", "oa"),
    ("/capstan.v1.Orchestrator/DeleteApp", "oa"),
    ("/capstan.v1.Orchestrator/ListEvents", "voa"),
    ("/capstan.v1.Orchestrator/WatchEvents", "voa"),
    ("/capstan.v1.Orchestrator/GetAppHistory", "voa"),
    ("/capstan.v1.Orchestrator/AppLogs", "voa"),
    ("/capstan.v1.Orchestrator/ResumeAutoscale", "oa"),
    ("/capstan.v1.Orchestrator/RestartApp", "oa"),
    ("/capstan.v1.Orchestrator/RollbackApp", "oa"),
    ("/capstan.v1.Orchestrator/WakeApp", "s"),
    ("/capstan.v1.Orchestrator/ListEndpoints", "voas"),
    ("/capstan.v1.Metrics/Ingest", "sn"),
    ("/capstan.v1.Metrics/Query", "voas"),
    ("/capstan.v1.Metrics/Top", "voa"),
    ("/capstan.v1.Metrics/Watch", "voa"),
    ("/capstan.v1.RouterConfig/GetRoutes", "voa"),
    ("/capstan.v1.RouterConfig/Sync", "s"),
    ("/capstan.v1.RouterConfig/RenderTraefik", "voa"),
    ("/capstan.v1.Scheduler/RegisterNode", "n"),
    ("/capstan.v1.Scheduler/Heartbeat", "n"),
    ("/capstan.v1.Scheduler/ListNodes", "voas"),
    ("/capstan.v1.Scheduler/Place", "s"),
    ("/capstan.v1.Scheduler/Release", "s"),
    ("/capstan.v1.Scheduler/ListAllocations", "s"),
    ("/capstan.v1.Scheduler/DrainNode", "a"),
];

const CALLERS: [(char, Option<Role>); 6] = [
    ('-', None),
    ('v', Some(Role::Viewer)),
    ('o', Some(Role::Deployer)),
    ('a', Some(Role::Admin)),
    ('s', Some(Role::Service)),
    ('n', Some(Role::Node)),
];

fn claims(role: Role) -> Claims {
    Claims {
        iss: capstan_authn::ISSUER.into(),
        aud: capstan_authn::AUDIENCE.into(),
        sub: "caller".into(),
        role,
        iat: 0,
        nbf: 0,
        exp: 0,
        jti: String::new(),
        project: String::new(),
    }
}

/// Every `/package.Service/Method` in the compiled protos.
fn methods() -> Vec<(String, String)> {
    let set = prost_types::FileDescriptorSet::decode(capstan_proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set decodes");
    let mut out = Vec::new();
    for file in set.file {
        let package = file.package().to_string();
        for service in &file.service {
            let full = format!("{package}.{}", service.name());
            for method in &service.method {
                out.push((full.clone(), format!("/{full}/{}", method.name())));
            }
        }
    }
    out
}

#[test]
fn every_method_has_a_rule_and_admits_exactly_whom_it_should() {
    let methods = methods();
    assert!(
        methods.len() >= EXPECTED.len(),
        "descriptor set looks empty"
    );
    let mut failures = Vec::new();
    for (service, path) in &methods {
        let policy = policy_of(service);
        if policy.rule_for(path).is_none() {
            failures.push(format!("{path}: no access rule in {service}'s policy()"));
            continue;
        }
        let Some((_, allowed)) = EXPECTED.iter().find(|(p, _)| p == path) else {
            failures.push(format!("{path}: missing from EXPECTED in this test"));
            continue;
        };
        for (letter, role) in CALLERS {
            let claims = role.map(claims);
            let admitted = policy.decide(path, claims.as_ref()).is_ok();
            if admitted != allowed.contains(letter) {
                failures.push(format!(
                    "{path}: caller `{letter}` is {} but should {}be",
                    if admitted { "admitted" } else { "refused" },
                    if allowed.contains(letter) { "" } else { "not " }
                ));
            }
        }
    }
    for (path, _) in EXPECTED {
        if !methods.iter().any(|(_, p)| p == path) {
            failures.push(format!("{path}: in EXPECTED but not served"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_matrix_can_fail() {
    // A policy that forgets a method is caught by the same check.
    let forgetful = capstan_authn::Policy::new().services("/capstan.v1.Agent/StartInstance");
    assert!(
        forgetful
            .rule_for("/capstan.v1.Agent/StopInstance")
            .is_none()
    );
    // And nobody, not even an admin, may call a method without a rule.
    assert!(
        forgetful
            .decide("/capstan.v1.Agent/StopInstance", Some(&claims(Role::Admin)))
            .is_err()
    );
}

/// Every REST route is a gRPC method of the table above, so the same rule
/// decides it; none exposes a method only services or nodes may call.
#[test]
fn every_rest_route_is_a_method_with_a_rule_for_users() {
    for route in capstan_gateway::routes::ROUTES {
        let method = format!("/{}", route.rpc);
        let (_, who) = EXPECTED
            .iter()
            .find(|(m, _)| *m == method)
            .unwrap_or_else(|| {
                panic!(
                    "{} {} calls {method}, which has no rule",
                    route.method, route.path
                )
            });
        assert!(
            who.contains(['v', 'o', 'a']),
            "{} {} exposes {method}, which no user may call ({who})",
            route.method,
            route.path
        );
    }
}
