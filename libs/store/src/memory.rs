use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Expect, Page, Store, StoreError, Versioned, check, now_ms};

/// A store in memory, for unit tests and throwaway runs.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    rows: BTreeMap<(String, String), Row>,
    /// The last version handed out, store-wide: versions never repeat.
    last_version: u64,
}

struct Row {
    versioned: Versioned,
    expires_ms: Option<i64>,
}

impl Row {
    fn live(&self, now: i64) -> bool {
        self.expires_ms.is_none_or(|at| at > now)
    }
}

impl Inner {
    fn live_version(&self, id: &(String, String)) -> Option<u64> {
        let now = now_ms();
        self.rows
            .get(id)
            .filter(|r| r.live(now))
            .map(|r| r.versioned.version)
    }

    fn set(&mut self, id: (String, String), value: Vec<u8>, expires_ms: Option<i64>) -> u64 {
        self.last_version += 1;
        let version = self.last_version;
        self.rows.insert(
            id,
            Row {
                versioned: Versioned { version, value },
                expires_ms,
            },
        );
        version
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("store lock poisoned")
    }
}

fn id(table: &str, key: &str) -> (String, String) {
    (table.to_string(), key.to_string())
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError> {
        let now = now_ms();
        Ok(self
            .lock()
            .rows
            .get(&id(table, key))
            .filter(|r| r.live(now))
            .map(|r| r.versioned.clone()))
    }

    async fn put(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let id = id(table, key);
        check(table, key, expect, inner.live_version(&id))?;
        Ok(inner.set(id, value, None))
    }

    async fn write(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let expires_ms = ttl.map(|ttl| now_ms() + ttl.as_millis() as i64);
        self.lock().set(id(table, key), value, expires_ms);
        Ok(())
    }

    async fn delete(&self, table: &str, key: &str, version: u64) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let id = id(table, key);
        check(
            table,
            key,
            Expect::Version(version),
            inner.live_version(&id),
        )?;
        inner.rows.remove(&id);
        Ok(())
    }

    async fn remove(&self, table: &str, key: &str) -> Result<(), StoreError> {
        self.lock().rows.remove(&id(table, key));
        Ok(())
    }

    async fn scan(
        &self,
        table: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let now = now_ms();
        let inner = self.lock();
        let start = (table.to_string(), prefix.to_string());
        let mut rows: Vec<(String, Versioned)> = inner
            .rows
            .range(start..)
            .take_while(|((t, k), _)| t == table && k.starts_with(prefix))
            .filter(|((_, k), _)| after.is_none_or(|a| k.as_str() > a))
            .filter(|(_, r)| r.live(now))
            .take(limit.max(1) + 1)
            .map(|((_, k), r)| (k.clone(), r.versioned.clone()))
            .collect();
        let next = if rows.len() > limit.max(1) {
            rows.pop();
            rows.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        Ok(Page { rows, next })
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn passes_the_contract() {
        crate::contract::run(&super::MemoryStore::new(), "memory").await;
    }
}

#[cfg(test)]
mod update_tests {
    use std::sync::Arc;

    use crate::{Store, Table};

    #[tokio::test]
    async fn concurrent_updates_each_apply_once() {
        let store: Arc<dyn Store> = Arc::new(super::MemoryStore::new());
        let table: Table<u32> = Table::new(store, "counter");
        let bumps = (0..20).map(|_| {
            let table = table.clone();
            tokio::spawn(async move {
                table
                    .update("n", |n| Some(n.copied().unwrap_or(0) + 1))
                    .await
            })
        });
        for bump in bumps {
            bump.await.unwrap().unwrap();
        }
        assert_eq!(table.get("n").await.unwrap().map(|(_, n)| n), Some(20));
        // Returning None writes nothing.
        assert!(table.update("n", |_| None).await.unwrap().is_none());
    }
}
