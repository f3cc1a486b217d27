//! Enqueue overhead: business transactions that write one order row, with and without an
//! outbox message in the same transaction, with 1 and 8 concurrent writers, per store.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outbox_testkit::env::unique_name;
use serde_json::json;

use crate::report::Report;
use crate::services::Services;
use crate::stores::{BenchStore, StoreKind};
use crate::{Options, Res, Scenario, cpu};

/// Overhead the project aims at: transactions with an outbox message at most this much slower.
const TARGET: f64 = 1.15;

pub(crate) async fn run(options: &Options, services: &Services, report: &mut Report) {
    for kind in [StoreKind::Postgres, StoreKind::MySql, StoreKind::Sqlite] {
        for writers in [1usize, 8] {
            let label = format!("{}-{writers}w", kind.name());
            let outcome = measure(options, services, kind, writers).await;
            report.outcome(Scenario::Enqueue, &label, outcome);
        }
    }
}

/// Transactions per second of `writers` concurrent writers for `duration`, each running
/// `tx(i)` with its own sequence of `i`, one after the other.
pub(crate) async fn rate<F, Fut>(writers: usize, duration: Duration, tx: F) -> Res<f64>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Res<()>> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        let (tx, done) = (tx.clone(), Arc::clone(&done));
        tasks.spawn(async move {
            let mut i = writer as u64 * 1_000_000_000;
            while Instant::now() < deadline {
                tx(i).await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<(), crate::BoxError>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Business transactions of `store`, with an outbox message to `outbox` when given (written
/// by a plain `INSERT` when `plain`).
fn business(
    store: &BenchStore,
    outbox: Option<&str>,
    plain: bool,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = Res<()>> + Send>> + Clone + Send + 'static
{
    let store = store.clone();
    let outbox = outbox.map(str::to_owned);
    move |i| {
        let (store, outbox) = (store.clone(), outbox.clone());
        Box::pin(async move { store.business_tx(i, outbox.as_deref(), plain).await })
    }
}

async fn measure(
    options: &Options,
    services: &Services,
    kind: StoreKind,
    writers: usize,
) -> Res<serde_json::Value> {
    let table = unique_name("bench_enqueue");
    let store = BenchStore::create(kind, services, &table, 10).await?;
    let result = async {
        let duration = options.enqueue_duration();
        let destination = "orders.events";
        // Warm the connections and caches, then alternate without / with / with / without so
        // that a drift of the machine weighs on both sides alike.
        rate(writers, duration / 4, business(&store, None, false)).await?;
        rate(writers, duration / 4, business(&store, Some(destination), false)).await?;
        let load = cpu::load();
        let cpu0 = cpu::sample(&[]);
        let a = rate(writers, duration, business(&store, None, false)).await?;
        let b = rate(writers, duration, business(&store, Some(destination), false)).await?;
        let c = rate(writers, duration, business(&store, Some(destination), false)).await?;
        let d = rate(writers, duration, business(&store, None, false)).await?;
        let cores = cpu::sample(&[]).cores_since(&cpu0);
        // A writer in another language: the same message by a plain INSERT, the database
        // filling in the rest.
        let g = rate(writers, duration, business(&store, Some(destination), true)).await?;
        let h = rate(writers, duration, business(&store, None, false)).await?;
        // PostgreSQL: the same enqueue with `notify = false`, to tell the row from the NOTIFY.
        let raw = if kind == StoreKind::Postgres {
            store.without_notify().await?;
            let e = rate(writers, duration, business(&store, Some(destination), false)).await?;
            let f = rate(writers, duration, business(&store, None, false)).await?;
            Some((e, f))
        } else {
            None
        };
        let without = (a + d) / 2.0;
        let with = (b + c) / 2.0;
        let overhead = without / with.max(1e-9);
        Ok::<_, crate::BoxError>(json!({
            "tx_per_s_row_without_notify": raw.map(|(e, _)| e.round()),
            "overhead_row_without_notify": raw.map(|(e, f)| (f / e.max(1e-9) * 1000.0).round() / 1000.0),
            "tx_per_s_plain_insert": g.round(),
            "overhead_plain_insert": (h / g.max(1e-9) * 1000.0).round() / 1000.0,
            "store": kind.name(),
            "writers": writers,
            "tx_per_s_without": without.round(),
            "tx_per_s_with": with.round(),
            "overhead": (overhead * 1000.0).round() / 1000.0,
            "target_overhead": TARGET,
            "met": overhead <= TARGET,
            "secs_per_run": duration.as_secs_f64(),
            "runs_without": [a.round(), d.round()],
            "runs_with": [b.round(), c.round()],
            "cpu_cores": cores,
            "load_before": load,
        }))
    }
    .await;
    store.drop_all().await;
    result
}
