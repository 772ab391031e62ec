//! Instance lifecycle states, shared by the agent (which observes them) and
//! the orchestrator (which acts on them).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Placed on a node, not started yet.
    Pending,
    /// Running, no health check passed yet.
    Starting,
    Healthy,
    /// Was running but failed `unhealthy_after` checks in a row.
    Unhealthy,
    /// Leaving rotation, then stopped.
    Stopping,
    Stopped,
    /// The workload exited or could not start.
    Failed,
    /// The node no longer reports it.
    Lost,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Starting => "starting",
            InstanceState::Healthy => "healthy",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::Failed => "failed",
            InstanceState::Lost => "lost",
        }
    }

    /// Failed, lost and stopped instances hold nothing and will not recover.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            InstanceState::Stopped | InstanceState::Failed | InstanceState::Lost
        )
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
