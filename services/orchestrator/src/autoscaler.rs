//! The autoscaler: every sampling period, for each app with
//! `[autoscale]`, read what the metrics service saw over the last two
//! periods, ask the pure rule (`capstan_rollout::autoscale::decide`) and,
//! when it says so, change the app's replica count (compare-and-set, like
//! `ScaleApp`) and journal why. The reconciler then does the rest.
//!
//! It runs in the reconciler's leader only, writing through its fenced
//! store. What it remembers between decisions (the stabilisation window,
//! the last change) lives in that leader's memory: a new leader starts
//! with a window holding the current count, so it scales nothing down for
//! one stabilisation window.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use capstan_proto::v1::metrics_client::MetricsClient;
use capstan_proto::v1::{Aggregate, QueryRequest};
use capstan_rollout::autoscale::{Decision, Observation, Policy, State, decide};
use capstan_rollout::records::{AppRecord, RolloutState};
use capstan_server::{Platform, new_id, now_ms};
use capstan_store::Table;
use capstan_types::spec::AutoscaleSpec;
use capstan_types::{Error, Event, EventKind};
use tokio_util::sync::CancellationToken;

use crate::changes::Changes;
use crate::journal::{Journal, JournalEntry};

/// Readings are taken this long before now: the last period's samples may
/// still be on their way. Reporters stamp a sample when they send it (after
/// collecting it) and send at once, so this covers one ingest round trip,
/// not a period: a longer settle only delays every reaction by as much.
const SETTLE_MS: i64 = 250;

pub struct Autoscaler {
    platform: Platform,
    apps: Table<AppRecord>,
    journal: Journal,
    every: Duration,
    states: HashMap<String, State>,
}

pub fn policy_of(spec: &AutoscaleSpec) -> Policy {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    Policy {
        min: spec.min,
        max: spec.max,
        target_cpu_percent: spec.target_cpu_percent.map(f64::from),
        target_rps_per_instance: spec.target_rps_per_instance.map(f64::from),
        target_p95_ms: spec.target_p95_ms.map(f64::from),
        scale_up_cooldown_ms: ms(spec.scale_up_cooldown),
        scale_down_cooldown_ms: ms(spec.scale_down_cooldown),
        stabilization_ms: ms(spec.stabilization),
        scale_to_zero_after_ms: spec.scale_to_zero_after.map(ms),
    }
}

impl Autoscaler {
    pub fn new(platform: Platform, every: Duration) -> Autoscaler {
        Autoscaler {
            apps: Table::new(platform.store.clone(), crate::records::APPS),
            journal: Journal::new(platform.store.clone()),
            platform,
            every,
            states: HashMap::new(),
        }
    }

    pub async fn run(mut self, changes: Arc<Changes>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.pass(&changes).await {
                tracing::debug!("autoscaler pass skipped: {e}");
            }
        }
    }

    /// One decision per autoscaled app.
    async fn pass(&mut self, changes: &Changes) -> Result<(), Error> {
        let apps = self.apps.list("").await.map_err(Error::internal)?;
        let autoscaled: Vec<AppRecord> = apps
            .into_iter()
            .map(|(_, _, app)| app)
            .filter(|app| app.spec.autoscale.is_some() && !app.deleting)
            .collect();
        self.states
            .retain(|name, _| autoscaled.iter().any(|a| a.spec.name.as_str() == name));
        if autoscaled.is_empty() {
            return Ok(());
        }
        let mut metrics = MetricsClient::new(self.platform.client("metrics").await?);
        for app in autoscaled {
            if app.autoscale_override.is_some() {
                continue;
            }
            let Some(spec) = &app.spec.autoscale else {
                continue;
            };
            let policy = policy_of(spec);
            let now = now_ms();
            let seen = self.observe(&mut metrics, &app, &policy, now).await?;
            let rolling_out = app.rollout.state == RolloutState::InProgress;
            let state = self
                .states
                .entry(app.spec.name.to_string())
                .or_insert_with(|| State {
                    recommendations: [(now, app.spec.replicas)].into(),
                    ..State::default()
                });
            let decision = decide(&policy, state, &seen, rolling_out);
            let counter = &capstan_server::metrics::metrics().autoscale_decisions;
            let Decision::Scale {
                from,
                to,
                rule,
                reason,
            } = decision
            else {
                counter.with_label_values(&["hold"]).inc();
                continue;
            };
            counter
                .with_label_values(&[if to > from { "up" } else { "down" }])
                .inc();
            let name = app.spec.name.to_string();
            let applied = self
                .apps
                .update(&name, |current| {
                    let current = current?;
                    // Only from what was decided on: a deploy, a manual
                    // scale or a deletion in between wins.
                    if current.deleting
                        || current.autoscale_override.is_some()
                        || current.spec.replicas != from
                        || current.spec.autoscale.is_none()
                    {
                        return None;
                    }
                    let mut next = current.clone();
                    next.spec.replicas = to;
                    next.updated_ms = now_ms();
                    Some(next)
                })
                .await
                .map_err(Error::internal)?;
            if applied.is_none() {
                continue;
            }
            self.platform
                .emit(
                    Event::new(new_id("ev"), now_ms(), EventKind::AppScaled)
                        .app(&name)
                        .message(format!("{from} → {to} replicas: {reason}"))
                        .actor("autoscaler", "service"),
                )
                .await;
            let mut entry = JournalEntry::new(&name, now, "autoscale")
                .input("replicas", from)
                .rule(rule)
                .result(format!("{from} -> {to}"))
                .reason(reason);
            for (key, value, target) in [
                ("cpu_percent", seen.cpu_percent, spec.target_cpu_percent),
                (
                    "rps_per_instance",
                    seen.rps_per_instance,
                    spec.target_rps_per_instance,
                ),
                ("p95_ms", seen.p95_ms, spec.target_p95_ms),
            ] {
                if let (Some(value), Some(target)) = (value, target) {
                    entry = entry
                        .input(key, format!("{value:.1}"))
                        .input(&format!("target_{key}"), target);
                }
            }
            if let Some(idle) = seen.idle_ms {
                entry = entry.input("idle_ms", idle);
            }
            self.journal.record(entry).await;
            changes.app(&name);
        }
        Ok(())
    }

    /// What the app looked like over the last two sampling periods.
    async fn observe(
        &self,
        metrics: &mut MetricsClient<capstan_authn::Authed>,
        app: &AppRecord,
        policy: &Policy,
        now: i64,
    ) -> Result<Observation, Error> {
        let window = 2 * i64::try_from(self.every.as_millis()).unwrap_or(10_000);
        let until = now - SETTLE_MS;
        let since = until - window;
        let name = app.spec.name.to_string();
        let mut query = async |metric: &str, aggregate: Aggregate, since: i64, step: i64| {
            metrics
                .query(QueryRequest {
                    app: name.clone(),
                    instance_id: String::new(),
                    metric: metric.to_string(),
                    aggregate: aggregate as i32,
                    since_ms: since,
                    until_ms: until,
                    step_ms: step as u64,
                    by_instance: false,
                })
                .await
                .map(|r| {
                    r.into_inner()
                        .series
                        .into_iter()
                        .flat_map(|s| s.points)
                        .collect::<Vec<_>>()
                })
                .map_err(capstan_proto::into_error)
        };
        // One point over the whole window (a step wider than it).
        let one = 2 * window;
        let requests = query("requests", Aggregate::Sum, since, one).await?;
        let rps = (!requests.is_empty())
            .then(|| requests.iter().map(|p| p.value).sum::<f64>() * 1000.0 / window as f64);
        let current = app.spec.replicas;
        let cpu = query("cpu_percent", Aggregate::Avg, since, one).await?;
        let cpu_percent = (!cpu.is_empty()).then(|| {
            let count: u64 = cpu.iter().map(|p| p.count).sum();
            cpu.iter().map(|p| p.value * p.count as f64).sum::<f64>() / count.max(1) as f64
        });
        let p95_ms = query("latency_ms", Aggregate::P95, since, one)
            .await?
            .first()
            .map(|p| p.value);
        let idle_ms = match policy.scale_to_zero_after_ms {
            Some(after) if policy.min == 0 && current > 0 => {
                let every = window / 2;
                let from = until - after - window;
                let points = query("requests", Aggregate::Sum, from, every).await?;
                if points.is_empty() {
                    // No traffic reports at all: no router says it is idle.
                    None
                } else {
                    let last_request = points
                        .iter()
                        .filter(|p| p.value > 0.0)
                        .map(|p| p.at_ms + every)
                        .max()
                        .unwrap_or(from);
                    let since_change = self
                        .states
                        .get(app.spec.name.as_str())
                        .and_then(|s| s.last_change.map(|(at, _)| at))
                        .unwrap_or(i64::MIN);
                    // Quiet since the last request, the last deploy or the
                    // last change of the count, whichever came last.
                    let quiet_since = last_request.max(app.rollout.started_ms).max(since_change);
                    Some((until - quiet_since).max(0))
                }
            }
            _ => None,
        };
        Ok(Observation {
            at_ms: now,
            current,
            cpu_percent,
            rps_per_instance: rps.map(|r| r / f64::from(current.max(1))),
            p95_ms,
            idle_ms,
        })
    }
}
