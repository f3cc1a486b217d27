//! Liveness after an outage: when the broker or the relays were away and a deep backlog of a
//! few hot keys built up, a claim must stay about as fast as on a small outbox, or the relays
//! never catch up (a chaos run whose producers outpaced the relays saw claims of 2 to 6 s on
//! PostgreSQL and a backlog that grew for good: the planner, without statistics for a table
//! written faster than autovacuum analyzes it, sorted the whole backlog on every claim).
//! `OUTBOX_BACKLOG_ANALYZE=1` analyzes the table after filling it, for comparison.

use std::time::{Duration, Instant};

use outbox_core::{NewMessage, PARTITIONS, RelayId, Store};
use outbox_sqlx::{PostgresStore, StoreConfig};
use outbox_testkit::env::{or_skip, unique_name};

async fn claim_time(store: &PostgresStore, relay: &RelayId) -> Duration {
    let started = Instant::now();
    let claim = store
        .claim(relay, 100, Duration::from_secs(30))
        .await
        .expect("claim");
    let took = started.elapsed();
    assert_eq!(claim.messages.len(), 100);
    // Hand them back, so that the next claim sees the same backlog.
    let mut settlement = outbox_core::Settlement::default();
    for m in &claim.messages {
        settlement.release.push(m.id);
    }
    store
        .settle(claim.token, &settlement)
        .await
        .expect("settle");
    took
}

async fn fill(store: &PostgresStore, keys: usize, total: usize) {
    for chunk in 0..total / 1000 {
        let mut tx = store.pool().begin().await.expect("begin");
        let batch: Vec<NewMessage> = (0..1000)
            .map(|i| {
                NewMessage::new("orders", format!("{chunk}/{i}"))
                    .key(format!("hot-{}", (chunk * 1000 + i) % keys))
            })
            .collect();
        store.enqueue_batch(&mut *tx, batch).await.expect("enqueue");
        tx.commit().await.expect("commit");
    }
}

/// A migrated store of its own holding `depth` messages over `keys` keys, every partition
/// owned by `relay`.
async fn filled(
    relay: &RelayId,
    depth: usize,
    keys: usize,
    analyze: bool,
) -> Option<PostgresStore> {
    let store = or_skip(
        "PostgreSQL",
        PostgresStore::connect(
            StoreConfig::new()
                .url(outbox_chaos::db::postgres_url())
                .table(unique_name("backlog")),
        )
        .await,
    )?;
    store.migrate().await.expect("migrate");
    store
        .heartbeat(relay, Duration::from_secs(600))
        .await
        .expect("heartbeat");
    let all: Vec<u16> = (0..PARTITIONS).collect();
    store
        .acquire(relay, &all, Duration::from_secs(600))
        .await
        .expect("acquire");
    fill(&store, keys, depth).await;
    if analyze {
        outbox_sqlx::sqlx::query("ANALYZE")
            .execute(store.pool())
            .await
            .expect("analyze");
    }
    Some(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_backlog_of_hot_keys_keeps_claims_fast() {
    let relay = RelayId::new("measure");
    let mut rows = Vec::new();
    let analyze = std::env::var_os("OUTBOX_BACKLOG_ANALYZE").is_some();
    for depth in [2_000, 20_000, 200_000] {
        let Some(store) = filled(&relay, depth, 16, analyze).await else {
            return;
        };
        let mut times: Vec<Duration> = Vec::new();
        for _ in 0..5 {
            times.push(claim_time(&store, &relay).await);
        }
        times.sort();
        println!(
            "backlog {depth:>7} over 16 keys: claim of 100 in {:?} (median of 5, first {:?})",
            times[2], times[0]
        );
        rows.push((depth, times[2]));
        store.drop_tables().await.expect("drop");
    }
    let (small, deep) = (rows[0].1, rows[2].1);
    assert!(
        deep < small * 10 + Duration::from_millis(100),
        "claims slow down with the backlog: {rows:?}"
    );
}
