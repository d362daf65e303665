//! Retry with jittered exponential backoff.

use std::time::Duration;

use rand::Rng;

/// How the executor retries a command whose append conflicted.
///
/// Defaults: 10 attempts, backoff from 2 ms doubling up to 250 ms, with full jitter
/// (each delay drawn uniformly between 0 and the current ceiling), so contending
/// commands spread out instead of colliding again in lockstep.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in total, the first included (at least 1).
    pub max_attempts: u32,
    /// Ceiling of the first delay.
    pub initial_backoff: Duration,
    /// Largest ceiling.
    pub max_backoff: Duration,
    /// Growth of the ceiling per attempt.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(250),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// A policy with `n` attempts and default backoff.
    pub fn attempts(n: u32) -> Self {
        RetryPolicy {
            max_attempts: n.max(1),
            ..Self::default()
        }
    }

    /// No retries.
    pub fn none() -> Self {
        Self::attempts(1)
    }

    /// The delay after failed attempt `attempt` (1-based): uniform in `[0, ceiling]`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let ceiling = self.initial_backoff.mul_f64(exp).min(self.max_backoff);
        ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_growing_ceiling() {
        let p = RetryPolicy::default();
        for attempt in 1..20 {
            let ceiling =
                (p.initial_backoff.mul_f64(2f64.powi(attempt as i32 - 1))).min(p.max_backoff);
            for _ in 0..50 {
                assert!(p.backoff(attempt) <= ceiling);
            }
        }
        assert_eq!(RetryPolicy::attempts(0).max_attempts, 1);
    }
}
