//! NATS steps go through the outbox: the message is an event appended in the
//! same transaction as the step's success, and an [`OutboxRelay`](crate::OutboxRelay)
//! publishes it, at least once, with the step's idempotency key as `Nats-Msg-Id`.

use std::time::Duration;

use super::Flows;
use super::events::types;
use crate::{NatsPublisher, OutboxRelay, Query};

impl Flows {
    /// The query of the messages NATS steps produced (`FlowMessage` events).
    pub fn messages_query() -> Query {
        Query::items_of([types::MESSAGE], Vec::<String>::new())
    }

    /// A relay named `name` publishing the NATS steps' messages: each on its
    /// step's subject, with its payload as the body and `<instance>/<task>/<phase>`
    /// as `Nats-Msg-Id` (JetStream drops duplicates). Run it with
    /// [`OutboxRelay::run`].
    pub fn message_relay(
        &self,
        name: &str,
        client: async_nats::Client,
        ack_timeout: Duration,
    ) -> OutboxRelay<NatsPublisher> {
        let publisher = NatsPublisher::with_subject(client, ack_timeout, |e| {
            e.data()["subject"]
                .as_str()
                .unwrap_or("dcbflow.unrouted")
                .to_owned()
        });
        OutboxRelay::new(
            self.store().clone(),
            name,
            Self::messages_query(),
            publisher,
        )
    }
}
