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
