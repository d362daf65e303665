//! The outbox layer: events matching a query, published at least once, in order,
//! to NATS JetStream (feature `nats`) or HTTP webhooks (feature `http`); dead
//! letters; consumer-side deduplication; the typed [`Envelope`] that says how
//! an event is sent.
//!
//! Depends on the store and the projection layer (subscriptions, checkpoints,
//! leases). Owns `sql/outbox/` (dead letters and processed messages) and its
//! [`Error`].

mod dead_letter;
mod envelope;
mod error;
mod publisher;
mod relay;

pub use dead_letter::{DeadLetter, DeadLetters, mark_processed};
pub use envelope::{Body, ENVELOPE_KEY, Envelope};
pub use error::{Error, Result};
#[cfg(feature = "amqp")]
pub use publisher::AmqpPublisher;
#[cfg(feature = "nats")]
pub use publisher::NatsPublisher;
#[cfg(feature = "http")]
pub use publisher::WebhookPublisher;
pub use publisher::{OutboxMessage, PublishFailure, Publisher};
pub use relay::{OutboxRelay, RelayOptions};

use crate::store::migrate::{Layer, Migration};

/// The outbox layer's schema.
pub(crate) const SCHEMA: Layer = Layer {
    name: "outbox",
    migrations: &[Migration {
        version: 1,
        name: "0001_outbox.sql",
        sql: include_str!("../../sql/outbox/0001_outbox.sql"),
    }],
};
