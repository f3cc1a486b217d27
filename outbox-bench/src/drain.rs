//! Drain throughput: a backlog already in the outbox, relayed to a broker, next to the
//! baselines measured in the same run, each on a table of its own filled with the same
//! messages: the raw drain of the table (claim and delete, nothing published), the raw publish
//! to the broker (acks pipelined, same client crate; none for the `noop` sink), and the hand
//! relay a user would write (claim, publish with the relay's publisher, commit) on 1 worker,
//! in key order, and on 2, in no order (PostgreSQL and MariaDB).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use outbox_core::{
    DynPublisher, DynStore, Message, PublishOutcome, Publisher, Relay, RelayConfig, RelayError,
    Store,
};
use outbox_testkit::env::unique_name;
use serde_json::json;

use crate::brokers::{Broker, BrokerKind, RAW_WINDOW};
use crate::hand::HandRelay;
use crate::report::Report;
use crate::services::Services;
use crate::stores::{BenchStore, StoreKind};
use crate::timing::TimedStore;
use crate::workload::Keys;
use crate::{Options, Res, Scenario, cpu, probe};

/// The pairs measured unless `--pairs` says otherwise.
const DEFAULT_PAIRS: [&str; 6] = [
    "postgres-nats",
    "postgres-kafka",
    "postgres-amqp",
    "postgres-noop",
    "mysql-nats",
    "sqlite-nats",
];

/// Ratio of the relay's rate to the lower baseline that the project aims at, for the pairs
/// it is set for.
fn target(store: StoreKind, broker: BrokerKind) -> Option<f64> {
    (store == StoreKind::Postgres && matches!(broker, BrokerKind::Nats | BrokerKind::Kafka))
        .then_some(0.7)
}

pub(crate) async fn run(options: &Options, services: &Services, report: &mut Report) {
    let pairs: Vec<String> = if options.pairs.is_empty() {
        DEFAULT_PAIRS.iter().map(|p| p.to_string()).collect()
    } else {
        options.pairs.clone()
    };
    for pair in pairs {
        let parsed = pair
            .split_once('-')
            .and_then(|(s, b)| Some((StoreKind::parse(s)?, BrokerKind::parse(b)?)));
        let Some((store, broker)) = parsed else {
            report.error(Scenario::Drain, &pair, &format!("unknown pair {pair:?}"));
            continue;
        };
        let outcome = pair_run(options, services, store, broker).await;
        report.outcome(Scenario::Drain, &pair, outcome);
    }
}

/// The relay configuration of the throughput scenarios.
pub(crate) fn relay_config(options: &Options) -> RelayConfig {
    RelayConfig::default()
        .batch_size(options.batch_size)
        .concurrency(options.concurrency)
        .claims(options.claims)
}

/// What a relay run came to.
pub(crate) struct Run {
    pub(crate) took: Duration,
    pub(crate) delta: probe::Delta,
    pub(crate) cpu_before: cpu::Sample,
    pub(crate) cpu_after: cpu::Sample,
    /// Claim and settle durations.
    pub(crate) store_timings: serde_json::Value,
}

/// Runs a relay in this process until it has published `n` messages; returns the time it took
/// and the relay's metrics over it. Fails when the relay publishes nothing for `stall` (one
/// key's backlog goes one message per call to a publisher without per-key order, which takes
/// long but keeps going).
pub(crate) async fn relay_until(
    store: Arc<dyn DynStore>,
    publisher: Arc<dyn DynPublisher>,
    config: RelayConfig,
    n: u64,
    stall: Duration,
) -> Res<Run> {
    let store = TimedStore::new(store);
    let relay = Relay::builder(store.clone(), publisher)
        .config(config)
        .build()?;
    let before = probe::Reading::now();
    let cpu_before = cpu::sample(&[]);
    let (stop, running) = spawn_relay(relay);
    let result = until_published(&before, &running, n, stall).await;
    let cpu_after = cpu::sample(&[]);
    let delta = probe::Reading::now().since(&before);
    let _ = stop.send(());
    match running.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(format!("relay: {err}").into()),
        Err(err) => return Err(format!("relay task: {err}").into()),
    }
    let took = result?;
    Ok(Run {
        took,
        delta,
        cpu_before,
        cpu_after,
        store_timings: store.report(took),
    })
}

/// Waits until the relays of this process published `n` messages since `before`; returns
/// how long that took. Fails when nothing was published for `stall`, or when `running`
/// ended first.
pub(crate) async fn until_published<T>(
    before: &probe::Reading,
    running: &tokio::task::JoinHandle<T>,
    n: u64,
    stall: Duration,
) -> Res<Duration> {
    let started = Instant::now();
    let (mut progress, mut progressed) = (0, Instant::now());
    loop {
        let published = probe::published() - before.published;
        if published >= n {
            return Ok(started.elapsed());
        }
        if published > progress {
            (progress, progressed) = (published, Instant::now());
        }
        if progressed.elapsed() > stall {
            return Err(format!(
                "the relay published {published} of {n} messages, none in the last {stall:?}"
            )
            .into());
        }
        if running.is_finished() {
            return Err("the relay stopped".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Starts `relay.run` in a task; sending on the channel stops it gracefully.
pub(crate) fn spawn_relay<S: Store, P: Publisher>(
    relay: Relay<S, P>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), RelayError>>,
) {
    spawn_stoppable(move |stopped| async move { relay.run(stopped).await })
}

/// Starts `run` in a task with a future that completes when the returned sender sends (or
/// is dropped).
pub(crate) fn spawn_stoppable<T, F>(
    run: impl FnOnce(futures::future::BoxFuture<'static, ()>) -> F,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<T>)
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(run(Box::pin(async {
        let _ = stopped.await;
    })));
    (stop, handle)
}

/// Publishes one message through `publisher` and waits for its acknowledgement: a new
/// publisher's first delivery includes its start (Kafka: about half a second), which is not
/// what the drain measures.
pub(crate) async fn warm_up(
    publisher: &dyn DynPublisher,
    destination: &str,
    keys: Keys,
) -> Res<()> {
    let msg = Message::new(crate::workload::message(destination, 0, keys), Utc::now());
    let outcomes = publisher.publish_dyn(std::slice::from_ref(&msg)).await?;
    match outcomes.as_slice() {
        [PublishOutcome::Published] => Ok(()),
        [PublishOutcome::Failed(err)] => Err(format!("the warm-up message failed: {err}").into()),
        _ => Err("the publisher did not report one outcome for one message".into()),
    }
}

pub(crate) fn rate(n: u64, took: Duration) -> f64 {
    (n as f64 / took.as_secs_f64().max(1e-9)).round()
}

/// The tables of one pair, each filled with the same backlog.
struct Tables {
    raw: BenchStore,
    relay: BenchStore,
    /// The hand relays' (1 worker, 2 workers), on the databases they are written for.
    hand: Option<(BenchStore, BenchStore)>,
}

impl Tables {
    async fn create(kind: StoreKind, services: &Services, name: &str) -> Res<Self> {
        let mut created = Vec::new();
        let result = async {
            let hand = kind != StoreKind::Sqlite;
            for suffix in ["_raw", "", "_h1", "_h2"] {
                if suffix.starts_with("_h") && !hand {
                    continue;
                }
                let table = format!("{name}{suffix}");
                created.push(BenchStore::create(kind, services, &table, 16).await?);
            }
            Ok::<_, crate::BoxError>(())
        }
        .await;
        if let Err(err) = result {
            for store in created {
                store.drop_all().await;
            }
            return Err(err);
        }
        let mut created = created.into_iter();
        let (Some(raw), Some(relay)) = (created.next(), created.next()) else {
            return Err("no tables".into());
        };
        let hand = created.next().zip(created.next());
        Ok(Self { raw, relay, hand })
    }

    async fn drop_all(&self) {
        self.raw.drop_all().await;
        self.relay.drop_all().await;
        if let Some((one, two)) = &self.hand {
            one.drop_all().await;
            two.drop_all().await;
        }
    }
}

async fn pair_run(
    options: &Options,
    services: &Services,
    store_kind: StoreKind,
    broker_kind: BrokerKind,
) -> Res<serde_json::Value> {
    let n = options.messages();
    let keys = options.keys_for(n);
    let name = unique_name("bench_drain");
    let tables = Tables::create(store_kind, services, &name).await?;
    let broker = match Broker::setup(broker_kind, services, &name).await {
        Ok(broker) => broker,
        Err(err) => {
            tables.drop_all().await;
            return Err(err);
        }
    };
    let result = measure(options, &tables, &broker, n, keys).await;
    broker.teardown().await;
    tables.drop_all().await;
    let mut value = result?;
    value["pair"] = json!(format!("{}-{}", store_kind.name(), broker_kind.name()));
    value["store"] = json!(store_kind.name());
    value["broker"] = json!(broker_kind.name());
    if let Some(target) = target(store_kind, broker_kind) {
        value["target_ratio"] = json!(target);
        value["met"] = json!(value["ratio"].as_f64().unwrap_or(0.0) >= target);
    }
    Ok(value)
}

/// CPU µs per message of each process group, from the cores it used over `took`.
fn per_msg(
    cores: &std::collections::BTreeMap<String, f64>,
    took: Duration,
    n: u64,
) -> std::collections::BTreeMap<String, f64> {
    cores
        .iter()
        .map(|(group, c)| {
            let us = c * took.as_secs_f64() / n.max(1) as f64 * 1e6;
            (group.clone(), (us * 10.0).round() / 10.0)
        })
        .collect()
}

/// `relay / other` to three decimals.
pub(crate) fn ratio(relay: f64, other: f64) -> f64 {
    ((relay / other.max(1.0)) * 1000.0).round() / 1000.0
}

/// Checks that the destination holds `n` messages, where it can tell (the `noop` sink: that
/// it confirmed `n` more than `sink_before`).
pub(crate) async fn check_delivered(
    broker: &Broker,
    n: u64,
    sink_before: Option<u64>,
    who: &str,
) -> Res<()> {
    let stored = broker.stored().await?;
    if stored.is_some_and(|stored| stored != n) {
        return Err(
            format!("after the {who}, the broker holds {stored:?} messages, {n} expected").into(),
        );
    }
    if let (Some(before), Some(after)) = (sink_before, broker.sink_confirmed())
        && after - before != n
    {
        return Err(format!(
            "the {who} had {} messages confirmed, {n} expected",
            after - before
        )
        .into());
    }
    Ok(())
}

/// A hand relay's run: its rate and CPU.
struct HandRun {
    took: Duration,
    cores: std::collections::BTreeMap<String, f64>,
    /// Batches tried again after a deadlock (MariaDB).
    deadlocks: u64,
}

async fn hand_run(
    store: &BenchStore,
    broker: &Broker,
    publisher: &Arc<dyn DynPublisher>,
    options: &Options,
    workers: usize,
    n: u64,
) -> Res<HandRun> {
    broker.purge().await?;
    let hand = Arc::new(HandRelay::new(
        store,
        Arc::clone(publisher),
        options.batch_size,
    )?);
    let sink_before = broker.sink_confirmed();
    let cpu0 = cpu::sample(&[]);
    let started = Instant::now();
    let relayed = hand
        .clone()
        .drain(workers)
        .await
        .map_err(|err| format!("hand relay on {workers} workers: {err}"))?;
    let took = started.elapsed();
    let cores = cpu::sample(&[]).cores_since(&cpu0);
    if relayed != n {
        return Err(format!(
            "the hand relay on {workers} workers relayed {relayed} of {n} messages"
        )
        .into());
    }
    check_delivered(
        broker,
        n,
        sink_before,
        &format!("hand relay on {workers} workers"),
    )
    .await?;
    Ok(HandRun {
        took,
        cores,
        deadlocks: hand.deadlocks(),
    })
}

async fn measure(
    options: &Options,
    tables: &Tables,
    broker: &Broker,
    n: u64,
    keys: Keys,
) -> Res<serde_json::Value> {
    let destination = broker.destination();
    let store = &tables.relay;
    let copies = if tables.hand.is_some() { 4 } else { 2 };
    eprintln!(
        "  {}-{}: filling {copies} x {n} messages ({})",
        store.kind.name(),
        broker.kind.name(),
        keys.workload().name()
    );
    let fill = tables.raw.fill(&destination, n, keys).await?;
    {
        // The fills that are not measured, at once: they are the bulk of the setup.
        let mut fills = vec![store.fill(&destination, n, keys)];
        if let Some((one, two)) = &tables.hand {
            fills.push(one.fill(&destination, n, keys));
            fills.push(two.fill(&destination, n, keys));
        }
        futures::future::try_join_all(fills)
            .await
            .map_err(|err| format!("fill: {err}"))?;
    }

    // Baseline 1: the raw drain of the table.
    let cpu0 = cpu::sample(&[]);
    let started = Instant::now();
    let drained = tables
        .raw
        .raw_drain(options.batch_size)
        .await
        .map_err(|err| format!("raw drain: {err}"))?;
    let raw_drain_took = started.elapsed();
    let raw_drain_cpu = cpu::sample(&[]).cores_since(&cpu0);
    if drained != n {
        return Err(format!("raw drain took {drained} rows of {n}").into());
    }

    // Baseline 2: the raw publish to the broker, timed from a warmed client (none for the
    // no-op sink: it would time nothing).
    let raw_publish = if broker.kind == BrokerKind::Noop {
        None
    } else {
        let raw = broker.raw_publisher(keys).await?;
        let cpu0 = cpu::sample(&[]);
        let started = Instant::now();
        let confirmed = raw.publish(0..n).await;
        let took = started.elapsed();
        let cores = cpu::sample(&[]).cores_since(&cpu0);
        raw.close().await;
        let confirmed = confirmed?;
        if confirmed != n {
            return Err(format!("raw publish confirmed {confirmed} of {n}").into());
        }
        broker.purge().await?;
        Some((took, cores))
    };

    // The relay, its publisher warmed the same way.
    let publisher = broker.publisher(5, options.pipeline_keys).await?;
    warm_up(publisher.as_ref(), &destination, keys).await?;
    broker.purge().await?;
    let sink_before = broker.sink_confirmed();
    let load = cpu::load();
    let run = relay_until(
        store.dyn_store(),
        Arc::clone(&publisher),
        relay_config(options),
        n,
        Duration::from_secs(30),
    )
    .await
    .map_err(|err| format!("relay: {err}"))?;
    let (took, delta) = (run.took, run.delta);
    let relay_cpu = run.cpu_after.cores_since(&run.cpu_before);
    let pending = store.pending().await?;
    let stored = broker.stored().await?;
    check_delivered(broker, n, sink_before, "relay").await?;

    // The hand relays, with the relay's publisher.
    let (hand1, hand2) = match &tables.hand {
        Some((one, two)) => (
            Some(hand_run(one, broker, &publisher, options, 1, n).await?),
            Some(hand_run(two, broker, &publisher, options, 2, n).await?),
        ),
        None => (None, None),
    };

    let relay_rate = rate(n, took);
    let raw_drain = rate(n, raw_drain_took);
    let raw_publish_rate = raw_publish.as_ref().map(|(took, _)| rate(n, *took));
    let lower = raw_publish_rate.map_or(raw_drain, |publish| raw_drain.min(publish));
    let hand_rate = |run: &Option<HandRun>| run.as_ref().map(|r| rate(n, r.took));
    let (hand1_rate, hand2_rate) = (hand_rate(&hand1), hand_rate(&hand2));
    let hand_cpu = |run: &Option<HandRun>| run.as_ref().map(|r| per_msg(&r.cores, r.took, n));
    Ok(json!({
        "messages": n,
        "workload": keys.workload().name(),
        "pipeline_keys": options.pipeline_keys,
        "keys": keys.count(),
        "payload_bytes": crate::workload::PAYLOAD,
        "batch_size": options.batch_size,
        "concurrency": options.concurrency,
        "claims": options.claims,
        "relay_msgs_per_s": relay_rate,
        "raw_drain_msgs_per_s": raw_drain,
        "raw_publish_msgs_per_s": raw_publish_rate,
        "raw_publish_window": raw_publish.as_ref().map(|_| RAW_WINDOW),
        "hand1_msgs_per_s": hand1_rate,
        "hand2_msgs_per_s": hand2_rate,
        "lower_baseline": if raw_publish_rate.is_none_or(|publish| raw_drain <= publish) { "raw_drain" } else { "raw_publish" },
        "ratio": ratio(relay_rate, lower),
        "ratio_hand1": hand1_rate.map(|hand| ratio(relay_rate, hand)),
        "ratio_hand2": hand2_rate.map(|hand| ratio(relay_rate, hand)),
        "relay_secs": took.as_secs_f64(),
        "fill_msgs_per_s": rate(n, fill),
        "published_by_relay": delta.published,
        "mean_batch": (delta.mean_batch * 10.0).round() / 10.0,
        "publish_calls": delta.calls,
        "mean_publish_call_ms": (delta.mean_call_ms * 100.0).round() / 100.0,
        "store_calls": run.store_timings,
        "pending_after": pending,
        "broker_holds": stored,
        "cpu_cores_relay_run": relay_cpu,
        "cpu_cores_raw_drain": raw_drain_cpu,
        "cpu_cores_raw_publish": raw_publish.as_ref().map(|(_, cores)| cores),
        "hand1_deadlock_retries": hand1.as_ref().map(|r| r.deadlocks),
        "hand2_deadlock_retries": hand2.as_ref().map(|r| r.deadlocks),
        "cpu_cores_hand1": hand1.as_ref().map(|r| &r.cores),
        "cpu_cores_hand2": hand2.as_ref().map(|r| &r.cores),
        "cpu_us_per_msg_relay_run": per_msg(&relay_cpu, took, n),
        "cpu_us_per_msg_raw_drain": per_msg(&raw_drain_cpu, raw_drain_took, n),
        "cpu_us_per_msg_raw_publish": raw_publish.as_ref().map(|(took, cores)| per_msg(cores, *took, n)),
        "cpu_us_per_msg_hand1": hand_cpu(&hand1),
        "cpu_us_per_msg_hand2": hand_cpu(&hand2),
        "load_before": load,
    }))
}
