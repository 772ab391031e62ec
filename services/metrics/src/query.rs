//! Turning stored rows into points: which resolution a range reads, the
//! step, and the aggregate of each step. Pure.

use std::collections::BTreeMap;

use capstan_types::Error;

use crate::model::{Kind, Metric, Resolution, Rollup, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Avg,
    Max,
    Min,
    Sum,
    Rate,
    Quantile(u8),
}

impl Aggregate {
    /// Whether the aggregate means something for the metric's kind.
    pub fn check(self, metric: Metric) -> Result<(), Error> {
        let fits = match (self, metric.kind()) {
            (Aggregate::Quantile(_), kind) => kind == Kind::Histogram,
            (Aggregate::Sum | Aggregate::Rate, kind) => kind == Kind::Counter,
            (Aggregate::Avg | Aggregate::Max | Aggregate::Min, kind) => kind != Kind::Histogram,
        };
        if fits {
            Ok(())
        } else {
            let hint = match metric.kind() {
                Kind::Gauge => "avg, max or min",
                Kind::Counter => "sum, rate, avg, max or min",
                Kind::Histogram => "p50, p95 or p99",
            };
            Err(Error::invalid(
                "aggregate",
                format!("{self:?} does not apply to {}: use {hint}", metric.name()),
            ))
        }
    }

    pub fn value(self, rollup: &Rollup, step_ms: i64) -> Option<f64> {
        match self {
            Aggregate::Avg => rollup.avg(),
            Aggregate::Max => (rollup.count > 0).then_some(rollup.max),
            Aggregate::Min => (rollup.count > 0).then_some(rollup.min),
            Aggregate::Sum => (rollup.count > 0).then_some(rollup.sum),
            Aggregate::Rate => {
                (rollup.count > 0 && step_ms > 0).then(|| rollup.sum * 1000.0 / step_ms as f64)
            }
            Aggregate::Quantile(q) => rollup.quantile(f64::from(q) / 100.0),
        }
    }
}

/// The agents' and the proxy's default sampling period: raw steps are
/// multiples of it.
pub const SAMPLE_PERIOD_MS: i64 = 5_000;
/// At most this many points per series.
pub const MAX_POINTS: i64 = 1_000;
/// The widest range a query may span.
pub const MAX_RANGE_MS: i64 = 90 * 24 * 3_600_000;

/// The resolution and step a range `[since, until)` is read at, at `now`.
/// Raw samples for the last hour's ranges, 1-minute rollups up to three
/// days back, 1-hour rollups beyond; the step is what was asked, or about
/// 60 points, never finer than the resolution nor more than
/// [`MAX_POINTS`].
pub fn plan(since: i64, until: i64, step_ms: u64, now: i64) -> (Resolution, i64) {
    let range = until - since;
    let resolution = if range <= 3_600_000 && since >= now - Resolution::Raw.retention_ms() {
        Resolution::Raw
    } else if range <= 3 * 24 * 3_600_000 && since >= now - Resolution::Minute.retention_ms() {
        Resolution::Minute
    } else {
        Resolution::Hour
    };
    let asked = i64::try_from(step_ms).unwrap_or(i64::MAX);
    let auto = (range / 60).max(1);
    let step = if asked > 0 { asked } else { auto }
        .max(resolution.width_ms())
        .max((range + MAX_POINTS - 1) / MAX_POINTS)
        .max(1);
    // Raw samples each cover a sampling period: a step is a whole number
    // of them, or a rate would swing between empty and double steps.
    let step = match resolution {
        Resolution::Raw => (step + SAMPLE_PERIOD_MS - 1) / SAMPLE_PERIOD_MS * SAMPLE_PERIOD_MS,
        _ => step,
    };
    (resolution, step)
}

/// One series' points: rows merged per step (and per instance when
/// `by_instance`), each step's aggregate. Steps without readings are left
/// out.
pub fn points(
    rows: &[Row],
    since: i64,
    step: i64,
    aggregate: Aggregate,
    by_instance: bool,
) -> BTreeMap<String, Vec<(i64, f64, u64)>> {
    let mut merged: BTreeMap<(String, i64), Rollup> = BTreeMap::new();
    for row in rows {
        let index = (row.start_ms - since).div_euclid(step);
        let instance = if by_instance {
            row.key.instance.clone()
        } else {
            String::new()
        };
        merged
            .entry((instance, index))
            .and_modify(|r| r.merge(&row.rollup))
            .or_insert_with(|| row.rollup.clone());
    }
    let mut out: BTreeMap<String, Vec<(i64, f64, u64)>> = BTreeMap::new();
    for ((instance, index), rollup) in merged {
        if let Some(value) = aggregate.value(&rollup, step) {
            out.entry(instance)
                .or_default()
                .push((since + index * step, value, rollup.count));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SeriesKey;

    fn row(instance: &str, start_ms: i64, value: f64) -> Row {
        Row {
            key: SeriesKey {
                app: "web".into(),
                metric: Metric::Requests,
                instance: instance.into(),
            },
            start_ms,
            writer: String::new(),
            node: String::new(),
            rollup: Rollup::of(value, Vec::new()),
        }
    }

    #[test]
    fn ranges_pick_their_resolution() {
        let now = 100 * 24 * 3_600_000;
        assert_eq!(plan(now - 900_000, now, 0, now), (Resolution::Raw, 15_000));
        // Raw steps are whole sampling periods.
        assert_eq!(plan(now - 120_000, now, 0, now), (Resolution::Raw, 5_000));
        assert_eq!(plan(now - 600_000, now, 0, now), (Resolution::Raw, 10_000));
        assert_eq!(plan(now - 660_000, now, 0, now), (Resolution::Raw, 15_000));
        assert_eq!(plan(now - 86_400_000, now, 0, now).0, Resolution::Minute);
        assert_eq!(plan(now - 86_400_000, now, 0, now).1, 1_440_000);
        assert_eq!(plan(now - 30 * 86_400_000, now, 0, now).0, Resolution::Hour);
        // A finer step than the resolution is widened; so is one that
        // would make more than MAX_POINTS points.
        assert_eq!(plan(now - 86_400_000, now, 1_000, now).1, 86_400);
        assert_eq!(plan(now - 86_400_000 * 2, now, 1_000, now).1, 172_800);
    }

    #[test]
    fn steps_merge_instances_unless_asked_not_to() {
        let rows = [
            row("a", 0, 10.0),
            row("b", 1_000, 20.0),
            row("a", 10_000, 5.0),
        ];
        let app = points(&rows, 0, 10_000, Aggregate::Rate, false);
        assert_eq!(app[""], vec![(0, 3.0, 2), (10_000, 0.5, 1)]);
        let each = points(&rows, 0, 10_000, Aggregate::Sum, true);
        assert_eq!(each["a"], vec![(0, 10.0, 1), (10_000, 5.0, 1)]);
        assert_eq!(each["b"], vec![(0, 20.0, 1)]);
    }

    #[test]
    fn aggregates_must_fit_the_metric() {
        assert!(Aggregate::Quantile(95).check(Metric::LatencyMs).is_ok());
        assert!(Aggregate::Quantile(95).check(Metric::CpuPercent).is_err());
        assert!(Aggregate::Rate.check(Metric::Requests).is_ok());
        assert!(Aggregate::Rate.check(Metric::MemoryBytes).is_err());
        let error = Aggregate::Avg
            .check(Metric::LatencyMs)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("aggregate") && error.contains("p95"),
            "{error}"
        );
    }
}
