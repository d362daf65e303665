//! Errors of the flow layer.

use std::fmt;

use crate::store::Position;

/// A definition that cannot be registered: every problem found, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DefinitionError {
    /// The flow's name (empty if it could not be parsed).
    pub flow: String,
    /// One line per problem.
    pub problems: Vec<String>,
}

impl DefinitionError {
    pub(crate) fn parse(source: &str, error: impl fmt::Display) -> Self {
        DefinitionError {
            flow: String::new(),
            problems: vec![format!("cannot parse {source}: {error}")],
        }
    }
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid flow definition {:?} ({} problem{}):",
            self.flow,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// Why a flow operation failed. Each variant says what the caller can do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// The definition is invalid: fix every problem listed, then register again.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// No flow of this name (or version) is registered: register it first.
    #[error("unknown flow {0:?}")]
    UnknownFlow(String),
    /// No instance with this id.
    #[error("unknown flow instance {0}")]
    UnknownInstance(uuid::Uuid),
    /// A schedule is invalid (one line per problem, naming the field): nothing
    /// was written.
    #[error("schedule is invalid: {}", .0.join("; "))]
    InvalidSchedule(Vec<String>),
    /// No schedule of this name.
    #[error("no schedule {0:?}")]
    UnknownSchedule(String),
    /// The flow input does not match the definition's input fields (one line
    /// per problem): fix the input. Nothing was written.
    #[error("flow input does not match the definition: {}", .0.join("; "))]
    InputMismatch(Vec<String>),
    /// A manual operation was refused because the instance changed since the
    /// operator looked at it (at `expected`); look again and decide again.
    #[error("the instance moved since version {expected} (now {actual})")]
    Moved {
        /// The version the operator saw.
        expected: Position,
        /// The instance's current version.
        actual: Position,
    },
    /// The operation does not apply to the instance or task in its current state.
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// Concurrent writers kept winning (for example many starts with one business
    /// key at once): try again.
    #[error("contended: {0}")]
    Contended(String),
    /// Something the log or the read models hold could not be read (a stored
    /// definition or event this version cannot decode): nothing the caller can
    /// fix by retrying; report it.
    #[error("unreadable flow data: {0}")]
    Unreadable(String),
    /// The store failed (see [`Error::is_retryable`](crate::store::Error::is_retryable)).
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

impl From<tokio_postgres::Error> for FlowError {
    fn from(e: tokio_postgres::Error) -> Self {
        FlowError::Store(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for FlowError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        FlowError::Store(e.into())
    }
}
