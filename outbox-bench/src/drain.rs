//! Drain throughput: a backlog already in the outbox, relayed to a broker, next to the two
//! baselines measured in the same run: the raw drain of the table (claim and delete, nothing
//! published) and the raw publish to the broker (acks pipelined, same client crate).

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
use crate::report::Report;
use crate::services::Services;
use crate::stores::{BenchStore, StoreKind};
use crate::timing::TimedStore;
use crate::{Options, Res, Scenario, cpu, probe};

/// The pairs measured unless `--pairs` says otherwise.
const DEFAULT_PAIRS: [&str; 5] = [
    "postgres-nats",
    "postgres-kafka",
    "postgres-amqp",
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
/// and the relay's metrics over it.
pub(crate) async fn relay_until(
    store: Arc<dyn DynStore>,
    publisher: Arc<dyn DynPublisher>,
    config: RelayConfig,
    n: u64,
    limit: Duration,
) -> Res<Run> {
    let store = TimedStore::new(store);
    let relay = Relay::builder(store.clone(), publisher)
        .config(config)
        .build()?;
    let before = probe::Reading::now();
    let cpu_before = cpu::sample(&[]);
    let started = Instant::now();
    let (stop, running) = spawn_relay(relay);
    let result = loop {
        if probe::published() - before.published >= n {
            break Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            break Err(format!(
                "the relay published {} of {n} messages in {limit:?}",
                probe::published() - before.published
            ));
        }
        if running.is_finished() {
            break Err("the relay stopped".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
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

/// Starts `relay.run` in a task; sending on the channel stops it gracefully.
pub(crate) fn spawn_relay<S: Store, P: Publisher>(
    relay: Relay<S, P>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), RelayError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, handle)
}

/// Publishes one message through `publisher` and waits for its acknowledgement: a new
/// publisher's first delivery includes its start (Kafka: about half a second), which is not
/// what the drain measures.
pub(crate) async fn warm_up(publisher: &dyn DynPublisher, destination: &str, keys: u64) -> Res<()> {
    let msg = Message::new(crate::workload::message(destination, 0, keys), Utc::now());
    let outcomes = publisher.publish_dyn(std::slice::from_ref(&msg)).await?;
    match outcomes.as_slice() {
        [PublishOutcome::Published] => Ok(()),
        [PublishOutcome::Failed(err)] => Err(format!("the warm-up message failed: {err}").into()),
        _ => Err("the publisher did not report one outcome for one message".into()),
    }
}

fn rate(n: u64, took: Duration) -> f64 {
    (n as f64 / took.as_secs_f64().max(1e-9)).round()
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
    let baseline_store =
        BenchStore::create(store_kind, services, &format!("{name}_raw"), 16).await?;
    let store = match BenchStore::create(store_kind, services, &name, 16).await {
        Ok(store) => store,
        Err(err) => {
            baseline_store.drop_all().await;
            return Err(err);
        }
    };
    let broker = match Broker::setup(broker_kind, services, &name).await {
        Ok(broker) => broker,
        Err(err) => {
            baseline_store.drop_all().await;
            store.drop_all().await;
            return Err(err);
        }
    };
    let result = measure(options, &baseline_store, &store, &broker, n, keys).await;
    broker.teardown().await;
    baseline_store.drop_all().await;
    store.drop_all().await;
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

async fn measure(
    options: &Options,
    baseline_store: &BenchStore,
    store: &BenchStore,
    broker: &Broker,
    n: u64,
    keys: u64,
) -> Res<serde_json::Value> {
    let destination = broker.destination();
    eprintln!(
        "  {}-{}: filling 2 x {n} messages",
        store.kind.name(),
        broker.kind.name()
    );
    let fill = baseline_store.fill(&destination, n, keys).await?;
    store.fill(&destination, n, keys).await?;

    // Baseline 1: the raw drain of the table.
    let cpu0 = cpu::sample(&[]);
    let started = Instant::now();
    let drained = baseline_store.raw_drain(options.batch_size).await?;
    let raw_drain_took = started.elapsed();
    let raw_drain_cpu = cpu::sample(&[]).cores_since(&cpu0);
    if drained != n {
        return Err(format!("raw drain took {drained} rows of {n}").into());
    }

    // Baseline 2: the raw publish to the broker, timed from a warmed client.
    let raw = broker.raw_publisher(keys).await?;
    let cpu0 = cpu::sample(&[]);
    let started = Instant::now();
    let confirmed = raw.publish(0..n).await;
    let raw_publish_took = started.elapsed();
    let raw_publish_cpu = cpu::sample(&[]).cores_since(&cpu0);
    raw.close().await;
    let confirmed = confirmed?;
    if confirmed != n {
        return Err(format!("raw publish confirmed {confirmed} of {n}").into());
    }
    broker.purge().await?;

    // The relay, its publisher warmed the same way.
    let publisher = broker.publisher(5).await?;
    warm_up(publisher.as_ref(), &destination, keys).await?;
    broker.purge().await?;
    let limit = Duration::from_secs(60).max(Duration::from_millis(n));
    let load = cpu::load();
    let run = relay_until(
        store.dyn_store(),
        publisher,
        relay_config(options),
        n,
        limit,
    )
    .await?;
    let (took, delta) = (run.took, run.delta);
    let relay_cpu = run.cpu_after.cores_since(&run.cpu_before);
    let pending = store.pending().await?;
    let stored = broker.stored().await?;
    if stored.is_some_and(|stored| stored != n) {
        return Err(format!("the broker holds {stored:?} messages, {n} expected").into());
    }

    let per_msg = |cores: &std::collections::BTreeMap<String, f64>, secs: f64| {
        cores
            .iter()
            .map(|(group, c)| (group.clone(), (c * secs / n as f64 * 1e7).round() / 10.0))
            .collect::<std::collections::BTreeMap<String, f64>>()
    };
    let cpu_us_relay = per_msg(&relay_cpu, took.as_secs_f64());
    let cpu_us_raw_drain = per_msg(&raw_drain_cpu, raw_drain_took.as_secs_f64());
    let cpu_us_raw_publish = per_msg(&raw_publish_cpu, raw_publish_took.as_secs_f64());
    let relay_rate = rate(n, took);
    let raw_drain = rate(n, raw_drain_took);
    let raw_publish = rate(n, raw_publish_took);
    let lower = raw_drain.min(raw_publish);
    Ok(json!({
        "messages": n,
        "keys": keys,
        "payload_bytes": crate::workload::PAYLOAD,
        "batch_size": options.batch_size,
        "concurrency": options.concurrency,
        "claims": options.claims,
        "relay_msgs_per_s": relay_rate,
        "raw_drain_msgs_per_s": raw_drain,
        "raw_publish_msgs_per_s": raw_publish,
        "raw_publish_window": RAW_WINDOW,
        "lower_baseline": if raw_drain <= raw_publish { "raw_drain" } else { "raw_publish" },
        "ratio": ((relay_rate / lower.max(1.0)) * 1000.0).round() / 1000.0,
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
        "cpu_cores_raw_publish": raw_publish_cpu,
        "cpu_us_per_msg_relay_run": cpu_us_relay,
        "cpu_us_per_msg_raw_drain": cpu_us_raw_drain,
        "cpu_us_per_msg_raw_publish": cpu_us_raw_publish,
        "load_before": load,
    }))
}
