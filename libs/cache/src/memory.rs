//! One process's cache: what `capstan dev` uses, where every replica is in
//! the same process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use crate::{Admit, Cache, CacheError, RateLimit};

/// Entries are swept when the map grows past this many.
const SWEEP_AT: usize = 4096;

pub struct MemoryCache {
    state: Mutex<State>,
    revoked: broadcast::Sender<String>,
}

#[derive(Default)]
struct State {
    /// Claims and revocations: key → expiry.
    expiring: HashMap<String, Instant>,
    /// Buckets: key → (tokens, refilled at).
    buckets: HashMap<String, (f64, Instant)>,
}

impl MemoryCache {
    pub fn new() -> Self {
        Self {
            state: Mutex::default(),
            revoked: broadcast::channel(1024).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemoryCache {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    fn live(&mut self, key: &str, now: Instant) -> bool {
        match self.expiring.get(key) {
            Some(expiry) if *expiry > now => true,
            Some(_) => {
                self.expiring.remove(key);
                false
            }
            None => false,
        }
    }

    fn sweep(&mut self, now: Instant) {
        if self.expiring.len() > SWEEP_AT {
            self.expiring.retain(|_, expiry| *expiry > now);
        }
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool, CacheError> {
        let now = Instant::now();
        let mut state = self.state();
        state.sweep(now);
        let key = format!("claim:{key}");
        if state.live(&key, now) {
            return Ok(false);
        }
        state.expiring.insert(key, now + ttl);
        Ok(true)
    }

    async fn take(&self, key: &str, limit: RateLimit) -> Result<Admit, CacheError> {
        limit.check()?;
        let now = Instant::now();
        let mut state = self.state();
        if state.buckets.len() > SWEEP_AT {
            let idle = limit.refill_time();
            state
                .buckets
                .retain(|_, (_, at)| now.duration_since(*at) < idle);
        }
        let burst = f64::from(limit.burst);
        let (tokens, at) = state.buckets.entry(key.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * limit.per_second).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(Admit::Allowed);
        }
        let wait = (1.0 - *tokens) / limit.per_second;
        Ok(Admit::Limited {
            retry_after: Duration::from_secs_f64(wait).max(Duration::from_millis(1)),
        })
    }

    async fn revoke(&self, id: &str, ttl: Duration) -> Result<(), CacheError> {
        let now = Instant::now();
        {
            let mut state = self.state();
            state.sweep(now);
            state.expiring.insert(format!("revoked:{id}"), now + ttl);
        }
        // Nobody listening is fine: the denylist is the truth.
        let _ = self.revoked.send(id.to_string());
        Ok(())
    }

    async fn is_revoked(&self, id: &str) -> Result<bool, CacheError> {
        Ok(self.state().live(&format!("revoked:{id}"), Instant::now()))
    }

    async fn revocations(&self) -> Result<BoxStream<'static, String>, CacheError> {
        // A lagging listener skips what it missed; is_revoked still answers.
        Ok(BroadcastStream::new(self.revoked.subscribe())
            .filter_map(|item| async move { item.ok() })
            .boxed())
    }
}
