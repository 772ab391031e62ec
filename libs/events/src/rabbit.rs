use std::sync::Arc;

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

/// The RabbitMQ adapter: a durable topic exchange, durable queues, persistent
/// messages, publisher confirms and manual acks.
pub struct RabbitBus {
    connection: Connection,
    publisher: Mutex<Channel>,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl RabbitBus {
    /// Connects and declares the exchange. `uri` is `amqp://user:pass@host:port/vhost`.
    pub async fn connect(uri: &str) -> Result<Arc<Self>, BusError> {
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
        Ok(Arc::new(RabbitBus {
            connection,
            publisher: Mutex::new(publisher),
        }))
    }
}

#[async_trait]
impl EventBus for RabbitBus {
    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        let payload = serde_json::to_vec(event).map_err(unavailable)?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(event.id.clone().into());
        let channel = self.publisher.lock().await;
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                event.kind.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                properties,
            )
            .await
            .map_err(unavailable)?;
        drop(channel);
        match confirm.await.map_err(unavailable)? {
            Confirmation::Ack(_) => Ok(()),
            _ => Err(BusError::NotConfirmed(event.id.clone())),
        }
    }

    async fn subscribe(&self, queue: &str, bindings: &[&str]) -> Result<Subscription, BusError> {
        for binding in bindings {
            check_binding(binding)?;
        }
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(unavailable)?;
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        for binding in bindings {
            channel
                .queue_bind(
                    queue.into(),
                    EXCHANGE.into(),
                    (*binding).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
        }
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Keep the channel alive as long as the consumer loop runs.
            let _channel = channel;
            while let Some(next) = consumer.next().await {
                let delivery = match next {
                    Ok(delivery) => delivery,
                    Err(e) => {
                        tracing::warn!("event consumer stopped: {e}");
                        break;
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
                    break;
                }
            }
        });
        Ok(Subscription { rx })
    }
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
