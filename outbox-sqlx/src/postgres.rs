//! [`PostgresStore`]: the outbox on PostgreSQL.
//!
//! - A claim is one call of a PL/pgSQL function (schema version 3), one round trip. It locks
//!   the relay's partition rows (`FOR SHARE`), then leases the next rows with one
//!   `UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)`: two relays never lease the same
//!   row, a partition that changes hands waits for the old owner's claim to commit, and the
//!   claim statement reads the leases of every claim committed before it (per-key order).
//!   Candidates with an earlier pending message of their key that `SKIP LOCKED` passed over
//!   (a row another transaction held locked) are dropped from the claim: that message must
//!   go first.
//! - No index mentions the lease columns, and pages are half empty at insert (schema version
//!   2), so the lease `UPDATE` writes heap-only tuples: no index entry, a quarter of the WAL.
//!   Claims tell a held key by its first pending message instead of an index of held rows.
//! - Settles are one transaction of set-based statements over arrays (`id = ANY($1)`,
//!   `unnest(...)`), one per outcome.
//! - Enqueue sends `pg_notify` in the caller's transaction: the relay's
//!   [`Store::listen`] hears it when, and only when, that transaction commits.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{
    Claim, DeadLetter, DeadLetterFilter, LeaseToken, MessageId, RelayId, RelayMember, Settled,
    Settlement, Stats, Store, StoreError, Wakeup,
};
use sqlx::postgres::{PgArguments, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::{Arguments as _, Postgres, Row};
use uuid::Uuid;

use crate::config::{Quoting, StoreConfig, config_error};
use crate::error::Context as _;
use crate::inbox::InboxSql;
use crate::migrations::Schema;
use crate::shared::Base;
use crate::sql::{self, Arg, DEAD, Dialect, Limited, PENDING, PUBLISHED, RowParts, Sql, column};

/// The outbox schema; its last migration's version is [`PostgresStore::SCHEMA_VERSION`].
const SCHEMA: Schema = Schema {
    migrations: &[
        (1, include_str!("../migrations/postgres/0001_outbox.sql")),
        (
            2,
            include_str!("../migrations/postgres/0002_hot_claims.sql"),
        ),
        (
            3,
            include_str!("../migrations/postgres/0003_claim_function.sql"),
        ),
    ],
    dialect: &PG,
    versions_table: "CREATE TABLE IF NOT EXISTS {schema} (version INTEGER PRIMARY KEY, \
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    insert_ignore: ("INSERT INTO", " ON CONFLICT DO NOTHING"),
    epoch: "'epoch'",
    bigint: "BIGINT",
};

const QUOTING: Quoting = Quoting {
    quote: '"',
    qualified: true,
};

fn now_plus(sql: &mut Sql, micros: i64) {
    sql.push("now() + ")
        .bind(Arg::Int(micros))
        .push(" * interval '1 microsecond'");
}

/// `now()` is the transaction's start: every statement of one claim or settle sees the
/// same instant.
const PG: Dialect = Dialect {
    numbered: true,
    quote: '"',
    now: "now()",
    now_plus,
    limited: Limited::Subquery { locks: true },
};

/// Starts a settle transaction. Claims (in their function, schema version 3) and settles
/// commit without waiting for their WAL to reach the disk (`synchronous_commit = off`, for
/// these transactions only): the flush costs up to several milliseconds on a loaded disk, on
/// the path of every message. A database crash can lose the last few of them (at most about
/// three times `wal_writer_delay`), and nothing else: a lost lease or settle leaves its
/// messages pending, leased at most until the lease ends, so they are published again (a
/// duplicate, which at-least-once allows), never lost. Per-key order holds as well: a message
/// is published only after the earlier ones of its key were acknowledged, and the WAL is
/// replayed in order, so no later claim survives a lost one. Enqueues are the caller's
/// transactions and keep the caller's setting.
const BEGIN_SETTLE: &str = "BEGIN; SET LOCAL synchronous_commit = off";

/// The transactional outbox on PostgreSQL 12 or later.
///
/// Cheap to clone: clones share the pool. See the [crate documentation](crate) for an example.
#[derive(Clone, Debug)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

type Inner = Base<Postgres>;

impl PostgresStore {
    /// A store on `pool` with `config`; fails with [`StoreErrorKind::Config`] when the table
    /// name or the notify channel is not a plain identifier.
    ///
    /// [`StoreErrorKind::Config`]: outbox_core::StoreErrorKind::Config
    pub fn new(pool: PgPool, config: StoreConfig) -> Result<Self, StoreError> {
        let channel = config.channel();
        if crate::config::split_table(channel, true).is_err() || channel.len() > 63 {
            return Err(config_error(format!(
                "invalid notify channel {channel:?}: it must be a plain identifier of at most \
                 63 characters (set `notify_channel` when the table name is longer)"
            )));
        }
        Ok(Self {
            inner: Arc::new(Base::new(pool, config, QUOTING, &PG)?),
        })
    }

    /// Opens a pool of [`StoreConfig::max_connections`] to [`StoreConfig::url`] and builds the
    /// store on it.
    pub async fn connect(config: StoreConfig) -> Result<Self, StoreError> {
        let url = config.require_url("PostgresStore")?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .connect(url)
            .await
            .doing("connecting to PostgreSQL")?;
        Self::new(pool, config)
    }

    /// Locks partition rows in partition order, the order claims take them in (`FOR SHARE`),
    /// before an `UPDATE` changes them: an `UPDATE` alone locks in the order it finds the rows
    /// (their place in the table), and could wait for a claim that waits for it.
    async fn lock_partitions(
        &self,
        tx: &mut sqlx::Transaction<'static, Postgres>,
        partitions: &[i16],
        doing: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "SELECT \"partition\" FROM {} WHERE \"partition\" = ANY($1) \
             ORDER BY \"partition\" FOR UPDATE",
            self.inner.names.partitions
        ))
        .bind(partitions)
        .execute(&mut **tx)
        .await
        .doing(doing)
        .map(drop)
    }

    /// Creates or upgrades the outbox tables to [`Self::SCHEMA_VERSION`], in one transaction
    /// under an advisory lock, so that relays starting together migrate once. Idempotent.
    ///
    /// The schema of a `schema.table` name must exist.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        const DOING: &str = "migrating the outbox schema";
        let names = &self.inner.names;
        let mut tx = sql::begin(&self.inner.pool, None, DOING).await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("outbox-migrate:{}", names.table))
            .execute(&mut *tx)
            .await
            .doing(DOING)?;
        self.apply_schema(&mut tx).await?;
        tx.commit().await.doing(DOING)
    }

    /// The schema version of the outbox tables; 0 when they were never migrated.
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&self.inner.names.schema)
            .fetch_one(&self.inner.pool)
            .await
            .doing("reading the outbox schema version")?;
        if exists.is_none() {
            return Ok(0);
        }
        sqlx::query_scalar(&format!(
            "SELECT COALESCE(MAX(version), 0) FROM {}",
            self.inner.names.schema
        ))
        .fetch_one(&self.inner.pool)
        .await
        .doing("reading the outbox schema version")
    }

    /// Drops the outbox tables and everything in them. For tests and uninstalls.
    pub async fn drop_tables(&self) -> Result<(), StoreError> {
        let names = &self.inner.names;
        sqlx::raw_sql(&format!(
            "DROP FUNCTION IF EXISTS {}(TEXT, BIGINT, UUID, BIGINT); \
             DROP TABLE IF EXISTS {}, {}, {}, {}",
            names.claim, names.table, names.partitions, names.relays, names.schema
        ))
        .execute(&self.inner.pool)
        .await
        .doing("dropping the outbox tables")
        .map(drop)
    }
}

crate::shared::accessors!(PostgresStore, PgPool, SCHEMA);
crate::shared::apply_schema!(PostgresStore, PgConnection, SCHEMA);

/// Makes the first `INSERT` of an enqueue send `pg_notify` too (when notifications are on):
/// delivered on commit, once per transaction and channel whatever the count.
fn notify_on_commit(store: &PostgresStore, statement: &mut Sql) {
    if !store.inner.config.notify {
        return;
    }
    let insert = std::mem::take(&mut statement.text);
    statement
        .push("WITH enqueued AS (")
        .push(&insert)
        .push(") SELECT pg_notify(");
    statement
        .bind(Arg::Text(store.inner.config.channel().to_owned()))
        .push(", '')");
}

crate::enqueue::enqueue_methods!(PostgresStore, Postgres, PgConnection, PG, notify_on_commit);

/// `args` as PostgreSQL values.
fn arguments(args: Vec<Arg>) -> Result<PgArguments, StoreError> {
    let mut out = PgArguments::default();
    for arg in args {
        match arg {
            Arg::Id(id) => out.add(*id.as_uuid()),
            Arg::Token(token) => out.add(*token.as_uuid()),
            Arg::Small(n) => out.add(n),
            Arg::Int(n) => out.add(n),
            Arg::Text(text) => out.add(text),
            Arg::OptText(text) => out.add(text),
            Arg::Bytes(bytes) => out.add(bytes),
            Arg::Time(time) => out.add(time),
        }
        .map_err(crate::error::encode)?;
    }
    Ok(out)
}

/// A query on `text` with `args`.
fn bound(text: &str, args: Vec<Arg>) -> Result<Query<'_, Postgres, PgArguments>, StoreError> {
    Ok(sqlx::query_with(text, arguments(args)?))
}

fn row_parts(row: &PgRow) -> Result<RowParts, sqlx::Error> {
    Ok(RowParts {
        seq: row.try_get("seq")?,
        id: MessageId::from_uuid(row.try_get::<Uuid, _>("id")?),
        destination: column(row, "destination"),
        key: column(row, "key"),
        payload: column(row, "payload"),
        headers: column(row, "headers"),
        created_at: column(row, "created_at"),
        attempts: column::<_, i32>(row, "attempts").map(i64::from),
        last_error: column(row, "last_error"),
    })
}

impl Store for PostgresStore {
    crate::shared::operations!(PG);

    async fn claim(
        &self,
        relay: &RelayId,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        const DOING: &str = "claiming outbox messages";
        let Inner {
            pool,
            names,
            columns,
            ..
        } = &*self.inner;
        let token = LeaseToken::new();
        if limit == 0 {
            return Ok(sql::assemble_claim(token, Vec::new()));
        }
        // One call, one round trip: the partition lock and the claim statement run in the
        // claim function of schema version 3 (migrations/postgres/0003_claim_function.sql).
        let rows = sqlx::query(&format!(
            "SELECT {} FROM {}($1, $2, $3, $4) c",
            sql::qualified_columns(columns, "c"),
            names.claim
        ))
        .bind(relay.as_str())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(*token.as_uuid())
        .bind(sql::micros(lease))
        .fetch_all(pool)
        .await
        .doing(DOING)?;
        let parts = rows.iter().filter_map(|row| match row_parts(row) {
            Ok(parts) => Some(parts),
            Err(err) => {
                // Unreachable with the shipped schema (seq and id cannot be NULL or
                // malformed); the lease expires and the row is claimed again.
                tracing::error!(error = %err, "a claimed outbox row has no readable id");
                None
            }
        });
        Ok(sql::assemble_claim(token, parts.collect()))
    }

    async fn settle(
        &self,
        token: LeaseToken,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        const DOING: &str = "recording publish outcomes";
        if settlement.is_empty() {
            return Ok(Settled::default());
        }
        let Inner {
            pool,
            names,
            config,
            ..
        } = &*self.inner;
        let t = &names.table;
        let fenced =
            format!("o.state = {PENDING} AND o.lease_token = $2 AND o.lease_until > now()");
        let token = *token.as_uuid();
        let mut applied = 0;
        let mut tx = sql::begin(pool, Some(BEGIN_SETTLE), DOING).await?;
        if !settlement.published.is_empty() {
            let ids = uuids(&settlement.published);
            let text = if config.retention.is_some() {
                format!(
                    "UPDATE {t} AS o SET state = {PUBLISHED}, published_at = now(), lease_token = NULL, \
                     lease_until = NULL WHERE o.id = ANY($1) AND {fenced}"
                )
            } else {
                format!("DELETE FROM {t} AS o WHERE o.id = ANY($1) AND {fenced}")
            };
            applied += sqlx::query(&text)
                .bind(ids)
                .bind(token)
                .execute(&mut *tx)
                .await
                .doing(DOING)?
                .rows_affected();
        }
        if !settlement.retry.is_empty() {
            let ids: Vec<Uuid> = settlement.retry.iter().map(|r| *r.id.as_uuid()).collect();
            let errors: Vec<&str> = settlement.retry.iter().map(|r| r.error.as_str()).collect();
            let delays: Vec<i64> = settlement
                .retry
                .iter()
                .map(|r| sql::micros(r.delay))
                .collect();
            applied += sqlx::query(&format!(
                "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = v.error, \
                 available_at = now() + v.delay * interval '1 microsecond', \
                 lease_token = NULL, lease_until = NULL \
                 FROM unnest($1::uuid[], $3::text[], $4::int8[]) AS v(id, error, delay) \
                 WHERE o.id = v.id AND {fenced}"
            ))
            .bind(ids)
            .bind(token)
            .bind(errors)
            .bind(delays)
            .execute(&mut *tx)
            .await
            .doing(DOING)?
            .rows_affected();
        }
        if !settlement.dead.is_empty() {
            let ids: Vec<Uuid> = settlement.dead.iter().map(|d| *d.id.as_uuid()).collect();
            let errors: Vec<&str> = settlement.dead.iter().map(|d| d.error.as_str()).collect();
            applied += sqlx::query(&format!(
                "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = v.error, \
                 state = {DEAD}, dead_at = now(), lease_token = NULL, lease_until = NULL \
                 FROM unnest($1::uuid[], $3::text[]) AS v(id, error) \
                 WHERE o.id = v.id AND {fenced}"
            ))
            .bind(ids)
            .bind(token)
            .bind(errors)
            .execute(&mut *tx)
            .await
            .doing(DOING)?
            .rows_affected();
        }
        if !settlement.release.is_empty() {
            applied += sqlx::query(&format!(
                "UPDATE {t} AS o SET lease_token = NULL, lease_until = NULL WHERE o.id = ANY($1) AND {fenced}"
            ))
            .bind(uuids(&settlement.release))
            .bind(token)
            .execute(&mut *tx)
            .await
            .doing(DOING)?
            .rows_affected();
        }
        tx.commit().await.doing(DOING)?;
        Ok(sql::settled(settlement, applied))
    }

    async fn heartbeat(
        &self,
        relay: &RelayId,
        ttl: Duration,
    ) -> Result<Vec<RelayMember>, StoreError> {
        const DOING: &str = "renewing the relay's membership";
        let Inner { pool, names, .. } = &*self.inner;
        let mut tx = sql::begin(pool, None, DOING).await?;
        let register = sql::register(
            &PG,
            names,
            relay,
            ttl,
            "ON CONFLICT (relay) DO UPDATE SET expires_at = EXCLUDED.expires_at",
        );
        bound(&register.text, register.args)?
            .execute(&mut *tx)
            .await
            .doing(DOING)?;
        sqlx::query(&sql::forget_expired(&PG, names))
            .execute(&mut *tx)
            .await
            .doing(DOING)?;
        let rows: Vec<(String, DateTime<Utc>, Option<i16>)> =
            sqlx::query_as(&sql::members(&PG, names))
                .fetch_all(&mut *tx)
                .await
                .doing(DOING)?;
        tx.commit().await.doing(DOING)?;
        Ok(sql::members_from(rows))
    }

    async fn members(&self) -> Result<Vec<RelayMember>, StoreError> {
        let rows: Vec<(String, DateTime<Utc>, Option<i16>)> =
            sqlx::query_as(&sql::members(&PG, &self.inner.names))
                .fetch_all(&self.inner.pool)
                .await
                .doing("listing the live relays")?;
        Ok(sql::members_from(rows))
    }

    async fn acquire(
        &self,
        relay: &RelayId,
        partitions: &[u16],
        ttl: Duration,
    ) -> Result<Vec<u16>, StoreError> {
        let partitions = sql::partition_args(partitions);
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        const DOING: &str = "acquiring partitions";
        let mut tx = sql::begin(&self.inner.pool, None, DOING).await?;
        self.lock_partitions(&mut tx, &partitions, DOING).await?;
        let mut statement = sql::acquire(&PG, &self.inner.names, relay, &partitions, ttl);
        statement.push(" RETURNING \"partition\"");
        let owned: Vec<i16> = bound(&statement.text, statement.args)?
            .fetch_all(&mut *tx)
            .await
            .doing(DOING)?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()
            .doing(DOING)?;
        tx.commit().await.doing(DOING)?;
        Ok(sql::partitions_from(owned))
    }

    async fn release(&self, relay: &RelayId, partitions: &[u16]) -> Result<(), StoreError> {
        let partitions = sql::partition_args(partitions);
        if partitions.is_empty() {
            return Ok(());
        }
        const DOING: &str = "releasing partitions";
        let mut tx = sql::begin(&self.inner.pool, None, DOING).await?;
        self.lock_partitions(&mut tx, &partitions, DOING).await?;
        let statement = sql::release(&PG, &self.inner.names, relay, Some(&partitions));
        bound(&statement.text, statement.args)?
            .execute(&mut *tx)
            .await
            .doing(DOING)?;
        tx.commit().await.doing(DOING)
    }

    async fn leave(&self, relay: &RelayId) -> Result<(), StoreError> {
        const DOING: &str = "leaving the relay group";
        let Inner { pool, names, .. } = &*self.inner;
        let mut tx = sql::begin(pool, None, DOING).await?;
        // The relay's own partition rows, in partition order, as `release` locks them.
        sqlx::query(&format!(
            "SELECT \"partition\" FROM {} WHERE owner = $1 ORDER BY \"partition\" FOR UPDATE",
            names.partitions
        ))
        .bind(relay.as_str())
        .execute(&mut *tx)
        .await
        .doing(DOING)?;
        for statement in [
            sql::release(&PG, names, relay, None),
            sql::forget(&PG, names, relay),
        ] {
            bound(&statement.text, statement.args)?
                .execute(&mut *tx)
                .await
                .doing(DOING)?;
        }
        tx.commit().await.doing(DOING)
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        let row: (i64, Option<DateTime<Utc>>, i64, i64, DateTime<Utc>) =
            sqlx::query_as(&sql::stats(&self.inner.names, &PG))
                .fetch_one(&self.inner.pool)
                .await
                .doing("counting outbox messages")?;
        Ok(sql::stats_from(row))
    }

    async fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
        let Inner {
            pool,
            names,
            columns,
            ..
        } = &*self.inner;
        let statement = sql::dead_letters(&PG, names, columns, filter);
        let rows = bound(&statement.text, statement.args)?
            .fetch_all(pool)
            .await
            .doing("listing dead letters")?;
        rows.iter()
            .map(|row| {
                let parts = row_parts(row).doing("listing dead letters")?;
                parts.into_dead_letter(column(row, "dead_at"))
            })
            .collect()
    }

    /// Listens on the notify channel with a connection of its own, waking the relay on each
    /// notification and after every reconnection (notifications sent meanwhile are lost).
    /// Returns an error when the connection cannot be restored; the relay then polls and calls
    /// it again later.
    async fn listen(&self, wakeup: Wakeup) -> Result<(), StoreError> {
        const DOING: &str = "listening for outbox notifications";
        let mut listener = PgListener::connect_with(&self.inner.pool)
            .await
            .doing(DOING)?;
        listener
            .listen(self.inner.config.channel())
            .await
            .doing(DOING)?;
        // Messages committed before the LISTEN took effect were not announced.
        wakeup.wake();
        loop {
            match listener.try_recv().await.doing(DOING)? {
                Some(_) => wakeup.wake(),
                None => {
                    tracing::debug!("notification connection lost; reconnecting");
                    wakeup.wake();
                }
            }
        }
    }
}

fn uuids(ids: &[MessageId]) -> Vec<Uuid> {
    ids.iter().map(|id| *id.as_uuid()).collect()
}

/// The inbox's SQL on PostgreSQL.
const INBOX: InboxSql = InboxSql {
    dialect: &PG,
    quoting: QUOTING,
    create: include_str!("../migrations/postgres/inbox.sql"),
    insert_ignore: ("INSERT INTO", " ON CONFLICT DO NOTHING"),
    row_id: "ctid",
};

crate::inbox::inbox!(
    PostgresInbox,
    Postgres,
    PgPool,
    PgConnection,
    INBOX,
    "PostgreSQL",
    "```no_run
# async fn example(incoming: outbox_core::Incoming) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
use outbox_core::Processed;
use outbox_sqlx::{PostgresInbox, DEFAULT_INBOX_TABLE};

let pool = outbox_sqlx::sqlx::PgPool::connect(\"postgres://app@127.0.0.1/app\").await?;
let inbox = PostgresInbox::new(pool.clone(), DEFAULT_INBOX_TABLE)?;
inbox.migrate().await?;

// For each message received (`incoming`, from `outbox_kafka::incoming` or its kin):
let mut tx = pool.begin().await?;
let processed = inbox
    .process(&mut tx, \"billing\", &incoming, async |tx| {
        outbox_sqlx::sqlx::query(\"UPDATE accounts SET orders = orders + 1 WHERE id = 7\")
            .execute(&mut *tx)
            .await?;
        // The effect's error type takes the inbox's errors too (`From<StoreError>`).
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await?;
tx.commit().await?;
// ... then acknowledge the message to the broker, new or duplicate.
# let _ = processed; Ok(()) }
```"
);
