//! The retry policy: exponential backoff with jitter, then a dead letter.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// What to do with a message whose publish attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Try again after this delay.
    Retry(Duration),
    /// Give up: dead-letter it.
    DeadLetter,
}

/// Exponential backoff with jitter and a maximum number of attempts.
///
/// The n-th failed attempt (1-based) waits `initial_delay * multiplier^(n-1)`, capped at
/// `max_delay`, then reduced by a random share of up to `jitter` so that messages that failed
/// together do not come back together. After `max_attempts` failed attempts the message is
/// dead-lettered; a permanent failure dead-letters it at once.
///
/// **What counts as an attempt.** Only a failure of the message itself: a permanent failure
/// (too large, refused by the broker), or a transient failure of the message while the broker
/// confirmed other messages of the same call. An outage is never an attempt: a broker that is
/// unreachable, a call that fails or times out as a whole, or a call in which every message
/// failed transiently and none was confirmed, pauses the relay instead (it hands the messages
/// back untouched and probes the broker until it answers; see
/// [`Relay::run`](crate::Relay::run)). So however long a broker or database is down, no
/// message is dead-lettered for it.
///
/// ```
/// use std::time::Duration;
/// use outbox_core::{Decision, RetryPolicy};
///
/// let policy = RetryPolicy::default().jitter(0.0);
/// assert_eq!(policy.decide(1, true), Decision::Retry(Duration::from_millis(500)));
/// assert_eq!(policy.decide(2, true), Decision::Retry(Duration::from_secs(1)));
/// assert_eq!(policy.decide(1, false), Decision::DeadLetter);
/// assert_eq!(policy.decide(policy.max_attempts, true), Decision::DeadLetter);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay after the first failure (default 500 ms).
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Longest delay (default 5 min).
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Growth factor per failure (default 2).
    pub multiplier: f64,
    /// Share of each delay drawn at random, from 0 (none) to 1 (full jitter); default 0.2.
    pub jitter: f64,
    /// Failed attempts of the message's own (see above: outages are not attempts) after which
    /// it is dead-lettered (default 12). 1 dead-letters at the first failure.
    pub max_attempts: u32,
    /// Never dead-letter a message for transient failures, however many (default false):
    /// `max_attempts` then only bounds the backoff's growth, and a permanent failure still
    /// dead-letters at once. For outboxes where a message stuck behind a broker's partial
    /// failure is better than one set aside: its later messages of the same key wait for it.
    pub retry_transient_forever: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: 0.2,
            max_attempts: 12,
            retry_transient_forever: false,
        }
    }
}

impl RetryPolicy {
    /// Sets the first delay.
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Sets the longest delay.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Sets the growth factor.
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Sets the jitter share (0 to 1).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets the attempts after which a message is dead-lettered.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets [`RetryPolicy::retry_transient_forever`].
    pub fn retry_transient_forever(mut self, forever: bool) -> Self {
        self.retry_transient_forever = forever;
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::new("retry.max_attempts", "must be at least 1"));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(ConfigError::new(
                "retry.multiplier",
                "must be a number of at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::new("retry.jitter", "must be between 0 and 1"));
        }
        if self.initial_delay > self.max_delay {
            return Err(ConfigError::new(
                "retry.initial_delay",
                "must not exceed retry.max_delay",
            ));
        }
        Ok(())
    }

    /// The delay before the next try after `attempts` failed attempts (at least 1), jitter
    /// included.
    pub fn delay(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(64) as i32;
        let base = self.initial_delay.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max_delay.as_secs_f64());
        let jittered = capped * (1.0 - self.jitter * fastrand::f64());
        Duration::try_from_secs_f64(jittered).unwrap_or(self.max_delay)
    }

    /// What to do after a failed attempt, given the failed attempts so far (this one included)
    /// and whether the failure was transient.
    pub fn decide(&self, attempts: u32, transient: bool) -> Decision {
        let exhausted = attempts >= self.max_attempts && !self.retry_transient_forever;
        if !transient || exhausted {
            Decision::DeadLetter
        } else {
            Decision::Retry(self.delay(attempts))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps_and_jitter_only_shortens() {
        let policy = RetryPolicy::default()
            .initial_delay(Duration::from_millis(100))
            .max_delay(Duration::from_secs(1))
            .jitter(0.5);
        for _ in 0..100 {
            let first = policy.delay(1);
            assert!(
                first <= Duration::from_millis(100) && first >= Duration::from_millis(50),
                "{first:?}"
            );
            let late = policy.delay(30);
            assert!(
                late <= Duration::from_secs(1) && late >= Duration::from_millis(500),
                "{late:?}"
            );
        }
        let exact = policy.clone().jitter(0.0);
        assert_eq!(exact.delay(3), Duration::from_millis(400));
        assert_eq!(exact.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn transient_failures_can_be_retried_for_ever() {
        let policy = RetryPolicy::default()
            .max_attempts(2)
            .max_delay(Duration::from_secs(1))
            .jitter(0.0)
            .retry_transient_forever(true);
        assert_eq!(
            policy.decide(u32::MAX, true),
            Decision::Retry(Duration::from_secs(1))
        );
        assert_eq!(policy.decide(1, false), Decision::DeadLetter);
        assert_eq!(
            policy.retry_transient_forever(false).decide(2, true),
            Decision::DeadLetter
        );
    }

    #[test]
    fn jitter_spreads_delays() {
        let policy = RetryPolicy::default().jitter(1.0);
        let delays: std::collections::HashSet<_> = (0..20).map(|_| policy.delay(4)).collect();
        assert!(delays.len() > 10);
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert!(RetryPolicy::default().validate().is_ok());
        assert_eq!(
            RetryPolicy::default()
                .max_attempts(0)
                .validate()
                .map_err(|e| e.field),
            Err("retry.max_attempts")
        );
        assert_eq!(
            RetryPolicy::default()
                .jitter(1.5)
                .validate()
                .map_err(|e| e.field),
            Err("retry.jitter")
        );
        assert_eq!(
            RetryPolicy::default()
                .multiplier(f64::NAN)
                .validate()
                .map_err(|e| e.field),
            Err("retry.multiplier")
        );
    }
}
