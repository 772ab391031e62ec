//! The lock port: who holds a singleton role (the orchestrator's
//! reconciler, the scheduler's node watcher), for at most one holder at a
//! time, lost when the holder stops renewing.
//!
//! A lock only says who *should* lead. It cannot stop a holder that was
//! paused past its TTL from acting on its belief; the store's fence does
//! that (`capstan_server::leader`).
//!
//! Adapters: [`ConsulLocks`] (a session with a TTL and a lock-delay, plus a
//! KV acquire), and the Store's lease rows in `capstan_server::leader`.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use crate::RegistryError;
use crate::consul::{CALL_TIMEOUT, ConsulAgent, go_duration, path_segment};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock is no longer ours (taken over, or expired).
    #[error("lock lost: {0}")]
    Lost(String),
    /// The backend did not answer; the lock may still be ours.
    #[error("lock backend unavailable: {0}")]
    Unavailable(String),
}

impl From<RegistryError> for LockError {
    fn from(e: RegistryError) -> Self {
        LockError::Unavailable(e.to_string())
    }
}

/// A lock this process holds.
#[async_trait]
pub trait HeldLock: Send + Sync {
    /// Keeps the lock for another TTL.
    async fn renew(&mut self) -> Result<(), LockError>;
    /// Gives it up, so a standby takes it at once.
    async fn release(self: Box<Self>);
    /// How often to renew.
    fn renew_every(&self) -> Duration;
    /// How long the lock lasts without a renewal, from the last one.
    fn ttl(&self) -> Duration;
}

#[async_trait]
pub trait Locks: Send + Sync + 'static {
    /// One attempt to take `role` for `holder`; `Ok(None)` when someone else
    /// holds it.
    async fn try_lock(
        &self,
        role: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Box<dyn HeldLock>>, LockError>;
}

/// Consul's session TTLs lie between 10 s and 24 h.
pub const CONSUL_MIN_SESSION_TTL: Duration = Duration::from_secs(10);
const CONSUL_MAX_SESSION_TTL: Duration = Duration::from_secs(86_400);
/// How long Consul keeps a lock of an invalidated session from being taken.
/// The fence, not the delay, is what keeps a stale leader out, so it is
/// short: a second for the old holder's in-flight calls to land or fail.
pub const CONSUL_LOCK_DELAY: Duration = Duration::from_secs(1);
/// Where the locks live in Consul's KV.
pub const CONSUL_LOCK_PREFIX: &str = "capstan/leader";

/// Locks as Consul sessions plus KV acquires.
#[derive(Clone)]
pub struct ConsulLocks {
    agent: ConsulAgent,
}

impl ConsulLocks {
    pub fn new(agent: ConsulAgent) -> Self {
        Self { agent }
    }

    /// The TTL a session for `ttl` gets: Consul's bounds apply.
    pub fn session_ttl(ttl: Duration) -> Duration {
        ttl.clamp(CONSUL_MIN_SESSION_TTL, CONSUL_MAX_SESSION_TTL)
    }

    /// The body of `PUT /v1/session/create`.
    pub fn session_body(role: &str, holder: &str, ttl: Duration) -> Value {
        json!({
            "Name": format!("capstan-{role}-{holder}"),
            "TTL": go_duration(Self::session_ttl(ttl)),
            "LockDelay": go_duration(CONSUL_LOCK_DELAY),
            "Behavior": "release",
        })
    }

    async fn destroy(agent: &ConsulAgent, session: &str) {
        if let Err(e) = agent
            .ok(Method::PUT, &format!("/v1/session/destroy/{session}"), None)
            .await
        {
            tracing::warn!("consul: destroy session {session}: {e}");
        }
    }
}

fn session_id(answer: &Value) -> Result<String, LockError> {
    let id = answer["ID"]
        .as_str()
        .ok_or_else(|| LockError::Unavailable("consul: session create answered no ID".into()))?;
    // The id goes into URL paths and queries: a UUID, nothing else.
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(LockError::Unavailable(format!(
            "consul: session create answered an id that is not a UUID: {id:?}"
        )));
    }
    Ok(id.to_string())
}

#[async_trait]
impl Locks for ConsulLocks {
    async fn try_lock(
        &self,
        role: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Box<dyn HeldLock>>, LockError> {
        let role = path_segment(role).map_err(|e| LockError::Unavailable(e.to_string()))?;
        let body = Self::session_body(role, holder, ttl);
        let created = self
            .agent
            .ok(Method::PUT, "/v1/session/create", Some(&body))
            .await?;
        let session = session_id(&created.json()?)?;
        let key = format!("/v1/kv/{CONSUL_LOCK_PREFIX}/{role}");
        let answer = self
            .agent
            .call_bytes(
                Method::PUT,
                &format!("{key}?acquire={session}"),
                Some((Bytes::from(holder.to_string()), "text/plain")),
                CALL_TIMEOUT,
            )
            .await;
        let acquired = match answer {
            Ok(answer) if answer.status.is_success() => {
                String::from_utf8_lossy(&answer.body).trim() == "true"
            }
            Ok(answer) => {
                Self::destroy(&self.agent, &session).await;
                return Err(LockError::Unavailable(format!(
                    "consul: acquire {key}: {} {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body).trim()
                )));
            }
            Err(e) => {
                Self::destroy(&self.agent, &session).await;
                return Err(e.into());
            }
        };
        if !acquired {
            // Held by another session (or within its lock-delay).
            Self::destroy(&self.agent, &session).await;
            return Ok(None);
        }
        Ok(Some(Box::new(ConsulLock {
            agent: self.agent.clone(),
            key,
            session,
            ttl: Self::session_ttl(ttl),
        })))
    }
}

struct ConsulLock {
    agent: ConsulAgent,
    key: String,
    session: String,
    ttl: Duration,
}

#[async_trait]
impl HeldLock for ConsulLock {
    async fn renew(&mut self) -> Result<(), LockError> {
        let answer = self
            .agent
            .call(
                Method::PUT,
                &format!("/v1/session/renew/{}", self.session),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        match answer.status {
            status if status.is_success() => Ok(()),
            // The session was invalidated (TTL, destroyed): its lock is gone.
            StatusCode::NOT_FOUND => Err(LockError::Lost(format!(
                "consul session {} is gone",
                self.session
            ))),
            status => Err(LockError::Unavailable(format!(
                "consul: renew session {}: {status} {}",
                self.session,
                String::from_utf8_lossy(&answer.body).trim()
            ))),
        }
    }

    async fn release(self: Box<Self>) {
        let released = self
            .agent
            .call(
                Method::PUT,
                &format!("{}?release={}", self.key, self.session),
                None,
                CALL_TIMEOUT,
            )
            .await;
        if let Err(e) = released {
            tracing::warn!("consul: release {}: {e}", self.key);
        }
        ConsulLocks::destroy(&self.agent, &self.session).await;
    }

    fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// The contract every [`Locks`] adapter passes. `invalidate(role)` ends the
/// current holder's lock behind its back, as the backend would on expiry;
/// `settle` is how long the backend may keep a lost lock from being taken
/// (Consul's lock-delay).
pub async fn contract<F, Fut>(locks: &dyn Locks, ttl: Duration, settle: Duration, invalidate: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let role = format!("contract-{}", std::process::id());
    let mut a = locks
        .try_lock(&role, "a", ttl)
        .await
        .unwrap()
        .expect("a free role is taken");
    assert!(
        locks.try_lock(&role, "b", ttl).await.unwrap().is_none(),
        "a held role is not taken"
    );
    a.renew().await.expect("the holder renews");
    assert!(
        locks.try_lock(&role, "b", ttl).await.unwrap().is_none(),
        "a renewed role is not taken"
    );
    a.release().await;
    let mut b = locks
        .try_lock(&role, "b", ttl)
        .await
        .unwrap()
        .expect("a released role is taken at once");

    // Lost behind the holder's back: its renewal says so, and the role is
    // free again (after the backend's settling time).
    invalidate(role.clone()).await;
    match b.renew().await {
        Err(LockError::Lost(_)) => {}
        other => panic!("a renewal of an invalidated lock must say it is lost: {other:?}"),
    }
    let deadline = tokio::time::Instant::now() + settle + Duration::from_secs(5);
    loop {
        if let Some(c) = locks.try_lock(&role, "c", ttl).await.unwrap() {
            c.release().await;
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "an invalidated lock was never free again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_follow_the_api_and_its_bounds() {
        let body =
            ConsulLocks::session_body("reconciler", "orchestrator-1", Duration::from_secs(2));
        assert_eq!(body["TTL"], "10000ms", "Consul's minimum session TTL");
        assert_eq!(body["LockDelay"], "1000ms");
        assert_eq!(body["Behavior"], "release");
        assert_eq!(
            ConsulLocks::session_ttl(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn a_session_id_that_is_not_a_uuid_is_refused() {
        assert!(session_id(&json!({"ID": "adf4238a-882b-9ddc-4a9d-5b6758e4159e"})).is_ok());
        for bad in [json!({}), json!({"ID": "../../kv"}), json!({"ID": "a?b=c"})] {
            assert!(session_id(&bad).is_err(), "{bad}");
        }
    }
}
