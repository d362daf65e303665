//! The typed envelope an event carries for the relay: its message id, its
//! subject and which part of it is the message body.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{Event, SequencedEvent};

/// The metadata key an [`Envelope`] is stored under.
pub const ENVELOPE_KEY: &str = "outbox";

/// How the relay sends an event: attach one with [`Envelope::attach`] when the
/// event is appended; events without one are sent whole, with the id
/// `<schema>:<position>`.
///
/// ```
/// use dcbflow::Event;
/// use dcbflow::outbox::{Body, Envelope};
/// use serde_json::json;
///
/// let event = Envelope::new()
///     .message_id("order-7/ship/action")
///     .subject("shipping.requests")
///     .body(Body::Pointer("/payload".into()))
///     .attach(Event::new("ShipRequested", ["order:7"], json!({"payload": {"order": 7}})));
/// let envelope = Envelope::of(&event).unwrap();
/// assert_eq!(envelope.subject.as_deref(), Some("shipping.requests"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Envelope {
    /// The message id, the same on every attempt (default `<schema>:<position>`):
    /// sent as `Nats-Msg-Id` (JetStream deduplicates) or `Idempotency-Key`
    /// (webhooks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The subject to publish on, for publishers that route by subject (default:
    /// the publisher's own choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// What the message body is (default: the whole event).
    #[serde(default, skip_serializing_if = "Body::is_event")]
    pub body: Body,
}

/// What the relay sends as a message's body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Body {
    /// The whole event, as JSON (a [`SequencedEvent`]).
    #[default]
    Event,
    /// The event's data.
    Data,
    /// The part of the event's data at this JSON pointer (RFC 6901, e.g.
    /// `/payload`); `null` if there is none.
    Pointer(String),
}

impl Body {
    fn is_event(&self) -> bool {
        *self == Body::Event
    }
}

impl Envelope {
    /// An envelope with every default.
    pub fn new() -> Self {
        Envelope::default()
    }

    /// Sets the message id.
    #[must_use]
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Sets the subject.
    #[must_use]
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Sets what the body is.
    #[must_use]
    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// `event` with this envelope in its metadata (under [`ENVELOPE_KEY`]; other
    /// metadata keys are kept; metadata that is not an object is replaced).
    pub fn attach(self, mut event: Event) -> Event {
        let envelope = serde_json::to_value(self).expect("an envelope serializes");
        match &mut event.metadata {
            Some(Value::Object(map)) => {
                map.insert(ENVELOPE_KEY.to_owned(), envelope);
            }
            other => {
                let mut map = serde_json::Map::new();
                map.insert(ENVELOPE_KEY.to_owned(), envelope);
                *other = Some(Value::Object(map));
            }
        }
        event
    }

    /// The envelope `event` carries, if any (`None` also for one that does not
    /// decode: the event is then sent with the defaults).
    pub fn of(event: &Event) -> Option<Envelope> {
        let value = event.metadata.as_ref()?.get(ENVELOPE_KEY)?;
        serde_json::from_value(value.clone()).ok()
    }

    /// The body of `event` under this envelope, serialized.
    pub(crate) fn render(&self, event: &SequencedEvent) -> Vec<u8> {
        match &self.body {
            Body::Event => serde_json::to_vec(event),
            Body::Data => serde_json::to_vec(&event.event.data),
            Body::Pointer(p) => {
                serde_json::to_vec(event.event.data.pointer(p).unwrap_or(&Value::Null))
            }
        }
        .expect("events serialize")
    }
}
