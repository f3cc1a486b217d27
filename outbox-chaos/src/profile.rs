//! How long and how hard a run pushes: the short profile of CI, the long one for a soak.

use std::time::Duration;

/// The settings of one run of one combination.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Profile {
    /// `short` or `long`.
    pub name: &'static str,
    /// How long producers write and faults are injected.
    pub fault_phase: Duration,
    /// Producer tasks whose transactions lock each key's business row before enqueueing
    /// (serialized per key), each one transaction at a time.
    pub producers: usize,
    /// Producer tasks whose transactions enqueue without a lock, so that several transactions
    /// are open on one key at once, each one transaction at a time, on keys of their own.
    pub concurrent_producers: usize,
    /// Keys of the concurrent producers: fewer, so that their transactions overlap.
    pub concurrent_keys: usize,
    /// Longest time a concurrent transaction stays open between its INSERT and its commit
    /// (drawn from zero to this).
    pub hold: Duration,
    /// Pause of a producer between two transactions.
    pub pause: Duration,
    /// Keys messages are drawn from: few, so that ordering is stressed.
    pub keys: usize,
    /// Most messages (and keys) in one transaction.
    pub max_per_transaction: usize,
    /// Share of transactions rolled back on purpose, in percent.
    pub rollback_percent: u32,
    /// Relay processes.
    pub relays: usize,
    /// Shortest and longest wait between two faults.
    pub fault_gap: (Duration, Duration),
    /// Long broker outages per run (each at least ten times the relays' retry budget), spread
    /// over the fault phase.
    pub long_outages: usize,
    /// Longest time for the outbox to drain once the faults stop.
    pub drain_bound: Duration,
    /// Longest time for reading everything back from the broker.
    pub read_bound: Duration,
}

impl Profile {
    /// The CI profile: 15 s of faults per combination.
    pub fn short() -> Self {
        Self {
            name: "short",
            fault_phase: Duration::from_secs(15),
            producers: 2,
            concurrent_producers: 2,
            concurrent_keys: 3,
            hold: Duration::from_millis(15),
            pause: Duration::from_millis(8),
            keys: 8,
            max_per_transaction: 3,
            rollback_percent: 10,
            relays: 3,
            fault_gap: (Duration::from_millis(300), Duration::from_millis(1200)),
            long_outages: 1,
            drain_bound: Duration::from_secs(90),
            read_bound: Duration::from_secs(60),
        }
    }

    /// The soak: five minutes of faults per combination, at the short profile's pace (a pace
    /// the relays keep up with under faults on a 2-core machine, so that the backlog stays
    /// shallow), with more keys and relays.
    pub fn long() -> Self {
        Self {
            name: "long",
            fault_phase: Duration::from_secs(300),
            producers: 2,
            concurrent_producers: 2,
            concurrent_keys: 4,
            hold: Duration::from_millis(15),
            pause: Duration::from_millis(8),
            keys: 16,
            max_per_transaction: 3,
            rollback_percent: 10,
            relays: 4,
            fault_gap: (Duration::from_millis(300), Duration::from_millis(1500)),
            long_outages: 3,
            drain_bound: Duration::from_secs(300),
            read_bound: Duration::from_secs(300),
        }
    }

    /// `OUTBOX_CHAOS_PROFILE=long` picks the long profile; anything else (or nothing) the short
    /// one. `OUTBOX_CHAOS_SECONDS` overrides the length of the fault phase.
    pub fn from_env() -> Self {
        let mut profile = match std::env::var("OUTBOX_CHAOS_PROFILE").as_deref() {
            Ok("long") => Self::long(),
            _ => Self::short(),
        };
        if let Some(secs) = std::env::var("OUTBOX_CHAOS_SECONDS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            profile.fault_phase = Duration::from_secs(secs.clamp(1, 3600));
        }
        profile
    }

    /// Sets [`Profile::fault_phase`].
    pub fn fault_phase(mut self, phase: Duration) -> Self {
        self.fault_phase = phase;
        self
    }
}

/// The seed of a run: `OUTBOX_CHAOS_SEED` to replay one, else random (and printed).
pub fn seed_from_env() -> u64 {
    std::env::var("OUTBOX_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}
