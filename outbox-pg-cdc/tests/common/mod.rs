//! A private PostgreSQL cluster (`wal_level = logical`) with an outbox table migrated by
//! `PostgresStore`, and the publication and slot of the log source set up for it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use outbox_core::NewMessage;
use outbox_pg_cdc::{CdcAdmin, CdcConfig, CdcError, PgLogSource};
use outbox_sqlx::sqlx::postgres::{PgPool, PgPoolOptions};
use outbox_sqlx::{PostgresStore, StoreConfig};
use outbox_testkit::env::{or_skip, unique_name};
use outbox_testkit::servers::{PrivatePostgres, ServerError};

pub(crate) const STATUS_INTERVAL: Duration = Duration::from_millis(200);

/// A private cluster with an outbox table migrated by `PostgresStore`, and the publication
/// and slot of the log source set up for it.
pub(crate) struct Fixture {
    pub(crate) server: PrivatePostgres,
    pub(crate) dir: PathBuf,
    pub(crate) pool: PgPool,
    pub(crate) store: PostgresStore,
    pub(crate) config: CdcConfig,
    pub(crate) admin: CdcAdmin,
}

pub(crate) async fn cluster(extra: &[(&str, &str)]) -> Option<(PrivatePostgres, PathBuf)> {
    let dir = std::env::temp_dir().join(unique_name("outbox_pg_cdc"));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let mut settings = vec![
        ("wal_level", "logical"),
        ("max_replication_slots", "10"),
        ("max_wal_senders", "10"),
    ];
    settings.extend_from_slice(extra);
    match PrivatePostgres::start_with(&dir, &settings).await {
        Ok(server) => Some((server, dir)),
        Err(ServerError::Unavailable(why)) => {
            let _ = std::fs::remove_dir_all(&dir);
            or_skip::<(PrivatePostgres, PathBuf), _>("a private PostgreSQL cluster", Err(why))
        }
        Err(err) => panic!("the private cluster does not start: {err}"),
    }
}

impl Fixture {
    pub(crate) async fn new() -> Option<Self> {
        Self::with_settings(&[]).await
    }

    pub(crate) async fn with_settings(extra: &[(&str, &str)]) -> Option<Self> {
        let (server, dir) = cluster(extra).await?;
        let pool = PgPoolOptions::new()
            .max_connections(6)
            .connect(&server.url())
            .await
            .expect("connect to the private cluster");
        let table = unique_name("outbox");
        let store =
            PostgresStore::new(pool.clone(), StoreConfig::new().table(&table)).expect("store");
        store.migrate().await.expect("migrate");
        let config = CdcConfig::new(server.url())
            .table(&table)
            .slot(unique_name("slot"))
            .publication(unique_name("pub"))
            .status_interval(STATUS_INTERVAL);
        let admin = CdcAdmin::new(pool.clone(), config.clone()).expect("admin");
        admin.check().await.expect("the private cluster is ready");
        admin.ensure().await.expect("publication and slot");
        Some(Self {
            server,
            dir,
            pool,
            store,
            config,
            admin,
        })
    }

    /// A source on the fixture's slot. The server releases the slot of a closed source a
    /// moment after the session ended: until then the slot is in use, which passes.
    pub(crate) async fn source(&self) -> PgLogSource {
        while_in_use(|| PgLogSource::connect(&self.config))
            .await
            .expect("the source connects")
    }

    /// Enqueues `messages` in one transaction that commits.
    pub(crate) async fn commit(&self, messages: Vec<NewMessage>) {
        let mut tx = self.pool.begin().await.expect("begin");
        self.store
            .enqueue_batch(&mut *tx, messages)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
    }

    pub(crate) async fn finish(self) {
        while_in_use(|| self.admin.drop())
            .await
            .expect("drop slot and publication");
        self.store.drop_tables().await.expect("drop the outbox");
        self.pool.close().await;
        self.server.stop().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `attempt` again while it fails with [`CdcError::SlotInUse`], for up to 10 s.
pub(crate) async fn while_in_use<T, F, Fut>(attempt: F) -> Result<T, CdcError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, CdcError>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match attempt().await {
            Err(CdcError::SlotInUse { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}
