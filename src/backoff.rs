//! Exponential backoff with full jitter: the one implementation every layer
//! uses (the command executor's conflict retries, the outbox relay's delivery
//! retries, the flow engine's task retries).
//!
//! A leaf module: it depends on no layer, and every layer may use it.

use std::time::Duration;

use rand::Rng;

/// Delays that grow from `initial` by `multiplier` per attempt up to `max`; each
/// delay is drawn uniformly between zero and that ceiling (full jitter), so
/// contending retries spread out instead of colliding again in lockstep.
///
/// ```
/// use std::time::Duration;
/// let b = dcbflow::Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
/// assert_eq!(b.ceiling(1), Duration::from_millis(10));
/// assert_eq!(b.ceiling(3), Duration::from_millis(40));
/// assert!(b.delay(3) <= Duration::from_millis(40));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Backoff {
    /// Ceiling of the first delay.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
    /// Growth of the ceiling per attempt (values below 1 count as 1).
    pub multiplier: f64,
}

impl Backoff {
    /// Doubling from `initial` up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            multiplier: 2.0,
        }
    }

    /// Sets the growth per attempt.
    #[must_use]
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// The ceiling of the delay after failed attempt `attempt` (1-based): `initial`
    /// × `multiplier`^(attempt − 1), at most `max`. The exponent stops growing
    /// after 64.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        Duration::try_from_secs_f64(secs).unwrap_or(self.max)
    }

    /// A delay after failed attempt `attempt`, uniform in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.ceiling(attempt)
            .mul_f64(rand::rng().random_range(0.0..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_a_ceiling_that_grows_to_the_max() {
        let b = Backoff::new(Duration::from_millis(2), Duration::from_millis(250));
        for attempt in 1..100 {
            let expected = Duration::from_millis(2)
                .mul_f64(2f64.powi(attempt.min(65) - 1))
                .min(Duration::from_millis(250));
            assert_eq!(b.ceiling(attempt as u32), expected, "attempt {attempt}");
            for _ in 0..20 {
                assert!(b.delay(attempt as u32) <= expected);
            }
        }
        assert_eq!(b.ceiling(0), Duration::from_millis(2));
        assert_eq!(b.multiplier(0.5).ceiling(10), Duration::from_millis(2));
    }
}
