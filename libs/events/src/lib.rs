//! The event-bus port. Events are hints that something changed; state in the
//! store is the truth. Delivery is at least once:
//!
//! - [`EventBus::publish`] returns only after the broker has confirmed the
//!   event durable;
//! - a subscriber acks a [`Delivery`] after it has applied the effect; one
//!   dropped unacked is delivered again;
//! - so consumers are idempotent, deduplicating on `Event::id` ([`Deduper`]).
//!
//! Routing is AMQP topic routing on the event kind (`instance.*`, `#`).

use std::collections::{HashSet, VecDeque};

use async_trait::async_trait;
use capstan_types::Event;

pub mod contract;
mod memory;
mod rabbit;

pub use memory::MemoryBus;
pub use rabbit::RabbitBus;

/// The exchange every event is published to.
pub const EXCHANGE: &str = "capstan.events";

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    #[error("broker did not confirm event {0}")]
    NotConfirmed(String),
    #[error("invalid binding `{0}`: use dot-separated words, `*` or `#`")]
    InvalidBinding(String),
    #[error("invalid queue: {0}")]
    InvalidQueue(String),
}

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Publishes durably; returns once the broker has confirmed.
    async fn publish(&self, event: &Event) -> Result<(), BusError>;

    /// Consumes from the durable queue `queue`, bound to `bindings`. The queue
    /// outlives the subscription: events published while nobody consumes wait.
    /// Several subscriptions to one queue compete for its events.
    async fn subscribe(&self, queue: &str, bindings: &[&str]) -> Result<Subscription, BusError>;

    /// Consumes from a private queue of this subscription alone, bound to
    /// `bindings`, that ends with it: every watcher sees every matching
    /// event published after `watch` returns (a fan-out, not a work queue).
    /// Events published while the bus reconnects may be missed: watchers
    /// are for live views and hints, the store is the truth.
    async fn watch(&self, bindings: &[&str]) -> Result<Subscription, BusError>;
}

/// A stream of deliveries; `None` once the bus connection is gone, after
/// which the consumer subscribes again.
pub struct Subscription {
    rx: tokio::sync::mpsc::UnboundedReceiver<Delivery>,
}

impl Subscription {
    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }
}

/// One event handed to one consumer. Ack it after applying it; dropping it
/// unacked hands it out again.
pub struct Delivery {
    pub event: Event,
    /// True when this event was handed out before and not acked.
    pub redelivered: bool,
    acker: Option<Box<dyn Acker>>,
}

impl Delivery {
    pub async fn ack(mut self) -> Result<(), BusError> {
        match self.acker.take() {
            Some(acker) => acker.ack().await,
            None => Ok(()),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take() {
            acker.requeue();
        }
    }
}

#[async_trait]
trait Acker: Send + Sync {
    async fn ack(self: Box<Self>) -> Result<(), BusError>;
    /// Called from `Drop`: must not block.
    fn requeue(self: Box<Self>);
}

/// Remembers the last `capacity` event ids, for idempotent consumers.
pub struct Deduper {
    seen: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl Deduper {
    pub fn new(capacity: usize) -> Self {
        Deduper {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// True the first time an id is seen. Only for consumers whose work
    /// cannot fail; the others check [`Deduper::contains`] and
    /// [`Deduper::insert`] once their work is committed, so a failed attempt
    /// is retried when the bus delivers the event again.
    pub fn first_time(&mut self, id: &str) -> bool {
        if self.contains(id) {
            return false;
        }
        self.insert(id);
        true
    }

    pub fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    /// Remembers `id`, forgetting the oldest id past the capacity.
    pub fn insert(&mut self, id: &str) {
        if self.seen.contains(id) {
            return;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.seen.insert(id.to_string());
        self.order.push_back(id.to_string());
    }
}

/// What a `--bus` URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusUrl {
    /// In this process only.
    Memory,
    /// RabbitMQ at this `amqp://` or `amqps://` URL.
    Amqp(String),
}

/// Parses a `--bus` URL: `memory` or `amqp[s]://[user:pass@]host[:port][/vhost]`.
/// The error never shows the password.
pub fn parse_bus_url(text: &str) -> Result<BusUrl, String> {
    if text == "memory" {
        return Ok(BusUrl::Memory);
    }
    let shown = redact_url(text);
    let Some(rest) = text
        .strip_prefix("amqp://")
        .or_else(|| text.strip_prefix("amqps://"))
    else {
        return Err(format!(
            "`{shown}` is neither `memory` nor amqp://user:pass@host:port/vhost"
        ));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.is_empty() || host.starts_with(':') {
        return Err(format!(
            "`{shown}` names no host, e.g. amqp://capstan:secret@rabbitmq:5672/%2f"
        ));
    }
    if let Some((_, port)) = host.rsplit_once(':')
        && !host.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err(format!("`{port}` in `{shown}` is not a port"));
    }
    Ok(BusUrl::Amqp(text.to_string()))
}

/// `scheme://user:<redacted>@host/...`: a broker URL fit for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:<redacted>@{host}{path}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod redact_tests {
    use super::*;

    #[test]
    fn bus_urls_parse_or_say_why_without_the_password() {
        assert_eq!(parse_bus_url("memory"), Ok(BusUrl::Memory));
        assert_eq!(
            parse_bus_url("amqp://u:p@rabbit:5672/%2f"),
            Ok(BusUrl::Amqp("amqp://u:p@rabbit:5672/%2f".into()))
        );
        assert!(parse_bus_url("amqps://rabbit").is_ok());
        for bad in [
            "",
            "memry",
            "kafka://x:1",
            "amqp://",
            "amqp://u:hunter2@:5672",
            "amqp://u:hunter2@h:x",
        ] {
            let error = parse_bus_url(bad).unwrap_err();
            assert!(!error.contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("amqp://capstan:s3cret@127.0.0.1:5672/%2f"),
            "amqp://capstan:<redacted>@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert!(!redact_url("amqp://u:p@ss@h/v").contains("p@ss"));
    }
}

/// AMQP topic matching: `*` is one word, `#` is zero or more.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(pattern: &[&str], key: &[&str]) -> bool {
        match (pattern.split_first(), key.split_first()) {
            (None, None) => true,
            (Some((&"#", rest)), _) => go(rest, key) || (!key.is_empty() && go(pattern, &key[1..])),
            (Some((&"*", rest)), Some((_, key_rest))) => go(rest, key_rest),
            (Some((word, rest)), Some((k, key_rest))) => word == k && go(rest, key_rest),
            _ => false,
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = key.split('.').collect();
    go(&pattern, &key)
}

fn check_binding(binding: &str) -> Result<(), BusError> {
    let ok = !binding.is_empty()
        && binding.split('.').all(|w| {
            w == "*"
                || w == "#"
                || (!w.is_empty()
                    && w.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(BusError::InvalidBinding(binding.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_matching_follows_amqp() {
        assert!(topic_matches("#", "instance.healthy"));
        assert!(topic_matches("instance.*", "instance.healthy"));
        assert!(!topic_matches("instance.*", "instance.healthy.x"));
        assert!(topic_matches("instance.#", "instance"));
        assert!(topic_matches("*.healthy", "instance.healthy"));
        assert!(!topic_matches("app.*", "instance.healthy"));
        assert!(topic_matches("rollout.rolled_back", "rollout.rolled_back"));
    }

    #[test]
    fn deduper_forgets_oldest_beyond_capacity() {
        let mut d = Deduper::new(2);
        assert!(d.first_time("a"));
        assert!(!d.first_time("a"));
        assert!(d.first_time("b"));
        assert!(d.first_time("c"));
        assert!(d.first_time("a"), "a was evicted");
        assert!(!d.first_time("c"));
    }
}
