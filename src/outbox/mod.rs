//! The outbox relay: events matching a query, published at least once, in order,
//! to NATS JetStream or HTTP webhooks; dead letters; consumer-side deduplication.

mod dead_letter;
mod publisher;
mod relay;

pub use dead_letter::DeadLetter;
pub use publisher::{NatsPublisher, OutboxMessage, PublishFailure, Publisher, WebhookPublisher};
pub use relay::{OutboxRelay, RelayOptions};
