//! The REST routes: each one a gRPC method of a Capstan service, the way
//! grpc-gateway maps them. Path parameters and query parameters set the
//! request message's fields of the same name; a body sets the whole
//! request (`*`) or one field of it. The handler and the OpenAPI document
//! are both made from this table and the services' descriptors, so the two
//! cannot drift apart.

use http::Method;

#[derive(Debug, Clone, Copy)]
pub enum Body {
    None,
    /// The JSON body is the whole request message.
    Whole,
    /// The JSON body is this field of the request message.
    Field(&'static str),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    /// With `{field}` parameters, in axum's syntax.
    pub path: &'static str,
    /// The service as the registry names it.
    pub service: &'static str,
    /// `package.Service/Method`.
    pub rpc: &'static str,
    pub body: Body,
    /// A server-streaming method, answered as Server-Sent Events.
    pub stream: bool,
    pub summary: &'static str,
}

const fn route(
    method: Method,
    path: &'static str,
    service: &'static str,
    rpc: &'static str,
    body: Body,
    summary: &'static str,
) -> Route {
    Route {
        method,
        path,
        service,
        rpc,
        body,
        stream: false,
        summary,
    }
}

const fn stream(
    path: &'static str,
    service: &'static str,
    rpc: &'static str,
    summary: &'static str,
) -> Route {
    Route {
        method: Method::GET,
        path,
        service,
        rpc,
        body: Body::None,
        stream: true,
        summary,
    }
}

pub const ROUTES: &[Route] = &[
    route(
        Method::GET,
        "/v1/apps",
        "orchestrator",
        "capstan.v1.Orchestrator/ListApps",
        Body::None,
        "List apps",
    ),
    route(
        Method::POST,
        "/v1/apps",
        "orchestrator",
        "capstan.v1.Orchestrator/ApplyApp",
        Body::Field("spec"),
        "Deploy an app (create or update); the body is its spec, as JSON or as a TOML spec file (Content-Type: application/toml)",
    ),
    route(
        Method::GET,
        "/v1/apps/{name}",
        "orchestrator",
        "capstan.v1.Orchestrator/GetApp",
        Body::None,
        "An app, its rollout and its instances",
    ),
    route(
        Method::DELETE,
        "/v1/apps/{name}",
        "orchestrator",
        "capstan.v1.Orchestrator/DeleteApp",
        Body::None,
        "Remove an app: out of rotation, then stopped",
    ),
    route(
        Method::POST,
        "/v1/apps/{name}/scale",
        "orchestrator",
        "capstan.v1.Orchestrator/ScaleApp",
        Body::Whole,
        "Set an app's replica count",
    ),
    route(
        Method::POST,
        "/v1/apps/{name}/restart",
        "orchestrator",
        "capstan.v1.Orchestrator/RestartApp",
        Body::None,
        "Replace every instance, as a rolling update",
    ),
    route(
        Method::POST,
        "/v1/apps/{name}/rollback",
        "orchestrator",
        "capstan.v1.Orchestrator/RollbackApp",
        Body::Whole,
        "Return an app to an earlier template",
    ),
    route(
        Method::POST,
        "/v1/apps/{name}/autoscale/resume",
        "orchestrator",
        "capstan.v1.Orchestrator/ResumeAutoscale",
        Body::None,
        "Give the replica count back to the autoscaler",
    ),
    route(
        Method::GET,
        "/v1/apps/{app}/history",
        "orchestrator",
        "capstan.v1.Orchestrator/GetAppHistory",
        Body::None,
        "The decision journal of an app, newest first",
    ),
    route(
        Method::GET,
        "/v1/apps/{app}/logs",
        "orchestrator",
        "capstan.v1.Orchestrator/AppLogs",
        Body::None,
        "What an app's instances printed, merged by time (follow=true: use /v1/apps/{app}/logs/stream)",
    ),
    stream(
        "/v1/apps/{app}/logs/stream",
        "orchestrator",
        "capstan.v1.Orchestrator/AppLogs",
        "An app's log lines as Server-Sent Events, then every new one (follow is set)",
    ),
    route(
        Method::GET,
        "/v1/apps/{app}/metrics",
        "metrics",
        "capstan.v1.Metrics/Query",
        Body::None,
        "One metric of an app over a time range",
    ),
    route(
        Method::GET,
        "/v1/top",
        "metrics",
        "capstan.v1.Metrics/Top",
        Body::None,
        "The latest usage and traffic of every instance",
    ),
    route(
        Method::GET,
        "/v1/events",
        "orchestrator",
        "capstan.v1.Orchestrator/ListEvents",
        Body::None,
        "Recent events, newest first",
    ),
    stream(
        "/v1/events/stream",
        "orchestrator",
        "capstan.v1.Orchestrator/WatchEvents",
        "Events as Server-Sent Events, as they happen",
    ),
    route(
        Method::GET,
        "/v1/endpoints",
        "orchestrator",
        "capstan.v1.Orchestrator/ListEndpoints",
        Body::None,
        "Every app's routable endpoints",
    ),
    route(
        Method::GET,
        "/v1/nodes",
        "scheduler",
        "capstan.v1.Scheduler/ListNodes",
        Body::None,
        "Nodes, their capacity and allocations",
    ),
    route(
        Method::POST,
        "/v1/nodes/{node_id}/drain",
        "scheduler",
        "capstan.v1.Scheduler/DrainNode",
        Body::Whole,
        "Drain a node (enable: true makes it eligible again)",
    ),
    route(
        Method::GET,
        "/v1/routes",
        "router-config",
        "capstan.v1.RouterConfig/GetRoutes",
        Body::None,
        "The routing table",
    ),
    route(
        Method::GET,
        "/v1/keys",
        "auth",
        "capstan.v1.Auth/ListApiKeys",
        Body::None,
        "API keys: names, roles, creation times (never keys)",
    ),
    route(
        Method::POST,
        "/v1/keys",
        "auth",
        "capstan.v1.Auth/CreateApiKey",
        Body::Whole,
        "Create an API key; the response holds it, once",
    ),
    route(
        Method::DELETE,
        "/v1/keys/{name}",
        "auth",
        "capstan.v1.Auth/RevokeApiKey",
        Body::None,
        "Revoke an API key and its live tokens",
    ),
    route(
        Method::GET,
        "/v1/audit",
        "auth",
        "capstan.v1.Auth/ListAudit",
        Body::None,
        "The audit log: every change asked for and refused, oldest first",
    ),
    route(
        Method::GET,
        "/v1/audit/verify",
        "auth",
        "capstan.v1.Auth/VerifyAudit",
        Body::None,
        "Whether the audit log's hash chain is whole",
    ),
    route(
        Method::GET,
        "/v1/projects",
        "auth",
        "capstan.v1.Auth/ListProjects",
        Body::None,
        "List the projects this key may see",
    ),
    route(
        Method::POST,
        "/v1/projects",
        "auth",
        "capstan.v1.Auth/CreateProject",
        Body::Whole,
        "Create a project (admin)",
    ),
];

/// The `{field}` names of a path.
pub fn path_fields(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_fields_are_read_from_braces() {
        assert_eq!(path_fields("/v1/apps/{name}/scale"), ["name"]);
        assert!(path_fields("/v1/apps").is_empty());
    }
}
