//! How the executor retries.

use std::time::Duration;

use crate::backoff::Backoff;

/// How the [`CommandExecutor`](super::CommandExecutor) retries a command whose
/// append conflicted, or that met a retryable store error.
///
/// Defaults: 10 attempts, backoff from 2 ms doubling up to 250 ms, with full jitter
/// (see [`Backoff`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CommandRetry {
    /// Attempts in total, the first included (at least 1).
    pub max_attempts: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
}

impl Default for CommandRetry {
    fn default() -> Self {
        CommandRetry {
            max_attempts: 10,
            backoff: Backoff::new(Duration::from_millis(2), Duration::from_millis(250)),
        }
    }
}

impl CommandRetry {
    /// A policy with `n` attempts and default backoff.
    pub fn attempts(n: u32) -> Self {
        CommandRetry {
            max_attempts: n.max(1),
            ..Self::default()
        }
    }

    /// No retries.
    pub fn none() -> Self {
        Self::attempts(1)
    }

    /// Sets the backoff.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_least_one_attempt() {
        assert_eq!(CommandRetry::attempts(0).max_attempts, 1);
        assert_eq!(CommandRetry::none().max_attempts, 1);
    }
}
