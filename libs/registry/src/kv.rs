//! A subtree of Consul's KV kept equal to a set of keys, one transaction
//! per change: what router-config writes Traefik's Consul KV provider from.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use crate::RegistryError;
use crate::consul::{CALL_TIMEOUT, ConsulAgent};

/// Consul takes at most this many operations in one `/v1/txn`.
pub const TXN_MAX_OPS: usize = 128;

/// What a sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Synced {
    pub set: usize,
    pub deleted: usize,
    pub transactions: usize,
}

#[derive(Clone)]
pub struct ConsulKv {
    agent: ConsulAgent,
}

impl ConsulKv {
    pub fn new(agent: ConsulAgent) -> Self {
        Self { agent }
    }

    /// The keys under `prefix` (which ends in `/`) with their values.
    pub async fn tree(&self, prefix: &str) -> Result<BTreeMap<String, String>, RegistryError> {
        let answer = self
            .agent
            .call(
                Method::GET,
                &format!("/v1/kv/{prefix}?recurse=true"),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(BTreeMap::new());
        }
        if !answer.status.is_success() {
            return Err(RegistryError::Unavailable(format!(
                "consul: read {prefix}: {} {}",
                answer.status,
                String::from_utf8_lossy(&answer.body).trim()
            )));
        }
        let entries = answer.json()?;
        let mut tree = BTreeMap::new();
        for entry in entries.as_array().into_iter().flatten() {
            let Some(key) = entry["Key"].as_str() else {
                continue;
            };
            let value = match entry["Value"].as_str() {
                Some(encoded) => B64
                    .decode(encoded)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .unwrap_or_default(),
                None => String::new(),
            };
            tree.insert(key.to_string(), value);
        }
        Ok(tree)
    }

    /// Makes the keys that `owned` accepts equal to `wanted`: sets what is
    /// new or changed and deletes what is no longer wanted, in one
    /// transaction (several when a change exceeds [`TXN_MAX_OPS`]: sets
    /// first, then deletes). Keys `owned` rejects are left alone.
    pub async fn sync(
        &self,
        prefix: &str,
        wanted: &BTreeMap<String, String>,
        owned: impl Fn(&str) -> bool,
    ) -> Result<Synced, RegistryError> {
        let current = self.tree(prefix).await?;
        let ops = diff(&current, wanted, owned);
        let mut synced = Synced::default();
        for op in &ops {
            if op["KV"]["Verb"] == "set" {
                synced.set += 1;
            } else {
                synced.deleted += 1;
            }
        }
        for chunk in ops.chunks(TXN_MAX_OPS) {
            let body = Value::Array(chunk.to_vec());
            let answer = self
                .agent
                .call(Method::PUT, "/v1/txn", Some(&body), CALL_TIMEOUT)
                .await?;
            if !answer.status.is_success() {
                return Err(RegistryError::Unavailable(format!(
                    "consul: transaction on {prefix} rolled back: {} {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body).trim()
                )));
            }
            synced.transactions += 1;
        }
        Ok(synced)
    }
}

/// The transaction operations that turn `current` into `wanted` for the
/// keys `owned` accepts: sets, then deletes.
pub fn diff(
    current: &BTreeMap<String, String>,
    wanted: &BTreeMap<String, String>,
    owned: impl Fn(&str) -> bool,
) -> Vec<Value> {
    let sets = wanted
        .iter()
        .filter(|(key, value)| current.get(*key) != Some(value))
        .map(|(key, value)| json!({ "KV": { "Verb": "set", "Key": key, "Value": B64.encode(value) } }));
    let deletes = current
        .keys()
        .filter(|key| owned(key) && !wanted.contains_key(*key))
        .map(|key| json!({ "KV": { "Verb": "delete", "Key": key } }));
    sets.chain(deletes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_changes_are_sent_and_only_owned_keys_are_deleted() {
        let current = map(&[
            ("t/a", "1"),
            ("t/b", "2"),
            ("t/gone", "3"),
            ("t/theirs", "4"),
        ]);
        let wanted = map(&[("t/a", "1"), ("t/b", "20"), ("t/new", "5")]);
        let ops = diff(&current, &wanted, |k| k != "t/theirs");
        let verbs: Vec<(String, String)> = ops
            .iter()
            .map(|op| {
                (
                    op["KV"]["Verb"].as_str().unwrap().to_string(),
                    op["KV"]["Key"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            verbs,
            [
                ("set".to_string(), "t/b".to_string()),
                ("set".to_string(), "t/new".to_string()),
                ("delete".to_string(), "t/gone".to_string()),
            ]
        );
        assert_eq!(ops[0]["KV"]["Value"], B64.encode("20"));
        assert!(diff(&wanted, &wanted, |_| true).is_empty());
    }
}
