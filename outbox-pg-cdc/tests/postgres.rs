//! The log source against a PostgreSQL cluster of each test's own (`wal_level = logical`):
//! messages enqueued by `PostgresStore` come back from the log unchanged, in commit order,
//! once; the slot moves only past confirmed transactions, and on its own while idle; a
//! missing or lost slot stops the source with an error that says so.

mod common;

use std::time::Duration;

use outbox_core::NewMessage;
use outbox_pg_cdc::{CdcAdmin, CdcConfig, CdcError, LogBatch, Lsn, PgLogSource};
use outbox_sqlx::sqlx::postgres::PgPool;
use outbox_sqlx::sqlx::{self, Executor};
use outbox_testkit::env::{or_skip, service_url, unique_name};

use common::{Fixture, STATUS_INTERVAL};

/// The next batch, failing the test after 20 s.
async fn next(source: &mut PgLogSource) -> LogBatch {
    tokio::time::timeout(Duration::from_secs(20), source.next())
        .await
        .expect("a batch within 20 s")
        .expect("a batch")
}

fn ids(batch: &LogBatch) -> Vec<String> {
    batch.messages.iter().map(|m| m.id.to_string()).collect()
}

fn message(n: u32) -> NewMessage {
    NewMessage::new("orders", format!("payload {n}")).key(format!("key-{}", n % 3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_come_back_unchanged_and_rolled_back_ones_never_do() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let mut source = fx.source().await;
    let binary: Vec<u8> = (0..=255).collect();
    let keyed = NewMessage::new("orders.created", binary.clone())
        .key("order-7")
        .header("type", "OrderCreated")
        .header("trace", "é \"quoted\" \\ {}");
    let keyless = NewMessage::new("audit", Vec::new());
    let sent = vec![keyed.clone(), keyless.clone()];
    fx.commit(sent.clone()).await;

    let mut tx = fx.pool.begin().await.expect("begin");
    let rolled_back = fx
        .store
        .enqueue(&mut *tx, NewMessage::new("orders", "never"))
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    let last = message(1);
    fx.commit(vec![last.clone()]).await;

    let batch = next(&mut source).await;
    assert_eq!(batch.messages.len(), 2);
    assert!(batch.malformed.is_empty());
    for (got, want) in batch.messages.iter().zip(&sent) {
        assert_eq!(got.id, want.id());
        assert_eq!(got.destination, want.destination());
        assert_eq!(got.key.as_deref(), want.ordering_key());
        assert_eq!(got.payload, want.payload());
        assert_eq!(&got.headers, want.headers());
        assert_eq!(got.attempts, 0);
        assert!(got.last_error.is_none());
        let age = chrono::Utc::now() - got.created_at;
        assert!(
            age.num_seconds().abs() < 60,
            "created_at {}",
            got.created_at
        );
    }
    assert_eq!(batch.messages[1].key, None);
    assert!(batch.messages[1].payload.is_empty());
    source.confirm(batch.end_lsn).expect("confirm");

    // Commit order: the rolled-back transaction would have come before this one.
    let batch = next(&mut source).await;
    assert_eq!(ids(&batch), vec![last.id().to_string()]);
    assert!(!ids(&batch).contains(&rolled_back.to_string()));
    source.confirm(batch.end_lsn).expect("confirm");
    source.close().await.expect("close");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_transactions_come_in_commit_order() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let mut source = fx.source().await;
    let (first, second, third) = (message(1), message(2), message(3));
    let mut early = fx.pool.begin().await.expect("begin");
    let mut late = fx.pool.begin().await.expect("begin");
    fx.store
        .enqueue(&mut *early, first.clone())
        .await
        .expect("enqueue");
    fx.store
        .enqueue(&mut *late, second.clone())
        .await
        .expect("enqueue");
    fx.store
        .enqueue(&mut *early, third.clone())
        .await
        .expect("enqueue");
    // The transaction that enqueued later commits first.
    late.commit().await.expect("commit");
    early.commit().await.expect("commit");

    let a = next(&mut source).await;
    let b = next(&mut source).await;
    assert_eq!(ids(&a), vec![second.id().to_string()]);
    assert_eq!(
        ids(&b),
        vec![first.id().to_string(), third.id().to_string()]
    );
    assert!(a.end_lsn <= b.commit_lsn);
    source.close().await.expect("close");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_source_resumes_after_the_last_confirmed_transaction() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let mut source = fx.source().await;
    let sent: Vec<NewMessage> = (1..=3).map(message).collect();
    for m in &sent {
        fx.commit(vec![m.clone()]).await;
    }
    let batches = [
        next(&mut source).await,
        next(&mut source).await,
        next(&mut source).await,
    ];
    for (batch, m) in batches.iter().zip(&sent) {
        assert_eq!(ids(batch), vec![m.id().to_string()]);
    }
    // The broker confirmed the first and the third, not the second.
    source.confirm(batches[2].end_lsn).expect("confirm");
    source.confirm(batches[0].end_lsn).expect("confirm");
    assert_eq!(source.acknowledged(), batches[0].end_lsn);
    source.close().await.expect("close");
    let status = fx.admin.slot_status().await.expect("status");
    assert_eq!(status.confirmed_flush_lsn, batches[0].end_lsn);

    // The second and the third again: the third was confirmed behind an unconfirmed one.
    let mut source = fx.source().await;
    let again = [next(&mut source).await, next(&mut source).await];
    assert_eq!(ids(&again[0]), vec![sent[1].id().to_string()]);
    assert_eq!(ids(&again[1]), vec![sent[2].id().to_string()]);
    assert_eq!(again[1].end_lsn, batches[2].end_lsn);
    source.confirm(again[0].end_lsn).expect("confirm");
    source.confirm(again[1].end_lsn).expect("confirm");
    source.close().await.expect("close");
    let status = fx.admin.slot_status().await.expect("status");
    assert!(status.confirmed_flush_lsn >= batches[2].end_lsn);

    // Nothing again: only what is new.
    let mut source = fx.source().await;
    let fourth = message(4);
    fx.commit(vec![fourth.clone()]).await;
    let batch = next(&mut source).await;
    assert_eq!(ids(&batch), vec![fourth.id().to_string()]);
    source.close().await.expect("close");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_slot_is_an_error_and_is_never_recreated() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let never_created = fx.config.clone().slot(unique_name("missing"));
    let err = PgLogSource::connect(&never_created)
        .await
        .expect_err("no such slot");
    assert!(matches!(err, CdcError::SlotMissing { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(!err.is_transient());

    // A slot dropped under a configuration that had one.
    fx.admin.drop().await.expect("drop");
    let err = PgLogSource::connect(&fx.config)
        .await
        .expect_err("the slot was dropped");
    assert!(matches!(err, CdcError::SlotMissing { .. }), "{err}");
    let err = fx.admin.slot_status().await.expect_err("no slot");
    assert!(matches!(err, CdcError::SlotMissing { .. }), "{err}");
    fx.admin.ensure().await.expect("set up again, deliberately");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_slot_advances_and_an_unconfirmed_one_does_not() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let other = format!("\"{}\"", unique_name("other"));
    fx.pool
        .execute(format!("CREATE TABLE {other} (n BIGINT)").as_str())
        .await
        .expect("a table outside the outbox");
    let mut source = fx.source().await;

    // Nothing pending: keepalives move the slot past WAL the outbox has no part in.
    let start = fx
        .admin
        .slot_status()
        .await
        .expect("status")
        .confirmed_flush_lsn;
    let written = write_elsewhere(&fx.pool, &other).await;
    let advanced = poll_slot(&fx.admin, &mut source, |lsn| lsn >= written).await;
    assert!(
        advanced >= written && advanced > start,
        "the idle slot stayed at {advanced}, WAL is at {written}"
    );

    // An unconfirmed batch holds the slot where it was, however much WAL follows.
    let held = fx
        .admin
        .slot_status()
        .await
        .expect("status")
        .confirmed_flush_lsn;
    fx.commit(vec![message(1)]).await;
    let batch = next(&mut source).await;
    let written = write_elsewhere(&fx.pool, &other).await;
    let stayed = poll_slot(&fx.admin, &mut source, |_| false).await;
    assert!(
        stayed < batch.end_lsn && stayed <= written,
        "the slot moved to {stayed} past the unconfirmed batch ending at {}",
        batch.end_lsn
    );
    assert!(stayed >= held);
    assert_eq!(source.unconfirmed(), 1);

    // Confirmed, the slot moves past it, then on with the WAL again.
    source.confirm(batch.end_lsn).expect("confirm");
    let written = write_elsewhere(&fx.pool, &other).await;
    let moved = poll_slot(&fx.admin, &mut source, |lsn| lsn >= written).await;
    assert!(
        moved >= written,
        "the slot stayed at {moved}, WAL is at {written}"
    );
    source.close().await.expect("close");
    fx.finish().await;
}

/// Writes WAL the outbox has no part in; returns the WAL position after it.
async fn write_elsewhere(pool: &PgPool, table: &str) -> Lsn {
    pool.execute(format!("INSERT INTO {table} SELECT generate_series(1, 1000)").as_str())
        .await
        .expect("insert elsewhere");
    current_wal_lsn(pool).await
}

async fn current_wal_lsn(pool: &PgPool) -> Lsn {
    let text: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .expect("the WAL position");
    text.parse().expect("an LSN")
}

/// Keeps the source reading (it must find no batch) for up to ten status intervals, or
/// until `done` says the slot's confirmed position is far enough; returns that position.
async fn poll_slot(admin: &CdcAdmin, source: &mut PgLogSource, done: impl Fn(Lsn) -> bool) -> Lsn {
    let mut confirmed = Lsn::ZERO;
    for _ in 0..10 {
        if let Ok(batch) = tokio::time::timeout(STATUS_INTERVAL * 2, source.next()).await {
            panic!("no batch expected, got {batch:?}");
        }
        confirmed = admin
            .slot_status()
            .await
            .expect("status")
            .confirmed_flush_lsn;
        if done(confirmed) {
            break;
        }
    }
    confirmed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_are_answered_while_the_caller_is_busy() {
    // The server ends a session that does not answer its keepalives within 2 s.
    let Some(fx) = Fixture::with_settings(&[("wal_sender_timeout", "2s")]).await else {
        return;
    };
    let mut source = fx.source().await;
    fx.commit(vec![message(1)]).await;
    let first = next(&mut source).await;
    // A broker that takes three timeouts to confirm: nobody reads the stream meanwhile.
    tokio::time::sleep(Duration::from_secs(6)).await;
    source.confirm(first.end_lsn).expect("confirm");
    let second = message(2);
    fx.commit(vec![second.clone()]).await;
    let batch = next(&mut source).await;
    assert_eq!(ids(&batch), vec![second.id().to_string()]);
    source.confirm(batch.end_lsn).expect("confirm");
    source.close().await.expect("close");
    let status = fx.admin.slot_status().await.expect("status");
    assert!(status.confirmed_flush_lsn >= batch.end_lsn, "{status:?}");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_the_source_does_not_interpret_stop_it() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let table = format!("\"{}\"", fx.config.table);
    fx.pool
        .execute(
            format!(
                "ALTER PUBLICATION {} SET (publish = 'insert, update')",
                fx.config.publication
            )
            .as_str(),
        )
        .await
        .expect("publish updates too");
    let mut source = fx.source().await;
    fx.commit(vec![message(1)]).await;
    let batch = next(&mut source).await;
    assert_eq!(batch.messages.len(), 1);
    fx.pool
        .execute(format!("UPDATE {table} SET attempts = attempts + 1").as_str())
        .await
        .expect("update the outbox");
    let err = tokio::time::timeout(Duration::from_secs(20), source.next())
        .await
        .expect("an answer")
        .expect_err("an update stops the source");
    assert!(matches!(err, CdcError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("UPDATE"), "{err}");
    let again = source.next().await.expect_err("still stopped");
    assert!(matches!(again, CdcError::Failed(_)), "{again}");
    source.close().await.expect("close");

    // ensure refuses the publication as it now is, rather than reading updates.
    let err = fx.admin.ensure().await.expect_err("not inserts only");
    assert!(matches!(err, CdcError::Mismatch(_)), "{err}");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_is_an_error_that_says_so() {
    let Some(fx) = Fixture::with_settings(&[("max_slot_wal_keep_size", "1MB")]).await else {
        return;
    };
    let other = format!("\"{}\"", unique_name("other"));
    fx.pool
        .execute(format!("CREATE TABLE {other} (n BIGINT)").as_str())
        .await
        .expect("a table outside the outbox");
    // No source reads the slot: the WAL it holds passes the limit and is removed.
    for _ in 0..4 {
        fx.pool
            .execute(
                format!(
                    "INSERT INTO {other} SELECT generate_series(1, 100); SELECT pg_switch_wal()"
                )
                .as_str(),
            )
            .await
            .expect("fill a WAL segment");
    }
    fx.pool.execute("CHECKPOINT").await.expect("checkpoint");
    let status = fx.admin.slot_status().await.expect("status");
    assert!(status.is_lost(), "wal_status is {}", status.wal_status);
    let err = PgLogSource::connect(&fx.config)
        .await
        .expect_err("a lost slot");
    assert!(matches!(err, CdcError::SlotLost { .. }), "{err}");
    assert!(err.to_string().contains("invalidated"), "{err}");
    assert!(!err.is_transient());
    let err = fx.admin.ensure().await.expect_err("not recreated");
    assert!(matches!(err, CdcError::SlotLost { .. }), "{err}");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_is_idempotent_when_run_at_once() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let fresh = fx
        .config
        .clone()
        .slot(unique_name("slot"))
        .publication(unique_name("pub"));
    let one = CdcAdmin::new(fx.pool.clone(), fresh.clone()).expect("admin");
    let two = CdcAdmin::new(fx.pool.clone(), fresh).expect("admin");
    let (a, b) = tokio::join!(one.ensure(), two.ensure());
    a.expect("first");
    b.expect("second");
    one.ensure().await.expect("again");
    let status = one.slot_status().await.expect("status");
    assert!(!status.is_lost());
    assert!(status.lag_bytes < 1024 * 1024, "{status:?}");
    one.drop().await.expect("drop");
    one.drop().await.expect("drop again");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_a_server_without_logical_wal() {
    let url = service_url(
        "OUTBOX_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    let Some(admin) = or_skip(
        "the shared PostgreSQL server",
        CdcAdmin::connect(CdcConfig::new(url)).await,
    ) else {
        return;
    };
    let wal_level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(admin.pool())
        .await
        .expect("wal_level");
    if wal_level == "logical" {
        eprintln!("skipping: the shared server has wal_level = logical");
        return;
    }
    let err = admin.check().await.expect_err("wal_level is not logical");
    assert!(matches!(err, CdcError::NotReady(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("wal_level is {wal_level}"))
            && text.contains("wal_level = logical")
            && text.contains("restart"),
        "{text}"
    );
}
