//! Events as appended and as read back.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::types::{FromSql, Type};
use uuid::Uuid;

/// Position of an event in the global log: unique and increasing in commit-visible
/// order of allocation. Gaps are allowed (rolled-back appends leave holes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(pub i64);

impl Position {
    /// The raw value.
    pub fn value(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<i64> for Position {
    fn from(v: i64) -> Self {
        Position(v)
    }
}

/// A PostgreSQL 64-bit transaction id (`xid8`), recorded with every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TransactionId(pub u64);

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'a> FromSql<'a> for TransactionId {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into().map_err(|_| "xid8 must be 8 bytes")?;
        Ok(TransactionId(u64::from_be_bytes(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "xid8"
    }
}

/// An event to append: a type, a set of tags and a JSON payload.
///
/// Tags are opaque strings (the convention is `key:value`); they are stored and
/// returned exactly as given, as a set (sorted, duplicates removed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The event type, e.g. `"AccountOpened"`. Non-empty.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The tags, e.g. `["account:42"]`. Each non-empty.
    pub tags: Vec<String>,
    /// The payload.
    pub data: Value,
    /// Optional metadata (correlation and causation ids, trace context, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Optional id. Appending events whose ids are already stored returns the
    /// original positions instead of writing them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
}

impl Event {
    /// An event with a type, tags and data.
    ///
    /// ```
    /// let e = dcbflow::Event::new("AccountOpened", ["account:42"], serde_json::json!({"owner": "ada"}));
    /// assert_eq!(e.tags, vec!["account:42"]);
    /// ```
    pub fn new<I, S>(event_type: impl Into<String>, tags: I, data: Value) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Event {
            event_type: event_type.into(),
            tags: tags.into_iter().map(Into::into).collect(),
            data,
            metadata: None,
            id: None,
        }
    }

    /// Sets the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Sets the id that makes re-sending this event idempotent.
    #[must_use]
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }
}

/// An event as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequencedEvent {
    /// Its position in the log.
    pub position: Position,
    /// The PostgreSQL transaction that wrote it.
    pub transaction_id: TransactionId,
    /// When that transaction started (`now()` of the appending transaction).
    pub recorded_at: DateTime<Utc>,
    /// The event itself.
    #[serde(flatten)]
    pub event: Event,
}

impl SequencedEvent {
    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event.event_type
    }

    /// The tags.
    pub fn tags(&self) -> &[String] {
        &self.event.tags
    }

    /// The payload.
    pub fn data(&self) -> &Value {
        &self.event.data
    }
}
