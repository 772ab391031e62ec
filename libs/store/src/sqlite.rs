use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use crate::{Expect, Store, StoreError, Versioned, check};

/// The embedded adapter: one SQLite file in the data dir, WAL mode.
///
/// Each call runs on the blocking pool and holds the connection for one
/// transaction, so a compare-and-set is atomic.
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(backend)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS rows (
                 tbl TEXT NOT NULL,
                 key TEXT NOT NULL,
                 version INTEGER NOT NULL,
                 value BLOB NOT NULL,
                 PRIMARY KEY (tbl, key)
             ) WITHOUT ROWID;",
        )
        .map_err(backend)?;
        restrict_to_owner(path)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| StoreError::Backend("connection lock poisoned".into()))?;
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn current_version(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    key: &str,
) -> Result<Option<u64>, StoreError> {
    tx.query_row(
        "SELECT version FROM rows WHERE tbl = ?1 AND key = ?2",
        params![table, key],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|v| v.map(|v| v as u64))
    .map_err(backend)
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError> {
        let (table, key) = (table.to_string(), key.to_string());
        self.with_conn(move |conn| {
            conn.query_row(
                "SELECT version, value FROM rows WHERE tbl = ?1 AND key = ?2",
                params![table, key],
                |r| {
                    Ok(Versioned {
                        version: r.get::<_, i64>(0)? as u64,
                        value: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn put(
        &self,
        table: &str,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        let (table, key) = (table.to_string(), key.to_string());
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let found = current_version(&tx, &table, &key)?;
            check(&table, &key, expect, found)?;
            let version = found.unwrap_or(0) + 1;
            tx.execute(
                "INSERT INTO rows (tbl, key, version, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tbl, key) DO UPDATE SET version = excluded.version, value = excluded.value",
                params![table, key, version as i64, value],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(version)
        })
        .await
    }

    async fn delete(&self, table: &str, key: &str, expect: Expect) -> Result<bool, StoreError> {
        let (table, key) = (table.to_string(), key.to_string());
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let found = current_version(&tx, &table, &key)?;
            check(&table, &key, expect, found)?;
            let deleted = tx
                .execute(
                    "DELETE FROM rows WHERE tbl = ?1 AND key = ?2",
                    params![table, key],
                )
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn list(
        &self,
        table: &str,
        prefix: &str,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        let (table, prefix) = (table.to_string(), prefix.to_string());
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT key, version, value FROM rows WHERE tbl = ?1 AND key >= ?2 ORDER BY key")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![table, prefix], |r| {
                    Ok((r.get::<_, String>(0)?, Versioned { version: r.get::<_, i64>(1)? as u64, value: r.get(2)? }))
                })
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (key, value) = row.map_err(backend)?;
                if !key.starts_with(&prefix) {
                    break;
                }
                out.push((key, value));
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        crate::contract::run(&store).await;
    }

    #[tokio::test]
    async fn rows_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        SqliteStore::open(&path)
            .unwrap()
            .put("t", "k", b"v".to_vec(), Expect::Absent)
            .await
            .unwrap();
        let row = SqliteStore::open(&path)
            .unwrap()
            .get("t", "k")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            row,
            Versioned {
                version: 1,
                value: b"v".to_vec()
            }
        );
    }
}

/// The database and its WAL files hold apps' env values: 0600 on every
/// open, whatever the umask made them.
fn restrict_to_owner(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        files.push(name.into());
    }
    for file in files {
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::Backend(format!(
                    "chmod {}: {e}",
                    file.display()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod permission_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_database_is_owner_only_even_when_it_was_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(SqliteStore::open(&path).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _store = SqliteStore::open(&path).unwrap();
        for file in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let mode = file.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", file.path().display());
        }
    }
}
