//! SqliteStore on database files: transactions, several relays with pools of their own on
//! one file (as separate processes would have), damaged rows, table names, migrations.

#[macro_use]
mod common;

use std::time::Duration;

use common::lite::{LiteHarness, pool_on};
use common::scenarios;
use outbox_core::{MemoryPublisher, NewMessage, Relay, RelayError, RelayId, Store, StoreErrorKind};
use outbox_sqlx::{SqliteStore, StoreConfig};
use outbox_testkit::StoreHarness;

async fn own_everything<S: Store>(store: &S, relay: &RelayId) {
    let all: Vec<u16> = (0..outbox_core::PARTITIONS).collect();
    store
        .acquire(relay, &all, Duration::from_secs(60))
        .await
        .expect("acquire");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_rows_and_messages_commit_or_roll_back_together() {
    let h = LiteHarness::new().await;
    let store = h.store();
    sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER NOT NULL)")
        .execute(store.pool())
        .await
        .expect("create the business table");

    let mut tx = store
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("begin");
    sqlx::query("INSERT INTO orders VALUES (1, 100)")
        .execute(&mut *tx)
        .await
        .expect("insert order 1");
    let kept = store
        .enqueue(
            &mut *tx,
            NewMessage::new("orders", "created 1").key("order-1"),
        )
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO orders VALUES (2, 200)")
        .execute(&mut *tx)
        .await
        .expect("insert order 2");
    store
        .enqueue(
            &mut *tx,
            NewMessage::new("orders", "created 2").key("order-2"),
        )
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");

    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM orders")
        .fetch_all(store.pool())
        .await
        .expect("orders");
    assert_eq!(ids, vec![1], "the rolled-back order is gone");
    let relay = RelayId::random();
    own_everything(&store, &relay).await;
    let claim = store
        .claim(&relay, 10, Duration::from_secs(30))
        .await
        .expect("claim");
    assert_eq!(
        claim.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![kept],
        "only the committed message exists"
    );
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_and_three_relays_on_one_file_lose_nothing_and_keep_key_order() {
    let h = LiteHarness::new().await;
    let config = h.store.config().clone();
    let mut stores = Vec::new();
    for _ in 0..3 {
        let pool = pool_on(&h.file()).await;
        stores.push(SqliteStore::new(pool, config.clone()).expect("store"));
    }
    let stores: [SqliteStore; 3] = stores.try_into().expect("three stores");
    scenarios::producers_and_three_relays(&h, stores.clone()).await;
    for store in stores {
        store.pool().close().await;
    }
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_row_is_dead_lettered_not_crash_looped() {
    let h = LiteHarness::new().await;
    scenarios::corrupted_row_is_dead_lettered(&h).await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_get_the_same_message() {
    let h = LiteHarness::new().await;
    scenarios::concurrent_claimers_never_overlap(&h).await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_are_written_whole_and_in_order() {
    let h = LiteHarness::new().await;
    scenarios::large_batches_are_chunked(&h).await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_names_that_are_not_identifiers_are_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let pool = pool_on(&dir.path().join("names.db")).await;
    let too_long = "t".repeat(64);
    let attempts = [
        "x; DROP TABLE y",
        "outbox\"; DROP TABLE y; --",
        "a\"b",
        "a b",
        "",
        too_long.as_str(),
        "a.b.c",
        "main.outbox",
        "tablé",
    ];
    for table in attempts {
        let err = SqliteStore::new(pool.clone(), StoreConfig::new().table(table)).expect_err(table);
        assert_eq!(err.kind(), StoreErrorKind::Config, "{table:?}: {err}");
        assert!(err.to_string().contains("table name"), "{err}");
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_creates_the_file_in_wal_mode_and_migrations_are_idempotent() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let store = SqliteStore::connect(StoreConfig::new().url(url))
        .await
        .expect("connect");
    assert_eq!(store.schema_version().await.expect("version"), 0);
    let (a, b) = tokio::join!(store.migrate(), store.migrate());
    a.and(b).expect("concurrent migrations");
    store.migrate().await.expect("again");
    assert_eq!(
        store.schema_version().await.expect("version"),
        SqliteStore::SCHEMA_VERSION
    );
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await
        .expect("journal mode");
    assert_eq!(mode, "wal");
    let partitions: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox_partitions")
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(partitions, i64::from(outbox_core::PARTITIONS));
    assert!(dir.path().join("app.db").exists());
    store.pool().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_a_schema_error_that_stops_the_relay() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let pool = pool_on(&dir.path().join("empty.db")).await;
    let store = SqliteStore::new(pool.clone(), common::fresh_config()).expect("store");
    let err = store
        .claim(&RelayId::random(), 10, Duration::from_secs(1))
        .await
        .expect_err("no table");
    assert_eq!(err.kind(), StoreErrorKind::Schema, "{err}");
    let relay = Relay::builder(store, MemoryPublisher::new())
        .config(scenarios::relay_config())
        .build()
        .expect("config");
    let stopped = tokio::time::timeout(
        Duration::from_secs(10),
        relay.run(std::future::pending::<()>()),
    )
    .await
    .expect("the relay stops on its own");
    assert!(
        matches!(&stopped, Err(RelayError::Store(e)) if e.kind() == StoreErrorKind::Schema),
        "{stopped:?}"
    );
    pool.close().await;
}

/// The relay drops its heartbeat when it stops; a store call cancelled at any point must not
/// leave the database file locked for the next writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_never_leave_anything_locked() {
    let h = LiteHarness::new().await;
    scenarios::cancelled_calls_leave_nothing_locked(&h).await;
    h.teardown().await;
}

/// A call cancelled while its rows arrive leaves its connection in step with the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_reads_leave_connections_in_step() {
    let h = LiteHarness::new().await;
    scenarios::cancelled_reads_leave_connections_in_step(&h).await;
    h.teardown().await;
}

/// sqlx checks a custom `BEGIN IMMEDIATE` with one more await after SQLite ran it: a
/// heartbeat cancelled right there must not leave its connection holding the write lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_heartbeat_never_leaves_the_file_locked() {
    let h = LiteHarness::new().await;
    let store = h.store();
    let relay = RelayId::new("cancelled");
    for i in 0..300u64 {
        let cancel_after = Duration::from_micros(i * 7 % 400);
        let _ = tokio::time::timeout(
            cancel_after,
            store.heartbeat(&relay, Duration::from_secs(30)),
        )
        .await;
        tokio::time::timeout(Duration::from_secs(3), store.leave(&relay))
            .await
            .unwrap_or_else(|_| panic!("a write waited for a lock after cancellation #{i}"))
            .expect("leave");
    }
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_takes_what_sqlx_takes_and_batches_are_whole_or_nothing() {
    let h = LiteHarness::new().await;
    let store = h.store();
    enqueue_forms!(store.clone(), store.pool().begin_with("BEGIN IMMEDIATE"));
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_migrations_run_from_a_sqlx_migrator() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let pool = pool_on(&dir.path().join("outbox.db")).await;
    let store = SqliteStore::new(pool.clone(), common::fresh_config()).expect("store");
    sqlx_migrator_migrates!(store, &pool, SqliteStore::SCHEMA_VERSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_applies_each_message_once_in_the_callers_transaction() {
    let Some(h) = common::inboxes::sqlite().await else {
        return;
    };
    inbox_process_applies_once!(&h.inbox, &h.pool, h.pool.begin_with("BEGIN IMMEDIATE"));
    outbox_testkit::InboxHarness::teardown(h).await;
}
