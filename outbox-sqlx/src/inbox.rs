//! Inboxes: the consumer's deduplication table, in the consumer's own database, written once
//! for the three dialects. [`inbox!`] defines a dialect's inbox type; the dialect file gives
//! it its pool and connection types and an [`InboxSql`], and its `bound(text, args)`.
//!
//! The table holds one row per `(consumer, message_id)`, its primary key, and the time it was
//! received (the database's clock), indexed for the retention purge. Recording is an
//! `INSERT` that skips an existing key (`ON CONFLICT DO NOTHING`, `INSERT IGNORE`,
//! `INSERT OR IGNORE`): one row changed means new. A concurrent transaction inserting the same
//! key waits on the key's lock until the first one ends, then skips (it committed) or inserts
//! (it rolled back).

use std::time::Duration;

use outbox_core::{MessageId, StoreError};

use crate::config::Names;
use crate::sql::{self, Arg, Dialect, Sql};

/// The default inbox table.
pub const DEFAULT_INBOX_TABLE: &str = "outbox_inbox";

/// What an inbox's SQL looks like in one dialect.
#[derive(Debug)]
pub(crate) struct InboxSql {
    pub(crate) dialect: &'static Dialect,
    /// The table and its index (a template: see [`render`](crate::migrations::render)), every statement idempotent.
    pub(crate) create: &'static str,
}

impl InboxSql {
    /// The validated names of the inbox table `table`.
    pub(crate) fn names(&self, table: &str) -> Result<Names, StoreError> {
        Names::new(table, self.dialect.quoting)
    }

    /// Records `(consumer, id)` unless it is there.
    pub(crate) fn record(&self, names: &Names, consumer: &str, id: MessageId) -> Sql {
        let (insert, tail) = self.dialect.insert_ignore;
        let mut sql = Sql::new(self.dialect);
        sql.push(&format!(
            "{insert} {} (consumer, message_id, received_at) VALUES (",
            names.table
        ))
        .bind(Arg::Text(consumer.to_owned()))
        .push(", ")
        .bind(Arg::Id(id))
        .push(&format!(", {}){tail}", self.dialect.now));
        sql
    }

    /// Deletes at most `limit` records older than `older_than`, oldest first, skipping rows
    /// another purge holds.
    pub(crate) fn purge(&self, names: &Names, older_than: Duration, limit: usize) -> Sql {
        let d = self.dialect;
        let mut sql = Sql::new(d);
        sql.push(&format!("DELETE FROM {}", names.table));
        let conditions = |sql: &mut Sql| {
            sql.push(" WHERE received_at < ");
            (d.now_plus)(sql, -sql::micros(older_than));
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = (names.table.as_str(), d.row_id);
        let lock = " FOR UPDATE SKIP LOCKED";
        sql::push_limited(&mut sql, d, rows, conditions, "received_at", limit, lock);
        sql
    }
}

/// Defines the inbox type `$inbox` on the database `$db` ($what) with the SQL `$sql` (an
/// [`InboxSql`]); its documentation's example connects to `$url` and begins transactions with
/// `pool.$begin`.
macro_rules! inbox {
    ($inbox:ident($db:ty, $sql:expr), $what:literal, url: $url:literal, begin: $begin:literal $(,)?) => {
        #[doc = concat!("An inbox on ", $what, ": records which messages each consumer ")]
        #[doc = "received, in the consumer's own transaction, so that each message's effect"]
        #[doc = "happens once although the broker delivers it at least once."]
        #[doc = ""]
        #[doc = "Cheap to clone: clones share the pool. See [`outbox_core::Inbox`] for the"]
        #[doc = "contract and [`outbox_core::Incoming`] for the acknowledgement discipline."]
        #[doc = ""]
        #[doc = concat!("```no_run
# async fn example(incoming: outbox_core::Incoming) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
use outbox_sqlx::{sqlx, DEFAULT_INBOX_TABLE, ", stringify!($inbox), "};

let pool = sqlx::Pool::<sqlx::", stringify!($db), ">::connect(\"", $url, "\").await?;
let inbox = ", stringify!($inbox), "::new(pool.clone(), DEFAULT_INBOX_TABLE)?;
inbox.migrate().await?;

// For each message received (`incoming`, from `outbox_kafka::incoming` or its kin):
let mut tx = pool.", $begin, ".await?;
let processed = inbox
    .process(&mut tx, \"billing\", &incoming, async |tx| {
        sqlx::query(\"UPDATE accounts SET orders = orders + 1 WHERE id = 7\")
            .execute(&mut *tx)
            .await?;
        // The effect's error type takes the inbox's errors too (`From<StoreError>`).
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await?;
tx.commit().await?;
// ... then acknowledge the message to the broker, new or duplicate.
# let _ = processed; Ok(()) }
```")]
        #[derive(Clone, Debug)]
        pub struct $inbox {
            pool: ::sqlx::Pool<$db>,
            names: ::std::sync::Arc<$crate::config::Names>,
        }

        impl $inbox {
            /// An inbox in the table `table` (usually
            /// [`DEFAULT_INBOX_TABLE`](crate::DEFAULT_INBOX_TABLE)) on `pool`; fails with
            /// [`StoreErrorKind::Config`](outbox_core::StoreErrorKind::Config) when the name is
            /// not a plain identifier.
            pub fn new(pool: ::sqlx::Pool<$db>, table: &str) -> Result<Self, ::outbox_core::StoreError> {
                let names = $sql.names(table)?;
                Ok(Self {
                    pool,
                    names: ::std::sync::Arc::new(names),
                })
            }

            /// The pool, for the consumer's own transactions.
            pub fn pool(&self) -> &::sqlx::Pool<$db> {
                &self.pool
            }

            /// Creates the inbox table and its index if missing. Idempotent.
            pub async fn migrate(&self) -> Result<(), ::outbox_core::StoreError> {
                use $crate::error::Context as _;
                let script = $crate::migrations::render($sql.create, &self.names);
                $crate::sql::run_script(&self.pool, &script)
                    .await
                    .doing("creating the inbox table")
                    .map(drop)
            }

            /// Drops the inbox table and everything in it. For tests and uninstalls.
            pub async fn drop_table(&self) -> Result<(), ::outbox_core::StoreError> {
                use $crate::error::Context as _;
                let script = format!("DROP TABLE IF EXISTS {}", self.names.table);
                $crate::sql::run_script(&self.pool, &script)
                    .await
                    .doing("dropping the inbox table")
                    .map(drop)
            }

            /// Records in the caller's transaction that `consumer` received the message `id`;
            /// `true` when it is new (apply its effect in the same transaction, then commit),
            /// `false` for a duplicate (skip the effect). Takes what `sqlx`'s `execute` takes:
            /// `&mut tx`, `&mut *tx`, a connection.
            ///
            /// A transaction recording the same message at the same time waits for this one
            /// to end: it then sees a duplicate if this one commits.
            pub fn record<'c, A>(
                &self,
                executor: A,
                consumer: &str,
                id: ::outbox_core::MessageId,
            ) -> impl ::std::future::Future<Output = Result<bool, ::outbox_core::StoreError>> + Send
            where
                A: ::sqlx::Acquire<'c, Database = $db> + Send,
            {
                use $crate::error::Context as _;
                const DOING: &str = "recording a message in the inbox";
                let statement = ::outbox_core::check_consumer(consumer)
                    .map(|()| $sql.record(&self.names, consumer, id));
                async move {
                    let statement = statement?;
                    let mut conn = executor.acquire().await.doing(DOING)?;
                    let done = bound(&statement.text, statement.args)?
                        .execute(&mut *conn)
                        .await
                        .doing(DOING)?;
                    Ok(done.rows_affected() == 1)
                }
            }

            /// Applies `effect` to `incoming` once for `consumer`: records the message in the
            /// caller's transaction `conn` and, when it is new, runs `effect` in that same
            /// transaction. Returns [`Processed::Duplicate`](outbox_core::Processed::Duplicate)
            /// without running `effect` for a message already processed.
            ///
            /// Commit the transaction afterwards, then acknowledge the message; when `effect`
            /// (or the record) fails, roll it back, so that the record goes with the effect
            /// and the next delivery is new again.
            pub async fn process<T, E>(
                &self,
                conn: &mut <$db as ::sqlx::Database>::Connection,
                consumer: &str,
                incoming: &::outbox_core::Incoming,
                effect: impl AsyncFnOnce(&mut <$db as ::sqlx::Database>::Connection) -> Result<T, E>,
            ) -> Result<::outbox_core::Processed<T>, E>
            where
                E: From<::outbox_core::StoreError>,
            {
                if !self.record(&mut *conn, consumer, incoming.id).await? {
                    return Ok(::outbox_core::Processed::Duplicate);
                }
                effect(conn).await.map(::outbox_core::Processed::Applied)
            }

            /// Deletes at most `limit` records older than `older_than` (by the database's
            /// clock), oldest first; returns how many. Run it periodically, in batches, with a
            /// window longer than the broker can redeliver a message.
            ///
            /// The statement runs in a task of its own: dropping the returned future stops
            /// the waiting, never a statement half-way (which can leave a MySQL connection
            /// out of step with its server).
            pub async fn purge(
                &self,
                older_than: ::std::time::Duration,
                limit: usize,
            ) -> Result<u64, ::outbox_core::StoreError> {
                use $crate::error::Context as _;
                const DOING: &str = "purging old inbox records";
                let statement = $sql.purge(&self.names, older_than, limit);
                let pool = self.pool.clone();
                let purge = ::tokio::spawn(async move {
                    bound(&statement.text, statement.args)?
                        .execute(&pool)
                        .await
                        .doing(DOING)
                        .map(|done| done.rows_affected())
                });
                purge.await.map_err(|err| {
                    ::outbox_core::StoreError::new(::outbox_core::StoreErrorKind::Database, DOING)
                        .with_source(err)
                })?
            }
        }

        impl<'c> ::outbox_core::Inbox<&'c mut <$db as ::sqlx::Database>::Connection> for $inbox {
            async fn record(
                &self,
                tx: &'c mut <$db as ::sqlx::Database>::Connection,
                consumer: &str,
                id: ::outbox_core::MessageId,
            ) -> Result<bool, ::outbox_core::StoreError> {
                $inbox::record(self, tx, consumer, id).await
            }

            async fn purge(
                &self,
                older_than: ::std::time::Duration,
                limit: usize,
            ) -> Result<u64, ::outbox_core::StoreError> {
                $inbox::purge(self, older_than, limit).await
            }
        }
    };
}

pub(crate) use inbox;
