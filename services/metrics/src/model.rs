//! What the metrics service stores: metrics by name and kind, mergeable
//! rollups, rows keyed by series, bucket start and writer, and the three
//! resolutions with their retention. Pure.

use capstan_types::Error;
use serde::{Deserialize, Serialize};

/// Upper bounds (ms) of the latency histogram's buckets; one more bucket
/// counts what is above the last.
pub const LATENCY_BOUNDS_MS: [f64; 14] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0,
    30_000.0,
];
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Metric {
    CpuPercent,
    MemoryBytes,
    Restarts,
    Requests,
    Responses4xx,
    Responses5xx,
    LatencyMs,
    NetRxBytes,
    NetTxBytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A reading: averaged, maxed.
    Gauge,
    /// A delta over the sampling period: summed, rated.
    Counter,
    /// Bucket counts: quantiles.
    Histogram,
}

impl Metric {
    pub const ALL: [Metric; 9] = [
        Metric::CpuPercent,
        Metric::MemoryBytes,
        Metric::Restarts,
        Metric::Requests,
        Metric::Responses4xx,
        Metric::Responses5xx,
        Metric::LatencyMs,
        Metric::NetRxBytes,
        Metric::NetTxBytes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::CpuPercent => "cpu_percent",
            Metric::MemoryBytes => "memory_bytes",
            Metric::Restarts => "restarts",
            Metric::Requests => "requests",
            Metric::Responses4xx => "responses_4xx",
            Metric::Responses5xx => "responses_5xx",
            Metric::LatencyMs => "latency_ms",
            Metric::NetRxBytes => "net_rx_bytes",
            Metric::NetTxBytes => "net_tx_bytes",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Metric::CpuPercent | Metric::MemoryBytes => Kind::Gauge,
            Metric::Restarts
            | Metric::Requests
            | Metric::Responses4xx
            | Metric::Responses5xx
            | Metric::NetRxBytes
            | Metric::NetTxBytes => Kind::Counter,
            Metric::LatencyMs => Kind::Histogram,
        }
    }

    pub fn from_name(text: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == text)
    }

    pub fn parse(field: &str, text: &str) -> Result<Metric, Error> {
        Metric::ALL
            .into_iter()
            .find(|m| m.name() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
                Error::invalid(
                    field,
                    format!("unknown metric `{text}`; one of {}", names.join(", ")),
                )
            })
    }
}

/// Readings merged: enough to answer avg, min, max, sum, rate and
/// quantiles, and to merge again (rollups of rollups, writers, instances).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollup {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// Histogram bucket counts (empty for gauges and counters).
    pub buckets: Vec<u64>,
}

impl Rollup {
    /// No readings; merging into it takes the other side whole.
    pub fn empty() -> Rollup {
        Rollup {
            count: 0,
            sum: 0.0,
            min: 0.0,
            max: 0.0,
            buckets: Vec::new(),
        }
    }

    /// One reading (for a histogram: its sum and its bucket counts).
    pub fn of(value: f64, buckets: Vec<u64>) -> Rollup {
        Rollup {
            count: 1,
            sum: value,
            min: value,
            max: value,
            buckets,
        }
    }

    pub fn merge(&mut self, other: &Rollup) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
    }

    pub fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The `q` quantile of the histogram (linear within the bucket it
    /// falls in; the overflow bucket answers its lower bound).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut seen = 0u64;
        for (i, count) in self.buckets.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            if (seen + count) as f64 >= rank {
                let lower = if i == 0 {
                    0.0
                } else {
                    LATENCY_BOUNDS_MS[i - 1]
                };
                let Some(upper) = LATENCY_BOUNDS_MS.get(i) else {
                    return Some(lower);
                };
                let within = (rank - seen as f64) / *count as f64;
                return Some(lower + (upper - lower) * within);
            }
            seen += count;
        }
        LATENCY_BOUNDS_MS.last().copied()
    }
}

/// The index of the histogram bucket a latency falls in.
pub fn latency_bucket(ms: f64) -> usize {
    LATENCY_BOUNDS_MS
        .iter()
        .position(|bound| ms <= *bound)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub app: String,
    pub metric: Metric,
    pub instance: String,
}

/// One stored row: a series' readings from `start_ms` for the
/// resolution's width, as one writer saw them. Rows of one series and
/// start from different writers (replicas of the service) merge on read.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: SeriesKey,
    pub start_ms: i64,
    /// Empty for raw samples; the service replica for rollups.
    pub writer: String,
    pub node: String,
    pub rollup: Rollup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resolution {
    Raw,
    Minute,
    Hour,
}

impl Resolution {
    pub const ALL: [Resolution; 3] = [Resolution::Raw, Resolution::Minute, Resolution::Hour];

    pub fn name(self) -> &'static str {
        match self {
            Resolution::Raw => "raw",
            Resolution::Minute => "1m",
            Resolution::Hour => "1h",
        }
    }

    /// Width of one row (raw rows are one reading each).
    pub fn width_ms(self) -> i64 {
        match self {
            Resolution::Raw => 0,
            Resolution::Minute => 60_000,
            Resolution::Hour => 3_600_000,
        }
    }

    /// How long rows are kept (the Scylla adapter's TTL).
    pub fn retention_ms(self) -> i64 {
        match self {
            Resolution::Raw => 6 * 3_600_000,
            Resolution::Minute => 7 * 24 * 3_600_000,
            Resolution::Hour => 90 * 24 * 3_600_000,
        }
    }

    /// The start of the row a reading at `at_ms` belongs to.
    pub fn bucket(self, at_ms: i64) -> i64 {
        match self.width_ms() {
            0 => at_ms,
            width => at_ms.div_euclid(width) * width,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets() {
        let mut buckets = vec![0; LATENCY_BUCKETS];
        buckets[latency_bucket(3.0)] = 90; // (2, 5]
        buckets[latency_bucket(200.0)] = 10; // (100, 250]
        let rollup = Rollup::of(0.0, buckets);
        let p50 = rollup.quantile(0.5).unwrap();
        assert!((2.0..=5.0).contains(&p50), "p50 {p50}");
        let p95 = rollup.quantile(0.95).unwrap();
        assert!((100.0..=250.0).contains(&p95), "p95 {p95}");
        assert_eq!(Rollup::of(1.0, Vec::new()).quantile(0.5), None);
    }

    #[test]
    fn merging_keeps_count_sum_and_extremes() {
        let mut a = Rollup::of(10.0, Vec::new());
        a.merge(&Rollup::of(30.0, Vec::new()));
        a.merge(&Rollup {
            count: 0,
            sum: 0.0,
            min: 0.0,
            max: 0.0,
            buckets: vec![],
        });
        assert_eq!((a.count, a.sum, a.min, a.max), (2, 40.0, 10.0, 30.0));
        assert_eq!(a.avg(), Some(20.0));
    }

    #[test]
    fn an_unknown_metric_is_named() {
        let error = Metric::parse("samples[3].metric", "cpu").unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("samples[3].metric") && text.contains("cpu_percent"),
            "{text}"
        );
    }

    #[test]
    fn buckets_align_to_the_width() {
        assert_eq!(Resolution::Minute.bucket(125_000), 120_000);
        assert_eq!(Resolution::Hour.bucket(3_700_000), 3_600_000);
        assert_eq!(Resolution::Raw.bucket(125_001), 125_001);
    }
}
