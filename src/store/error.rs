//! The store's error type, and the one place where driver errors are classified.

use super::event::Position;

/// What [`Error::Timeout`] says when a call to the database took longer than
/// [`StoreBuilder::call_timeout`](super::StoreBuilder::call_timeout).
pub(crate) const CALL_TIMED_OUT: &str = "waiting for the database to answer";

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
        "migration {layer}/{version} ({name}) was changed after it was applied to schema {schema:?}: checksum mismatch"
    )]
    MigrationChanged {
        /// The schema the store lives in.
        schema: String,
        /// The layer the migration belongs to (`store`, `command`, `flow`, ...).
        layer: &'static str,
        /// The migration's version number.
        version: i32,
        /// The migration's file name.
        name: String,
    },
    /// The database holds migrations this build does not know (it is older than the schema).
    #[error(
        "schema {schema:?} has migration {layer}/{version}, which this version of dcbflow does not know"
    )]
    MigrationUnknown {
        /// The schema the store lives in.
        schema: String,
        /// The layer the migration belongs to.
        layer: &'static str,
        /// The unknown version.
        version: i32,
    },
    /// A store handle that does not migrate ([`StoreBuilder::migrate`](super::StoreBuilder::migrate)
    /// `(false)`) needs a layer's tables that are missing or older than this
    /// build: migrate the schema with a handle that does (or call the layer's
    /// `migrate`, for example [`CommandExecutor::migrate`](crate::CommandExecutor::migrate)).
    #[error(
        "schema {schema:?} lacks the current tables of the {layer} layer, and this store handle does not migrate"
    )]
    SchemaNotInstalled {
        /// The schema the store lives in.
        schema: String,
        /// The layer whose tables are missing.
        layer: &'static str,
    },
    /// The commit of a group-commit batch failed in a way that leaves its outcome
    /// unknown (for example the connection was lost during `COMMIT`). Re-send the
    /// append with event ids to find out safely: a replay returns the stored
    /// positions. The text carries the driver's error, SQLSTATE and message.
    #[error("the outcome of the commit is unknown: {0}")]
    CommitUnknown(String),
    /// An event the log holds cannot be decoded: it was written around the
    /// store's checks (by SQL, or before they existed). Readers stop at it rather
    /// than skip it; repair or remove the event by its position, or move the
    /// consumer's checkpoint past it.
    #[error("the event at position {position} cannot be read: {reason}")]
    Unreadable {
        /// Its position.
        position: Position,
        /// What failed.
        reason: String,
    },
    /// Waiting took longer than its bound (for a pooled connection, for a new
    /// connection): nothing was attempted; back off and try again.
    #[error("timed out {0}")]
    Timeout(&'static str),
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
    /// re-deciding), overload, a pool that had no connection in time, and the
    /// database errors [`sqlstate::is_transient`] lists.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Conflict { .. }
            | Error::Overloaded { .. }
            | Error::Timeout(_)
            | Error::CommitUnknown(_) => true,
            Error::Pool(e) => !matches!(
                e,
                deadpool_postgres::PoolError::Closed
                    | deadpool_postgres::PoolError::NoRuntimeSpecified
            ),
            Error::Database(e) => sqlstate::is_transient(e),
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

    /// `true` for a unique violation of the constraint named `constraint`.
    pub fn is_unique_violation(&self, constraint: &str) -> bool {
        match self {
            Error::Database(e) => sqlstate::is_unique_violation(e, constraint),
            _ => false,
        }
    }

    /// `true` when the connection that produced this error must not be reused
    /// (closed, terminated by the server, or a protocol-level failure).
    pub(crate) fn breaks_connection(&self) -> bool {
        match self {
            Error::Database(e) => sqlstate::breaks_connection(e),
            // The server did not answer in time: the connection may be stuck in
            // a network that swallows everything; never hand it out again.
            Error::Timeout(what) => *what == CALL_TIMED_OUT,
            _ => false,
        }
    }

    /// Maps a driver error, turning the store's own SQLSTATEs into typed errors.
    pub(crate) fn from_db(e: tokio_postgres::Error) -> Self {
        let detail = || e.as_db_error().and_then(|d| d.detail()).unwrap_or_default();
        match e.code().map(|c| c.code()) {
            Some(sqlstate::IDS_ALREADY_STORED) => InvalidInput::IdsAlreadyStored.into(),
            Some(sqlstate::ISOLATION_LEVEL) => InvalidInput::IsolationLevel.into(),
            Some(sqlstate::BEYOND_HEAD) => {
                let mut n = detail().split(',').map(|x| x.parse().unwrap_or(0));
                let (position, head) = (n.next().unwrap_or(0), n.next().unwrap_or(0));
                InvalidInput::BeyondHead {
                    position: Position(position),
                    head: Position(head),
                }
                .into()
            }
            Some(sqlstate::ID_REUSED) => InvalidInput::IdReused {
                index: detail().parse().unwrap_or(0),
            }
            .into(),
            _ => Error::Database(e),
        }
    }
}

/// What PostgreSQL's error codes mean to dcbflow: every layer classifies driver
/// errors through these functions, so that "retry", "the connection is gone" and
/// "duplicate" mean the same everywhere (the command executor, the relays, the
/// flow engine's SQL steps).
pub mod sqlstate {
    /// Raised by `append_events` when some, not all, event ids were stored before.
    pub(crate) const IDS_ALREADY_STORED: &str = "DCB01";
    /// Raised by `append_events` in a transaction that is not READ COMMITTED.
    pub(crate) const ISOLATION_LEVEL: &str = "DCB02";
    /// Raised by `guard_transaction` for a cursor beyond the head of the log.
    pub(crate) const BEYOND_HEAD: &str = "DCB03";
    /// Raised by `append_guarded` for a stored event id reused with other content.
    pub(crate) const ID_REUSED: &str = "DCB04";

    /// The SQLSTATE of `e`, if the server sent one.
    pub fn code(e: &tokio_postgres::Error) -> Option<&str> {
        e.code().map(|c| c.code())
    }

    /// `true` when the same statement may succeed if tried again: serialization
    /// failures and deadlocks (class 40), lost or refused connections (class 08,
    /// `53300` too many connections), the server shutting down or terminating the
    /// session (`57P01`-`57P03`), a statement cancelled by `statement_timeout`
    /// (`57014`), and a connection the driver found closed.
    pub fn is_transient(e: &tokio_postgres::Error) -> bool {
        e.is_closed()
            || network(e)
            || code(e).is_some_and(|c| {
                c.starts_with("40")
                    || c.starts_with("08")
                    || matches!(c, "53300" | "57P01" | "57P02" | "57P03" | "57014")
            })
    }

    /// `true` when `e` was caused by the network: a refused, reset or aborted
    /// connection, a broken pipe, a timeout, or a connection that ended early.
    pub fn network(e: &tokio_postgres::Error) -> bool {
        use std::io::ErrorKind::*;
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                return matches!(
                    io.kind(),
                    ConnectionRefused
                        | ConnectionReset
                        | ConnectionAborted
                        | NotConnected
                        | BrokenPipe
                        | TimedOut
                        | UnexpectedEof
                        | HostUnreachable
                        | NetworkUnreachable
                        | NetworkDown
                        | AddrNotAvailable
                );
            }
            source = s.source();
        }
        false
    }

    /// `true` when the connection that produced `e` must not be reused: closed,
    /// terminated by the server, or a failure below the SQL level.
    pub fn breaks_connection(e: &tokio_postgres::Error) -> bool {
        e.is_closed()
            || network(e)
            || code(e).is_some_and(|c| c.starts_with("08") || c.starts_with("57P"))
            || e.code().is_none() && e.as_db_error().is_none()
    }

    /// `true` for a unique violation (`23505`) of the constraint `constraint`.
    pub fn is_unique_violation(e: &tokio_postgres::Error, constraint: &str) -> bool {
        e.as_db_error()
            .is_some_and(|db| db.code().code() == "23505" && db.constraint() == Some(constraint))
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::from_db(e)
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::{PoolError, TimeoutType};
        match e {
            PoolError::Backend(e) => Error::from_db(e),
            PoolError::Timeout(TimeoutType::Wait) => {
                Error::Timeout("waiting for a pooled connection")
            }
            PoolError::Timeout(TimeoutType::Create) => Error::Timeout("connecting to the database"),
            PoolError::Timeout(TimeoutType::Recycle) => {
                Error::Timeout("checking a pooled connection")
            }
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
    /// JSON data or metadata nested deeper than [`Limits::max_json_depth`](super::Limits).
    #[error("invalid input: event {index} has {field} nested deeper than {max} levels")]
    TooDeep {
        /// Index of the event.
        index: usize,
        /// `"data"` or `"metadata"`.
        field: &'static str,
        /// The configured limit.
        max: usize,
    },
    /// All events of one append together exceed [`Limits::max_append_bytes`](super::Limits).
    #[error("invalid input: the append carries {size} bytes or more, the limit is {max}")]
    AppendTooLarge {
        /// Bytes counted before the limit was passed.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// A query has more items than [`Limits::max_query_items`](super::Limits).
    #[error("invalid input: a query of {count} items, the limit is {max}")]
    TooManyItems {
        /// Items in the query.
        count: usize,
        /// The configured limit.
        max: usize,
    },
    /// A cursor or position that no read can have produced (negative, or a
    /// snapshot PostgreSQL cannot have taken).
    #[error("invalid input: bad cursor: {0}")]
    Cursor(String),
    /// A position beyond the head of the log: no read can have seen it, so a
    /// condition after it would ignore the events in between.
    #[error("invalid input: position {position} is beyond the head of the log ({head})")]
    BeyondHead {
        /// The position given.
        position: Position,
        /// The last position allocated in the log.
        head: Position,
    },
    /// Event ids of this append were stored before with different content (type,
    /// tags, data or metadata): an id is an idempotency key, and reusing it for
    /// another event is refused rather than answered as a replay.
    #[error("invalid input: event {index} reuses a stored event id with different content")]
    IdReused {
        /// Index of the first event whose stored twin differs.
        index: usize,
    },
    /// A name (of a subscription, projection or relay) is empty or too long.
    #[error("invalid input: {0}")]
    Name(String),
}
