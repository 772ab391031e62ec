//! The routing table as a Traefik v3 dynamic configuration, for Traefik's
//! HTTP provider. Apps with no healthy instance are left out: Traefik requires
//! at least one server per load balancer. With no route at all the document
//! is `{}`: Traefik rejects empty `routers` and `services` maps ("cannot be a
//! standalone element") and keeps the old table, while `{}` clears it.
//!
//! Every router goes through [`RETRY`], and every service dials through
//! [`TRANSPORT`]: a server on a host that just died does not answer its
//! SYN, so Traefik gives up on it after [`DIAL_TIMEOUT`] and retries the
//! request on the next server, instead of failing it after Go's default
//! 30 s. The request never reached the dead server, so the retry runs it
//! once. (Traefik's retry also replays a request whose connection broke
//! before any response byte, as every Traefik retry does.) An app with an
//! HTTP health check gets it repeated by Traefik too (`healthCheck`), so
//! Traefik stops sending to a dead host's servers after one failed probe,
//! before the control plane has declared the host down.

use serde_json::{Map, Value, json};

use crate::table::RouteTable;

/// The entry point routers attach to; `infra/traefik` defines it.
pub const ENTRY_POINT: &str = "web";
/// The retry middleware every Capstan router uses.
pub const RETRY: &str = "capstan-retry";
/// The servers transport every Capstan service dials through.
pub const TRANSPORT: &str = "capstan-transport";
/// How long Traefik waits for a server to accept a connection.
pub const DIAL_TIMEOUT: &str = "1s";
/// Tries per request, the first one included.
pub const ATTEMPTS: u32 = 4;

pub fn render(table: &RouteTable) -> Value {
    let mut routers = Map::new();
    let mut services = Map::new();
    for route in table
        .routes
        .iter()
        .filter(|r| !r.upstreams.is_empty() && !r.hosts.is_empty())
    {
        let name = format!("capstan-{}", route.app);
        let rule = route
            .hosts
            .iter()
            .map(|h| format!("Host(`{h}`)"))
            .collect::<Vec<_>>()
            .join(" || ");
        routers.insert(
            name.clone(),
            json!({
                "rule": rule,
                "service": name,
                "entryPoints": [ENTRY_POINT],
                "middlewares": [RETRY],
            }),
        );
        let servers: Vec<Value> = route
            .upstreams
            .iter()
            .map(|u| json!({ "url": format!("http://{}", u.address) }))
            .collect();
        services.insert(name, {
            let mut balancer = json!({
                "servers": servers,
                "passHostHeader": true,
                "serversTransport": TRANSPORT,
            });
            if let Some(health) = &route.health {
                // Traefik drops a server from rotation on a failed
                // check and takes it back on a passing one.
                balancer["healthCheck"] = json!({
                    "path": health.path,
                    "interval": format!("{}ms", health.interval_ms),
                    "timeout": format!("{}ms", health.timeout_ms),
                });
            }
            json!({ "loadBalancer": balancer })
        });
    }
    if routers.is_empty() {
        return json!({});
    }
    json!({ "http": {
        "routers": routers,
        "services": services,
        "middlewares": { RETRY: { "retry": { "attempts": ATTEMPTS } } },
        "serversTransports": { TRANSPORT: { "forwardingTimeouts": { "dialTimeout": DIAL_TIMEOUT } } },
    } })
}

/// The root key of Traefik's KV providers (its `rootKey`, default `traefik`).
pub const KV_ROOT: &str = "traefik";

/// The rendered document in the key layout of Traefik's KV providers:
/// objects become path segments, array items their index
/// (`traefik/http/routers/capstan-hello/entryPoints/0 = web`).
pub fn kv_pairs(document: &Value) -> std::collections::BTreeMap<String, String> {
    fn walk(prefix: String, value: &Value, out: &mut std::collections::BTreeMap<String, String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    walk(format!("{prefix}/{key}"), value, out);
                }
            }
            Value::Array(items) => {
                for (index, value) in items.iter().enumerate() {
                    walk(format!("{prefix}/{index}"), value, out);
                }
            }
            Value::String(text) => {
                out.insert(prefix, text.clone());
            }
            Value::Null => {}
            other => {
                out.insert(prefix, other.to_string());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(KV_ROOT.to_string(), document, &mut out);
    out
}

/// Whether a KV key is one router-config writes: routers, services,
/// middlewares and servers transports named `capstan-*`. Everything else
/// under the root is the operator's.
pub fn kv_owned(key: &str) -> bool {
    ["routers", "services", "middlewares", "serversTransports"]
        .iter()
        .any(|kind| {
            key.strip_prefix(KV_ROOT)
                .and_then(|rest| rest.strip_prefix("/http/"))
                .and_then(|rest| rest.strip_prefix(kind))
                .is_some_and(|rest| rest.starts_with("/capstan-"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Route, Upstream};

    #[test]
    fn the_table_flattens_into_traefiks_kv_layout() {
        let table = RouteTable {
            generation: 1,
            routes: vec![Route {
                app: "hello".into(),
                project: "default".into(),
                hosts: vec!["hello.localhost".into()],
                health: None,
                wakeable: false,
                upstreams: vec![Upstream {
                    instance_id: "i1".into(),
                    address: "10.0.0.5:31000".into(),
                }]
                .into(),
            }],
        };
        let pairs = kv_pairs(&render(&table));
        let expected = [
            ("traefik/http/middlewares/capstan-retry/retry/attempts", "4"),
            ("traefik/http/routers/capstan-hello/entryPoints/0", "web"),
            (
                "traefik/http/routers/capstan-hello/middlewares/0",
                "capstan-retry",
            ),
            (
                "traefik/http/routers/capstan-hello/rule",
                "Host(`hello.localhost`)",
            ),
            (
                "traefik/http/routers/capstan-hello/service",
                "capstan-hello",
            ),
            (
                "traefik/http/serversTransports/capstan-transport/forwardingTimeouts/dialTimeout",
                "1s",
            ),
            (
                "traefik/http/services/capstan-hello/loadBalancer/passHostHeader",
                "true",
            ),
            (
                "traefik/http/services/capstan-hello/loadBalancer/servers/0/url",
                "http://10.0.0.5:31000",
            ),
            (
                "traefik/http/services/capstan-hello/loadBalancer/serversTransport",
                "capstan-transport",
            ),
        ];
        assert_eq!(
            pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
            expected
        );
        assert!(pairs.keys().all(|k| kv_owned(k)));
        assert!(kv_pairs(&render(&RouteTable::default())).is_empty());
        assert!(!kv_owned("traefik/http/routers/mine/rule"));
        assert!(!kv_owned("traefik/http/middlewares/mine/headers"));
    }
}
