//! What the orchestrator stores: apps (desired state and rollout progress)
//! and instances (placement and last observed state).

use capstan_types::{AppSpec, InstanceState};
use serde::{Deserialize, Serialize};

pub const APPS: &str = "apps";
pub const INSTANCES: &str = "instances";
pub const EVENTS: &str = "events";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    InProgress,
    Completed,
    RolledBack,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub state: RolloutState,
    pub target_hash: String,
    pub message: String,
    pub started_ms: i64,
    /// Last time an instance of the target template started serving.
    pub progress_ms: i64,
    /// Instances of the target template that failed during this rollout.
    pub failures: u32,
    pub updated: u32,
    /// The W3C `traceparent` of the request that started this rollout: the
    /// reconciler's work for it joins that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

impl Rollout {
    pub fn start(target_hash: String, now: i64) -> Self {
        Rollout {
            state: RolloutState::InProgress,
            target_hash,
            message: String::new(),
            started_ms: now,
            progress_ms: now,
            failures: 0,
            updated: 0,
            trace: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Backoff {
    /// Failures in a row; reset when an instance becomes healthy.
    pub failures: u32,
    /// No new start before this time.
    pub until_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub spec: AppSpec,
    pub spec_hash: String,
    /// The spec of the last completed rollout: where a failed rollout returns.
    pub stable: Option<AppSpec>,
    pub rollout: Rollout,
    pub deleting: bool,
    pub backoff: Backoff,
    /// Why the last placement came up short, for `app status`.
    pub placement_error: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// A manual `ScaleApp` of an autoscaled app: the autoscaler leaves the
    /// count alone until the next deploy or `ResumeAutoscale`.
    #[serde(default)]
    pub autoscale_override: Option<ScaleOverride>,
    /// Templates this app ran before its stable one, newest first (at most
    /// [`PREVIOUS_TEMPLATES`]): what `RollbackApp` can return to.
    #[serde(default)]
    pub previous: Vec<AppSpec>,
}

/// Earlier templates an app keeps for rollbacks.
pub const PREVIOUS_TEMPLATES: usize = 10;

impl AppRecord {
    /// `spec` became the stable template: the one it replaces goes first
    /// into `previous`, which holds each template once.
    pub fn settle(&mut self, spec: AppSpec) {
        let hash = spec.template_hash();
        if let Some(old) = self.stable.take()
            && old.template_hash() != hash
        {
            let old_hash = old.template_hash();
            self.previous.retain(|p| p.template_hash() != old_hash);
            self.previous.insert(0, old);
        }
        self.previous.retain(|p| p.template_hash() != hash);
        self.previous.truncate(PREVIOUS_TEMPLATES);
        self.stable = Some(spec);
    }
}

/// Who scaled an autoscaled app by hand, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleOverride {
    pub by: String,
    pub at_ms: i64,
    pub replicas: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub app: String,
    pub node_id: String,
    pub spec_hash: String,
    pub state: InstanceState,
    pub address: String,
    pub routable: bool,
    pub stopping: bool,
    pub message: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl InstanceRecord {
    /// Whether the routing table holds it: put into rotation, not leaving
    /// it, healthy, and at an address. `ListEndpoints` routes exactly
    /// these, and the reconciler tells the router whenever a record it
    /// writes or forgets changes this.
    pub fn in_routes(&self) -> bool {
        self.routable
            && !self.stopping
            && self.state == InstanceState::Healthy
            && !self.address.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(greeting: &str) -> AppSpec {
        AppSpec::parse(
            &format!(
                "name = \"web\"\nreplicas = 1\n[run]\ncommand = [\"serve\"]\n[env]\nG = \"{greeting}\"\n"
            ),
            capstan_types::spec::SpecFormat::Toml,
        )
        .unwrap()
    }

    #[test]
    fn settling_keeps_each_earlier_template_once_newest_first_and_bounded() {
        let mut app = AppRecord {
            spec: spec("a"),
            spec_hash: spec("a").template_hash(),
            stable: None,
            rollout: Rollout::start(spec("a").template_hash(), 0),
            deleting: false,
            backoff: Backoff::default(),
            placement_error: String::new(),
            created_ms: 0,
            updated_ms: 0,
            autoscale_override: None,
            previous: Vec::new(),
        };
        let hashes = |app: &AppRecord| -> Vec<String> {
            app.previous.iter().map(|s| s.template_hash()).collect()
        };
        app.settle(spec("a"));
        assert!(app.previous.is_empty());
        app.settle(spec("b"));
        app.settle(spec("c"));
        assert_eq!(
            hashes(&app),
            [spec("b").template_hash(), spec("a").template_hash()]
        );
        // Back to a: it leaves `previous`, c goes first.
        app.settle(spec("a"));
        assert_eq!(
            hashes(&app),
            [spec("c").template_hash(), spec("b").template_hash()]
        );
        app.settle(spec("a"));
        assert_eq!(app.previous.len(), 2, "settling again changes nothing");
        for i in 0..20 {
            app.settle(spec(&format!("n{i}")));
        }
        assert_eq!(app.previous.len(), PREVIOUS_TEMPLATES);
        assert_eq!(app.previous[0].template_hash(), spec("n18").template_hash());
    }
}
