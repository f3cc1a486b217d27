//! Outages: a broker or a store that is down pauses the relay. A pause hands messages back
//! untouched, so that no outage, however long, costs a message an attempt or dead-letters it.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::PROBE_MIN;
use crate::error::chain;
use crate::metrics as m;
use crate::{Publisher, RelayConfig, Wakeup, error_text};

/// The side of the relay an outage is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PauseCause {
    /// The broker is unreachable, or fails every message it is given.
    Broker,
    /// The store (the database) is unreachable or does not answer.
    Store,
}

impl PauseCause {
    /// `broker` or `store`, as in the `cause` label of `outbox_relay_paused`.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseCause::Broker => "broker",
            PauseCause::Store => "store",
        }
    }
}

impl fmt::Display for PauseCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a relay is paused, as [`Relay::pauses`](crate::Relay::pauses) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pause {
    /// Which side is down.
    pub cause: PauseCause,
    /// The latest failure seen: the one that paused the relay, then the latest probe's.
    pub reason: String,
    /// When the pause began, on the relay's clock.
    pub since: DateTime<Utc>,
}

impl fmt::Display for Pause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = (Utc::now() - self.since).num_seconds().max(0);
        write!(
            f,
            "paused for {secs} s: {} down: {}",
            self.cause, self.reason
        )
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct PauseState {
    broker: Option<(Pause, Instant)>,
    store: Option<(Pause, Instant)>,
}

impl PauseState {
    fn slot(&mut self, cause: PauseCause) -> &mut Option<(Pause, Instant)> {
        match cause {
            PauseCause::Broker => &mut self.broker,
            PauseCause::Store => &mut self.store,
        }
    }

    /// True while either side is down.
    pub(super) fn any(&self) -> bool {
        self.broker.is_some() || self.store.is_some()
    }

    /// True while the broker is down.
    pub(super) fn broker(&self) -> bool {
        self.broker.is_some()
    }

    /// True while the store is down.
    pub(super) fn store(&self) -> bool {
        self.store.is_some()
    }
}

/// The pause state of one relay, shared by its tasks.
#[derive(Debug)]
pub(super) struct Pauses {
    state: watch::Sender<PauseState>,
    /// Broker pauses since the broker last confirmed a message: each one starts probing later,
    /// so that a broker that answers probes but fails every message is not hammered.
    streak: std::sync::atomic::AtomicU32,
}

impl Pauses {
    pub(super) fn new() -> Self {
        for cause in [PauseCause::Broker, PauseCause::Store] {
            metrics::gauge!(m::PAUSED, "cause" => cause.as_str()).set(0.0);
        }
        Self {
            state: watch::channel(PauseState::default()).0,
            streak: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Follows the pause state.
    pub(super) fn subscribe(&self) -> watch::Receiver<PauseState> {
        self.state.subscribe()
    }

    /// Current pauses.
    pub(super) fn current(&self) -> Vec<Pause> {
        let state = self.state.borrow();
        [&state.broker, &state.store]
            .into_iter()
            .flatten()
            .map(|(pause, _)| pause.clone())
            .collect()
    }

    #[cfg(test)]
    pub(super) fn is_paused(&self, cause: PauseCause) -> bool {
        match cause {
            PauseCause::Broker => self.state.borrow().broker.is_some(),
            PauseCause::Store => self.state.borrow().store.is_some(),
        }
    }

    pub(super) fn any(&self) -> bool {
        self.state.borrow().any()
    }

    /// The pauses now.
    pub(super) fn current_state(&self) -> PauseState {
        self.state.borrow().clone()
    }

    /// Pauses the relay for an outage of `cause`, or updates the reason of a pause under way.
    pub(super) fn pause(&self, cause: PauseCause, reason: String) {
        let mut started = false;
        self.state
            .send_if_modified(|state| match state.slot(cause) {
                Some((pause, _)) => {
                    pause.reason = reason.clone();
                    false
                }
                slot @ None => {
                    *slot = Some((
                        Pause {
                            cause,
                            reason: reason.clone(),
                            since: Utc::now(),
                        },
                        Instant::now(),
                    ));
                    started = true;
                    true
                }
            });
        if started {
            if cause == PauseCause::Broker {
                self.streak
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            metrics::gauge!(m::PAUSED, "cause" => cause.as_str()).set(1.0);
            warn!(%cause, %reason, "relay paused: the {cause} is down; messages are handed back untouched until it answers again");
        }
    }

    /// Ends a pause of `cause`, if there is one.
    pub(super) fn resume(&self, cause: PauseCause) {
        let mut ended = None;
        self.state
            .send_if_modified(|state| match state.slot(cause).take() {
                Some((_, since)) => {
                    ended = Some(since.elapsed());
                    true
                }
                None => false,
            });
        if let Some(down) = ended {
            metrics::gauge!(m::PAUSED, "cause" => cause.as_str()).set(0.0);
            info!(%cause, down = ?down, "relay resumed: the {cause} answers again");
        }
    }

    /// The broker confirmed a message: the next broker pause probes early again.
    pub(super) fn broker_confirmed(&self) {
        self.streak.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// The wait before the first probe of a broker pause: 100 ms, doubled for every earlier
    /// pause since the broker last confirmed a message, at most `max`.
    pub(super) fn first_probe(&self, max: Duration) -> Duration {
        let streak = self.streak.load(std::sync::atomic::Ordering::Relaxed);
        probe_wait(streak.saturating_sub(1), max)
    }
}

/// While the broker is paused, probes it with [`Publisher::check`] until it answers, each
/// probe bounded by the publish timeout, the waits doubling up to
/// [`RelayConfig::probe_max`]; then resumes the relay and wakes it. Runs for ever.
pub(super) async fn probe_broker<P: Publisher>(
    pauses: &Pauses,
    publisher: &P,
    config: &RelayConfig,
    wakeup: &Wakeup,
) {
    let mut state = pauses.subscribe();
    loop {
        if state.wait_for(|state| state.broker()).await.is_err() {
            return std::future::pending().await;
        }
        let max = config.probe_max;
        let mut wait = pauses.first_probe(max);
        loop {
            tokio::time::sleep(wait).await;
            let limit = config.publish_timeout;
            let failure = match tokio::time::timeout(limit, publisher.check()).await {
                Ok(Ok(())) => None,
                Ok(Err(err)) => Some(format!("the broker check failed: {}", chain(&err))),
                Err(_) => Some(format!("the broker check gave no answer within {limit:?}")),
            };
            match failure {
                None => {
                    pauses.resume(PauseCause::Broker);
                    wakeup.wake();
                    break;
                }
                Some(reason) => {
                    debug!(%reason, retry_in = ?wait, "broker still down");
                    pauses.pause(PauseCause::Broker, error_text::sanitize(&reason));
                    wait = (wait * 2).min(max);
                }
            }
        }
    }
}

/// `PROBE_MIN` doubled `doublings` times, at most `max`.
pub(super) fn probe_wait(doublings: u32, max: Duration) -> Duration {
    PROBE_MIN
        .saturating_mul(2u32.saturating_pow(doublings.min(16)))
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_start_once_and_end_once() {
        let pauses = Pauses::new();
        assert!(!pauses.any());
        pauses.pause(PauseCause::Broker, "down".into());
        pauses.pause(PauseCause::Broker, "still down".into());
        assert!(pauses.is_paused(PauseCause::Broker));
        assert!(!pauses.is_paused(PauseCause::Store));
        let current = pauses.current();
        assert_eq!(current.len(), 1);
        assert_eq!(
            current[0].reason, "still down",
            "the reason follows the latest failure"
        );
        assert!(current[0].to_string().contains("broker down: still down"));
        pauses.resume(PauseCause::Broker);
        pauses.resume(PauseCause::Broker);
        assert!(!pauses.any());
    }

    #[test]
    fn probes_start_later_while_the_broker_confirms_nothing() {
        let max = Duration::from_secs(5);
        let pauses = Pauses::new();
        pauses.pause(PauseCause::Broker, "x".into());
        assert_eq!(pauses.first_probe(max), PROBE_MIN);
        pauses.resume(PauseCause::Broker);
        pauses.pause(PauseCause::Broker, "x".into());
        assert_eq!(pauses.first_probe(max), PROBE_MIN * 2);
        pauses.resume(PauseCause::Broker);
        pauses.broker_confirmed();
        pauses.pause(PauseCause::Broker, "x".into());
        assert_eq!(pauses.first_probe(max), PROBE_MIN);
        assert_eq!(probe_wait(40, max), max);
    }
}
