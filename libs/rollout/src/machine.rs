//! The rollout state machine of one app. A reconcile pass collects what
//! happened to the app's instances ([`Progress`]) and calls [`advance`],
//! which returns what to store and which events to publish. Pure and
//! idempotent: advancing with nothing new changes nothing.

use capstan_types::EventKind;

use crate::plan::{self, AppView, InstanceView};
use crate::records::{AppRecord, Rollout, RolloutState};

/// New-template instances that may fail before a rollout is abandoned.
pub const ROLLOUT_MAX_FAILURES: u32 = 3;
/// The longest restart backoff.
pub const BACKOFF_MAX_MS: i64 = 30_000;

/// What one reconcile pass saw happen to an app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Instances of the current template that failed or were lost.
    pub failures: u32,
    /// An instance became healthy and was routed.
    pub became_healthy: bool,
    /// Why placement fell short this pass (empty: it did not).
    pub placement_error: Option<String>,
}

/// What to do with the app record after a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing changed: write nothing, publish nothing.
    Unchanged,
    /// Store this record (compare-and-set), then publish these events.
    Write {
        app: Box<AppRecord>,
        events: Vec<(EventKind, String)>,
    },
    /// A deleted app whose last instance is gone: remove the record.
    Delete,
}

/// The planner's view of an app (`None`: instances of an app that no
/// longer exists, which are removed).
pub fn app_view(app: Option<&AppRecord>, now: i64) -> AppView {
    match app {
        Some(app) => AppView {
            replicas: app.spec.replicas,
            target_hash: app.spec_hash.clone(),
            max_surge: app.spec.update.max_surge,
            max_unavailable: app.spec.update.max_unavailable,
            deleting: app.deleting,
            may_start: now >= app.backoff.until_ms,
        },
        None => AppView {
            replicas: 0,
            target_hash: String::new(),
            max_surge: 0,
            max_unavailable: 0,
            deleting: true,
            may_start: false,
        },
    }
}

/// The restart backoff after `failures` failures in a row: 1 s, 2 s, 4 s …
/// up to [`BACKOFF_MAX_MS`].
pub fn backoff_ms(failures: u32) -> i64 {
    (500i64 << failures.min(16)).min(BACKOFF_MAX_MS)
}

/// Advances `app` given its instances after the pass and what the pass saw.
pub fn advance(app: &AppRecord, instances: &[InstanceView], progress: &Progress, now: i64) -> Next {
    if app.deleting {
        return if instances.is_empty() {
            Next::Delete
        } else {
            Next::Unchanged
        };
    }
    let mut next = app.clone();
    if progress.failures > 0 {
        next.backoff.failures = next.backoff.failures.saturating_add(progress.failures);
        next.backoff.until_ms = now + backoff_ms(next.backoff.failures);
    }
    if progress.became_healthy {
        next.backoff = Default::default();
    }
    if let Some(error) = &progress.placement_error {
        next.placement_error.clone_from(error);
    }
    let view = app_view(Some(&next), now);
    let mut events = Vec::new();
    if next.rollout.state == RolloutState::InProgress {
        if next.rollout.target_hash == next.spec_hash {
            next.rollout.failures = next.rollout.failures.saturating_add(progress.failures);
        }
        let updated = plan::updated(&view, instances);
        let stalled =
            now - next.rollout.progress_ms > next.spec.update.progress_deadline.as_millis() as i64;
        if next.rollout.failures >= ROLLOUT_MAX_FAILURES || stalled {
            let reason = if stalled {
                format!(
                    "no progress within {}",
                    capstan_types::duration::format(next.spec.update.progress_deadline)
                )
            } else {
                format!("{} new instances failed", next.rollout.failures)
            };
            match next
                .stable
                .clone()
                .filter(|s| s.template_hash() != next.spec_hash)
            {
                Some(stable) => {
                    let failed_hash = next.spec_hash.clone();
                    next.spec_hash = stable.template_hash();
                    next.spec = stable;
                    next.rollout = Rollout {
                        state: RolloutState::RolledBack,
                        message: format!(
                            "rollout of {failed_hash} failed ({reason}); rolled back to {}",
                            next.spec_hash
                        ),
                        ..Rollout::start(failed_hash, now)
                    };
                    events.push((EventKind::RolloutRolledBack, next.rollout.message.clone()));
                }
                None => {
                    next.rollout.state = RolloutState::Failed;
                    next.rollout.message =
                        format!("rollout of {} failed: {reason}", next.rollout.target_hash);
                    events.push((EventKind::RolloutFailed, next.rollout.message.clone()));
                }
            }
        } else if plan::rollout_done(&view, instances) {
            next.rollout.state = RolloutState::Completed;
            next.rollout.updated = updated;
            next.rollout.message = format!("{updated} of {} instances updated", next.spec.replicas);
            let spec = next.spec.clone();
            next.settle(spec);
            events.push((EventKind::RolloutCompleted, next.rollout.message.clone()));
        } else if updated > next.rollout.updated {
            next.rollout.updated = updated;
            next.rollout.progress_ms = now;
            next.rollout.message = format!("{updated} of {} instances updated", next.spec.replicas);
            events.push((EventKind::RolloutProgressed, next.rollout.message.clone()));
        }
    }
    if next == *app {
        return Next::Unchanged;
    }
    next.updated_ms = now;
    Next::Write {
        app: Box::new(next),
        events,
    }
}

#[cfg(test)]
mod tests;
