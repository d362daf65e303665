//! Errors of the outbox layer.

/// `Result` with the outbox's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an outbox operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The destination did not accept the message (a replayed dead letter stays,
    /// with this error recorded): fix the destination or the message, then
    /// replay again, or discard it.
    #[error("publish failed: {0}")]
    Publish(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Store(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::Store(e.into())
    }
}
