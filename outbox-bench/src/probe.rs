//! A metrics recorder that keeps the few relay metrics the bench reads: how many messages were
//! published (to know when a drain is done without polling the database), the batch sizes and
//! the duration of publish calls (to tell where time goes).

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use outbox_core::metrics as m;

/// Count and sum of a histogram's samples.
#[derive(Debug, Default)]
pub(crate) struct SumCount {
    count: AtomicU64,
    /// Sum in millionths of the unit.
    micros: AtomicU64,
}

impl HistogramFn for SumCount {
    fn record(&self, value: f64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        // Saturating float to integer conversion is what `as` does.
        self.micros
            .fetch_add((value * 1e6).max(0.0) as u64, Ordering::Relaxed);
    }
}

impl SumCount {
    fn read(&self) -> (u64, f64) {
        (
            self.count.load(Ordering::Relaxed),
            self.micros.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

#[derive(Debug, Default)]
struct Probes {
    published: Arc<AtomicU64>,
    batch_size: Arc<SumCount>,
    publish_duration: Arc<SumCount>,
}

static PROBES: OnceLock<Probes> = OnceLock::new();

struct BenchRecorder;

impl Recorder for BenchRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match PROBES.get() {
            Some(probes) if key.name() == m::PUBLISHED => {
                Counter::from_arc(Arc::clone(&probes.published))
            }
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match PROBES.get() {
            Some(probes) if key.name() == m::BATCH_SIZE => {
                Histogram::from_arc(Arc::clone(&probes.batch_size))
            }
            Some(probes) if key.name() == m::PUBLISH_DURATION => {
                Histogram::from_arc(Arc::clone(&probes.publish_duration))
            }
            _ => Histogram::noop(),
        }
    }
}

/// Installs the recorder (once per process).
pub(crate) fn install() {
    if PROBES.set(Probes::default()).is_ok() {
        let _ = metrics::set_global_recorder(BenchRecorder);
    }
}

/// The probes at one instant; differences of two give what happened in between.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Reading {
    pub(crate) published: u64,
    pub(crate) batches: u64,
    pub(crate) batched: f64,
    pub(crate) calls: u64,
    pub(crate) call_secs: f64,
}

impl Reading {
    pub(crate) fn now() -> Self {
        let Some(probes) = PROBES.get() else {
            return Self::default();
        };
        let (batches, batched) = probes.batch_size.read();
        let (calls, call_secs) = probes.publish_duration.read();
        Self {
            published: probes.published.load(Ordering::Relaxed),
            batches,
            batched,
            calls,
            call_secs,
        }
    }

    /// What happened since `earlier`: (published, mean batch size, publish calls, mean call ms).
    pub(crate) fn since(&self, earlier: &Reading) -> Delta {
        let batches = self.batches - earlier.batches;
        let calls = self.calls - earlier.calls;
        Delta {
            published: self.published - earlier.published,
            mean_batch: if batches == 0 {
                0.0
            } else {
                (self.batched - earlier.batched) / batches as f64
            },
            calls,
            mean_call_ms: if calls == 0 {
                0.0
            } else {
                (self.call_secs - earlier.call_secs) * 1e3 / calls as f64
            },
        }
    }
}

/// Relay metrics over a stretch of time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Delta {
    pub(crate) published: u64,
    pub(crate) mean_batch: f64,
    pub(crate) calls: u64,
    pub(crate) mean_call_ms: f64,
}

/// Messages published by relays of this process so far.
pub(crate) fn published() -> u64 {
    PROBES
        .get()
        .map_or(0, |probes| probes.published.load(Ordering::Relaxed))
}
