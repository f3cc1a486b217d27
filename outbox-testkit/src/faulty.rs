//! [`FaultyStore`]: a store wrapper whose calls fail, stall or never answer on cue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use outbox_core::{
    Claim, DeadLetter, DeadLetterFilter, LeaseToken, RelayId, RelayMember, Settled, Settlement,
    Stats, Store, StoreError, StoreErrorKind, Wakeup,
};

/// Wraps a store; [`FaultyStore::fail_settles`] makes the next settle calls fail with a
/// transient connection error, [`FaultyStore::delay_settles`] makes them wait first (for
/// example past the lease), [`FaultyStore::hang_calls`] makes the next calls never answer,
/// [`FaultyStore::set_down`] fails every call as an unreachable database would and
/// [`FaultyStore::hang_all`] makes every call hang as a black-holed one would. Everything else
/// goes straight through.
#[derive(Clone, Debug)]
pub struct FaultyStore<S> {
    inner: S,
    failing: Arc<AtomicU32>,
    delay_ms: Arc<AtomicU64>,
    hanging: Arc<AtomicU32>,
    hung: Arc<AtomicU32>,
    down: Arc<AtomicBool>,
    hang_all: Arc<AtomicBool>,
}

impl<S: Store + Clone> FaultyStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            failing: Arc::default(),
            delay_ms: Arc::default(),
            hanging: Arc::default(),
            hung: Arc::default(),
            down: Arc::default(),
            hang_all: Arc::default(),
        }
    }

    /// While `down`, every call fails at once with a transient connection error, as calls to
    /// a database that refuses connections do.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// While `hang`, every call waits until dropped, as calls to a database behind a black
    /// hole do.
    pub fn hang_all(&self, hang: bool) {
        self.hang_all.store(hang, Ordering::SeqCst);
    }

    /// Fails or hangs as the outage switches say, before any call.
    async fn outage(&self) -> Result<(), StoreError> {
        if self.hang_all.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::new(
                StoreErrorKind::Connection,
                "scripted store outage: connection refused",
            ));
        }
        Ok(())
    }

    /// How many calls hung so far.
    pub fn hung(&self) -> u32 {
        self.hung.load(Ordering::SeqCst)
    }

    /// The next `calls` claim, settle, heartbeat and acquire calls, whichever come first, never
    /// answer (a server that stopped answering, a connection whose peer vanished): they wait
    /// until dropped, without reaching the wrapped store.
    pub fn hang_calls(&self, calls: u32) {
        self.hanging.store(calls, Ordering::SeqCst);
    }

    /// Waits for ever if a hung call is due.
    async fn maybe_hang(&self) {
        let due = self
            .hanging
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if due {
            self.hung.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
    }

    /// The next `calls` settle calls fail.
    pub fn fail_settles(&self, calls: u32) {
        self.failing.store(calls, Ordering::SeqCst);
    }

    /// Every settle call waits `delay` before it runs (zero turns this off).
    pub fn delay_settles(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl<S: Store + Clone> Store for FaultyStore<S> {
    async fn claim(
        &self,
        relay: &RelayId,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.outage().await?;
        self.maybe_hang().await;
        self.inner.claim(relay, limit, lease).await
    }

    async fn settle(
        &self,
        token: LeaseToken,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        self.outage().await?;
        self.maybe_hang().await;
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let failing = self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(StoreError::new(
                StoreErrorKind::Connection,
                "scripted settle failure",
            ));
        }
        self.inner.settle(token, settlement).await
    }

    async fn heartbeat(
        &self,
        relay: &RelayId,
        ttl: Duration,
    ) -> Result<Vec<RelayMember>, StoreError> {
        self.outage().await?;
        self.maybe_hang().await;
        self.inner.heartbeat(relay, ttl).await
    }

    async fn acquire(
        &self,
        relay: &RelayId,
        partitions: &[u16],
        ttl: Duration,
    ) -> Result<Vec<u16>, StoreError> {
        self.outage().await?;
        self.maybe_hang().await;
        self.inner.acquire(relay, partitions, ttl).await
    }

    async fn release(&self, relay: &RelayId, partitions: &[u16]) -> Result<(), StoreError> {
        self.outage().await?;
        self.inner.release(relay, partitions).await
    }

    async fn leave(&self, relay: &RelayId) -> Result<(), StoreError> {
        self.outage().await?;
        self.inner.leave(relay).await
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        self.outage().await?;
        self.inner.stats().await
    }

    async fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
        self.outage().await?;
        self.inner.dead_letters(filter).await
    }

    async fn replay(&self, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        self.outage().await?;
        self.inner.replay(filter).await
    }

    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        self.outage().await?;
        self.inner.purge(filter).await
    }

    async fn cleanup(&self, limit: usize) -> Result<u64, StoreError> {
        self.outage().await?;
        self.inner.cleanup(limit).await
    }

    fn max_connections(&self) -> Option<usize> {
        self.inner.max_connections()
    }

    async fn listen(&self, wakeup: Wakeup) -> Result<(), StoreError> {
        self.outage().await?;
        self.inner.listen(wakeup).await
    }
}
