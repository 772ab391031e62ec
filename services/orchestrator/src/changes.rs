//! What changed since the reconciler's last pass: the apps and nodes that
//! events (and this replica's own API calls) named. They are hints, never
//! the truth: a pass re-reads what they name, a lost hint is caught by the
//! next full sweep, and a hint repeated (events are at-least-once) only
//! marks a name that is already marked.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use capstan_types::{Event, EventKind};
use tokio::sync::Notify;

/// More names than this pending at once, and the next pass is a full sweep
/// instead: the sets stay bounded whatever the event rate.
const MAX_PENDING: usize = 50_000;

#[derive(Default)]
pub struct Changes {
    pending: Mutex<Pending>,
    notify: Notify,
}

/// The names marked since the last [`Changes::take`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    pub apps: HashSet<String>,
    pub nodes: HashSet<String>,
    /// A node joined, went down or changed its drain: re-read the node list.
    pub node_list: bool,
    /// Too much to track name by name: look at everything.
    pub everything: bool,
}

impl Changes {
    pub fn new() -> Arc<Changes> {
        Arc::new(Changes::default())
    }

    /// `app`'s record changed: its next pass looks at it.
    pub fn app(&self, app: &str) {
        self.mark(|pending| {
            pending.apps.insert(app.to_string());
        });
    }

    /// What `node` runs may have changed: its next pass asks it.
    pub fn node(&self, node: &str) {
        self.mark(|pending| {
            pending.nodes.insert(node.to_string());
        });
    }

    /// Marks the app and node an event names. Events about neither (audit)
    /// and those about routes (the reconciler's own `routes.updated` after
    /// a pass, which changes no record) wake nothing.
    pub fn event(&self, event: &Event) {
        if matches!(
            event.kind,
            EventKind::RoutesUpdated | EventKind::RoutesUnconfirmed
        ) {
            return;
        }
        let node_list = matches!(
            event.kind,
            EventKind::NodeRegistered
                | EventKind::NodeDown
                | EventKind::NodeDrainStarted
                | EventKind::NodeDrainCancelled
        );
        if event.app.is_empty() && event.node_id.is_empty() && !node_list {
            return;
        }
        self.mark(|pending| {
            if !event.app.is_empty() {
                pending.apps.insert(event.app.clone());
            }
            if !event.node_id.is_empty() {
                pending.nodes.insert(event.node_id.clone());
            }
            pending.node_list |= node_list;
        });
    }

    /// Everything marked so far, leaving nothing marked.
    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().expect("changes lock poisoned"))
    }

    /// Returns once something was marked since the last time it returned
    /// (at once if something was marked while nobody waited).
    pub async fn marked(&self) {
        self.notify.notified().await;
    }

    fn mark(&self, change: impl FnOnce(&mut Pending)) {
        {
            let mut pending = self.pending.lock().expect("changes lock poisoned");
            if !pending.everything {
                change(&mut pending);
                if pending.apps.len() + pending.nodes.len() > MAX_PENDING {
                    *pending = Pending {
                        everything: true,
                        ..Pending::default()
                    };
                }
            }
        }
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, app: &str, node: &str) -> Event {
        Event::new("ev-1".into(), 0, kind).app(app).node(node)
    }

    #[test]
    fn an_event_marks_its_app_and_node_and_take_clears_them() {
        let changes = Changes::new();
        changes.event(&event(EventKind::InstanceHealthy, "web", "node-1"));
        changes.event(&event(EventKind::InstanceHealthy, "web", "node-1"));
        changes.app("api");
        let pending = changes.take();
        assert_eq!(
            pending.apps,
            HashSet::from(["web".to_string(), "api".to_string()])
        );
        assert_eq!(pending.nodes, HashSet::from(["node-1".to_string()]));
        assert!(!pending.node_list && !pending.everything);
        assert_eq!(changes.take(), Pending::default());
    }

    #[test]
    fn node_events_ask_for_the_node_list_and_unnamed_events_mark_nothing() {
        let changes = Changes::new();
        changes.event(&Event::new("ev-1".into(), 0, EventKind::RoutesUpdated));
        assert_eq!(changes.take(), Pending::default());
        changes.event(&event(EventKind::RoutesUpdated, "web", ""));
        assert_eq!(
            changes.take(),
            Pending::default(),
            "the reconciler's own routes.updated after a pass starts no other pass"
        );
        changes.event(&event(EventKind::NodeDown, "", "node-2"));
        let pending = changes.take();
        assert!(pending.node_list);
        assert_eq!(pending.nodes, HashSet::from(["node-2".to_string()]));
    }

    #[test]
    fn too_many_names_turn_into_one_full_sweep() {
        let changes = Changes::new();
        for i in 0..=MAX_PENDING {
            changes.app(&format!("app-{i}"));
        }
        let pending = changes.take();
        assert!(pending.everything);
        assert!(pending.apps.is_empty(), "the names are dropped, not kept");
    }

    #[tokio::test]
    async fn a_mark_while_nobody_waits_is_not_lost() {
        let changes = Changes::new();
        changes.app("web");
        tokio::time::timeout(std::time::Duration::from_secs(5), changes.marked())
            .await
            .expect("the mark made before the wait wakes it");
    }
}
