//! The databases under test: an outbox table and a business table of one run, producers'
//! transactions, and the fault of killing the run's connections.

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use outbox_core::{Enqueue, MessageId, NewMessage, Stats, Store, StoreError};
use outbox_sqlx::sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use outbox_sqlx::sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use outbox_sqlx::sqlx::sqlite::SqlitePool;
use outbox_sqlx::sqlx::{self, Row};
use outbox_sqlx::{MySqlStore, PostgresStore, SqliteStore, StoreConfig};
use outbox_testkit::env::service_url;

use crate::history::{Outcome, Written};

/// PostgreSQL of the tests (`OUTBOX_TEST_POSTGRES_URL`).
pub fn postgres_url() -> String {
    service_url(
        "OUTBOX_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

/// MySQL or MariaDB of the tests (`OUTBOX_TEST_MYSQL_URL`).
pub fn mysql_url() -> String {
    service_url("OUTBOX_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One run's database: the store (for the producers and the checker), a pool for the faults,
/// and the URL the relays use.
pub enum Db {
    /// PostgreSQL; the run's connections carry `application_name` = the run's name.
    Postgres {
        /// The producers' store.
        store: PostgresStore,
        /// A connection pool outside the run, for killing the run's connections.
        admin: PgPool,
        /// The run's name.
        run: String,
        /// The relays' URL.
        relay_url: String,
    },
    /// MySQL / MariaDB; the run connects as a user of its own, so that its connections alone
    /// are killed.
    MySql {
        /// The producers' store.
        store: MySqlStore,
        /// Connected as the administrator of the tests.
        admin: MySqlPool,
        /// The run's user.
        user: String,
        /// The relays' URL.
        relay_url: String,
    },
    /// SQLite: a file in the run's directory.
    Sqlite {
        /// The producers' store.
        store: SqliteStore,
        /// The relays' URL.
        relay_url: String,
    },
}

fn business(table: &str) -> String {
    format!("{table}_biz")
}

impl Db {
    /// A PostgreSQL outbox `table` with its business table of `keys` rows.
    pub async fn postgres(run: &str, table: &str, keys: usize) -> Result<Self, BoxError> {
        let base = postgres_url();
        let options = PgConnectOptions::from_str(&base)?.application_name(run);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(PgConnectOptions::from_str(&base)?.application_name("outbox_chaos_admin"))
            .await?;
        let store = PostgresStore::new(pool.clone(), StoreConfig::new().table(table))?;
        store.migrate().await?;
        let biz = business(table);
        sqlx::query(&format!(
            "CREATE TABLE \"{biz}\" (k TEXT PRIMARY KEY, version BIGINT NOT NULL)"
        ))
        .execute(&pool)
        .await?;
        for k in 0..keys {
            sqlx::query(&format!("INSERT INTO \"{biz}\" VALUES ($1, 0)"))
                .bind(key_name(k))
                .execute(&pool)
                .await?;
        }
        let mut relay_url = url::Url::parse(&base)?;
        relay_url
            .query_pairs_mut()
            .append_pair("application_name", run);
        Ok(Db::Postgres {
            store,
            admin,
            run: run.to_owned(),
            relay_url: relay_url.to_string(),
        })
    }

    /// A MySQL outbox `table`, reached as a user of the run's own with a password.
    pub async fn mysql(run: &str, table: &str, keys: usize) -> Result<Self, BoxError> {
        let base = mysql_url();
        let admin = MySqlPoolOptions::new()
            .max_connections(2)
            .connect(&base)
            .await?;
        let user: String = run.chars().take(32).collect();
        let password = format!("pw{}", fastrand::u64(..));
        let database: String = sqlx::query_scalar("SELECT DATABASE()")
            .fetch_one(&admin)
            .await?;
        for host in ["127.0.0.1", "localhost", "%"] {
            sqlx::query(&format!(
                "CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}'"
            ))
            .execute(&admin)
            .await?;
            sqlx::query(&format!(
                "GRANT ALL PRIVILEGES ON `{database}`.* TO '{user}'@'{host}'"
            ))
            .execute(&admin)
            .await?;
        }
        let mut url = url::Url::parse(&base)?;
        url.set_username(&user).map_err(|()| "mysql url")?;
        url.set_password(Some(&password))
            .map_err(|()| "mysql url")?;
        let relay_url = url.to_string();
        let pool = MySqlPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(MySqlConnectOptions::from_str(&relay_url)?)
            .await?;
        let store = MySqlStore::new(pool.clone(), StoreConfig::new().table(table))?;
        store.migrate().await?;
        let biz = business(table);
        sqlx::query(&format!(
            "CREATE TABLE `{biz}` (k VARCHAR(64) PRIMARY KEY, version BIGINT NOT NULL) ENGINE = InnoDB"
        ))
        .execute(&pool)
        .await?;
        for k in 0..keys {
            sqlx::query(&format!("INSERT INTO `{biz}` VALUES (?, 0)"))
                .bind(key_name(k))
                .execute(&pool)
                .await?;
        }
        Ok(Db::MySql {
            store,
            admin,
            user,
            relay_url,
        })
    }

    /// A SQLite outbox in `dir`.
    pub async fn sqlite(dir: &Path, table: &str, keys: usize) -> Result<Self, BoxError> {
        let relay_url = format!("sqlite://{}?mode=rwc", dir.join("outbox.db").display());
        let store = SqliteStore::connect(
            StoreConfig::new()
                .url(relay_url.clone())
                .table(table)
                .max_connections(8),
        )
        .await?;
        store.migrate().await?;
        let pool = store.pool().clone();
        let biz = business(table);
        sqlx::query(&format!(
            "CREATE TABLE \"{biz}\" (k TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        ))
        .execute(&pool)
        .await?;
        for k in 0..keys {
            sqlx::query(&format!("INSERT INTO \"{biz}\" VALUES (?, 0)"))
                .bind(key_name(k))
                .execute(&pool)
                .await?;
        }
        Ok(Db::Sqlite { store, relay_url })
    }

    /// The URL the relay processes use.
    pub fn relay_url(&self) -> &str {
        match self {
            Db::Postgres { relay_url, .. }
            | Db::MySql { relay_url, .. }
            | Db::Sqlite { relay_url, .. } => relay_url,
        }
    }

    /// Whether [`Db::kill_connections`] does anything here.
    pub fn can_kill_connections(&self) -> bool {
        !matches!(self, Db::Sqlite { .. })
    }

    /// Terminates every connection of the run (relays' and producers'); returns how many.
    pub async fn kill_connections(&self) -> Result<u64, BoxError> {
        match self {
            Db::Postgres { admin, run, .. } => {
                let killed: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1 AND pid <> pg_backend_pid()",
                )
                .bind(run)
                .fetch_all(admin)
                .await?;
                Ok(killed.into_iter().filter(|k| *k).count() as u64)
            }
            Db::MySql { admin, user, .. } => {
                let ids: Vec<i64> = sqlx::query_scalar(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?",
                )
                .bind(user)
                .fetch_all(admin)
                .await?;
                let mut killed = 0;
                for id in ids {
                    // A connection may end by itself meanwhile: "unknown thread id" is fine.
                    if sqlx::query(&format!("KILL CONNECTION {id}"))
                        .execute(admin)
                        .await
                        .is_ok()
                    {
                        killed += 1;
                    }
                }
                Ok(killed)
            }
            Db::Sqlite { .. } => Ok(0),
        }
    }

    /// One producer transaction: bumps the version of each key's business row (locking it, so
    /// that transactions of one key are serialized, as services do) and enqueues one message
    /// per key, then commits or, when `rollback`, rolls back.
    pub async fn transact(
        &self,
        table: &str,
        destination: &str,
        keys: &[String],
        rollback: bool,
    ) -> (Outcome, Vec<Written>) {
        let mut written = Vec::new();
        let result = match self {
            Db::Postgres { store, .. } => {
                pg_transact(store, table, destination, keys, rollback, &mut written).await
            }
            Db::MySql { store, .. } => {
                my_transact(store, table, destination, keys, rollback, &mut written).await
            }
            Db::Sqlite { store, .. } => {
                lite_transact(store, table, destination, keys, rollback, &mut written).await
            }
        };
        let outcome = match result {
            Ok(()) if rollback => Outcome::RolledBack,
            Ok(()) => Outcome::Committed,
            Err(Failure::Before) => Outcome::Aborted,
            Err(Failure::AtCommit) => Outcome::Indeterminate,
        };
        (outcome, written)
    }

    /// The outbox's backlog and dead letters.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        match self {
            Db::Postgres { store, .. } => store.stats().await,
            Db::MySql { store, .. } => store.stats().await,
            Db::Sqlite { store, .. } => store.stats().await,
        }
    }

    /// Dead letters, with their errors, for the report.
    pub async fn dead_letters(&self) -> Result<Vec<String>, StoreError> {
        let filter = outbox_core::DeadLetterFilter::all().limit(20);
        let dead = match self {
            Db::Postgres { store, .. } => store.dead_letters(&filter).await?,
            Db::MySql { store, .. } => store.dead_letters(&filter).await?,
            Db::Sqlite { store, .. } => store.dead_letters(&filter).await?,
        };
        Ok(dead
            .into_iter()
            .map(|d| {
                format!(
                    "{}: {}",
                    d.message.id,
                    d.message.last_error.unwrap_or_default()
                )
            })
            .collect())
    }

    /// The ids of the messages still pending in the outbox.
    pub async fn pending_ids(&self, table: &str) -> Result<HashSet<MessageId>, BoxError> {
        Ok(match self {
            Db::Postgres { store, .. } => {
                let ids: Vec<uuid::Uuid> =
                    sqlx::query_scalar(&format!("SELECT id FROM \"{table}\" WHERE state = 0"))
                        .fetch_all(store.pool())
                        .await?;
                ids.into_iter().map(MessageId::from_uuid).collect()
            }
            Db::MySql { store, .. } => {
                let ids: Vec<Vec<u8>> =
                    sqlx::query_scalar(&format!("SELECT id FROM `{table}` WHERE state = 0"))
                        .fetch_all(store.pool())
                        .await?;
                ids.iter()
                    .filter_map(|b| uuid::Uuid::from_slice(b).ok())
                    .map(MessageId::from_uuid)
                    .collect()
            }
            Db::Sqlite { store, .. } => {
                let ids: Vec<Vec<u8>> =
                    sqlx::query_scalar(&format!("SELECT id FROM \"{table}\" WHERE state = 0"))
                        .fetch_all(store.pool())
                        .await?;
                ids.iter()
                    .filter_map(|b| uuid::Uuid::from_slice(b).ok())
                    .map(MessageId::from_uuid)
                    .collect()
            }
        })
    }

    /// The final version of each key's business row.
    pub async fn versions(&self, table: &str) -> Result<Vec<(String, i64)>, BoxError> {
        let biz = business(table);
        Ok(match self {
            Db::Postgres { store, .. } => {
                sqlx::query_as(&format!("SELECT k, version FROM \"{biz}\""))
                    .fetch_all(store.pool())
                    .await?
            }
            Db::MySql { store, .. } => {
                sqlx::query_as(&format!("SELECT k, version FROM `{biz}`"))
                    .fetch_all(store.pool())
                    .await?
            }
            Db::Sqlite { store, .. } => {
                sqlx::query_as(&format!("SELECT k, version FROM \"{biz}\""))
                    .fetch_all(store.pool())
                    .await?
            }
        })
    }

    /// Drops the run's tables and user.
    pub async fn teardown(self, table: &str) {
        let biz = business(table);
        match self {
            Db::Postgres { store, admin, .. } => {
                let _ = store.drop_tables().await;
                let _ = sqlx::query(&format!("DROP TABLE IF EXISTS \"{biz}\""))
                    .execute(&admin)
                    .await;
                store.pool().close().await;
            }
            Db::MySql {
                store, admin, user, ..
            } => {
                let _ = store.drop_tables().await;
                let _ = sqlx::query(&format!("DROP TABLE IF EXISTS `{biz}`"))
                    .execute(&admin)
                    .await;
                store.pool().close().await;
                for host in ["127.0.0.1", "localhost", "%"] {
                    let _ = sqlx::query(&format!("DROP USER IF EXISTS '{user}'@'{host}'"))
                        .execute(&admin)
                        .await;
                }
            }
            Db::Sqlite { store, .. } => {
                store.pool().close().await;
            }
        }
    }
}

/// The name of key number `k`.
pub fn key_name(k: usize) -> String {
    format!("key-{k}")
}

/// Where a transaction failed.
enum Failure {
    Before,
    AtCommit,
}

fn message(destination: &str, key: &str, version: i64, written: &mut Vec<Written>) -> NewMessage {
    let payload = format!(r#"{{"key":"{key}","version":{version}}}"#).into_bytes();
    let msg = NewMessage::new(destination, payload.clone())
        .key(key)
        .header("chaos-version", version.to_string());
    written.push(Written {
        id: msg.id(),
        key: Some(key.to_owned()),
        version,
        payload,
    });
    msg
}

async fn pg_transact(
    store: &PostgresStore,
    table: &str,
    destination: &str,
    keys: &[String],
    rollback: bool,
    written: &mut Vec<Written>,
) -> Result<(), Failure> {
    let biz = business(table);
    let mut tx = store.pool().begin().await.map_err(|_| Failure::Before)?;
    let mut messages = Vec::new();
    for key in keys {
        let version: i64 = sqlx::query_scalar(&format!(
            "UPDATE \"{biz}\" SET version = version + 1 WHERE k = $1 RETURNING version"
        ))
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .map_err(|_| Failure::Before)?;
        messages.push(message(destination, key, version, written));
    }
    store
        .enqueue_batch(&mut *tx, messages)
        .await
        .map_err(|_| Failure::Before)?;
    if rollback {
        tx.rollback().await.map_err(|_| Failure::Before)
    } else {
        tx.commit().await.map_err(|_| Failure::AtCommit)
    }
}

async fn my_transact(
    store: &MySqlStore,
    table: &str,
    destination: &str,
    keys: &[String],
    rollback: bool,
    written: &mut Vec<Written>,
) -> Result<(), Failure> {
    let biz = business(table);
    let mut tx = store.pool().begin().await.map_err(|_| Failure::Before)?;
    let mut messages = Vec::new();
    for key in keys {
        sqlx::query(&format!(
            "UPDATE `{biz}` SET version = version + 1 WHERE k = ?"
        ))
        .bind(key)
        .execute(&mut *tx)
        .await
        .map_err(|_| Failure::Before)?;
        let version: i64 = sqlx::query(&format!("SELECT version FROM `{biz}` WHERE k = ?"))
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|_| Failure::Before)?;
        messages.push(message(destination, key, version, written));
    }
    store
        .enqueue_batch(&mut *tx, messages)
        .await
        .map_err(|_| Failure::Before)?;
    if rollback {
        tx.rollback().await.map_err(|_| Failure::Before)
    } else {
        tx.commit().await.map_err(|_| Failure::AtCommit)
    }
}

async fn lite_transact(
    store: &SqliteStore,
    table: &str,
    destination: &str,
    keys: &[String],
    rollback: bool,
    written: &mut Vec<Written>,
) -> Result<(), Failure> {
    let biz = business(table);
    let pool: &SqlitePool = store.pool();
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|_| Failure::Before)?;
    let mut messages = Vec::new();
    for key in keys {
        let version: i64 = sqlx::query_scalar(&format!(
            "UPDATE \"{biz}\" SET version = version + 1 WHERE k = ? RETURNING version"
        ))
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .map_err(|_| Failure::Before)?;
        messages.push(message(destination, key, version, written));
    }
    store
        .enqueue_batch(&mut *tx, messages)
        .await
        .map_err(|_| Failure::Before)?;
    if rollback {
        tx.rollback().await.map_err(|_| Failure::Before)
    } else {
        tx.commit().await.map_err(|_| Failure::AtCommit)
    }
}
