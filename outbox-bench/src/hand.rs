//! The hand relay: the simplest correct relay a user would write in a hundred lines, the
//! baseline the relay has to beat. Each worker loops: `BEGIN`; take the oldest pending rows
//! off the table (deleted, rows another worker holds skipped); publish them with the relay's
//! publisher in one call; `COMMIT` once every one is confirmed. It stops when a claim finds
//! nothing. No leases, publish retries, dead letters or partitions: a failed publish ends the
//! run (MariaDB's deadlocks, which come before the publish, are tried again), and with two
//! workers or more nothing keeps a key's messages in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, Utc};
use outbox_core::{DynPublisher, Message, MessageId, NewMessage, PublishOutcome};
use outbox_sqlx::sqlx::pool::PoolConnection;
use outbox_sqlx::sqlx::{self, Connection, MySql, Postgres, Row};
use tokio::sync::{Notify, oneshot};

use crate::Res;
use crate::stores::{BenchStore, Pool};
use crate::timing::Observer;

/// How often the following hand relay looks for messages without being told.
pub(crate) const POLL: Duration = Duration::from_millis(10);

/// Rows per `DELETE` on MariaDB (below its `in_predicate_conversion_threshold`).
const DELETE_SEQS: usize = 500;

/// The database of a hand relay, with its statements.
enum Db {
    /// The claim is one `DELETE ... RETURNING`.
    Postgres { pool: sqlx::PgPool, claim: String },
    /// The claim is a `SELECT ... FOR UPDATE SKIP LOCKED`, then a `DELETE` of what it read.
    MySql {
        pool: sqlx::MySqlPool,
        claim: String,
        table: String,
    },
}

/// A worker's connection, kept for its whole run.
enum Conn {
    Postgres(PoolConnection<Postgres>),
    MySql(PoolConnection<MySql>),
}

/// A hand relay on one outbox table.
pub(crate) struct HandRelay {
    db: Db,
    publisher: Arc<dyn DynPublisher>,
    batch: i64,
    deadlocks: AtomicU64,
    observer: Option<Arc<dyn Observer>>,
}

/// What one try of a batch came to.
enum Attempt {
    /// Messages relayed (0: nothing to claim).
    Done(usize),
    /// Rolled back before anything was published.
    Deadlocked,
}

/// A deadlock (SQLSTATE 40001, MariaDB's 1213), which rolled the transaction back.
fn deadlock(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40001")
}

fn text(bytes: Vec<u8>) -> Res<String> {
    Ok(String::from_utf8(bytes)?)
}

/// A claimed row as the message the relay would publish.
fn message(
    id: uuid::Uuid,
    destination: String,
    key: Option<String>,
    payload: Vec<u8>,
    headers: &str,
    created_at: DateTime<Utc>,
) -> Res<Message> {
    let mut new = NewMessage::new(destination, payload).with_id(MessageId::from_uuid(id));
    if let Some(key) = key {
        new = new.key(key);
    }
    for (name, value) in outbox_core::decode_headers(headers)? {
        new = new.header(name, value);
    }
    Ok(Message::new(new, created_at))
}

fn postgres_row(row: &sqlx::postgres::PgRow) -> Res<(i64, Message)> {
    let headers: String = row.try_get("headers")?;
    let msg = message(
        row.try_get("id")?,
        row.try_get("destination")?,
        row.try_get("key")?,
        row.try_get("payload")?,
        &headers,
        row.try_get("created_at")?,
    )?;
    Ok((row.try_get("seq")?, msg))
}

fn mysql_row(row: &sqlx::mysql::MySqlRow) -> Res<(i64, Message)> {
    // utf8mb4_bin columns come back as binary strings.
    let id: Vec<u8> = row.try_get("id")?;
    let key: Option<Vec<u8>> = row.try_get("key")?;
    let headers = text(row.try_get("headers")?)?;
    let created_at: NaiveDateTime = row.try_get("created_at")?;
    let msg = message(
        uuid::Uuid::from_slice(&id)?,
        text(row.try_get("destination")?)?,
        key.map(text).transpose()?,
        row.try_get("payload")?,
        &headers,
        created_at.and_utc(),
    )?;
    Ok((row.try_get("seq")?, msg))
}

impl HandRelay {
    /// A hand relay on `store`'s table (PostgreSQL or MariaDB), publishing with `publisher`,
    /// `batch` rows per transaction.
    pub(crate) fn new(
        store: &BenchStore,
        publisher: Arc<dyn DynPublisher>,
        batch: usize,
    ) -> Res<Self> {
        let t = &store.table;
        let db = match store.pool() {
            Pool::Postgres(pool) => Db::Postgres {
                pool,
                claim: format!(
                    "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} WHERE state = 0 \
                     ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) \
                     RETURNING seq, id, destination, \"key\", payload, headers, created_at"
                ),
            },
            Pool::MySql(pool) => Db::MySql {
                pool,
                claim: format!(
                    "SELECT seq, id, destination, `key`, payload, headers, created_at FROM {t} \
                     WHERE state = 0 ORDER BY seq LIMIT ? FOR UPDATE SKIP LOCKED"
                ),
                table: t.clone(),
            },
            Pool::Sqlite => return Err("no hand relay on SQLite".into()),
        };
        Ok(Self {
            db,
            publisher,
            batch: i64::try_from(batch)?,
            deadlocks: AtomicU64::new(0),
            observer: None,
        })
    }

    /// A worker's connection (MariaDB: in READ COMMITTED, so that a claim does not lock the
    /// gaps next to the rows it reads).
    async fn connect(&self) -> Res<Conn> {
        Ok(match &self.db {
            Db::Postgres { pool, .. } => Conn::Postgres(pool.acquire().await?),
            Db::MySql { pool, .. } => {
                let mut conn = pool.acquire().await?;
                sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .execute(&mut *conn)
                    .await?;
                Conn::MySql(conn)
            }
        })
    }

    /// Relays one batch in one transaction; returns the messages relayed (0: there was
    /// nothing to claim).
    async fn batch(&self, conn: &mut Conn) -> Res<usize> {
        match (&self.db, conn) {
            (Db::Postgres { claim, .. }, Conn::Postgres(conn)) => {
                self.postgres_batch(conn, claim).await
            }
            (Db::MySql { claim, table, .. }, Conn::MySql(conn)) => loop {
                match self.mysql_batch(conn, claim, table).await? {
                    Attempt::Done(batch) => return Ok(batch),
                    Attempt::Deadlocked => {
                        self.deadlocks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
            _ => Err("a connection to another database than the hand relay's".into()),
        }
    }

    /// One batch on PostgreSQL.
    async fn postgres_batch(&self, conn: &mut sqlx::PgConnection, claim: &str) -> Res<usize> {
        let claim_started = Instant::now();
        let mut tx = conn.begin().await?;
        let rows = sqlx::query(claim)
            .bind(self.batch)
            .fetch_all(&mut *tx)
            .await?;
        let claimed = Instant::now();
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let mut rows = rows.iter().map(postgres_row).collect::<Res<Vec<_>>>()?;
        // RETURNING comes in no particular order.
        rows.sort_unstable_by_key(|(seq, _)| *seq);
        let messages: Vec<Message> = rows.into_iter().map(|(_, msg)| msg).collect();
        self.observe_claim(&messages, claim_started, claimed);
        self.publish(&messages).await?;
        let published = Instant::now();
        tx.commit().await?;
        self.observe_settle(published.elapsed());
        Ok(messages.len())
    }

    /// One batch on MariaDB. A deadlock can only come before the publish call (while the
    /// transaction takes its locks): rolled back, the batch is tried again, as MariaDB's
    /// error says to.
    async fn mysql_batch(
        &self,
        conn: &mut sqlx::MySqlConnection,
        claim: &str,
        table: &str,
    ) -> Res<Attempt> {
        let claim_started = Instant::now();
        let mut tx = conn.begin().await?;
        let rows = match sqlx::query(claim)
            .bind(self.batch)
            .fetch_all(&mut *tx)
            .await
        {
            Ok(rows) => rows,
            Err(err) if deadlock(&err) => return Ok(Attempt::Deadlocked),
            Err(err) => return Err(err.into()),
        };
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Attempt::Done(0));
        }
        let rows = rows.iter().map(mysql_row).collect::<Res<Vec<_>>>()?;
        let seqs: Vec<String> = rows.iter().map(|(seq, _)| seq.to_string()).collect();
        // MariaDB turns an IN list of 1,000 values or more into a join that scans the whole
        // table; a shorter one is a range scan of the primary key. That scan still locks the
        // row just past its end, which may be the first of the other worker's batch: the
        // deadlocks retried above.
        for seqs in seqs.chunks(DELETE_SEQS) {
            let deleted = sqlx::query(&format!(
                "DELETE FROM {table} WHERE seq IN ({})",
                seqs.join(",")
            ))
            .execute(&mut *tx)
            .await;
            match deleted {
                Ok(_) => {}
                Err(err) if deadlock(&err) => return Ok(Attempt::Deadlocked),
                Err(err) => return Err(err.into()),
            }
        }
        let claimed = Instant::now();
        let messages: Vec<Message> = rows.into_iter().map(|(_, msg)| msg).collect();
        self.observe_claim(&messages, claim_started, claimed);
        self.publish(&messages).await?;
        let published = Instant::now();
        tx.commit().await?;
        self.observe_settle(published.elapsed());
        Ok(Attempt::Done(messages.len()))
    }

    fn observe_claim(&self, messages: &[Message], started: Instant, returned: Instant) {
        if let Some(observer) = &self.observer {
            let ids: Vec<MessageId> = messages.iter().map(|m| m.id).collect();
            observer.claimed(&ids, started, returned);
        }
    }

    fn observe_settle(&self, took: Duration) {
        if let Some(observer) = &self.observer {
            observer.settled(took);
        }
    }

    /// The same hand relay, telling `observer` of every claim and of every `COMMIT` (its
    /// settle).
    pub(crate) fn observed(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Batches tried again after a deadlock (MariaDB) so far.
    pub(crate) fn deadlocks(&self) -> u64 {
        self.deadlocks.load(Ordering::Relaxed)
    }

    /// Publishes `messages` in one call; every one must be confirmed.
    async fn publish(&self, messages: &[Message]) -> Res<()> {
        let outcomes = self.publisher.publish_dyn(messages).await?;
        if outcomes.len() != messages.len() {
            return Err(format!(
                "{} outcomes for {} messages",
                outcomes.len(),
                messages.len()
            )
            .into());
        }
        for outcome in outcomes {
            match outcome {
                PublishOutcome::Published => {}
                PublishOutcome::Failed(err) => {
                    return Err(format!("a message was not published: {err}").into());
                }
                _ => return Err("a message was not published".into()),
            }
        }
        Ok(())
    }

    /// Relays until a claim finds nothing, on `workers` workers at once; returns the messages
    /// relayed.
    pub(crate) async fn drain(self: Arc<Self>, workers: usize) -> Res<u64> {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers.max(1) {
            let relay = Arc::clone(&self);
            tasks.spawn(async move {
                let mut conn = relay.connect().await?;
                let mut relayed = 0u64;
                loop {
                    match relay.batch(&mut conn).await? {
                        0 => break,
                        n => relayed += n as u64,
                    }
                }
                Ok::<u64, crate::BoxError>(relayed)
            });
        }
        let mut relayed = 0;
        while let Some(done) = tasks.join_next().await {
            relayed += done??;
        }
        Ok(relayed)
    }

    /// Relays messages as they come, on one worker, until `stop`: woken by the table's
    /// `NOTIFY` on `channel` (PostgreSQL), and looking every [`POLL`] besides.
    pub(crate) async fn follow(
        self: Arc<Self>,
        channel: String,
        mut stop: oneshot::Receiver<()>,
    ) -> Res<()> {
        let Db::Postgres { pool, .. } = &self.db else {
            return Err("the hand relay listens on PostgreSQL only".into());
        };
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(&channel).await?;
        let wake = Arc::new(Notify::new());
        let listening = {
            let wake = Arc::clone(&wake);
            tokio::spawn(async move {
                // A notification that comes while the worker is busy leaves a permit behind,
                // so none is lost.
                while listener.recv().await.is_ok() {
                    wake.notify_one();
                }
            })
        };
        let result = async {
            let mut conn = self.connect().await?;
            loop {
                while self.batch(&mut conn).await? > 0 {}
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::timeout(POLL, wake.notified()) => {}
                }
            }
        }
        .await;
        listening.abort();
        result
    }
}
