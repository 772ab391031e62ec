//! What a verifier knows of revoked tokens.
//!
//! The denylist in the [`Cache`] is the truth. A verifier asks it about a
//! token id at most every [`RECHECK`], remembers revoked ids until their
//! tokens expire, and also hears revocations as they happen
//! ([`Cache::revocations`]), so a revoked token is refused everywhere
//! within [`RECHECK`] even when a notification is lost.
//!
//! When the cache does not answer, a token not known to be revoked is let
//! through and a warning logged: a cache outage delays revocation by at
//! most a token's lifetime, and never stops the platform (ADR 0010).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use capstan_cache::Cache;
use capstan_types::Error;
use futures::StreamExt;

use crate::Claims;

/// How long a "not revoked" answer is trusted.
pub const RECHECK: Duration = Duration::from_millis(500);
/// How long one denylist lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
/// Known ids are swept of expired tokens past this many.
const SWEEP_AT: usize = 8192;

pub(crate) struct Revocations {
    cache: Arc<dyn Cache>,
    known: Arc<Mutex<HashMap<String, Known>>>,
    listening: tokio::sync::OnceCell<()>,
}

#[derive(Clone, Copy)]
struct Known {
    revoked: bool,
    checked: Instant,
    /// The token's `exp` (seconds since the epoch): after it the entry is moot.
    exp: i64,
}

impl Revocations {
    pub(crate) fn new(cache: Arc<dyn Cache>) -> Self {
        Self {
            cache,
            known: Arc::default(),
            listening: tokio::sync::OnceCell::new(),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts hearing revocations, once, from the first check on (inside
    /// the runtime); that check waits until the subscription stands, so
    /// nothing revoked after it is missed. The task ends with the verifier.
    async fn listen(&self) {
        self.listening
            .get_or_init(|| async {
                let cache = self.cache.clone();
                let known: Weak<Mutex<HashMap<String, Known>>> = Arc::downgrade(&self.known);
                let mut subscription = cache.revocations().await;
                tokio::spawn(async move {
                    loop {
                        match subscription {
                            Ok(mut ids) => {
                                while let Some(id) = ids.next().await {
                                    let Some(known) = known.upgrade() else { return };
                                    let mut known = known.lock().unwrap_or_else(|e| e.into_inner());
                                    // Unknown expiry: kept as long as any token lives.
                                    let exp =
                                        now_secs() + crate::MAX_TOKEN_LIFETIME.as_secs() as i64;
                                    known.insert(
                                        id,
                                        Known {
                                            revoked: true,
                                            checked: Instant::now(),
                                            exp,
                                        },
                                    );
                                }
                            }
                            Err(e) => tracing::warn!("cannot hear token revocations: {e}"),
                        }
                        if known.strong_count() == 0 {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        subscription = cache.revocations().await;
                    }
                });
            })
            .await;
    }

    pub(crate) async fn check(&self, claims: &Claims) -> Result<(), Error> {
        self.listen().await;
        let revoked = || Error::Unauthenticated("token revoked".into());
        if claims.jti.is_empty() {
            return Err(Error::Unauthenticated(
                "invalid token: no token id (jti)".into(),
            ));
        }
        if let Some(known) = self.known().get(&claims.jti) {
            if known.revoked {
                return Err(revoked());
            }
            if known.checked.elapsed() < RECHECK {
                return Ok(());
            }
        }
        let answer = tokio::time::timeout(LOOKUP_TIMEOUT, self.cache.is_revoked(&claims.jti)).await;
        let revoked_now = match answer {
            Ok(Ok(revoked)) => revoked,
            Ok(Err(e)) => {
                tracing::warn!("token denylist unavailable, admitting: {e}");
                return Ok(());
            }
            Err(_) => {
                tracing::warn!("token denylist timed out, admitting");
                return Ok(());
            }
        };
        let mut known = self.known();
        if known.len() > SWEEP_AT {
            let now = now_secs();
            known.retain(|_, k| k.exp >= now);
        }
        let entry = known.entry(claims.jti.clone()).or_insert(Known {
            revoked: revoked_now,
            checked: Instant::now(),
            exp: claims.exp,
        });
        // A revocation heard meanwhile wins over an older "not revoked".
        entry.revoked |= revoked_now;
        entry.checked = Instant::now();
        entry.exp = claims.exp;
        if entry.revoked {
            Err(revoked())
        } else {
            Ok(())
        }
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
