//! The store on ScyllaDB.
//!
//! - One table, `rows`, partitioned by store table and clustered by key, so
//!   a scan is one ordered range read (`infra/scylla/001_rows.cql`).
//! - Compare-and-set is a lightweight transaction (`IF NOT EXISTS`,
//!   `IF version = ?`) at SERIAL consistency; every other read and write is
//!   LOCAL_QUORUM. Only idempotent statements are marked idempotent, so the
//!   driver retries nothing that could apply twice.
//! - Versions: the larger of the previous version + 1 and the current time
//!   in microseconds, so a key's versions only go up, across deletes too.
//! - Fencing: Scylla cannot check another partition's row inside an LWT. A
//!   fenced write reads the fence row (SERIAL) and refuses when it moved,
//!   then writes with `IF fence <= ?` (the fence version it holds), and
//!   every row records the fence of its last fenced writer. A stale leader
//!   is refused on every row a newer one has written (ADR 0011).
//! - Schema files are applied at start, each once, recorded in
//!   `schema_migrations`.

use std::time::Duration;

use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};

use crate::{Expect, Fence, Mutation, Page, Store, StoreError, Versioned, check_fence};

/// The schema, in order. Each is applied once and recorded.
pub const MIGRATIONS: &[(&str, &str)] = &[(
    "001_rows",
    include_str!("../../../infra/scylla/001_rows.cql"),
)];

/// `scylla://HOST[:PORT][,HOST[:PORT]...]/KEYSPACE[?rf=N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaUrl {
    pub nodes: Vec<String>,
    pub keyspace: String,
    pub replication_factor: u32,
}

pub fn parse_url(url: &str) -> Result<ScyllaUrl, String> {
    let rest = url
        .strip_prefix("scylla://")
        .ok_or_else(|| format!("`{url}` is not scylla://HOST[:PORT][,HOST...]/KEYSPACE"))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (hosts, keyspace) = rest
        .split_once('/')
        .ok_or_else(|| format!("`{url}` names no keyspace (scylla://HOST/KEYSPACE)"))?;
    let nodes: Vec<String> = hosts
        .split(',')
        .map(|host| {
            if host.is_empty() || host.contains('@') {
                return Err(format!("`{host}` in `{url}` is not HOST[:PORT]"));
            }
            match host.rsplit_once(':') {
                Some((_, port)) if port.parse::<u16>().is_err() => {
                    Err(format!("`{port}` in `{url}` is not a port"))
                }
                Some(_) => Ok(host.to_string()),
                None => Ok(format!("{host}:9042")),
            }
        })
        .collect::<Result<_, _>>()?;
    let valid_keyspace = !keyspace.is_empty()
        && keyspace.len() <= 48
        && keyspace.starts_with(|c: char| c.is_ascii_alphabetic())
        && keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_keyspace {
        return Err(format!(
            "keyspace `{keyspace}` must be letters, digits and `_`, starting with a letter (at most 48)"
        ));
    }
    let mut replication_factor = 3;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("rf", n)) => {
                replication_factor = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=9).contains(n))
                    .ok_or_else(|| format!("rf `{n}` must be 1 to 9"))?;
            }
            _ => return Err(format!("unknown option `{pair}` (only rf=N)")),
        }
    }
    Ok(ScyllaUrl {
        nodes,
        keyspace: keyspace.to_string(),
        replication_factor,
    })
}

/// The statements of a schema file for keyspace `ks`: comment lines
/// dropped, split at `;`.
pub fn statements(cql: &str, ks: &str) -> Vec<String> {
    let code: String = cql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.replace("{keyspace}", ks))
        .collect()
}

/// Every statement the adapter runs, for keyspace `ks`.
pub struct Statements {
    pub get: String,
    pub get_serial: String,
    pub insert_if_absent: String,
    pub update_if_version: String,
    pub update_if_version_fenced: String,
    pub write: String,
    pub write_fenced: String,
    pub delete_if_version: String,
    pub delete_if_version_fenced: String,
    pub remove: String,
    pub remove_fenced: String,
    pub scan: String,
}

impl Statements {
    pub fn new(ks: &str) -> Statements {
        let rows = format!("{ks}.rows");
        Statements {
            get: format!("SELECT version, value FROM {rows} WHERE tbl = ? AND key = ?"),
            get_serial: format!("SELECT version FROM {rows} WHERE tbl = ? AND key = ?"),
            insert_if_absent: format!(
                "INSERT INTO {rows} (tbl, key, version, value, fence) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?"
            ),
            update_if_version: format!(
                "UPDATE {rows} SET version = ?, value = ?, fence = ? WHERE tbl = ? AND key = ? IF version = ?"
            ),
            update_if_version_fenced: format!(
                "UPDATE {rows} SET version = ?, value = ?, fence = ? WHERE tbl = ? AND key = ? IF version = ? AND fence <= ?"
            ),
            write: format!(
                "INSERT INTO {rows} (tbl, key, version, value, fence) VALUES (?, ?, ?, ?, ?) USING TTL ?"
            ),
            write_fenced: format!(
                "UPDATE {rows} USING TTL ? SET version = ?, value = ?, fence = ? WHERE tbl = ? AND key = ? IF fence <= ?"
            ),
            delete_if_version: format!(
                "DELETE FROM {rows} WHERE tbl = ? AND key = ? IF version = ?"
            ),
            delete_if_version_fenced: format!(
                "DELETE FROM {rows} WHERE tbl = ? AND key = ? IF version = ? AND fence <= ?"
            ),
            remove: format!("DELETE FROM {rows} WHERE tbl = ? AND key = ?"),
            remove_fenced: format!("DELETE FROM {rows} WHERE tbl = ? AND key = ? IF fence <= ?"),
            scan: format!(
                "SELECT key, version, value FROM {rows} WHERE tbl = ? AND key >= ? LIMIT ?"
            ),
        }
    }
}

/// A version above `previous` and at least the current time in µs.
pub fn next_version(previous: Option<u64>) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default();
    now.max(previous.map_or(0, |p| p + 1))
}

/// Seconds of a TTL as CQL takes it (0: none).
pub fn ttl_seconds(ttl: Option<Duration>) -> i32 {
    ttl.map_or(0, |t| {
        i32::try_from(t.as_secs_f64().ceil() as u64)
            .unwrap_or(i32::MAX)
            .max(1)
    })
}

/// What an LWT answered: applied, and the row's current version if not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LwtOutcome {
    pub applied: bool,
    pub version: Option<u64>,
}

/// Reads `[applied]` and `version` from an LWT's answer, by column name
/// (the columns of a not-applied answer depend on the statement).
pub fn lwt_outcome(columns: &[(&str, Option<CqlValue>)]) -> Result<LwtOutcome, String> {
    let find = |name: &str| columns.iter().find(|(n, _)| *n == name).map(|(_, v)| v);
    let applied = match find("[applied]") {
        Some(Some(CqlValue::Boolean(applied))) => *applied,
        other => return Err(format!("no [applied] column in an LWT answer: {other:?}")),
    };
    let version = match find("version") {
        Some(Some(CqlValue::BigInt(v))) => Some(*v as u64),
        _ => None,
    };
    Ok(LwtOutcome { applied, version })
}

/// Connects to the nodes of a `scylla://` URL, creates its keyspace and
/// applies `migrations` in order, each once (recorded in
/// `schema_migrations`, so adapters sharing a keyspace pass their own
/// lists). Every Scylla adapter opens its session here.
pub async fn connect_session(
    url: &str,
    migrations: &[(&str, &str)],
) -> Result<(Session, ScyllaUrl), StoreError> {
    let url = parse_url(url).map_err(|e| StoreError::Backend(format!("--store: {e}")))?;
    let session = SessionBuilder::new()
        .known_nodes(&url.nodes)
        .connection_timeout(Duration::from_secs(5))
        .build()
        .await
        .map_err(|e| backend(&format!("connect to {}", url.nodes.join(",")), e))?;
    let ks = &url.keyspace;
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{'class': 'NetworkTopologyStrategy', 'replication_factor': {}}}",
                url.replication_factor
            ),
            &[],
        )
        .await
        .map_err(|e| backend("create keyspace", e))?;
    session
        .query_unpaged(
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.schema_migrations (id text PRIMARY KEY, applied_at timestamp)"
            ),
            &[],
        )
        .await
        .map_err(|e| backend("create schema_migrations", e))?;
    for (id, cql) in migrations {
        let done = session
            .query_unpaged(
                format!("SELECT id FROM {ks}.schema_migrations WHERE id = ?"),
                (id,),
            )
            .await
            .map_err(|e| backend("read schema_migrations", e))?
            .into_rows_result()
            .map_err(|e| backend("read schema_migrations", e))?
            .rows_num()
            > 0;
        if done {
            continue;
        }
        for statement in statements(cql, ks) {
            session
                .query_unpaged(statement, &[])
                .await
                .map_err(|e| backend(&format!("migration {id}"), e))?;
        }
        session
            .query_unpaged(
                format!("INSERT INTO {ks}.schema_migrations (id, applied_at) VALUES (?, toTimestamp(now())) IF NOT EXISTS"),
                (id,),
            )
            .await
            .map_err(|e| backend("record migration", e))?;
        tracing::info!(migration = id, keyspace = %ks, "applied schema migration");
    }
    Ok((session, url))
}

pub struct ScyllaStore {
    session: Session,
    get: PreparedStatement,
    get_serial: PreparedStatement,
    insert_if_absent: PreparedStatement,
    update_if_version: PreparedStatement,
    update_if_version_fenced: PreparedStatement,
    write: PreparedStatement,
    write_fenced: PreparedStatement,
    delete_if_version: PreparedStatement,
    delete_if_version_fenced: PreparedStatement,
    remove: PreparedStatement,
    remove_fenced: PreparedStatement,
    scan: PreparedStatement,
}

pub fn backend(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("scylla: {what}: {error}"))
}

impl ScyllaStore {
    /// Connects, creates the keyspace and applies the schema (idempotent),
    /// and prepares every statement.
    pub async fn connect(url: &str) -> Result<ScyllaStore, StoreError> {
        let (session, url) = connect_session(url, MIGRATIONS).await?;
        let ks = &url.keyspace;
        let text = Statements::new(ks);
        let prepare = |cql: String, lwt: bool, idempotent: bool| {
            let session = &session;
            async move {
                let mut statement = session
                    .prepare(cql.clone())
                    .await
                    .map_err(|e| backend(&format!("prepare `{cql}`"), e))?;
                statement.set_consistency(Consistency::LocalQuorum);
                if lwt {
                    statement.set_serial_consistency(Some(SerialConsistency::Serial));
                }
                statement.set_is_idempotent(idempotent);
                Ok::<_, StoreError>(statement)
            }
        };
        let mut get_serial = prepare(text.get_serial, false, true).await?;
        // A linearizable read (Paxos) of the fence row.
        get_serial.set_consistency(Consistency::Serial);
        Ok(ScyllaStore {
            get: prepare(text.get, false, true).await?,
            get_serial,
            insert_if_absent: prepare(text.insert_if_absent, true, false).await?,
            update_if_version: prepare(text.update_if_version, true, false).await?,
            update_if_version_fenced: prepare(text.update_if_version_fenced, true, false).await?,
            write: prepare(text.write, false, true).await?,
            write_fenced: prepare(text.write_fenced, true, false).await?,
            delete_if_version: prepare(text.delete_if_version, true, false).await?,
            delete_if_version_fenced: prepare(text.delete_if_version_fenced, true, false).await?,
            remove: prepare(text.remove, false, true).await?,
            remove_fenced: prepare(text.remove_fenced, true, false).await?,
            scan: prepare(text.scan, false, true).await?,
            session,
        })
    }

    async fn lwt(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<LwtOutcome, StoreError> {
        let result = self
            .session
            .execute_unpaged(statement, values)
            .await
            .map_err(|e| backend("lwt", e))?
            .into_rows_result()
            .map_err(|e| backend("lwt answer", e))?;
        let names: Vec<String> = result
            .column_specs()
            .iter()
            .map(|c| c.name().to_string())
            .collect();
        let row: Row = result
            .first_row::<Row>()
            .map_err(|e| backend("lwt answer", e))?;
        let columns: Vec<(&str, Option<CqlValue>)> =
            names.iter().map(String::as_str).zip(row.columns).collect();
        lwt_outcome(&columns).map_err(|e| backend("lwt answer", e))
    }

    async fn version_of(&self, table: &str, key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.get(table, key).await?.map(|v| v.version))
    }

    async fn apply(
        &self,
        fence: Option<&Fence>,
        mutation: Mutation,
    ) -> Result<Option<u64>, StoreError> {
        let held = fence.map_or(0, |f| f.version as i64);
        match mutation {
            Mutation::Put {
                table,
                key,
                value,
                expect,
            } => {
                let outcome = match expect {
                    Expect::Absent => {
                        let version = next_version(None);
                        let outcome = self
                            .lwt(
                                &self.insert_if_absent,
                                (&table, &key, version as i64, &value, held, 0i32),
                            )
                            .await?;
                        (outcome, version)
                    }
                    Expect::Version(current) => {
                        let version = next_version(Some(current));
                        let outcome = match fence {
                            None => {
                                self.lwt(
                                    &self.update_if_version,
                                    (version as i64, &value, held, &table, &key, current as i64),
                                )
                                .await?
                            }
                            Some(_) => {
                                self.lwt(
                                    &self.update_if_version_fenced,
                                    (
                                        version as i64,
                                        &value,
                                        held,
                                        &table,
                                        &key,
                                        current as i64,
                                        held,
                                    ),
                                )
                                .await?
                            }
                        };
                        (outcome, version)
                    }
                };
                match outcome {
                    (LwtOutcome { applied: true, .. }, version) => Ok(Some(version)),
                    (LwtOutcome { version: found, .. }, _) => {
                        self.refused(fence, &table, &key, expect, found).await
                    }
                }
            }
            Mutation::Write {
                table,
                key,
                value,
                ttl,
            } => {
                let version = next_version(None) as i64;
                let ttl = ttl_seconds(ttl);
                match fence {
                    None => {
                        self.session
                            .execute_unpaged(
                                &self.write,
                                (&table, &key, version, &value, 0i64, ttl),
                            )
                            .await
                            .map_err(|e| backend("write", e))?;
                    }
                    Some(_) => {
                        // A new row first; an existing one only if no newer
                        // leader wrote it.
                        let created = self
                            .lwt(
                                &self.insert_if_absent,
                                (&table, &key, version, &value, held, ttl),
                            )
                            .await?;
                        if !created.applied {
                            let updated = self
                                .lwt(
                                    &self.write_fenced,
                                    (ttl, version, &value, held, &table, &key, held),
                                )
                                .await?;
                            if !updated.applied {
                                return self.fenced_off(fence);
                            }
                        }
                    }
                }
                Ok(None)
            }
            Mutation::Delete {
                table,
                key,
                version,
            } => {
                let outcome = match fence {
                    None => {
                        self.lwt(&self.delete_if_version, (&table, &key, version as i64))
                            .await?
                    }
                    Some(_) => {
                        self.lwt(
                            &self.delete_if_version_fenced,
                            (&table, &key, version as i64, held),
                        )
                        .await?
                    }
                };
                if outcome.applied {
                    return Ok(None);
                }
                self.refused(
                    fence,
                    &table,
                    &key,
                    Expect::Version(version),
                    outcome.version,
                )
                .await
            }
            Mutation::Remove { table, key } => {
                match fence {
                    None => {
                        self.session
                            .execute_unpaged(&self.remove, (&table, &key))
                            .await
                            .map_err(|e| backend("remove", e))?;
                    }
                    Some(_) => {
                        let outcome = self.lwt(&self.remove_fenced, (&table, &key, held)).await?;
                        // Not applied on a missing row is a done remove.
                        if !outcome.applied && self.version_of(&table, &key).await?.is_some() {
                            return self.fenced_off(fence);
                        }
                    }
                }
                Ok(None)
            }
        }
    }

    /// A conditional write that did not apply: the fence (a newer
    /// leader's row) or the row's own condition.
    async fn refused(
        &self,
        fence: Option<&Fence>,
        table: &str,
        key: &str,
        expected: Expect,
        found: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        let found = match found {
            Some(found) => Some(found),
            None => self.version_of(table, key).await?,
        };
        let own_condition_held = match expected {
            Expect::Absent => found.is_none(),
            Expect::Version(v) => found == Some(v),
        };
        if own_condition_held && fence.is_some() {
            return self.fenced_off(fence);
        }
        Err(StoreError::Conflict {
            table: table.to_string(),
            key: key.to_string(),
            expected,
            found,
        })
    }

    fn fenced_off(&self, fence: Option<&Fence>) -> Result<Option<u64>, StoreError> {
        let fence = fence.expect("only fenced writes are fenced off");
        Err(StoreError::Fenced {
            table: fence.table.clone(),
            key: fence.key.clone(),
            version: fence.version,
            found: None,
        })
    }
}

#[async_trait]
impl Store for ScyllaStore {
    async fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.get, (table, key))
            .await
            .map_err(|e| backend("get", e))?
            .into_rows_result()
            .map_err(|e| backend("get", e))?;
        let row = result
            .maybe_first_row::<(i64, Vec<u8>)>()
            .map_err(|e| StoreError::Corrupt {
                table: table.into(),
                key: key.into(),
                reason: e.to_string(),
            })?;
        Ok(row.map(|(version, value)| Versioned {
            version: version as u64,
            value,
        }))
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
        Ok(self.apply(None, mutation).await?.unwrap_or_default())
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
        self.apply(None, mutation).await.map(drop)
    }

    async fn delete(&self, table: &str, key: &str, version: u64) -> Result<(), StoreError> {
        let mutation = Mutation::Delete {
            table: table.into(),
            key: key.into(),
            version,
        };
        self.apply(None, mutation).await.map(drop)
    }

    async fn remove(&self, table: &str, key: &str) -> Result<(), StoreError> {
        let mutation = Mutation::Remove {
            table: table.into(),
            key: key.into(),
        };
        self.apply(None, mutation).await.map(drop)
    }

    async fn scan(
        &self,
        table: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let limit = limit.max(1);
        let lower = match after {
            Some(after) if after > prefix => after,
            _ => prefix,
        };
        // One more than asked: whether there is a next page. The row equal
        // to `after` comes back too, and is skipped.
        let fetch = i32::try_from(limit + 2).unwrap_or(i32::MAX);
        let result = self
            .session
            .execute_unpaged(&self.scan, (table, lower, fetch))
            .await
            .map_err(|e| backend("scan", e))?
            .into_rows_result()
            .map_err(|e| backend("scan", e))?;
        let mut rows = Vec::new();
        for row in result
            .rows::<(String, i64, Vec<u8>)>()
            .map_err(|e| backend("scan", e))?
        {
            let (key, version, value) = row.map_err(|e| backend("scan row", e))?;
            if after.is_some_and(|a| key.as_str() <= a) {
                continue;
            }
            if !key.starts_with(prefix) {
                break;
            }
            rows.push((
                key,
                Versioned {
                    version: version as u64,
                    value,
                },
            ));
        }
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        Ok(Page { rows, next })
    }

    async fn fenced(&self, fence: &Fence, mutation: Mutation) -> Result<Option<u64>, StoreError> {
        // The fence row, read through Paxos: refuse at once when it moved.
        let result = self
            .session
            .execute_unpaged(&self.get_serial, (&fence.table, &fence.key))
            .await
            .map_err(|e| backend("read fence", e))?
            .into_rows_result()
            .map_err(|e| backend("read fence", e))?;
        let found = result
            .maybe_first_row::<(i64,)>()
            .map_err(|e| backend("read fence", e))?
            .map(|(v,)| v as u64);
        check_fence(fence, found)?;
        self.apply(Some(fence), mutation).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why() {
        assert_eq!(
            parse_url("scylla://10.0.0.1,10.0.0.2:19042/capstan?rf=1").unwrap(),
            ScyllaUrl {
                nodes: vec!["10.0.0.1:9042".into(), "10.0.0.2:19042".into()],
                keyspace: "capstan".into(),
                replication_factor: 1,
            }
        );
        assert_eq!(
            parse_url("scylla://db/capstan").unwrap().replication_factor,
            3
        );
        for bad in [
            "",
            "scylla://",
            "scylla://db",
            "scylla://db/",
            "scylla://db/1ks",
            "scylla://db/ks;DROP",
            "scylla://db:x/ks",
            "scylla://,db/ks",
            "scylla://db/ks?rf=0",
            "scylla://db/ks?consistency=one",
            "cassandra://db/ks",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statements_name_the_keyspace_and_their_conditions() {
        let s = Statements::new("capstan");
        assert!(
            s.get
                .contains("FROM capstan.rows WHERE tbl = ? AND key = ?")
        );
        assert!(s.insert_if_absent.contains("IF NOT EXISTS USING TTL ?"));
        assert!(s.update_if_version.ends_with("IF version = ?"));
        assert!(
            s.update_if_version_fenced
                .ends_with("IF version = ? AND fence <= ?")
        );
        assert!(s.write_fenced.ends_with("IF fence <= ?"));
        assert!(!s.write.contains(" IF "), "plain writes are not LWT");
        assert!(!s.remove.contains(" IF "), "plain removes are not LWT");
        assert!(s.delete_if_version.ends_with("IF version = ?"));
        assert!(s.scan.contains("key >= ? LIMIT ?"));
        for statement in [&s.get, &s.scan, &s.write, &s.remove] {
            assert!(statement.matches('?').count() >= 2, "{statement}");
        }
    }

    #[test]
    fn versions_only_go_up() {
        let first = next_version(None);
        assert!(next_version(Some(first)) > first);
        // A version from the future (another node's clock) still goes up.
        let far = first + 10_000_000_000;
        assert_eq!(next_version(Some(far)), far + 1);
    }

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(None), 0);
        assert_eq!(ttl_seconds(Some(Duration::from_millis(1))), 1);
        assert_eq!(ttl_seconds(Some(Duration::from_millis(1500))), 2);
        assert_eq!(
            ttl_seconds(Some(Duration::from_secs(u64::MAX / 2))),
            i32::MAX
        );
    }

    #[test]
    fn lwt_answers_map_by_column_name() {
        // Applied: only [applied].
        assert_eq!(
            lwt_outcome(&[("[applied]", Some(CqlValue::Boolean(true)))]).unwrap(),
            LwtOutcome {
                applied: true,
                version: None
            }
        );
        // IF NOT EXISTS, not applied: [applied] and the whole existing row.
        let existing = [
            ("[applied]", Some(CqlValue::Boolean(false))),
            ("tbl", Some(CqlValue::Text("apps".into()))),
            ("key", Some(CqlValue::Text("web".into()))),
            ("fence", Some(CqlValue::BigInt(0))),
            ("value", Some(CqlValue::Blob(b"{}".to_vec()))),
            ("version", Some(CqlValue::BigInt(42))),
        ];
        assert_eq!(
            lwt_outcome(&existing).unwrap(),
            LwtOutcome {
                applied: false,
                version: Some(42)
            }
        );
        // IF version = ?, row gone: [applied] false and a null version.
        assert_eq!(
            lwt_outcome(&[
                ("[applied]", Some(CqlValue::Boolean(false))),
                ("version", None)
            ])
            .unwrap()
            .version,
            None
        );
        assert!(lwt_outcome(&[("version", Some(CqlValue::BigInt(1)))]).is_err());
    }

    #[test]
    fn the_schema_file_is_one_create_table_for_the_keyspace() {
        let (id, cql) = MIGRATIONS[0];
        assert_eq!(id, "001_rows");
        let statements = statements(cql, "capstan");
        assert_eq!(statements.len(), 1, "{statements:?}");
        assert!(statements[0].starts_with("CREATE TABLE IF NOT EXISTS capstan.rows"));
        assert!(statements[0].contains("PRIMARY KEY ((tbl), key)"));
        assert!(!statements[0].contains("--"), "comments are dropped");
    }
}
