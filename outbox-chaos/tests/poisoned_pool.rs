//! A claim whose partition lock fails (a deadlock, a lock timeout) must leave its connection
//! usable. The long chaos profile on PostgreSQL to Kafka saw claims fail with "deadlock
//! detected" while relays rebalanced, then every statement of every relay fail with "current
//! transaction is aborted, commands ignored until end of transaction block" for good: 42,095
//! committed messages were never published. Here the lock fails on cue: another transaction
//! holds the partition rows and the claim's connection has a short `lock_timeout`. Claims by
//! lease take that lock; claims held in a transaction take none (and would hold the pool's one
//! connection until they settle).

use std::str::FromStr;
use std::time::Duration;

use outbox_core::{NewMessage, PARTITIONS, RelayId, Store};
use outbox_sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use outbox_sqlx::{ClaimMode, PostgresStore, StoreConfig};
use outbox_testkit::env::{or_skip, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_claim_lock_leaves_the_connection_usable() {
    let url = outbox_chaos::db::postgres_url();
    let options = PgConnectOptions::from_str(&url)
        .expect("url")
        .options([("lock_timeout", "200")]);
    let Some(pool) = or_skip(
        "PostgreSQL",
        PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await,
    ) else {
        return;
    };
    let table = unique_name("poisoned");
    let store = PostgresStore::new(
        pool.clone(),
        StoreConfig::new()
            .table(&table)
            .claim_mode(ClaimMode::Lease),
    )
    .expect("store");
    store.migrate().await.expect("migrate");
    let relay = RelayId::new("relay-one");
    store
        .heartbeat(&relay, Duration::from_secs(60))
        .await
        .expect("heartbeat");
    let all: Vec<u16> = (0..PARTITIONS).collect();
    store
        .acquire(&relay, &all, Duration::from_secs(60))
        .await
        .expect("acquire");
    let mut tx = pool.begin().await.expect("begin");
    store
        .enqueue(&mut *tx, NewMessage::new("orders", "x").key("k"))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    // Another transaction holds the partition rows: the claim's lock times out.
    let other = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect");
    let mut blocker = other.begin().await.expect("begin");
    outbox_sqlx::sqlx::query(&format!("SELECT * FROM \"{table}_partitions\" FOR UPDATE"))
        .execute(&mut *blocker)
        .await
        .expect("lock the partitions");
    let failed = store.claim(&relay, 10, Duration::from_secs(30)).await;
    assert!(failed.is_err(), "the lock timed out: {failed:?}");
    blocker.rollback().await.expect("rollback");

    // The same (only) connection of the pool must work again.
    let stats = store.stats().await;
    let claim = store.claim(&relay, 10, Duration::from_secs(30)).await;
    // Tables dropped through the other pool: this one may be the poisoned one.
    PostgresStore::new(other, StoreConfig::new().table(&table))
        .expect("store")
        .drop_tables()
        .await
        .expect("drop");
    assert!(stats.is_ok(), "stats after a failed claim: {stats:?}");
    let claim = claim.expect("a claim after a failed claim");
    assert_eq!(claim.messages.len(), 1);
}
