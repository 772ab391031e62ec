//! The contract every [`EventBus`] adapter passes. Queue names are prefixed
//! with `prefix` so runs against a shared broker do not collide.

use std::time::Duration;

use capstan_types::{Event, EventKind};

use crate::{Deduper, EventBus};

const WAIT: Duration = Duration::from_secs(10);

pub async fn run(bus: &dyn EventBus) {
    let prefix = format!("contract-{}", std::process::id());
    routes_by_topic(bus, &prefix).await;
    queues_keep_events_while_nobody_consumes(bus, &prefix).await;
    unacked_deliveries_come_back(bus, &prefix).await;
    consumers_dedupe_redeliveries(bus, &prefix).await;
    rejects_bad_bindings(bus, &prefix).await;
    watchers_each_see_every_event_beside_a_work_queue(bus, &prefix).await;
}

fn event(id: &str, kind: EventKind) -> Event {
    Event::new(id.to_string(), 1, kind).app("contract")
}

async fn next(sub: &mut crate::Subscription) -> crate::Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("no delivery within 10s")
        .expect("subscription ended")
}

/// Checks that `sub` holds nothing but what comes next: publishes a
/// sentinel of `kind` (which `sub` is bound to) and expects it as the very
/// next delivery. A condition, not a wait: no timing decides it.
async fn nothing_more(
    bus: &dyn EventBus,
    sub: &mut crate::Subscription,
    kind: EventKind,
    id: &str,
) {
    bus.publish(&event(id, kind)).await.unwrap();
    let got = next(sub).await;
    assert_eq!(got.event.id, id, "unexpected delivery before the sentinel");
    got.ack().await.unwrap();
}

async fn routes_by_topic(bus: &dyn EventBus, prefix: &str) {
    let mut instances = bus
        .subscribe(&format!("{prefix}.instances"), &["instance.*"])
        .await
        .unwrap();
    let mut all = bus
        .subscribe(&format!("{prefix}.all"), &["#"])
        .await
        .unwrap();
    bus.publish(&event(&format!("{prefix}-1"), EventKind::AppCreated))
        .await
        .unwrap();
    bus.publish(&event(&format!("{prefix}-2"), EventKind::InstanceHealthy))
        .await
        .unwrap();

    let got = next(&mut instances).await;
    assert_eq!(got.event.kind, EventKind::InstanceHealthy);
    assert_eq!(got.event.app, "contract");
    got.ack().await.unwrap();
    nothing_more(
        bus,
        &mut instances,
        EventKind::InstanceStarted,
        &format!("{prefix}-s1"),
    )
    .await;

    // `#` sees everything, the sentinel included.
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let d = next(&mut all).await;
        kinds.push(d.event.kind);
        d.ack().await.unwrap();
    }
    kinds.sort_by_key(|k| k.as_str());
    assert_eq!(
        kinds,
        [
            EventKind::AppCreated,
            EventKind::InstanceHealthy,
            EventKind::InstanceStarted
        ]
    );
}

async fn queues_keep_events_while_nobody_consumes(bus: &dyn EventBus, prefix: &str) {
    let queue = format!("{prefix}.durable");
    drop(bus.subscribe(&queue, &["app.*"]).await.unwrap());
    bus.publish(&event(&format!("{prefix}-3"), EventKind::AppScaled))
        .await
        .unwrap();
    let mut sub = bus.subscribe(&queue, &["app.*"]).await.unwrap();
    let got = next(&mut sub).await;
    assert_eq!(got.event.id, format!("{prefix}-3"));
    got.ack().await.unwrap();
}

async fn unacked_deliveries_come_back(bus: &dyn EventBus, prefix: &str) {
    let queue = format!("{prefix}.redeliver");
    let mut sub = bus.subscribe(&queue, &["rollout.*"]).await.unwrap();
    bus.publish(&event(&format!("{prefix}-4"), EventKind::RolloutStarted))
        .await
        .unwrap();
    let first = next(&mut sub).await;
    assert!(!first.redelivered);
    drop(first);
    let again = next(&mut sub).await;
    assert_eq!(again.event.id, format!("{prefix}-4"));
    assert!(
        again.redelivered,
        "a dropped delivery comes back marked redelivered"
    );
    again.ack().await.unwrap();
    nothing_more(
        bus,
        &mut sub,
        EventKind::RolloutCompleted,
        &format!("{prefix}-s2"),
    )
    .await;
}

async fn consumers_dedupe_redeliveries(bus: &dyn EventBus, prefix: &str) {
    let mut sub = bus
        .subscribe(&format!("{prefix}.dedupe"), &["node.*"])
        .await
        .unwrap();
    let id = format!("{prefix}-5");
    // At least once: the same event may arrive twice (a publisher retry).
    bus.publish(&event(&id, EventKind::NodeDown)).await.unwrap();
    bus.publish(&event(&id, EventKind::NodeDown)).await.unwrap();
    let mut dedupe = Deduper::new(16);
    let mut applied = 0;
    for _ in 0..2 {
        let d = next(&mut sub).await;
        if dedupe.first_time(&d.event.id) {
            applied += 1;
        }
        d.ack().await.unwrap();
    }
    assert_eq!(applied, 1);
}

async fn rejects_bad_bindings(bus: &dyn EventBus, prefix: &str) {
    assert!(
        bus.subscribe(&format!("{prefix}.bad"), &["a..b"])
            .await
            .is_err()
    );
    assert!(
        bus.subscribe(&format!("{prefix}.bad"), &[""])
            .await
            .is_err()
    );
}

/// Two watchers each get every event; two consumers of one queue share
/// them; a watcher that ends gets nothing more and holds nothing.
async fn watchers_each_see_every_event_beside_a_work_queue(bus: &dyn EventBus, prefix: &str) {
    let mut a = bus.watch(&["node.#"]).await.unwrap();
    let mut b = bus.watch(&["node.*"]).await.unwrap();
    let queue = format!("{prefix}-shared");
    let mut first = bus.subscribe(&queue, &["node.#"]).await.unwrap();
    let mut second = bus.subscribe(&queue, &["node.#"]).await.unwrap();
    for i in 0..4 {
        bus.publish(&event(&format!("{prefix}-w{i}"), EventKind::NodeDown))
            .await
            .unwrap();
    }
    for watcher in [&mut a, &mut b] {
        let mut seen = Vec::new();
        for _ in 0..4 {
            let delivery = next(watcher).await;
            seen.push(delivery.event.id.clone());
            delivery.ack().await.unwrap();
        }
        seen.sort();
        assert_eq!(
            seen,
            (0..4).map(|i| format!("{prefix}-w{i}")).collect::<Vec<_>>(),
            "a watcher sees every event"
        );
    }
    // The work queue's four events are split between its two consumers.
    let mut shared = Vec::new();
    for _ in 0..2 {
        for consumer in [&mut first, &mut second] {
            let delivery = next(consumer).await;
            shared.push(delivery.event.id.clone());
            delivery.ack().await.unwrap();
        }
    }
    shared.sort();
    assert_eq!(shared.len(), 4);
    shared.dedup();
    assert_eq!(shared.len(), 4, "each event to one consumer of the queue");
    drop((first, second, a));
    nothing_more(bus, &mut b, EventKind::NodeDown, &format!("{prefix}-w-end")).await;
    assert!(
        bus.watch(&["no spaces"]).await.is_err(),
        "bad bindings are refused for watchers too"
    );
}
