//! The cache on Redis: `SET NX PX` claims, a token bucket in one Lua script
//! on the server's clock, and a denylist with pub/sub invalidation.
//!
//! Every key is under `<namespace>:`, so several installations (or test
//! runs) can share one server.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Admit, Cache, CacheError, RateLimit, redact};

const TIMEOUT: Duration = Duration::from_secs(2);

/// Takes one token from the bucket at KEYS[1]: ARGV = burst, tokens per
/// millisecond. Refills by the server's clock (`TIME`), so every replica
/// sees one bucket whatever its own clock says. Returns 0 when allowed,
/// else the milliseconds until a token is back.
const TAKE: &str = r"
local burst = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * per_ms)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.max(1, math.ceil((1 - tokens) / per_ms))
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / per_ms) + 1000)
return wait
";

pub struct RedisCache {
    client: redis::Client,
    connection: ConnectionManager,
    namespace: String,
    take: redis::Script,
}

impl RedisCache {
    /// Connects to `url` (`redis://HOST:PORT[/DB]`), keeping keys under
    /// `namespace:`. Fails when the server does not answer in 2 s.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, CacheError> {
        let unavailable = |e: redis::RedisError| {
            CacheError::Unavailable(format!("redis at {}: {e}", redact(url)))
        };
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(2);
        let connection = tokio::time::timeout(
            TIMEOUT * 2,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| CacheError::Unavailable(format!("redis at {}: timed out", redact(url))))?
        .map_err(unavailable)?;
        Ok(Self {
            client,
            connection,
            namespace: namespace.to_string(),
            take: redis::Script::new(TAKE),
        })
    }

    fn key(&self, kind: &str, key: &str) -> String {
        format!("{}:{kind}:{key}", self.namespace)
    }

    fn channel(&self) -> String {
        format!("{}:revocations", self.namespace)
    }
}

fn unavailable(error: redis::RedisError) -> CacheError {
    CacheError::Unavailable(format!("redis: {error}"))
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl Cache for RedisCache {
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool, CacheError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key("claim", key))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .query_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)?;
        Ok(set.is_some())
    }

    async fn take(&self, key: &str, limit: RateLimit) -> Result<Admit, CacheError> {
        limit.check()?;
        let wait_ms: u64 = self
            .take
            .key(self.key("bucket", key))
            .arg(limit.burst)
            .arg(limit.per_second / 1000.0)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)?;
        Ok(match wait_ms {
            0 => Admit::Allowed,
            ms => Admit::Limited {
                retry_after: Duration::from_millis(ms),
            },
        })
    }

    async fn revoke(&self, id: &str, ttl: Duration) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.key("revoked", id))
            .arg(1)
            .arg("PX")
            .arg(millis(ttl))
            .ignore()
            .cmd("PUBLISH")
            .arg(self.channel())
            .arg(id)
            .ignore()
            .query_async::<()>(&mut connection)
            .await
            .map_err(unavailable)
    }

    async fn is_revoked(&self, id: &str) -> Result<bool, CacheError> {
        redis::cmd("EXISTS")
            .arg(self.key("revoked", id))
            .query_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)
    }

    async fn revocations(&self) -> Result<BoxStream<'static, String>, CacheError> {
        // Subscribed before returning, so nothing revoked after this call
        // is missed; resubscribes after a lost connection (what was
        // published meanwhile is only in the denylist, which stays the truth).
        let mut pubsub = self.client.get_async_pubsub().await.map_err(unavailable)?;
        let channel = self.channel();
        pubsub.subscribe(&channel).await.map_err(unavailable)?;
        let (sender, receiver) = mpsc::channel(256);
        let client = self.client.clone();
        tokio::spawn(async move {
            let mut pubsub = Some(pubsub);
            loop {
                if let Some(subscribed) = pubsub.take() {
                    let mut messages = subscribed.into_on_message();
                    loop {
                        let message = tokio::select! {
                            _ = sender.closed() => return,
                            message = messages.next() => message,
                        };
                        let Some(message) = message else { break };
                        let Ok(id) = message.get_payload::<String>() else {
                            continue;
                        };
                        if sender.send(id).await.is_err() {
                            return;
                        }
                    }
                }
                if sender.is_closed() {
                    return;
                }
                tracing::warn!("redis revocation subscription lost; resubscribing");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(mut fresh) = client.get_async_pubsub().await
                    && fresh.subscribe(&channel).await.is_ok()
                {
                    pubsub = Some(fresh);
                }
            }
        });
        Ok(ReceiverStream::new(receiver).boxed())
    }
}
