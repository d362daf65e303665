//! Why an attempt failed: what executors report and retries are decided on.

use std::time::Duration;

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    /// What happened.
    pub message: String,
    /// A short class (`http_503`, `timeout`, `template`, ...), matched by
    /// [`TaskRetry::retry_on`](super::definition::TaskRetry).
    pub code: Option<String>,
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// The earliest time to retry (e.g. HTTP `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl TaskError {
    /// A failure worth retrying.
    pub fn retryable(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            code: None,
            retryable: true,
            retry_after: None,
        }
    }

    /// A failure no retry will fix.
    pub fn fatal(message: impl Into<String>) -> Self {
        TaskError {
            retryable: false,
            ..TaskError::retryable(message)
        }
    }

    /// Sets the code.
    #[must_use]
    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Sets the earliest retry time.
    #[must_use]
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}
