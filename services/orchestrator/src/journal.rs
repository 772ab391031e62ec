//! The decision journal: one entry per decision the platform took about an
//! app (a placement, a rollback, replacing an instance lost with its node,
//! moving an instance off a draining node), with what it saw, the rule it
//! applied, the result, and one line a person reads. `GetAppHistory` and
//! `capstan app history` read it, newest first.
//!
//! Entries are plain writes with a TTL (they have one writer, the
//! reconciler's leader, and never change), keyed `<app>/<inverted time>-<id>`
//! so that a scan of an app's prefix returns the newest first and a query
//! reads only what it returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use capstan_store::{Store, Table};
use capstan_types::Error;
use serde::{Deserialize, Serialize};

const JOURNAL: &str = "journal";
/// How long an entry is kept.
pub const RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);
/// Most entries one query returns.
pub const MAX_LIMIT: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub id: String,
    pub app: String,
    pub at_ms: i64,
    /// `placement`, `rollback`, `replacement`, `drain`.
    pub kind: String,
    pub inputs: BTreeMap<String, String>,
    pub rule: String,
    pub result: String,
    pub reason: String,
}

impl JournalEntry {
    pub fn new(app: &str, at_ms: i64, kind: &str) -> JournalEntry {
        JournalEntry {
            id: capstan_server::new_id("j"),
            app: app.to_string(),
            at_ms,
            kind: kind.to_string(),
            inputs: BTreeMap::new(),
            rule: String::new(),
            result: String::new(),
            reason: String::new(),
        }
    }

    pub fn input(mut self, key: &str, value: impl ToString) -> JournalEntry {
        self.inputs.insert(key.to_string(), value.to_string());
        self
    }

    pub fn rule(mut self, rule: impl Into<String>) -> JournalEntry {
        self.rule = rule.into();
        self
    }

    pub fn result(mut self, result: impl Into<String>) -> JournalEntry {
        self.result = result.into();
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> JournalEntry {
        self.reason = reason.into();
        self
    }

    fn key(&self) -> String {
        // Newest first in key order: time inverted, zero-padded.
        let inverted = i64::MAX - self.at_ms.max(0);
        format!("{}/{inverted:019}-{}", self.app, self.id)
    }
}

#[derive(Clone)]
pub struct Journal {
    table: Table<JournalEntry>,
}

impl Journal {
    pub fn new(store: Arc<dyn Store>) -> Journal {
        Journal {
            table: Table::new(store, JOURNAL),
        }
    }

    /// Records an entry. A failure is logged, never fatal: the decision
    /// stands whether or not its explanation was stored.
    pub async fn record(&self, entry: JournalEntry) {
        tracing::info!(app = %entry.app, kind = %entry.kind, "{}", entry.reason);
        if let Err(e) = self
            .table
            .write(&entry.key(), &entry, Some(RETENTION))
            .await
        {
            tracing::warn!(app = %entry.app, "journal entry not stored: {e}");
        }
    }

    /// An app's newest `limit` entries, newest first.
    pub async fn recent(&self, app: &str, limit: usize) -> Result<Vec<JournalEntry>, Error> {
        let (rows, _) = self
            .table
            .page(&format!("{app}/"), None, limit.clamp(1, MAX_LIMIT))
            .await
            .map_err(Error::internal)?;
        Ok(rows.into_iter().map(|(_, _, entry)| entry).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_come_back_newest_first_per_app_and_bounded() {
        let journal = Journal::new(Arc::new(capstan_store::MemoryStore::new()));
        for (app, at) in [
            ("web", 1_000),
            ("web", 3_000),
            ("api", 2_000),
            ("web", 2_000),
        ] {
            journal
                .record(JournalEntry::new(app, at, "placement").reason(format!("{app} at {at}")))
                .await;
        }
        let web = journal.recent("web", 10).await.unwrap();
        let times: Vec<i64> = web.iter().map(|e| e.at_ms).collect();
        assert_eq!(times, [3_000, 2_000, 1_000]);
        assert!(web.iter().all(|e| e.app == "web"));
        assert_eq!(journal.recent("web", 2).await.unwrap().len(), 2);
        // `we` is not a prefix of `web`'s entries: apps are separated by `/`.
        assert!(journal.recent("we", 10).await.unwrap().is_empty());
    }
}
