//! The autoscaler's decision, as a pure function of a policy, what it
//! decided before and what it sees now (the orchestrator feeds it, one call
//! per app per sample period).
//!
//! The rule is Kubernetes HPA's ratio rule: for each target that is set,
//! `desired = ceil(current × observed / target)`, ignored while the ratio
//! is within the tolerance band (±10 %); the largest desired count wins,
//! clamped to `[min, max]`. On top of it:
//!
//! - **Scale-down stabilisation.** A scale-down goes only as low as the
//!   highest count recommended over the last `stabilization` window, so a
//!   dip does not remove instances a rebound needs.
//! - **Cooldowns.** No scale-up within `scale_up_cooldown` of the last
//!   change, no scale-down within `scale_down_cooldown` of it.
//! - **No flapping.** No change in the opposite direction of the last one
//!   within one `stabilization` window of it (property-tested): a
//!   scale-down after a scale-up, or a scale-up after a scale-down, waits
//!   the window out.
//! - **Paused during a rollout**, and holding when no target has a reading.
//! - **Scale to zero and back.** With `min = 0`, the ratio rule never goes
//!   below one instance; only `scale_to_zero_after` without a request
//!   takes the app to zero, and any request seen at zero wakes it to one
//!   (no cooldown holds a wake: someone is waiting).
//!
//! Every decision carries the rule applied and a line a person reads, for
//! the decision journal: "scaled 2 -> 4: rps 430/instance > target 200 for
//! 45 s".

use std::collections::VecDeque;

/// The app's `[autoscale]`, in milliseconds and plain numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    pub target_cpu_percent: Option<f64>,
    pub target_rps_per_instance: Option<f64>,
    pub target_p95_ms: Option<f64>,
    pub scale_up_cooldown_ms: i64,
    pub scale_down_cooldown_ms: i64,
    pub stabilization_ms: i64,
    /// With `min == 0`: an app without requests for this long goes to 0.
    pub scale_to_zero_after_ms: Option<i64>,
}

/// Ratios within this band of 1.0 change nothing.
pub const TOLERANCE: f64 = 0.1;

/// What the app looks like now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub at_ms: i64,
    /// Replicas serving now (the count the ratios scale).
    pub current: u32,
    /// Average CPU of the instances, in percent of what each reserves.
    pub cpu_percent: Option<f64>,
    pub rps_per_instance: Option<f64>,
    pub p95_ms: Option<f64>,
    /// How long the app has had no requests (`None`: unknown, or it had
    /// some within the last sample period).
    pub idle_ms: Option<i64>,
}

/// What the autoscaler remembers of an app between decisions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// The last change: when, and whether it was up.
    pub last_change: Option<(i64, bool)>,
    /// Recommendations within the stabilisation window: (at, count).
    pub recommendations: VecDeque<(i64, u32)>,
    /// Since when the recommendation has been above (or below) the current
    /// count, for the journal's "for 45 s".
    pub off_since: Option<(i64, bool)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Hold {
        reason: String,
    },
    Scale {
        from: u32,
        to: u32,
        rule: String,
        reason: String,
    },
}

/// The count one target asks for, and how it reads.
fn wanted(current: u32, observed: f64, target: f64, what: &str, unit: &str) -> (u32, String) {
    let ratio = observed / target;
    // One comparison decides both the count and how it reads; the band's
    // edges are inside it. (`(ratio - 1).abs() <= 0.1` and `ratio > 1.1`
    // disagree at 22/20 in floating point: it scaled while saying `~`.)
    let relation = if ratio > 1.0 + TOLERANCE {
        ">"
    } else if ratio < 1.0 - TOLERANCE {
        "<"
    } else {
        "~"
    };
    let count = if relation == "~" {
        current
    } else {
        (f64::from(current.max(1)) * ratio)
            .ceil()
            .clamp(0.0, f64::from(u32::MAX)) as u32
    };
    (
        count,
        format!("{what} {observed:.0}{unit} {relation} target {target:.0}"),
    )
}

/// Decides for one app. `rolling_out`: a rollout is in progress.
pub fn decide(
    policy: &Policy,
    state: &mut State,
    seen: &Observation,
    rolling_out: bool,
) -> Decision {
    let now = seen.at_ms;
    let current = seen.current;
    if rolling_out {
        return Decision::Hold {
            reason: "paused: a rollout is in progress".into(),
        };
    }
    if current == 0 {
        let demand = seen.rps_per_instance.unwrap_or(0.0);
        if demand > 0.0 {
            let to = policy.min.max(1);
            state.last_change = Some((now, true));
            state.off_since = None;
            state.recommendations.clear();
            return Decision::Scale {
                from: 0,
                to,
                rule: "wake on demand: requests while at zero start the minimum of one".into(),
                reason: format!("scaled 0 -> {to}: {demand:.1} requests/s arrived while at zero"),
            };
        }
        if policy.min == 0 {
            return Decision::Hold {
                reason: "at zero: no requests".into(),
            };
        }
    }
    if let (0, Some(after), Some(idle)) = (policy.min, policy.scale_to_zero_after_ms, seen.idle_ms)
        && current > 0
        && idle >= after
    {
        state.last_change = Some((now, false));
        state.off_since = None;
        state.recommendations.clear();
        return Decision::Scale {
            from: current,
            to: 0,
            rule: format!("scale to zero after {} s without a request", after / 1000),
            reason: format!(
                "scaled {current} -> 0: no requests for {} s (scale_to_zero_after {} s)",
                idle / 1000,
                after / 1000
            ),
        };
    }
    let mut asks = Vec::new();
    if let (Some(target), Some(observed)) = (policy.target_cpu_percent, seen.cpu_percent) {
        asks.push(wanted(current, observed, target, "cpu", "%"));
    }
    if let (Some(target), Some(observed)) = (policy.target_rps_per_instance, seen.rps_per_instance)
    {
        asks.push(wanted(current, observed, target, "rps", "/instance"));
    }
    if let (Some(target), Some(observed)) = (policy.target_p95_ms, seen.p95_ms) {
        asks.push(wanted(current, observed, target, "p95", " ms"));
    }
    let Some((raw, why)) = asks.into_iter().max_by_key(|(count, _)| *count) else {
        return Decision::Hold {
            reason: "no target has a reading yet".into(),
        };
    };
    // At least one instance: only idleness takes an app to zero.
    let floor = policy.min.max(1);
    let recommended = raw.clamp(floor, policy.max.max(floor));

    // Stabilisation: keep the window's recommendations; a scale-down goes
    // only as low as the highest of them.
    state.recommendations.push_back((now, recommended));
    while state
        .recommendations
        .front()
        .is_some_and(|(at, _)| *at < now - policy.stabilization_ms)
    {
        state.recommendations.pop_front();
    }
    let highest = state
        .recommendations
        .iter()
        .map(|(_, count)| *count)
        .max()
        .unwrap_or(recommended);
    let target = if recommended < current {
        highest.min(current)
    } else {
        recommended
    };
    let (bounded, bound_rule) = if current < policy.min {
        (policy.min, Some("below min"))
    } else if current > policy.max {
        (policy.max, Some("above max"))
    } else {
        (target, None)
    };

    if bounded == current {
        state.off_since = None;
        return Decision::Hold {
            reason: format!("held at {current}: {why}"),
        };
    }
    let up = bounded > current;
    let since = match state.off_since {
        Some((at, was_up)) if was_up == up => at,
        _ => {
            state.off_since = Some((now, up));
            now
        }
    };
    if bound_rule.is_none()
        && let Some((at, was_up)) = state.last_change
    {
        let cooldown = if up {
            policy.scale_up_cooldown_ms
        } else {
            policy.scale_down_cooldown_ms
        };
        if now - at < cooldown {
            return Decision::Hold {
                reason: format!(
                    "held at {current} ({why}): cooling down for {} s more",
                    (cooldown - (now - at) + 999) / 1000
                ),
            };
        }
        if was_up != up && now - at < policy.stabilization_ms {
            return Decision::Hold {
                reason: format!(
                    "held at {current} ({why}): the last change went the other way {} s ago, within the {} s stabilisation window",
                    (now - at) / 1000,
                    policy.stabilization_ms / 1000
                ),
            };
        }
    }

    state.last_change = Some((now, up));
    state.off_since = None;
    let held_for = (now - since) / 1000;
    let reason = match bound_rule {
        Some(rule) => format!(
            "scaled {current} -> {bounded}: {rule} ({})",
            if up { policy.min } else { policy.max }
        ),
        None if held_for > 0 => format!("scaled {current} -> {bounded}: {why} for {held_for} s"),
        None => format!("scaled {current} -> {bounded}: {why}"),
    };
    Decision::Scale {
        from: current,
        to: bounded,
        rule: format!(
            "ceil(current x observed / target) over every target, largest wins, within [{}, {}]; tolerance {:.0} %",
            policy.min,
            policy.max,
            TOLERANCE * 100.0
        ),
        reason,
    }
}

#[cfg(test)]
mod tests;
