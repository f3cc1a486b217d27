//! Test harnesses of the three stores on real servers: a fresh table per test, dropped at the
//! end, so tests run in parallel. Servers come from `OUTBOX_TEST_POSTGRES_URL` and
//! `OUTBOX_TEST_MYSQL_URL` (loopback defaults); a missing one skips the test unless
//! `OUTBOX_TEST_REQUIRE=1`.

#![allow(dead_code, unreachable_pub, unused_imports, unused_macros)]

use std::time::Duration;

use outbox_core::{MessageId, NewMessage, StoreError};
use outbox_sqlx::StoreConfig;
use outbox_testkit::StoreHarness;
use outbox_testkit::env::{or_skip, service_url, unique_name};

/// The body of a test that every store's inherent `enqueue` takes what sqlx's `execute` takes
/// (`&mut tx`, `&mut *tx`, a connection, the pool), and that a batch written in several
/// statements is written whole or not at all, leaving the caller's transaction usable.
/// A macro: the executor types differ by database.
macro_rules! enqueue_forms {
    ($store:expr, $begin:expr) => {{
        let store = $store;
        let message = |n: usize| outbox_core::NewMessage::new("orders", format!("{n}")).key("k");
        let mut expected = Vec::new();

        let mut tx = $begin.await.expect("begin");
        expected.push(store.enqueue(&mut tx, message(1)).await.expect("&mut tx"));
        expected.push(store.enqueue(&mut *tx, message(2)).await.expect("&mut *tx"));
        tx.commit().await.expect("commit");
        expected.push(
            store
                .enqueue(store.pool(), message(3))
                .await
                .expect("&pool"),
        );
        let mut conn = store.pool().acquire().await.expect("acquire");
        expected.push(
            store
                .enqueue(&mut *conn, message(4))
                .await
                .expect("connection"),
        );
        drop(conn);

        // A batch of two statements (more than 1,000 rows) whose second one fails on an id
        // that is already stored: nothing of it stays, and the caller's transaction goes on.
        let mut tx = $begin.await.expect("begin");
        expected.push(
            store
                .enqueue(&mut tx, message(5))
                .await
                .expect("before the batch"),
        );
        let mut batch: Vec<_> = (0..1_001).map(|n| message(100 + n)).collect();
        batch.push(message(0).with_id(expected[0]));
        let failed = store.enqueue_batch(&mut tx, batch).await;
        assert!(
            failed.is_err(),
            "a duplicate id fails the batch: {failed:?}"
        );
        let after = store
            .enqueue_batch(&mut tx, vec![message(6), message(7)])
            .await;
        expected.extend(after.expect("after the failed batch"));
        tx.commit().await.expect("commit");
        assert!(
            store
                .enqueue_batch(store.pool(), Vec::new())
                .await
                .expect("empty")
                .is_empty()
        );

        let relay = outbox_core::RelayId::random();
        let all: Vec<u16> = (0..outbox_core::PARTITIONS).collect();
        let ttl = std::time::Duration::from_secs(60);
        outbox_core::Store::acquire(&store, &relay, &all, ttl)
            .await
            .expect("acquire");
        let claim = outbox_core::Store::claim(&store, &relay, 10_000, ttl)
            .await
            .expect("claim");
        let claimed: Vec<_> = claim.messages.iter().map(|m| m.id).collect();
        assert_eq!(
            claimed, expected,
            "each form enqueued once, the failed batch not at all"
        );
    }};
}

/// The body of a test that the outbox's migrations run from a `sqlx` `Migrator`: `$store` is
/// a store on a table that was never migrated, `$pool` its pool, `$latest` its schema version. The versions are this test's
/// own and removed at the end, so tests sharing a database do not see each other's.
macro_rules! sqlx_migrator_migrates {
    ($store:expr, $pool:expr, $latest:expr) => {{
        let store = $store;
        let pool = $pool;
        assert_eq!(store.schema_version().await.expect("version"), 0);
        let first = 9_000_000_000_000 + i64::from(fastrand::u32(..)) * 1_000;
        let migrations = store.sqlx_migrations(first).into_vec();
        assert_eq!(migrations.len() as i32, $latest);
        let mut migrator = sqlx::migrate::Migrator::new(store.sqlx_migrations(first))
            .await
            .expect("migrator");
        // Other tests' migrations share the database's record of applied migrations.
        migrator.set_ignore_missing(true);
        migrator
            .run(pool)
            .await
            .expect("the outbox migrations through sqlx");
        let latest = store.schema_version().await.expect("version");
        assert_eq!(latest, $latest, "every step recorded");
        migrator.run(pool).await.expect("run again: nothing to do");
        store
            .migrate()
            .await
            .expect("the store finds nothing to do");
        let id = store
            .enqueue(pool, outbox_core::NewMessage::new("orders", "x").key("k"))
            .await
            .expect("enqueue on the migrated tables");
        let relay = outbox_core::RelayId::random();
        let all: Vec<u16> = (0..outbox_core::PARTITIONS).collect();
        let ttl = std::time::Duration::from_secs(60);
        let owned = outbox_core::Store::acquire(&store, &relay, &all, ttl)
            .await
            .expect("acquire: the partition rows were seeded");
        assert_eq!(owned.len(), all.len());
        let claim = outbox_core::Store::claim(&store, &relay, 10, ttl)
            .await
            .expect("claim");
        assert_eq!(
            claim.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![id]
        );
        sqlx::query(&format!(
            "DELETE FROM _sqlx_migrations WHERE version BETWEEN {first} AND {}",
            first + 999
        ))
        .execute(pool)
        .await
        .expect("forget this test's migrations");
        store.drop_tables().await.expect("drop");
    }};
}

/// The body of a test that `$inbox.process` applies an effect once per message and consumer,
/// in the caller's transaction (begun by `$begin`), and that a failed effect rolled back
/// leaves the message new. `$pool` is the inbox's pool.
macro_rules! inbox_process_applies_once {
    ($inbox:expr, $pool:expr, $begin:expr) => {{
        type BoxError = Box<dyn std::error::Error + Send + Sync>;
        let inbox = $inbox;
        let pool = $pool;
        let counter = outbox_testkit::env::unique_name("effects");
        sqlx::query(&format!("CREATE TABLE {counter} (n BIGINT NOT NULL)"))
            .execute(pool)
            .await
            .expect("create the effect table");
        sqlx::query(&format!("INSERT INTO {counter} (n) VALUES (0)"))
            .execute(pool)
            .await
            .expect("insert the counter");
        let bump = format!("UPDATE {counter} SET n = n + 1");
        let count = async || -> i64 {
            sqlx::query_scalar(&format!("SELECT n FROM {counter}"))
                .fetch_one(pool)
                .await
                .expect("read the counter")
        };
        let incoming = |id: outbox_core::MessageId| {
            outbox_core::Incoming::new(Some(&id.to_string()), "orders", "x").expect("incoming")
        };

        let first = incoming(outbox_core::MessageId::new());
        for delivery in 0..3 {
            let mut tx = $begin.await.expect("begin");
            let processed = inbox
                .process(&mut tx, "billing", &first, async |conn| {
                    sqlx::query(&bump).execute(&mut *conn).await?;
                    Ok::<_, BoxError>(delivery)
                })
                .await
                .expect("process");
            tx.commit().await.expect("commit");
            let expected = if delivery == 0 {
                outbox_core::Processed::Applied(0)
            } else {
                outbox_core::Processed::Duplicate
            };
            assert_eq!(processed, expected, "delivery {delivery}");
        }
        assert_eq!(count().await, 1, "applied once");

        let second = incoming(outbox_core::MessageId::new());
        let mut tx = $begin.await.expect("begin");
        let failed = inbox
            .process(&mut tx, "billing", &second, async |conn| {
                sqlx::query(&bump).execute(&mut *conn).await?;
                Err::<(), BoxError>("the effect failed".into())
            })
            .await;
        assert!(failed.is_err());
        tx.rollback().await.expect("rollback");
        let mut tx = $begin.await.expect("begin");
        let processed = inbox
            .process(&mut tx, "billing", &second, async |conn| {
                sqlx::query(&bump).execute(&mut *conn).await?;
                Ok::<_, BoxError>(())
            })
            .await
            .expect("process");
        tx.commit().await.expect("commit");
        assert!(
            processed.is_applied(),
            "the failed attempt left the message new"
        );
        assert_eq!(count().await, 2);
        sqlx::query(&format!("DROP TABLE {counter}"))
            .execute(pool)
            .await
            .expect("drop the effect table");
    }};
}

/// Connections per test pool: enough for three relays sharing one store.
pub const POOL_SIZE: u32 = 16;

/// A configuration on a table of this test alone.
pub fn fresh_config() -> StoreConfig {
    StoreConfig::new().table(unique_name("outbox"))
}

/// Closes `pool`, which waits until every connection came back to it: one that never does (a
/// call that never ended, a connection that lost step with its server and waits for an answer
/// that never comes) fails the test instead of hanging it.
pub async fn close<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) {
    let (size, idle) = (pool.size(), pool.num_idle());
    if tokio::time::timeout(Duration::from_secs(30), pool.close())
        .await
        .is_err()
    {
        panic!(
            "the pool did not close in 30 s: {} connections never came back to it \
             ({size} open, {idle} idle when the test ended)",
            pool.size()
        );
    }
}

#[cfg(feature = "postgres")]
pub mod pg {
    use super::*;
    use outbox_sqlx::PostgresStore;
    use sqlx::postgres::{PgPool, PgPoolOptions};

    pub fn url() -> String {
        service_url(
            "OUTBOX_TEST_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        )
    }

    /// A pool on the test server, or `None` to skip.
    pub async fn pool() -> Option<PgPool> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url())
            .await;
        or_skip("PostgreSQL", pool)
    }

    /// A migrated store on a table of its own.
    pub struct PgHarness {
        pub store: PostgresStore,
        pub table: String,
    }

    impl PgHarness {
        pub async fn new() -> Option<Self> {
            Self::with_config(fresh_config()).await
        }

        pub async fn with_config(config: StoreConfig) -> Option<Self> {
            let pool = pool().await?;
            let table = config.table.clone();
            let store = PostgresStore::new(pool, config).expect("valid configuration");
            store.migrate().await.expect("migrate");
            Some(Self { store, table })
        }

        /// The outbox table, quoted.
        pub fn quoted(&self) -> String {
            self.table
                .split('.')
                .map(|part| format!("\"{part}\""))
                .collect::<Vec<_>>()
                .join(".")
        }
    }

    impl StoreHarness for PgHarness {
        type Store = PostgresStore;

        fn store(&self) -> PostgresStore {
            self.store.clone()
        }

        async fn enqueue(&self, messages: Vec<NewMessage>) -> Result<Vec<MessageId>, StoreError> {
            let mut tx = self.store.pool().begin().await.expect("begin");
            let ids = self.store.enqueue_batch(&mut *tx, messages).await?;
            tx.commit().await.expect("commit");
            Ok(ids)
        }

        async fn enqueue_rolled_back(&self, messages: Vec<NewMessage>) -> Result<(), StoreError> {
            let mut tx = self.store.pool().begin().await.expect("begin");
            self.store.enqueue_batch(&mut *tx, messages).await?;
            tx.rollback().await.expect("rollback");
            Ok(())
        }

        async fn enqueue_overlapping(
            &self,
            first: Vec<NewMessage>,
            second: Vec<NewMessage>,
        ) -> Result<bool, StoreError> {
            let mut one = self.store.pool().begin().await.expect("begin");
            self.store.enqueue_batch(&mut *one, first).await?;
            let mut two = self.store.pool().begin().await.expect("begin");
            self.store.enqueue_batch(&mut *two, second).await?;
            two.commit().await.expect("commit");
            one.commit().await.expect("commit");
            Ok(true)
        }

        fn with_retention(&self, retention: Duration) -> Option<PostgresStore> {
            Some(self.store.with_retention(Some(retention)))
        }

        async fn corrupt(&self, id: MessageId) -> bool {
            sqlx::query(&format!(
                "UPDATE {} SET headers = '{{not json' WHERE id = $1",
                self.quoted()
            ))
            .bind(*id.as_uuid())
            .execute(self.store.pool())
            .await
            .expect("corrupt a row")
            .rows_affected()
                == 1
        }

        async fn teardown(self) {
            tokio::time::timeout(Duration::from_secs(30), self.store.drop_tables())
                .await
                .expect("dropping the tables never returned")
                .expect("drop tables");
            close(self.store.pool()).await;
        }
    }

    /// `store` listening for notifications, once its `LISTEN` took effect: the wake-ups, and
    /// the task to abort at the end.
    pub async fn listening(
        store: &PostgresStore,
    ) -> (
        outbox_core::Wakeup,
        tokio::task::JoinHandle<Result<(), StoreError>>,
    ) {
        use outbox_core::Store as _;
        let wakeup = outbox_core::Wakeup::new();
        let task = tokio::spawn({
            let (store, wakeup) = (store.clone(), wakeup.clone());
            async move { store.listen(wakeup).await }
        });
        tokio::time::timeout(Duration::from_secs(5), wakeup.woken())
            .await
            .expect("woken once listening");
        (wakeup, task)
    }

    /// The conformance factory.
    pub async fn harness() -> Option<PgHarness> {
        PgHarness::new().await
    }

    /// The conformance factory with claims by lease instead of held transactions.
    pub async fn harness_leased() -> Option<PgHarness> {
        PgHarness::with_config(fresh_config().claim_mode(outbox_sqlx::ClaimMode::Lease)).await
    }

    /// The conformance factory on tables created by running `schema_script` as another
    /// migration tool would, instead of `migrate`.
    pub async fn harness_from_script() -> Option<PgHarness> {
        let pool = pool().await?;
        let config = fresh_config();
        let script = PostgresStore::schema_script(&config, 0).expect("script");
        sqlx::raw_sql(&script)
            .execute(&pool)
            .await
            .expect("the script");
        let table = config.table.clone();
        let store = PostgresStore::new(pool, config).expect("valid configuration");
        Some(PgHarness { store, table })
    }
}

#[cfg(feature = "mysql")]
pub mod my {
    use super::*;
    use outbox_sqlx::MySqlStore;
    use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

    pub fn url() -> String {
        service_url("OUTBOX_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
    }

    /// A pool on the test server, or `None` to skip.
    pub async fn pool() -> Option<MySqlPool> {
        let pool = MySqlPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url())
            .await;
        or_skip("MySQL", pool)
    }

    /// A migrated store on a table of its own.
    pub struct MyHarness {
        pub store: MySqlStore,
        pub table: String,
    }

    impl MyHarness {
        pub async fn new() -> Option<Self> {
            Self::with_config(fresh_config()).await
        }

        pub async fn with_config(config: StoreConfig) -> Option<Self> {
            let pool = pool().await?;
            Some(Self::on(pool, config).await)
        }

        pub async fn on(pool: MySqlPool, config: StoreConfig) -> Self {
            let table = config.table.clone();
            let store = MySqlStore::new(pool, config).expect("valid configuration");
            store.migrate().await.expect("migrate");
            Self { store, table }
        }
    }

    impl StoreHarness for MyHarness {
        type Store = MySqlStore;

        fn store(&self) -> MySqlStore {
            self.store.clone()
        }

        async fn enqueue(&self, messages: Vec<NewMessage>) -> Result<Vec<MessageId>, StoreError> {
            let mut tx = self.store.pool().begin().await.expect("begin");
            let ids = self.store.enqueue_batch(&mut *tx, messages).await?;
            tx.commit().await.expect("commit");
            Ok(ids)
        }

        async fn enqueue_rolled_back(&self, messages: Vec<NewMessage>) -> Result<(), StoreError> {
            let mut tx = self.store.pool().begin().await.expect("begin");
            self.store.enqueue_batch(&mut *tx, messages).await?;
            tx.rollback().await.expect("rollback");
            Ok(())
        }

        async fn enqueue_overlapping(
            &self,
            first: Vec<NewMessage>,
            second: Vec<NewMessage>,
        ) -> Result<bool, StoreError> {
            let mut one = self.store.pool().begin().await.expect("begin");
            self.store.enqueue_batch(&mut *one, first).await?;
            let mut two = self.store.pool().begin().await.expect("begin");
            self.store.enqueue_batch(&mut *two, second).await?;
            two.commit().await.expect("commit");
            one.commit().await.expect("commit");
            Ok(true)
        }

        fn with_retention(&self, retention: Duration) -> Option<MySqlStore> {
            Some(self.store.with_retention(Some(retention)))
        }

        async fn corrupt(&self, id: MessageId) -> bool {
            sqlx::query(&format!(
                "UPDATE `{}` SET headers = '{{not json' WHERE id = ?",
                self.table
            ))
            .bind(id.as_bytes().to_vec())
            .execute(self.store.pool())
            .await
            .expect("corrupt a row")
            .rows_affected()
                == 1
        }

        async fn teardown(self) {
            tokio::time::timeout(Duration::from_secs(30), self.store.drop_tables())
                .await
                .expect("dropping the tables never returned")
                .expect("drop tables");
            close(self.store.pool()).await;
        }
    }

    /// The conformance factory.
    pub async fn harness() -> Option<MyHarness> {
        MyHarness::new().await
    }

    /// The conformance factory with claims held in a transaction instead of leases.
    pub async fn harness_held() -> Option<MyHarness> {
        MyHarness::with_config(held_config()).await
    }

    /// A fresh configuration whose claims are held in a transaction (MySQL claims by lease by
    /// default).
    pub fn held_config() -> StoreConfig {
        fresh_config().claim_mode(outbox_sqlx::ClaimMode::Transaction)
    }

    /// The conformance factory on tables created by running `schema_script` as another
    /// migration tool would (one multi-statement query), instead of `migrate`.
    pub async fn harness_from_script() -> Option<MyHarness> {
        let pool = pool().await?;
        let config = fresh_config();
        let script = MySqlStore::schema_script(&config, 0).expect("script");
        sqlx::raw_sql(&script)
            .execute(&pool)
            .await
            .expect("the script");
        let table = config.table.clone();
        let store = MySqlStore::new(pool, config).expect("valid configuration");
        Some(MyHarness { store, table })
    }
}

#[cfg(feature = "sqlite")]
pub mod lite {
    use super::*;
    use outbox_sqlx::SqliteStore;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

    /// A pool on `file`, created if missing, in WAL mode, as several relay processes would
    /// each open it.
    pub async fn pool_on(file: &std::path::Path) -> SqlitePool {
        let options = SqliteConnectOptions::new()
            .filename(file)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options)
            .await
            .expect("open the SQLite file")
    }

    /// A migrated store in a database file of its own.
    pub struct LiteHarness {
        pub store: SqliteStore,
        pub table: String,
        pub dir: tempfile::TempDir,
    }

    impl LiteHarness {
        pub async fn new() -> Self {
            Self::with_config(fresh_config()).await
        }

        pub async fn with_config(config: StoreConfig) -> Self {
            let dir = tempfile::tempdir().expect("temporary directory");
            let pool = pool_on(&dir.path().join("outbox.db")).await;
            let table = config.table.clone();
            let store = SqliteStore::new(pool, config).expect("valid configuration");
            store.migrate().await.expect("migrate");
            Self { store, table, dir }
        }

        /// The database file.
        pub fn file(&self) -> std::path::PathBuf {
            self.dir.path().join("outbox.db")
        }
    }

    impl StoreHarness for LiteHarness {
        type Store = SqliteStore;

        fn store(&self) -> SqliteStore {
            self.store.clone()
        }

        async fn enqueue(&self, messages: Vec<NewMessage>) -> Result<Vec<MessageId>, StoreError> {
            let mut tx = self
                .store
                .pool()
                .begin_with("BEGIN IMMEDIATE")
                .await
                .expect("begin");
            let ids = self.store.enqueue_batch(&mut *tx, messages).await?;
            tx.commit().await.expect("commit");
            Ok(ids)
        }

        async fn enqueue_rolled_back(&self, messages: Vec<NewMessage>) -> Result<(), StoreError> {
            let mut tx = self
                .store
                .pool()
                .begin_with("BEGIN IMMEDIATE")
                .await
                .expect("begin");
            self.store.enqueue_batch(&mut *tx, messages).await?;
            tx.rollback().await.expect("rollback");
            Ok(())
        }

        fn with_retention(&self, retention: Duration) -> Option<SqliteStore> {
            Some(self.store.with_retention(Some(retention)))
        }

        async fn corrupt(&self, id: MessageId) -> bool {
            sqlx::query(&format!(
                "UPDATE \"{}\" SET headers = '{{not json' WHERE id = ?",
                self.table
            ))
            .bind(id.as_bytes().to_vec())
            .execute(self.store.pool())
            .await
            .expect("corrupt a row")
            .rows_affected()
                == 1
        }

        async fn teardown(self) {
            tokio::time::timeout(Duration::from_secs(30), self.store.drop_tables())
                .await
                .expect("dropping the tables never returned")
                .expect("drop tables");
            close(self.store.pool()).await;
        }
    }

    /// The conformance factory (SQLite needs no server: never skipped).
    pub async fn harness() -> Option<LiteHarness> {
        Some(LiteHarness::new().await)
    }

    /// The conformance factory on tables created by running `schema_script` as another
    /// migration tool would, instead of `migrate`.
    pub async fn harness_from_script() -> Option<LiteHarness> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let pool = pool_on(&dir.path().join("outbox.db")).await;
        let config = fresh_config();
        let script = SqliteStore::schema_script(&config, 0).expect("script");
        sqlx::raw_sql(&script)
            .execute(&pool)
            .await
            .expect("the script");
        let table = config.table.clone();
        let store = SqliteStore::new(pool, config).expect("valid configuration");
        Some(LiteHarness { store, table, dir })
    }
}

/// Checks every dialect runs, written once.
pub mod scenarios {
    use std::collections::{HashMap, HashSet};
    use std::future::Future;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use outbox_core::{
        DeadLetterFilter, MemoryPublisher, Message, MessageId, NewMessage, PublishError,
        PublishOutcome, Publisher, Relay, RelayConfig, RelayId, RetryPolicy, Settlement, Store,
    };
    use outbox_testkit::StoreHarness;
    use outbox_testkit::relay::{RunningRelay, check_history};

    /// Relay settings of these tests: leases short enough that a lost connection or a
    /// departed relay shows quickly.
    pub fn relay_config() -> RelayConfig {
        RelayConfig::default()
            .batch_size(50)
            .concurrency(4)
            .lease(Duration::from_secs(2))
            .publish_timeout(Duration::from_secs(1))
            .partition_lease(Duration::from_secs(1))
            .poll_min(Duration::from_millis(5))
            .poll_max(Duration::from_millis(100))
            .shutdown_timeout(Duration::from_secs(2))
            .stats_interval(Duration::from_millis(500))
            .cleanup_interval(Duration::from_millis(500))
            .retry(
                RetryPolicy::default()
                    .initial_delay(Duration::from_millis(20))
                    .max_delay(Duration::from_millis(200))
                    .max_attempts(50),
            )
    }

    pub fn relay<S: Store, P: Publisher>(store: S, publisher: P) -> RunningRelay {
        RunningRelay::spawn(
            Relay::builder(store, publisher)
                .config(relay_config())
                .build()
                .expect("valid relay configuration"),
        )
    }

    /// Waits until `check` holds; panics after `timeout`.
    pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn drained<S: Store>(store: S) -> bool {
        store.stats().await.is_ok_and(|s| s.pending == 0)
    }

    /// Message `j` of producer `p`: eight keys per producer, every ninth message keyless.
    fn produced(p: usize, j: usize) -> NewMessage {
        let message = NewMessage::new("orders", format!("{p}-{j}")).header("n", j.to_string());
        if j.is_multiple_of(9) {
            message
        } else {
            message.key(format!("p{p}-k{}", j % 8))
        }
    }

    /// Four producers enqueue in transactions of one to five messages (some rolled back)
    /// while three relays on one database publish, the third joining late and the first
    /// leaving half-way: every committed message is published, no rolled-back one, and the
    /// first deliveries of each key follow enqueue order. `stores` are the relays' handles on
    /// the outbox (separate pools, as separate processes would have).
    pub async fn producers_and_three_relays<H: StoreHarness>(h: &H, stores: [H::Store; 3]) {
        const PRODUCERS: usize = 4;
        const EACH: usize = 150;
        let publisher = MemoryPublisher::new();
        let [a, b, c] = stores;
        let first = relay(a, publisher.clone());
        let second = relay(b, publisher.clone());
        let producers = futures::future::join_all((0..PRODUCERS).map(|p| async move {
            let mut sent = Vec::new();
            let mut j = 0;
            while j < EACH {
                let n = (1 + j % 5).min(EACH - j);
                let batch: Vec<NewMessage> = (j..j + n).map(|j| produced(p, j)).collect();
                h.enqueue(batch.clone()).await.expect("enqueue");
                sent.extend(batch);
                if j % 7 == 3 {
                    h.enqueue_rolled_back(vec![produced(p, 10_000 + j)])
                        .await
                        .expect("rolled-back enqueue");
                }
                j += n;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            sent
        }));
        let churn = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let third = relay(c, publisher.clone());
            tokio::time::sleep(Duration::from_millis(700)).await;
            first.stop(Duration::from_secs(10)).await;
            third
        };
        let (sent, third) = tokio::join!(producers, churn);
        let expected: Vec<NewMessage> = sent.into_iter().flatten().collect();
        assert_eq!(expected.len(), PRODUCERS * EACH);
        assert!(
            publisher
                .wait_for(expected.len(), Duration::from_secs(60))
                .await,
            "published {} of {}",
            publisher.count(),
            expected.len()
        );
        eventually("the outbox is drained", Duration::from_secs(30), || {
            drained(h.store())
        })
        .await;
        second.stop(Duration::from_secs(10)).await;
        third.stop(Duration::from_secs(10)).await;
        check_history(&publisher.published(), &expected);
    }

    /// Publishes into a [`MemoryPublisher`] after a pause, and runs `hook` in the middle of
    /// the first calls: the database connections are killed while batches are in flight.
    pub struct HookedPublisher {
        pub inner: MemoryPublisher,
        pub hook: Arc<dyn Fn() + Send + Sync>,
        pub calls: Arc<Mutex<u64>>,
    }

    impl Publisher for HookedPublisher {
        async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
            let call = {
                let mut calls = self.calls.lock().expect("lock");
                *calls += 1;
                *calls
            };
            if call % 4 == 1 {
                (self.hook)();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.inner.publish(batch).await
        }

        fn capabilities(&self) -> outbox_core::Capabilities {
            self.inner.capabilities()
        }
    }

    /// While a relay drains a backlog, the store's database connections are killed again and
    /// again (between statements and in the middle of them, by `kill`, which returns how many
    /// it killed): the relay recovers on its own and every message is published, in key
    /// order.
    pub async fn killed_connections_lose_nothing<H, K, F>(h: &H, store: H::Store, kill: K)
    where
        H: StoreHarness,
        K: Fn() -> F + Send + Sync + Clone + 'static,
        F: Future<Output = u64> + Send + 'static,
    {
        let expected: Vec<NewMessage> = (0..1200).map(|j| produced(0, j)).collect();
        for chunk in expected.chunks(200) {
            h.enqueue(chunk.to_vec()).await.expect("enqueue");
        }
        let killed = Arc::new(Mutex::new(0u64));
        let hook = {
            let (kill, killed) = (kill.clone(), Arc::clone(&killed));
            Arc::new(move || {
                let (kill, killed) = (kill.clone(), Arc::clone(&killed));
                tokio::spawn(async move {
                    let n = kill().await;
                    *killed.lock().expect("lock") += n;
                });
            })
        };
        let publisher = MemoryPublisher::new();
        let hooked = HookedPublisher {
            inner: publisher.clone(),
            hook,
            calls: Arc::default(),
        };
        let running = RunningRelay::spawn(
            Relay::builder(store, hooked)
                .config(relay_config().batch_size(20))
                .build()
                .expect("valid relay configuration"),
        );
        let killer = {
            let (kill, killed) = (kill.clone(), Arc::clone(&killed));
            tokio::spawn(async move {
                for _ in 0..40 {
                    tokio::time::sleep(Duration::from_millis(97)).await;
                    let n = kill().await;
                    *killed.lock().expect("lock") += n;
                }
            })
        };
        assert!(
            publisher
                .wait_for(expected.len(), Duration::from_secs(90))
                .await,
            "published {} of {}",
            publisher.count(),
            expected.len()
        );
        killer.abort();
        eventually("the outbox is drained", Duration::from_secs(30), || {
            drained(h.store())
        })
        .await;
        running.stop(Duration::from_secs(10)).await;
        let killed = *killed.lock().expect("lock");
        assert!(killed > 0, "no connection was killed");
        check_history(&publisher.published(), &expected);
    }

    /// A row whose headers were damaged by hand is dead-lettered with an error that says so,
    /// the relay keeps running, and the messages around it are published.
    pub async fn corrupted_row_is_dead_lettered<H: StoreHarness>(h: &H) {
        let store = h.store();
        let sent = vec![
            NewMessage::new("orders", "a1").key("a"),
            NewMessage::new("orders", "a2").key("a"),
            NewMessage::new("orders", "b1").key("b"),
            NewMessage::new("orders", "x"),
        ];
        let ids = h.enqueue(sent.clone()).await.expect("enqueue");
        assert!(h.corrupt(ids[0]).await, "the row was damaged");
        let publisher = MemoryPublisher::new();
        let running = relay(store.clone(), publisher.clone());
        eventually("the outbox is drained", Duration::from_secs(20), || {
            drained(store.clone())
        })
        .await;
        let dead = store
            .dead_letters(&DeadLetterFilter::all())
            .await
            .expect("dead letters");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].message.id, ids[0]);
        let error = dead[0].message.last_error.clone().unwrap_or_default();
        assert!(
            error.contains("cannot be decoded") && error.contains("headers"),
            "{error}"
        );
        // The relay is still at work.
        let later = h
            .enqueue(vec![NewMessage::new("orders", "a3").key("a")])
            .await
            .expect("enqueue");
        assert!(publisher.wait_for(4, Duration::from_secs(20)).await);
        running.stop(Duration::from_secs(10)).await;
        let published: Vec<MessageId> = publisher.published().iter().map(|m| m.id).collect();
        assert!(!published.contains(&ids[0]));
        for id in ids[1..].iter().chain(&later) {
            assert!(published.contains(id), "{id} was published");
        }
    }

    /// Eight claimers of four relays (each relay owning a quarter of the partitions) claim
    /// and settle concurrently: no message is handed out twice, every one is handed out,
    /// and each key's messages are handed out in enqueue order.
    pub async fn concurrent_claimers_never_overlap<H: StoreHarness>(h: &H) {
        let relays: Vec<RelayId> = (0..4)
            .map(|i| RelayId::new(format!("claimer-{i}")))
            .collect();
        let store = h.store();
        for (i, relay) in relays.iter().enumerate() {
            let mine: Vec<u16> = (0..outbox_core::PARTITIONS)
                .filter(|p| usize::from(*p) % 4 == i)
                .collect();
            let owned = store
                .acquire(relay, &mine, Duration::from_secs(120))
                .await
                .expect("acquire");
            assert_eq!(owned, mine);
        }
        let sent: Vec<NewMessage> = (0usize..1200)
            .map(|j| {
                let message = NewMessage::new("orders", format!("{j}"));
                if j.is_multiple_of(11) {
                    message
                } else {
                    message.key(format!("k{}", j % 40))
                }
            })
            .collect();
        for chunk in sent.chunks(200) {
            h.enqueue(chunk.to_vec()).await.expect("enqueue");
        }
        let log: Arc<Mutex<Vec<MessageId>>> = Arc::default();
        let mut tasks = Vec::new();
        for task in 0..8 {
            let (store, log) = (h.store(), Arc::clone(&log));
            let relay = relays[task % 4].clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let claim = store
                        .claim(&relay, 13, Duration::from_secs(60))
                        .await
                        .expect("claim");
                    if claim.is_empty() {
                        if drained(store.clone()).await {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue;
                    }
                    let ids: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
                    log.lock().expect("lock").extend(&ids);
                    let settled = store
                        .settle(
                            claim.token,
                            &Settlement {
                                published: ids,
                                ..Settlement::default()
                            },
                        )
                        .await
                        .expect("settle");
                    assert_eq!(settled.fenced, 0);
                }
            }));
        }
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .expect("claimers finish")
                .expect("claimer");
        }
        let log = log.lock().expect("lock").clone();
        let mut seen = HashSet::new();
        for id in &log {
            assert!(seen.insert(*id), "message {id} was handed out twice");
        }
        assert_eq!(seen.len(), sent.len(), "every message was handed out");
        let position: HashMap<MessageId, usize> =
            log.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut last: HashMap<&str, usize> = HashMap::new();
        for message in &sent {
            if let Some(key) = message.ordering_key() {
                let at = position[&message.id()];
                if let Some(before) = last.insert(key, at) {
                    assert!(before < at, "key {key} handed out out of order");
                }
            }
        }
    }

    /// A claim held in a transaction whose relay goes quiet (alive, but never settling) is
    /// ended by the database once its lease is over (MySQL counts whole seconds: this one's
    /// 1.2 s lease is ended after 2): `other`, a store on a pool of its own, then claims the
    /// messages, and the late settle changes nothing.
    pub async fn a_quiet_held_claim_is_ended_by_the_database<H: StoreHarness>(
        h: &H,
        other: H::Store,
    ) {
        let quiet = h.store();
        let relay = RelayId::random();
        let all: Vec<u16> = (0..outbox_core::PARTITIONS).collect();
        quiet
            .acquire(&relay, &all, Duration::from_secs(60))
            .await
            .expect("acquire");
        let ids = h
            .enqueue(vec![
                NewMessage::new("orders", "a1").key("a"),
                NewMessage::new("orders", "a2").key("a"),
            ])
            .await
            .expect("enqueue");
        let held = quiet
            .claim(&relay, 1, Duration::from_millis(1200))
            .await
            .expect("claim");
        assert_eq!(
            held.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![ids[0]]
        );
        let meanwhile = other
            .claim(&relay, 10, Duration::from_secs(30))
            .await
            .expect("claim");
        assert!(
            meanwhile.is_empty(),
            "a1 is held, and a2 waits for it: {meanwhile:?}"
        );
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let after = other
            .claim(&relay, 10, Duration::from_secs(30))
            .await
            .expect("claim");
        assert_eq!(
            after.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
            ids,
            "the database ended the quiet claim: both messages, in order, unchanged"
        );
        assert_eq!(after.messages[0].attempts, 0);
        let late = quiet
            .settle(
                held.token,
                &Settlement {
                    published: vec![ids[0]],
                    ..Default::default()
                },
            )
            .await
            .expect("settle");
        assert_eq!(
            (late.applied, late.fenced),
            (0, 1),
            "the late settle is fenced"
        );
        let settled = other
            .settle(
                after.token,
                &Settlement {
                    published: ids.clone(),
                    ..Default::default()
                },
            )
            .await
            .expect("settle");
        assert_eq!((settled.applied, settled.fenced), (2, 0));
    }

    /// A batch larger than one statement may carry (by rows, and by bytes) is written whole
    /// and in order.
    pub async fn large_batches_are_chunked<H: StoreHarness>(h: &H) {
        let store = h.store();
        let relay = RelayId::random();
        store
            .acquire(
                &relay,
                &(0..outbox_core::PARTITIONS).collect::<Vec<_>>(),
                Duration::from_secs(60),
            )
            .await
            .expect("acquire");
        let mut sent: Vec<NewMessage> = (0..2500)
            .map(|j| NewMessage::new("orders", format!("{j}")).key(format!("k{}", j % 3)))
            .collect();
        sent.extend((0..12).map(|j| NewMessage::new("big", vec![j as u8; 900 * 1024]).key("big")));
        let ids = h.enqueue(sent).await.expect("enqueue");
        let claim = store
            .claim(&relay, 10_000, Duration::from_secs(60))
            .await
            .expect("claim");
        let claimed: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
        assert_eq!(claimed, ids, "everything, in enqueue order");
        assert_eq!(claim.messages[2500].payload.len(), 900 * 1024);
    }

    /// Claims, settles, heartbeats and acquires cancelled at many points in their course (as
    /// the relay drops them when it stops) leave no connection in a transaction that holds
    /// locks: writes to the same rows right after each one go through at once.
    pub async fn cancelled_calls_leave_nothing_locked<H: StoreHarness>(h: &H) {
        let store = h.store();
        let relay = RelayId::new("cancelled");
        let all: Vec<u16> = (0..outbox_core::PARTITIONS).collect();
        let ttl = Duration::from_secs(30);
        // Every call the test waits for is bounded: a call that never returns fails the test
        // with the cancellation it followed instead of hanging it.
        let bound = Duration::from_secs(30);
        h.enqueue((0..50).map(|j| produced(0, j)).collect())
            .await
            .expect("enqueue");
        // Each kind of call, cancelled every 10 µs from 0 to 1.5 ms into its course.
        for i in 0..600u64 {
            let cancel_after = Duration::from_micros(i / 4 * 10);
            match i % 4 {
                0 => {
                    let _ = tokio::time::timeout(cancel_after, store.heartbeat(&relay, ttl)).await;
                }
                1 => {
                    let _ =
                        tokio::time::timeout(cancel_after, store.acquire(&relay, &all, ttl)).await;
                }
                2 => {
                    let claim = store.claim(&relay, 5, ttl);
                    let _ = tokio::time::timeout(cancel_after, claim).await;
                }
                _ => {
                    let claim = tokio::time::timeout(bound, store.claim(&relay, 5, ttl))
                        .await
                        .unwrap_or_else(|_| panic!("claim never returned (#{i})"))
                        .unwrap_or_else(|e| panic!("claim before cancellation #{i}: {e:?}"));
                    let settlement = Settlement {
                        release: claim.messages.iter().map(|m| m.id).collect(),
                        ..Settlement::default()
                    };
                    let _ =
                        tokio::time::timeout(cancel_after, store.settle(claim.token, &settlement))
                            .await;
                }
            }
            // A statement of the cancelled call may still be running and hold locks for a
            // moment (its rollback follows it): a deadlock with it is retried, as the relay
            // does.
            let writes = async {
                retrying_deadlocks(|| store.acquire(&relay, &all, ttl))
                    .await
                    .unwrap_or_else(|e| panic!("acquire after cancellation #{i}: {e:?}"));
                retrying_deadlocks(|| store.heartbeat(&relay, ttl))
                    .await
                    .unwrap_or_else(|e| panic!("heartbeat after cancellation #{i}: {e:?}"));
                let claim = retrying_deadlocks(|| store.claim(&relay, 5, ttl))
                    .await
                    .unwrap_or_else(|e| panic!("claim after cancellation #{i}: {e:?}"));
                let settlement = Settlement {
                    release: claim.messages.iter().map(|m| m.id).collect(),
                    ..Settlement::default()
                };
                retrying_deadlocks(|| store.settle(claim.token, &settlement))
                    .await
                    .unwrap_or_else(|e| panic!("settle after cancellation #{i}: {e:?}"));
            };
            tokio::time::timeout(Duration::from_secs(5), writes)
                .await
                .unwrap_or_else(|_| panic!("writes waited for a lock after cancellation #{i}"));
        }
        tokio::time::timeout(bound, store.leave(&relay))
            .await
            .expect("leave never returned")
            .expect("leave");
    }

    /// `call` until it succeeds or fails otherwise than with a transient database error (a
    /// deadlock, a lock wait timeout): connection errors are not retried.
    async fn retrying_deadlocks<T, F, Fut>(mut call: F) -> Result<T, outbox_core::StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, outbox_core::StoreError>>,
    {
        loop {
            match call().await {
                Err(err)
                    if err.is_transient()
                        && err.kind() == outbox_core::StoreErrorKind::Database =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                result => return result,
            }
        }
    }

    /// Claims cancelled while their rows arrive (large payloads: many reads from the socket,
    /// packets split across them) leave their connections in step with the server: the calls
    /// after them neither wait for an answer that never comes nor read another statement's
    /// answer.
    pub async fn cancelled_reads_leave_connections_in_step<H: StoreHarness>(h: &H) {
        const MESSAGES: usize = 16;
        const PAYLOAD: usize = 200 * 1024;
        let store = h.store();
        let relay = RelayId::new("cancelled-reads");
        let all: Vec<u16> = (0..outbox_core::PARTITIONS).collect();
        // Leases that lapse at once: every claim finds every message again.
        let lease = Duration::from_millis(1);
        let bound = Duration::from_secs(20);
        h.enqueue(
            (0..MESSAGES)
                .map(|j| NewMessage::new("big", vec![j as u8; PAYLOAD]))
                .collect(),
        )
        .await
        .expect("enqueue");
        store
            .acquire(&relay, &all, Duration::from_secs(600))
            .await
            .expect("acquire");
        let mut claimed = 0;
        // Cancelled every 25 µs from 0 to 5 ms into its course, while its rows stream in.
        for i in 0..200u64 {
            let cancel_after = Duration::from_micros(i * 25);
            let _ = tokio::time::timeout(cancel_after, store.claim(&relay, MESSAGES, lease)).await;
            let claim = tokio::time::timeout(bound, store.claim(&relay, MESSAGES, lease))
                .await
                .unwrap_or_else(|_| panic!("claim never returned after cancellation #{i}"))
                .unwrap_or_else(|e| panic!("claim after cancellation #{i}: {e:?}"));
            claimed += claim.messages.len();
            for message in &claim.messages {
                assert_eq!(
                    (message.destination.as_str(), message.payload.len()),
                    ("big", PAYLOAD),
                    "a message read after cancellation #{i}"
                );
            }
            let stats = tokio::time::timeout(bound, store.stats())
                .await
                .unwrap_or_else(|_| panic!("stats never returned after cancellation #{i}"))
                .unwrap_or_else(|e| panic!("stats after cancellation #{i}: {e:?}"));
            assert_eq!(
                stats.pending, MESSAGES as u64,
                "stats after cancellation #{i}"
            );
        }
        assert!(claimed > 0, "the claims read the messages");
    }
}

/// Inbox harnesses: an inbox on a table of its own, and the consumer's transactions.
pub mod inboxes {
    use std::future::Future;
    use std::time::Duration;

    use outbox_core::{Inbox, MessageId, StoreError};
    use outbox_testkit::InboxHarness;
    use outbox_testkit::env::unique_name;

    /// An inbox harness type `$name` for `$inbox` on `$db`, beginning transactions with
    /// `$begin` (a statement, or `None` for the default).
    macro_rules! inbox_harness {
        ($name:ident, $inbox:ty, $db:ty, $begin:expr) => {
            pub struct $name {
                pub inbox: $inbox,
                pub pool: sqlx::Pool<$db>,
                /// The folder of an SQLite database file, removed at teardown.
                pub dir: Option<tempfile::TempDir>,
            }

            impl $name {
                pub async fn on(pool: sqlx::Pool<$db>, dir: Option<tempfile::TempDir>) -> Self {
                    let inbox = <$inbox>::new(pool.clone(), &unique_name("inbox")).expect("inbox");
                    inbox.migrate().await.expect("migrate the inbox");
                    inbox.migrate().await.expect("migrating again does nothing");
                    Self { inbox, pool, dir }
                }
            }

            impl InboxHarness for $name {
                type Tx = sqlx::Transaction<'static, $db>;

                async fn begin(&self) -> Self::Tx {
                    let begin: Option<&'static str> = $begin;
                    match begin {
                        Some(statement) => self.pool.begin_with(statement).await,
                        None => self.pool.begin().await,
                    }
                    .expect("begin")
                }

                fn record<'a>(
                    &'a self,
                    tx: &'a mut Self::Tx,
                    consumer: &'a str,
                    id: MessageId,
                ) -> impl Future<Output = Result<bool, StoreError>> + Send + 'a {
                    Inbox::record(&self.inbox, &mut **tx, consumer, id)
                }

                async fn commit(&self, tx: Self::Tx) {
                    tx.commit().await.expect("commit");
                }

                async fn rollback(&self, tx: Self::Tx) {
                    tx.rollback().await.expect("rollback");
                }

                fn purge(
                    &self,
                    older_than: Duration,
                    limit: usize,
                ) -> impl Future<Output = Result<u64, StoreError>> + Send {
                    Inbox::purge(&self.inbox, older_than, limit)
                }

                async fn teardown(self) {
                    self.inbox.drop_table().await.expect("drop the inbox");
                    super::close(&self.pool).await;
                    drop(self.dir);
                }
            }
        };
    }

    #[cfg(feature = "postgres")]
    inbox_harness!(PgInbox, outbox_sqlx::PostgresInbox, sqlx::Postgres, None);
    #[cfg(feature = "mysql")]
    inbox_harness!(MyInbox, outbox_sqlx::MySqlInbox, sqlx::MySql, None);
    #[cfg(feature = "sqlite")]
    inbox_harness!(
        LiteInbox,
        outbox_sqlx::SqliteInbox,
        sqlx::Sqlite,
        Some("BEGIN IMMEDIATE")
    );

    #[cfg(feature = "postgres")]
    pub async fn postgres() -> Option<PgInbox> {
        Some(PgInbox::on(super::pg::pool().await?, None).await)
    }

    #[cfg(feature = "mysql")]
    pub async fn mysql() -> Option<MyInbox> {
        Some(MyInbox::on(super::my::pool().await?, None).await)
    }

    /// On a database file of its own.
    #[cfg(feature = "sqlite")]
    pub async fn sqlite() -> Option<LiteInbox> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let pool = super::lite::pool_on(&dir.path().join("inbox.db")).await;
        Some(LiteInbox::on(pool, Some(dir)).await)
    }
}
