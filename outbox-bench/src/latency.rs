//! Commit-to-ack latency at a steady rate: producers commit one message per transaction on
//! PostgreSQL; the relay hears of them through LISTEN/NOTIFY only (no in-process wake-up) and
//! publishes them. Each message's latency runs from its commit returning to the producer to
//! the publisher reporting it acknowledged by the broker, both on this process's monotonic
//! clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use outbox_core::{
    Capabilities, DynPublisher, Message, MessageId, NewMessage, PublishError, PublishOutcome,
    Publisher, Relay, RelayConfig,
};
use outbox_sqlx::{PostgresStore, StoreConfig};
use outbox_testkit::env::unique_name;
use serde_json::json;

use crate::brokers::{Broker, BrokerKind};
use crate::report::Report;
use crate::services::Services;
use crate::stores::{BenchStore, StoreKind};
use crate::{Options, Res, Scenario, cpu, workload};

/// Targets of PostgreSQL to NATS, in milliseconds: (p50, p99).
const NATS_TARGET_MS: (f64, f64) = (0.35, 0.7);

/// Quantiles kept for the plot.
pub(crate) const QUANTILES: [f64; 8] = [0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999];

pub(crate) async fn run(options: &Options, services: &Services, report: &mut Report) {
    for broker in [BrokerKind::Nats, BrokerKind::Kafka] {
        let label = format!("postgres-{}", broker.name());
        let outcome = measure(options, services, broker).await;
        report.outcome(Scenario::Latency, &label, outcome);
    }
}

#[derive(Default)]
struct Stamp {
    committed: Option<Instant>,
    /// When the publish call that carried it started and returned.
    published: Option<(Instant, Instant)>,
    measured: bool,
}

struct Hists {
    total: Histogram<u64>,
    to_call: Histogram<u64>,
    call: Histogram<u64>,
}

/// Commit and ack instants of every message, and the histograms (microseconds) of the ones
/// past the warm-up.
struct Stamps {
    stamps: Mutex<HashMap<MessageId, Stamp>>,
    hists: Mutex<Hists>,
    measure_from: Instant,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Stamps {
    fn new(measure_from: Instant) -> Res<Self> {
        let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3);
        Ok(Self {
            stamps: Mutex::new(HashMap::new()),
            hists: Mutex::new(Hists {
                total: hist()?,
                to_call: hist()?,
                call: hist()?,
            }),
            measure_from,
        })
    }

    fn update(&self, id: MessageId, change: impl FnOnce(&mut Stamp)) {
        let mut stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        let stamp = stamps.entry(id).or_default();
        change(stamp);
        if let (Some(committed), Some((start, end)), false) =
            (stamp.committed, stamp.published, stamp.measured)
        {
            stamp.measured = true;
            if committed >= self.measure_from {
                let mut hists = self.hists.lock().unwrap_or_else(PoisonError::into_inner);
                let _ = hists
                    .total
                    .record(micros(end.saturating_duration_since(committed)));
                let _ = hists
                    .to_call
                    .record(micros(start.saturating_duration_since(committed)));
                let _ = hists
                    .call
                    .record(micros(end.saturating_duration_since(start)));
            }
        }
    }

    fn measured(&self) -> usize {
        let stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        stamps.values().filter(|s| s.measured).count()
    }
}

/// The publisher under test, noting when each message was acknowledged.
struct Timed {
    inner: Arc<dyn DynPublisher>,
    stamps: Arc<Stamps>,
}

impl Publisher for Timed {
    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        let start = Instant::now();
        let outcomes = self.inner.publish(batch).await?;
        let end = Instant::now();
        for (msg, outcome) in batch.iter().zip(&outcomes) {
            if outcome.is_published() {
                self.stamps
                    .update(msg.id, |s| s.published = Some((start, end)));
            }
        }
        Ok(outcomes)
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn check(&self) -> Result<(), PublishError> {
        self.inner.check().await
    }

    async fn flush(&self) -> Result<(), PublishError> {
        self.inner.flush().await
    }
}

fn ms(micros: u64) -> f64 {
    (micros as f64 / 10.0).round() / 100.0
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p95_ms": ms(h.value_at_quantile(0.95)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
    })
}

async fn measure(
    options: &Options,
    services: &Services,
    broker_kind: BrokerKind,
) -> Res<serde_json::Value> {
    let name = unique_name("bench_latency");
    let store = BenchStore::create(StoreKind::Postgres, services, &name, 8).await?;
    let broker = match Broker::setup(broker_kind, services, &name).await {
        Ok(broker) => broker,
        Err(err) => {
            store.drop_all().await;
            return Err(err);
        }
    };
    let result = run_steady(options, services, &store, &broker).await;
    broker.teardown().await;
    store.drop_all().await;
    let mut value = result?;
    value["pair"] = json!(format!("postgres-{}", broker_kind.name()));
    if broker_kind == BrokerKind::Nats {
        let (p50, p99) = NATS_TARGET_MS;
        value["target_p50_ms"] = json!(p50);
        value["target_p99_ms"] = json!(p99);
        value["met"] = json!(
            value["p50_ms"].as_f64().unwrap_or(f64::MAX) <= p50
                && value["p99_ms"].as_f64().unwrap_or(f64::MAX) <= p99
        );
    }
    Ok(value)
}

async fn run_steady(
    options: &Options,
    services: &Services,
    store: &BenchStore,
    broker: &Broker,
) -> Res<serde_json::Value> {
    let rate = options.rate.max(1);
    let duration = options.latency_duration();
    let warmup = Duration::from_secs(1);
    let total = rate * (duration + warmup).as_millis() as u64 / 1000;
    let destination = broker.destination();
    // Producers have a pool of their own, as a service would.
    let producers = PostgresStore::connect(
        StoreConfig::new()
            .url(services.postgres.as_str())
            .table(store.table.as_str())
            .max_connections(16),
    )
    .await?;

    let started = Instant::now();
    let stamps = Arc::new(Stamps::new(started + warmup)?);
    let publisher = Timed {
        inner: broker.publisher(0).await?,
        stamps: Arc::clone(&stamps),
    };
    let timed_store = crate::timing::TimedStore::new(store.dyn_store());
    let relay = Relay::builder(timed_store.clone(), publisher)
        .config(RelayConfig::default())
        .build()?;
    let (stop, running) = crate::drain::spawn_relay(relay);
    // Let the relay start listening.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let load = cpu::load();
    let cpu0 = cpu::sample(&[]);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(16));
    for seq in 0..total {
        ticker.tick().await;
        let permit = Arc::clone(&in_flight).acquire_owned().await?;
        let (producers, stamps) = (producers.clone(), Arc::clone(&stamps));
        let msg: NewMessage = workload::message(&destination, seq, u64::MAX);
        tasks.spawn(async move {
            let id = msg.id();
            let mut tx = producers.pool().begin().await?;
            producers.enqueue(&mut *tx, msg).await?;
            tx.commit().await?;
            let committed = Instant::now();
            stamps.update(id, |s| s.committed = Some(committed));
            drop(permit);
            Ok::<(), crate::BoxError>(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let produced_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stamps.measured() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cores = cpu::sample(&[]).cores_since(&cpu0);
    let _ = stop.send(());
    running.await??;
    producers.pool().close().await;
    let acked = stamps.measured();
    if acked < total as usize {
        return Err(format!("{acked} of {total} messages acknowledged").into());
    }

    let hists = stamps.hists.lock().unwrap_or_else(PoisonError::into_inner);
    let total_h = &hists.total;
    let mut value = summary(total_h);
    value["measured"] = json!(total_h.len());
    value["rate_msgs_per_s"] = json!(rate);
    value["achieved_msgs_per_s"] = json!((total as f64 / produced_in.as_secs_f64()).round());
    value["secs"] = json!(duration.as_secs_f64());
    value["mean_ms"] = json!((total_h.mean() / 10.0).round() / 100.0);
    value["quantiles_ms"] = json!(
        QUANTILES
            .iter()
            .map(|q| json!([q, ms(total_h.value_at_quantile(*q))]))
            .collect::<Vec<_>>()
    );
    value["commit_to_publish_call"] = summary(&hists.to_call);
    value["publish_call"] = summary(&hists.call);
    value["store_calls"] = timed_store.report(produced_in);
    value["kafka_linger_ms"] = json!(if broker.kind == BrokerKind::Kafka {
        Some(0)
    } else {
        None
    });
    value["cpu_cores"] = json!(cores);
    value["load_before"] = json!(load);
    Ok(value)
}
