//! A graceful shutdown within one bound: the phases and their share of
//! [`RelayConfig::shutdown_timeout`](crate::RelayConfig::shutdown_timeout).

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::warn;

use super::BatchReport;

/// When each phase of a shutdown must end, from the instant it began.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan {
    /// A claim under way may complete until then (a quarter of the bound).
    pub(super) claims_until: Instant,
    /// In-flight publishes may complete until then (half of the bound); then they are
    /// abandoned and their messages handed back.
    pub(super) publish_until: Instant,
    /// Abandoned batches record what they hand back until then (three quarters).
    pub(super) settle_until: Instant,
    /// The publisher's flush ends by then (seven eighths).
    pub(super) flush_until: Instant,
    /// Giving up the partitions ends by then: the whole bound.
    pub(super) deadline: Instant,
}

impl Plan {
    pub(super) fn new(bound: Duration) -> Self {
        let start = Instant::now();
        Self {
            claims_until: start + bound / 4,
            publish_until: start + bound / 2,
            settle_until: start + bound * 3 / 4,
            flush_until: start + bound * 7 / 8,
            deadline: start + bound,
        }
    }

    /// Time left until `until`, at least a millisecond so that a late phase still tries.
    pub(super) fn left(&self, until: Instant) -> Duration {
        until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }
}

/// Waits for in-flight batches until the plan's publish phase ends, then tells them to abandon
/// their publishes (they hand their messages back) and waits for that until the settle phase
/// ends; batches still running then are aborted, and their messages return when their lease
/// expires.
pub(super) async fn drain(
    workers: &mut JoinSet<BatchReport>,
    plan: &Plan,
    abandon: &watch::Sender<bool>,
) -> BatchReport {
    let mut total = BatchReport::default();
    if join_until(workers, plan.publish_until, &mut total).await {
        return total;
    }
    warn!(
        in_flight = workers.len(),
        "shutdown: in-flight publishes are taking too long; abandoning them"
    );
    let _ = abandon.send(true);
    if !join_until(workers, plan.settle_until, &mut total).await {
        workers.abort_all();
        warn!(
            "batches still settling were aborted; their messages return when their lease expires"
        );
    }
    total
}

/// Collects finished batches until none is left (true) or `until` passes (false).
async fn join_until(
    workers: &mut JoinSet<BatchReport>,
    until: Instant,
    total: &mut BatchReport,
) -> bool {
    loop {
        match tokio::time::timeout_at(until, workers.join_next()).await {
            Ok(Some(Ok(report))) => total.add(&report),
            Ok(Some(Err(err))) => {
                warn!(error = %err, "a batch task failed; its messages return when its lease expires")
            }
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}
