//! Commit-to-ack latency at a steady rate: producers commit one message per transaction on
//! PostgreSQL, and a contender hears of them through LISTEN/NOTIFY and publishes them: the
//! relay (no in-process wake-up), then, on a table of its own at the same rate, a hand relay
//! of one worker that also looks every 10 ms. Each message's latency runs from its commit
//! returning to the producer to the publisher reporting it acknowledged by the broker, both on
//! this process's monotonic clock; the breakdown places its claim and its publish call in
//! between.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
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
use crate::hand::HandRelay;
use crate::report::Report;
use crate::services::Services;
use crate::stores::{BenchStore, StoreKind};
use crate::timing::{Observer, TimedStore};
use crate::workload::{self, Keys};
use crate::{Options, Res, Scenario, cpu};

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

/// What relays the messages of a latency run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    /// The relay, with its defaults.
    Relay,
    /// The hand relay, on one worker.
    Hand,
    /// The log relay, reading the table's inserts from a replication slot (the server must
    /// have `wal_level = logical`).
    Log,
}

#[derive(Default)]
struct Stamp {
    committed: Option<Instant>,
    /// When the claim that took it started and returned.
    claimed: Option<(Instant, Instant)>,
    /// When the publish call that carried it started and returned.
    published: Option<(Instant, Instant)>,
    measured: bool,
}

/// Histograms in microseconds: per message, and per settle call.
struct Hists {
    total: Histogram<u64>,
    to_claim: Histogram<u64>,
    claim: Histogram<u64>,
    claim_to_call: Histogram<u64>,
    to_call: Histogram<u64>,
    call: Histogram<u64>,
    settle: Histogram<u64>,
}

/// Commit, claim and ack instants of every message, and the histograms of the ones committed
/// past the warm-up.
struct Stamps {
    stamps: Mutex<HashMap<MessageId, Stamp>>,
    hists: Mutex<Hists>,
    /// Set when the producers start.
    measure_from: OnceLock<Instant>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Stamps {
    fn new() -> Res<Self> {
        let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3);
        Ok(Self {
            stamps: Mutex::new(HashMap::new()),
            hists: Mutex::new(Hists {
                total: hist()?,
                to_claim: hist()?,
                claim: hist()?,
                claim_to_call: hist()?,
                to_call: hist()?,
                call: hist()?,
                settle: hist()?,
            }),
            measure_from: OnceLock::new(),
        })
    }

    fn update(&self, id: MessageId, change: impl FnOnce(&mut Stamp)) {
        let mut stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        let stamp = stamps.entry(id).or_default();
        change(stamp);
        let (Some(committed), Some((start, end)), false) =
            (stamp.committed, stamp.published, stamp.measured)
        else {
            return;
        };
        stamp.measured = true;
        if self.measure_from.get().is_none_or(|from| committed < *from) {
            return;
        }
        let mut hists = self.hists.lock().unwrap_or_else(PoisonError::into_inner);
        let since =
            |later: Instant, earlier: Instant| micros(later.saturating_duration_since(earlier));
        let _ = hists.total.record(since(end, committed));
        let _ = hists.to_call.record(since(start, committed));
        let _ = hists.call.record(since(end, start));
        if let Some((claim_start, claim_end)) = stamp.claimed {
            let _ = hists.to_claim.record(since(claim_start, committed));
            let _ = hists.claim.record(since(claim_end, claim_start));
            let _ = hists.claim_to_call.record(since(start, claim_end));
        }
    }

    fn measured(&self) -> usize {
        let stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        stamps.values().filter(|s| s.measured).count()
    }
}

impl Observer for Stamps {
    fn claimed(&self, ids: &[MessageId], started: Instant, returned: Instant) {
        for id in ids {
            self.update(*id, |s| s.claimed = Some((started, returned)));
        }
    }

    fn settled(&self, took: Duration) {
        if self.measure_from.get().is_some() {
            let mut hists = self.hists.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = hists.settle.record(micros(took));
        }
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
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p95_ms": ms(h.value_at_quantile(0.95)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
    })
}

/// `a / b` to two decimals, when both are there.
fn ratio(a: &serde_json::Value, b: &serde_json::Value) -> serde_json::Value {
    match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!((a / b * 100.0).round() / 100.0),
        _ => json!(null),
    }
}

async fn measure(
    options: &Options,
    services: &Services,
    broker_kind: BrokerKind,
) -> Res<serde_json::Value> {
    let name = unique_name("bench_latency");
    let broker = Broker::setup(broker_kind, services, &name).await?;
    let result = async {
        let relay = contender_run(options, services, &broker, &name, Contender::Relay).await?;
        let hand = contender_run(
            options,
            services,
            &broker,
            &format!("{name}_hand"),
            Contender::Hand,
        )
        .await?;
        Ok::<_, crate::BoxError>((relay, hand))
    }
    .await;
    broker.teardown().await;
    let (mut value, hand) = result?;
    value["pair"] = json!(format!("postgres-{}", broker_kind.name()));
    value["p50_vs_hand"] = ratio(&value["p50_ms"], &hand["p50_ms"]);
    value["p99_vs_hand"] = ratio(&value["p99_ms"], &hand["p99_ms"]);
    value["hand"] = hand;
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

/// The log relay against the polling relay at the same steady rate, in the same run, each on
/// a table of its own, on the PostgreSQL of `services` (with `wal_level = logical`).
pub(crate) async fn log_vs_polling(
    options: &Options,
    services: &Services,
    broker_kind: BrokerKind,
) -> Res<serde_json::Value> {
    let name = unique_name("bench_loglat");
    let broker = Broker::setup(broker_kind, services, &name).await?;
    let result = async {
        let log = contender_run(options, services, &broker, &name, Contender::Log).await?;
        let polling = contender_run(
            options,
            services,
            &broker,
            &format!("{name}_poll"),
            Contender::Relay,
        )
        .await?;
        Ok::<_, crate::BoxError>((log, polling))
    }
    .await;
    broker.teardown().await;
    let (log, polling) = result?;
    let met =
        log["p50_ms"].as_f64().unwrap_or(f64::MAX) < polling["p50_ms"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "pair": format!("postgres-{}", broker_kind.name()),
        "rate_msgs_per_s": log["rate_msgs_per_s"],
        "log_p50_ms": log["p50_ms"],
        "log_p99_ms": log["p99_ms"],
        "polling_p50_ms": polling["p50_ms"],
        "polling_p99_ms": polling["p99_ms"],
        "p50_log_vs_polling": ratio(&log["p50_ms"], &polling["p50_ms"]),
        "p99_log_vs_polling": ratio(&log["p99_ms"], &polling["p99_ms"]),
        "target": "log p50 below the polling relay's",
        "met": met,
        "log": log,
        "polling": polling,
    }))
}

/// One contender's run on table `table` of its own.
async fn contender_run(
    options: &Options,
    services: &Services,
    broker: &Broker,
    table: &str,
    contender: Contender,
) -> Res<serde_json::Value> {
    let store = BenchStore::create(StoreKind::Postgres, services, table, 8).await?;
    let result = run_steady(options, services, &store, broker, contender).await;
    store.drop_all().await;
    result
}

/// A contender relaying in a task of its own.
enum Running {
    Relay {
        stop: tokio::sync::oneshot::Sender<()>,
        running: tokio::task::JoinHandle<Result<(), outbox_core::RelayError>>,
        store: TimedStore,
    },
    Hand {
        stop: tokio::sync::oneshot::Sender<()>,
        running: tokio::task::JoinHandle<Res<()>>,
    },
    Log {
        stop: tokio::sync::oneshot::Sender<()>,
        running: tokio::task::JoinHandle<Result<(), outbox_core::RelayError>>,
        admin: outbox_pg_cdc::CdcAdmin,
    },
}

impl Running {
    async fn start(
        contender: Contender,
        services: &Services,
        store: &BenchStore,
        publisher: Timed,
        stamps: &Arc<Stamps>,
    ) -> Res<Self> {
        let config = RelayConfig::default();
        let observer: Arc<dyn Observer> = Arc::clone(stamps) as Arc<dyn Observer>;
        Ok(match contender {
            Contender::Relay => {
                let timed_store = TimedStore::new(store.dyn_store()).observed(observer);
                let relay = Relay::builder(timed_store.clone(), publisher)
                    .config(config)
                    .build()?;
                let (stop, running) = crate::drain::spawn_relay(relay);
                Running::Relay {
                    stop,
                    running,
                    store: timed_store,
                }
            }
            Contender::Hand => {
                let hand = HandRelay::new(store, Arc::new(publisher), config.batch_size)?
                    .observed(observer);
                let (stop, stopped) = tokio::sync::oneshot::channel();
                // The table's trigger notifies on the store's channel: the table's name.
                let running = tokio::spawn(Arc::new(hand).follow(store.table.clone(), stopped));
                Running::Hand { stop, running }
            }
            Contender::Log => {
                let (relay, admin) =
                    crate::logrelay::log_relay(services, store, publisher, config).await?;
                let (stop, running) = crate::logrelay::spawn_log(relay);
                Running::Log {
                    stop,
                    running,
                    admin,
                }
            }
        })
    }

    /// Stops the contender; the relay's claim and settle timings over `over`, if it is the
    /// relay.
    async fn stop(self, over: Duration) -> Res<Option<serde_json::Value>> {
        match self {
            Running::Relay {
                stop,
                running,
                store,
            } => {
                let _ = stop.send(());
                running.await??;
                Ok(Some(store.report(over)))
            }
            Running::Hand { stop, running } => {
                let _ = stop.send(());
                running.await??;
                Ok(None)
            }
            Running::Log {
                stop,
                running,
                admin,
            } => {
                let _ = stop.send(());
                let ran = running.await;
                crate::logrelay::drop_slot(&admin).await;
                ran??;
                Ok(None)
            }
        }
    }
}

async fn run_steady(
    options: &Options,
    services: &Services,
    store: &BenchStore,
    broker: &Broker,
    contender: Contender,
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

    let stamps = Arc::new(Stamps::new()?);
    let publisher = Timed {
        inner: broker.publisher(0, options.pipeline_keys).await?,
        stamps: Arc::clone(&stamps),
    };
    let running = Running::start(contender, services, store, publisher, &stamps).await?;
    // Let the contender start listening.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let load = cpu::load();
    let cpu0 = cpu::sample(&[]);
    let started = Instant::now();
    let _ = stamps.measure_from.set(started + warmup);
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(16));
    let keys = Keys::one_per_message();
    let produced: Res<()> = async {
        for seq in 0..total {
            ticker.tick().await;
            let permit = Arc::clone(&in_flight).acquire_owned().await?;
            let (producers, stamps) = (producers.clone(), Arc::clone(&stamps));
            let msg: NewMessage = workload::message(&destination, seq, keys);
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
        Ok(())
    }
    .await;
    let produced_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while produced.is_ok() && stamps.measured() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cores = cpu::sample(&[]).cores_since(&cpu0);
    let store_calls = running.stop(produced_in).await;
    producers.pool().close().await;
    produced?;
    let store_calls = store_calls?;
    let acked = stamps.measured();
    if acked < total as usize {
        return Err(format!("{acked} of {total} messages acknowledged").into());
    }

    let hists = stamps.hists.lock().unwrap_or_else(PoisonError::into_inner);
    let total_h = &hists.total;
    let mut value = summary(total_h);
    value["contender"] = json!(match contender {
        Contender::Relay => "relay",
        Contender::Hand => "hand relay, 1 worker",
        Contender::Log => "log relay",
    });
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
    // Where a message's time goes: from its commit to the start of the claim that took it,
    // that claim, on to the publish call (the relay: the batch waiting its turn), the call up
    // to the broker's ack; then, after the ack and outside the latency, the settle (the hand
    // relay: its COMMIT), per call.
    value["breakdown"] = json!({
        "commit_to_claim": summary(&hists.to_claim),
        "claim": summary(&hists.claim),
        "claim_to_publish_call": summary(&hists.claim_to_call),
        "publish_call": summary(&hists.call),
        "settle": summary(&hists.settle),
    });
    value["commit_to_publish_call"] = summary(&hists.to_call);
    value["publish_call"] = summary(&hists.call);
    if let Some(store_calls) = store_calls {
        value["store_calls"] = store_calls;
    }
    value["batch_size"] = json!(RelayConfig::default().batch_size);
    value["kafka_linger_ms"] = json!(if broker.kind == BrokerKind::Kafka {
        Some(0)
    } else {
        None
    });
    value["cpu_cores"] = json!(cores);
    value["load_before"] = json!(load);
    Ok(value)
}
