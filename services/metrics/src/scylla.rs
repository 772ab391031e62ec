//! The metrics store on ScyllaDB (`infra/scylla/002_metrics.cql`).
//!
//! - One partition per (app, metric, resolution, time bucket): an hour of
//!   raw samples, a day of 1-minute rollups, 30 days of 1-hour rollups. A
//!   range read walks the partitions it spans, each one ordered slice.
//! - Writes are plain upserts (idempotent, so the driver may retry them)
//!   with a TTL of the resolution's retention counted from the row's
//!   start; a row already past it is not written.
//! - LOCAL_ONE for ingest writes and reads: metrics are a hint for
//!   people and the autoscaler, not state; losing a sample to a node
//!   failure is acceptable, stalling ingest on a quorum is not.

use async_trait::async_trait;
use capstan_store::scylla::{backend, connect_session};
use capstan_types::Error;
use futures::TryStreamExt;
use scylla::client::session::Session;
use scylla::statement::Consistency;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use crate::model::{Resolution, Rollup, Row};
use crate::store::{MetricsStore, Selector};

pub const MIGRATIONS: &[(&str, &str)] = &[(
    "002_metrics",
    include_str!("../../../infra/scylla/002_metrics.cql"),
)];

/// Width of one partition of a resolution.
pub fn partition_width_ms(resolution: Resolution) -> i64 {
    match resolution {
        Resolution::Raw => 3_600_000,
        Resolution::Minute => 24 * 3_600_000,
        Resolution::Hour => 30 * 24 * 3_600_000,
    }
}

/// The partition buckets a range `[from, to)` spans, oldest first.
pub fn buckets(resolution: Resolution, from_ms: i64, to_ms: i64) -> Vec<i64> {
    if from_ms >= to_ms {
        return Vec::new();
    }
    let width = partition_width_ms(resolution);
    let first = from_ms.div_euclid(width) * width;
    (0..)
        .map(|i| first + i * width)
        .take_while(|start| *start < to_ms)
        .collect()
}

/// Seconds left of a row's retention at `now_ms` (`None`: already past).
pub fn ttl_seconds(resolution: Resolution, start_ms: i64, now_ms: i64) -> Option<i32> {
    let left = start_ms + resolution.retention_ms() - now_ms;
    (left > 0).then(|| i32::try_from((left + 999) / 1000).unwrap_or(i32::MAX))
}

pub struct Statements {
    pub insert: String,
    pub select: String,
}

impl Statements {
    pub fn new(ks: &str) -> Statements {
        let table = format!("{ks}.metric_rows");
        Statements {
            insert: format!(
                "INSERT INTO {table} (app, metric, resolution, bucket, start_ms, instance, writer, node, count, sum, min, max, buckets) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ),
            select: format!(
                "SELECT start_ms, instance, writer, node, count, sum, min, max, buckets FROM {table} WHERE app = ? AND metric = ? AND resolution = ? AND bucket = ? AND start_ms >= ? AND start_ms < ?"
            ),
        }
    }
}

pub struct ScyllaMetricsStore {
    session: Session,
    insert: PreparedStatement,
    select: PreparedStatement,
}

/// Rows per unlogged batch: each batch is one partition's rows, so it is
/// applied by one replica set in one round trip.
const BATCH_ROWS: usize = 100;

impl ScyllaMetricsStore {
    /// `scylla://HOST[:PORT][,...]/KEYSPACE[?rf=N]`: connects, applies the
    /// schema once, prepares the statements.
    pub async fn connect(url: &str) -> Result<ScyllaMetricsStore, Error> {
        let (session, url) = connect_session(url, MIGRATIONS)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let text = Statements::new(&url.keyspace);
        let prepare = |cql: String| {
            let session = &session;
            async move {
                let mut statement = session.prepare(cql.clone()).await.map_err(|e| {
                    Error::Unavailable(backend(&format!("prepare `{cql}`"), e).to_string())
                })?;
                statement.set_consistency(Consistency::LocalOne);
                statement.set_is_idempotent(true);
                Ok::<_, Error>(statement)
            }
        };
        Ok(ScyllaMetricsStore {
            insert: prepare(text.insert).await?,
            select: prepare(text.select).await?,
            session,
        })
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("scylla: {what}: {e}"))
}

type Values = (
    String,
    &'static str,
    &'static str,
    i64,
    i64,
    String,
    String,
    String,
    i64,
    f64,
    f64,
    f64,
    Vec<i64>,
    i32,
);

/// The insert's bound values for a row, or `None` when it is past retention.
pub fn insert_values(resolution: Resolution, row: &Row, now_ms: i64) -> Option<Values> {
    let ttl = ttl_seconds(resolution, row.start_ms, now_ms)?;
    let width = partition_width_ms(resolution);
    Some((
        row.key.app.clone(),
        row.key.metric.name(),
        resolution.name(),
        row.start_ms.div_euclid(width) * width,
        row.start_ms,
        row.key.instance.clone(),
        row.writer.clone(),
        row.node.clone(),
        i64::try_from(row.rollup.count).unwrap_or(i64::MAX),
        row.rollup.sum,
        row.rollup.min,
        row.rollup.max,
        row.rollup
            .buckets
            .iter()
            .map(|b| i64::try_from(*b).unwrap_or(i64::MAX))
            .collect(),
        ttl,
    ))
}

#[async_trait]
impl MetricsStore for ScyllaMetricsStore {
    async fn write(&self, resolution: Resolution, rows: &[Row]) -> Result<(), Error> {
        let now = capstan_server::now_ms();
        let mut by_partition: std::collections::BTreeMap<(String, &'static str, i64), Vec<Values>> =
            Default::default();
        for row in rows {
            if let Some(values) = insert_values(resolution, row, now) {
                by_partition
                    .entry((values.0.clone(), values.1, values.3))
                    .or_default()
                    .push(values);
            }
        }
        for values in by_partition.into_values() {
            for chunk in values.chunks(BATCH_ROWS) {
                let mut batch = Batch::new(BatchType::Unlogged);
                batch.set_consistency(Consistency::LocalOne);
                batch.set_is_idempotent(true);
                for _ in chunk {
                    batch.append_statement(self.insert.clone());
                }
                self.session
                    .batch(&batch, chunk)
                    .await
                    .map_err(|e| unavailable("write metric rows", e))?;
            }
        }
        Ok(())
    }

    async fn read(
        &self,
        resolution: Resolution,
        selector: &Selector,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Row>, Error> {
        let mut rows = Vec::new();
        for bucket in buckets(resolution, from_ms, to_ms) {
            let mut stream = self
                .session
                .execute_iter(
                    self.select.clone(),
                    (
                        &selector.app,
                        selector.metric.name(),
                        resolution.name(),
                        bucket,
                        from_ms,
                        to_ms,
                    ),
                )
                .await
                .map_err(|e| unavailable("read metric rows", e))?
                .rows_stream::<(
                    i64,
                    String,
                    String,
                    String,
                    i64,
                    f64,
                    f64,
                    f64,
                    Option<Vec<i64>>,
                )>()
                .map_err(|e| unavailable("read metric rows", e))?;
            while let Some((start_ms, instance, writer, node, count, sum, min, max, buckets)) =
                stream
                    .try_next()
                    .await
                    .map_err(|e| unavailable("read metric row", e))?
            {
                if !selector.admits(&instance) {
                    continue;
                }
                rows.push(Row {
                    key: selector.key(instance),
                    start_ms,
                    writer,
                    node,
                    rollup: Rollup {
                        count: u64::try_from(count).unwrap_or_default(),
                        sum,
                        min,
                        max,
                        buckets: buckets
                            .unwrap_or_default()
                            .into_iter()
                            .map(|b| u64::try_from(b).unwrap_or_default())
                            .collect(),
                    },
                });
            }
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Metric, SeriesKey};

    #[test]
    fn a_range_reads_every_partition_it_spans() {
        let hour = 3_600_000;
        assert_eq!(
            buckets(Resolution::Raw, hour + 5, 3 * hour),
            vec![hour, 2 * hour]
        );
        assert_eq!(buckets(Resolution::Raw, hour, hour + 1), vec![hour]);
        assert!(buckets(Resolution::Raw, 10, 10).is_empty());
        assert_eq!(buckets(Resolution::Minute, 0, 25 * hour).len(), 2);
    }

    #[test]
    fn the_ttl_counts_from_the_start_and_expired_rows_are_not_written() {
        let start = 1_000_000_000;
        let retention = Resolution::Raw.retention_ms();
        assert_eq!(
            ttl_seconds(Resolution::Raw, start, start),
            Some((retention / 1000) as i32)
        );
        assert_eq!(
            ttl_seconds(Resolution::Raw, start, start + retention - 1),
            Some(1)
        );
        assert_eq!(ttl_seconds(Resolution::Raw, start, start + retention), None);
    }

    #[test]
    fn statements_bind_every_column() {
        let text = Statements::new("capstan");
        assert_eq!(text.insert.matches('?').count(), 14);
        assert_eq!(text.select.matches('?').count(), 6);
        let cql = include_str!("../../../infra/scylla/002_metrics.cql");
        for column in [
            "app",
            "metric",
            "resolution",
            "bucket",
            "start_ms",
            "instance",
            "writer",
            "node",
            "count",
            "sum",
            "min",
            "max",
            "buckets",
        ] {
            assert!(
                cql.contains(&format!("    {column} ")),
                "schema lacks {column}"
            );
            assert!(text.insert.contains(column), "insert lacks {column}");
        }
        let row = Row {
            key: SeriesKey {
                app: "web".into(),
                metric: Metric::LatencyMs,
                instance: "i-1".into(),
            },
            start_ms: 7_200_123,
            writer: "w".into(),
            node: "n".into(),
            rollup: Rollup::of(2.0, vec![1, 2]),
        };
        let values = insert_values(Resolution::Raw, &row, 7_200_123).unwrap();
        assert_eq!(
            (values.1, values.2, values.3, values.4),
            ("latency_ms", "raw", 7_200_000, 7_200_123)
        );
        assert_eq!(values.12, vec![1, 2]);
    }
}
