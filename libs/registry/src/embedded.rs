use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Check, Registration, RegistryError, ServiceInstance, ServiceRegistry};

/// An in-process registry for `capstan dev`: the same semantics as Consul's
/// agent, checks run by a background task.
#[derive(Clone)]
pub struct EmbeddedRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Mutex<BTreeMap<String, Entry>>,
    index: watch::Sender<u64>,
}

struct Entry {
    registration: Registration,
    passing: bool,
    /// TTL checks: when the check goes critical. HTTP checks: the next probe.
    deadline: Instant,
}

impl EmbeddedRegistry {
    /// Starts the check loop; it stops with `shutdown`.
    pub fn start(shutdown: CancellationToken) -> Self {
        let registry = EmbeddedRegistry {
            inner: Arc::new(Inner {
                entries: Mutex::new(BTreeMap::new()),
                index: watch::channel(1).0,
            }),
        };
        let checker = registry.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => checker.run_checks().await,
                }
            }
        });
        registry
    }

    fn bump(&self) {
        self.inner.index.send_modify(|i| *i += 1);
    }

    fn set_passing(&self, id: &str, passing: bool) {
        let changed = {
            let mut entries = self.inner.entries.lock().expect("registry lock poisoned");
            match entries.get_mut(id) {
                Some(entry) if entry.passing != passing => {
                    entry.passing = passing;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.bump();
        }
    }

    async fn run_checks(&self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut probes = Vec::new();
        {
            let mut entries = self.inner.entries.lock().expect("registry lock poisoned");
            for (id, entry) in entries.iter_mut() {
                if entry.deadline > now {
                    continue;
                }
                match &entry.registration.check {
                    Check::Ttl { .. } => expired.push(id.clone()),
                    Check::Http {
                        url,
                        interval,
                        timeout,
                    } => {
                        entry.deadline = now + *interval;
                        probes.push((id.clone(), url.clone(), *timeout));
                    }
                }
            }
        }
        for id in expired {
            self.set_passing(&id, false);
        }
        for (id, url, timeout) in probes {
            let registry = self.clone();
            tokio::spawn(async move {
                let ok = tokio::time::timeout(timeout, http_get_ok(&url))
                    .await
                    .unwrap_or(false);
                registry.set_passing(&id, ok);
            });
        }
    }

    fn passing(&self, name: &str) -> Vec<ServiceInstance> {
        let entries = self.inner.entries.lock().expect("registry lock poisoned");
        entries
            .values()
            .filter(|e| e.passing && e.registration.name == name)
            .map(|e| ServiceInstance {
                id: e.registration.id.clone(),
                name: e.registration.name.clone(),
                address: e.registration.address.clone(),
                tags: e.registration.tags.clone(),
            })
            .collect()
    }
}

/// A 2xx answer to `GET url` (plain http only), as Consul's HTTP check.
async fn http_get_ok(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let Ok(mut stream) = tokio::net::TcpStream::connect(authority).await else {
        return false;
    };
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: capstan-registry\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if stream.read_exact(&mut head).await.is_err() {
        return false;
    }
    head.starts_with(b"HTTP/1.") && head[9] == b'2'
}

#[async_trait]
impl ServiceRegistry for EmbeddedRegistry {
    async fn register(&self, registration: Registration) -> Result<(), RegistryError> {
        let entry = Entry {
            registration,
            passing: false,
            deadline: Instant::now(),
        };
        self.inner
            .entries
            .lock()
            .expect("registry lock poisoned")
            .insert(entry.registration.id.clone(), entry);
        self.bump();
        Ok(())
    }

    async fn deregister(&self, id: &str) -> Result<(), RegistryError> {
        let removed = self
            .inner
            .entries
            .lock()
            .expect("registry lock poisoned")
            .remove(id);
        if removed.is_some() {
            self.bump();
        }
        Ok(())
    }

    async fn pass_ttl(&self, id: &str) -> Result<(), RegistryError> {
        {
            let mut entries = self.inner.entries.lock().expect("registry lock poisoned");
            let entry = entries
                .get_mut(id)
                .ok_or_else(|| RegistryError::UnknownInstance(id.to_string()))?;
            let Check::Ttl { ttl } = entry.registration.check else {
                return Err(RegistryError::UnknownInstance(format!(
                    "{id} has no TTL check"
                )));
            };
            entry.deadline = Instant::now() + ttl;
        }
        self.set_passing(id, true);
        Ok(())
    }

    async fn healthy(&self, name: &str) -> Result<Vec<ServiceInstance>, RegistryError> {
        Ok(self.passing(name))
    }

    async fn watch(
        &self,
        name: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(u64, Vec<ServiceInstance>), RegistryError> {
        let mut rx = self.inner.index.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|current| *current > index)).await;
        let current = *rx.borrow();
        Ok((current, self.passing(name)))
    }
}

#[cfg(test)]
mod tests {
    /// Time is paused: TTLs and watch waits are exact, and no test waits
    /// on the wall clock for them.
    #[tokio::test(start_paused = true)]
    async fn passes_the_timed_contract() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        crate::contract::run_timed(&super::EmbeddedRegistry::start(shutdown.clone())).await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn passes_the_realtime_contract() {
        // The same checks the Consul adapter runs, on a real clock.
        let shutdown = tokio_util::sync::CancellationToken::new();
        crate::contract::run_realtime(&super::EmbeddedRegistry::start(shutdown.clone())).await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn passes_the_networked_contract() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        crate::contract::run_networked(&super::EmbeddedRegistry::start(shutdown.clone())).await;
        shutdown.cancel();
    }
}
