//! The relay: claims committed messages, publishes them and records the outcomes.

mod batch;
mod log;
mod partitions;
mod pause;
mod shutdown;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use log::{LogRelay, LogRelayBuilder};
pub use pause::{Pause, PauseCause};

use crate::error::chain;
use crate::error_text;
use crate::metrics as m;
use crate::{
    Claim, ConfigError, PARTITIONS, Publisher, RelayConfig, RelayError, RelayId, Store, StoreError,
    StoreErrorKind, Wakeup,
};
use batch::process;
use partitions::owner_of;
use pause::{Pauses, probe_wait};

/// What one claimed batch came to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Messages confirmed by the broker.
    pub published: usize,
    /// Messages scheduled for a retry.
    pub retried: usize,
    /// Messages dead-lettered.
    pub dead_lettered: usize,
    /// Messages handed back unpublished.
    pub released: usize,
    /// Outcomes not recorded because the lease had expired.
    pub fenced: u64,
}

impl BatchReport {
    /// The report of `claimed` rows whose outcomes are `settlement` (nothing fenced yet).
    fn of(claimed: usize, settlement: &crate::Settlement) -> Self {
        Self {
            claimed,
            published: settlement.published.len(),
            retried: settlement.retry.len(),
            dead_lettered: settlement.dead.len(),
            released: settlement.release.len(),
            fenced: 0,
        }
    }

    /// Adds the outcomes to the relay's counters.
    fn count(&self) {
        metrics::counter!(m::PUBLISHED).increment(self.published as u64);
        metrics::counter!(m::RETRIED).increment(self.retried as u64);
        metrics::counter!(m::DEAD_LETTERED).increment(self.dead_lettered as u64);
        metrics::counter!(m::RELEASED).increment(self.released as u64);
        metrics::counter!(m::FENCED).increment(self.fenced);
    }

    fn add(&mut self, other: &BatchReport) {
        self.claimed += other.claimed;
        self.published += other.published;
        self.retried += other.retried;
        self.dead_lettered += other.dead_lettered;
        self.released += other.released;
        self.fenced += other.fenced;
    }
}

/// Store calls a relay has in flight at most, besides its claims and settles (which share the
/// [`RelayConfig::concurrency`] worker slots): one renewal of its partitions and one stats or
/// cleanup call.
const BACKGROUND_CALLS: usize = 2;

/// Builds a [`Relay`].
#[must_use]
pub struct RelayBuilder<S, P> {
    store: S,
    publisher: P,
    config: RelayConfig,
    wakeup: Option<Wakeup>,
}

impl<S: Store, P: Publisher> RelayBuilder<S, P> {
    /// Sets the configuration (the default otherwise).
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Uses an existing wake-up handle, for example one shared with the code that enqueues.
    pub fn wakeup(mut self, wakeup: Wakeup) -> Self {
        self.wakeup = Some(wakeup);
        self
    }

    /// Checks the configuration, and that the store can serve the calls the relay will have
    /// in flight at once ([`Store::max_connections`]), and builds the relay.
    pub fn build(self) -> Result<Relay<S, P>, ConfigError> {
        self.config.validate()?;
        let needed = self.config.concurrency + BACKGROUND_CALLS;
        if let Some(max) = self.store.max_connections()
            && max < needed
        {
            return Err(ConfigError::new(
                "concurrency",
                format!(
                    "the relay can have {needed} store calls in flight (concurrency {} + {BACKGROUND_CALLS}) \
                     but the store serves {max} at once: give its pool at least {needed} \
                     connections (more if the service shares it), or lower concurrency",
                    self.config.concurrency
                ),
            ));
        }
        let id = self
            .config
            .relay_id
            .clone()
            .map(RelayId::new)
            .unwrap_or_else(RelayId::random);
        m::describe();
        Ok(Relay {
            inner: Arc::new(Inner {
                store: self.store,
                publisher: self.publisher,
                config: self.config,
                id,
                wakeup: self.wakeup.unwrap_or_default(),
                owned: AtomicUsize::new(0),
                pauses: Pauses::new(),
                clock_offset_us: AtomicI64::new(0),
            }),
        })
    }
}

/// Publishes committed outbox messages: at least once, in per-key order, sharing the work with
/// the other relays of the same store.
///
/// ```
/// use outbox_core::{MemoryPublisher, MemoryStore, NewMessage, Relay};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let publisher = MemoryPublisher::new();
///
/// let mut tx = store.begin();
/// tx.enqueue(NewMessage::new("orders", "created").key("order-1"));
/// tx.commit();
///
/// let relay = Relay::builder(store.clone(), publisher.clone()).build()?;
/// let report = relay.run_once().await?;
/// assert_eq!(report.published, 1);
/// assert_eq!(publisher.published()[0].payload, b"created");
/// # Ok(()) }
/// ```
///
/// # How it works
///
/// - Relays of one store share the [`PARTITIONS`] key-hash partitions by rendezvous hashing over
///   the live relays; each renews its membership and partition leases every third of
///   [`RelayConfig::partition_lease`]. A relay that dies stops renewing and its partitions go to
///   the others once their leases expire.
/// - One task claims batches from the owned partitions; up to [`RelayConfig::concurrency`]
///   batches are published at once. The store never hands out a message whose key has an
///   earlier message in flight or waiting for a retry, so per-key order holds across batches,
///   relays and failures.
/// - Within a batch, a publisher that does not keep per-key order gets messages of one key in
///   successive calls; after a failure the remaining messages of that key are released.
/// - Outcomes are recorded in one store call per batch, fenced by the batch's lease token.
///
/// # Outages
///
/// A failure of a message (a permanent failure, or a transient one while the broker confirmed
/// other messages of the same call) is an attempt of that message, retried with backoff and
/// dead-lettered after [`RetryPolicy::max_attempts`](crate::RetryPolicy::max_attempts). An
/// outage is not: when a publish call fails or times out as a whole, or every message of a call
/// fails transiently with none confirmed, the relay hands the messages back untouched,
/// **pauses** (claims nothing), and probes the broker with [`Publisher::check`] from 100 ms up
/// to [`RelayConfig::probe_max`] apart; it resumes once the broker answers. A store that fails
/// or does not answer pauses it the same way, until a store call succeeds again. While paused,
/// [`Relay::pauses`] says why, the `outbox_relay_paused` gauge is 1 and the log says when the
/// pause began and ended. So a broker or database down for any length of time dead-letters
/// nothing.
pub struct Relay<S, P> {
    inner: Arc<Inner<S, P>>,
}

impl<S, P> Clone for Relay<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<S, P> {
    store: S,
    publisher: P,
    config: RelayConfig,
    id: RelayId,
    wakeup: Wakeup,
    owned: AtomicUsize,
    pauses: Pauses,
    /// The store's clock minus the relay's, in microseconds, as last read with the stats.
    clock_offset_us: AtomicI64,
}

impl<S: Store, P: Publisher> Relay<S, P> {
    /// Starts building a relay from `store` to `publisher`.
    pub fn builder(store: S, publisher: P) -> RelayBuilder<S, P> {
        RelayBuilder {
            store,
            publisher,
            config: RelayConfig::default(),
            wakeup: None,
        }
    }

    /// This relay's identity among the relays of its store.
    pub fn id(&self) -> &RelayId {
        &self.inner.id
    }

    /// The handle that wakes this relay when it is idle.
    pub fn wakeup(&self) -> Wakeup {
        self.inner.wakeup.clone()
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The publisher.
    pub fn publisher(&self) -> &P {
        &self.inner.publisher
    }

    /// The configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.inner.config
    }

    /// Why the relay is paused, if it is: an outage of the broker, of the store, or both. Empty
    /// while it runs normally. Readiness probes report it.
    pub fn pauses(&self) -> Vec<Pause> {
        self.inner.pauses.current()
    }

    /// Renews this relay's membership and takes or gives up partitions so that the live relays
    /// share them; returns the partitions owned afterwards. [`Relay::run`] calls it on its own.
    pub async fn rebalance(&self) -> Result<Vec<u16>, StoreError> {
        self.inner.rebalance().await
    }

    /// Runs the relay in a task of its own until `shutdown` completes (or
    /// [`RelayHandle::shutdown`] is called), as [`Relay::run`] does; the handle completes with
    /// the run's result. The one line a service needs next to its web server:
    ///
    /// ```
    /// use outbox_core::{MemoryPublisher, MemoryStore, Relay};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let relay = Relay::builder(MemoryStore::new(), MemoryPublisher::new())
    ///     .build()?
    ///     .spawn(std::future::pending()); // in a service: a SIGTERM future
    /// // ... serve requests; then, on shutdown:
    /// relay.shutdown();
    /// relay.await?;
    /// # Ok(()) }
    /// ```
    pub fn spawn(self, shutdown: impl Future<Output = ()> + Send + 'static) -> RelayHandle<S, P> {
        let (stop, mut stopped) = watch::channel(false);
        let relay = self.clone();
        let task = tokio::spawn(async move {
            let asked = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            relay
                .run(async move {
                    tokio::select! {
                        () = shutdown => {}
                        () = asked => {}
                    }
                })
                .await
        });
        RelayHandle {
            relay: self,
            stop,
            task,
        }
    }

    /// Rebalances, then claims, publishes and settles one batch.
    pub async fn run_once(&self) -> Result<BatchReport, StoreError> {
        self.inner.rebalance().await?;
        let started = Instant::now();
        let claim = self.inner.claim().await?;
        let (_abandon_tx, abandon) = watch::channel(false);
        Ok(process(&self.inner, claim, started, abandon).await)
    }

    /// Runs until `shutdown` completes, then shuts down gracefully within
    /// [`RelayConfig::shutdown_timeout`]: stops claiming, lets in-flight publishes finish for
    /// half of it, hands back what is left, records every outcome, flushes the publisher and
    /// gives up its partitions.
    ///
    /// Outages of the broker or the store pause it until they end (see the type's
    /// documentation), however long; it returns an error only for a permanent store failure
    /// such as a missing outbox table.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RelayError> {
        let inner = &self.inner;
        let (stop_tx, stop) = watch::channel(false);
        let (abandon_tx, abandon) = watch::channel(false);
        let mut workers = JoinSet::new();
        info!(relay = %inner.id, "relay starting");

        let mut deadline = None;
        let result = {
            let claim_loop = inner.claim_loop(&mut workers, stop.clone(), abandon);
            let background = async {
                tokio::select! {
                    res = inner.coordinate_loop() => res,
                    res = inner.listen_loop() => res,
                    () = inner.maintenance_loop() => Ok(()),
                    () = pause::probe_broker(&inner.pauses, &inner.publisher, &inner.config, &inner.wakeup) => Ok(()),
                }
            };
            tokio::pin!(claim_loop, background, shutdown);
            tokio::select! {
                () = &mut shutdown => {
                    let plan = shutdown::Plan::new(inner.config.shutdown_timeout);
                    deadline = Some(plan);
                    let _ = stop_tx.send(true);
                    // The claim loop stops at its next wait; a claim under way completes, if
                    // the store answers in time.
                    tokio::select! {
                        res = &mut claim_loop => res,
                        res = &mut background => res,
                        () = tokio::time::sleep_until(plan.claims_until) => Ok(()),
                    }
                }
                res = &mut claim_loop => res,
                res = &mut background => res,
            }
        };
        let plan = deadline.unwrap_or_else(|| shutdown::Plan::new(inner.config.shutdown_timeout));
        info!(relay = %inner.id, in_flight = workers.len(), "relay stopping");
        let report = shutdown::drain(&mut workers, &plan, &abandon_tx).await;
        debug!(?report, "in-flight batches settled");
        let flush = inner
            .config
            .publish_timeout
            .min(plan.left(plan.flush_until));
        match tokio::time::timeout(flush, inner.publisher.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(error = %chain(&err), "publisher flush failed on shutdown"),
            Err(_) => warn!(after = ?flush, "publisher flush gave no answer on shutdown"),
        }
        let leave = plan.left(plan.deadline);
        if let Err(err) = inner.bounded_for(leave, inner.store.leave(&inner.id)).await {
            warn!(error = %chain(&err), "could not give up partitions on shutdown; they free up when their lease expires");
        }
        inner.owned.store(0, Ordering::Relaxed);
        metrics::gauge!(m::OWNED_PARTITIONS).set(0.0);
        info!(relay = %inner.id, "relay stopped");
        result.map_err(RelayError::from)
    }
}

fn is_fatal(err: &StoreError) -> bool {
    matches!(err.kind(), StoreErrorKind::Schema | StoreErrorKind::Config)
}

impl<S: Store, P: Publisher> Inner<S, P> {
    /// Awaits one store call for at most [`RelayConfig::store_timeout`]; see
    /// [`Inner::bounded_for`].
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.bounded_for(self.config.store_timeout, call).await
    }

    /// Awaits one store call for at most `limit`. A call with no answer by then is dropped
    /// (store calls must be cancel-safe) and fails as a transient connection error: the caller
    /// retries it as it retries a refused connection. A transient failure pauses the relay for
    /// a store outage; a success ends such a pause.
    async fn bounded_for<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(StoreError::new(
                StoreErrorKind::Connection,
                format!("the store gave no answer within {limit:?}"),
            )
            .transient())
        });
        match &result {
            Ok(_) => self.pauses.resume(PauseCause::Store),
            Err(err) if err.is_transient() => self
                .pauses
                .pause(PauseCause::Store, error_text::stored(err)),
            Err(_) => {}
        }
        result
    }

    /// Now on the store's clock, as far as the relay knows it.
    fn store_now(&self) -> DateTime<Utc> {
        let offset = self.clock_offset_us.load(Ordering::Relaxed);
        Utc::now() + chrono::Duration::microseconds(offset)
    }

    /// What publishing a batch needs of this relay.
    fn publishing(&self) -> batch::Publishing<'_, P> {
        batch::Publishing {
            publisher: &self.publisher,
            config: &self.config,
            pauses: &self.pauses,
            clock_offset_us: Some(&self.clock_offset_us),
        }
    }

    async fn rebalance(&self) -> Result<Vec<u16>, StoreError> {
        let ttl = self.config.partition_lease;
        let members = self.bounded(self.store.heartbeat(&self.id, ttl)).await?;
        let mine: Vec<u16> = (0..PARTITIONS)
            .filter(|p| owner_of(*p, &members).is_none_or(|owner| *owner == self.id))
            .collect();
        let held: Vec<u16> = members
            .iter()
            .find(|member| member.id == self.id)
            .map(|member| member.partitions.clone())
            .unwrap_or_default();
        let surplus: Vec<u16> = held.iter().copied().filter(|p| !mine.contains(p)).collect();
        if !surplus.is_empty() {
            debug!(relay = %self.id, partitions = ?surplus, "handing partitions over");
            self.bounded(self.store.release(&self.id, &surplus)).await?;
        }
        let owned = self
            .bounded(self.store.acquire(&self.id, &mine, ttl))
            .await?;
        let before = self.owned.swap(owned.len(), Ordering::Relaxed);
        if owned.len() > before {
            // New partitions may hold messages already: look at once.
            self.wakeup.wake();
        }
        if owned.len() != before {
            info!(relay = %self.id, owned = owned.len(), relays = members.len(), "partitions rebalanced");
        }
        metrics::gauge!(m::OWNED_PARTITIONS).set(owned.len() as f64);
        Ok(owned)
    }

    async fn coordinate_loop(&self) -> Result<(), StoreError> {
        let interval = self.config.partition_lease / 3;
        loop {
            match self.rebalance().await {
                Ok(_) => {}
                Err(err) if is_fatal(&err) => return Err(err),
                Err(err) => {
                    metrics::counter!(m::STORE_ERRORS).increment(1);
                    warn!(error = %chain(&err), "could not renew partitions; retrying");
                }
            }
            tokio::time::sleep(interval).await;
        }
    }

    async fn listen_loop(&self) -> Result<(), StoreError> {
        let mut backoff = self.config.poll_max;
        loop {
            match self.store.listen(self.wakeup.clone()).await {
                Err(err) if is_fatal(&err) => return Err(err),
                // Listening is meant to last; an end, like an error, is followed by a new try.
                Ok(()) => {
                    warn!("store notifications ended; polling meanwhile");
                    self.wakeup.wake();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(err) => {
                    warn!(error = %chain(&err), "store notifications interrupted; polling meanwhile");
                    // Messages committed while not listening are found by polling.
                    self.wakeup.wake();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Refreshes the backlog gauges and the store's clock offset, and removes published
    /// messages past their retention.
    async fn maintenance_loop(&self) {
        let mut stats = tokio::time::interval(self.config.stats_interval);
        let mut cleanup = tokio::time::interval(self.config.cleanup_interval);
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        cleanup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stats.tick() => self.refresh_stats().await,
                _ = cleanup.tick() => loop {
                    match self.bounded(self.store.cleanup(self.config.cleanup_batch)).await {
                        Ok(n) if (n as usize) < self.config.cleanup_batch => break,
                        Ok(_) => {}
                        Err(err) => {
                            metrics::counter!(m::STORE_ERRORS).increment(1);
                            warn!(error = %chain(&err), "outbox cleanup failed");
                            break;
                        }
                    }
                },
            }
        }
    }

    async fn refresh_stats(&self) {
        let asked = Utc::now();
        let stats = match self.bounded(self.store.stats()).await {
            Ok(stats) => stats,
            Err(err) => {
                metrics::counter!(m::STORE_ERRORS).increment(1);
                warn!(error = %chain(&err), "could not read outbox stats");
                return;
            }
        };
        if let Some(store_now) = stats.as_of {
            // The store read its clock somewhere between the question and the answer.
            let answered = Utc::now();
            let local = asked + (answered - asked) / 2;
            let offset = (store_now - local).num_microseconds().unwrap_or(0);
            self.clock_offset_us.store(offset, Ordering::Relaxed);
        }
        metrics::gauge!(m::BACKLOG).set(stats.pending as f64);
        metrics::gauge!(m::DEAD_LETTERS).set(stats.dead as f64);
        let age = stats
            .oldest_pending_age()
            .or_else(|| {
                // A store that does not tell its clock: the relay's, corrected by the offset
                // known so far.
                let oldest = stats.oldest_pending?;
                Some((self.store_now() - oldest).to_std().unwrap_or_default())
            })
            .map_or(0.0, |age| age.as_secs_f64());
        metrics::gauge!(m::OLDEST_PENDING_AGE).set(age);
    }

    async fn claim(&self) -> Result<Claim, StoreError> {
        let claim = self
            .bounded(
                self.store
                    .claim(&self.id, self.config.batch_size, self.config.lease),
            )
            .await?;
        if !claim.is_empty() {
            metrics::histogram!(m::BATCH_SIZE).record(claim.len() as f64);
        }
        Ok(claim)
    }

    /// Claims batches and hands them to workers until `stop` is set. While claims come back
    /// full (a backlog), up to [`RelayConfig::claims`] run at once, each holding the worker
    /// permit its batch will use; otherwise one at a time. After an empty claim or an error no
    /// new claim starts until the wait is over (or a wake-up comes), while the claims under
    /// way complete. While the broker is paused no claim starts; a failing store is probed by
    /// the claims themselves, from 100 ms up to [`RelayConfig::probe_max`] apart.
    async fn claim_loop(
        self: &Arc<Self>,
        workers: &mut JoinSet<BatchReport>,
        mut stop: watch::Receiver<bool>,
        abandon: watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let slots = self.config.claims.clamp(1, self.config.concurrency);
        let mut claims: FuturesUnordered<BoxFuture<'static, ClaimDone>> = FuturesUnordered::new();
        let mut pauses = self.pauses.subscribe();
        let mut idle = self.config.poll_min;
        let mut failures = 0;
        // No new claim before this instant.
        let mut paused_until: Option<Instant> = None;
        let mut stopping = *stop.borrow();
        // The last claim came back full: more claims at once pay off.
        let mut backlog = false;
        loop {
            // Reap finished batches so the set does not grow.
            while workers.try_join_next().is_some() {}
            if stopping && claims.is_empty() {
                return Ok(());
            }
            let broker_down = pauses.borrow_and_update().broker();
            let may_start = !stopping
                && !broker_down
                && paused_until.is_none()
                && (claims.is_empty() || (backlog && claims.len() < slots));
            let pause = paused_until.unwrap_or_else(Instant::now);
            tokio::select! {
                // A claim under way completes before the loop stops: its batch is published
                // (or released) by the shutdown's drain.
                Some((permit, started, result)) = claims.next(), if !claims.is_empty() => {
                    match result {
                        Ok(claim) if claim.is_empty() => {
                            drop(permit);
                            failures = 0;
                            backlog = false;
                            paused_until = Some(Instant::now() + idle);
                            idle = (idle * 2).min(self.config.poll_max);
                        }
                        Ok(claim) => {
                            failures = 0;
                            idle = self.config.poll_min;
                            // A partial batch: more may be committing right now; look again
                            // soon.
                            backlog = claim.len() >= self.config.batch_size;
                            paused_until = (!backlog).then(|| Instant::now() + self.config.poll_min);
                            let inner = Arc::clone(self);
                            let abandon = abandon.clone();
                            workers.spawn(async move {
                                let report = process(&inner, claim, started, abandon).await;
                                drop(permit);
                                // A large batch, or one that handed messages back, settled:
                                // the later messages of its keys, which claims passed over
                                // while it was in flight, may go now. (Small batches do not
                                // wake: at a low rate that would double the claims.)
                                if report.claimed * 2 >= inner.config.batch_size
                                    || report.released > 0
                                {
                                    inner.wakeup.wake();
                                }
                                report
                            });
                        }
                        Err(err) if is_fatal(&err) => return Err(err),
                        Err(err) => {
                            drop(permit);
                            backlog = false;
                            let retry_in = probe_wait(failures, self.config.probe_max);
                            failures += 1;
                            metrics::counter!(m::STORE_ERRORS).increment(1);
                            warn!(error = %chain(&err), ?retry_in, "claim failed");
                            paused_until = Some(Instant::now() + retry_in);
                        }
                    }
                }
                permit = Arc::clone(&permits).acquire_owned(), if may_start => {
                    let Ok(permit) = permit else { return Ok(()) };
                    let inner = Arc::clone(self);
                    claims.push(Box::pin(async move {
                        let started = Instant::now();
                        let result = inner.claim().await;
                        (permit, started, result)
                    }));
                }
                () = self.wakeup.woken(), if paused_until.is_some() && !stopping => {
                    idle = self.config.poll_min;
                    // A wake-up does not cut short the wait after a failure.
                    if failures == 0 {
                        paused_until = None;
                    }
                }
                () = tokio::time::sleep_until(pause), if paused_until.is_some() && !stopping => {
                    paused_until = None;
                }
                // The broker paused or resumed: look again at what may start.
                changed = pauses.changed(), if !stopping => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = stop.wait_for(|stopped| *stopped), if !stopping => stopping = true,
            }
        }
    }
}

/// A relay running in a task of its own, from [`Relay::spawn`]. Awaiting it waits until the
/// relay stopped and returns how its run ended; dropping it leaves the relay running.
#[must_use = "a relay handle is how the relay's end and failures are seen"]
pub struct RelayHandle<S, P> {
    relay: Relay<S, P>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), RelayError>>,
}

impl<S: Store, P: Publisher> RelayHandle<S, P> {
    /// Asks the relay to shut down gracefully, as its shutdown future would; await the handle
    /// to wait for the end (at most [`RelayConfig::shutdown_timeout`]).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// The relay, for its wake-up handle, its pauses and its id.
    pub fn relay(&self) -> &Relay<S, P> {
        &self.relay
    }

    /// Wakes the relay (see [`Relay::wakeup`]): call it after committing an enqueue.
    pub fn wake(&self) {
        self.relay.inner.wakeup.wake();
    }

    /// True once the relay's task ended (stopped, or failed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl<S, P> Future for RelayHandle<S, P> {
    type Output = Result<(), RelayError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.task).poll(cx).map(|joined| {
            joined.unwrap_or_else(|err| {
                Err(RelayError::Task(if err.is_panic() {
                    "the relay's task panicked".to_owned()
                } else {
                    "the relay's task was cancelled".to_owned()
                }))
            })
        })
    }
}

impl<S, P> std::fmt::Debug for RelayHandle<S, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("relay", &self.relay.inner.id)
            .field("finished", &self.task.is_finished())
            .finish()
    }
}

/// A finished claim: the worker permit its batch holds, when it started, what it returned.
type ClaimDone = (OwnedSemaphorePermit, Instant, Result<Claim, StoreError>);
