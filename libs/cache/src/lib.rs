//! The cache port: short-lived shared state that several replicas of a
//! service must agree on, but that the platform can lose without harm.
//!
//! - **Claims** deduplicate at-least-once events across replicas: the first
//!   [`Cache::claim`] of a key wins for its TTL (`SET NX PX` on Redis).
//! - **Rate limits** are token buckets ([`Cache::take`]), refilled by the
//!   cache's own clock so replicas with skewed clocks share one bucket.
//! - **The token denylist** ([`Cache::revoke`], [`Cache::is_revoked`]) holds
//!   revoked token ids until the token would have expired anyway, and
//!   [`Cache::revocations`] tells verifiers at once.
//!
//! Adapters: [`MemoryCache`] (one process: `capstan dev`) and [`RedisCache`]
//! (`redis://HOST:PORT[/DB]`). Both pass [`contract::run`].

pub mod contract;
mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub use memory::MemoryCache;
pub use redis::RedisCache;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache unavailable: {0}")]
    Unavailable(String),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// A token bucket: up to `burst` calls at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_second: f64,
}

impl RateLimit {
    fn check(&self) -> Result<(), CacheError> {
        if self.burst == 0 {
            return Err(CacheError::Invalid {
                field: "burst",
                reason: "must be at least 1".into(),
            });
        }
        if !(self.per_second.is_finite() && self.per_second > 0.0) {
            return Err(CacheError::Invalid {
                field: "per_second",
                reason: format!("must be a positive number, got {}", self.per_second),
            });
        }
        Ok(())
    }

    /// How long a full bucket takes to refill: how long its state matters.
    fn refill_time(&self) -> Duration {
        Duration::from_secs_f64(f64::from(self.burst) / self.per_second)
    }
}

/// What [`Cache::take`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Allowed,
    /// Try again after this long.
    Limited {
        retry_after: Duration,
    },
}

#[async_trait]
pub trait Cache: Send + Sync + 'static {
    /// True for the first caller to claim `key` within `ttl`, false for
    /// every other until it expires.
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool, CacheError>;

    /// Takes one token from bucket `key`.
    async fn take(&self, key: &str, limit: RateLimit) -> Result<Admit, CacheError>;

    /// Denies token `id` for `ttl` (its remaining lifetime) and tells every
    /// [`Cache::revocations`] stream.
    async fn revoke(&self, id: &str, ttl: Duration) -> Result<(), CacheError>;

    async fn is_revoked(&self, id: &str) -> Result<bool, CacheError>;

    /// Token ids as they are revoked, from now on. A hint that lets
    /// verifiers act at once; [`Cache::is_revoked`] stays the truth.
    async fn revocations(&self) -> Result<BoxStream<'static, String>, CacheError>;
}

/// The adapter a `--cache` URL names: `memory` or `redis://HOST:PORT[/DB]`.
pub async fn connect(url: &str) -> Result<Arc<dyn Cache>, CacheError> {
    match parse_url(url)? {
        CacheUrl::Memory => Ok(Arc::new(MemoryCache::new())),
        CacheUrl::Redis(url) => Ok(Arc::new(RedisCache::connect(&url, "capstan").await?)),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheUrl {
    Memory,
    Redis(String),
}

/// Checks a `--cache` URL without connecting.
pub fn parse_url(url: &str) -> Result<CacheUrl, CacheError> {
    let invalid = |reason: String| CacheError::Invalid {
        field: "--cache",
        reason,
    };
    if url == "memory" {
        return Ok(CacheUrl::Memory);
    }
    let Some(rest) = url.strip_prefix("redis://") else {
        return Err(invalid(format!(
            "`{url}` is neither `memory` nor `redis://HOST:PORT[/DB]`"
        )));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    if host_port.is_empty() {
        return Err(invalid(format!(
            "`{}` names no host (redis://HOST:PORT[/DB])",
            redact(url)
        )));
    }
    if let Some(db) = rest.split_once('/').map(|(_, db)| db)
        && !db.is_empty()
        && db.parse::<u16>().is_err()
    {
        return Err(invalid(format!("database `{db}` is not a number")));
    }
    ::redis::Client::open(url).map_err(|e| invalid(format!("`{}`: {e}", redact(url))))?;
    Ok(CacheUrl::Redis(url.to_string()))
}

/// `url` with any password replaced, for errors and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://<redacted>@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_name_the_flag() {
        assert_eq!(parse_url("memory").unwrap(), CacheUrl::Memory);
        assert!(matches!(
            parse_url("redis://127.0.0.1:6379/2").unwrap(),
            CacheUrl::Redis(_)
        ));
        for bad in ["", "redis", "http://x", "redis://", "redis://h:1/abc"] {
            let error = parse_url(bad).unwrap_err().to_string();
            assert!(error.starts_with("--cache: "), "{bad}: {error}");
        }
        let error = parse_url("redis://:hunter2@/0").unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn bad_limits_name_the_field() {
        let error = RateLimit {
            burst: 0,
            per_second: 1.0,
        }
        .check()
        .unwrap_err();
        assert_eq!(error.to_string(), "burst: must be at least 1");
        let error = RateLimit {
            burst: 1,
            per_second: f64::NAN,
        }
        .check()
        .unwrap_err();
        assert!(error.to_string().starts_with("per_second: "));
    }
}
