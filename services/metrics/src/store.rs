//! The metrics store port and its embedded adapter.
//!
//! The port is deliberately plain: rows are written (an upsert by series,
//! start and writer) and read back by range; rollups are the service's
//! business (`Accumulator`), so both adapters store the same rows and one
//! contract suite (`contract::run`) holds them to the same behaviour.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use capstan_types::Error;

use crate::model::{Metric, Resolution, Row, SeriesKey};

/// What a read selects: one app's metric, all instances or one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub app: String,
    pub metric: Metric,
    pub instance: Option<String>,
}

impl Selector {
    /// Whether a row of `instance` is selected.
    pub fn admits(&self, instance: &str) -> bool {
        self.instance.as_deref().is_none_or(|want| want == instance)
    }

    /// The key of the selected series of `instance`.
    pub fn key(&self, instance: String) -> SeriesKey {
        SeriesKey {
            app: self.app.clone(),
            metric: self.metric,
            instance,
        }
    }
}

#[async_trait]
pub trait MetricsStore: Send + Sync {
    /// Stores `rows` at `resolution`; a row with the key, start and writer
    /// of a stored one replaces it. Rows expire after the resolution's
    /// retention, counted from their start.
    async fn write(&self, resolution: Resolution, rows: &[Row]) -> Result<(), Error>;

    /// The rows of `selector` with `from_ms <= start < to_ms`, ordered by
    /// start, then instance, then writer.
    async fn read(
        &self,
        resolution: Resolution,
        selector: &Selector,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Row>, Error>;
}

/// Rows of one (resolution, app, metric), by (start, instance, writer).
type Partition = BTreeMap<(i64, String, String), (String, crate::model::Rollup)>;

/// The embedded store: rows in memory, bounded twice: by the resolutions'
/// retention (from the newest start written), and by `max_rows` in all,
/// past which the oldest raw rows go first, then the oldest 1-minute rows
/// (the 1-hour rollups are what is left of a long history).
pub struct RingStore {
    max_rows: usize,
    inner: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    partitions: HashMap<(Resolution, String, Metric), Partition>,
    rows: usize,
    newest: i64,
    /// Writes since the last trim: retention is enforced every 256.
    writes: u32,
}

/// About 200 bytes a row: 1,000,000 rows is ~200 MiB at most.
pub const DEFAULT_MAX_ROWS: usize = 1_000_000;

impl RingStore {
    pub fn new(max_rows: usize) -> RingStore {
        RingStore {
            max_rows: max_rows.max(1),
            inner: Mutex::default(),
        }
    }

    pub fn rows(&self) -> usize {
        self.inner.lock().expect("ring lock poisoned").rows
    }
}

impl Default for RingStore {
    fn default() -> Self {
        RingStore::new(DEFAULT_MAX_ROWS)
    }
}

impl Ring {
    /// Drops what is past retention; then, over `max_rows`, the oldest
    /// rows of the finest resolution first, down to 90 % of `max_rows` in
    /// one pass (each partition gives up the same share of its oldest
    /// rows), so a full ring trims once per 10 % of writes, not per write.
    fn trim(&mut self, max_rows: usize) {
        let newest = self.newest;
        let mut removed = 0;
        for ((resolution, _, _), partition) in self.partitions.iter_mut() {
            let horizon = newest - resolution.retention_ms();
            let keep = partition.split_off(&(horizon, String::new(), String::new()));
            removed += partition.len();
            *partition = keep;
        }
        self.rows -= removed;
        let target = max_rows - max_rows / 10;
        for resolution in Resolution::ALL {
            if self.rows <= target {
                break;
            }
            let held: usize = self
                .partitions
                .iter()
                .filter(|((r, _, _), _)| *r == resolution)
                .map(|(_, p)| p.len())
                .sum();
            if held == 0 {
                continue;
            }
            let share = ((self.rows - target) as f64 / held as f64).min(1.0);
            for ((r, _, _), partition) in self.partitions.iter_mut() {
                if *r != resolution {
                    continue;
                }
                let take = ((partition.len() as f64 * share).ceil() as usize).min(partition.len());
                for _ in 0..take {
                    partition.pop_first();
                }
                self.rows -= take;
            }
        }
        self.partitions.retain(|_, p| !p.is_empty());
    }
}

#[async_trait]
impl MetricsStore for RingStore {
    async fn write(&self, resolution: Resolution, rows: &[Row]) -> Result<(), Error> {
        let mut ring = self.inner.lock().expect("ring lock poisoned");
        for row in rows {
            let partition = ring
                .partitions
                .entry((resolution, row.key.app.clone(), row.key.metric))
                .or_default();
            let replaced = partition.insert(
                (row.start_ms, row.key.instance.clone(), row.writer.clone()),
                (row.node.clone(), row.rollup.clone()),
            );
            if replaced.is_none() {
                ring.rows += 1;
            }
            ring.newest = ring.newest.max(row.start_ms);
        }
        ring.writes += 1;
        if ring.rows > self.max_rows || ring.writes >= 256 {
            ring.writes = 0;
            ring.trim(self.max_rows);
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
        if from_ms >= to_ms {
            return Ok(Vec::new());
        }
        let ring = self.inner.lock().expect("ring lock poisoned");
        let horizon = ring.newest - resolution.retention_ms();
        let Some(partition) =
            ring.partitions
                .get(&(resolution, selector.app.clone(), selector.metric))
        else {
            return Ok(Vec::new());
        };
        let from = (from_ms.max(horizon), String::new(), String::new());
        Ok(partition
            .range(from..)
            .take_while(|((start, _, _), _)| *start < to_ms)
            .filter(|((_, instance, _), _)| selector.admits(instance))
            .map(|((start, instance, writer), (node, rollup))| Row {
                key: selector.key(instance.clone()),
                start_ms: *start,
                writer: writer.clone(),
                node: node.clone(),
                rollup: rollup.clone(),
            })
            .collect())
    }
}
