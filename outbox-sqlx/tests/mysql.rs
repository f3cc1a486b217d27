//! MySqlStore against a real MariaDB (or MySQL 8): transactions, several relays, killed
//! connections, damaged rows, table names, concurrent claimers, migrations.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::my::{MyHarness, pool, url};
use common::scenarios;
use outbox_core::{
    MemoryPublisher, NewMessage, Relay, RelayError, RelayId, Settlement, Store, StoreErrorKind,
};
use outbox_sqlx::{MySqlStore, StoreConfig};
use outbox_testkit::StoreHarness;
use sqlx::Executor as _;
use sqlx::mysql::MySqlPoolOptions;

async fn own_everything<S: Store>(store: &S, relay: &RelayId) {
    let all: Vec<u16> = (0..outbox_core::PARTITIONS).collect();
    store
        .acquire(relay, &all, Duration::from_secs(60))
        .await
        .expect("acquire");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_rows_and_messages_commit_or_roll_back_together() {
    let Some(h) = MyHarness::new().await else {
        return;
    };
    let store = h.store();
    let orders = format!("`{}_orders`", h.table);
    sqlx::query(&format!(
        "CREATE TABLE {orders} (id BIGINT PRIMARY KEY, total BIGINT NOT NULL) ENGINE = InnoDB"
    ))
    .execute(store.pool())
    .await
    .expect("create the business table");

    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query(&format!("INSERT INTO {orders} VALUES (1, 100)"))
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
    sqlx::query(&format!("INSERT INTO {orders} VALUES (2, 200)"))
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

    let ids: Vec<i64> = sqlx::query_scalar(&format!("SELECT id FROM {orders}"))
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
    sqlx::query(&format!("DROP TABLE {orders}"))
        .execute(store.pool())
        .await
        .expect("drop");
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_and_three_relays_lose_nothing_and_keep_key_order() {
    let Some(h) = MyHarness::new().await else {
        return;
    };
    let config = h.store.config().clone();
    let mut stores = Vec::new();
    for _ in 0..3 {
        let pool = MySqlPoolOptions::new()
            .max_connections(8)
            .connect(&url())
            .await
            .expect("relay pool");
        stores.push(MySqlStore::new(pool, config.clone()).expect("store"));
    }
    let stores: [MySqlStore; 3] = stores.try_into().expect("three stores");
    scenarios::producers_and_three_relays(&h, stores.clone()).await;
    for store in stores {
        store.pool().close().await;
    }
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_mid_batch_lose_nothing() {
    let Some(h) = MyHarness::new().await else {
        return;
    };
    // Every connection of the relay's pool records its id, for KILL CONNECTION.
    let ids: Arc<Mutex<Vec<u64>>> = Arc::default();
    let relay_pool = MySqlPoolOptions::new()
        .max_connections(8)
        .after_connect({
            let ids = Arc::clone(&ids);
            move |conn, _| {
                let ids = Arc::clone(&ids);
                Box::pin(async move {
                    let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                        .fetch_one(&mut *conn)
                        .await?;
                    ids.lock().expect("lock").push(id);
                    Ok(())
                })
            }
        })
        .connect(&url())
        .await
        .expect("relay pool");
    let relay_store = MySqlStore::new(relay_pool.clone(), h.store.config().clone()).expect("store");
    let admin = h.store.pool().clone();
    let kill = move || {
        let (admin, ids) = (admin.clone(), Arc::clone(&ids));
        async move {
            let victims: Vec<u64> = std::mem::take(&mut *ids.lock().expect("lock"));
            let mut killed = 0;
            for id in victims {
                // The id is a number: nothing to escape.
                if admin
                    .execute(format!("KILL CONNECTION {id}").as_str())
                    .await
                    .is_ok()
                {
                    killed += 1;
                }
            }
            killed
        }
    };
    scenarios::killed_connections_lose_nothing(&h, relay_store, kill).await;
    relay_pool.close().await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_row_is_dead_lettered_not_crash_looped() {
    let Some(h) = MyHarness::new().await else {
        return;
    };
    scenarios::corrupted_row_is_dead_lettered(&h).await;
    h.teardown().await;
}

/// The MariaDB trap: a derived-table claim hands the same rows to two workers. These claims
/// never do, nor break key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_get_the_same_message() {
    let Some(h) = MyHarness::new().await else {
        return;
    };
    scenarios::concurrent_claimers_never_overlap(&h).await;
    h.teardown().await;
}

/// The same with claims held in a transaction: small claims over a small table, the case in
/// which a settle that scanned the table would deadlock with another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_held_claimers_never_get_the_same_message() {
    let Some(h) = MyHarness::with_config(common::my::held_config()).await else {
        return;
    };
    scenarios::concurrent_claimers_never_overlap(&h).await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_are_written_whole_and_in_order() {
    let Some(h) = MyHarness::new().await else {
        return;
    };
    scenarios::large_batches_are_chunked(&h).await;
    h.teardown().await;
}

/// InnoDB locks every row a locking scan reads, also rows it then lets go; a claim must not
/// take such a row's lock for a sign that the row may be passed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_locked_elsewhere_still_holds_back_its_key() {
    let Some(h) = MyHarness::new().await else {
        return;
    };
    let store = h.store();
    let relay = RelayId::random();
    own_everything(&store, &relay).await;
    let ids = h
        .enqueue(vec![
            NewMessage::new("orders", "a1").key("a"),
            NewMessage::new("orders", "b1").key("b"),
            NewMessage::new("orders", "a2").key("a"),
        ])
        .await
        .expect("enqueue");
    let mut locker = store.pool().begin().await.expect("begin");
    sqlx::query(&format!(
        "SELECT 1 FROM `{}` WHERE id = ? FOR UPDATE",
        h.table
    ))
    .bind(ids[0].as_bytes().to_vec())
    .fetch_all(&mut *locker)
    .await
    .expect("lock a1");
    let claim = store
        .claim(&relay, 10, Duration::from_secs(30))
        .await
        .expect("claim");
    assert_eq!(
        claim.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![ids[1]],
        "a1 is skipped while locked, and a2 waits for it"
    );
    // The claim may hold a2 until it settles (a claim held in a transaction keeps the row
    // locks it took), as the relay settles every claim.
    let published = Settlement {
        published: vec![ids[1]],
        ..Settlement::default()
    };
    store.settle(claim.token, &published).await.expect("settle");
    locker.rollback().await.expect("unlock");
    let claim = store
        .claim(&relay, 10, Duration::from_secs(30))
        .await
        .expect("claim");
    assert_eq!(
        claim.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![ids[0], ids[2]]
    );
    h.teardown().await;
}

/// A held claim whose relay goes quiet is ended by the server: its connection's
/// `wait_timeout`, set to the lease while the claim is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_claim_past_its_lease_is_ended_by_the_database() {
    let Some(h) = MyHarness::with_config(common::my::held_config()).await else {
        return;
    };
    let Some(other_pool) = pool().await else {
        return;
    };
    let other = MySqlStore::new(other_pool, h.store().config().clone()).expect("store");
    scenarios::a_quiet_held_claim_is_ended_by_the_database(&h, other).await;
    h.teardown().await;
}

/// The `wait_timeout` of a held claim is the claim's own: the connection goes back to the pool
/// with the server's, whether the claim was settled or outlived its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_claims_leave_the_session_timeout_as_they_found_it() {
    let Some(pool) = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&url())
        .await
        .ok()
    else {
        return;
    };
    let h = MyHarness::on(pool, common::my::held_config()).await;
    // One connection: every statement below runs on the one the claims used.
    let store = h.store();
    let relay = RelayId::random();
    own_everything(&store, &relay).await;
    let timeouts = || async {
        sqlx::query_as::<_, (u64, u64)>("SELECT @@SESSION.wait_timeout, @@GLOBAL.wait_timeout")
            .fetch_one(store.pool())
            .await
            .expect("timeouts")
    };
    let ids = h
        .enqueue(vec![
            NewMessage::new("orders", "a1"),
            NewMessage::new("orders", "a2"),
        ])
        .await
        .expect("enqueue");
    let claim = store
        .claim(&relay, 1, Duration::from_secs(5))
        .await
        .expect("claim");
    let published = Settlement {
        published: vec![ids[0]],
        ..Settlement::default()
    };
    store.settle(claim.token, &published).await.expect("settle");
    let (session, global) = timeouts().await;
    assert_eq!(session, global, "after a settle");
    let claim = store
        .claim(&relay, 1, Duration::from_millis(200))
        .await
        .expect("claim");
    assert_eq!(claim.messages.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The next claim rolls back the expired one first.
    let again = store
        .claim(&relay, 10, Duration::from_secs(5))
        .await
        .expect("claim");
    assert_eq!(
        again.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![ids[1]]
    );
    let published = Settlement {
        published: vec![ids[1]],
        ..Settlement::default()
    };
    store.settle(again.token, &published).await.expect("settle");
    let (session, global) = timeouts().await;
    assert_eq!(session, global, "after an expired claim and a settle");
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_names_that_are_not_identifiers_are_refused() {
    let Some(pool) = pool().await else {
        return;
    };
    let too_long = "t".repeat(64);
    let attempts = [
        "x; DROP TABLE y",
        "outbox`; DROP TABLE y; --",
        "a`b",
        "a\"b",
        "a b",
        "",
        too_long.as_str(),
        "a.b.c",
        "tablé",
        "outbox-1",
    ];
    for table in attempts {
        let err = MySqlStore::new(pool.clone(), StoreConfig::new().table(table)).expect_err(table);
        assert_eq!(err.kind(), StoreErrorKind::Config, "{table:?}: {err}");
        assert!(err.to_string().contains("table name"), "{err}");
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_versioned() {
    let Some(pool) = pool().await else {
        return;
    };
    let store = MySqlStore::new(pool.clone(), common::fresh_config()).expect("store");
    assert_eq!(store.schema_version().await.expect("version"), 0);
    let (a, b, c) = tokio::join!(store.migrate(), store.migrate(), store.migrate());
    a.and(b).and(c).expect("concurrent migrations");
    store.migrate().await.expect("again");
    assert_eq!(
        store.schema_version().await.expect("version"),
        MySqlStore::SCHEMA_VERSION
    );
    let partitions: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM `{}_partitions`",
        store.config().table
    ))
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(partitions, i64::from(outbox_core::PARTITIONS));
    store.drop_tables().await.expect("drop");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_a_schema_error_that_stops_the_relay() {
    let Some(pool) = pool().await else {
        return;
    };
    let store = MySqlStore::new(pool.clone(), common::fresh_config()).expect("store");
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

/// The relay drops in-flight store calls when it stops; a call cancelled at any point must not
/// leave a connection in an open transaction holding locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_never_leave_anything_locked() {
    let Some(h) = MyHarness::new().await else {
        return;
    };
    scenarios::cancelled_calls_leave_nothing_locked(&h).await;
    h.teardown().await;
}

/// A call cancelled while its rows arrive leaves its connection in step with the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_reads_leave_connections_in_step() {
    let Some(h) = MyHarness::new().await else {
        return;
    };
    scenarios::cancelled_reads_leave_connections_in_step(&h).await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_takes_what_sqlx_takes_and_batches_are_whole_or_nothing() {
    let Some(h) = MyHarness::new().await else {
        return;
    };
    let store = h.store();
    enqueue_forms!(store.clone(), store.pool().begin());
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_migrations_run_from_a_sqlx_migrator() {
    let Some(pool) = pool().await else {
        return;
    };
    let store = MySqlStore::new(pool.clone(), common::fresh_config()).expect("store");
    sqlx_migrator_migrates!(store, &pool, MySqlStore::SCHEMA_VERSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_applies_each_message_once_in_the_callers_transaction() {
    let Some(h) = common::inboxes::mysql().await else {
        return;
    };
    inbox_process_applies_once!(&h.inbox, &h.pool, h.pool.begin());
    outbox_testkit::InboxHarness::teardown(h).await;
}
