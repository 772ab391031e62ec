//! The routing table: which hosts go to which upstreams.

use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteTable {
    pub generation: u64,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub app: String,
    /// The app's project: callers confined to one see only its routes.
    pub project: String,
    pub hosts: Vec<String>,
    /// Healthy, routable instances, ordered by instance id. Shared: a table
    /// built from the last one keeps the lists of the apps it did not read
    /// again, so copying a table, comparing it and compiling it cost what
    /// changed (equal `Arc`s compare by pointer first).
    pub upstreams: Arc<[Upstream]>,
    /// The app's HTTP health check, which Traefik repeats on its own so
    /// that it stops sending to a dead host's servers at once; `None` for
    /// a TCP check.
    pub health: Option<RouteHealth>,
    /// The app scales to zero: a request that finds no upstream waits for
    /// one while the app is woken.
    pub wakeable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteHealth {
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub instance_id: String,
    /// host:port
    pub address: String,
}

impl RouteTable {
    /// Lower-cased host → route index. A host claimed by two apps goes to the
    /// first by app name, so the choice is stable.
    pub fn host_index(&self) -> BTreeMap<String, usize> {
        let mut index = BTreeMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            for host in &route.hosts {
                index.entry(host.to_ascii_lowercase()).or_insert(i);
            }
        }
        index
    }

    /// Same routes, ignoring the generation.
    pub fn same_routes(&self, other: &RouteTable) -> bool {
        self.routes == other.routes
    }

    /// Takes `previous`'s upstream list for each route whose list is equal
    /// to it there, so what did not change stays shared.
    pub fn share_unchanged(&mut self, previous: &RouteTable) {
        let before: std::collections::HashMap<&str, &Arc<[Upstream]>> = previous
            .routes
            .iter()
            .map(|route| (route.app.as_str(), &route.upstreams))
            .collect();
        for route in &mut self.routes {
            if let Some(&upstreams) = before.get(route.app.as_str())
                && *upstreams == route.upstreams
            {
                route.upstreams = upstreams.clone();
            }
        }
    }

    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .flat_map(|r| r.upstreams.iter().map(|u| u.address.as_str()))
    }
}
