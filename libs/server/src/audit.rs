//! The audit log: every change a caller asks for (and every one refused),
//! who asked, what, when and how it ended, in a hash chain.
//!
//! Records live in the platform's store, numbered from 1 (`audit` table,
//! keys zero-padded so they list in order); each holds the hash of the one
//! before, and its own hash covers every field and that link. The head row
//! (`audit_head`) holds the last number and hash. Appending is a
//! compare-and-set: write record `head + 1` only if absent, then move the
//! head; a writer that finds the record written but the head not moved
//! (its writer died between the two) moves the head for it. So replicas of
//! every service append to one chain without coordinating.
//!
//! [`verify`] finds a changed record (its hash), a removed one (a gap, or
//! a broken link), and a removed tail (the head names a later record).

use std::sync::Arc;

use capstan_store::{Expect, Store, StoreError, Table};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const RECORDS: &str = "audit";
pub const HEAD: &str = "audit_head";
const HEAD_KEY: &str = "head";

/// One change asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The caller: key name (or node id, or service) and role.
    pub actor: String,
    pub role: String,
    /// `Orchestrator/ApplyApp`.
    pub method: String,
    /// What it was about: an app, a key, a node.
    pub target: String,
    /// A line on what changed ("template 1a2b.. -> 3c4d..: env GREETING").
    pub summary: String,
    /// `ok`, `denied: ...` or `failed: ...`.
    pub result: String,
    /// The project the call was about: the app's, or the caller's key's.
    /// Empty for what belongs to no project (nodes, admin keys), and in
    /// records written before projects.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub project: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub at_ms: i64,
    #[serde(flatten)]
    pub entry: Entry,
    /// The hash of record `seq - 1` (empty for the first).
    pub prev: String,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
struct Head {
    seq: u64,
    hash: String,
}

fn key(seq: u64) -> String {
    format!("{seq:020}")
}

/// The hash of a record's fields and its link to the one before.
pub fn hash_of(seq: u64, at_ms: i64, entry: &Entry, prev: &str) -> String {
    let mut canonical = serde_json::json!({
        "seq": seq, "at_ms": at_ms, "actor": entry.actor, "role": entry.role,
        "method": entry.method, "target": entry.target, "summary": entry.summary,
        "result": entry.result, "prev": prev,
    });
    // Covered when set; records from before projects keep their hashes.
    if !entry.project.is_empty() {
        canonical["project"] = entry.project.clone().into();
    }
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn backend(e: StoreError) -> capstan_types::Error {
    capstan_types::Error::internal(format!("audit log: {e}"))
}

/// Appends `entry` to the chain; returns its record.
pub async fn append(store: &Arc<dyn Store>, entry: Entry) -> Result<Record, capstan_types::Error> {
    let records: Table<Record> = Table::new(store.clone(), RECORDS);
    let heads: Table<Head> = Table::new(store.clone(), HEAD);
    for _ in 0..64 {
        let (version, head) = match heads.get(HEAD_KEY).await.map_err(backend)? {
            Some((version, head)) => (Some(version), head),
            None => (None, Head::default()),
        };
        let seq = head.seq + 1;
        // A record past the head: its writer did not move the head. Move
        // it for them (if it links to the head), then go on.
        if let Some((_, found)) = records.get(&key(seq)).await.map_err(backend)? {
            let next = Head {
                seq,
                hash: found.hash.clone(),
            };
            if found.prev == head.hash {
                let expect = version.map_or(Expect::Absent, Expect::Version);
                let _ = heads.put(HEAD_KEY, &next, expect).await;
            }
            continue;
        }
        let at_ms = crate::now_ms();
        let hash = hash_of(seq, at_ms, &entry, &head.hash);
        let record = Record {
            seq,
            at_ms,
            entry: entry.clone(),
            prev: head.hash.clone(),
            hash: hash.clone(),
        };
        match records.put(&key(seq), &record, Expect::Absent).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(backend(e)),
        }
        let expect = version.map_or(Expect::Absent, Expect::Version);
        // Lost: someone moved the head past ours already (helping).
        let _ = heads.put(HEAD_KEY, &Head { seq, hash }, expect).await;
        return Ok(record);
    }
    Err(capstan_types::Error::Unavailable(
        "audit log: too many concurrent writers; retry".into(),
    ))
}

/// Records `entry`, logging (not failing) when the store does not take
/// it: the change it describes has happened either way.
pub async fn record(store: &Arc<dyn Store>, entry: Entry) {
    if let Err(e) = append(store, entry).await {
        tracing::error!("{e}");
    }
}

/// A change being made, recorded by [`Pending::finish`] with its result.
pub struct Pending {
    entry: Entry,
}

/// Starts the record of a call of `method` about `target` by the caller
/// of `request` (the handlers of mutating methods call it first).
pub fn begin<T>(request: &tonic::Request<T>, method: &str, target: &str) -> Pending {
    let (actor, role, project) = who(capstan_authn::caller(request).ok());
    Pending {
        entry: Entry {
            actor,
            role,
            method: method.to_string(),
            target: target.to_string(),
            summary: String::new(),
            result: String::new(),
            project,
        },
    }
}

/// The caller's name, role and project (empty: every project).
fn who(claims: Option<&capstan_authn::Claims>) -> (String, String, String) {
    match claims {
        Some(claims) => (
            claims.sub.clone(),
            claims.role.as_str().to_string(),
            claims.project_scope().unwrap_or_default().to_string(),
        ),
        None => ("anonymous".to_string(), String::new(), String::new()),
    }
}

impl Pending {
    /// The project the call is about, once the handler knows it (an
    /// admin's deploy into project `p`).
    pub fn project(&mut self, project: &str) {
        self.entry.project = project.to_string();
    }

    /// Whether the record names a project yet (the caller's or the app's).
    pub fn has_project(&self) -> bool {
        !self.entry.project.is_empty()
    }

    /// Records the call with how it ended and a line on what changed.
    pub async fn finish<R>(
        mut self,
        store: &Arc<dyn Store>,
        result: &Result<R, tonic::Status>,
        summary: impl Into<String>,
    ) {
        self.entry.summary = summary.into();
        self.entry.result = match result {
            Ok(_) => "ok".to_string(),
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                format!("denied: {}", status.message())
            }
            Err(status) => format!("failed ({:?}): {}", status.code(), status.message()),
        };
        record(store, self.entry).await;
    }
}

/// Records a call the auth layer refused (`claims`: the verified caller,
/// when the token was good but the role was not).
pub fn denied(
    store: Arc<dyn Store>,
    path: &str,
    claims: Option<&capstan_authn::Claims>,
    reason: &str,
) {
    let method = path.trim_start_matches("/capstan.v1.").to_string();
    let (actor, role, project) = who(claims);
    let entry = Entry {
        actor,
        role,
        method,
        target: String::new(),
        summary: String::new(),
        result: format!("denied: {reason}"),
        project,
    };
    tokio::spawn(async move { record(&store, entry).await });
}

/// Every record, in order.
pub async fn list(store: &Arc<dyn Store>) -> Result<Vec<Record>, capstan_types::Error> {
    let records: Table<Record> = Table::new(store.clone(), RECORDS);
    records.values("").await.map_err(backend)
}

/// Whether the chain is whole: `Ok(n)` records, or what is wrong, first.
pub async fn verify(store: &Arc<dyn Store>) -> Result<Result<u64, String>, capstan_types::Error> {
    let heads: Table<Head> = Table::new(store.clone(), HEAD);
    let head = heads.get(HEAD_KEY).await.map_err(backend)?.map(|(_, h)| h);
    Ok(check(
        &list(store).await?,
        head.as_ref().map(|h| (h.seq, h.hash.as_str())),
    ))
}

/// The pure check of [`verify`].
pub fn check(records: &[Record], head: Option<(u64, &str)>) -> Result<u64, String> {
    let mut prev = String::new();
    for (i, record) in records.iter().enumerate() {
        let want = i as u64 + 1;
        if record.seq != want {
            return Err(format!(
                "record {want} is missing (the next is {})",
                record.seq
            ));
        }
        if record.prev != prev {
            return Err(format!(
                "record {want} does not link to record {}",
                want - 1
            ));
        }
        if hash_of(record.seq, record.at_ms, &record.entry, &record.prev) != record.hash {
            return Err(format!(
                "record {want} was changed: its hash does not match"
            ));
        }
        prev.clone_from(&record.hash);
    }
    let last = records.len() as u64;
    match head {
        Some((seq, _)) if seq > last => Err(format!(
            "records {}..={seq} are missing: the head names record {seq}",
            last + 1
        )),
        Some((seq, hash)) if seq == last && hash != prev => {
            Err(format!("record {seq} is not the one the head names"))
        }
        None if last > 0 => Err("the head is missing".into()),
        _ => Ok(last),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u32) -> Entry {
        Entry {
            actor: format!("k{n}"),
            role: "operator".into(),
            method: "Orchestrator/ScaleApp".into(),
            target: "web".into(),
            summary: format!("{n} replicas"),
            result: "ok".into(),
            project: if n.is_multiple_of(2) {
                "team-a".into()
            } else {
                String::new()
            },
        }
    }

    fn chain(n: u32) -> Vec<Record> {
        let mut prev = String::new();
        (1..=n)
            .map(|i| {
                let hash = hash_of(u64::from(i), 1000 + i64::from(i), &entry(i), &prev);
                Record {
                    seq: u64::from(i),
                    at_ms: 1000 + i64::from(i),
                    entry: entry(i),
                    prev: std::mem::replace(&mut prev, hash.clone()),
                    hash,
                }
            })
            .collect()
    }

    #[test]
    fn a_changed_removed_or_cut_record_is_found() {
        let records = chain(5);
        let head = (5, records[4].hash.as_str());
        assert_eq!(check(&records, Some(head)), Ok(5));
        let mut changed = records.clone();
        changed[2].entry.actor = "mallory".into();
        assert_eq!(
            check(&changed, Some(head)),
            Err("record 3 was changed: its hash does not match".into())
        );
        // The project is covered too, where a record has one.
        let mut moved = records.clone();
        moved[1].entry.project = "team-b".into();
        assert_eq!(
            check(&moved, Some(head)),
            Err("record 2 was changed: its hash does not match".into())
        );
        let mut removed = records.clone();
        removed.remove(1);
        assert!(
            check(&removed, Some(head))
                .unwrap_err()
                .contains("record 2 is missing")
        );
        let cut = &records[..4];
        assert!(
            check(cut, Some(head))
                .unwrap_err()
                .contains("records 5..=5 are missing")
        );
        // Rehashing a changed record breaks the next link.
        let mut rehashed = records.clone();
        rehashed[2].entry.actor = "mallory".into();
        rehashed[2].hash = hash_of(3, rehashed[2].at_ms, &rehashed[2].entry, &rehashed[2].prev);
        assert!(
            check(&rehashed, Some(head))
                .unwrap_err()
                .contains("record 4 does not link")
        );
        assert_eq!(check(&[], None), Ok(0));
    }

    #[tokio::test]
    async fn appends_chain_and_concurrent_writers_share_one_chain() {
        let store: Arc<dyn Store> = Arc::new(capstan_store::MemoryStore::new());
        let writers: Vec<_> = (0..8)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move { append(&store, entry(n)).await.unwrap() })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        assert_eq!(verify(&store).await.unwrap(), Ok(8));
        let records = list(&store).await.unwrap();
        let mut actors: Vec<&str> = records.iter().map(|r| r.entry.actor.as_str()).collect();
        actors.sort();
        assert_eq!(actors, ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"]);
    }
}
