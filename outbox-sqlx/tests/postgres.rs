//! PostgresStore against a real PostgreSQL: transactions, several relays, killed
//! connections, damaged rows, table names, wake-ups, migrations.

#[macro_use]
mod common;

use std::str::FromStr;
use std::time::Duration;

use common::pg::{PgHarness, pool, url};
use common::scenarios;
use outbox_core::{MemoryPublisher, NewMessage, Relay, RelayError, RelayId, Store, StoreErrorKind};
use outbox_sqlx::{PostgresStore, StoreConfig};
use outbox_testkit::StoreHarness;
use outbox_testkit::env::unique_name;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

async fn own_everything<S: Store>(store: &S, relay: &RelayId) {
    let all: Vec<u16> = (0..outbox_core::PARTITIONS).collect();
    store
        .acquire(relay, &all, Duration::from_secs(60))
        .await
        .expect("acquire");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_rows_and_messages_commit_or_roll_back_together() {
    let Some(h) = PgHarness::new().await else {
        return;
    };
    let store = h.store();
    let orders = format!("\"{}_orders\"", h.table);
    sqlx::query(&format!(
        "CREATE TABLE {orders} (id BIGINT PRIMARY KEY, total BIGINT NOT NULL)"
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
    let Some(h) = PgHarness::new().await else {
        return;
    };
    let config = h.store.config().clone();
    let mut stores = Vec::new();
    for _ in 0..3 {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url())
            .await
            .expect("relay pool");
        stores.push(PostgresStore::new(pool, config.clone()).expect("store"));
    }
    let stores: [PostgresStore; 3] = stores.try_into().expect("three stores");
    scenarios::producers_and_three_relays(&h, stores.clone()).await;
    for store in stores {
        store.pool().close().await;
    }
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_mid_batch_lose_nothing() {
    let Some(h) = PgHarness::new().await else {
        return;
    };
    // The relay's pool is told apart from everything else by its application name.
    let name = unique_name("relay");
    let options = PgConnectOptions::from_str(&url())
        .expect("url")
        .application_name(&name);
    let relay_pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .expect("relay pool");
    let relay_store =
        PostgresStore::new(relay_pool.clone(), h.store.config().clone()).expect("store");
    let admin = h.store.pool().clone();
    let kill = move || {
        let (admin, name) = (admin.clone(), name.clone());
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = $1",
            )
            .bind(name)
            .fetch_one(&admin)
            .await
            .map_or(0, |n| u64::try_from(n).unwrap_or(0))
        }
    };
    scenarios::killed_connections_lose_nothing(&h, relay_store, kill).await;
    relay_pool.close().await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_row_is_dead_lettered_not_crash_looped() {
    let Some(h) = PgHarness::new().await else {
        return;
    };
    scenarios::corrupted_row_is_dead_lettered(&h).await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_get_the_same_message() {
    let Some(h) = PgHarness::new().await else {
        return;
    };
    scenarios::concurrent_claimers_never_overlap(&h).await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_are_written_whole_and_in_order() {
    let Some(h) = PgHarness::new().await else {
        return;
    };
    scenarios::large_batches_are_chunked(&h).await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_locked_elsewhere_still_holds_back_its_key() {
    let Some(h) = PgHarness::new().await else {
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
        "SELECT 1 FROM {} WHERE id = $1 FOR UPDATE",
        h.quoted()
    ))
    .bind(*ids[0].as_uuid())
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
    // A held claim may keep a2 locked, unreturned, until it settles.
    store
        .settle(
            claim.token,
            &outbox_core::Settlement {
                published: vec![ids[1]],
                ..Default::default()
            },
        )
        .await
        .expect("settle");
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

/// A held claim whose relay goes quiet (alive, but never settling) is ended by PostgreSQL once
/// its lease is over: another relay's store then claims the messages, and the late settle
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_claim_past_its_lease_is_ended_by_the_database() {
    let Some(h) = PgHarness::new().await else {
        return;
    };
    let Some(other_pool) = pool().await else {
        return;
    };
    let other = PostgresStore::new(other_pool, h.store().config().clone()).expect("store");
    scenarios::a_quiet_held_claim_is_ended_by_the_database(&h, other).await;
    h.teardown().await;
}

/// Relays that claim by lease and relays that hold their claims in a transaction can share a
/// table (while relays are upgraded one by one): neither hands out a message whose key has an
/// earlier message the other holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_and_leased_claims_share_a_table_in_key_order() {
    let Some(h) = PgHarness::new().await else {
        return;
    };
    let held = h.store();
    let leased = PostgresStore::new(
        held.pool().clone(),
        held.config()
            .clone()
            .claim_mode(outbox_sqlx::ClaimMode::Lease),
    )
    .expect("store");
    let relay = RelayId::random();
    own_everything(&held, &relay).await;
    let lease = Duration::from_secs(30);
    let ids = h
        .enqueue(vec![
            NewMessage::new("orders", "a1").key("a"),
            NewMessage::new("orders", "b1").key("b"),
            NewMessage::new("orders", "a2").key("a"),
            NewMessage::new("orders", "b2").key("b"),
        ])
        .await
        .expect("enqueue");
    let of = |claim: &outbox_core::Claim| claim.messages.iter().map(|m| m.id).collect::<Vec<_>>();
    let first = held.claim(&relay, 1, lease).await.expect("claim");
    assert_eq!(of(&first), vec![ids[0]]);
    let second = leased.claim(&relay, 10, lease).await.expect("claim");
    assert_eq!(
        of(&second),
        vec![ids[1], ids[3]],
        "a2 waits for the held a1"
    );
    let third = held.claim(&relay, 10, lease).await.expect("claim");
    assert!(
        third.is_empty(),
        "a2 waits for a1, b for the leased b1, b2: {third:?}"
    );
    let publish = |ids: Vec<outbox_core::MessageId>| outbox_core::Settlement {
        published: ids,
        ..Default::default()
    };
    let done = held
        .settle(first.token, &publish(vec![ids[0]]))
        .await
        .expect("settle");
    assert_eq!(done.applied, 1);
    let done = leased
        .settle(second.token, &publish(vec![ids[1], ids[3]]))
        .await
        .expect("settle");
    assert_eq!(done.applied, 2);
    let last = held.claim(&relay, 10, lease).await.expect("claim");
    assert_eq!(of(&last), vec![ids[2]]);
    let done = held
        .settle(last.token, &publish(vec![ids[2]]))
        .await
        .expect("settle");
    assert_eq!(done.applied, 1);
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_only_store_claims_what_the_log_relay_hands_over_in_key_order() {
    use outbox_core::{DeadLetterTo, Retry, Settlement};
    let Some(h) = PgHarness::new().await else {
        return;
    };
    let store = h.store();
    let handed = PostgresStore::new(
        store.pool().clone(),
        store.config().clone().handed_only(true),
    )
    .expect("store");
    let relay = RelayId::random();
    own_everything(&handed, &relay).await;
    let lease = Duration::from_secs(30);
    let ids = h
        .enqueue(vec![
            NewMessage::new("orders", "a1").key("a"),
            NewMessage::new("orders", "a2").key("a"),
            NewMessage::new("orders", "b1").key("b"),
            NewMessage::new("orders", "c1").key("c"),
            NewMessage::new("orders", "d1"),
        ])
        .await
        .expect("enqueue");
    let of = |claim: &outbox_core::Claim| claim.messages.iter().map(|m| m.id).collect::<Vec<_>>();
    let claim = handed.claim(&relay, 10, lease).await.expect("claim");
    assert!(claim.is_empty(), "nothing handed over yet: {claim:?}");
    let waiting = store.waiting_keys(None).await.expect("waiting");
    assert!(waiting.is_empty());

    // The log relay published d1 and b1, a1 failed (retried after a delay), a2 went with
    // its key, c1 failed for good.
    let settlement = Settlement {
        published: vec![ids[4], ids[2]],
        retry: vec![Retry {
            id: ids[0],
            delay: Duration::from_millis(300),
            error: "broker said no".into(),
        }],
        dead: vec![DeadLetterTo {
            id: ids[3],
            error: "too large".into(),
        }],
        release: vec![ids[1]],
    };
    assert_eq!(
        store
            .settle_log(&settlement, &[], &[ids[0], ids[1]])
            .await
            .expect("settle"),
        5
    );
    assert_eq!(
        store
            .settle_log(&settlement, &[], &[ids[0], ids[1]])
            .await
            .expect("settle again"),
        0,
        "recording the outcomes twice changes nothing more"
    );
    let waiting = store
        .waiting_keys(Some(&["a".into(), "b".into(), "c".into()]))
        .await
        .expect("waiting");
    assert_eq!(
        waiting,
        ["a".to_owned()].into_iter().collect(),
        "the table holds a1 and a2"
    );
    assert_eq!(
        store.waiting_keys(None).await.expect("waiting"),
        waiting,
        "every key the table holds"
    );
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.dead), (2, 1));

    // a1 waits for its retry delay, and a2 behind it.
    let claim = handed.claim(&relay, 10, lease).await.expect("claim");
    assert!(claim.is_empty(), "a1 is not due yet: {claim:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let claim = handed.claim(&relay, 10, lease).await.expect("claim");
    assert_eq!(of(&claim), vec![ids[0], ids[1]], "a1 then a2");
    assert_eq!(
        claim.messages[0].attempts, 1,
        "the log relay's attempt counts"
    );
    let done = handed
        .settle(
            claim.token,
            &Settlement {
                published: vec![ids[0], ids[1]],
                ..Default::default()
            },
        )
        .await
        .expect("settle");
    assert_eq!(done.applied, 2);
    assert_eq!(store.stats().await.expect("stats").pending, 0);

    // A row the log relay has not settled holds back a handed later row of its key.
    let more = h
        .enqueue(vec![
            NewMessage::new("orders", "e1").key("e"),
            NewMessage::new("orders", "e2").key("e"),
        ])
        .await
        .expect("enqueue");
    store
        .settle_log(
            &Settlement {
                release: vec![more[1]],
                ..Default::default()
            },
            &[],
            &[more[1]],
        )
        .await
        .expect("hand e2 over");
    let claim = handed.claim(&relay, 10, lease).await.expect("claim");
    assert!(claim.is_empty(), "e2 waits for e1: {claim:?}");
    assert!(
        PostgresStore::new(
            store.pool().clone(),
            store
                .config()
                .clone()
                .handed_only(true)
                .claim_mode(outbox_sqlx::ClaimMode::Lease),
        )
        .is_err(),
        "claims of handed messages are held in a transaction"
    );
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
        "outbox\"; DROP TABLE y; --",
        "a\"b",
        "a b",
        "",
        too_long.as_str(),
        "a.b.c",
        "tablé",
        "outbox-1",
        "1outbox",
    ];
    for table in attempts {
        let err =
            PostgresStore::new(pool.clone(), StoreConfig::new().table(table)).expect_err(table);
        assert_eq!(err.kind(), StoreErrorKind::Config, "{table:?}: {err}");
        assert!(err.to_string().contains("table name"), "{err}");
    }
    for channel in ["a b", "x'; NOTIFY y; --", ""] {
        let err = PostgresStore::new(pool.clone(), StoreConfig::new().notify_channel(channel))
            .expect_err(channel);
        assert_eq!(err.kind(), StoreErrorKind::Config, "{channel:?}: {err}");
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_qualified_tables_work() {
    let Some(pool) = pool().await else {
        return;
    };
    let schema = unique_name("app");
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&pool)
        .await
        .expect("create schema");
    let store = PostgresStore::new(
        pool.clone(),
        StoreConfig::new()
            .table(format!("{schema}.outbox"))
            .notify_channel("outbox_qualified"),
    )
    .expect("store");
    store.migrate().await.expect("migrate");
    let mut tx = pool.begin().await.expect("begin");
    let id = store
        .enqueue(&mut *tx, NewMessage::new("orders", "x").key("k"))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    let relay = RelayId::random();
    own_everything(&store, &relay).await;
    let claim = store
        .claim(&relay, 10, Duration::from_secs(30))
        .await
        .expect("claim");
    assert_eq!(claim.messages[0].id, id);
    let in_schema: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename LIKE 'outbox%'",
    )
    .bind(&schema)
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(in_schema, 4, "outbox, partitions, relays and schema tables");
    let settled = store
        .settle(
            claim.token,
            &outbox_core::Settlement {
                published: vec![id],
                ..Default::default()
            },
        )
        .await
        .expect("settle");
    assert_eq!(settled.applied, 1);
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .expect("drop schema");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_wake_on_commit_only() {
    let Some(h) = PgHarness::new().await else {
        return;
    };
    let store = h.store();
    let (wakeup, listening) = common::pg::listening(&store).await;
    h.enqueue(vec![NewMessage::new("orders", "x")])
        .await
        .expect("enqueue");
    tokio::time::timeout(Duration::from_secs(5), wakeup.woken())
        .await
        .expect("a commit wakes the listener");
    h.enqueue_rolled_back(vec![NewMessage::new("orders", "y")])
        .await
        .expect("enqueue");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), wakeup.woken())
            .await
            .is_err(),
        "a rollback does not"
    );
    listening.abort();

    // End to end: a relay that would poll only every 10 s publishes at once.
    let publisher = MemoryPublisher::new();
    let config = scenarios::relay_config()
        .poll_min(Duration::from_secs(10))
        .poll_max(Duration::from_secs(10));
    let relay = outbox_testkit::relay::RunningRelay::spawn(
        Relay::builder(store.clone(), publisher.clone())
            .config(config)
            .build()
            .expect("config"),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = publisher.count();
    h.enqueue(vec![NewMessage::new("orders", "z")])
        .await
        .expect("enqueue");
    assert!(
        publisher.wait_for(before + 1, Duration::from_secs(3)).await,
        "the notification woke the relay"
    );
    relay.stop(Duration::from_secs(10)).await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueues_without_notify_wake_nobody_and_are_still_relayed() {
    let Some(h) = PgHarness::new().await else {
        return;
    };
    let store = h.store();
    let quiet = PostgresStore::new(
        store.pool().clone(),
        StoreConfig::new().table(h.table.clone()).notify(false),
    )
    .expect("store");
    // Notifications are the table's (its trigger): migrate sets them as configured.
    quiet
        .migrate()
        .await
        .expect("migrate without notifications");
    let (wakeup, listening) = common::pg::listening(&store).await;
    let mut tx = quiet.pool().begin().await.expect("begin");
    quiet
        .enqueue(&mut *tx, NewMessage::new("orders", "quiet"))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), wakeup.woken())
            .await
            .is_err(),
        "no NOTIFY, no wake-up"
    );
    listening.abort();

    // The relay polls instead.
    let publisher = MemoryPublisher::new();
    let relay = outbox_testkit::relay::RunningRelay::spawn(
        Relay::builder(quiet.clone(), publisher.clone())
            .config(scenarios::relay_config())
            .build()
            .expect("config"),
    );
    assert!(
        publisher.wait_for(1, Duration::from_secs(5)).await,
        "published by polling"
    );
    relay.stop(Duration::from_secs(10)).await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_versioned() {
    let Some(pool) = pool().await else {
        return;
    };
    let store = PostgresStore::new(pool.clone(), common::fresh_config()).expect("store");
    assert_eq!(store.schema_version().await.expect("version"), 0);
    let (a, b, c) = tokio::join!(store.migrate(), store.migrate(), store.migrate());
    a.and(b).and(c).expect("concurrent migrations");
    store.migrate().await.expect("again");
    assert_eq!(
        store.schema_version().await.expect("version"),
        PostgresStore::SCHEMA_VERSION
    );
    let partitions: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}_partitions\"",
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
async fn a_version_2_outbox_keeps_its_messages_through_the_upgrade() {
    let Some(pool) = pool().await else {
        return;
    };
    let store = PostgresStore::new(pool.clone(), common::fresh_config()).expect("store");
    store.migrate().await.expect("migrate");
    let table = store.config().table.clone();
    // What schema version 2 left: no claim functions, no triggers.
    sqlx::raw_sql(&format!(
        "DROP FUNCTION \"{table}_claim\"; DROP FUNCTION \"{table}_take\"; \
         DROP TRIGGER \"{table}_fill\" ON \"{table}\"; DROP FUNCTION \"{table}_fill\"(); \
         DROP TRIGGER \"{table}_notify\" ON \"{table}\"; DROP FUNCTION \"{table}_notify\"(); \
         DELETE FROM \"{table}_schema\" WHERE version >= 3"
    ))
    .execute(&pool)
    .await
    .expect("back to version 2");
    assert_eq!(store.schema_version().await.expect("version"), 2);
    let mut tx = pool.begin().await.expect("begin");
    let ids = store
        .enqueue_batch(
            &mut *tx,
            (0..3)
                .map(|i| NewMessage::new("orders", format!("{i}")).key("k"))
                .collect(),
        )
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    let relay = RelayId::random();
    own_everything(&store, &relay).await;
    let err = store
        .claim(&relay, 10, Duration::from_secs(30))
        .await
        .expect_err("claims need version 5");
    assert_eq!(err.kind(), StoreErrorKind::Schema, "{err}");

    let file = || {
        sqlx::query_scalar::<_, i64>("SELECT pg_relation_filenode($1)::bigint")
            .bind(format!("\"{table}\""))
            .fetch_one(&pool)
    };
    let before = file().await.expect("file");
    store.migrate().await.expect("upgrade");
    assert_eq!(
        store.schema_version().await.expect("version"),
        PostgresStore::SCHEMA_VERSION
    );
    assert_eq!(
        file().await.expect("file"),
        before,
        "the table is not rewritten"
    );
    let claim = store
        .claim(&relay, 10, Duration::from_secs(30))
        .await
        .expect("claim");
    let claimed: Vec<_> = claim.messages.iter().map(|m| m.id).collect();
    assert_eq!(claimed, ids);
    store.drop_tables().await.expect("drop");
    for function in ["claim", "take", "fill", "notify", "uuid7"] {
        let left: Option<String> = sqlx::query_scalar("SELECT to_regproc($1)::text")
            .bind(format!("\"{table}_{function}\""))
            .fetch_one(&pool)
            .await
            .expect("function lookup");
        assert_eq!(left, None, "drop_tables removes the {function} function");
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_a_schema_error_that_stops_the_relay() {
    let Some(pool) = pool().await else {
        return;
    };
    let store = PostgresStore::new(pool.clone(), common::fresh_config()).expect("store");
    let err = store
        .claim(&RelayId::random(), 10, Duration::from_secs(1))
        .await
        .expect_err("no table");
    assert_eq!(err.kind(), StoreErrorKind::Schema, "{err}");
    assert!(!err.is_transient());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_output_never_shows_the_password() {
    if pool().await.is_none() {
        return;
    }
    // Trust authentication accepts any password: this one only has to stay secret.
    let with_password = url().replacen("postgres://postgres@", "postgres://postgres:s3cr3t-pw@", 1);
    assert!(with_password.contains("s3cr3t-pw"), "{with_password}");
    let config = common::fresh_config().url(with_password);
    let store = PostgresStore::connect(config.clone())
        .await
        .expect("connect with a URL holding a password");
    for text in [format!("{config:?}"), format!("{store:?}")] {
        assert!(!text.contains("s3cr3t-pw"), "{text}");
        assert!(text.contains("127.0.0.1"), "{text}");
    }
    store.pool().close().await;
}

/// The relay drops in-flight store calls when it stops; a call cancelled at any point must not
/// leave a connection in an open transaction holding locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_never_leave_anything_locked() {
    let Some(h) = PgHarness::new().await else {
        return;
    };
    scenarios::cancelled_calls_leave_nothing_locked(&h).await;
    h.teardown().await;
}

/// A call cancelled while its rows arrive leaves its connection in step with the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_reads_leave_connections_in_step() {
    let Some(h) = PgHarness::new().await else {
        return;
    };
    scenarios::cancelled_reads_leave_connections_in_step(&h).await;
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_takes_what_sqlx_takes_and_batches_are_whole_or_nothing() {
    let Some(h) = PgHarness::new().await else {
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
    let store = PostgresStore::new(pool.clone(), common::fresh_config()).expect("store");
    sqlx_migrator_migrates!(store, &pool, PostgresStore::SCHEMA_VERSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_applies_each_message_once_in_the_callers_transaction() {
    let Some(h) = common::inboxes::postgres().await else {
        return;
    };
    inbox_process_applies_once!(&h.inbox, &h.pool, h.pool.begin());
    outbox_testkit::InboxHarness::teardown(h).await;
}
