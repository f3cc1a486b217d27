//! Test harnesses of the three stores on real servers: a fresh table per test, dropped at the
//! end, so tests run in parallel. Servers come from `OUTBOX_TEST_POSTGRES_URL` and
//! `OUTBOX_TEST_MYSQL_URL` (loopback defaults); a missing one skips the test unless
//! `OUTBOX_TEST_REQUIRE=1`.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use outbox_core::{Enqueue, MessageId, NewMessage, StoreError};
use outbox_sqlx::StoreConfig;
use outbox_testkit::StoreHarness;
use outbox_testkit::env::{or_skip, service_url, unique_name};

/// Connections per test pool: enough for three relays sharing one store.
pub const POOL_SIZE: u32 = 16;

/// A configuration on a table of this test alone.
pub fn fresh_config() -> StoreConfig {
    StoreConfig::new().table(unique_name("outbox"))
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
            self.store.drop_tables().await.expect("drop tables");
            self.store.pool().close().await;
        }
    }

    /// The conformance factory.
    pub async fn harness() -> Option<PgHarness> {
        PgHarness::new().await
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
            self.store.drop_tables().await.expect("drop tables");
            self.store.pool().close().await;
        }
    }

    /// The conformance factory.
    pub async fn harness() -> Option<MyHarness> {
        MyHarness::new().await
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
            self.store.drop_tables().await.expect("drop tables");
            self.store.pool().close().await;
        }
    }

    /// The conformance factory (SQLite needs no server: never skipped).
    pub async fn harness() -> Option<LiteHarness> {
        Some(LiteHarness::new().await)
    }
}
