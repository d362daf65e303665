//! Where the relay publishes to.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::SequencedEvent;

/// One event on its way out.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    /// Stable id, the same on every attempt: `<schema>:<position>`. Sent as
    /// `Nats-Msg-Id` (JetStream deduplicates) or `Idempotency-Key` (webhooks).
    pub id: String,
    /// The event.
    pub event: SequencedEvent,
    /// The event serialized as JSON (a [`SequencedEvent`]).
    pub payload: Vec<u8>,
}

impl OutboxMessage {
    pub(crate) fn new(schema: &str, event: SequencedEvent) -> Self {
        let payload = serde_json::to_vec(&event).expect("events serialize");
        OutboxMessage {
            id: format!("{schema}:{}", event.position),
            event,
            payload,
        }
    }
}

/// A batch that was only partly published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishFailure {
    /// How many messages, from the start of the batch, were accepted.
    pub delivered: usize,
    /// Why the next one was not.
    pub error: String,
}

/// Publishes messages in order, reporting how far it got.
pub trait Publisher: Send + Sync {
    /// Publishes `messages` in order. On failure, says how many from the start were
    /// durably accepted; the relay retries from the first that was not.
    fn publish(
        &self,
        messages: &[OutboxMessage],
    ) -> impl Future<Output = Result<(), PublishFailure>> + Send;
}

type SubjectFn = Arc<dyn Fn(&SequencedEvent) -> String + Send + Sync>;

/// Publishes to NATS JetStream with `Nats-Msg-Id` set to the message id. A batch is
/// sent in one go and its acknowledgements awaited in order.
#[derive(Clone)]
pub struct NatsPublisher {
    jetstream: async_nats::jetstream::Context,
    subject: SubjectFn,
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher").finish_non_exhaustive()
    }
}

impl NatsPublisher {
    /// Publishes on `<prefix>.<event type>`, waiting at most `ack_timeout` for each
    /// acknowledgement.
    pub fn new(client: async_nats::Client, prefix: &str, ack_timeout: Duration) -> Self {
        let prefix = prefix.to_owned();
        Self::with_subject(client, ack_timeout, move |e| {
            format!("{prefix}.{}", e.event_type())
        })
    }

    /// Publishes on the subject `subject(event)` returns.
    pub fn with_subject(
        client: async_nats::Client,
        ack_timeout: Duration,
        subject: impl Fn(&SequencedEvent) -> String + Send + Sync + 'static,
    ) -> Self {
        let mut jetstream = async_nats::jetstream::new(client);
        jetstream.set_timeout(ack_timeout);
        NatsPublisher {
            jetstream,
            subject: Arc::new(subject),
        }
    }
}

impl Publisher for NatsPublisher {
    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), PublishFailure> {
        let mut acks = Vec::with_capacity(messages.len());
        let mut send_error = None;
        for m in messages {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", m.id.as_str());
            let sent = self
                .jetstream
                .publish_with_headers((self.subject)(&m.event), headers, m.payload.clone().into())
                .await;
            match sent {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    send_error = Some(e.to_string());
                    break;
                }
            }
        }
        let sent = acks.len();
        for (delivered, ack) in acks.into_iter().enumerate() {
            if let Err(e) = ack.await {
                return Err(PublishFailure {
                    delivered,
                    error: e.to_string(),
                });
            }
        }
        match send_error {
            None => Ok(()),
            Some(error) => Err(PublishFailure {
                delivered: sent,
                error,
            }),
        }
    }
}

/// POSTs each message's JSON to a URL with an `Idempotency-Key` header, in order;
/// any 2xx status is success.
#[derive(Debug, Clone)]
pub struct WebhookPublisher {
    client: reqwest::Client,
    url: String,
}

impl WebhookPublisher {
    /// A publisher posting to `url` with a request timeout.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(url: impl Into<String>, timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(WebhookPublisher {
            client: reqwest::Client::builder().timeout(timeout).build()?,
            url: url.into(),
        })
    }
}

impl Publisher for WebhookPublisher {
    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), PublishFailure> {
        for (delivered, m) in messages.iter().enumerate() {
            let fail = |error: String| PublishFailure { delivered, error };
            let response = self
                .client
                .post(&self.url)
                .header("Idempotency-Key", &m.id)
                .header("Content-Type", "application/json")
                .body(m.payload.clone())
                .send()
                .await
                .map_err(|e| fail(e.to_string()))?;
            if !response.status().is_success() {
                return Err(fail(format!("HTTP {}", response.status())));
            }
        }
        Ok(())
    }
}
