//! The service-registry port. Its model is Consul's, so the Consul adapter is
//! a thin translation:
//!
//! - a service instance registers with one check, TTL (the instance calls
//!   [`ServiceRegistry::pass_ttl`] within every TTL) or HTTP (the registry
//!   polls a URL); a new instance starts *critical* until its check passes;
//! - lookups return passing instances;
//! - [`ServiceRegistry::watch`] is a blocking query: it returns when the
//!   registry's index moves past the caller's, or when `wait` runs out.

use std::time::Duration;

use async_trait::async_trait;

pub mod consul;
pub mod contract;
mod embedded;
pub mod kv;
pub mod lock;

pub use consul::ConsulRegistry;
pub use embedded::EmbeddedRegistry;
pub use kv::ConsulKv;
pub use lock::{ConsulLocks, HeldLock, LockError, Locks};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Ttl {
        ttl: Duration,
    },
    Http {
        url: String,
        interval: Duration,
        timeout: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Unique per instance, e.g. `scheduler-1`.
    pub id: String,
    /// The service, e.g. `scheduler`.
    pub name: String,
    /// `host:port`.
    pub address: String,
    pub tags: Vec<String>,
    pub check: Check,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInstance {
    pub id: String,
    pub name: String,
    pub address: String,
    pub tags: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no registered service instance `{0}`")]
    UnknownInstance(String),
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait ServiceRegistry: Send + Sync + 'static {
    /// Registers or replaces the instance with this id.
    async fn register(&self, registration: Registration) -> Result<(), RegistryError>;
    async fn deregister(&self, id: &str) -> Result<(), RegistryError>;
    /// Marks a TTL check passing for another TTL.
    async fn pass_ttl(&self, id: &str) -> Result<(), RegistryError>;
    /// Passing instances of `name`, ordered by id.
    async fn healthy(&self, name: &str) -> Result<Vec<ServiceInstance>, RegistryError>;
    /// Blocks until the index passes `index` or `wait` runs out; returns the
    /// current index and the passing instances of `name`.
    async fn watch(
        &self,
        name: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(u64, Vec<ServiceInstance>), RegistryError>;
}

/// Waits until `name` has a passing instance and returns the first.
pub async fn resolve(
    registry: &dyn ServiceRegistry,
    name: &str,
    timeout: Duration,
) -> Result<ServiceInstance, RegistryError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut index = 0;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (next, instances) = registry
            .watch(name, index, remaining.min(Duration::from_secs(5)))
            .await?;
        if let Some(first) = instances.into_iter().next() {
            return Ok(first);
        }
        if remaining.is_zero() {
            return Err(RegistryError::Unavailable(format!(
                "no healthy `{name}` within {timeout:?}"
            )));
        }
        index = next;
    }
}
