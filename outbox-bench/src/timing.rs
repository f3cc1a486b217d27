//! A store wrapper that times claims and settles: how long the relay's serial claims take,
//! and how busy they keep it, tells whether the database limits a figure. An observer may
//! follow each call too, to place every message's claim on its way from commit to ack.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use outbox_core::{
    Claim, DeadLetter, DeadLetterFilter, DynStore, LeaseToken, MessageId, RelayId, RelayMember,
    Settled, Settlement, Stats, Store, StoreError, Wakeup,
};
use serde_json::json;

/// Durations of claims that returned messages, of empty claims, and of settles (µs).
pub(crate) struct Timings {
    claims: Histogram<u64>,
    empty_claims: Histogram<u64>,
    settles: Histogram<u64>,
}

impl Timings {
    fn new() -> Self {
        let hist = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        Self {
            claims: hist(),
            empty_claims: hist(),
            settles: hist(),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn ms(micros: f64) -> f64 {
    (micros / 10.0).round() / 100.0
}

fn summary(h: &Histogram<u64>, over: Duration) -> serde_json::Value {
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5) as f64),
        "p99_ms": ms(h.value_at_quantile(0.99) as f64),
        "mean_ms": ms(h.mean()),
        // Share of the wall time spent in these calls, summed (above 1 when they overlap).
        "busy": ((h.mean() * h.len() as f64 / 1e6 / over.as_secs_f64().max(1e-9)) * 100.0).round() / 100.0,
    })
}

/// Follows the claims and settles of a relay.
pub(crate) trait Observer: Send + Sync + 'static {
    /// A claim that returned messages `ids`: when the call started and when it returned.
    fn claimed(&self, ids: &[MessageId], started: Instant, returned: Instant);
    /// A settle call and how long it took.
    fn settled(&self, took: Duration);
}

/// A store that times what the relay asks of it.
#[derive(Clone)]
pub(crate) struct TimedStore {
    inner: Arc<dyn DynStore>,
    timings: Arc<Mutex<Timings>>,
    observer: Option<Arc<dyn Observer>>,
}

impl TimedStore {
    pub(crate) fn new(inner: Arc<dyn DynStore>) -> Self {
        Self {
            inner,
            timings: Arc::new(Mutex::new(Timings::new())),
            observer: None,
        }
    }

    /// The same store, telling `observer` of every claim and settle.
    pub(crate) fn observed(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Claim and settle durations over a run of `over`.
    pub(crate) fn report(&self, over: Duration) -> serde_json::Value {
        let t = self.timings.lock().unwrap_or_else(PoisonError::into_inner);
        json!({
            "claims": summary(&t.claims, over),
            "empty_claims": summary(&t.empty_claims, over),
            "settles": summary(&t.settles, over),
        })
    }

    fn record(&self, pick: impl FnOnce(&mut Timings) -> &mut Histogram<u64>, took: Duration) {
        let mut t = self.timings.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = pick(&mut t).record(micros(took));
    }
}

impl Store for TimedStore {
    async fn claim(
        &self,
        relay: &RelayId,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let started = Instant::now();
        let claim = self.inner.claim(relay, limit, lease).await?;
        let returned = Instant::now();
        let took = returned.duration_since(started);
        if claim.is_empty() {
            self.record(|t| &mut t.empty_claims, took);
        } else {
            self.record(|t| &mut t.claims, took);
            if let Some(observer) = &self.observer {
                let ids: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
                observer.claimed(&ids, started, returned);
            }
        }
        Ok(claim)
    }

    async fn settle(
        &self,
        token: LeaseToken,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        let started = Instant::now();
        let settled = self.inner.settle(token, settlement).await?;
        let took = started.elapsed();
        self.record(|t| &mut t.settles, took);
        if let Some(observer) = &self.observer {
            observer.settled(took);
        }
        Ok(settled)
    }

    async fn heartbeat(
        &self,
        relay: &RelayId,
        ttl: Duration,
    ) -> Result<Vec<RelayMember>, StoreError> {
        self.inner.heartbeat(relay, ttl).await
    }

    async fn members(&self) -> Result<Vec<RelayMember>, StoreError> {
        self.inner.members().await
    }

    async fn acquire(
        &self,
        relay: &RelayId,
        partitions: &[u16],
        ttl: Duration,
    ) -> Result<Vec<u16>, StoreError> {
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
