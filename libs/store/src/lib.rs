//! The state-store port: rows addressed by (table, key), each with a
//! version.
//!
//! It is shaped for ScyllaDB, whose adapter slots in beside SQLite:
//! - [`Store::put`] and [`Store::delete`] are compare-and-set ([`Expect`]):
//!   lightweight transactions (`IF NOT EXISTS`, `IF version = ?`), for rows
//!   two writers can meet on;
//! - [`Store::write`] and [`Store::remove`] are plain, unconditional writes
//!   (no Paxos round), optionally expiring after a TTL, for rows with one
//!   writer (heartbeats, logs, leases' renewals);
//! - versions never repeat for a key, not even after a delete, so a stale
//!   `Expect::Version` can never match a new row (no ABA);
//! - [`Store::scan`] reads one page at a time, in key order.
//!
//! A row is either CAS-written or plainly written: mixing both on one row is
//! as undefined here as LWT and plain writes are in Scylla.
//!
//! **Fencing.** [`Store::fenced`] applies a write only while another row, the
//! [`Fence`], is still at a given version, atomically. A leader holds the
//! fence row's version from when it took office; a newer leader bumps it, and
//! from then on every write of the old one fails with [`StoreError::Fenced`].
//! [`FencedStore`] makes every write of a component fenced.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod contract;
mod fence;
mod memory;
pub mod scylla;
mod sqlite;

pub use fence::FencedStore;
pub use memory::MemoryStore;
pub use scylla::ScyllaStore;
pub use sqlite::SqliteStore;

/// Rows [`Store::list`] reads per page.
pub const PAGE: usize = 500;
/// Compare-and-set attempts [`Table::update`] makes before giving up.
pub const UPDATE_ATTEMPTS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub version: u64,
    pub value: Vec<u8>,
}

/// The precondition of a compare-and-set write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Only if the row does not exist.
    Absent,
    /// Only if the row exists at exactly this version.
    Version(u64),
}

/// The condition of a fenced write: row `table/key` is at `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub table: String,
    pub key: String,
    pub version: u64,
}

/// A write, as [`Store::fenced`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    Put {
        table: String,
        key: String,
        value: Vec<u8>,
        expect: Expect,
    },
    Write {
        table: String,
        key: String,
        value: Vec<u8>,
        ttl: Option<Duration>,
    },
    Delete {
        table: String,
        key: String,
        version: u64,
    },
    Remove {
        table: String,
        key: String,
    },
}

/// One page of a scan; `next` is the key to scan after for the next page.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    pub rows: Vec<(String, Versioned)>,
    pub next: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conflict on {table}/{key}: expected {expected:?}, found version {found:?}")]
    Conflict {
        table: String,
        key: String,
        expected: Expect,
        found: Option<u64>,
    },
    #[error("stored row {table}/{key} is corrupt: {reason}")]
    Corrupt {
        table: String,
        key: String,
        reason: String,
    },
    #[error("store backend failed: {0}")]
    Backend(String),
    #[error(
        "fenced off: {table}/{key} is at version {found:?}, not {version} (a newer leader took over)"
    )]
    Fenced {
        table: String,
        key: String,
        version: u64,
        found: Option<u64>,
    },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The row, unless it is missing or expired.
    async fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Compare-and-set write; returns the new version.
    async fn put(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<u64, StoreError>;
    /// Unconditional write, gone after `ttl` when given.
    async fn write(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError>;
    /// Compare-and-set delete: only a row at exactly `version`.
    async fn delete(&self, table: &str, key: &str, version: u64) -> Result<(), StoreError>;
    /// Unconditional delete; removing a missing row succeeds.
    async fn remove(&self, table: &str, key: &str) -> Result<(), StoreError>;
    /// Up to `limit` live rows whose key starts with `prefix` and sorts
    /// after `after`, in key order.
    async fn scan(
        &self,
        table: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// Applies `mutation` only while the row `fence` names is at its
    /// version, atomically; else [`StoreError::Fenced`] and nothing changes.
    /// Returns the new version of a `Put`.
    async fn fenced(&self, fence: &Fence, mutation: Mutation) -> Result<Option<u64>, StoreError>;

    /// Every live row under `prefix`, in key order, read a [`PAGE`] at a time.
    async fn list(
        &self,
        table: &str,
        prefix: &str,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.scan(table, prefix, after.as_deref(), PAGE).await?;
            out.extend(page.rows);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(out),
            }
        }
    }
}

/// A typed view of one table, storing values as JSON.
pub struct Table<T> {
    store: Arc<dyn Store>,
    name: std::borrow::Cow<'static, str>,
    _marker: std::marker::PhantomData<fn() -> T>,
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Table {
            store: self.store.clone(),
            name: self.name.clone(),
            _marker: std::marker::PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned> Table<T> {
    pub fn new(store: Arc<dyn Store>, name: &'static str) -> Self {
        Self::named(store, std::borrow::Cow::Borrowed(name))
    }

    /// A table whose name is made at run time (a time bucket's).
    pub fn named(store: Arc<dyn Store>, name: std::borrow::Cow<'static, str>) -> Self {
        Table {
            store,
            name,
            _marker: std::marker::PhantomData,
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<(u64, T)>, StoreError> {
        match self.store.get(&self.name, key).await? {
            None => Ok(None),
            Some(row) => Ok(Some((row.version, self.decode(key, &row.value)?))),
        }
    }

    pub async fn put(&self, key: &str, value: &T, expect: Expect) -> Result<u64, StoreError> {
        self.store
            .put(&self.name, key, self.encode(key, value)?, expect)
            .await
    }

    /// An unconditional write (see [`Store::write`]).
    pub async fn write(
        &self,
        key: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.store
            .write(&self.name, key, self.encode(key, value)?, ttl)
            .await
    }

    pub async fn delete(&self, key: &str, version: u64) -> Result<(), StoreError> {
        self.store.delete(&self.name, key, version).await
    }

    pub async fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.store.remove(&self.name, key).await
    }

    /// Read-modify-write with compare-and-set, retried on conflict: the one
    /// way to change a row two writers can meet on. `change` sees the
    /// current value (`None`: no row) and returns the new one, or `None` to
    /// write nothing. Returns what was written and its version.
    pub async fn update(
        &self,
        key: &str,
        mut change: impl FnMut(Option<&T>) -> Option<T>,
    ) -> Result<Option<(u64, T)>, StoreError> {
        let mut last = None;
        for _ in 0..UPDATE_ATTEMPTS {
            let current = self.get(key).await?;
            let Some(next) = change(current.as_ref().map(|(_, v)| v)) else {
                return Ok(None);
            };
            let expect = current.map_or(Expect::Absent, |(v, _)| Expect::Version(v));
            match self.put(key, &next, expect).await {
                Ok(version) => return Ok(Some((version, next))),
                Err(conflict @ StoreError::Conflict { .. }) => last = Some(conflict),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn encode(&self, key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(value)
            .map_err(|e| StoreError::Backend(format!("encode {}/{key}: {e}", self.name)))
    }

    /// Every row under `prefix` (see [`Store::list`]).
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64, T)>, StoreError> {
        let rows = self.store.list(&self.name, prefix).await?;
        rows.into_iter()
            .map(|(key, row)| {
                let value = self.decode(&key, &row.value)?;
                Ok((key, row.version, value))
            })
            .collect()
    }

    /// At most `limit` rows under `prefix` in key order, after `after`, and
    /// the key to continue after (see [`Store::scan`]).
    pub async fn page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, u64, T)>, Option<String>), StoreError> {
        let page = self.store.scan(&self.name, prefix, after, limit).await?;
        let rows = page
            .rows
            .into_iter()
            .map(|(key, row)| {
                let value = self.decode(&key, &row.value)?;
                Ok((key, row.version, value))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok((rows, page.next))
    }

    /// Just the values of `list`.
    pub async fn values(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        Ok(self
            .list(prefix)
            .await?
            .into_iter()
            .map(|(_, _, value)| value)
            .collect())
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            table: self.name.to_string(),
            key: key.to_string(),
            reason: e.to_string(),
        })
    }
}

fn check_fence(fence: &Fence, found: Option<u64>) -> Result<(), StoreError> {
    if found == Some(fence.version) {
        return Ok(());
    }
    Err(StoreError::Fenced {
        table: fence.table.clone(),
        key: fence.key.clone(),
        version: fence.version,
        found,
    })
}

fn check(table: &str, key: &str, expect: Expect, found: Option<u64>) -> Result<(), StoreError> {
    let ok = match expect {
        Expect::Absent => found.is_none(),
        Expect::Version(v) => found == Some(v),
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            table: table.to_string(),
            key: key.to_string(),
            expected: expect,
            found,
        })
    }
}

/// Milliseconds since the epoch, for TTL deadlines.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
