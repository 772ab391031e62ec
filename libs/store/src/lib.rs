//! The state-store port: rows addressed by (table, key), each with a version
//! that every write bumps, and compare-and-set on that version.
//!
//! The shape is Scylla's lightweight transactions (`INSERT ... IF NOT EXISTS`,
//! `UPDATE ... IF version = ?`), so a Scylla adapter slots in beside SQLite.
//! Callers never read-modify-write without [`Expect`]: that is how two writers
//! never overwrite each other.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod contract;
mod memory;
mod sqlite;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub version: u64,
    pub value: Vec<u8>,
}

/// The precondition of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Write whatever is there.
    Any,
    /// Only if the row does not exist.
    Absent,
    /// Only if the row exists at exactly this version.
    Version(u64),
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
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Writes and returns the new version (1 for a new row).
    async fn put(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<u64, StoreError>;
    /// Returns whether a row was deleted. `Expect::Version` on a missing row is a conflict.
    async fn delete(&self, table: &str, key: &str, expect: Expect) -> Result<bool, StoreError>;
    /// Rows whose key starts with `prefix`, ordered by key.
    async fn list(&self, table: &str, prefix: &str)
    -> Result<Vec<(String, Versioned)>, StoreError>;
}

/// A typed view of one table, storing values as JSON.
pub struct Table<T> {
    store: Arc<dyn Store>,
    name: &'static str,
    _marker: std::marker::PhantomData<fn() -> T>,
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Table {
            store: self.store.clone(),
            name: self.name,
            _marker: std::marker::PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned> Table<T> {
    pub fn new(store: Arc<dyn Store>, name: &'static str) -> Self {
        Table {
            store,
            name,
            _marker: std::marker::PhantomData,
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<(u64, T)>, StoreError> {
        match self.store.get(self.name, key).await? {
            None => Ok(None),
            Some(row) => Ok(Some((row.version, self.decode(key, &row.value)?))),
        }
    }

    pub async fn put(&self, key: &str, value: &T, expect: Expect) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| StoreError::Backend(format!("encode {}/{key}: {e}", self.name)))?;
        self.store.put(self.name, key, bytes, expect).await
    }

    pub async fn delete(&self, key: &str, expect: Expect) -> Result<bool, StoreError> {
        self.store.delete(self.name, key, expect).await
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64, T)>, StoreError> {
        let rows = self.store.list(self.name, prefix).await?;
        rows.into_iter()
            .map(|(key, row)| {
                let value = self.decode(&key, &row.value)?;
                Ok((key, row.version, value))
            })
            .collect()
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

fn check(table: &str, key: &str, expect: Expect, found: Option<u64>) -> Result<(), StoreError> {
    let ok = match expect {
        Expect::Any => true,
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
