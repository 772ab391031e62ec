//! The event log: every event from the bus, stored once (deduplicated by id)
//! and fanned out to `WatchEvents` streams.
//!
//! Events are stored in time buckets, one store table per hour
//! (`events.<hours since the epoch>`, keys `<time ms>-<id>` within it), with
//! the buckets listed in `event_buckets`. On ScyllaDB a table is a
//! partition, so the log is time-bucketed partitions: no partition grows
//! without bound, and trimming drops whole hours.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use capstan_events::Deduper;
use capstan_server::Platform;
use capstan_store::{Expect, Store, StoreError, Table};
use capstan_types::{Error, Event};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::records::EVENTS;

/// Events kept in the log at least; older whole buckets are trimmed.
const RETAIN: usize = 5000;
/// One bucket per hour.
const BUCKET_MS: i64 = 3_600_000;
/// The index of buckets: key = the bucket's zero-padded hour.
const BUCKETS: &str = "event_buckets";

fn bucket_of(event: &Event) -> String {
    format!("{:010}", event.time_ms.max(0) / BUCKET_MS)
}

fn bucket_table(bucket: &str) -> Cow<'static, str> {
    Cow::Owned(format!("{EVENTS}.{bucket}"))
}

#[derive(Clone)]
pub struct EventLog {
    store: Arc<dyn Store>,
    buckets: Table<()>,
    /// Events from before buckets: read as the oldest, trimmed first.
    legacy: Table<Event>,
    /// The last bucket this replica listed in the index.
    indexed: Arc<Mutex<Option<String>>>,
    live: broadcast::Sender<Event>,
}

impl EventLog {
    pub fn new(platform: &Platform) -> Self {
        EventLog {
            store: platform.store.clone(),
            buckets: Table::new(platform.store.clone(), BUCKETS),
            legacy: Table::new(platform.store.clone(), EVENTS),
            indexed: Arc::default(),
            live: broadcast::channel(1024).0,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.live.subscribe()
    }

    fn bucket(&self, bucket: &str) -> Table<Event> {
        Table::named(self.store.clone(), bucket_table(bucket))
    }

    /// Buckets, newest first.
    async fn bucket_names(&self) -> Result<Vec<String>, Error> {
        let mut names: Vec<String> = self
            .buckets
            .list("")
            .await
            .map_err(Error::internal)?
            .into_iter()
            .map(|(key, _, ())| key)
            .collect();
        names.reverse();
        Ok(names)
    }

    /// The last `limit` events, oldest first, optionally of one app. Reads
    /// buckets from the newest back until it has `limit`.
    pub async fn recent(&self, app: &str, limit: usize) -> Result<Vec<Event>, Error> {
        let mine = |events: Vec<(String, u64, Event)>| -> Vec<Event> {
            events
                .into_iter()
                .map(|(_, _, e)| e)
                .filter(|e| app.is_empty() || e.app == app)
                .collect()
        };
        let mut newest_first: Vec<Vec<Event>> = Vec::new();
        let mut found = 0;
        for bucket in self.bucket_names().await? {
            if found >= limit {
                break;
            }
            let events = mine(
                self.bucket(&bucket)
                    .list("")
                    .await
                    .map_err(Error::internal)?,
            );
            found += events.len();
            newest_first.push(events);
        }
        if found < limit {
            newest_first.push(mine(self.legacy.list("").await.map_err(Error::internal)?));
        }
        let mut events: Vec<Event> = newest_first.into_iter().rev().flatten().collect();
        let skip = events.len().saturating_sub(limit);
        events.drain(..skip);
        Ok(events)
    }

    /// Stores an event unless already stored; true when it was new.
    async fn append(&self, event: &Event) -> Result<bool, Error> {
        let bucket = bucket_of(event);
        let listed = self.indexed.lock().expect("index lock poisoned").as_ref() == Some(&bucket);
        if !listed {
            // Listed before the event is written, so no stored event is in
            // a bucket the index does not name.
            self.buckets
                .write(&bucket, &(), None)
                .await
                .map_err(Error::internal)?;
            *self.indexed.lock().expect("index lock poisoned") = Some(bucket.clone());
        }
        let key = format!("{:013}-{}", event.time_ms.max(0), event.id);
        match self.bucket(&bucket).put(&key, event, Expect::Absent).await {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(Error::internal(e)),
        }
    }

    /// Keeps the newest buckets that hold at least [`RETAIN`] events and
    /// removes every older one, whole.
    async fn trim(&self) -> Result<(), Error> {
        let mut kept = 0;
        let mut old = Vec::new();
        for bucket in self.bucket_names().await? {
            if kept >= RETAIN {
                old.push(bucket);
                continue;
            }
            kept += self
                .bucket(&bucket)
                .list("")
                .await
                .map_err(Error::internal)?
                .len();
        }
        for bucket in old {
            let table = self.bucket(&bucket);
            for (key, _, _) in table.list("").await.map_err(Error::internal)? {
                table.remove(&key).await.map_err(Error::internal)?;
            }
            self.buckets
                .remove(&bucket)
                .await
                .map_err(Error::internal)?;
        }
        if kept >= RETAIN {
            for (key, _, _) in self.legacy.list("").await.map_err(Error::internal)? {
                self.legacy.remove(&key).await.map_err(Error::internal)?;
            }
        }
        Ok(())
    }

    /// Keeps this replica's live view: every event from the bus (a private
    /// watch queue, so every replica sees all of them) goes to the
    /// `WatchEvents` streams once, and the apps and nodes each event names
    /// are marked for the reconciler's next pass (it runs only where this
    /// replica leads).
    pub async fn fan_out(
        self,
        platform: Platform,
        changes: std::sync::Arc<crate::changes::Changes>,
        shutdown: CancellationToken,
    ) {
        let mut dedupe = Deduper::new(10_000);
        let mut deliveries = Deliveries::new(platform, None, shutdown);
        while let Some(delivery) = deliveries.next().await {
            if dedupe.first_time(&delivery.event.id) {
                let event = delivery.event.clone();
                changes.event(&event);
                let _ = self.live.send(event);
            }
            let _ = delivery.ack().await;
        }
    }

    /// Stores every event from the bus once. The replicas share one queue
    /// (each event reaches one of them) and the store's compare-and-set
    /// (`Expect::Absent` on the event's key) keeps a redelivered event, or
    /// one two replicas both got, from being stored twice.
    pub async fn consume(self, platform: Platform, shutdown: CancellationToken) {
        let mut dedupe = Deduper::new(10_000);
        let mut appended = 0usize;
        let mut deliveries = Deliveries::new(platform, Some("orchestrator.events"), shutdown);
        while let Some(delivery) = deliveries.next().await {
            let event = delivery.event.clone();
            if !dedupe.contains(&event.id) {
                match self.append(&event).await {
                    Ok(true) => appended += 1,
                    Ok(false) => {}
                    Err(e) => {
                        // Not acked, not marked seen: the bus hands it out
                        // again and the next attempt stores it.
                        tracing::warn!("failed to store event: {e}");
                        continue;
                    }
                }
                // Only a committed event counts as seen.
                dedupe.insert(&event.id);
            }
            if let Err(e) = delivery.ack().await {
                tracing::warn!("failed to ack event: {e}");
            }
            if appended >= 500 {
                appended = 0;
                if let Err(e) = self.trim().await {
                    tracing::warn!("failed to trim the event log: {e}");
                }
            }
        }
    }
}

/// Every event from a shared queue (`Some(name)`) or a private watch
/// (`None`), subscribing again, every second until it works, whenever the
/// subscription ends; `None` at shutdown.
struct Deliveries {
    platform: Platform,
    queue: Option<&'static str>,
    shutdown: CancellationToken,
    current: Option<capstan_events::Subscription>,
}

impl Deliveries {
    fn new(platform: Platform, queue: Option<&'static str>, shutdown: CancellationToken) -> Self {
        Deliveries {
            platform,
            queue,
            shutdown,
            current: None,
        }
    }

    async fn next(&mut self) -> Option<capstan_events::Delivery> {
        loop {
            let subscription = match &mut self.current {
                Some(subscription) => subscription,
                None => {
                    let opened = match self.queue {
                        Some(queue) => self.platform.bus.subscribe(queue, &["#"]).await,
                        None => self.platform.bus.watch(&["#"]).await,
                    };
                    match opened {
                        Ok(subscription) => self.current.insert(subscription),
                        Err(e) => {
                            tracing::warn!(queue = ?self.queue, "failed to subscribe to events: {e}");
                            tokio::select! {
                                _ = self.shutdown.cancelled() => return None,
                                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                            }
                        }
                    }
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                delivery = subscription.next() => match delivery {
                    Some(delivery) => return Some(delivery),
                    None => self.current = None,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use capstan_events::{EventBus, MemoryBus};
    use capstan_registry::EmbeddedRegistry;
    use capstan_secrets::{FileSecretStore, Secret};
    use capstan_store::MemoryStore;
    use capstan_testkit::faulty_store::{FaultyStore, StoreOp};
    use capstan_types::EventKind;

    use super::*;

    #[tokio::test]
    async fn an_event_whose_write_failed_is_stored_when_redelivered() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let bus = Arc::new(MemoryBus::new());
        // The first write of an event (into its hour's bucket) fails.
        let event = Event::new("ev-1".into(), 1, EventKind::AppCreated).app("web");
        let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new())));
        store.arm(StoreOp::Insert, &bucket_table(&bucket_of(&event)));
        let platform = Platform::new(
            Arc::new(EmbeddedRegistry::start(shutdown.child_token())),
            bus.clone(),
            store,
            Arc::new(FileSecretStore::new(dir.path())),
            Arc::new(capstan_cache::MemoryCache::new()),
            Secret::new("unused"),
        );
        let log = EventLog::new(&platform);
        let consumer = tokio::spawn(log.clone().consume(platform, shutdown.clone()));
        // Wait until the consumer's queue exists, then publish once.
        for _ in 0..100 {
            bus.publish(&event).await.unwrap();
            if log
                .recent("", 10)
                .await
                .unwrap()
                .iter()
                .any(|e| e.id == "ev-1")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stored = log.recent("", 10).await.unwrap();
        assert_eq!(
            stored.iter().filter(|e| e.id == "ev-1").count(),
            1,
            "the event was lost after its first write failed: {stored:?}"
        );
        shutdown.cancel();
        consumer.await.unwrap();
    }

    /// Two replicas share one bus and one store: each replica's watchers
    /// see every event (not only the ones its consumer took from the shared
    /// queue), and the store holds each event once.
    #[tokio::test]
    async fn every_replica_fans_out_every_event_and_the_store_holds_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let bus = Arc::new(MemoryBus::new());
        let store = Arc::new(MemoryStore::new());
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let platform = Platform::new(
                Arc::new(EmbeddedRegistry::start(shutdown.child_token())),
                bus.clone(),
                store.clone(),
                Arc::new(FileSecretStore::new(dir.path())),
                Arc::new(capstan_cache::MemoryCache::new()),
                Secret::new("unused"),
            );
            let log = EventLog::new(&platform);
            let watching = log.subscribe();
            tokio::spawn(log.clone().consume(platform.clone(), shutdown.clone()));
            tokio::spawn(log.clone().fan_out(
                platform,
                crate::changes::Changes::new(),
                shutdown.clone(),
            ));
            replicas.push((log, watching));
        }
        // Both watch queues exist once a probe event reaches both replicas.
        for attempt in 0.. {
            assert!(attempt < 200, "the replicas never watched");
            let probe = Event::new(format!("probe-{attempt}"), 1, EventKind::AppCreated);
            bus.publish(&probe).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            if replicas.iter_mut().all(|(_, w)| {
                std::iter::from_fn(|| w.try_recv().ok()).any(|e| e.id.starts_with("probe-"))
            }) {
                break;
            }
        }
        let ids: Vec<String> = (0..10).map(|i| format!("ev-{i}")).collect();
        for id in &ids {
            bus.publish(&Event::new(id.clone(), 1, EventKind::InstanceHealthy).app("web"))
                .await
                .unwrap();
        }
        for (_, watching) in &mut replicas {
            let mut seen = Vec::new();
            while seen.len() < ids.len() {
                let event = tokio::time::timeout(Duration::from_secs(5), watching.recv())
                    .await
                    .expect("every event reaches every replica's watchers")
                    .unwrap();
                if event.id.starts_with("ev-") {
                    seen.push(event.id);
                }
            }
            assert_eq!(seen, ids);
        }
        let log = &replicas[0].0;
        for _ in 0..250 {
            let stored = log.recent("web", 100).await.unwrap();
            if stored.len() >= ids.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stored: Vec<String> = log
            .recent("web", 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        let mut sorted = stored.clone();
        sorted.sort();
        assert_eq!(sorted, ids, "each event stored once: {stored:?}");
        shutdown.cancel();
    }

    /// Events land in hourly buckets, are read back across them in order,
    /// and trimming drops whole old buckets while keeping at least RETAIN.
    #[tokio::test]
    async fn events_are_stored_in_hourly_buckets_and_trimmed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let store = Arc::new(MemoryStore::new());
        let platform = Platform::new(
            Arc::new(EmbeddedRegistry::start(shutdown.child_token())),
            Arc::new(MemoryBus::new()),
            store.clone(),
            Arc::new(FileSecretStore::new(dir.path())),
            Arc::new(capstan_cache::MemoryCache::new()),
            Secret::new("unused"),
        );
        let log = EventLog::new(&platform);
        // An event from before buckets, in the legacy table.
        let mut legacy = Event::new("legacy".into(), 1, EventKind::AppCreated).app("web");
        legacy.time_ms = 1_000;
        log.legacy
            .put("0000000001000-legacy", &legacy, Expect::Absent)
            .await
            .unwrap();
        // Three hours, two events each, written out of order.
        let hour = 3_600_000;
        let base = 500_000 * hour;
        let mut ids = Vec::new();
        for h in [2, 0, 1] {
            for n in 0..2 {
                let mut event =
                    Event::new(format!("h{h}-{n}"), 1, EventKind::InstanceHealthy).app("web");
                event.time_ms = base + h * hour + n;
                assert!(log.append(&event).await.unwrap());
                assert!(!log.append(&event).await.unwrap(), "stored once");
                ids.push(event.id.clone());
            }
        }
        let buckets = log.bucket_names().await.unwrap();
        assert_eq!(buckets.len(), 3, "{buckets:?}");
        assert!(
            store.list("events.0000500000", "").await.unwrap().len() == 2,
            "each hour is its own table (a partition on Scylla)"
        );
        let all: Vec<String> = log
            .recent("web", 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(
            all,
            ["legacy", "h0-0", "h0-1", "h1-0", "h1-1", "h2-0", "h2-1"]
        );
        let last: Vec<String> = log
            .recent("web", 3)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(last, ["h1-1", "h2-0", "h2-1"]);
        assert!(log.recent("other", 10).await.unwrap().is_empty());
        // Nothing to trim below RETAIN.
        log.trim().await.unwrap();
        assert_eq!(log.recent("", 100).await.unwrap().len(), 7);
        // RETAIN events in a newer hour: the older hours and the legacy
        // table go, whole.
        for n in 0..RETAIN as i64 {
            let mut event = Event::new(format!("h3-{n}"), 1, EventKind::InstanceHealthy);
            event.time_ms = base + 3 * hour + n;
            log.append(&event).await.unwrap();
        }
        log.trim().await.unwrap();
        assert_eq!(log.bucket_names().await.unwrap().len(), 1);
        assert!(log.recent("web", 100).await.unwrap().is_empty());
        assert!(
            store
                .list("events.0000500000", "")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(store.list(EVENTS, "").await.unwrap().is_empty());
        shutdown.cancel();
    }
}
