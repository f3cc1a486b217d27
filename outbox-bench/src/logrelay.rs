//! The log relay (change data capture) next to the polling relay, in the same run, on a
//! PostgreSQL cluster of the run's own with `wal_level = logical` (started with the machine's
//! PostgreSQL binaries; the shared server stays as it is):
//!
//! - `log-drain`: a backlog committed after the slot was created, relayed by the log relay,
//!   next to the same backlog relayed by the polling relay and drained raw (claim and delete,
//!   nothing published), each on a table of its own;
//! - `log-latency`: commit-to-ack latency at a steady rate, of the log relay and of the
//!   polling relay (woken by LISTEN/NOTIFY).

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{LogRelay, LogSource, Publisher, RelayConfig};
use outbox_pg_cdc::{CdcAdmin, CdcConfig, CdcError, PgOutboxLog};
use outbox_sqlx::{PostgresStore, StoreConfig};
use outbox_testkit::env::unique_name;
use outbox_testkit::servers::{PrivatePostgres, ServerError};
use serde_json::json;

use crate::brokers::{Broker, BrokerKind};
use crate::drain::{
    check_delivered, rate, ratio, relay_config, relay_until, spawn_stoppable, until_published,
    warm_up,
};
use crate::report::Report;
use crate::services::{Services, Unavailable};
use crate::stores::{BenchStore, StoreKind};
use crate::{Options, Res, Scenario, cpu, probe};

const BROKERS: [BrokerKind; 2] = [BrokerKind::Nats, BrokerKind::Kafka];

pub(crate) async fn run(
    options: &Options,
    services: &Services,
    report: &mut Report,
    scenario: Scenario,
) {
    let dir = std::env::temp_dir().join(unique_name("bench_logical"));
    let server = start(&dir).await;
    for broker in BROKERS {
        let label = format!("postgres-{}", broker.name());
        let outcome = match &server {
            Err(err) => Err(copy(err)),
            Ok(server) => {
                let private = Services {
                    postgres: server.url(),
                    ..services.clone()
                };
                if scenario == Scenario::LogDrain {
                    drain(options, &private, broker).await
                } else {
                    crate::latency::log_vs_polling(options, &private, broker).await
                }
            }
        };
        report.outcome(scenario, &label, outcome);
    }
    if let Ok(server) = server {
        server.stop().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same failure again, for each result it stops.
fn copy(err: &crate::BoxError) -> crate::BoxError {
    match err.downcast_ref::<Unavailable>() {
        Some(Unavailable::Skip(reason)) => Box::new(Unavailable::Skip(reason.clone())),
        None => err.to_string().into(),
    }
}

/// A private cluster with logical WAL; missing PostgreSQL binaries are a skip unless the
/// servers are required.
async fn start(dir: &std::path::Path) -> Res<PrivatePostgres> {
    std::fs::create_dir_all(dir)?;
    let settings = [
        ("wal_level", "logical"),
        ("max_replication_slots", "8"),
        ("max_wal_senders", "8"),
        ("shared_buffers", "256MB"),
        ("synchronous_commit", "on"),
    ];
    match PrivatePostgres::start_with(dir, &settings).await {
        Ok(server) => Ok(server),
        Err(ServerError::Unavailable(why)) if !outbox_testkit::env::required() => Err(Box::new(
            Unavailable::Skip(format!("no private PostgreSQL cluster: {why}")),
        )),
        Err(err) => Err(format!("the private PostgreSQL cluster does not start: {err}").into()),
    }
}

/// A replication slot name for `table`: `[a-z0-9_]`, at most 63 characters.
fn slot_name(table: &str) -> String {
    table
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(63)
        .collect()
}

/// A log relay on `store`'s table, with its publication and slot created now (messages
/// committed from now on are in its log).
pub(crate) async fn log_relay<P: Publisher>(
    services: &Services,
    store: &BenchStore,
    publisher: P,
    config: RelayConfig,
) -> Res<(LogRelay<PgOutboxLog, P>, CdcAdmin)> {
    let slot = slot_name(&store.table);
    let cdc = CdcConfig::new(services.postgres.as_str())
        .table(store.table.as_str())
        .slot(slot.as_str())
        .publication(slot.as_str());
    let admin = CdcAdmin::connect(cdc.clone()).await?;
    admin.check().await?;
    admin.ensure().await?;
    let table = PostgresStore::connect(
        StoreConfig::new()
            .url(services.postgres.as_str())
            .table(store.table.as_str())
            .max_connections(4),
    )
    .await?;
    let source = PgOutboxLog::connect(cdc, table).await?;
    let relay = LogRelay::builder(source, publisher)
        .config(config)
        .build()?;
    Ok((relay, admin))
}

/// Starts `relay.run` in a task; sending on the channel stops it gracefully.
pub(crate) fn spawn_log<L: LogSource, P: Publisher>(
    relay: LogRelay<L, P>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), outbox_core::RelayError>>,
) {
    spawn_stoppable(move |stopped| async move { relay.run(stopped).await })
}

/// Drops the slot and the publication, waiting while the slot's session ends.
pub(crate) async fn drop_slot(admin: &CdcAdmin) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match admin.drop().await {
            Err(CdcError::SlotInUse { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => {
                eprintln!("dropping the bench's slot: {err}");
                return;
            }
            Ok(()) => return,
        }
    }
}

async fn drain(
    options: &Options,
    services: &Services,
    broker_kind: BrokerKind,
) -> Res<serde_json::Value> {
    let n = options.messages();
    let keys = options.keys_for(n);
    let name = unique_name("bench_logdrain");
    let mut stores = Vec::new();
    for suffix in ["_raw", "_poll", "_log"] {
        match BenchStore::create(
            StoreKind::Postgres,
            services,
            &format!("{name}{suffix}"),
            16,
        )
        .await
        {
            Ok(store) => stores.push(store),
            Err(err) => {
                for store in &stores {
                    store.drop_all().await;
                }
                return Err(err);
            }
        }
    }
    let broker = match Broker::setup(broker_kind, services, &name).await {
        Ok(broker) => broker,
        Err(err) => {
            for store in &stores {
                store.drop_all().await;
            }
            return Err(err);
        }
    };
    let result = measure(options, services, &stores, &broker, n, keys).await;
    broker.teardown().await;
    for store in &stores {
        store.drop_all().await;
    }
    result
}

async fn measure(
    options: &Options,
    services: &Services,
    stores: &[BenchStore],
    broker: &Broker,
    n: u64,
    keys: crate::workload::Keys,
) -> Res<serde_json::Value> {
    let [raw, poll, log] = stores else {
        return Err("three tables expected".into());
    };
    let destination = broker.destination();
    eprintln!(
        "  log-drain postgres-{}: filling 3 x {n} messages",
        broker.kind.name()
    );
    raw.fill(&destination, n, keys).await?;
    poll.fill(&destination, n, keys).await?;

    // Baseline: the raw drain of the table.
    let started = Instant::now();
    let drained = raw.raw_drain(options.batch_size).await?;
    let raw_took = started.elapsed();
    if drained != n {
        return Err(format!("raw drain took {drained} rows of {n}").into());
    }

    // The polling relay.
    let publisher = broker.publisher(5, options.pipeline_keys).await?;
    warm_up(publisher.as_ref(), &destination, keys).await?;
    broker.purge().await?;
    let sink_before = broker.sink_confirmed();
    let polled = relay_until(
        poll.dyn_store(),
        Arc::clone(&publisher),
        relay_config(options),
        n,
        Duration::from_secs(30),
    )
    .await
    .map_err(|err| format!("polling relay: {err}"))?;
    check_delivered(broker, n, sink_before, "polling relay").await?;
    let polling_cpu = polled.cpu_after.cores_since(&polled.cpu_before);

    // The log relay: the slot first, then the backlog, which is in its log.
    broker.purge().await?;
    let (relay, admin) =
        log_relay(services, log, Arc::clone(&publisher), relay_config(options)).await?;
    let result = async {
        let fill = log.fill(&destination, n, keys).await?;
        let sink_before = broker.sink_confirmed();
        let before = probe::Reading::now();
        let cpu0 = cpu::sample(&[]);
        let (stop, running) = spawn_log(relay);
        let took = until_published(&before, &running, n, Duration::from_secs(30)).await;
        let cores = cpu::sample(&[]).cores_since(&cpu0);
        let delta = probe::Reading::now().since(&before);
        let _ = stop.send(());
        running.await??;
        let took = took?;
        check_delivered(broker, n, sink_before, "log relay").await?;
        let left = log.pending().await?;
        Ok::<_, crate::BoxError>((took, fill, cores, delta, left))
    }
    .await;
    drop_slot(&admin).await;
    let (log_took, fill, log_cpu, delta, left) = result?;

    let log_rate = rate(n, log_took);
    let polling_rate = rate(n, polled.took);
    let raw_rate = rate(n, raw_took);
    Ok(json!({
        "pair": format!("postgres-{}", broker.kind.name()),
        "messages": n,
        "workload": keys.workload().name(),
        "batch_size": options.batch_size,
        "log_msgs_per_s": log_rate,
        "polling_msgs_per_s": polling_rate,
        "raw_drain_msgs_per_s": raw_rate,
        "log_vs_polling": ratio(log_rate, polling_rate),
        "log_vs_raw_drain": ratio(log_rate, raw_rate),
        "target": "log drain at least the polling relay's",
        "met": log_rate >= polling_rate,
        "fill_msgs_per_s": rate(n, fill),
        "log_mean_batch": (delta.mean_batch * 10.0).round() / 10.0,
        "log_publish_calls": delta.calls,
        "pending_after_log": left,
        "cpu_cores_log_run": log_cpu,
        "cpu_cores_polling_run": polling_cpu,
    }))
}
