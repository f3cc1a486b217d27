//! The log relay's order promise, on two transactions that overlap: per key, first deliveries
//! come in **commit order** (docs/cdc.md), also when the second INSERT's transaction commits
//! first. The chaos runs of `postgres-cdc-*` check this on every key of every run, but a
//! message there rarely fails while others of its call pass (a whole call failing is an
//! outage, which hands nothing to the table), so the path where the log relay hands a key to
//! the table is seldom taken. Here it is taken on cue: the message of the transaction that
//! committed first fails once while another key's message of its call is confirmed.
//!
//! A private cluster (`wal_level = logical`), the slot and publication made by `CdcAdmin`,
//! a [`LogRelay`] on [`PgOutboxLog`] and the polling relay of handed rows beside it, both
//! publishing to one [`ScriptedPublisher`].

use std::collections::HashSet;
use std::time::Duration;

use outbox_core::{LogRelay, MessageId, NewMessage, Relay, RelayConfig, RetryPolicy};
use outbox_pg_cdc::{CdcAdmin, CdcConfig, CdcError, PgOutboxLog};
use outbox_sqlx::sqlx::postgres::{PgPool, PgPoolOptions};
use outbox_sqlx::{PostgresStore, StoreConfig};
use outbox_testkit::ScriptedPublisher;
use outbox_testkit::env::{or_skip, unique_name};
use outbox_testkit::servers::{PrivatePostgres, ServerError};

/// The relays' configuration: a first retry 1 s after a failure, so that the failed message
/// still waits in the table when the other transaction commits.
fn config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(50)
        .poll_min(Duration::from_millis(10))
        .poll_max(Duration::from_millis(100))
        .probe_max(Duration::from_millis(200))
        .shutdown_timeout(Duration::from_secs(5))
        .retry(
            RetryPolicy::default()
                .initial_delay(Duration::from_secs(1))
                .max_delay(Duration::from_secs(1))
                .jitter(0.0)
                .max_attempts(5),
        )
}

/// A private cluster with an outbox table, its slot and publication.
struct Cluster {
    server: PrivatePostgres,
    _dir: tempfile::TempDir,
    pool: PgPool,
    store: PostgresStore,
    cdc: CdcConfig,
}

impl Cluster {
    async fn start() -> Option<Self> {
        let dir = tempfile::Builder::new()
            .prefix("outbox-cdc-order-")
            .tempdir()
            .expect("a temporary directory");
        let settings = [
            ("wal_level", "logical"),
            ("max_replication_slots", "10"),
            ("max_wal_senders", "10"),
        ];
        let server = match PrivatePostgres::start_with(dir.path(), &settings).await {
            Ok(server) => server,
            Err(ServerError::Unavailable(why)) => {
                return or_skip::<Self, _>("a private PostgreSQL cluster", Err(why));
            }
            Err(err) => panic!("the private cluster does not start: {err}"),
        };
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&server.url())
            .await
            .expect("connect to the private cluster");
        let table = unique_name("outbox");
        let store =
            PostgresStore::new(pool.clone(), StoreConfig::new().table(&table)).expect("store");
        store.migrate().await.expect("migrate");
        let cdc = CdcConfig::new(server.url())
            .table(&table)
            .slot(unique_name("slot"))
            .publication(unique_name("pub"))
            .status_interval(Duration::from_millis(200));
        let admin = CdcAdmin::new(pool.clone(), cdc.clone()).expect("admin");
        admin.check().await.expect("the private cluster is ready");
        admin.ensure().await.expect("publication and slot");
        Some(Self {
            server,
            _dir: dir,
            pool,
            store,
            cdc,
        })
    }

    async fn rows(&self) -> i64 {
        outbox_sqlx::sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.cdc.table))
            .fetch_one(&self.pool)
            .await
            .expect("count rows")
    }
}

/// The first deliveries of `key`, in the order the broker got them.
fn firsts(publisher: &ScriptedPublisher, key: &str) -> Vec<MessageId> {
    let mut seen = HashSet::new();
    publisher
        .inner()
        .published()
        .into_iter()
        .filter(|m| m.key.as_deref() == Some(key) && seen.insert(m.id))
        .map(|m| m.id)
        .collect()
}

/// Two transactions enqueue for key `k`: `first` INSERTs before `second`, and `second`
/// commits first (with a message of key `j` beside it). `fail_second` makes `second`'s
/// message fail once while `j`'s is confirmed in the same call. Returns the first deliveries
/// of `k` once the table is empty, with `(first, second)`'s ids.
async fn overlapping(fail_second: bool) -> Option<(Vec<MessageId>, MessageId, MessageId)> {
    let cluster = Cluster::start().await?;
    let publisher = ScriptedPublisher::new();
    let handed = PostgresStore::new(
        cluster.pool.clone(),
        StoreConfig::new()
            .table(&cluster.cdc.table)
            .handed_only(true),
    )
    .expect("handed store");
    let polling = Relay::builder(handed, publisher.clone())
        .config(config())
        .build()
        .expect("polling relay")
        .spawn(std::future::pending());
    let source = loop {
        match PgOutboxLog::connect(cluster.cdc.clone(), cluster.store.clone()).await {
            Err(CdcError::SlotInUse { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => break other.expect("the log source connects"),
        }
    };
    let log_relay = LogRelay::builder(source, publisher.clone())
        .config(config())
        .build()
        .expect("log relay");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let log_task = tokio::spawn(async move {
        log_relay
            .run(async move {
                let _ = stopped.await;
            })
            .await
    });

    let first = NewMessage::new("orders", "first").key("k");
    let second = NewMessage::new("orders", "second").key("k");
    let beside = NewMessage::new("orders", "beside").key("j");
    if fail_second {
        publisher.fail_transient(second.id(), 1);
    }
    let mut t1 = cluster.pool.begin().await.expect("begin");
    cluster
        .store
        .enqueue_batch(&mut *t1, vec![first.clone()])
        .await
        .expect("enqueue first");
    let mut t2 = cluster.pool.begin().await.expect("begin");
    cluster
        .store
        .enqueue_batch(&mut *t2, vec![second.clone(), beside.clone()])
        .await
        .expect("enqueue second");
    t2.commit().await.expect("commit second");
    // The log relay reads the second transaction (and hands its message to the table when
    // it fails) before the first commits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    t1.commit().await.expect("commit first");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while cluster.rows().await > 0 || firsts(&publisher, "k").len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained within 30 s: {} rows left, {:?} delivered",
            cluster.rows().await,
            firsts(&publisher, "k")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let order = firsts(&publisher, "k");
    let _ = stop.send(());
    log_task
        .await
        .expect("the log relay's task")
        .expect("the log relay stops cleanly");
    polling.shutdown();
    polling.await.expect("the polling relay stops");
    cluster.store.drop_tables().await.ok();
    cluster.pool.close().await;
    cluster.server.stop().await;
    Some((order, first.id(), second.id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_transactions_of_a_key_arrive_in_commit_order() {
    let Some((order, first, second)) = overlapping(false).await else {
        return;
    };
    assert_eq!(
        order,
        vec![second, first],
        "the transaction that committed first arrives first"
    );
}

/// The log relay hands `second` to the table after its failure (available again in 1 s), then
/// `first` (its key waits there; available at once). `first` was inserted before `second`, so
/// the sequence numbers of the INSERTs would let the polling relay publish it at once; the
/// rows handed over take new sequence numbers in the order of the log, so `second` holds
/// `first` back until it is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_transactions_keep_commit_order_when_the_first_to_commit_fails_once() {
    let Some((order, first, second)) = overlapping(true).await else {
        return;
    };
    assert_eq!(
        order,
        vec![second, first],
        "the transaction that committed first arrives first, also through the table"
    );
}
