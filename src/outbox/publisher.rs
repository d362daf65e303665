//! Where the relay publishes to.

use std::future::Future;
#[cfg(any(feature = "nats", feature = "amqp"))]
use std::sync::Arc;
#[cfg(any(feature = "nats", feature = "http"))]
use std::time::Duration;

use super::Envelope;
use crate::store::SequencedEvent;

/// One event on its way out, shaped by its [`Envelope`] (if it has one).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutboxMessage {
    /// Stable id, the same on every attempt: the envelope's message id, else
    /// `<schema>:<position>`. Sent as `Nats-Msg-Id` (JetStream deduplicates) or
    /// `Idempotency-Key` (webhooks).
    pub id: String,
    /// The envelope's subject, if it names one.
    pub subject: Option<String>,
    /// The event.
    pub event: SequencedEvent,
    /// The body: the event serialized as JSON (a [`SequencedEvent`]), or the
    /// part of it the envelope names.
    pub payload: Vec<u8>,
}

impl OutboxMessage {
    /// The message for `event` of the store in `schema`.
    pub fn new(schema: &str, event: SequencedEvent) -> Self {
        let envelope = Envelope::of(&event.event).unwrap_or_default();
        let payload = envelope.render(&event);
        let id = envelope
            .message_id
            .unwrap_or_else(|| format!("{schema}:{}", event.position));
        OutboxMessage {
            id,
            subject: envelope.subject,
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
    /// The destination was unreachable (no connection, timed out, asked to come
    /// back later): the message itself was not refused. The relay retries such
    /// failures for as long as they last, without counting them toward
    /// dead-lettering, so an outage never turns good messages into dead letters.
    pub transient: bool,
}

impl PublishFailure {
    /// The message at `delivered` was refused: counts toward `max_attempts`.
    pub fn refused(delivered: usize, error: impl Into<String>) -> Self {
        PublishFailure {
            delivered,
            error: error.into(),
            transient: false,
        }
    }

    /// The destination could not be reached: retried without limit.
    pub fn unreachable(delivered: usize, error: impl Into<String>) -> Self {
        PublishFailure {
            delivered,
            error: error.into(),
            transient: true,
        }
    }
}

/// Publishes messages in order, reporting how far it got.
pub trait Publisher: Send + Sync {
    /// The messaging system, for traces (OpenTelemetry's `messaging.system`;
    /// default `"other"`).
    fn system(&self) -> &'static str {
        "other"
    }

    /// Publishes `messages` in order. On failure, says how many from the start were
    /// durably accepted; the relay retries from the first that was not.
    fn publish(
        &self,
        messages: &[OutboxMessage],
    ) -> impl Future<Output = Result<(), PublishFailure>> + Send;
}

#[cfg(feature = "nats")]
type SubjectFn = Arc<dyn Fn(&SequencedEvent) -> String + Send + Sync>;

/// Publishes to NATS JetStream with `Nats-Msg-Id` set to the message id. A batch is
/// sent in one go and its acknowledgements awaited in order. A message whose
/// envelope names a subject goes there; others to the subject this publisher
/// chooses.
#[cfg(feature = "nats")]
#[derive(Clone)]
pub struct NatsPublisher {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    subject: SubjectFn,
}

#[cfg(feature = "nats")]
impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher").finish_non_exhaustive()
    }
}

#[cfg(feature = "nats")]
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
        let mut jetstream = async_nats::jetstream::new(client.clone());
        jetstream.set_timeout(ack_timeout);
        NatsPublisher {
            client,
            jetstream,
            subject: Arc::new(subject),
        }
    }
}

#[cfg(feature = "nats")]
impl NatsPublisher {
    /// A failure is the broker's, not the message's, when the client is not
    /// connected or the acknowledgement timed out.
    fn failure(&self, delivered: usize, error: String, timed_out: bool) -> PublishFailure {
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        if timed_out || !connected {
            PublishFailure::unreachable(delivered, error)
        } else {
            PublishFailure::refused(delivered, error)
        }
    }
}

#[cfg(feature = "nats")]
impl Publisher for NatsPublisher {
    fn system(&self) -> &'static str {
        "nats"
    }

    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), PublishFailure> {
        use async_nats::jetstream::context::PublishErrorKind;
        let mut acks = Vec::with_capacity(messages.len());
        let mut send_error = None;
        for m in messages {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", m.id.as_str());
            if let Some(tp) = m.event.data()["traceparent"].as_str() {
                headers.insert("traceparent", tp);
            }
            let sent = self
                .jetstream
                .publish_with_headers(
                    m.subject
                        .clone()
                        .unwrap_or_else(|| (self.subject)(&m.event)),
                    headers,
                    m.payload.clone().into(),
                )
                .await;
            match sent {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    let timed_out = matches!(e.kind(), PublishErrorKind::TimedOut);
                    send_error = Some((e.to_string(), timed_out));
                    break;
                }
            }
        }
        let sent = acks.len();
        for (delivered, ack) in acks.into_iter().enumerate() {
            if let Err(e) = ack.await {
                let timed_out = matches!(e.kind(), PublishErrorKind::TimedOut);
                return Err(self.failure(delivered, e.to_string(), timed_out));
            }
        }
        match send_error {
            None => Ok(()),
            Some((error, timed_out)) => Err(self.failure(sent, error, timed_out)),
        }
    }
}

/// POSTs each message's JSON to a URL with an `Idempotency-Key` header, in order;
/// any 2xx status is success. `https://` URLs are verified against the
/// platform's roots (rustls).
#[cfg(feature = "http")]
#[derive(Debug, Clone)]
pub struct WebhookPublisher {
    client: reqwest::Client,
    url: String,
}

#[cfg(feature = "http")]
impl WebhookPublisher {
    /// A publisher posting to `url` with a request timeout.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(url: impl Into<String>, timeout: Duration) -> Result<Self, reqwest::Error> {
        Self::with_client(crate::http::client_builder().timeout(timeout).build()?, url)
    }

    /// A publisher posting to `url` with `client` (for example one that trusts
    /// a private certificate authority).
    ///
    /// # Errors
    /// None today; kept fallible like [`new`](Self::new).
    pub fn with_client(
        client: reqwest::Client,
        url: impl Into<String>,
    ) -> Result<Self, reqwest::Error> {
        Ok(WebhookPublisher {
            client,
            url: url.into(),
        })
    }
}

#[cfg(feature = "http")]
impl Publisher for WebhookPublisher {
    fn system(&self) -> &'static str {
        "webhook"
    }

    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), PublishFailure> {
        for (delivered, m) in messages.iter().enumerate() {
            let response = self
                .client
                .post(&self.url)
                .header("Idempotency-Key", &m.id)
                .header("Content-Type", "application/json")
                .body(m.payload.clone())
                .send()
                .await
                .map_err(|e| {
                    if e.is_connect() || e.is_timeout() {
                        PublishFailure::unreachable(delivered, e.without_url().to_string())
                    } else {
                        PublishFailure::refused(delivered, e.without_url().to_string())
                    }
                })?;
            let status = response.status();
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status == reqwest::StatusCode::SERVICE_UNAVAILABLE
            {
                return Err(PublishFailure::unreachable(
                    delivered,
                    format!("HTTP {status}"),
                ));
            }
            if !status.is_success() {
                return Err(PublishFailure::refused(delivered, format!("HTTP {status}")));
            }
        }
        Ok(())
    }
}

/// The exchange of a message, chosen from its event.
#[cfg(feature = "amqp")]
type ExchangeFn = Arc<dyn Fn(&SequencedEvent) -> String + Send + Sync>;

/// Publishes to RabbitMQ (AMQP 0-9-1) with publisher confirms: each message
/// persistent (delivery mode 2), `application/json`, with the message id as
/// its AMQP `message_id` (consumers deduplicate by it: delivery is at least
/// once). A batch is sent in one go and its confirms awaited in order. A
/// message whose envelope names a subject is routed by it; others by the event
/// type.
#[cfg(feature = "amqp")]
#[derive(Clone)]
pub struct AmqpPublisher {
    /// Kept open for the channel.
    connection: Arc<lapin::Connection>,
    channel: lapin::Channel,
    exchange: ExchangeFn,
}

#[cfg(feature = "amqp")]
impl std::fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpPublisher").finish_non_exhaustive()
    }
}

#[cfg(feature = "amqp")]
impl AmqpPublisher {
    /// Connects to `uri` (`amqp://user:password@host:5672/%2f`), opens a
    /// channel with publisher confirms, and publishes to `exchange` (`""`: the
    /// default exchange, routing to the queue the routing key names).
    ///
    /// # Errors
    /// The broker's refusal or a connection error, as text.
    pub async fn connect(uri: &str, exchange: &str) -> Result<Self, String> {
        let exchange = exchange.to_owned();
        Self::connect_with(uri, move |_| exchange.clone()).await
    }

    /// As [`connect`](Self::connect), the exchange chosen per event.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn connect_with(
        uri: &str,
        exchange: impl Fn(&SequencedEvent) -> String + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let connection = lapin::Connection::connect(uri, lapin::ConnectionProperties::default())
            .await
            .map_err(|e| e.to_string())?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        Ok(AmqpPublisher {
            connection: Arc::new(connection),
            channel,
            exchange: Arc::new(exchange),
        })
    }

    /// A failure is the broker's when the connection or channel is down.
    fn failure(&self, delivered: usize, error: String) -> PublishFailure {
        if self.connection.status().connected() && self.channel.status().connected() {
            PublishFailure::refused(delivered, error)
        } else {
            PublishFailure::unreachable(delivered, error)
        }
    }
}

#[cfg(feature = "amqp")]
impl Publisher for AmqpPublisher {
    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), PublishFailure> {
        let mut confirms = Vec::with_capacity(messages.len());
        let mut send_error = None;
        for m in messages {
            let mut properties = lapin::BasicProperties::default()
                .with_message_id(m.id.as_str().into())
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            if let Some(tp) = m.event.data()["traceparent"].as_str() {
                let mut headers = lapin::types::FieldTable::default();
                headers.insert(
                    "traceparent".into(),
                    lapin::types::AMQPValue::LongString(tp.into()),
                );
                properties = properties.with_headers(headers);
            }
            let routing_key = m
                .subject
                .clone()
                .unwrap_or_else(|| m.event.event_type().to_owned());
            let sent = self
                .channel
                .basic_publish(
                    (self.exchange)(&m.event).as_str().into(),
                    routing_key.as_str().into(),
                    lapin::options::BasicPublishOptions::default(),
                    &m.payload,
                    properties,
                )
                .await;
            match sent {
                Ok(confirm) => confirms.push(confirm),
                Err(e) => {
                    send_error = Some(e.to_string());
                    break;
                }
            }
        }
        let sent = confirms.len();
        for (delivered, confirm) in confirms.into_iter().enumerate() {
            match confirm.await {
                Ok(c) if c.is_ack() => {}
                Ok(_) => {
                    return Err(PublishFailure::refused(
                        delivered,
                        "the broker refused the message (nack)",
                    ));
                }
                Err(e) => return Err(self.failure(delivered, e.to_string())),
            }
        }
        match send_error {
            None => Ok(()),
            Some(error) => Err(self.failure(sent, error)),
        }
    }
}
