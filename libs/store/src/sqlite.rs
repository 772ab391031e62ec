use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    Expect, Fence, Mutation, Page, Store, StoreError, Versioned, check, check_fence, now_ms,
};

/// The embedded adapter: one SQLite file in the data dir, WAL mode.
///
/// Each read runs on the blocking pool and holds the connection for one
/// statement. Writes are committed in groups: a write joins the queue, and
/// one writer on the blocking pool applies everything queued in one
/// transaction, each write in its own savepoint, so a compare-and-set that
/// fails undoes only itself. A write returns once its group committed. One
/// commit for many writes is what lets a deploy of thousands of instances
/// write at the rate it places (ARCHITECTURE.md, "Control plane at scale").
/// Versions come from one store-wide sequence, so a key deleted and created
/// again never reuses one.
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    writes: Arc<Mutex<Writes>>,
}

/// Writes waiting for the writer, and whether it is running.
#[derive(Default)]
struct Writes {
    queue: Vec<Job>,
    writing: bool,
}

/// One queued write and where its outcome goes.
struct Job {
    fence: Option<Fence>,
    mutation: Mutation,
    done: tokio::sync::oneshot::Sender<Result<Option<u64>, StoreError>>,
}

/// At most this many writes share a transaction.
const GROUP_MAX: usize = 512;

/// How long opening may keep meeting a busy database.
const OPEN_BUSY_FOR: std::time::Duration = std::time::Duration::from_secs(10);

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(e, _)
            if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Only rows that have not expired.
const LIVE: &str = "(expires_ms IS NULL OR expires_ms > :now)";

/// One row by key.
fn get_sql() -> String {
    format!("SELECT version, value FROM rows WHERE tbl = :tbl AND key = :key AND {LIVE}")
}

/// A table's rows in key order from `:from` (after it when
/// `strictly_after`). The table is written into the statement, not bound:
/// SQLite re-prepares a statement on its first step after a parameter it
/// planned with is bound again, and it plans `ORDER BY key` with the value
/// of `tbl = :tbl` (so does a bound `LIMIT`). Bound, every read parsed and
/// planned its statement anew. The rows come from the primary key in
/// order; the reader stops stepping once it has its page.
fn scan_sql(table: &str, strictly_after: bool) -> Result<String, StoreError> {
    let op = if strictly_after { ">" } else { ">=" };
    let table = sql_table_name(table)?;
    Ok(format!(
        "SELECT key, version, value FROM rows WHERE tbl = '{table}' AND key {op} :from AND {LIVE}
         ORDER BY key"
    ))
}

/// `table`, checked to be safe inside an SQL string literal. Tables are
/// named by code (`apps`, `instances`), never by users.
fn sql_table_name(table: &str) -> Result<&str, StoreError> {
    let fine = !table.is_empty()
        && table.len() <= 64
        && table.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        });
    if fine {
        Ok(table)
    } else {
        Err(StoreError::Backend(format!(
            "table name `{}` is not lowercase letters, digits, `_`, `-` or `.`",
            table.escape_debug()
        )))
    }
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // SQLite answers BUSY at once, without its busy handler, when
        // openers of a new file meet while one switches it to WAL: retry
        // the whole open for a while.
        let deadline = std::time::Instant::now() + OPEN_BUSY_FOR;
        let conn = loop {
            match Self::connect(path) {
                Err(e) if is_busy(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other.map_err(backend)?,
            }
        };
        restrict_to_owner(path)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            writes: Arc::default(),
        })
    }

    /// Opens `path` and brings its schema up to date.
    fn connect(path: &Path) -> Result<Connection, rusqlite::Error> {
        let mut conn = Connection::open(path)?;
        // Every statement is prepared once and reused (`prepare_cached`):
        // parsing SQL was most of what a read cost.
        // Scans hold one statement per table (see `scan_sql`).
        conn.set_prepared_statement_cache_capacity(256);
        // The busy timeout first: services of one host open the file at
        // the same moment, and every step below may wait for another's.
        conn.execute_batch(
            "PRAGMA busy_timeout = 5000;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;",
        )?;
        // Schema and migrations in one IMMEDIATE transaction: concurrent
        // openers take turns, so each sees what the one before did.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS rows (
                 tbl TEXT NOT NULL,
                 key TEXT NOT NULL,
                 version INTEGER NOT NULL,
                 value BLOB NOT NULL,
                 PRIMARY KEY (tbl, key)
             ) WITHOUT ROWID;",
        )?;
        // Stores from before TTLs and the version sequence.
        let has_expiry = tx
            .prepare("SELECT 1 FROM pragma_table_info('rows') WHERE name = 'expires_ms'")
            .and_then(|mut s| s.exists([]))?;
        if !has_expiry {
            tx.execute_batch("ALTER TABLE rows ADD COLUMN expires_ms INTEGER;")?;
        }
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS version_seq (id INTEGER PRIMARY KEY CHECK (id = 0), last INTEGER NOT NULL);
             INSERT OR IGNORE INTO version_seq (id, last) SELECT 0, COALESCE(MAX(version), 0) FROM rows;",
        )?;
        tx.commit()?;
        Ok(conn)
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

impl SqliteStore {
    /// Every write goes through here: queued for the writer (started when
    /// none runs), answered once its group committed.
    async fn mutate(
        &self,
        fence: Option<Fence>,
        mutation: Mutation,
    ) -> Result<Option<u64>, StoreError> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let start = {
            let mut writes = self
                .writes
                .lock()
                .map_err(|_| StoreError::Backend("write queue lock poisoned".into()))?;
            writes.queue.push(Job {
                fence,
                mutation,
                done,
            });
            !std::mem::replace(&mut writes.writing, true)
        };
        if start {
            let (conn, writes) = (self.conn.clone(), self.writes.clone());
            tokio::task::spawn_blocking(move || write_queued(&conn, &writes));
        }
        outcome
            .await
            .map_err(|_| StoreError::Backend("the store's writer stopped".into()))?
    }
}

/// The writer: commits what is queued, group by group, until the queue is
/// empty.
fn write_queued(conn: &Mutex<Connection>, writes: &Mutex<Writes>) {
    loop {
        let group: Vec<Job> = {
            let Ok(mut writes) = writes.lock() else {
                return;
            };
            if writes.queue.is_empty() {
                writes.writing = false;
                return;
            }
            let take = writes.queue.len().min(GROUP_MAX);
            writes.queue.drain(..take).collect()
        };
        let (answers, work): (Vec<_>, Vec<_>) = group
            .into_iter()
            .map(|job| (job.done, (job.fence, job.mutation)))
            .unzip();
        let outcomes = match conn.lock() {
            Ok(mut conn) => commit_group(&mut conn, work),
            Err(_) => work
                .iter()
                .map(|_| Err(StoreError::Backend("connection lock poisoned".into())))
                .collect(),
        };
        for (done, outcome) in answers.into_iter().zip(outcomes) {
            // A caller that gave up no longer waits; its write stands.
            let _ = done.send(outcome);
        }
    }
}

/// One IMMEDIATE transaction (the write lock taken up front, so processes
/// sharing the file serialize) for the whole group, each write in a
/// savepoint with its fence checked first. If the commit fails, every write
/// of the group fails and none happened.
fn commit_group(
    conn: &mut Connection,
    group: Vec<(Option<Fence>, Mutation)>,
) -> Vec<Result<Option<u64>, StoreError>> {
    let count = group.len();
    let all_fail = |e: rusqlite::Error| {
        let message = e.to_string();
        (0..count)
            .map(|_| Err(StoreError::Backend(message.clone())))
            .collect()
    };
    let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return all_fail(e),
    };
    let mut outcomes = Vec::with_capacity(count);
    for (fence, mutation) in group {
        let outcome = match tx.savepoint() {
            Ok(savepoint) => {
                let outcome = fence
                    .as_ref()
                    .map_or(Ok(()), |fence| {
                        check_fence(fence, live_version(&savepoint, &fence.table, &fence.key)?)
                    })
                    .and_then(|()| apply(&savepoint, mutation));
                // Dropped without commit, a savepoint rolls back.
                match outcome {
                    Ok(version) => savepoint.commit().map(|()| version).map_err(backend),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(backend(e)),
        };
        outcomes.push(outcome);
    }
    match tx.commit() {
        Ok(()) => outcomes,
        Err(e) => all_fail(e),
    }
}

fn apply(tx: &Connection, mutation: Mutation) -> Result<Option<u64>, StoreError> {
    match mutation {
        Mutation::Put {
            table,
            key,
            value,
            expect,
        } => {
            check(&table, &key, expect, live_version(tx, &table, &key)?)?;
            upsert(tx, &table, &key, &value, None).map(Some)
        }
        Mutation::Write {
            table,
            key,
            value,
            ttl,
        } => {
            let now = now_ms();
            upsert(
                tx,
                &table,
                &key,
                &value,
                ttl.map(|t| now + t.as_millis() as i64),
            )?;
            // Expired rows of this table go as their table is written.
            tx.prepare_cached(
                "DELETE FROM rows WHERE tbl = ?1 AND expires_ms IS NOT NULL AND expires_ms <= ?2",
            )
            .and_then(|mut statement| statement.execute(params![table, now]))
            .map_err(backend)?;
            Ok(None)
        }
        Mutation::Delete {
            table,
            key,
            version,
        } => {
            let found = live_version(tx, &table, &key)?;
            check(&table, &key, Expect::Version(version), found)?;
            tx.prepare_cached("DELETE FROM rows WHERE tbl = ?1 AND key = ?2")
                .and_then(|mut statement| statement.execute(params![table, key]))
                .map_err(backend)?;
            Ok(None)
        }
        Mutation::Remove { table, key } => {
            tx.prepare_cached("DELETE FROM rows WHERE tbl = ?1 AND key = ?2")
                .and_then(|mut statement| statement.execute(params![table, key]))
                .map_err(backend)?;
            Ok(None)
        }
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn live_version(tx: &Connection, table: &str, key: &str) -> Result<Option<u64>, StoreError> {
    tx.prepare_cached(&format!(
        "SELECT version FROM rows WHERE tbl = :tbl AND key = :key AND {LIVE}"
    ))
    .and_then(|mut statement| {
        statement.query_row(
            rusqlite::named_params! {":tbl": table, ":key": key, ":now": now_ms()},
            |r| r.get::<_, i64>(0),
        )
    })
    .optional()
    .map(|v| v.map(|v| v as u64))
    .map_err(backend)
}

fn next_version(tx: &Connection) -> Result<u64, StoreError> {
    tx.prepare_cached("UPDATE version_seq SET last = last + 1 WHERE id = 0 RETURNING last")
        .and_then(|mut statement| statement.query_row([], |r| r.get::<_, i64>(0)))
        .map(|v| v as u64)
        .map_err(backend)
}

fn upsert(
    tx: &Connection,
    table: &str,
    key: &str,
    value: &[u8],
    expires_ms: Option<i64>,
) -> Result<u64, StoreError> {
    let version = next_version(tx)?;
    tx.prepare_cached(
        "INSERT INTO rows (tbl, key, version, value, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tbl, key) DO UPDATE SET version = excluded.version, value = excluded.value,
             expires_ms = excluded.expires_ms",
    )
    .and_then(|mut statement| {
        statement.execute(params![table, key, version as i64, value, expires_ms])
    })
    .map_err(backend)?;
    Ok(version)
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError> {
        let (table, key) = (table.to_string(), key.to_string());
        self.with_conn(move |conn| {
            conn.prepare_cached(&get_sql())
                .and_then(|mut statement| {
                    statement.query_row(
                        rusqlite::named_params! {":tbl": table, ":key": key, ":now": now_ms()},
                        |r| {
                            Ok(Versioned {
                                version: r.get::<_, i64>(0)? as u64,
                                value: r.get(1)?,
                            })
                        },
                    )
                })
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
        let mutation = Mutation::Put {
            table: table.into(),
            key: key.into(),
            value,
            expect,
        };
        let version = self.mutate(None, mutation).await?;
        Ok(version.unwrap_or_default())
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
        self.mutate(None, mutation).await.map(drop)
    }

    async fn delete(&self, table: &str, key: &str, version: u64) -> Result<(), StoreError> {
        let mutation = Mutation::Delete {
            table: table.into(),
            key: key.into(),
            version,
        };
        self.mutate(None, mutation).await.map(drop)
    }

    async fn remove(&self, table: &str, key: &str) -> Result<(), StoreError> {
        let mutation = Mutation::Remove {
            table: table.into(),
            key: key.into(),
        };
        self.mutate(None, mutation).await.map(drop)
    }

    async fn fenced(&self, fence: &Fence, mutation: Mutation) -> Result<Option<u64>, StoreError> {
        self.mutate(Some(fence.clone()), mutation).await
    }

    async fn scan(
        &self,
        table: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let sql = scan_sql(table, after.is_some_and(|a| a >= prefix))?;
        let prefix = prefix.to_string();
        let from = match after {
            Some(after) if after >= prefix.as_str() => after.to_string(),
            _ => prefix.clone(),
        };
        let limit = limit.max(1);
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(
                    rusqlite::named_params! {":from": from, ":now": now_ms()},
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            Versioned {
                                version: r.get::<_, i64>(1)? as u64,
                                value: r.get(2)?,
                            },
                        ))
                    },
                )
                .map_err(backend)?;
            let mut out = Vec::new();
            // One past the page tells whether another page follows.
            for row in rows.take(limit + 1) {
                let (key, value) = row.map_err(backend)?;
                if !key.starts_with(&prefix) {
                    break;
                }
                out.push((key, value));
            }
            let next = if out.len() > limit {
                out.pop();
                out.last().map(|(k, _)| k.clone())
            } else {
                None
            };
            Ok(Page { rows: out, next })
        })
        .await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_opening_a_new_database_at_once_all_succeed() {
        // The services of one host start together on one state.db: each
        // used to see no `expires_ms` column and add it, and all but one
        // failed with "duplicate column name".
        for round in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.db");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
            let openers: Vec<_> = (0..6)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        SqliteStore::open(&path).map(drop)
                    })
                })
                .collect();
            for opener in openers {
                let opened = opener.join().unwrap();
                assert!(opened.is_ok(), "round {round}: {opened:?}");
            }
        }
    }

    /// SQLite re-prepares a statement, as if its schema had changed, on
    /// the first step after a parameter it planned with is bound again
    /// (`LIMIT :limit` is one): the cached statement would be parsed and
    /// planned anew on every read.
    #[tokio::test]
    async fn reads_run_their_prepared_statements_without_preparing_them_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        for key in ["app-1", "app-2", "app-3", "other-1"] {
            store
                .put("t", key, b"v".to_vec(), Expect::Absent)
                .await
                .unwrap();
        }
        for round in 0..3 {
            let page = store.scan("t", "app-", None, 2 + round).await.unwrap();
            assert_eq!(page.rows.len(), (2 + round).min(3), "round {round}");
            let after = page.rows[0].0.clone();
            store.scan("t", "app-", Some(&after), 10).await.unwrap();
            assert!(store.get("t", "app-1").await.unwrap().is_some());
        }
        let refused = store.scan("t'; DROP TABLE rows; --", "", None, 10).await;
        assert!(
            matches!(&refused, Err(StoreError::Backend(why)) if why.contains("is not lowercase")),
            "{refused:?}"
        );
        let conn = store.conn.lock().unwrap();
        for sql in [
            scan_sql("t", false).unwrap(),
            scan_sql("t", true).unwrap(),
            get_sql(),
        ] {
            let statement = conn.prepare_cached(&sql).unwrap();
            assert_eq!(
                statement.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "{sql}"
            );
        }
    }

    #[tokio::test]
    async fn passes_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn crate::Store> =
            std::sync::Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
        crate::contract::run(store.clone(), "sqlite").await;
        // Twice on one database: every run's names are its own.
        crate::contract::run(store, "sqlite2").await;
    }

    #[tokio::test]
    async fn a_database_from_before_the_sequence_keeps_versions_rising() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE rows (tbl TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
                     value BLOB NOT NULL, PRIMARY KEY (tbl, key)) WITHOUT ROWID;
                 INSERT INTO rows VALUES ('apps', 'web', 7, x'7b7d');",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let row = store.get("apps", "web").await.unwrap().unwrap();
        assert_eq!(row.version, 7);
        let next = store
            .put("apps", "web", b"{}".to_vec(), Expect::Version(7))
            .await
            .unwrap();
        assert!(next > 7);
        let fresh = store
            .put("apps", "api", b"{}".to_vec(), Expect::Absent)
            .await
            .unwrap();
        assert!(
            fresh > next,
            "a new row reuses no version of the old database"
        );
    }
}
