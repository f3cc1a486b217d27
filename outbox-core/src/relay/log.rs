//! The log relay: publishes committed messages read from a database's log, with the polling
//! relay's policy, and hands what it cannot publish to the outbox table.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use futures::FutureExt as _;
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::BatchReport;
use super::batch::{self, Progress, Publishing};
use super::pause::{Pause, PauseCause, Pauses, probe_broker, probe_wait};
use super::shutdown::Plan;
use crate::error::chain;
use crate::metrics as m;
use crate::{
    ConfigError, LogBatch, LogPosition, LogSource, Message, MessageId, Publisher, RelayConfig,
    RelayError, StoreError, StoreErrorKind, Wakeup, error_text,
};

/// Builds a [`LogRelay`].
#[must_use]
pub struct LogRelayBuilder<L, P> {
    source: L,
    publisher: P,
    config: RelayConfig,
}

impl<L: LogSource, P: Publisher> LogRelayBuilder<L, P> {
    /// Sets the configuration (the default otherwise). The log relay uses the batch size,
    /// the publish and store timeouts, the retry policy, `probe_max` and the shutdown
    /// timeout; claims, leases and partitions are the polling relay's.
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Checks the configuration and builds the relay.
    pub fn build(self) -> Result<LogRelay<L, P>, ConfigError> {
        self.config.validate()?;
        m::describe();
        Ok(LogRelay {
            inner: Arc::new(Inner {
                source: Mutex::new(self.source),
                publisher: self.publisher,
                config: self.config,
                pauses: Pauses::new(),
                wakeup: Wakeup::default(),
            }),
        })
    }
}

/// Publishes committed outbox messages read from a database's log (change data capture):
/// at least once, in commit order per key, with no polling query and no claim.
///
/// # How it works
///
/// - It reads the next committed transaction from its [`LogSource`], and those already at
///   hand, up to [`RelayConfig::batch_size`] rows, and asks the outbox table which of their
///   messages and keys it holds as its own ([`LogSource::waiting`]): those go to the table,
///   where the polling relay publishes them.
/// - It publishes the rest as the polling relay publishes a claimed batch (the same code):
///   one message per key per call unless the publisher keeps per-key order, each failure
///   judged a failure of the message or an outage of the broker.
/// - A message that fails is **handed to the outbox table** with its attempt counted and its
///   retry delay ([`LogSource::settle`]), or dead-lettered there when the
///   [`RetryPolicy`](crate::RetryPolicy) says so; the later messages of its key are handed
///   to the table too, so that they never overtake it. From then on the polling relay
///   publishes them, with its retries, dead letters and replays.
/// - Published rows are deleted (or kept for the retention) and failed ones handed over in
///   one transaction; only then are the transactions confirmed to the log, so a relay that
///   dies delivers again what it had not recorded: duplicates, never a loss.
///
/// # Outages
///
/// A broker that fails a whole call pauses the relay, as it pauses the polling relay: it hands
/// nothing over and counts no attempt, stops reading, probes the broker with
/// [`Publisher::check`] and publishes the same messages again once it answers. A store call
/// (the table's side) that fails transiently is retried with capped backoff meanwhile; a lost
/// connection to the log is resumed from the last confirmed position. Only a failure that is
/// not transient (the slot or the table is gone) stops the relay.
pub struct LogRelay<L, P> {
    inner: Arc<Inner<L, P>>,
}

impl<L, P> Clone for LogRelay<L, P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<L, P> {
    source: Mutex<L>,
    publisher: P,
    config: RelayConfig,
    pauses: Pauses,
    wakeup: Wakeup,
}

impl<L: LogSource, P: Publisher> LogRelay<L, P> {
    /// Starts building a relay from `source` to `publisher`.
    pub fn builder(source: L, publisher: P) -> LogRelayBuilder<L, P> {
        LogRelayBuilder {
            source,
            publisher,
            config: RelayConfig::default(),
        }
    }

    /// The publisher.
    pub fn publisher(&self) -> &P {
        &self.inner.publisher
    }

    /// The configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.inner.config
    }

    /// Why the relay is paused, if it is; empty while it runs normally.
    pub fn pauses(&self) -> Vec<Pause> {
        self.inner.pauses.current()
    }

    /// Waits for the next committed transaction, then relays it with those already at hand.
    pub async fn run_once(&self) -> Result<BatchReport, StoreError> {
        let mut source = self.inner.source.lock().await;
        let (_abandon_tx, abandon) = watch::channel(false);
        let batches = self.inner.read(&mut source).await?;
        self.inner.relay(&mut source, batches, &abandon).await
    }

    /// Runs until `shutdown` completes, then shuts down within
    /// [`RelayConfig::shutdown_timeout`]: reads nothing more, lets the publishes under way
    /// finish for half of it, records what they came to, flushes the publisher and closes
    /// the source. Messages neither published nor handed over are delivered again by the
    /// next run. Returns an error only for a failure that is not transient.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RelayError> {
        let inner = &self.inner;
        let Ok(mut source) = inner.source.try_lock() else {
            return Err(RelayError::Task(
                "this log relay is already running".to_owned(),
            ));
        };
        let (stop_tx, stop) = watch::channel(false);
        let (abandon_tx, abandon) = watch::channel(false);
        info!("log relay starting");
        let mut plan = None;
        let result = {
            let work = inner.work(&mut source, stop, abandon);
            let probe = probe_broker(
                &inner.pauses,
                &inner.publisher,
                &inner.config,
                &inner.wakeup,
            );
            tokio::pin!(work, probe, shutdown);
            tokio::select! {
                res = &mut work => res,
                () = &mut probe => Ok(()),
                () = &mut shutdown => {
                    let bounds = Plan::new(inner.config.shutdown_timeout);
                    plan = Some(bounds);
                    let _ = stop_tx.send(true);
                    let abandon_at = tokio::time::sleep_until(bounds.publish_until);
                    let settled_by = tokio::time::sleep_until(bounds.settle_until);
                    tokio::pin!(abandon_at, settled_by);
                    loop {
                        tokio::select! {
                            res = &mut work => break res,
                            () = &mut abandon_at, if !*abandon_tx.borrow() => {
                                warn!("shutdown: the publish under way is taking too long; abandoning it");
                                let _ = abandon_tx.send(true);
                            }
                            () = &mut settled_by => {
                                warn!("shutdown: the batch under way was not recorded in time; it is delivered again by the next run");
                                break Ok(());
                            }
                        }
                    }
                }
            }
        };
        let plan = plan.unwrap_or_else(|| Plan::new(inner.config.shutdown_timeout));
        info!("log relay stopping");
        let flush = inner
            .config
            .publish_timeout
            .min(plan.left(plan.flush_until));
        match tokio::time::timeout(flush, inner.publisher.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(error = %chain(&err), "publisher flush failed on shutdown"),
            Err(_) => warn!(after = ?flush, "publisher flush gave no answer on shutdown"),
        }
        match tokio::time::timeout(plan.left(plan.deadline), source.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(error = %chain(&err), "could not close the log source cleanly"),
            Err(_) => warn!("closing the log source gave no answer on shutdown"),
        }
        info!("log relay stopped");
        result.map_err(RelayError::from)
    }
}

impl<L: LogSource, P: Publisher> Inner<L, P> {
    /// Reads and relays transactions until `stop` is set.
    async fn work(
        &self,
        source: &mut L,
        mut stop: watch::Receiver<bool>,
        abandon: watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let mut pauses = self.pauses.subscribe();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            // While the broker is down, read nothing: the source keeps its session alive.
            if pauses.borrow_and_update().broker() {
                tokio::select! {
                    changed = pauses.changed() => if changed.is_err() { return Ok(()) },
                    _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
                }
                continue;
            }
            let batches = tokio::select! {
                read = self.read(source) => read?,
                _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
            };
            self.relay(source, batches, &abandon).await?;
        }
    }

    /// The next transaction, and those already at hand up to the batch size. A transient
    /// failure pauses the relay for the store and is retried with capped backoff; `next` is
    /// cancel-safe, so this is too.
    async fn read(&self, source: &mut L) -> Result<Vec<LogBatch>, StoreError> {
        let mut failures = 0;
        let first = loop {
            match source.next().await {
                Ok(batch) => break batch,
                Err(err) if !err.is_transient() => return Err(err),
                Err(err) => {
                    metrics::counter!(m::STORE_ERRORS).increment(1);
                    let retry_in = probe_wait(failures, self.config.probe_max);
                    failures += 1;
                    warn!(error = %chain(&err), ?retry_in, "reading the log failed; resuming from the last confirmed position");
                    self.pauses
                        .pause(PauseCause::Store, error_text::stored(&err));
                    tokio::time::sleep(retry_in).await;
                }
            }
        };
        self.pauses.resume(PauseCause::Store);
        let mut rows = first.len();
        let mut batches = vec![first];
        while rows < self.config.batch_size {
            // A failure here is found again by the next read.
            match source.next().now_or_never() {
                Some(Ok(batch)) => {
                    rows += batch.len();
                    batches.push(batch);
                }
                Some(Err(_)) | None => break,
            }
        }
        Ok(batches)
    }

    /// Publishes `batches` and records the outcomes; confirms them when every message was
    /// published or handed to the table.
    async fn relay(
        &self,
        source: &mut L,
        batches: Vec<LogBatch>,
        abandon: &watch::Receiver<bool>,
    ) -> Result<BatchReport, StoreError> {
        let positions: Vec<LogPosition> = batches.iter().map(|batch| batch.position).collect();
        let rows: usize = batches.iter().map(LogBatch::len).sum();
        let span = info_span!(
            "outbox.log_batch",
            size = rows,
            through = positions.last().map(|p| p.get())
        );
        async move {
            metrics::histogram!(m::BATCH_SIZE).record(rows as f64);
            let mut messages = Vec::with_capacity(rows);
            let mut done = Progress::default();
            for batch in batches {
                messages.extend(batch.messages);
                batch::dead_letter_malformed(&mut done, batch.malformed);
            }
            let ids: Vec<MessageId> = messages.iter().map(|msg| msg.id).collect();
            let keys: Vec<String> = messages
                .iter()
                .filter_map(|msg| msg.key.clone())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let mut failures = 0;
            let waiting = loop {
                match self.bounded(source.waiting(&ids, &keys)).await {
                    Ok(waiting) => break waiting,
                    Err(err) => {
                        if !self
                            .failed(err, &mut failures, abandon, "reading what the table holds")
                            .await?
                        {
                            return Ok(BatchReport::default());
                        }
                    }
                }
            };
            messages.retain(|msg| !waiting.ids.contains(&msg.id));
            let keys_of: HashMap<MessageId, String> = messages
                .iter()
                .filter_map(|msg| Some((msg.id, msg.key.clone()?)))
                .collect();
            // Keys whose messages go to the table: it holds one of theirs, or one failed here.
            let mut handed = waiting.keys;
            let mut todo = messages;
            let mut complete = true;
            let settlement = &mut done.settlement;
            loop {
                let (hand, publish): (Vec<Message>, Vec<Message>) = todo
                    .into_iter()
                    .partition(|msg| msg.key.as_ref().is_some_and(|key| handed.contains(key)));
                settlement.release.extend(hand.iter().map(|msg| msg.id));
                if publish.is_empty() {
                    break;
                }
                if !self.until_running(abandon).await {
                    complete = false;
                    break;
                }
                let mut pass = Progress::default();
                let ctx = Publishing {
                    publisher: &self.publisher,
                    config: &self.config,
                    pauses: &self.pauses,
                    clock_offset_us: None,
                };
                batch::publish(&ctx, publish, None, abandon.clone(), &mut pass).await;
                for retry in &pass.settlement.retry {
                    if let Some(key) = keys_of.get(&retry.id) {
                        handed.insert(key.clone());
                    }
                }
                settlement.published.append(&mut pass.settlement.published);
                settlement.retry.append(&mut pass.settlement.retry);
                settlement.dead.append(&mut pass.settlement.dead);
                // What was handed back (an outage, a key behind a failure) is published again,
                // or handed over with its key.
                todo = pass.released;
                if *abandon.borrow() && !todo.is_empty() {
                    complete = false;
                    break;
                }
            }
            let confirm = if complete { positions } else { Vec::new() };
            let settlement = &done.settlement;
            let mut report = BatchReport::of(rows, settlement);
            let mut failures = 0;
            while let Err(err) = self.bounded(source.settle(settlement, &confirm)).await {
                if !self
                    .failed(err, &mut failures, abandon, "recording the outcomes")
                    .await?
                {
                    // Delivered again by the next run.
                    report.fenced = settlement.len() as u64;
                    break;
                }
            }
            report.count();
            debug!(?report, complete, "log batch settled");
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// Waits until no outage pauses the relay; false when the relay gives up meanwhile.
    async fn until_running(&self, abandon: &watch::Receiver<bool>) -> bool {
        let mut pauses = self.pauses.subscribe();
        let mut abandon = abandon.clone();
        loop {
            if *abandon.borrow_and_update() {
                return false;
            }
            if !pauses.borrow_and_update().any() {
                return true;
            }
            tokio::select! {
                changed = pauses.changed() => if changed.is_err() { return false },
                changed = abandon.changed() => if changed.is_err() { return false },
            }
        }
    }

    /// Awaits one call on the table's side for at most the store timeout; a success ends a
    /// pause for the store.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.config.store_timeout;
        let result = tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(StoreError::new(
                StoreErrorKind::Connection,
                format!("the store gave no answer within {limit:?}"),
            )
            .transient())
        });
        if result.is_ok() {
            self.pauses.resume(PauseCause::Store);
        }
        result
    }

    /// After a failed call on the table's side: an error when the failure is not transient;
    /// otherwise pauses the relay for the store and waits the capped backoff, then true (try
    /// again), or false when the relay gives up meanwhile (shutdown).
    async fn failed(
        &self,
        err: StoreError,
        failures: &mut u32,
        abandon: &watch::Receiver<bool>,
        what: &str,
    ) -> Result<bool, StoreError> {
        if !err.is_transient() {
            return Err(err);
        }
        metrics::counter!(m::STORE_ERRORS).increment(1);
        self.pauses
            .pause(PauseCause::Store, error_text::stored(&err));
        let retry_in = probe_wait(*failures, self.config.probe_max);
        *failures += 1;
        warn!(error = %chain(&err), ?retry_in, "{what} failed; retrying");
        let mut abandon = abandon.clone();
        tokio::select! {
            () = tokio::time::sleep_until(Instant::now() + retry_in) => Ok(true),
            _ = abandon.wait_for(|a| *a) => Ok(false),
        }
    }
}
