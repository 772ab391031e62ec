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
