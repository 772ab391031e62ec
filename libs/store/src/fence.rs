//! A store whose every write is fenced: what a leader works through.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Expect, Fence, Mutation, Page, Store, StoreError, Versioned};

/// Reads pass through; every write is [`Store::fenced`] by one [`Fence`].
pub struct FencedStore {
    inner: Arc<dyn Store>,
    fence: Fence,
}

impl FencedStore {
    pub fn new(inner: Arc<dyn Store>, fence: Fence) -> Self {
        Self { inner, fence }
    }
}

#[async_trait]
impl Store for FencedStore {
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
        let mutation = Mutation::Put {
            table: table.into(),
            key: key.into(),
            value,
            expect,
        };
        self.inner
            .fenced(&self.fence, mutation)
            .await?
            .ok_or_else(|| StoreError::Backend("a fenced put returned no version".into()))
    }

    async fn write(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let mutation = Mutation::Write {
            table: table.into(),
            key: key.into(),
            value,
            ttl,
        };
        self.inner.fenced(&self.fence, mutation).await.map(drop)
    }

    async fn delete(&self, table: &str, key: &str, version: u64) -> Result<(), StoreError> {
        let mutation = Mutation::Delete {
            table: table.into(),
            key: key.into(),
            version,
        };
        self.inner.fenced(&self.fence, mutation).await.map(drop)
    }

    async fn remove(&self, table: &str, key: &str) -> Result<(), StoreError> {
        let mutation = Mutation::Remove {
            table: table.into(),
            key: key.into(),
        };
        self.inner.fenced(&self.fence, mutation).await.map(drop)
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

    /// One fence at a time: a write fenced twice is refused, not half-checked.
    async fn fenced(&self, fence: &Fence, _: Mutation) -> Result<Option<u64>, StoreError> {
        Err(StoreError::Backend(format!(
            "{}/{} is fenced already; cannot also fence by {}/{}",
            self.fence.table, self.fence.key, fence.table, fence.key
        )))
    }
}
