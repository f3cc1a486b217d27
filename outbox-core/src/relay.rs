//! The relay: claims committed messages, publishes them and records the outcomes.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::error::chain;
use crate::metrics as m;
use crate::retry::Decision;
use crate::{
    Claim, ConfigError, DeadLetterTo, Message, PARTITIONS, PublishError, PublishOutcome, Publisher,
    RelayConfig, RelayError, RelayId, RelayMember, Retry, Settlement, Store, StoreError,
    StoreErrorKind, Wakeup,
};

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
    fn add(&mut self, other: &BatchReport) {
        self.claimed += other.claimed;
        self.published += other.published;
        self.retried += other.retried;
        self.dead_lettered += other.dead_lettered;
        self.released += other.released;
        self.fenced += other.fenced;
    }
}

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

    /// Checks the configuration and builds the relay.
    pub fn build(self) -> Result<Relay<S, P>, ConfigError> {
        self.config.validate()?;
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

    /// Renews this relay's membership and takes or gives up partitions so that the live relays
    /// share them; returns the partitions owned afterwards. [`Relay::run`] calls it on its own.
    pub async fn rebalance(&self) -> Result<Vec<u16>, StoreError> {
        self.inner.rebalance().await
    }

    /// Rebalances, then claims, publishes and settles one batch.
    pub async fn run_once(&self) -> Result<BatchReport, StoreError> {
        self.inner.rebalance().await?;
        let started = Instant::now();
        let claim = self.inner.claim().await?;
        let (_abandon_tx, abandon) = watch::channel(false);
        Ok(process(&self.inner, claim, started, abandon).await)
    }

    /// Runs until `shutdown` completes, then shuts down gracefully: stops claiming, lets
    /// in-flight publishes finish for up to [`RelayConfig::shutdown_timeout`], releases what is
    /// left, records every outcome, flushes the publisher and gives up its partitions.
    ///
    /// Transient store and broker failures are retried for ever; it returns an error only for
    /// a permanent store failure such as a missing outbox table.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RelayError> {
        let inner = &self.inner;
        let (stop_tx, stop) = watch::channel(false);
        let (abandon_tx, abandon) = watch::channel(false);
        let mut workers = JoinSet::new();
        info!(relay = %inner.id, "relay starting");

        let result = {
            let claim_loop = inner.claim_loop(&mut workers, stop.clone(), abandon);
            let background = async {
                tokio::select! {
                    res = inner.coordinate_loop() => res,
                    res = inner.listen_loop() => res,
                    () = inner.maintenance_loop() => Ok(()),
                }
            };
            tokio::pin!(claim_loop, background, shutdown);
            tokio::select! {
                () = &mut shutdown => {
                    let _ = stop_tx.send(true);
                    // The claim loop stops at its next wait; a claim under way completes.
                    tokio::select! {
                        res = &mut claim_loop => res,
                        res = &mut background => res,
                    }
                }
                res = &mut claim_loop => res,
                res = &mut background => res,
            }
        };
        info!(relay = %inner.id, in_flight = workers.len(), "relay stopping");
        let report = drain(&mut workers, inner.config.shutdown_timeout, &abandon_tx).await;
        debug!(?report, "in-flight batches settled");
        if let Ok(Err(err)) =
            tokio::time::timeout(inner.config.publish_timeout, inner.publisher.flush()).await
        {
            warn!(error = %chain(&err), "publisher flush failed on shutdown");
        }
        if let Err(err) = inner.bounded(inner.store.leave(&inner.id)).await {
            warn!(error = %chain(&err), "could not give up partitions on shutdown; they free up when their lease expires");
        }
        inner.owned.store(0, Ordering::Relaxed);
        metrics::gauge!(m::OWNED_PARTITIONS).set(0.0);
        info!(relay = %inner.id, "relay stopped");
        result.map_err(RelayError::from)
    }
}

/// Waits for in-flight batches; past `timeout` tells them to abandon their publishes (they then
/// release their messages) and waits for that too, for a bounded time.
async fn drain(
    workers: &mut JoinSet<BatchReport>,
    timeout: Duration,
    abandon: &watch::Sender<bool>,
) -> BatchReport {
    let mut total = BatchReport::default();
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, workers.join_next()).await {
            Ok(Some(Ok(report))) => total.add(&report),
            Ok(Some(Err(err))) => {
                warn!(error = %err, "a batch task failed; its messages return when its lease expires")
            }
            Ok(None) => return total,
            Err(_) => break,
        }
    }
    warn!(
        in_flight = workers.len(),
        "shutdown timeout reached: abandoning in-flight publishes"
    );
    let _ = abandon.send(true);
    let grace = Instant::now() + Duration::from_secs(5).max(timeout);
    loop {
        match tokio::time::timeout_at(grace, workers.join_next()).await {
            Ok(Some(Ok(report))) => total.add(&report),
            Ok(Some(Err(err))) => {
                warn!(error = %err, "a batch task failed; its messages return when its lease expires")
            }
            Ok(None) => return total,
            Err(_) => {
                workers.abort_all();
                warn!(
                    "batches still settling were aborted; their messages return when their lease expires"
                );
                return total;
            }
        }
    }
}

fn is_fatal(err: &StoreError) -> bool {
    matches!(err.kind(), StoreErrorKind::Schema | StoreErrorKind::Config)
}

/// Rendezvous hashing: the live relay with the highest score owns the partition.
fn owner_of(partition: u16, relays: &[RelayMember]) -> Option<&RelayId> {
    relays
        .iter()
        .map(|member| &member.id)
        .max_by_key(|id| score(partition, id.as_str()))
}

fn score(partition: u16, relay: &str) -> u64 {
    // FNV-1a 64 over relay id and partition, then a finalizer (splitmix64) to spread the bits.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in relay
        .as_bytes()
        .iter()
        .chain(partition.to_le_bytes().iter())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

impl<S: Store, P: Publisher> Inner<S, P> {
    /// Awaits one store call for at most [`RelayConfig::store_timeout`]. A call with no answer
    /// by then is dropped (store calls must be cancel-safe) and fails as a transient
    /// connection error: the caller retries it as it retries a refused connection.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.config.store_timeout;
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(StoreError::new(
                StoreErrorKind::Connection,
                format!("the store gave no answer within {limit:?}"),
            )
            .transient())
        })
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

    async fn maintenance_loop(&self) {
        let mut stats = tokio::time::interval(self.config.stats_interval);
        let mut cleanup = tokio::time::interval(self.config.cleanup_interval);
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        cleanup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stats.tick() => match self.bounded(self.store.stats()).await {
                    Ok(stats) => {
                        metrics::gauge!(m::BACKLOG).set(stats.pending as f64);
                        metrics::gauge!(m::DEAD_LETTERS).set(stats.dead as f64);
                        let age = stats.oldest_pending.map_or(0.0, |t| {
                            (Utc::now() - t).to_std().map_or(0.0, |d| d.as_secs_f64())
                        });
                        metrics::gauge!(m::OLDEST_PENDING_AGE).set(age);
                    }
                    Err(err) => {
                        metrics::counter!(m::STORE_ERRORS).increment(1);
                        warn!(error = %chain(&err), "could not read outbox stats");
                    }
                },
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
    /// way complete.
    async fn claim_loop(
        self: &Arc<Self>,
        workers: &mut JoinSet<BatchReport>,
        mut stop: watch::Receiver<bool>,
        abandon: watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let slots = self.config.claims.clamp(1, self.config.concurrency);
        let mut claims: FuturesUnordered<BoxFuture<'static, ClaimDone>> = FuturesUnordered::new();
        let mut idle = self.config.poll_min;
        let mut error_backoff = Duration::from_millis(100);
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
            let may_start = !stopping
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
                            backlog = false;
                            paused_until = Some(Instant::now() + idle);
                            idle = (idle * 2).min(self.config.poll_max);
                        }
                        Ok(claim) => {
                            error_backoff = Duration::from_millis(100);
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
                                report
                            });
                        }
                        Err(err) if is_fatal(&err) => return Err(err),
                        Err(err) => {
                            drop(permit);
                            backlog = false;
                            metrics::counter!(m::STORE_ERRORS).increment(1);
                            warn!(error = %chain(&err), retry_in = ?error_backoff, "claim failed");
                            paused_until = Some(Instant::now() + error_backoff);
                            error_backoff = (error_backoff * 2).min(Duration::from_secs(10));
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
                    paused_until = None;
                }
                () = tokio::time::sleep_until(pause), if paused_until.is_some() && !stopping => {
                    paused_until = None;
                }
                _ = stop.wait_for(|stopped| *stopped), if !stopping => stopping = true,
            }
        }
    }
}

/// A finished claim: the worker permit its batch holds, when it started, what it returned.
type ClaimDone = (OwnedSemaphorePermit, Instant, Result<Claim, StoreError>);

/// Splits `messages` into what one publish call may carry and the rest. Without per-key order
/// in the publisher, a call carries the first message of each key (and every keyless one).
fn next_call(messages: Vec<Message>, ordered_per_key: bool) -> (Vec<Message>, Vec<Message>) {
    if ordered_per_key {
        return (messages, Vec::new());
    }
    let mut seen = HashSet::new();
    messages
        .into_iter()
        .partition(|msg| msg.key.as_ref().is_none_or(|key| seen.insert(key.clone())))
}

/// Completes when the relay asks in-flight batches to give up. A closed channel means the relay
/// itself is gone (its task was dropped, as in a crash): then nothing may be settled, so this
/// never completes.
async fn abandoned(abandon: &mut watch::Receiver<bool>) {
    if abandon.wait_for(|a| *a).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Publishes one claimed batch and records the outcomes.
async fn process<S: Store, P: Publisher>(
    inner: &Inner<S, P>,
    claim: Claim,
    claimed_at: Instant,
    mut abandon: watch::Receiver<bool>,
) -> BatchReport {
    let span = info_span!("outbox.batch", relay = %inner.id, size = claim.len(), token = %claim.token.as_uuid());
    async move {
        let config = &inner.config;
        let lease_end = claimed_at + config.lease;
        let token = claim.token;
        let mut report = BatchReport {
            claimed: claim.len(),
            ..BatchReport::default()
        };
        let mut settlement = Settlement::default();
        let mut blocked: HashSet<String> = HashSet::new();

        for bad in claim.malformed {
            warn!(id = %bad.id, error = %bad.error, "dead-lettering a message that cannot be decoded");
            if let Some(key) = bad.key {
                blocked.insert(key);
            }
            settlement.dead.push(DeadLetterTo {
                id: bad.id,
                error: format!("cannot be decoded: {}", bad.error),
            });
        }

        let ordered = inner.publisher.capabilities().ordered_per_key;
        let mut remaining = claim.messages;
        while !remaining.is_empty() {
            let (held_back, ready): (Vec<Message>, Vec<Message>) = remaining
                .into_iter()
                .partition(|msg| msg.key.as_ref().is_some_and(|key| blocked.contains(key)));
            settlement.release.extend(held_back.iter().map(|msg| msg.id));
            let (call, rest) = next_call(ready, ordered);
            remaining = rest;
            if call.is_empty() {
                break;
            }
            // Publishing past the lease could race the relay that takes the messages over.
            let margin = config.publish_timeout + config.lease / 10;
            if Instant::now() + margin > lease_end || *abandon.borrow() {
                settlement.release.extend(call.iter().chain(remaining.iter()).map(|msg| msg.id));
                remaining.clear();
                break;
            }
            let started = Instant::now();
            let outcome = tokio::select! {
                res = tokio::time::timeout(config.publish_timeout, inner.publisher.publish(&call)) => Some(res),
                () = abandoned(&mut abandon) => None,
            };
            metrics::histogram!(m::PUBLISH_DURATION).record(started.elapsed().as_secs_f64());
            let outcomes = match outcome {
                None => {
                    settlement.release.extend(call.iter().chain(remaining.iter()).map(|msg| msg.id));
                    remaining.clear();
                    break;
                }
                Some(Err(_elapsed)) => {
                    metrics::counter!(m::PUBLISH_ERRORS).increment(1);
                    let text = format!("publish timed out after {:?}", config.publish_timeout);
                    warn!(messages = call.len(), "{text}");
                    call.iter().map(|_| PublishOutcome::Failed(PublishError::transient(text.clone()))).collect()
                }
                Some(Ok(Err(err))) => {
                    metrics::counter!(m::PUBLISH_ERRORS).increment(1);
                    warn!(messages = call.len(), error = %chain(&err), "publish call failed");
                    call.iter().map(|_| PublishOutcome::Failed(clone_error(&err))).collect()
                }
                Some(Ok(Ok(outcomes))) if outcomes.len() != call.len() => {
                    metrics::counter!(m::PUBLISH_ERRORS).increment(1);
                    let text = format!("publisher returned {} outcomes for {} messages", outcomes.len(), call.len());
                    warn!("{text}");
                    call.iter().map(|_| PublishOutcome::Failed(PublishError::transient(text.clone()))).collect()
                }
                Some(Ok(Ok(outcomes))) => outcomes,
            };
            let now = Utc::now();
            for (msg, outcome) in call.into_iter().zip(outcomes) {
                match outcome {
                    PublishOutcome::Published => {
                        if let Ok(latency) = (now - msg.created_at).to_std() {
                            metrics::histogram!(m::COMMIT_TO_PUBLISH).record(latency.as_secs_f64());
                        }
                        settlement.published.push(msg.id);
                    }
                    PublishOutcome::Failed(_) if msg.key.as_ref().is_some_and(|k| blocked.contains(k)) => {
                        // An earlier message of this key failed in this batch, and an ordered
                        // publisher failed this one for that reason: not an attempt of its own.
                        settlement.release.push(msg.id);
                    }
                    PublishOutcome::Failed(err) => {
                        if let Some(key) = &msg.key {
                            blocked.insert(key.clone());
                        }
                        let error = chain(&err);
                        let attempts = msg.attempts.saturating_add(1);
                        match config.retry.decide(attempts, err.is_transient()) {
                            Decision::Retry(delay) => {
                                debug!(id = %msg.id, attempts, ?delay, %error, "publish failed; retrying later");
                                settlement.retry.push(Retry { id: msg.id, delay, error });
                            }
                            Decision::DeadLetter => {
                                warn!(id = %msg.id, attempts, %error, "dead-lettering message");
                                settlement.dead.push(DeadLetterTo { id: msg.id, error });
                            }
                        }
                    }
                }
            }
        }

        report.published = settlement.published.len();
        report.retried = settlement.retry.len();
        report.dead_lettered = settlement.dead.len();
        report.released = settlement.release.len();
        report.fenced = settle(inner, token, &settlement, lease_end).await;
        metrics::counter!(m::PUBLISHED).increment(report.published as u64);
        metrics::counter!(m::RETRIED).increment(report.retried as u64);
        metrics::counter!(m::DEAD_LETTERED).increment(report.dead_lettered as u64);
        metrics::counter!(m::RELEASED).increment(report.released as u64);
        metrics::counter!(m::FENCED).increment(report.fenced);
        debug!(?report, "batch settled");
        report
    }
    .instrument(span)
    .await
}

/// Records a settlement, retrying transient store failures until the lease ends (after that the
/// store would refuse it anyway). Returns how many outcomes were not recorded.
async fn settle<S: Store, P: Publisher>(
    inner: &Inner<S, P>,
    token: crate::LeaseToken,
    settlement: &Settlement,
    lease_end: Instant,
) -> u64 {
    if settlement.is_empty() {
        return 0;
    }
    let mut backoff = Duration::from_millis(50);
    loop {
        match inner.bounded(inner.store.settle(token, settlement)).await {
            Ok(settled) => {
                if settled.fenced > 0 {
                    warn!(
                        fenced = settled.fenced,
                        "lease expired before the outcomes were recorded; those messages will be published again"
                    );
                }
                return settled.fenced;
            }
            Err(err) => {
                metrics::counter!(m::STORE_ERRORS).increment(1);
                if !err.is_transient() || Instant::now() + backoff >= lease_end {
                    warn!(error = %chain(&err), "could not record outcomes; the messages will be published again after their lease");
                    return settlement.len() as u64;
                }
                warn!(error = %chain(&err), "could not record outcomes; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn clone_error(err: &PublishError) -> PublishError {
    let text = chain(err);
    if err.is_transient() {
        PublishError::transient(text)
    } else {
        PublishError::permanent(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> RelayMember {
        RelayMember {
            id: RelayId::new(id),
            expires_at: Utc::now(),
            partitions: Vec::new(),
        }
    }

    #[test]
    fn rendezvous_spreads_partitions_and_moves_few_on_join() {
        let two = [member("a"), member("b")];
        let three = [member("a"), member("b"), member("c")];
        let share = |relays: &[RelayMember], id: &str| {
            (0..PARTITIONS)
                .filter(|p| owner_of(*p, relays).map(RelayId::as_str) == Some(id))
                .count()
        };
        for id in ["a", "b"] {
            let n = share(&two, id);
            assert!((20..=44).contains(&n), "{id} owns {n} of 64");
        }
        for id in ["a", "b", "c"] {
            let n = share(&three, id);
            assert!((10..=34).contains(&n), "{id} owns {n} of 64");
        }
        // Joining moves partitions only to the newcomer.
        for p in 0..PARTITIONS {
            let before = owner_of(p, &two);
            let after = owner_of(p, &three);
            assert!(before == after || after.map(RelayId::as_str) == Some("c"));
        }
    }

    #[test]
    fn calls_carry_one_message_per_key_unless_ordered() {
        let msg = |key: Option<&str>| {
            let mut new = crate::NewMessage::new("t", Vec::new());
            if let Some(key) = key {
                new = new.key(key);
            }
            Message::new(new, Utc::now())
        };
        let batch = vec![
            msg(Some("a")),
            msg(Some("a")),
            msg(None),
            msg(Some("b")),
            msg(None),
            msg(Some("a")),
        ];
        let (call, rest) = next_call(batch.clone(), false);
        assert_eq!(call.len(), 4);
        assert_eq!(rest.len(), 2);
        assert_eq!(call[0].id, batch[0].id);
        assert_eq!(rest[0].id, batch[1].id);
        let (call, rest) = next_call(batch, true);
        assert_eq!((call.len(), rest.len()), (6, 0));
    }
}
