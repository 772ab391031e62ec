//! The routing table as a Traefik v3 dynamic configuration, for Traefik's
//! HTTP provider. Apps with no healthy instance are left out: Traefik requires
//! at least one server per load balancer.

use serde_json::{Map, Value, json};

use crate::table::RouteTable;

/// The entry point routers attach to; `infra/traefik` defines it.
pub const ENTRY_POINT: &str = "web";

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
            json!({ "rule": rule, "service": name, "entryPoints": [ENTRY_POINT] }),
        );
        let servers: Vec<Value> = route
            .upstreams
            .iter()
            .map(|u| json!({ "url": format!("http://{}", u.address) }))
            .collect();
        services.insert(
            name,
            json!({ "loadBalancer": { "servers": servers, "passHostHeader": true } }),
        );
    }
    json!({ "http": { "routers": routers, "services": services } })
}
