//! [`RelayConfig`]: how the relay claims, publishes, retries and shares work.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, RetryPolicy};

/// The first wait before probing a broker or store that is down.
pub(crate) const PROBE_MIN: Duration = Duration::from_millis(100);

/// Settings of a [`Relay`](crate::Relay). Every field has a production default; durations are
/// written like `"500ms"` or `"30s"` in configuration files.
///
/// ```
/// use std::time::Duration;
/// use outbox_core::RelayConfig;
///
/// let config = RelayConfig::default().batch_size(1000).lease(Duration::from_secs(60));
/// config.validate()?;
/// # Ok::<(), outbox_core::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Identity of this relay among the relays of one store; random when unset. Must be unique
    /// among live relays.
    pub relay_id: Option<String>,
    /// Most messages claimed and published at once (default 500).
    pub batch_size: usize,
    /// Batches in flight at once (default 4). Per-key order holds whatever the value: a batch
    /// never holds a message whose key has an earlier message in flight.
    pub concurrency: usize,
    /// Claims under way at once (default 2; 1 to 16, and never more than `concurrency`, which
    /// lowers it). A second claim runs while
    /// the first one waits for the store, on stores that can serve both (PostgreSQL); stores
    /// that serialize claims make it wait its turn. Concurrent claims never return the same
    /// message, nor two messages of one key out of order.
    pub claims: usize,
    /// How long claimed messages stay leased to this relay (default 30 s). If the relay dies,
    /// another one takes them after this time.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Longest wait for one publish call (default 10 s); at most half the lease.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Longest wait for one store call (default 30 s). A call with no answer by then (a
    /// connection whose peer vanished without a reset, a server that stopped answering) fails
    /// as a transient connection error and is retried like one, instead of stalling the relay.
    #[serde(with = "humantime_serde")]
    pub store_timeout: Duration,
    /// How long a relay owns its partitions without renewing them (default 15 s); the work of
    /// a relay that died is taken over after this time. Renewed every third of it.
    #[serde(with = "humantime_serde")]
    pub partition_lease: Duration,
    /// Shortest wait between polls of an idle outbox (default 10 ms).
    #[serde(with = "humantime_serde")]
    pub poll_min: Duration,
    /// Longest wait between polls of an idle outbox (default 1 s). The wait doubles from
    /// `poll_min` while polls come back empty; a wake-up or a full batch resets it.
    #[serde(with = "humantime_serde")]
    pub poll_max: Duration,
    /// The bound on a graceful shutdown, from the shutdown signal to [`Relay::run`]
    /// returning (default 20 s, which fits Kubernetes' default 30 s grace period with room for
    /// the process around the relay). In-flight publishes get the first half of it; then they
    /// are abandoned and their messages handed back, the publisher is flushed and the relay
    /// gives up its partitions, each within what is left. Whatever could not be recorded in
    /// time (a database that stopped answering) returns to the other relays when its lease
    /// expires: nothing is lost.
    ///
    /// [`Relay::run`]: crate::Relay::run
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Longest wait between two probes of a broker or a store that is down (default 5 s).
    /// While the relay is paused by an outage it probes the broker ([`Publisher::check`]) or
    /// the store with a wait that starts at 100 ms and doubles up to this, so it resumes
    /// within about this long after the outage ends.
    ///
    /// [`Publisher::check`]: crate::Publisher::check
    #[serde(with = "humantime_serde")]
    pub probe_max: Duration,
    /// How often the backlog gauges are refreshed (default 10 s).
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
    /// How often published messages past the store's retention are removed (default 60 s).
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    /// Most rows one cleanup removes (default 1000), so cleanup never holds long locks.
    pub cleanup_batch: usize,
    /// Backoff and dead-lettering.
    pub retry: RetryPolicy,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            relay_id: None,
            batch_size: 500,
            concurrency: 4,
            claims: 2,
            lease: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            store_timeout: Duration::from_secs(30),
            partition_lease: Duration::from_secs(15),
            poll_min: Duration::from_millis(10),
            poll_max: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(20),
            probe_max: Duration::from_secs(5),
            stats_interval: Duration::from_secs(10),
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch: 1000,
            retry: RetryPolicy::default(),
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.$name = value;
                self
            }
        )*
    };
}

impl RelayConfig {
    setters! {
        /// Sets [`RelayConfig::batch_size`].
        batch_size: usize,
        /// Sets [`RelayConfig::concurrency`].
        concurrency: usize,
        /// Sets [`RelayConfig::claims`].
        claims: usize,
        /// Sets [`RelayConfig::lease`].
        lease: Duration,
        /// Sets [`RelayConfig::publish_timeout`].
        publish_timeout: Duration,
        /// Sets [`RelayConfig::partition_lease`].
        partition_lease: Duration,
        /// Sets [`RelayConfig::poll_min`].
        poll_min: Duration,
        /// Sets [`RelayConfig::poll_max`].
        poll_max: Duration,
        /// Sets [`RelayConfig::store_timeout`].
        store_timeout: Duration,
        /// Sets [`RelayConfig::shutdown_timeout`].
        shutdown_timeout: Duration,
        /// Sets [`RelayConfig::probe_max`].
        probe_max: Duration,
        /// Sets [`RelayConfig::stats_interval`].
        stats_interval: Duration,
        /// Sets [`RelayConfig::cleanup_interval`].
        cleanup_interval: Duration,
        /// Sets [`RelayConfig::cleanup_batch`].
        cleanup_batch: usize,
        /// Sets [`RelayConfig::retry`].
        retry: RetryPolicy,
    }

    /// Sets [`RelayConfig::relay_id`].
    pub fn relay_id(mut self, id: impl Into<String>) -> Self {
        self.relay_id = Some(id.into());
        self
    }

    /// Checks the settings and how they fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(ConfigError::new(
                "batch_size",
                "must be between 1 and 10000",
            ));
        }
        if self.concurrency == 0 || self.concurrency > 256 {
            return Err(ConfigError::new("concurrency", "must be between 1 and 256"));
        }
        if self.claims == 0 || self.claims > 16 {
            return Err(ConfigError::new("claims", "must be between 1 and 16"));
        }
        if self.lease < Duration::from_millis(100) {
            return Err(ConfigError::new("lease", "must be at least 100ms"));
        }
        if self.publish_timeout.is_zero() || self.publish_timeout > self.lease / 2 {
            return Err(ConfigError::new(
                "publish_timeout",
                "must be above zero and at most half the lease",
            ));
        }
        if self.store_timeout.is_zero() {
            return Err(ConfigError::new("store_timeout", "must be above zero"));
        }
        if self.partition_lease < Duration::from_millis(300) {
            return Err(ConfigError::new(
                "partition_lease",
                "must be at least 300ms",
            ));
        }
        if self.poll_min.is_zero() || self.poll_min > self.poll_max {
            return Err(ConfigError::new(
                "poll_min",
                "must be above zero and at most poll_max",
            ));
        }
        if self.shutdown_timeout < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "shutdown_timeout",
                "must be at least 100ms",
            ));
        }
        if self.probe_max < PROBE_MIN {
            return Err(ConfigError::new("probe_max", "must be at least 100ms"));
        }
        if self.stats_interval.is_zero() {
            return Err(ConfigError::new("stats_interval", "must be above zero"));
        }
        if self.cleanup_interval.is_zero() {
            return Err(ConfigError::new("cleanup_interval", "must be above zero"));
        }
        if self.cleanup_batch == 0 {
            return Err(ConfigError::new("cleanup_batch", "must be at least 1"));
        }
        if matches!(&self.relay_id, Some(id) if id.is_empty() || id.len() > 128) {
            return Err(ConfigError::new("relay_id", "must be 1 to 128 characters"));
        }
        self.retry.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_parse_from_text() {
        RelayConfig::default()
            .validate()
            .expect("defaults are valid");
        let config: RelayConfig = serde_json::from_str(
            r#"{"lease":"1m","publish_timeout":"5s","retry":{"max_attempts":3}}"#,
        )
        .expect("parses");
        assert_eq!(config.lease, Duration::from_secs(60));
        assert_eq!(config.retry.max_attempts, 3);
        assert!(serde_json::from_str::<RelayConfig>(r#"{"leese":"1m"}"#).is_err());
    }

    #[test]
    fn inconsistent_settings_name_the_field() {
        let field = |c: RelayConfig| c.validate().err().map(|e| e.field);
        assert_eq!(
            field(RelayConfig::default().batch_size(0)),
            Some("batch_size")
        );
        assert_eq!(
            field(RelayConfig::default().publish_timeout(Duration::from_secs(20))),
            Some("publish_timeout")
        );
        assert_eq!(
            field(RelayConfig::default().poll_min(Duration::from_secs(5))),
            Some("poll_min")
        );
        assert_eq!(
            field(RelayConfig::default().concurrency(0)),
            Some("concurrency")
        );
        assert_eq!(field(RelayConfig::default().claims(0)), Some("claims"));
        assert_eq!(field(RelayConfig::default().claims(17)), Some("claims"));
        assert_eq!(
            field(RelayConfig::default().concurrency(1).claims(2)),
            None,
            "claims are lowered to the batches in flight, not refused"
        );
    }
}
