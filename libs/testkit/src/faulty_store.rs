//! A [`Store`] that fails chosen operations on chosen tables, once each time
//! it is armed, and passes everything else to a real store. Tests use it to
//! prove that a failure at any step is survived (an event redelivered, an
//! allocation released later), not to fake a store.

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
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        FaultyStore {
            inner,
            armed: Mutex::default(),
        }
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
        self.inner.fenced(fence, mutation).await
    }
}
