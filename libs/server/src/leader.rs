//! Leader election for singleton roles (the orchestrator's reconciler, the
//! scheduler's node watcher), with fencing.
//!
//! Who leads is a lock ([`capstan_registry::Locks`]): with Consul a session
//! plus a KV acquire ([`capstan_registry::ConsulLocks`]), else a lease row
//! in the Store ([`StoreLocks`]: `leases/<role>`, holder and expiry, taken
//! and renewed with compare-and-set).
//!
//! A lock cannot stop a holder that was paused past its TTL from acting on
//! its belief, so every leader also bumps `fences/<role>` (its epoch) right
//! after taking the lock and before doing any work, and does all its work
//! through a [`FencedStore`] on that row's version. A leader that was
//! paused past its lock and resumes can change nothing: every write it
//! makes is refused ([`capstan_store::StoreError::Fenced`]), and at its next
//! renewal it finds the lock lost or the fence moved, and steps down.
//!
//! With the Store's leases, replicas on different hosts must keep their
//! clocks within a small part of the TTL of each other (NTP): expiry is
//! judged by the reader's clock. Consul judges its sessions' TTLs itself.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capstan_registry::{HeldLock, LockError, Locks};
use capstan_store::{Expect, Fence, FencedStore, Store, StoreError, Table};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::now_ms;

pub const LEASES: &str = "leases";
pub const FENCES: &str = "fences";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub expires_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Epoch {
    pub holder: String,
    pub epoch: u64,
}

/// Locks as lease rows in the Store: what embedded mode and a Store shared
/// without Consul elect with.
pub struct StoreLocks {
    store: Arc<dyn Store>,
}

impl StoreLocks {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

fn lost_or_unavailable(e: StoreError) -> LockError {
    match e {
        StoreError::Conflict { .. } | StoreError::Fenced { .. } => LockError::Lost(e.to_string()),
        e => LockError::Unavailable(e.to_string()),
    }
}

#[async_trait]
impl Locks for StoreLocks {
    async fn try_lock(
        &self,
        role: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Box<dyn HeldLock>>, LockError> {
        let leases: Table<Lease> = Table::new(self.store.clone(), LEASES);
        let now = now_ms();
        let expect = match leases.get(role).await.map_err(lost_or_unavailable)? {
            Some((_, lease)) if lease.expires_ms > now && lease.holder != holder => {
                return Ok(None);
            }
            Some((version, _)) => Expect::Version(version),
            None => Expect::Absent,
        };
        let lease = Lease {
            holder: holder.to_string(),
            expires_ms: now + ttl.as_millis() as i64,
        };
        match leases.put(role, &lease, expect).await {
            Ok(version) => Ok(Some(Box::new(StoreLock {
                leases,
                role: role.to_string(),
                lease,
                version,
                ttl,
            }))),
            Err(StoreError::Conflict { .. }) => Ok(None),
            Err(e) => Err(LockError::Unavailable(e.to_string())),
        }
    }
}

struct StoreLock {
    leases: Table<Lease>,
    role: String,
    lease: Lease,
    version: u64,
    ttl: Duration,
}

#[async_trait]
impl HeldLock for StoreLock {
    async fn renew(&mut self) -> Result<(), LockError> {
        let now = now_ms();
        if now >= self.lease.expires_ms {
            return Err(LockError::Lost(
                "the lease expired before it was renewed".into(),
            ));
        }
        let lease = Lease {
            holder: self.lease.holder.clone(),
            expires_ms: now + self.ttl.as_millis() as i64,
        };
        self.version = self
            .leases
            .put(&self.role, &lease, Expect::Version(self.version))
            .await
            .map_err(lost_or_unavailable)?;
        self.lease = lease;
        Ok(())
    }

    async fn release(self: Box<Self>) {
        let _ = self.leases.delete(&self.role, self.version).await;
    }

    fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// One candidate for one role.
#[derive(Clone)]
pub struct Election {
    locks: Arc<dyn Locks>,
    store: Arc<dyn Store>,
    role: String,
    holder: String,
    ttl: Duration,
}

/// Held while this candidate leads: work through [`Leadership::store`], and
/// stop when [`Leadership::lost`] fires.
pub struct Leadership {
    pub epoch: u64,
    fence: Fence,
    store: Arc<dyn Store>,
    lost: CancellationToken,
    /// Hands the lock back when it ends; `None` once resigned.
    renewer: Option<tokio::task::JoinHandle<Option<Box<dyn HeldLock>>>>,
}

impl Leadership {
    /// The store every write of this term goes through.
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::new(FencedStore::new(self.store.clone(), self.fence.clone()))
    }

    /// Fires when the lock is lost (taken over, not renewed in time, or the
    /// fence moved).
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Gives the lock up so a standby takes over at once.
    pub async fn resign(mut self) {
        self.lost.cancel();
        if let Some(renewer) = self.renewer.take()
            && let Ok(Some(lock)) = renewer.await
        {
            lock.release().await;
        }
    }
}

/// Dropped without resigning, the lock is left to expire.
impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        self.lost.cancel();
    }
}

impl Election {
    /// A candidate electing with the Store's lease rows.
    pub fn new(store: Arc<dyn Store>, role: &str, holder: &str, ttl: Duration) -> Self {
        Self::with_locks(
            Arc::new(StoreLocks::new(store.clone())),
            store,
            role,
            holder,
            ttl,
        )
    }

    /// A candidate electing with `locks`, fenced in `store`.
    pub fn with_locks(
        locks: Arc<dyn Locks>,
        store: Arc<dyn Store>,
        role: &str,
        holder: &str,
        ttl: Duration,
    ) -> Self {
        Self {
            locks,
            store,
            role: role.to_string(),
            holder: holder.to_string(),
            ttl,
        }
    }

    fn epochs(&self) -> Table<Epoch> {
        Table::new(self.store.clone(), FENCES)
    }

    /// Waits until this candidate leads, or `None` at shutdown.
    pub async fn campaign(&self, shutdown: &CancellationToken) -> Option<Leadership> {
        loop {
            match self.try_acquire().await {
                Ok(Some(leadership)) => {
                    tracing::info!(role = %self.role, holder = %self.holder, epoch = leadership.epoch, "acquired leadership");
                    return Some(leadership);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(role = %self.role, "leader election: {e}"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(self.ttl / 3) => {}
            }
        }
    }

    /// Takes the lock if nobody holds it, and bumps the fence.
    pub async fn try_acquire(&self) -> Result<Option<Leadership>, LockError> {
        let Some(lock) = self
            .locks
            .try_lock(&self.role, &self.holder, self.ttl)
            .await?
        else {
            return Ok(None);
        };
        let unavailable = |e: StoreError| LockError::Unavailable(e.to_string());
        let (expect, epoch) = match self.epochs().get(&self.role).await.map_err(unavailable)? {
            Some((version, epoch)) => (Expect::Version(version), epoch.epoch + 1),
            None => (Expect::Absent, 1),
        };
        let record = Epoch {
            holder: self.holder.clone(),
            epoch,
        };
        let fence_version = match self.epochs().put(&self.role, &record, expect).await {
            Ok(version) => version,
            // Someone took office between our lock and our fence: we were
            // paused past our own lock. Not ours.
            Err(StoreError::Conflict { .. }) => {
                lock.release().await;
                return Ok(None);
            }
            Err(e) => {
                lock.release().await;
                return Err(unavailable(e));
            }
        };
        let fence = Fence {
            table: FENCES.to_string(),
            key: self.role.clone(),
            version: fence_version,
        };
        let lost = CancellationToken::new();
        let renewer = tokio::spawn(self.clone().renew(lock, fence.clone(), lost.clone()));
        Ok(Some(Leadership {
            epoch,
            fence,
            store: self.store.clone(),
            lost,
            renewer: Some(renewer),
        }))
    }

    /// Renews the lock as often as it asks, and checks after each renewal
    /// that the fence is still ours; fires `lost` when either fails, or when
    /// the lock ran out before a renewal got through. Hands the lock back
    /// when `lost` fired from outside (a resignation).
    async fn renew(
        self,
        mut lock: Box<dyn HeldLock>,
        fence: Fence,
        lost: CancellationToken,
    ) -> Option<Box<dyn HeldLock>> {
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = lost.cancelled() => return Some(lock),
                _ = tokio::time::sleep(lock.renew_every()) => {}
            }
            if renewed.elapsed() >= lock.ttl() {
                tracing::warn!(role = %self.role, "the lock expired before it was renewed; stepping down");
                lost.cancel();
                return None;
            }
            match lock.renew().await {
                Ok(()) => renewed = tokio::time::Instant::now(),
                Err(LockError::Lost(why)) => {
                    tracing::warn!(role = %self.role, "lost leadership: {why}");
                    lost.cancel();
                    return None;
                }
                Err(e) => {
                    tracing::warn!(role = %self.role, "lock renewal failed, retrying: {e}");
                    continue;
                }
            }
            match self.epochs().get(&self.role).await {
                Ok(Some((version, _))) if version == fence.version => {}
                Ok(_) => {
                    tracing::warn!(role = %self.role, "the fence moved: a newer leader took office; stepping down");
                    lost.cancel();
                    return Some(lock);
                }
                Err(e) => tracing::warn!(role = %self.role, "cannot read the fence: {e}"),
            }
        }
    }

    /// Runs `work` whenever this candidate leads, with the fenced store,
    /// until `shutdown`. `work` must return when its token fires.
    pub async fn lead<F, Fut>(self, shutdown: CancellationToken, mut work: F)
    where
        F: FnMut(Arc<dyn Store>, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        while let Some(leadership) = self.campaign(&shutdown).await {
            let term = leadership.lost();
            let stop = CancellationToken::new();
            {
                let stop = stop.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = term.cancelled() => {}
                        _ = shutdown.cancelled() => {}
                    }
                    stop.cancel();
                });
            }
            work(leadership.store(), stop).await;
            if shutdown.is_cancelled() {
                leadership.resign().await;
                return;
            }
            let epoch = leadership.epoch;
            // The lock may still be ours (the fence moved): give it back.
            leadership.resign().await;
            tracing::info!(role = %self.role, epoch, "no longer the leader; campaigning again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_registry::Locks;
    use capstan_store::MemoryStore;

    const TTL: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn one_leader_at_a_time_and_a_standby_takes_over_an_expired_lease() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let a = Election::new(store.clone(), "r", "a", TTL);
        let b = Election::new(store.clone(), "r", "b", TTL);
        let leader = a.try_acquire().await.unwrap().expect("a leads");
        assert!(b.try_acquire().await.unwrap().is_none(), "b waits");
        // a keeps renewing: b still cannot take it after several TTLs.
        tokio::time::sleep(TTL * 3).await;
        assert!(b.try_acquire().await.unwrap().is_none(), "a renews");
        assert!(!leader.lost().is_cancelled());
        // a stops renewing (dropped without resigning): b takes over after the TTL.
        drop(leader);
        tokio::time::sleep(TTL + Duration::from_millis(50)).await;
        let next = b.try_acquire().await.unwrap().expect("b takes over");
        assert_eq!(next.epoch, 2);
    }

    #[tokio::test]
    async fn a_paused_leader_that_resumes_can_change_nothing() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let a = Election::new(store.clone(), "r", "a", TTL);
        let b = Election::new(store.clone(), "r", "b", TTL);
        let mut old = a.try_acquire().await.unwrap().unwrap();
        let old_store = old.store();
        let rows: Table<u32> = Table::new(old_store.clone(), "work");
        rows.write("x", &1, None).await.unwrap();
        // "Pause" a: its renewals stop (as under SIGSTOP), its lease runs out.
        old.renewer.take().unwrap().abort();
        tokio::time::sleep(TTL + Duration::from_millis(50)).await;
        let new = b.try_acquire().await.unwrap().expect("b takes over");
        let new_rows: Table<u32> = Table::new(new.store(), "work");
        new_rows.write("x", &2, None).await.unwrap();
        // a resumes and writes as if it still led: every write is refused.
        for result in [
            rows.write("x", &3, None).await,
            rows.write("y", &3, None).await,
            rows.remove("x").await,
        ] {
            assert!(
                matches!(result, Err(StoreError::Fenced { .. })),
                "{result:?}"
            );
        }
        let plain: Table<u32> = Table::new(store.clone(), "work");
        assert_eq!(plain.get("x").await.unwrap().map(|(_, v)| v), Some(2));
        assert_eq!(plain.get("y").await.unwrap(), None);
    }

    #[tokio::test]
    async fn resigning_hands_over_at_once() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let a = Election::new(store.clone(), "r", "a", Duration::from_secs(60));
        let b = Election::new(store.clone(), "r", "b", Duration::from_secs(60));
        let leader = a.try_acquire().await.unwrap().unwrap();
        leader.resign().await;
        assert!(b.try_acquire().await.unwrap().is_some());
    }

    #[tokio::test]
    async fn lead_runs_the_work_only_while_leading() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let shutdown = CancellationToken::new();
        let terms = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let a = Election::new(store.clone(), "r", "a", TTL);
        let task = tokio::spawn({
            let terms = terms.clone();
            a.lead(shutdown.clone(), move |_, stop| {
                terms.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move { stop.cancelled().await }
            })
        });
        tokio::time::sleep(TTL).await;
        assert_eq!(terms.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Someone moves the fence (a newer leader elsewhere): a steps down at
        // its next renewal and campaigns again.
        let epochs: Table<Epoch> = Table::new(store.clone(), FENCES);
        let (version, mut epoch) = epochs.get("r").await.unwrap().unwrap();
        epoch.epoch += 1;
        epochs
            .put("r", &epoch, Expect::Version(version))
            .await
            .unwrap();
        tokio::time::sleep(TTL * 3).await;
        assert_eq!(
            terms.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "stepped down, then led again once its own lease was free"
        );
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn store_locks_pass_the_lock_contract() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let locks = StoreLocks::new(store.clone());
        // Behind the holder's back: its lease row is taken over.
        capstan_registry::lock::contract(&locks, TTL, Duration::ZERO, |role| {
            let store = store.clone();
            async move {
                let leases: Table<Lease> = Table::new(store, LEASES);
                let (version, _) = leases.get(&role).await.unwrap().unwrap();
                leases.delete(&role, version).await.unwrap();
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn on_consul_an_invalidated_leader_steps_down_and_its_writes_are_refused() {
        let double = capstan_testkit::consul_double::ConsulDouble::start().await;
        let registry = capstan_registry::ConsulRegistry::new(&double.url(), None).unwrap();
        let locks: Arc<dyn Locks> =
            Arc::new(capstan_registry::ConsulLocks::new(registry.agent().clone()));
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let ttl = Duration::from_secs(10);
        let a = Election::with_locks(locks.clone(), store.clone(), "r", "a", ttl);
        let b = Election::with_locks(locks.clone(), store.clone(), "r", "b", ttl);
        let old = a.try_acquire().await.unwrap().expect("a leads");
        assert!(b.try_acquire().await.unwrap().is_none(), "b waits");
        let rows: Table<u32> = Table::new(old.store(), "work");
        rows.write("x", &1, None).await.unwrap();
        // Consul ends a's session (its TTL ran out while it was paused).
        let key = format!("{}/r", capstan_registry::lock::CONSUL_LOCK_PREFIX);
        assert!(double.invalidate_session(&double.lock_holder(&key).unwrap()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let new = loop {
            if let Some(new) = b.try_acquire().await.unwrap() {
                break new;
            }
            assert!(tokio::time::Instant::now() < deadline, "b never took over");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(new.epoch, 2);
        // a, resumed, still writes as leader: refused by the fence.
        assert!(matches!(
            rows.write("x", &3, None).await,
            Err(StoreError::Fenced { .. })
        ));
        // And a notices at its next renewal (every third of the TTL).
        tokio::time::timeout(ttl, old.lost().cancelled())
            .await
            .expect("a stepped down");
        new.resign().await;
        assert!(
            double.lock_holder(&key).is_none(),
            "resigning releases the lock"
        );
    }
}
