//! The databases under test: the private server of a run, an outbox table and a business
//! table, producers' transactions in two shapes, and the faults of killing the run's
//! connections and restarting the server.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use outbox_core::{MessageId, NewMessage, Stats, Store, StoreError};
use outbox_sqlx::sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions};
use outbox_sqlx::sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use outbox_sqlx::sqlx::sqlite::{SqliteConnection, SqlitePool};
use outbox_sqlx::sqlx::{self, Row};
use outbox_sqlx::{MySqlStore, PostgresStore, SqliteStore, StoreConfig};
use outbox_testkit::env::service_url;
use outbox_testkit::servers::{PrivateMariaDb, PrivatePostgres, Restart, ServerError};

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

/// The private database server of a run (`outbox_testkit::servers`), which the nemesis may
/// restart; the shared servers are never touched.
#[derive(Debug)]
pub enum DbServer {
    /// A PostgreSQL cluster of the run's own.
    Postgres(PrivatePostgres),
    /// A MariaDB server of the run's own.
    MariaDb(PrivateMariaDb),
}

impl DbServer {
    /// Starts a private PostgreSQL cluster in `dir`.
    pub async fn postgres(dir: &Path) -> Result<Self, ServerError> {
        PrivatePostgres::start(dir).await.map(DbServer::Postgres)
    }

    /// Starts a private PostgreSQL cluster in `dir` for a log relay: `wal_level = logical`,
    /// and room for replication slots and WAL senders (kept across restarts).
    pub async fn postgres_logical(dir: &Path) -> Result<Self, ServerError> {
        PrivatePostgres::start_with(
            dir,
            &[
                ("wal_level", "logical"),
                ("max_replication_slots", "10"),
                ("max_wal_senders", "10"),
            ],
        )
        .await
        .map(DbServer::Postgres)
    }

    /// Starts a private MariaDB server in `dir`.
    pub async fn mariadb(dir: &Path) -> Result<Self, ServerError> {
        PrivateMariaDb::start(dir).await.map(DbServer::MariaDb)
    }

    /// The administrator's URL (PostgreSQL's `postgres`, MariaDB's `root`).
    pub fn url(&self) -> String {
        match self {
            DbServer::Postgres(server) => server.url(),
            DbServer::MariaDb(server) => server.url(),
        }
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        match self {
            DbServer::Postgres(server) => server.addr(),
            DbServer::MariaDb(server) => server.addr(),
        }
    }

    /// Restarts the server: stopped as `how` says, started again after `down` on the same port
    /// and data.
    pub async fn restart(&mut self, how: Restart, down: Duration) -> Result<(), ServerError> {
        match self {
            DbServer::Postgres(server) => server.restart(how, down).await,
            DbServer::MariaDb(server) => server.restart(how, down).await,
        }
    }

    /// Stops the server and removes its data.
    pub async fn stop(self) {
        match self {
            DbServer::Postgres(server) => server.stop().await,
            DbServer::MariaDb(server) => server.stop().await,
        }
    }
}

/// How a producer's transactions treat a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Each key's business row is locked (and its version bumped) before the key's message is
    /// enqueued, as services that update an aggregate do: the transactions of one key are
    /// serialized, and the version is the key's enqueue order.
    Serialized,
    /// The message is enqueued first, without any lock, then the transaction stays open for
    /// `hold` and bumps the business row only before its commit: transactions of one key are
    /// open at once and enqueue for it in an order their commits need not follow.
    Concurrent {
        /// How long the transaction stays open between its INSERT and its business update.
        hold: Duration,
    },
}

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
        /// The log relays' replication slot, whose session is killed with the run's
        /// connections.
        slot: Option<String>,
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
    /// A PostgreSQL outbox `table` with its business table of one row per key, on the server
    /// of `base` (the producers' and the checker's way in). The relays connect to
    /// `relay_addr` instead when given (a fault proxy in front of the server).
    pub async fn postgres(
        base: &str,
        relay_addr: Option<SocketAddr>,
        run: &str,
        table: &str,
        keys: &[String],
    ) -> Result<Self, BoxError> {
        let options = PgConnectOptions::from_str(base)?.application_name(run);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(PgConnectOptions::from_str(base)?.application_name("outbox_chaos_admin"))
            .await?;
        let store = PostgresStore::new(pool.clone(), StoreConfig::new().table(table))?;
        store.migrate().await?;
        let biz = business(table);
        sqlx::query(&format!(
            "CREATE TABLE \"{biz}\" (k TEXT PRIMARY KEY, version BIGINT NOT NULL)"
        ))
        .execute(&pool)
        .await?;
        for key in keys {
            sqlx::query(&format!("INSERT INTO \"{biz}\" VALUES ($1, 0)"))
                .bind(key)
                .execute(&pool)
                .await?;
        }
        let mut relay_url = through(base, relay_addr)?;
        relay_url
            .query_pairs_mut()
            .append_pair("application_name", run);
        Ok(Db::Postgres {
            store,
            admin,
            run: run.to_owned(),
            slot: None,
            relay_url: relay_url.to_string(),
        })
    }

    /// Makes [`Db::kill_connections`] end the replication session streaming `slot` too (a
    /// log relay's: it carries its own `application_name`, not the run's). PostgreSQL only.
    pub fn with_replication_slot(mut self, name: &str) -> Self {
        if let Db::Postgres { slot, .. } = &mut self {
            *slot = Some(name.to_owned());
        }
        self
    }

    /// A MySQL outbox `table` with one business row per key on the shared server of the tests
    /// ([`mysql_url`]), reached as a user of the run's own with a password.
    pub async fn mysql(run: &str, table: &str, keys: &[String]) -> Result<Self, BoxError> {
        Self::mysql_at(&mysql_url(), None, run, table, keys).await
    }

    /// As [`Db::mysql`], on the server of `base` (an administrator's URL); the relays connect
    /// to `relay_addr` instead when given (a fault proxy in front of the server).
    pub async fn mysql_at(
        base: &str,
        relay_addr: Option<SocketAddr>,
        run: &str,
        table: &str,
        keys: &[String],
    ) -> Result<Self, BoxError> {
        let admin = MySqlPoolOptions::new()
            .max_connections(2)
            .connect(base)
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
        let mut url = url::Url::parse(base)?;
        url.set_username(&user).map_err(|()| "mysql url")?;
        url.set_password(Some(&password))
            .map_err(|()| "mysql url")?;
        let relay_url = through(url.as_str(), relay_addr)?.to_string();
        let pool = MySqlPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(MySqlConnectOptions::from_str(url.as_str())?)
            .await?;
        let store = MySqlStore::new(pool.clone(), StoreConfig::new().table(table))?;
        store.migrate().await?;
        let biz = business(table);
        sqlx::query(&format!(
            "CREATE TABLE `{biz}` (k VARCHAR(64) PRIMARY KEY, version BIGINT NOT NULL) ENGINE = InnoDB"
        ))
        .execute(&pool)
        .await?;
        for key in keys {
            sqlx::query(&format!("INSERT INTO `{biz}` VALUES (?, 0)"))
                .bind(key)
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
    pub async fn sqlite(dir: &Path, table: &str, keys: &[String]) -> Result<Self, BoxError> {
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
        for key in keys {
            sqlx::query(&format!("INSERT INTO \"{biz}\" VALUES (?, 0)"))
                .bind(key)
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
            Db::Postgres {
                admin, run, slot, ..
            } => {
                let killed: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE (application_name = $1 \
                            OR pid IN (SELECT active_pid FROM pg_replication_slots \
                                        WHERE slot_name = $2)) \
                       AND pid <> pg_backend_pid()",
                )
                .bind(run)
                .bind(slot.as_deref())
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

    /// One producer transaction of `shape` over `keys` (sorted, so that producers lock rows
    /// in one order and never deadlock): one message per key, and each key's business row
    /// bumped; then a commit or, when `rollback`, a rollback. Returns how it ended, when its
    /// `COMMIT` was sent and returned, and what it enqueued.
    pub async fn transact(
        &self,
        table: &str,
        destination: &str,
        keys: &[String],
        shape: Shape,
        rollback: bool,
    ) -> Transacted {
        let mut written = Vec::new();
        let mut commit_sent = None;
        let plan = Plan {
            biz: business(table),
            destination,
            keys,
            shape,
            rollback,
        };
        let sent = &mut commit_sent;
        let result = match self {
            Db::Postgres { store, .. } => pg_transact(store, &plan, &mut written, sent).await,
            Db::MySql { store, .. } => my_transact(store, &plan, &mut written, sent).await,
            Db::Sqlite { store, .. } => lite_transact(store, &plan, &mut written, sent).await,
        };
        let (outcome, committed) = match result {
            Ok(_) if rollback => (Outcome::RolledBack, None),
            Ok(at) => (Outcome::Committed, at),
            Err(Failure::Before) => (Outcome::Aborted, None),
            Err(Failure::AtCommit) => (Outcome::Indeterminate, None),
        };
        Transacted {
            outcome,
            commit_sent: if rollback { None } else { commit_sent },
            committed,
            written,
        }
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

/// How a producer's transaction went ([`Db::transact`]).
#[derive(Debug)]
pub struct Transacted {
    /// How it ended.
    pub outcome: Outcome,
    /// When its `COMMIT` was sent (taken just before sending), when it was.
    pub commit_sent: Option<Instant>,
    /// When its `COMMIT` returned (taken just after), when it committed.
    pub committed: Option<Instant>,
    /// What it enqueued.
    pub written: Vec<Written>,
}

/// The name of key number `k` of the serialized producers.
pub fn key_name(k: usize) -> String {
    format!("key-{k}")
}

/// The name of key number `k` of the concurrent producers.
pub fn concurrent_key_name(k: usize) -> String {
    format!("open-key-{k}")
}

/// `url` with its host and port replaced by `addr`, when given.
fn through(url: &str, addr: Option<SocketAddr>) -> Result<url::Url, BoxError> {
    let mut url = url::Url::parse(url)?;
    if let Some(addr) = addr {
        url.set_ip_host(addr.ip()).map_err(|()| "database url")?;
        url.set_port(Some(addr.port()))
            .map_err(|()| "database url")?;
    }
    Ok(url)
}

/// Where a transaction failed.
enum Failure {
    Before,
    AtCommit,
}

/// What one producer transaction does.
struct Plan<'a> {
    biz: String,
    destination: &'a str,
    keys: &'a [String],
    shape: Shape,
    rollback: bool,
}

impl Plan<'_> {
    /// The transaction's messages, one per key, with the versions the serialized shape wrote
    /// (none in the concurrent shape), recorded in `written` as enqueued now: call it just
    /// before sending the INSERT.
    fn messages(&self, versions: &[i64], written: &mut Vec<Written>) -> Vec<NewMessage> {
        let inserted = Instant::now();
        self.keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let version = versions.get(i).copied();
                let payload = match version {
                    Some(v) => format!(r#"{{"key":"{key}","version":{v}}}"#),
                    None => format!(r#"{{"key":"{key}","n":{}}}"#, fastrand::u64(..)),
                }
                .into_bytes();
                let mut msg = NewMessage::new(self.destination, payload.clone()).key(key);
                if let Some(v) = version {
                    msg = msg.header("chaos-version", v.to_string());
                }
                written.push(Written {
                    id: msg.id(),
                    key: Some(key.clone()),
                    version,
                    inserted,
                    payload,
                });
                msg
            })
            .collect()
    }

    /// How long a concurrent transaction stays open after its INSERT.
    fn hold(&self) -> Option<Duration> {
        match self.shape {
            Shape::Serialized => None,
            Shape::Concurrent { hold } => Some(hold),
        }
    }
}

/// Commits (recording in `sent` the instant just before `COMMIT` was sent, and returning the
/// instant it returned) or rolls back.
async fn finish<DB: sqlx::Database>(
    tx: sqlx::Transaction<'_, DB>,
    rollback: bool,
    sent: &mut Option<Instant>,
) -> Result<Option<Instant>, Failure> {
    if rollback {
        tx.rollback().await.map_err(|_| Failure::Before)?;
        Ok(None)
    } else {
        *sent = Some(Instant::now());
        tx.commit().await.map_err(|_| Failure::AtCommit)?;
        Ok(Some(Instant::now()))
    }
}

async fn pg_bump(conn: &mut PgConnection, biz: &str, key: &str) -> Result<i64, Failure> {
    sqlx::query_scalar(&format!(
        "UPDATE \"{biz}\" SET version = version + 1 WHERE k = $1 RETURNING version"
    ))
    .bind(key)
    .fetch_one(conn)
    .await
    .map_err(|_| Failure::Before)
}

async fn pg_transact(
    store: &PostgresStore,
    plan: &Plan<'_>,
    written: &mut Vec<Written>,
    commit_sent: &mut Option<Instant>,
) -> Result<Option<Instant>, Failure> {
    let mut tx = store.pool().begin().await.map_err(|_| Failure::Before)?;
    let mut versions = Vec::new();
    if plan.shape == Shape::Serialized {
        for key in plan.keys {
            versions.push(pg_bump(&mut tx, &plan.biz, key).await?);
        }
    }
    let messages = plan.messages(&versions, written);
    store
        .enqueue_batch(&mut *tx, messages)
        .await
        .map_err(|_| Failure::Before)?;
    if let Some(hold) = plan.hold() {
        tokio::time::sleep(hold).await;
        for key in plan.keys {
            pg_bump(&mut tx, &plan.biz, key).await?;
        }
    }
    finish(tx, plan.rollback, commit_sent).await
}

async fn my_bump(conn: &mut MySqlConnection, biz: &str, key: &str) -> Result<i64, Failure> {
    sqlx::query(&format!(
        "UPDATE `{biz}` SET version = version + 1 WHERE k = ?"
    ))
    .bind(key)
    .execute(&mut *conn)
    .await
    .map_err(|_| Failure::Before)?;
    sqlx::query(&format!("SELECT version FROM `{biz}` WHERE k = ?"))
        .bind(key)
        .fetch_one(&mut *conn)
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|_| Failure::Before)
}

async fn my_transact(
    store: &MySqlStore,
    plan: &Plan<'_>,
    written: &mut Vec<Written>,
    commit_sent: &mut Option<Instant>,
) -> Result<Option<Instant>, Failure> {
    let mut tx = store.pool().begin().await.map_err(|_| Failure::Before)?;
    let mut versions = Vec::new();
    if plan.shape == Shape::Serialized {
        for key in plan.keys {
            versions.push(my_bump(&mut tx, &plan.biz, key).await?);
        }
    }
    let messages = plan.messages(&versions, written);
    store
        .enqueue_batch(&mut *tx, messages)
        .await
        .map_err(|_| Failure::Before)?;
    if let Some(hold) = plan.hold() {
        tokio::time::sleep(hold).await;
        for key in plan.keys {
            my_bump(&mut tx, &plan.biz, key).await?;
        }
    }
    finish(tx, plan.rollback, commit_sent).await
}

async fn lite_bump(conn: &mut SqliteConnection, biz: &str, key: &str) -> Result<i64, Failure> {
    sqlx::query_scalar(&format!(
        "UPDATE \"{biz}\" SET version = version + 1 WHERE k = ? RETURNING version"
    ))
    .bind(key)
    .fetch_one(conn)
    .await
    .map_err(|_| Failure::Before)
}

async fn lite_transact(
    store: &SqliteStore,
    plan: &Plan<'_>,
    written: &mut Vec<Written>,
    commit_sent: &mut Option<Instant>,
) -> Result<Option<Instant>, Failure> {
    let pool: &SqlitePool = store.pool();
    // SQLite has one writer at a time: `BEGIN IMMEDIATE` takes the write lock at once, so that
    // producers queue for it instead of failing on an upgrade, and no two transactions are
    // ever open for writing together, whatever the shape.
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|_| Failure::Before)?;
    let mut versions = Vec::new();
    if plan.shape == Shape::Serialized {
        for key in plan.keys {
            versions.push(lite_bump(&mut tx, &plan.biz, key).await?);
        }
    }
    let messages = plan.messages(&versions, written);
    store
        .enqueue_batch(&mut *tx, messages)
        .await
        .map_err(|_| Failure::Before)?;
    if let Some(hold) = plan.hold() {
        tokio::time::sleep(hold).await;
        for key in plan.keys {
            lite_bump(&mut tx, &plan.biz, key).await?;
        }
    }
    finish(tx, plan.rollback, commit_sent).await
}
