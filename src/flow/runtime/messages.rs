//! NATS and AMQP steps go through the outbox: the message is an event appended in the
//! same transaction as the step's success, carrying an outbox
//! [`Envelope`](crate::outbox::Envelope), and an
//! [`OutboxRelay`](crate::outbox::OutboxRelay) publishes it, at least once, with
//! the step's idempotency key as `Nats-Msg-Id`.

use super::Flows;
use crate::flow::model::events::types;
use crate::store::Query;

impl Flows {
    /// The query of the messages NATS steps produced (`FlowMessage` events).
    pub fn messages_query() -> Query {
        Query::items_of([types::MESSAGE], Vec::<String>::new())
    }

    /// The query of the messages AMQP steps produced (`FlowAmqpMessage` events).
    pub fn amqp_messages_query() -> Query {
        Query::items_of([types::AMQP_MESSAGE], Vec::<String>::new())
    }

    /// A relay named `name` publishing the AMQP steps' messages to RabbitMQ at
    /// `uri`: each to its step's exchange with its routing key, persistent,
    /// with `<instance>/<task>/<phase>` as its `message_id`, awaiting the
    /// broker's confirm. Run it with
    /// [`OutboxRelay::run`](crate::outbox::OutboxRelay::run) (feature `amqp`).
    ///
    /// # Errors
    /// The connection's or channel's error, as text.
    #[cfg(feature = "amqp")]
    pub async fn amqp_relay(
        &self,
        name: &str,
        uri: &str,
    ) -> Result<crate::outbox::OutboxRelay<crate::outbox::AmqpPublisher>, String> {
        let publisher = crate::outbox::AmqpPublisher::connect_with(uri, |e| {
            e.data()["exchange"].as_str().unwrap_or_default().to_owned()
        })
        .await?;
        Ok(crate::outbox::OutboxRelay::new(
            self.store().clone(),
            name,
            Self::amqp_messages_query(),
            publisher,
        ))
    }

    /// A relay named `name` publishing the NATS steps' messages: each on its
    /// step's subject, with its payload as the body and `<instance>/<task>/<phase>`
    /// as `Nats-Msg-Id` (JetStream drops duplicates). Run it with
    /// [`OutboxRelay::run`](crate::outbox::OutboxRelay::run) (feature `nats`).
    #[cfg(feature = "nats")]
    pub fn message_relay(
        &self,
        name: &str,
        client: async_nats::Client,
        ack_timeout: std::time::Duration,
    ) -> crate::outbox::OutboxRelay<crate::outbox::NatsPublisher> {
        // Every message's envelope names its subject; this is only a fallback.
        let publisher = crate::outbox::NatsPublisher::with_subject(client, ack_timeout, |_| {
            "dcbflow.unrouted".to_owned()
        });
        crate::outbox::OutboxRelay::new(
            self.store().clone(),
            name,
            Self::messages_query(),
            publisher,
        )
    }
}
