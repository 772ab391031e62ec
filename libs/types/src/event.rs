//! Platform events: every state change is one. Delivery is at least once, so
//! every event carries a unique id that consumers deduplicate on.

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "app.created")]
    AppCreated,
    #[serde(rename = "app.updated")]
    AppUpdated,
    #[serde(rename = "app.scaled")]
    AppScaled,
    #[serde(rename = "app.deleted")]
    AppDeleted,
    #[serde(rename = "instance.scheduled")]
    InstanceScheduled,
    #[serde(rename = "instance.started")]
    InstanceStarted,
    #[serde(rename = "instance.healthy")]
    InstanceHealthy,
    #[serde(rename = "instance.unhealthy")]
    InstanceUnhealthy,
    #[serde(rename = "instance.stopped")]
    InstanceStopped,
    #[serde(rename = "instance.failed")]
    InstanceFailed,
    #[serde(rename = "rollout.started")]
    RolloutStarted,
    #[serde(rename = "rollout.progressed")]
    RolloutProgressed,
    #[serde(rename = "rollout.completed")]
    RolloutCompleted,
    #[serde(rename = "rollout.rolled_back")]
    RolloutRolledBack,
    #[serde(rename = "rollout.failed")]
    RolloutFailed,
    #[serde(rename = "node.registered")]
    NodeRegistered,
    #[serde(rename = "node.down")]
    NodeDown,
    #[serde(rename = "routes.updated")]
    RoutesUpdated,
    /// A router in front (Traefik) did not confirm in time that it stopped
    /// routing to removed instances; their drain went ahead anyway.
    #[serde(rename = "routes.unconfirmed")]
    RoutesUnconfirmed,
    #[serde(rename = "node.drain_started")]
    NodeDrainStarted,
    #[serde(rename = "node.drain_cancelled")]
    NodeDrainCancelled,
    #[serde(rename = "allocation.released")]
    AllocationReleased,
    #[serde(rename = "key.created")]
    KeyCreated,
    #[serde(rename = "key.revoked")]
    KeyRevoked,
    #[serde(rename = "key.signing_rotated")]
    SigningKeyRotated,
}

impl EventKind {
    pub const ALL: [EventKind; 25] = [
        EventKind::AppCreated,
        EventKind::AppUpdated,
        EventKind::AppScaled,
        EventKind::AppDeleted,
        EventKind::InstanceScheduled,
        EventKind::InstanceStarted,
        EventKind::InstanceHealthy,
        EventKind::InstanceUnhealthy,
        EventKind::InstanceStopped,
        EventKind::InstanceFailed,
        EventKind::RolloutStarted,
        EventKind::RolloutProgressed,
        EventKind::RolloutCompleted,
        EventKind::RolloutRolledBack,
        EventKind::RolloutFailed,
        EventKind::NodeRegistered,
        EventKind::NodeDown,
        EventKind::RoutesUpdated,
        EventKind::RoutesUnconfirmed,
        EventKind::NodeDrainStarted,
        EventKind::NodeDrainCancelled,
        EventKind::AllocationReleased,
        EventKind::KeyCreated,
        EventKind::KeyRevoked,
        EventKind::SigningKeyRotated,
    ];

    /// The dotted name, also the message routing key.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AppCreated => "app.created",
            EventKind::AppUpdated => "app.updated",
            EventKind::AppScaled => "app.scaled",
            EventKind::AppDeleted => "app.deleted",
            EventKind::InstanceScheduled => "instance.scheduled",
            EventKind::InstanceStarted => "instance.started",
            EventKind::InstanceHealthy => "instance.healthy",
            EventKind::InstanceUnhealthy => "instance.unhealthy",
            EventKind::InstanceStopped => "instance.stopped",
            EventKind::InstanceFailed => "instance.failed",
            EventKind::RolloutStarted => "rollout.started",
            EventKind::RolloutProgressed => "rollout.progressed",
            EventKind::RolloutCompleted => "rollout.completed",
            EventKind::RolloutRolledBack => "rollout.rolled_back",
            EventKind::RolloutFailed => "rollout.failed",
            EventKind::NodeRegistered => "node.registered",
            EventKind::NodeDown => "node.down",
            EventKind::RoutesUpdated => "routes.updated",
            EventKind::RoutesUnconfirmed => "routes.unconfirmed",
            EventKind::NodeDrainStarted => "node.drain_started",
            EventKind::NodeDrainCancelled => "node.drain_cancelled",
            EventKind::AllocationReleased => "allocation.released",
            EventKind::KeyCreated => "key.created",
            EventKind::KeyRevoked => "key.revoked",
            EventKind::SigningKeyRotated => "key.signing_rotated",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per event; the deduplication key.
    pub id: String,
    pub time_ms: UnixMillis,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Who asked for the change (key name, node id or service); empty when
    /// the platform acted by itself. The audit trail builds on it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub actor: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub actor_role: String,
}

impl Event {
    /// `id` must be unique; callers pass a random or derived one.
    pub fn new(id: String, time_ms: UnixMillis, kind: EventKind) -> Self {
        Event {
            id,
            time_ms,
            kind,
            app: String::new(),
            instance_id: String::new(),
            node_id: String::new(),
            message: String::new(),
            actor: String::new(),
            actor_role: String::new(),
        }
    }

    /// Records who caused the event.
    pub fn actor(mut self, subject: impl Into<String>, role: impl Into<String>) -> Self {
        self.actor = subject.into();
        self.actor_role = role.into();
        self
    }

    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = app.into();
        self
    }

    pub fn instance(mut self, instance_id: impl Into<String>) -> Self {
        self.instance_id = instance_id.into();
        self
    }

    pub fn node(mut self, node_id: impl Into<String>) -> Self {
        self.node_id = node_id.into();
        self
    }

    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
    }
}
