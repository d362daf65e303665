//! The crate's error type.

use crate::store::Position;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a store operation.
///
/// Variants say what the caller can do about it: a [`Conflict`](Error::Conflict) means
/// "re-read and decide again", [`InvalidInput`](Error::InvalidInput) means "fix the
/// request", [`Overloaded`](Error::Overloaded) means "back off", and the rest are
/// infrastructure failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The append condition matched: an event the decision did not see exists.
    /// Nothing was written.
    #[error("append condition failed: the event at position {position} matches it")]
    Conflict {
        /// Position of the first conflicting event.
        position: Position,
    },
    /// The request was refused before anything was written.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// More operations were in flight than the configured limit; nothing was attempted.
    #[error("overloaded: {limit} store operations already in flight")]
    Overloaded {
        /// The configured limit.
        limit: usize,
    },
    /// A migration file differs from the one applied earlier.
    #[error(
        "migration {version} ({name}) was changed after it was applied to schema {schema:?}: checksum mismatch"
    )]
    MigrationChanged {
        /// The schema the store lives in.
        schema: String,
        /// The migration's version number.
        version: i32,
        /// The migration's file name.
        name: String,
    },
    /// The database holds migrations this build does not know (it is older than the schema).
    #[error(
        "schema {schema:?} has migration {version}, which this version of dcbflow does not know"
    )]
    MigrationUnknown {
        /// The schema the store lives in.
        schema: String,
        /// The unknown version.
        version: i32,
    },
    /// The commit of a group-commit batch failed in a way that leaves its outcome
    /// unknown (for example the connection was lost during `COMMIT`). Re-send the
    /// append with event ids to find out safely: a replay returns the stored positions.
    #[error("the outcome of the commit is unknown: {0}")]
    CommitUnknown(String),
    /// Publishing an outbox message failed.
    #[error("publish failed: {0}")]
    Publish(String),
    /// The store was configured wrongly (for example an invalid schema name).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An error reported by PostgreSQL or the driver.
    #[error("database error")]
    Database(#[source] tokio_postgres::Error),
    /// No connection could be taken from the pool.
    #[error("connection pool error")]
    Pool(#[source] deadpool_postgres::PoolError),
}

impl Error {
    /// `true` for a failed append condition.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// `true` when trying the same operation again may succeed: a conflict (after
    /// re-deciding), overload, serialization failures, deadlocks and lost connections.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Conflict { .. } | Error::Overloaded { .. } | Error::Pool(_) => true,
            Error::Database(e) => {
                e.is_closed()
                    || matches!(
                        e.code().map(|c| c.code()),
                        Some("40001" | "40P01" | "57P01" | "08006" | "08003" | "53300")
                    )
            }
            _ => false,
        }
    }

    /// The SQLSTATE of a database error, if any.
    pub fn sql_state(&self) -> Option<&str> {
        match self {
            Error::Database(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// `true` when the connection that produced this error must not be reused
    /// (closed, terminated by the server, or a protocol-level failure).
    pub(crate) fn breaks_connection(&self) -> bool {
        match self {
            Error::Database(e) => {
                e.is_closed()
                    || e.code().is_some_and(|c| {
                        let c = c.code();
                        c.starts_with("08") || c.starts_with("57P")
                    })
                    || e.code().is_none() && e.as_db_error().is_none()
            }
            _ => false,
        }
    }

    /// Maps a driver error, turning the store's own SQLSTATEs into typed errors.
    pub(crate) fn from_db(e: tokio_postgres::Error) -> Self {
        match e.code().map(|c| c.code()) {
            Some("DCB01") => InvalidInput::IdsAlreadyStored.into(),
            Some("DCB02") => InvalidInput::IsolationLevel.into(),
            _ => Error::Database(e),
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::from_db(e)
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => Error::from_db(e),
            e => Error::Pool(e),
        }
    }
}

/// Why a request was refused. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInput {
    /// `append` was called with no events.
    #[error("invalid input: an append needs at least one event")]
    NoEvents,
    /// More events in one append than [`Limits::max_events_per_append`](crate::Limits).
    #[error("invalid input: {count} events in one append, the limit is {max}")]
    TooManyEvents {
        /// Events in the request.
        count: usize,
        /// The configured limit.
        max: usize,
    },
    /// An event (or query item) type is the empty string.
    #[error("invalid input: event {index} has an empty type")]
    EmptyType {
        /// Index of the event in the append (or of the item in the query).
        index: usize,
    },
    /// A tag is the empty string.
    #[error("invalid input: event {index} has an empty tag")]
    EmptyTag {
        /// Index of the event in the append (or of the item in the query).
        index: usize,
    },
    /// A type is longer than [`Limits::max_type_len`](crate::Limits) bytes.
    #[error("invalid input: event {index} has a type of {len} bytes, the limit is {max}")]
    TypeTooLong {
        /// Index of the event.
        index: usize,
        /// Its length in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A tag is longer than [`Limits::max_tag_len`](crate::Limits) bytes.
    #[error("invalid input: event {index} has a tag of {len} bytes, the limit is {max}")]
    TagTooLong {
        /// Index of the event.
        index: usize,
        /// Its length in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// An event has more tags than [`Limits::max_tags_per_event`](crate::Limits).
    #[error("invalid input: event {index} has {count} tags, the limit is {max}")]
    TooManyTags {
        /// Index of the event.
        index: usize,
        /// Its number of tags.
        count: usize,
        /// The configured limit.
        max: usize,
    },
    /// Serialized data or metadata is larger than [`Limits::max_payload_bytes`](crate::Limits).
    #[error("invalid input: event {index} has a payload of {size} bytes, the limit is {max}")]
    PayloadTooLarge {
        /// Index of the event.
        index: usize,
        /// Size of its serialized data plus metadata.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// A type, tag, or JSON string contains a NUL character, which PostgreSQL cannot store.
    #[error("invalid input: event {index} has a NUL character in its {field}")]
    NulByte {
        /// Index of the event.
        index: usize,
        /// `"type"`, `"tag"`, `"data"` or `"metadata"`.
        field: &'static str,
    },
    /// Some events of one append carry ids and others do not.
    #[error("invalid input: either every event of an append carries an id or none does")]
    MixedIds,
    /// Two events of one append carry the same id.
    #[error("invalid input: event {index} repeats the id of an earlier event in the same append")]
    DuplicateId {
        /// Index of the second event with that id.
        index: usize,
    },
    /// Some, but not all, ids of this append were stored by an earlier, different append.
    #[error("invalid input: some event ids of this append are already stored by another append")]
    IdsAlreadyStored,
    /// `append_in_tx` was called inside a transaction that is not READ COMMITTED.
    #[error(
        "invalid input: appends need a READ COMMITTED transaction (the condition check must see writers that committed while it waited)"
    )]
    IsolationLevel,
    /// A read limit of zero, or another option out of range.
    #[error("invalid input: {0}")]
    Option(&'static str),
}
