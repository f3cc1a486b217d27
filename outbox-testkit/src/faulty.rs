//! [`FaultyStore`]: a store wrapper whose calls fail, stall or never answer on cue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use outbox_core::{
    Claim, DeadLetter, DeadLetterFilter, LeaseToken, RelayId, RelayMember, Settled, Settlement,
    Stats, Store, StoreError, StoreErrorKind, Wakeup,
};

/// Wraps a store; [`FaultyStore::fail_settles`] makes the next settle calls fail with a
/// transient connection error, [`FaultyStore::delay_settles`] makes them wait first (for
/// example past the lease), [`FaultyStore::hang_calls`] makes the next calls never answer.
/// Everything else goes straight through.
#[derive(Clone, Debug)]
pub struct FaultyStore<S> {
    inner: S,
    failing: Arc<AtomicU32>,
    delay_ms: Arc<AtomicU64>,
    hanging: Arc<AtomicU32>,
    hung: Arc<AtomicU32>,
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
        }
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
        self.maybe_hang().await;
        self.inner.claim(relay, limit, lease).await
    }

    async fn settle(
        &self,
        token: LeaseToken,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
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
        self.maybe_hang().await;
        self.inner.heartbeat(relay, ttl).await
    }

    async fn acquire(
        &self,
        relay: &RelayId,
        partitions: &[u16],
        ttl: Duration,
    ) -> Result<Vec<u16>, StoreError> {
        self.maybe_hang().await;
        self.inner.acquire(relay, partitions, ttl).await
    }

    async fn release(&self, relay: &RelayId, partitions: &[u16]) -> Result<(), StoreError> {
        self.inner.release(relay, partitions).await
    }

    async fn leave(&self, relay: &RelayId) -> Result<(), StoreError> {
        self.inner.leave(relay).await
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        self.inner.stats().await
    }

    async fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.dead_letters(filter).await
    }

    async fn replay(&self, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        self.inner.replay(filter).await
    }

    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        self.inner.purge(filter).await
    }

    async fn cleanup(&self, limit: usize) -> Result<u64, StoreError> {
        self.inner.cleanup(limit).await
    }

    async fn listen(&self, wakeup: Wakeup) -> Result<(), StoreError> {
        self.inner.listen(wakeup).await
    }
}
