//! Inbox overhead: consumer transactions that apply one message's effect (an order row), with
//! and without the message's record in the inbox in the same transaction, with 1 and 8
//! concurrent consumers, per store.

use std::sync::Arc;

use outbox_testkit::env::unique_name;
use serde_json::json;

use crate::enqueue::rate;
use crate::report::Report;
use crate::services::Services;
use crate::stores::{BenchInbox, BenchStore, StoreKind};
use crate::{Options, Res, Scenario, cpu};

pub(crate) async fn run(options: &Options, services: &Services, report: &mut Report) {
    for kind in [StoreKind::Postgres, StoreKind::MySql, StoreKind::Sqlite] {
        for consumers in [1usize, 8] {
            let label = format!("{}-{consumers}c", kind.name());
            let outcome = measure(options, services, kind, consumers).await;
            report.outcome(Scenario::Inbox, &label, outcome);
        }
    }
}

async fn measure(
    options: &Options,
    services: &Services,
    kind: StoreKind,
    consumers: usize,
) -> Res<serde_json::Value> {
    let table = unique_name("bench_inbox");
    let store = BenchStore::create(kind, services, &table, 10).await?;
    let inbox = match store.inbox().await {
        Ok(inbox) => Arc::new(inbox),
        Err(err) => {
            store.drop_all().await;
            return Err(err);
        }
    };
    let result = async {
        let duration = options.enqueue_duration();
        let consume = |with: bool| {
            let (store, inbox) = (store.clone(), Arc::clone(&inbox));
            move |i: u64| {
                let (store, inbox) = (store.clone(), Arc::clone(&inbox));
                async move {
                    let inbox: Option<&BenchInbox> = with.then_some(&*inbox);
                    store.consumer_tx(i, inbox).await
                }
            }
        };
        // Warm up, then alternate without / with / with / without so that a drift of the
        // machine weighs on both sides alike.
        rate(consumers, duration / 4, consume(false)).await?;
        rate(consumers, duration / 4, consume(true)).await?;
        let load = cpu::load();
        let a = rate(consumers, duration, consume(false)).await?;
        let b = rate(consumers, duration, consume(true)).await?;
        let c = rate(consumers, duration, consume(true)).await?;
        let d = rate(consumers, duration, consume(false)).await?;
        let without = (a + d) / 2.0;
        let with = (b + c) / 2.0;
        let overhead = without / with.max(1e-9);
        Ok::<_, crate::BoxError>(json!({
            "store": kind.name(),
            "consumers": consumers,
            "tx_per_s_without": without.round(),
            "tx_per_s_with": with.round(),
            "overhead": (overhead * 1000.0).round() / 1000.0,
            "secs_per_run": duration.as_secs_f64(),
            "runs_without": [a.round(), d.round()],
            "runs_with": [b.round(), c.round()],
            "load_before": load,
        }))
    }
    .await;
    if let Err(err) = inbox.drop_table().await {
        eprintln!("  dropping the inbox table {table}_inbox: {err}");
    }
    store.drop_all().await;
    result
}
