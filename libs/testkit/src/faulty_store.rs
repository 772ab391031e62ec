//! A [`Store`] that fails chosen operations on chosen tables, once each time
//! it is armed, and passes everything else to a real store. Tests use it to
//! prove that a failure at any step is survived (an event redelivered, an
//! allocation released later), not to fake a store. It also counts the
//! gets and puts that reach each key, for tests of what a step reads and
//! how often it writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use capstan_store::{Expect, Fence, Mutation, Page, Store, StoreError, Versioned};

/// The operations a fault can hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    /// `put` with `Expect::Absent`.
    Insert,
    /// `put` with `Expect::Version`.
    Update,
    Write,
    Delete,
    Remove,
}

pub struct FaultyStore {
    inner: Arc<dyn Store>,
    armed: Mutex<Vec<(StoreOp, String)>>,
    /// Gets and puts passed to the inner store, by (op, table, key).
    counts: Mutex<HashMap<(&'static str, String, String), usize>>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        FaultyStore {
            inner,
            armed: Mutex::default(),
            counts: Mutex::default(),
        }
    }

    /// How many puts of `key` in `table` were passed on so far (whatever
    /// the inner store then answered).
    pub fn puts(&self, table: &str, key: &str) -> usize {
        self.count("put", table, key)
    }

    /// How many gets of `key` in `table` were passed on so far.
    pub fn gets(&self, table: &str, key: &str) -> usize {
        self.count("get", table, key)
    }

    fn count(&self, op: &'static str, table: &str, key: &str) -> usize {
        self.counts
            .lock()
            .expect("counts lock")
            .get(&(op, table.to_string(), key.to_string()))
            .copied()
            .unwrap_or(0)
    }

    fn counted(&self, op: &'static str, table: &str, key: &str) {
        *self
            .counts
            .lock()
            .expect("counts lock")
            .entry((op, table.to_string(), key.to_string()))
            .or_default() += 1;
    }

    /// The next `op` on `table` fails.
    pub fn arm(&self, op: StoreOp, table: &str) {
        self.armed
            .lock()
            .expect("faults lock")
            .push((op, table.to_string()));
    }

    fn check(&self, op: StoreOp, table: &str) -> Result<(), StoreError> {
        let mut armed = self.armed.lock().expect("faults lock");
        match armed.iter().position(|(o, t)| *o == op && t == table) {
            Some(at) => {
                armed.remove(at);
                Err(StoreError::Backend(format!(
                    "injected failure of {op:?} on {table}"
                )))
            }
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.counted("get", table, key);
        self.inner.get(table, key).await
    }

    async fn put(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        let op = match expect {
            Expect::Absent => StoreOp::Insert,
            Expect::Version(_) => StoreOp::Update,
        };
        self.check(op, table)?;
        self.counted("put", table, key);
        self.inner.put(table, key, value, expect).await
    }

    async fn write(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.check(StoreOp::Write, table)?;
        self.inner.write(table, key, value, ttl).await
    }

    async fn delete(&self, table: &str, key: &str, version: u64) -> Result<(), StoreError> {
        self.check(StoreOp::Delete, table)?;
        self.inner.delete(table, key, version).await
    }

    async fn remove(&self, table: &str, key: &str) -> Result<(), StoreError> {
        self.check(StoreOp::Remove, table)?;
        self.inner.remove(table, key).await
    }

    async fn scan(
        &self,
        table: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        self.inner.scan(table, prefix, after, limit).await
    }

    async fn fenced(&self, fence: &Fence, mutation: Mutation) -> Result<Option<u64>, StoreError> {
        let (op, table) = match &mutation {
            Mutation::Put {
                table,
                expect: Expect::Absent,
                ..
            } => (StoreOp::Insert, table),
            Mutation::Put { table, .. } => (StoreOp::Update, table),
            Mutation::Write { table, .. } => (StoreOp::Write, table),
            Mutation::Delete { table, .. } => (StoreOp::Delete, table),
            Mutation::Remove { table, .. } => (StoreOp::Remove, table),
        };
        self.check(op, table)?;
        if let Mutation::Put { table, key, .. } = &mutation {
            self.counted("put", table, key);
        }
        self.inner.fenced(fence, mutation).await
    }
}
