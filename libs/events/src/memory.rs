use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use capstan_types::Event;
use tokio::sync::mpsc;

use crate::{Acker, BusError, Delivery, EventBus, Subscription, check_binding, topic_matches};

/// The embedded adapter: the same semantics as the broker, in one process.
/// Queues live as long as the bus; unacked deliveries return to their queue.
#[derive(Default, Clone)]
pub struct MemoryBus {
    queues: Arc<Mutex<HashMap<String, Arc<Queue>>>>,
    /// Names the private queues of watchers.
    watchers: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    /// A watcher's queue: gone once its one consumer is.
    private: bool,
    bindings: Vec<String>,
    ready: VecDeque<(Event, bool)>,
    consumers: Vec<mpsc::UnboundedSender<Delivery>>,
    next_consumer: usize,
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Queue {
    fn enqueue(self: &Arc<Self>, event: Event, redelivered: bool) {
        let mut state = self.state.lock().expect("queue lock poisoned");
        state.ready.push_back((event, redelivered));
        self.dispatch(&mut state);
    }

    /// Hands ready events to live consumers, round robin.
    fn dispatch(self: &Arc<Self>, state: &mut QueueState) {
        while let Some((event, redelivered)) = state.ready.pop_front() {
            state.consumers.retain(|c| !c.is_closed());
            if state.consumers.is_empty() {
                state.ready.push_front((event, redelivered));
                return;
            }
            let index = state.next_consumer % state.consumers.len();
            state.next_consumer = state.next_consumer.wrapping_add(1);
            let delivery = Delivery {
                event: event.clone(),
                redelivered,
                acker: Some(Box::new(MemoryAcker {
                    queue: self.clone(),
                    event,
                })),
            };
            if let Err(mpsc::error::SendError(mut undelivered)) =
                state.consumers[index].send(delivery)
            {
                // The consumer went away between the check and the send.
                undelivered.acker = None;
                state
                    .ready
                    .push_front((undelivered.event.clone(), undelivered.redelivered));
                state.consumers.remove(index);
            }
        }
    }
}

struct MemoryAcker {
    queue: Arc<Queue>,
    event: Event,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        Ok(())
    }

    fn requeue(self: Box<Self>) {
        self.queue.enqueue(self.event, true);
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        let targets: Vec<Arc<Queue>> = {
            let mut queues = self.queues.lock().expect("bus lock poisoned");
            queues.retain(|_, q| {
                let state = q.state.lock().expect("queue lock poisoned");
                !state.private || state.consumers.iter().any(|c| !c.is_closed())
            });
            queues
                .values()
                .filter(|q| {
                    let state = q.state.lock().expect("queue lock poisoned");
                    state
                        .bindings
                        .iter()
                        .any(|b| topic_matches(b, event.kind.as_str()))
                })
                .cloned()
                .collect()
        };
        for queue in targets {
            queue.enqueue(event.clone(), false);
        }
        Ok(())
    }

    async fn subscribe(&self, queue: &str, bindings: &[&str]) -> Result<Subscription, BusError> {
        for binding in bindings {
            check_binding(binding)?;
        }
        let queue = self
            .queues
            .lock()
            .expect("bus lock poisoned")
            .entry(queue.to_string())
            .or_default()
            .clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = queue.state.lock().expect("queue lock poisoned");
        for binding in bindings {
            if !state.bindings.iter().any(|b| b == binding) {
                state.bindings.push(binding.to_string());
            }
        }
        state.consumers.push(tx);
        queue.dispatch(&mut state);
        Ok(Subscription { rx })
    }

    async fn watch(&self, bindings: &[&str]) -> Result<Subscription, BusError> {
        for binding in bindings {
            check_binding(binding)?;
        }
        let n = self
            .watchers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                private: true,
                bindings: bindings.iter().map(|b| b.to_string()).collect(),
                consumers: vec![tx],
                ..Default::default()
            }),
        });
        self.queues
            .lock()
            .expect("bus lock poisoned")
            .insert(format!("\0watch-{n}"), queue);
        Ok(Subscription { rx })
    }
}

impl MemoryBus {
    /// How many queues the bus holds (watchers' included, until the next
    /// publish after they end).
    pub fn queue_count(&self) -> usize {
        self.queues.lock().expect("bus lock poisoned").len()
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;

    #[tokio::test]
    async fn a_watchers_queue_goes_with_it() {
        let bus = MemoryBus::new();
        let watcher = bus.watch(&["#"]).await.unwrap();
        assert_eq!(bus.queue_count(), 1);
        drop(watcher);
        let event = Event::new("e".into(), 1, capstan_types::EventKind::NodeDown);
        bus.publish(&event).await.unwrap();
        assert_eq!(
            bus.queue_count(),
            0,
            "no queue fills up for a watcher that left"
        );
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn passes_the_contract() {
        crate::contract::run(&super::MemoryBus::new()).await;
    }
}
