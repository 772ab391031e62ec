//! Event-bus throughput with publisher confirms, end to end (publish, then
//! consume and ack every event), through `RabbitBus` and through raw lapin
//! doing the same work (persistent messages, confirms, a durable queue,
//! manual acks, the same prefetch (64) and in-flight window), on one throwaway
//! broker in the same run. Prints one JSON object.
//!
//! `cargo bench -p capstan-events --bench bus -- [--events N] [--in-flight K] [--rounds R]`

use std::time::{Duration, Instant};

use capstan_events::{EXCHANGE, EventBus, RabbitBus};
use capstan_types::{Event, EventKind};
use futures::{StreamExt, TryStreamExt};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn events(round: usize, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            Event::new(format!("bench-{round}-{i}"), 1, EventKind::InstanceHealthy)
                .app("bench")
                .instance(format!("bench-{i}"))
        })
        .collect()
}

/// Our bus: publish with up to `in_flight` awaiting confirms, then consume
/// and ack all. Events per second over both.
async fn ours(bus: &RabbitBus, round: usize, n: usize, in_flight: usize) -> f64 {
    let queue = format!("bench-ours-{round}");
    let mut subscription = bus.subscribe(&queue, &["instance.healthy"]).await.unwrap();
    let batch = events(round, n);
    let started = Instant::now();
    futures::stream::iter(batch.iter())
        .map(|event| bus.publish(event))
        .buffer_unordered(in_flight)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    for _ in 0..n {
        let delivery = tokio::time::timeout(Duration::from_secs(30), subscription.next())
            .await
            .expect("a delivery within 30 s")
            .expect("the subscription lives");
        delivery.ack().await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Raw lapin doing the same.
async fn raw(uri: &str, round: usize, n: usize, in_flight: usize) -> f64 {
    let connection = Connection::connect(uri, ConnectionProperties::default())
        .await
        .unwrap();
    let publisher = connection.create_channel().await.unwrap();
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publisher
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer_channel = connection.create_channel().await.unwrap();
    consumer_channel
        .basic_qos(64, BasicQosOptions::default())
        .await
        .unwrap();
    let queue = format!("bench-raw-{round}");
    consumer_channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    consumer_channel
        .queue_bind(
            queue.as_str().into(),
            EXCHANGE.into(),
            "instance.healthy".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let batch = events(round, n);
    let payloads: Vec<(String, Vec<u8>)> = batch
        .iter()
        .map(|e| (e.id.clone(), serde_json::to_vec(e).unwrap()))
        .collect();
    let started = Instant::now();
    futures::stream::iter(payloads.iter())
        .map(|(id, payload)| {
            let publisher = &publisher;
            async move {
                let confirm = publisher
                    .basic_publish(
                        EXCHANGE.into(),
                        "instance.healthy".into(),
                        BasicPublishOptions::default(),
                        payload,
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_content_type("application/json".into())
                            .with_message_id(id.as_str().into()),
                    )
                    .await?;
                confirm.await.map(drop)
            }
        })
        .buffer_unordered(in_flight)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    for _ in 0..n {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a delivery within 30 s")
            .expect("the consumer lives")
            .unwrap();
        let _: Event = serde_json::from_slice(&delivery.data).unwrap();
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = connection.close(200, "bench done".into()).await;
    rate
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let n = arg("--events", 5000);
    let in_flight = arg("--in-flight", 64);
    let rounds = arg("--rounds", 3);
    let broker = capstan_testkit::rabbitmq::RabbitMq::start().await;
    let uri = broker.amqp_uri();
    let bus = RabbitBus::connect(&uri).await.unwrap();
    // Warm up both paths once, then alternate so drift hits both alike.
    ours(&bus, 0, 500, in_flight).await;
    raw(&uri, 0, 500, in_flight).await;
    let (mut ours_rates, mut raw_rates) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        ours_rates.push(ours(&bus, round, n, in_flight).await);
        raw_rates.push(raw(&uri, round, n, in_flight).await);
    }
    let (ours_rate, raw_rate) = (median(ours_rates.clone()), median(raw_rates.clone()));
    println!(
        "{}",
        serde_json::json!({
            "bench": "event-bus",
            "events_per_round": n,
            "in_flight": in_flight,
            "rounds": rounds,
            "capstan_events_per_sec": ours_rate.round(),
            "raw_lapin_events_per_sec": raw_rate.round(),
            "ratio": (ours_rate / raw_rate * 1000.0).round() / 1000.0,
            "capstan_rounds": ours_rates.iter().map(|r| r.round()).collect::<Vec<_>>(),
            "raw_lapin_rounds": raw_rates.iter().map(|r| r.round()).collect::<Vec<_>>(),
        })
    );
}
