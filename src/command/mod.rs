//! The command layer: decide on a decision model, append with its condition
//! (optimistically, or under the scope lock), with extra work inside the same
//! transaction, retry on conflict, record the command, and make it idempotent.
//!
//! Depends on the store and the projection layer. Owns `sql/command/` (the
//! command log). The flow engine's transitions are commands run by this
//! executor, so there is one implementation of pessimistic execution.

mod executor;
mod retry;
pub mod testing;

use std::future::Future;

pub use executor::{CommandError, CommandExecutor, CommandOutcome, Concurrency};
pub use retry::CommandRetry;

use crate::projection::DecisionModel;
use crate::store::migrate::{Layer, Migration};
use crate::store::{AppendResult, Event, Query};

/// The command layer's schema: the command log.
pub(crate) const SCHEMA: Layer = Layer {
    name: "command",
    migrations: &[Migration {
        version: 1,
        name: "0001_commands.sql",
        sql: include_str!("../../sql/command/0001_commands.sql"),
    }],
};

/// A command: which decision model it needs, and how it decides.
///
/// ```
/// use dcbflow::{Command, Decided, Event, Projector, Query};
/// use serde_json::json;
///
/// struct BookSeat { seat: String }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("seat {0} is taken")]
/// struct Taken(String);
///
/// impl Command for BookSeat {
///     type Model = Projector<bool>;
///     type Error = Taken;
///     fn command_type(&self) -> &str { "BookSeat" }
///     fn model(&self) -> Projector<bool> {
///         Projector::new(Query::items_of(["SeatBooked"], [format!("seat:{}", self.seat)]), false, |b, _| *b = true)
///     }
///     fn decide(&self, taken: bool) -> Result<Decided, Taken> {
///         if taken { return Err(Taken(self.seat.clone())); }
///         Ok(vec![Event::new("SeatBooked", [format!("seat:{}", self.seat)], json!({}))].into())
///     }
/// }
/// ```
pub trait Command: Send + Sync {
    /// The decision model this command decides on.
    type Model: DecisionModel;
    /// The domain error a decision can return (the command is then rejected: no
    /// retry, nothing appended).
    type Error: std::error::Error + Send + Sync + 'static;

    /// The command's type, recorded in the command log.
    fn command_type(&self) -> &str;

    /// The command's payload, recorded in the command log (default `null`).
    fn payload(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// A key making execution idempotent: a command whose key was already executed
    /// returns the stored outcome and appends nothing (default: none).
    fn idempotency_key(&self) -> Option<String> {
        None
    }

    /// The decision model to project before deciding.
    fn model(&self) -> Self::Model;

    /// Decides on the projected states: the events to append, or a domain error.
    ///
    /// # Errors
    /// The domain error rejecting the command.
    fn decide(
        &self,
        states: <Self::Model as DecisionModel>::States,
    ) -> Result<Decided, Self::Error>;

    /// Whether the command log records this command (default `true`). Commands
    /// whose events are their own record (the flow engine's transitions) say `false`.
    fn logged(&self) -> bool {
        true
    }

    /// Extra work inside the command's transaction, after the decision and before
    /// the append: SQL that must commit with the events, or not at all (default:
    /// none). `events` are the events about to be appended (possibly none). An
    /// error rolls everything back and fails the command with
    /// [`CommandError::Aborted`].
    fn before_append(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        events: &[Event],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = (tx, events);
        async { Ok(()) }
    }

    /// Extra work inside the command's transaction, after the events were
    /// appended (read models that must never be behind the log; default: none).
    /// Not called when the decision appended nothing. An error rolls everything
    /// back and fails the command with [`CommandError::Aborted`].
    fn after_append(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        events: &[Event],
        appended: &AppendResult,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = (tx, events, appended);
        async { Ok(()) }
    }
}

/// What a command decided: events to append, and optionally more events whose
/// appearance must also fail the append.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decided {
    /// Events to append (none: the command succeeds without appending).
    pub events: Vec<Event>,
    /// Extra items OR'd into the condition derived from the decision model.
    pub also_fail_if: Option<Query>,
}

impl From<Vec<Event>> for Decided {
    fn from(events: Vec<Event>) -> Self {
        Decided {
            events,
            also_fail_if: None,
        }
    }
}

impl Decided {
    /// Adds items to the append condition.
    #[must_use]
    pub fn also_fail_if(mut self, query: Query) -> Self {
        self.also_fail_if = Some(query);
        self
    }
}
