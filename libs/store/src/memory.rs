use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    Expect, Fence, Mutation, Page, Store, StoreError, Versioned, check, check_fence, now_ms,
};

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

    /// Every write goes through here, fenced or not.
    fn apply(&mut self, mutation: Mutation) -> Result<Option<u64>, StoreError> {
        match mutation {
            Mutation::Put {
                table,
                key,
                value,
                expect,
            } => {
                let id = (table, key);
                check(&id.0, &id.1, expect, self.live_version(&id))?;
                Ok(Some(self.set(id, value, None)))
            }
            Mutation::Write {
                table,
                key,
                value,
                ttl,
            } => {
                let expires_ms = ttl.map(|ttl| now_ms() + ttl.as_millis() as i64);
                self.set((table, key), value, expires_ms);
                Ok(None)
            }
            Mutation::Delete {
                table,
                key,
                version,
            } => {
                let id = (table, key);
                check(
                    &id.0,
                    &id.1,
                    Expect::Version(version),
                    self.live_version(&id),
                )?;
                self.rows.remove(&id);
                Ok(None)
            }
            Mutation::Remove { table, key } => {
                self.rows.remove(&(table, key));
                Ok(None)
            }
        }
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
        let version = self.lock().apply(Mutation::Put {
            table: table.into(),
            key: key.into(),
            value,
            expect,
        })?;
        Ok(version.unwrap_or_default())
    }

    async fn write(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.lock()
            .apply(Mutation::Write {
                table: table.into(),
                key: key.into(),
                value,
                ttl,
            })
            .map(drop)
    }

    async fn delete(&self, table: &str, key: &str, version: u64) -> Result<(), StoreError> {
        self.lock()
            .apply(Mutation::Delete {
                table: table.into(),
                key: key.into(),
                version,
            })
            .map(drop)
    }

    async fn remove(&self, table: &str, key: &str) -> Result<(), StoreError> {
        self.lock()
            .apply(Mutation::Remove {
                table: table.into(),
                key: key.into(),
            })
            .map(drop)
    }

    async fn fenced(&self, fence: &Fence, mutation: Mutation) -> Result<Option<u64>, StoreError> {
        let mut inner = self.lock();
        let found = inner.live_version(&(fence.table.clone(), fence.key.clone()));
        check_fence(fence, found)?;
        inner.apply(mutation)
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
        crate::contract::run(std::sync::Arc::new(super::MemoryStore::new()), "memory").await;
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
