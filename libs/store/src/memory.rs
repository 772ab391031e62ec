use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::{Expect, Store, StoreError, Versioned, check};

/// A store in memory, for unit tests and throwaway runs.
#[derive(Default)]
pub struct MemoryStore {
    rows: Mutex<BTreeMap<(String, String), Versioned>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError> {
        let rows = self.rows.lock().expect("store lock poisoned");
        Ok(rows.get(&(table.to_string(), key.to_string())).cloned())
    }

    async fn put(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        let mut rows = self.rows.lock().expect("store lock poisoned");
        let id = (table.to_string(), key.to_string());
        let found = rows.get(&id).map(|r| r.version);
        check(table, key, expect, found)?;
        let version = found.unwrap_or(0) + 1;
        rows.insert(id, Versioned { version, value });
        Ok(version)
    }

    async fn delete(&self, table: &str, key: &str, expect: Expect) -> Result<bool, StoreError> {
        let mut rows = self.rows.lock().expect("store lock poisoned");
        let id = (table.to_string(), key.to_string());
        let found = rows.get(&id).map(|r| r.version);
        check(table, key, expect, found)?;
        Ok(rows.remove(&id).is_some())
    }

    async fn list(
        &self,
        table: &str,
        prefix: &str,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        let rows = self.rows.lock().expect("store lock poisoned");
        Ok(rows
            .range((table.to_string(), prefix.to_string())..)
            .take_while(|((t, k), _)| t == table && k.starts_with(prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn passes_the_contract() {
        crate::contract::run(&super::MemoryStore::new()).await;
    }
}
