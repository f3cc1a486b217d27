//! The log relay: publishes committed messages read from a database's log, with the polling
//! relay's policy, and hands what it cannot publish to the outbox table.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use futures::FutureExt as _;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::BatchReport;
use super::batch::{self, Progress, Publishing};
use super::pause::{Pause, PauseCause, Pauses, probe_broker, probe_wait};
use super::shutdown::Plan;
use crate::error::chain;
use crate::metrics as m;
use crate::{
    ConfigError, LogBatch, LogPosition, LogSource, LogTable, Message, MessageId, Publisher,
    RelayConfig, RelayError, Settlement, StoreError, StoreErrorKind, Wakeup, error_text,
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
    /// `concurrency` (batches waiting to be recorded), `poll_max` (how often the keys the
    /// table holds are read again), the publish and store timeouts, the retry policy,
    /// `probe_max` and the shutdown timeout; claims, leases and partitions are the polling
    /// relay's.
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
                policy: Arc::new(Policy {
                    config: self.config,
                    pauses: Pauses::new(),
                }),
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
///   hand, up to [`RelayConfig::batch_size`] rows. Messages of keys the outbox table holds
///   messages of go to the table, where the polling relay publishes them.
/// - It publishes the rest as the polling relay publishes a claimed batch (the same code):
///   one message per key per call unless the publisher keeps per-key order, each failure
///   judged a failure of the message or an outage of the broker.
/// - A message that fails is **handed to the outbox table** with its attempt counted and its
///   retry delay ([`LogTable::record`]), or dead-lettered there when the
///   [`RetryPolicy`](crate::RetryPolicy) says so; the later messages of its key are handed
///   to the table too, so that they never overtake it. From then on the polling relay
///   publishes them, with its retries, dead letters and replays.
/// - Published rows are deleted (or kept for the retention) and failed ones handed over in
///   one transaction ([`LogTable::record`]), in a task of its own while the next batch is
///   read and published (up to [`RelayConfig::concurrency`] batches waiting to be recorded,
///   recorded in the order of the log);
///   only then are the transactions confirmed to the log, so a relay that dies delivers again
///   what it had not recorded: duplicates, never a loss.
/// - The keys the table holds messages of are read when the relay starts, kept as it hands
///   messages over (and as rows written for later pass by), and read again, for those keys
///   only, every [`RelayConfig::poll_max`] while there are any: the path of a message that
///   nothing holds back is the log, the broker and nothing else.
///
/// # Outages
///
/// A broker that fails a whole call pauses the relay, as it pauses the polling relay: it hands
/// nothing over and counts no attempt, stops reading, probes the broker with
/// [`Publisher::check`] and publishes the same messages again once it answers. A store call
/// (the table's side) that fails transiently is retried with capped backoff meanwhile; a lost
/// connection to the log is resumed from the last confirmed position. While the table cannot be
/// written, the session of the log is ended (a PostgreSQL that shuts down waits for its
/// replication sessions) and opened again once it can. Only a failure that is not transient
/// (the slot or the table is gone) stops the relay.
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
    policy: Arc<Policy>,
    wakeup: Wakeup,
}

/// What the tasks that record outcomes share with the relay.
struct Policy {
    config: RelayConfig,
    pauses: Pauses,
}

/// A batch whose outcomes were recorded.
struct Recorded {
    /// The transactions to confirm: none when the batch was not complete, or not recorded.
    positions: Vec<LogPosition>,
    report: BatchReport,
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
        &self.inner.policy.config
    }

    /// Why the relay is paused, if it is; empty while it runs normally.
    pub fn pauses(&self) -> Vec<Pause> {
        self.inner.policy.pauses.current()
    }

    /// Waits for the next committed transaction, then relays it with those already at hand,
    /// records the outcomes and confirms it.
    pub async fn run_once(&self) -> Result<BatchReport, StoreError> {
        let mut source = self.inner.source.lock().await;
        let (_abandon_tx, abandon) = watch::channel(false);
        let table = source.table();
        let Some(mut handed) = self.inner.policy.waiting(&table, None, &abandon).await? else {
            return Ok(BatchReport::default());
        };
        let batches = self.inner.read(&mut source).await?;
        let task = self
            .inner
            .relay(&mut source, &table, batches, &mut handed, &abandon)
            .await;
        let recorded = task.await?;
        recorded.report.count();
        source.confirm(&recorded.positions)?;
        Ok(recorded.report)
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
        let config = &inner.policy.config;
        let (stop_tx, stop) = watch::channel(false);
        let (abandon_tx, abandon) = watch::channel(false);
        info!("log relay starting");
        let mut plan = None;
        let result = {
            let work = inner.work(&mut source, stop, abandon);
            let probe = probe_broker(
                &inner.policy.pauses,
                &inner.publisher,
                config,
                &inner.wakeup,
            );
            tokio::pin!(work, probe, shutdown);
            tokio::select! {
                res = &mut work => res,
                () = &mut probe => Ok(()),
                () = &mut shutdown => {
                    let bounds = Plan::new(config.shutdown_timeout);
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
                                warn!("shutdown: a batch was not recorded in time; it is delivered again by the next run");
                                break Ok(());
                            }
                        }
                    }
                }
            }
        };
        let plan = plan.unwrap_or_else(|| Plan::new(config.shutdown_timeout));
        info!("log relay stopping");
        let flush = config.publish_timeout.min(plan.left(plan.flush_until));
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
    /// Reads, publishes and records transactions until `stop` is set and what is being
    /// recorded is recorded.
    async fn work(
        &self,
        source: &mut L,
        mut stop: watch::Receiver<bool>,
        abandon: watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let policy = &self.policy;
        let table = source.table();
        let mut handed = HashSet::new();
        // When the keys the table holds were last read; `None` until they were read once.
        let mut refreshed: Option<Instant> = None;
        let mut failures = 0;
        let mut records: JoinSet<Result<Recorded, StoreError>> = JoinSet::new();
        // Completes when the batch read last is recorded.
        let mut previous: Option<tokio::sync::oneshot::Receiver<()>> = None;
        let mut pauses = policy.pauses.subscribe();
        let mut stopping = *stop.borrow();
        let in_flight = policy.config.concurrency.max(1);
        loop {
            if stopping && records.is_empty() {
                return Ok(());
            }
            // The table cannot be written: the session of the log is ended until it can (a
            // database shutting down waits for its replication sessions, which wait for
            // confirmations that wait for the table). The next read opens a new one, which
            // delivers again what was not confirmed.
            let table_failing = pauses.borrow_and_update().store() && !records.is_empty();
            if table_failing {
                self.suspend(source).await;
            }
            // The keys the table holds back: read at the start, then again for those keys
            // once nothing is being recorded (a hand-over under way must not be missed).
            let refresh = refreshed
                .is_none_or(|at| !handed.is_empty() && at.elapsed() >= policy.config.poll_max);
            if refresh && records.is_empty() && !stopping {
                let keys: Vec<String> = handed.iter().cloned().collect();
                let asked = refreshed.map(|_| keys.as_slice());
                match policy.bounded(table.waiting(asked)).await {
                    Ok(waiting) => {
                        handed = waiting;
                        refreshed = Some(Instant::now());
                        failures = 0;
                    }
                    Err(err) => {
                        self.suspend(source).await;
                        if !policy
                            .failed(
                                err,
                                &mut failures,
                                &abandon,
                                "reading the keys the table holds",
                            )
                            .await?
                        {
                            return Ok(());
                        }
                    }
                }
                continue;
            }
            let broker_down = pauses.borrow().broker();
            let may_read = !stopping
                && !broker_down
                && !refresh
                && !table_failing
                && records.len() < in_flight;
            let mut read_batches = None;
            tokio::select! {
                Some(done) = records.join_next(), if !records.is_empty() => {
                    let recorded = done.map_err(|err| {
                        StoreError::new(StoreErrorKind::Database, format!("recording outcomes: the task failed: {err}"))
                    })??;
                    recorded.report.count();
                    debug!(report = ?recorded.report, "log batch recorded");
                    source.confirm(&recorded.positions)?;
                }
                read = self.read(source), if may_read => read_batches = Some(read?),
                // The broker paused or resumed: look again at what may start.
                changed = pauses.changed(), if !stopping => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = stop.wait_for(|stopped| *stopped), if !stopping => stopping = true,
            }
            if let Some(batches) = read_batches {
                let task = self
                    .relay(source, &table, batches, &mut handed, &abandon)
                    .await;
                // Batches are recorded one after the other, in the order of the log: what
                // they hand to the table takes its place in that order.
                let (recorded_tx, recorded_rx) = tokio::sync::oneshot::channel::<()>();
                let before = previous.replace(recorded_rx);
                records.spawn(async move {
                    if let Some(before) = before {
                        let _ = before.await;
                    }
                    let recorded = task.await;
                    let _ = recorded_tx.send(());
                    recorded
                });
            }
        }
    }

    /// Ends the session of the log, for as long as the table cannot be written.
    async fn suspend(&self, source: &mut L) {
        let limit = self.policy.config.store_timeout;
        match tokio::time::timeout(limit, source.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => debug!(error = %chain(&err), "ending the session of the log"),
            Err(_) => debug!("ending the session of the log gave no answer"),
        }
    }

    /// The next transaction, and those already at hand up to the batch size. A transient
    /// failure pauses the relay for the store and is retried with capped backoff; `next` is
    /// cancel-safe, so this is too.
    async fn read(&self, source: &mut L) -> Result<Vec<LogBatch>, StoreError> {
        let policy = &self.policy;
        let mut failures = 0;
        let first = loop {
            match source.next().await {
                Ok(batch) => break batch,
                Err(err) if !err.is_transient() => return Err(err),
                Err(err) => {
                    metrics::counter!(m::STORE_ERRORS).increment(1);
                    let retry_in = probe_wait(failures, policy.config.probe_max);
                    failures += 1;
                    warn!(error = %chain(&err), ?retry_in, "reading the log failed; resuming from the last confirmed position");
                    policy
                        .pauses
                        .pause(PauseCause::Store, error_text::stored(&err));
                    tokio::time::sleep(retry_in).await;
                }
            }
        };
        policy.pauses.resume(PauseCause::Store);
        let mut rows = first.len();
        let mut batches = vec![first];
        while rows < policy.config.batch_size {
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

    /// Publishes `batches` and returns the task that records the outcomes: published, or
    /// handed to the table with their keys (added to `handed`).
    async fn relay<T: LogTable>(
        &self,
        source: &mut L,
        table: &T,
        batches: Vec<LogBatch>,
        handed: &mut HashSet<String>,
        abandon: &watch::Receiver<bool>,
    ) -> impl Future<Output = Result<Recorded, StoreError>> + Send + 'static + use<L, P, T> {
        let positions: Vec<LogPosition> = batches.iter().map(|batch| batch.position).collect();
        let rows: usize = batches.iter().map(LogBatch::len).sum();
        let span = info_span!(
            "outbox.log_batch",
            size = rows,
            through = positions.last().map(|p| p.get())
        );
        let (settlement, rowless, complete, order) = async {
            metrics::histogram!(m::BATCH_SIZE).record(rows as f64);
            let mut messages = Vec::with_capacity(rows);
            let mut rowless = Vec::new();
            let mut done = Progress::default();
            for batch in batches {
                messages.extend(batch.messages);
                rowless.extend(batch.rowless);
                batch::dead_letter_malformed(&mut done, batch.malformed);
                // Rows written for later are the table's, and so are the later messages of
                // their keys.
                handed.extend(batch.deferred.into_iter().filter_map(|row| row.key));
            }
            let order: Vec<MessageId> = messages.iter().map(|msg| msg.id).collect();
            let keys_of: HashMap<MessageId, String> = messages
                .iter()
                .filter_map(|msg| Some((msg.id, msg.key.clone()?)))
                .collect();
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
                if self.policy.pauses.current_state().store() {
                    // Waiting for the table: the session of the log must not hold a database
                    // that shuts down.
                    self.suspend(source).await;
                }
                if !self.policy.until_running(abandon).await {
                    complete = false;
                    break;
                }
                let mut pass = Progress::default();
                let ctx = Publishing {
                    publisher: &self.publisher,
                    config: &self.policy.config,
                    pauses: &self.policy.pauses,
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
            (done.settlement, rowless, complete, order)
        }
        .instrument(span)
        .await;
        // What goes to the table, in the order of the log.
        let handed: Vec<MessageId> = {
            let handed: HashSet<&MessageId> = settlement
                .retry
                .iter()
                .map(|r| &r.id)
                .chain(&settlement.release)
                .collect();
            order.into_iter().filter(|id| handed.contains(id)).collect()
        };
        let unrecorded: Vec<Message> = {
            let failed: HashSet<&MessageId> = settlement
                .retry
                .iter()
                .map(|r| &r.id)
                .chain(settlement.dead.iter().map(|d| &d.id))
                .chain(&settlement.release)
                .collect();
            rowless
                .into_iter()
                .filter(|msg| failed.contains(&msg.id))
                .collect()
        };
        let report = BatchReport::of(rows, &settlement);
        let confirm = if complete { positions } else { Vec::new() };
        let policy = Arc::clone(&self.policy);
        let (table, abandon) = (table.clone(), abandon.clone());
        async move {
            policy
                .record(
                    &table,
                    (settlement, unrecorded, handed),
                    confirm,
                    report,
                    &abandon,
                )
                .await
        }
    }
}

impl Policy {
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

    /// The keys among `keys` (all when `None`) the table holds messages of; `None` when the
    /// relay gave up (shutdown).
    async fn waiting<T: LogTable>(
        &self,
        table: &T,
        keys: Option<&[String]>,
        abandon: &watch::Receiver<bool>,
    ) -> Result<Option<HashSet<String>>, StoreError> {
        let mut failures = 0;
        loop {
            match self.bounded(table.waiting(keys)).await {
                Ok(waiting) => return Ok(Some(waiting)),
                Err(err) => {
                    if !self
                        .failed(
                            err,
                            &mut failures,
                            abandon,
                            "reading the keys the table holds",
                        )
                        .await?
                    {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Records `settlement` in the table, retrying transient failures until it is recorded
    /// or the relay gives up; the positions to confirm are those of a recorded batch.
    async fn record<T: LogTable>(
        &self,
        table: &T,
        (settlement, unrecorded, handed): (Settlement, Vec<Message>, Vec<MessageId>),
        confirm: Vec<LogPosition>,
        mut report: BatchReport,
        abandon: &watch::Receiver<bool>,
    ) -> Result<Recorded, StoreError> {
        if settlement.is_empty() {
            return Ok(Recorded {
                positions: confirm,
                report,
            });
        }
        let mut failures = 0;
        loop {
            match self
                .bounded(table.record(&settlement, &unrecorded, &handed))
                .await
            {
                Ok(()) => {
                    return Ok(Recorded {
                        positions: confirm,
                        report,
                    });
                }
                Err(err) => {
                    if !self
                        .failed(err, &mut failures, abandon, "recording the outcomes")
                        .await?
                    {
                        // Delivered again by the next run.
                        report.fenced = settlement.len() as u64;
                        return Ok(Recorded {
                            positions: Vec::new(),
                            report,
                        });
                    }
                }
            }
        }
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
}
