use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capstan_types::Event;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::{Mutex, mpsc};

use crate::{Acker, BusError, Delivery, EXCHANGE, EventBus, Subscription, check_binding};

/// How many unacked deliveries a consumer holds at once.
const PREFETCH: u16 = 64;
/// Reconnect backoff: from the first to the most, doubling.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long `publish` keeps re-publishing an unconfirmed event across
/// reconnects before it reports the bus unavailable.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);

/// The RabbitMQ adapter: a durable topic exchange, durable queues, persistent
/// messages, publisher confirms and manual acks.
///
/// It survives broker restarts: a lost connection is re-opened with backoff
/// and the exchange declared again; `publish` re-publishes an event the
/// broker did not confirm until it is confirmed (or [`PUBLISH_DEADLINE`]);
/// every subscription re-declares its queue and bindings and consumes again
/// on the new connection. Deliveries that were in flight come back from the
/// broker as redeliveries, which consumers deduplicate.
pub struct RabbitBus {
    shared: Arc<Shared>,
}

struct Shared {
    uri: String,
    /// The live connection; replaced after a failure, under this lock so
    /// only one task reconnects.
    live: Mutex<Option<Arc<Live>>>,
}

struct Live {
    connection: Connection,
    publisher: Mutex<Channel>,
}

impl Live {
    fn healthy(&self) -> bool {
        self.connection.status().connected()
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl RabbitBus {
    /// Connects and declares the exchange. `uri` is `amqp://user:pass@host:port/vhost`.
    pub async fn connect(uri: &str) -> Result<Arc<Self>, BusError> {
        let live = open(uri).await?;
        Ok(Arc::new(RabbitBus {
            shared: Arc::new(Shared {
                uri: uri.to_string(),
                live: Mutex::new(Some(Arc::new(live))),
            }),
        }))
    }
}

impl Shared {
    /// The live connection, opening a new one when the last has failed.
    /// One attempt: callers decide how long to keep trying.
    async fn live(&self) -> Result<Arc<Live>, BusError> {
        let mut live = self.live.lock().await;
        if let Some(current) = live.as_ref()
            && current.healthy()
        {
            return Ok(current.clone());
        }
        *live = None;
        let fresh = Arc::new(open(&self.uri).await?);
        tracing::info!("connected to RabbitMQ again");
        *live = Some(fresh.clone());
        Ok(fresh)
    }

    /// [`RabbitBus::live`], retried with backoff until `deadline`.
    async fn live_by(&self, deadline: Option<tokio::time::Instant>) -> Result<Arc<Live>, BusError> {
        let mut wait = BACKOFF_FIRST;
        loop {
            match self.live().await {
                Ok(live) => return Ok(live),
                Err(e) => {
                    if deadline.is_some_and(|d| tokio::time::Instant::now() + wait > d) {
                        return Err(e);
                    }
                    tracing::warn!(
                        broker = %crate::redact_url(&self.uri),
                        "RabbitMQ unreachable, retrying in {wait:?}: {e}"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Publishes once on `live`; `Ok(false)` when the broker nacked.
    async fn publish_on(live: &Live, event: &Event, payload: &[u8]) -> Result<bool, BusError> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(event.id.clone().into());
        let channel = live.publisher.lock().await;
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                event.kind.as_str().into(),
                BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await
            .map_err(unavailable)?;
        drop(channel);
        Ok(matches!(
            confirm.await.map_err(unavailable)?,
            Confirmation::Ack(_)
        ))
    }
}

/// Opens a connection with a confirming publisher channel and declares the
/// exchange (again, after a broker restart: declaring is idempotent).
async fn open(uri: &str) -> Result<Live, BusError> {
    let connection = Connection::connect(uri, ConnectionProperties::default())
        .await
        .map_err(unavailable)?;
    let publisher = connection.create_channel().await.map_err(unavailable)?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(unavailable)?;
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
        .map_err(unavailable)?;
    Ok(Live {
        connection,
        publisher: Mutex::new(publisher),
    })
}

/// Declares `queue` with its bindings on `live` and starts consuming. An
/// empty name declares a private queue (server-named, exclusive, deleted
/// with its consumer's channel): a watcher's.
async fn consume(
    live: &Live,
    queue: &str,
    bindings: &[String],
) -> Result<(Channel, lapin::Consumer), BusError> {
    let channel = live
        .connection
        .create_channel()
        .await
        .map_err(unavailable)?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(unavailable)?;
    let private = queue.is_empty();
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: !private,
                exclusive: private,
                auto_delete: private,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    let queue = declared.name().as_str().to_string();
    let queue = queue.as_str();
    for binding in bindings {
        channel
            .queue_bind(
                queue.into(),
                EXCHANGE.into(),
                binding.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
    }
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    Ok((channel, consumer))
}

#[async_trait]
impl EventBus for RabbitBus {
    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        let payload = serde_json::to_vec(event).map_err(unavailable)?;
        let deadline = tokio::time::Instant::now() + PUBLISH_DEADLINE;
        let mut wait = BACKOFF_FIRST;
        loop {
            let live = self.shared.live_by(Some(deadline)).await?;
            match Shared::publish_on(&live, event, &payload).await {
                Ok(true) => return Ok(()),
                Ok(false) => return Err(BusError::NotConfirmed(event.id.clone())),
                // Unconfirmed: publish again (consumers deduplicate by id).
                Err(e) if tokio::time::Instant::now() + wait < deadline => {
                    tracing::debug!(event = %event.id, "publish unconfirmed, retrying: {e}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BACKOFF_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn subscribe(&self, queue: &str, bindings: &[&str]) -> Result<Subscription, BusError> {
        if queue.is_empty() {
            return Err(BusError::InvalidQueue("a queue needs a name".into()));
        }
        self.consume_from(queue, bindings).await
    }

    async fn watch(&self, bindings: &[&str]) -> Result<Subscription, BusError> {
        // After a reconnect the watcher gets a new private queue.
        self.consume_from("", bindings).await
    }
}

impl RabbitBus {
    /// Consumes from `queue` (empty: a private one), consuming again after
    /// every reconnect, until the subscription is dropped.
    async fn consume_from(&self, queue: &str, bindings: &[&str]) -> Result<Subscription, BusError> {
        for binding in bindings {
            check_binding(binding)?;
        }
        let queue = queue.to_string();
        let bindings: Vec<String> = bindings.iter().map(|b| b.to_string()).collect();
        // The first declaration happens before returning, so events
        // published after `subscribe` returns reach the queue.
        let live = self.shared.live().await?;
        let first = consume(&live, &queue, &bindings).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let bus = self.shared.clone();
        tokio::spawn(async move {
            let mut current = Some(first);
            loop {
                let (channel, mut consumer) = match current.take() {
                    Some(pair) => pair,
                    None => {
                        let Ok(live) = bus.live_by(None).await else {
                            return;
                        };
                        match consume(&live, &queue, &bindings).await {
                            Ok(pair) => {
                                tracing::info!(%queue, "consuming again after reconnecting");
                                pair
                            }
                            Err(e) => {
                                tracing::warn!(%queue, "failed to consume again: {e}");
                                tokio::time::sleep(BACKOFF_FIRST).await;
                                continue;
                            }
                        }
                    }
                };
                if !forward(&mut consumer, &tx).await {
                    return;
                }
                drop(channel);
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Subscription { rx })
    }
}

/// Hands deliveries from `consumer` to the subscription until the consumer
/// ends (true: consume again) or the subscription is dropped (false).
async fn forward(consumer: &mut lapin::Consumer, tx: &mpsc::UnboundedSender<Delivery>) -> bool {
    while let Some(next) = consumer.next().await {
        let delivery = match next {
            Ok(delivery) => delivery,
            Err(e) => {
                tracing::warn!("event consumer lost its channel: {e}");
                return true;
            }
        };
        let event: Event = match serde_json::from_slice(&delivery.data) {
            Ok(event) => event,
            Err(e) => {
                // A message we cannot read would loop forever if requeued.
                tracing::warn!("dropping unreadable event: {e}");
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await;
                continue;
            }
        };
        let redelivered = delivery.redelivered;
        let out = Delivery {
            event,
            redelivered,
            acker: Some(Box::new(RabbitAcker { delivery })),
        };
        if tx.send(out).is_err() {
            return false;
        }
    }
    true
}

struct RabbitAcker {
    delivery: lapin::message::Delivery,
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        self.delivery
            .ack(BasicAckOptions::default())
            .await
            .map(drop)
            .map_err(unavailable)
    }

    fn requeue(self: Box<Self>) {
        tokio::spawn(async move {
            let _ = self
                .delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        });
    }
}
