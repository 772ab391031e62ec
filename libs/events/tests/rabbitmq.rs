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
