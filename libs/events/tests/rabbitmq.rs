//! The event-bus contract against a real RabbitMQ broker, started by the test
//! on random ports (`capstan_testkit::rabbitmq`).

use capstan_events::{EventBus, RabbitBus, contract};

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_adapter_passes_the_contract() {
    let broker = capstan_testkit::rabbitmq::RabbitMq::start().await;
    let bus = RabbitBus::connect(&broker.amqp_uri())
        .await
        .expect("connect to the test broker");
    contract::run(bus.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_survive_a_consumer_reconnect() {
    let broker = capstan_testkit::rabbitmq::RabbitMq::start().await;
    let bus = RabbitBus::connect(&broker.amqp_uri()).await.unwrap();
    drop(bus.subscribe("survivor", &["app.*"]).await.unwrap());
    let event =
        capstan_types::Event::new("e-1".into(), 1, capstan_types::EventKind::AppDeleted).app("x");
    capstan_events::EventBus::publish(bus.as_ref(), &event)
        .await
        .unwrap();

    // A new connection, as after a consumer restart, still finds the event.
    let other = RabbitBus::connect(&broker.amqp_uri()).await.unwrap();
    let mut sub = capstan_events::EventBus::subscribe(other.as_ref(), "survivor", &["app.*"])
        .await
        .unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.event, event);
    got.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_under_a_steady_stream_loses_nothing_and_applies_nothing_twice() {
    use std::collections::HashSet;
    use std::time::Duration;

    const EVENTS: usize = 150;
    let mut broker = capstan_testkit::rabbitmq::RabbitMq::start().await;
    let bus = RabbitBus::connect(&broker.amqp_uri()).await.unwrap();
    let mut subscription = bus.subscribe("steady", &["app.*"]).await.unwrap();

    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let publisher = tokio::spawn({
        let bus = bus.clone();
        async move {
            for i in 0..EVENTS {
                let event = capstan_types::Event::new(
                    format!("steady-{i}"),
                    i as i64,
                    capstan_types::EventKind::AppUpdated,
                )
                .app("web");
                bus.publish(&event)
                    .await
                    .unwrap_or_else(|e| panic!("event {i} was not published: {e}"));
                let _ = progress_tx.send(i + 1);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let consumer = tokio::spawn(async move {
        let mut dedupe = capstan_events::Deduper::new(10_000);
        let mut applied = Vec::new();
        while applied.len() < EVENTS {
            let Some(delivery) = subscription.next().await else {
                panic!("the subscription ended instead of reconnecting");
            };
            let id = delivery.event.id.clone();
            if !dedupe.contains(&id) {
                applied.push(id.clone());
                dedupe.insert(&id);
            }
            // An ack on a channel the restart closed fails; the broker
            // redelivers, and the deduper absorbs it.
            let _ = delivery.ack().await;
        }
        applied
    });

    // Restart the broker a third of the way in.
    progress
        .wait_for(|published| *published >= EVENTS / 3)
        .await
        .unwrap();
    broker.restart().await;

    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("publishing stalled after the restart")
        .unwrap();
    let applied = tokio::time::timeout(Duration::from_secs(120), consumer)
        .await
        .expect("events were lost: the consumer never saw them all")
        .unwrap();
    let unique: HashSet<&String> = applied.iter().collect();
    assert_eq!(unique.len(), EVENTS, "an event was applied twice");
    for i in 0..EVENTS {
        assert!(
            unique.contains(&format!("steady-{i}")),
            "event {i} was lost"
        );
    }
}
