//! [`PostgresStore`]: the outbox on PostgreSQL.
//!
//! - **Claims held in a transaction** ([`ClaimMode::Transaction`], the default; schema
//!   version 5): a claim begins a transaction and calls a PL/pgSQL function that locks the next
//!   rows of the relay's partitions (`FOR UPDATE SKIP LOCKED`) and returns them; the
//!   transaction stays open, under the claim's token, while the batch is published. The
//!   settle deletes the published rows by `ctid` (or marks them, with a retention), writes the
//!   failed ones back, and commits: each message is locked and deleted, as in a hand-written
//!   `DELETE ... RETURNING` relay, and written no more. A relay that dies has its
//!   transaction rolled back; one that stays quiet past its lease has it ended by PostgreSQL
//!   (`idle_in_transaction_session_timeout`, set for the claim's transaction only).
//! - **Claims by lease** ([`ClaimMode::Lease`]; schema version 3): one call of a PL/pgSQL
//!   function locks the relay's partition rows (`FOR SHARE`), then leases the next rows with
//!   one `UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)` and commits; the settle is a
//!   second transaction of set-based statements over arrays, fenced by the token. No index
//!   mentions the lease columns, and pages are half empty at insert (schema version 2), so
//!   the lease `UPDATE` writes heap-only tuples.
//! - Both keep per-key order by the first pending message of each key: a row another
//!   transaction holds (locked, or leased) is still pending and holds back the later messages
//!   of its key; candidates whose earlier message `SKIP LOCKED` passed over are dropped from
//!   the claim. Both kinds of claim can share a table, while relays are upgraded.
//! - Any `INSERT` into the outbox table, enqueue's or another language's plain one (schema
//!   version 4), fires a statement trigger that sends `pg_notify` in the writer's transaction:
//!   the relay's [`Store::listen`] hears it when, and only when, that transaction commits.
//!   [`PostgresStore::migrate`] keeps the trigger in step with [`StoreConfig::notify`] and
//!   the channel.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use outbox_core::{
    Claim, LeaseToken, MessageId, RelayId, Settled, Settlement, Store, StoreError, Wakeup,
};
use sqlx::Postgres;
use sqlx::postgres::{PgArguments, PgConnection, PgListener, PgRow};
use uuid::Uuid;

use crate::config::{ClaimMode, Quoting, StoreConfig, config_error};
use crate::error::Context as _;
use crate::held::{HeldClaim, HeldRows};
use crate::inbox::InboxSql;
use crate::migrations::Schema;
use crate::shared::Base;
use crate::sql::{
    self, Arg, ClaimArgs, DEAD, Decoding, Dialect, Limited, PENDING, PUBLISHED, Sql, column,
};

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
        (
            4,
            include_str!("../migrations/postgres/0004_any_writer.sql"),
        ),
        (
            5,
            include_str!("../migrations/postgres/0005_held_claims.sql"),
        ),
        (
            6,
            include_str!("../migrations/postgres/0006_handed_claims.sql"),
        ),
    ],
    dialect: &PG,
    versions_table: "CREATE TABLE IF NOT EXISTS {schema} (version INTEGER PRIMARY KEY, \
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    epoch: "'epoch'",
    bigint: "BIGINT",
    exists: |names| {
        let mut sql = Sql::new(&PG);
        sql.push("SELECT COUNT(to_regclass(")
            .bind(Arg::Text(names.schema.clone()))
            .push("))");
        sql
    },
    drop: "DROP TABLE IF EXISTS {table}, {partitions}, {relays}, {schema}; \
           DROP FUNCTION IF EXISTS {claim}(TEXT, BIGINT, UUID, BIGINT); \
           DROP FUNCTION IF EXISTS {fn_take}(TEXT, BIGINT, BIGINT, TEXT[], BIGINT[]); \
           DROP FUNCTION IF EXISTS {fn_take}(TEXT, BIGINT, BIGINT, TEXT[], BIGINT[], BOOLEAN); \
           DROP FUNCTION IF EXISTS {fn_fill}(); DROP FUNCTION IF EXISTS {fn_notify}(); \
           DROP FUNCTION IF EXISTS {fn_uuid7}()",
    without_notify: "DROP TRIGGER IF EXISTS {trg_notify} ON {table}",
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
    quoting: Quoting {
        quote: '"',
        qualified: true,
        qualified_triggers: false,
    },
    now: "now()",
    now_plus,
    limited: Limited::Subquery { locks: true },
    row_id: "ctid",
    insert_ignore: ("INSERT INTO", " ON CONFLICT DO NOTHING"),
    upsert_relay: "ON CONFLICT (relay) DO UPDATE SET expires_at = EXCLUDED.expires_at",
    locks_rows: true,
    begin_write: None,
    heartbeat_in_transaction: true,
    end_held: None,
};

/// Columns as PostgreSQL stores them: ids as `uuid`, times as `timestamptz`.
const DECODING: Decoding<PgRow> = Decoding::new(
    |row| column::<_, Uuid>(row, "id").map(MessageId::from_uuid),
    column,
    column,
    column,
    column,
);

type Arguments<'q> = PgArguments;

crate::shared::binding!(Postgres, |uuid: Uuid| uuid, |time: DateTime<Utc>| time);

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

type Inner = Base<Postgres>;

crate::shared::store! {
    /// The transactional outbox on PostgreSQL 13 or later (12 with the `pgcrypto` extension).
    ///
    /// Cheap to clone: clones share the pool. See the [crate documentation](crate) for an example.
    PostgresStore(Postgres, PG),
    /// A store on `pool` with `config`; fails with [`StoreErrorKind::Config`] when the table
    /// name or the notify channel is not a plain identifier.
    ///
    /// [`StoreErrorKind::Config`]: outbox_core::StoreErrorKind::Config
    new(check_config),
    /// Opens a pool of [`StoreConfig::max_connections`](crate::StoreConfig::max_connections)
    /// to [`StoreConfig::url`](crate::StoreConfig::url) and builds the store on it.
    connect("PostgreSQL", |options| options),
}

/// Refuses a notify channel that is not a plain identifier PostgreSQL takes, and claims of
/// handed messages only by lease (only the take function of a held claim filters them).
fn check_config(config: &StoreConfig) -> Result<(), StoreError> {
    if config.handed_only && config.claim_mode == Some(ClaimMode::Lease) {
        return Err(config_error(
            "handed_only: claims of handed messages only are held in a transaction; \
             set claim_mode to \"transaction\" (or leave it out)",
        ));
    }
    let channel = config.channel();
    if crate::config::split_table(channel, true).is_err() || channel.len() > 63 {
        return Err(config_error(format!(
            "invalid notify channel {channel:?}: it must be a plain identifier of at most \
             63 characters (set `notify_channel` when the table name is longer)"
        )));
    }
    Ok(())
}

impl PostgresStore {
    /// Creates or upgrades the outbox tables to [`Self::SCHEMA_VERSION`], in one transaction
    /// under an advisory lock, so that relays starting together migrate once. Idempotent.
    ///
    /// The schema of a `schema.table` name must exist.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        const DOING: &str = "migrating the outbox schema";
        let names = &self.inner.names;
        // The idempotent statements' notices ("trigger ... does not exist, skipping") say
        // nothing an operator needs: this transaction keeps the warnings only.
        let begin = "BEGIN; SET LOCAL client_min_messages = warning";
        let mut tx = sql::begin(&self.inner.pool, Some(begin), DOING).await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("outbox-migrate:{}", names.table))
            .execute(&mut *tx)
            .await
            .doing(DOING)?;
        self.apply_schema(&mut tx).await?;
        self.sync_notify(&mut tx).await?;
        tx.commit().await.doing(DOING)
    }

    /// Brings the notify trigger of schema version 4 in step with the configuration: present
    /// with the configured channel when notifications are on, absent when they are off.
    /// Changes nothing when it is already so: a `DROP TRIGGER` waits for every open
    /// transaction that wrote to the table, and the writers that come after wait for it.
    async fn sync_notify(&self, conn: &mut PgConnection) -> Result<(), StoreError> {
        const DOING: &str = "setting up the outbox's notify trigger";
        let names = &self.inner.names;
        let config = &self.inner.config;
        let trigger = names.trigger("notify");
        let current: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT tgargs FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2",
        )
        .bind(&names.table)
        .bind(trigger.trim_matches('"'))
        .fetch_optional(&mut *conn)
        .await
        .doing(DOING)?;
        // The arguments of a trigger, each ended by a NUL byte.
        let wanted = config
            .notify
            .then(|| format!("{}\0", config.channel()).into_bytes());
        if current == wanted {
            return Ok(());
        }
        let mut script = format!("DROP TRIGGER IF EXISTS {trigger} ON {};", names.table);
        if config.notify {
            script.push_str(&crate::migrations::render(
                "CREATE TRIGGER {trg_notify} AFTER INSERT ON {table} \
                 FOR EACH STATEMENT EXECUTE FUNCTION {fn_notify}({channel})",
                names,
            ));
        }
        sql::run_script(&mut *conn, &script)
            .await
            .doing(DOING)
            .map(drop)
    }
}

crate::shared::accessors!(PostgresStore, Postgres, SCHEMA);
impl PostgresStore {
    /// A claim is one call of the claim function of schema version 3
    /// (migrations/postgres/0003_claim_function.sql), one round trip: it locks the relay's
    /// partitions and leases the rows.
    fn claim_statement(&self, claim: &ClaimArgs<'_>) -> Sql {
        let inner = &*self.inner;
        let columns = sql::qualified_columns(&inner.columns, "c");
        let mut statement = Sql::new(&PG);
        statement
            .push(&format!("SELECT {columns} FROM {}(", inner.names.claim))
            .bind(Arg::Text(claim.relay.as_str().to_owned()))
            .push(", ")
            .bind(Arg::Int(claim.limit))
            .push(", ")
            .bind(Arg::Token(claim.token))
            .push(", ")
            .bind(Arg::Int(sql::micros(claim.lease)))
            .push(") c");
        statement
    }
}

crate::enqueue::enqueue_methods!(PostgresStore, Postgres, PgConnection, PG);

impl Store for PostgresStore {
    crate::shared::operations!(PG);

    async fn claim(
        &self,
        relay: &RelayId,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        match self
            .inner
            .config
            .claim_mode
            .unwrap_or(ClaimMode::Transaction)
        {
            ClaimMode::Lease => self.claim_leased(relay, limit, lease).await,
            _ => self.claim_held(relay, limit, lease).await,
        }
    }

    async fn settle(
        &self,
        token: LeaseToken,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        if settlement.is_empty() {
            return Ok(Settled::default());
        }
        match self
            .inner
            .config
            .claim_mode
            .unwrap_or(ClaimMode::Transaction)
        {
            ClaimMode::Lease => self.settle_leased(token, settlement).await,
            _ => self.settle_held(token, settlement).await,
        }
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

/// Claims held in a transaction ([`ClaimMode::Transaction`], schema version 5).
impl PostgresStore {
    /// Begins a transaction, locks the next claimable rows with the take function of schema
    /// version 5 (migrations/postgres/0005_held_claims.sql) and keeps the transaction open
    /// under the claim's token until [`Self::settle_held`].
    async fn claim_held(
        &self,
        relay: &RelayId,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        const DOING: &str = "claiming outbox messages";
        let inner = &*self.inner;
        let token = LeaseToken::new();
        if limit == 0 {
            return Ok(sql::assemble_claim(token, Vec::new()));
        }
        inner.held.roll_back_expired(false).await;
        // What this store's claims hold is passed over without a lock tried. (Claims may run
        // side by side: one still under way is skipped row by row, and blockers drops what
        // would overtake it. Measured, that is faster than claiming one at a time.)
        let (keys, seqs) = inner.held.in_flight();
        let until = Instant::now() + lease;
        let mut tx = sql::begin(&inner.pool, None, DOING).await?;
        let columns = sql::qualified_columns(&inner.columns, "c");
        let rows = sqlx::query(&format!(
            "SELECT c.row_id, {columns} FROM {}($1, $2, $3, $4, $5, $6) c",
            inner.names.function("take")
        ))
        .bind(relay.as_str())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(sql::micros(lease))
        .bind(keys)
        .bind(seqs)
        .bind(inner.config.handed_only)
        .fetch_all(&mut *tx)
        .await
        .doing(DOING)?;
        let row_ids: HashMap<i64, String> = rows
            .iter()
            .filter_map(|row| Some((column(row, "seq").ok()?, column(row, "row_id").ok()?)))
            .collect();
        let (parts, unreadable) = DECODING.claimed(&rows);
        for (seq, error) in &unreadable {
            tracing::error!(seq, %error, "dead-lettering an outbox row whose id cannot be read");
            let statement = sql::bury(&PG, &inner.names, *seq, error);
            bound(&statement.text, statement.args)?
                .execute(&mut *tx)
                .await
                .doing(DOING)?;
        }
        let held = HeldRows::new(
            parts
                .iter()
                .filter_map(|part| Some((part, Some(row_ids.get(&part.seq)?.clone())))),
        );
        let claim = sql::assemble_claim(token, parts);
        if claim.is_empty() {
            tx.commit().await.doing(DOING)?;
        } else {
            inner.held.insert(
                token,
                HeldClaim {
                    until,
                    tx,
                    rows: held,
                },
            );
        }
        Ok(claim)
    }

    /// Applies a settlement in the transaction of its claim, and commits: published rows are
    /// deleted (or marked, with a retention), failed ones written back, released ones only
    /// unlocked. Outcomes of messages the claim does not hold, of a claim not held (any more),
    /// or of a claim past its lease are fenced.
    async fn settle_held(
        &self,
        token: LeaseToken,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        const DOING: &str = "recording publish outcomes";
        let inner = &*self.inner;
        let Some(claim) = inner.held.take_live(&token).await else {
            return Ok(sql::settled(settlement, 0));
        };
        let applied = claim.rows.holds(settlement);
        let HeldClaim { mut tx, rows, .. } = claim;
        let row = |id: &MessageId| rows.row(id);
        let t = &inner.names.table;
        // The transaction began at the claim: times are the statement's.
        let now = "statement_timestamp()";
        let published: Vec<String> = settlement.published.iter().filter_map(row).collect();
        if !published.is_empty() {
            let text = if inner.config.retention.is_some() {
                format!(
                    "UPDATE {t} SET state = {PUBLISHED}, published_at = {now} \
                     WHERE ctid = ANY($1::text[]::tid[])"
                )
            } else {
                format!("DELETE FROM {t} WHERE ctid = ANY($1::text[]::tid[])")
            };
            sqlx::query(&text)
                .bind(published)
                .execute(&mut *tx)
                .await
                .doing(DOING)?;
        }
        let (retried, (errors, delays)): (Vec<String>, (Vec<&str>, Vec<i64>)) = settlement
            .retry
            .iter()
            .filter_map(|r| Some((row(&r.id)?, (r.error.as_str(), sql::micros(r.delay)))))
            .unzip();
        if !retried.is_empty() {
            sqlx::query(&format!(
                "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = v.error, \
                 available_at = {now} + v.delay * interval '1 microsecond' \
                 FROM unnest($1::text[]::tid[], $2::text[], $3::int8[]) AS v(row_id, error, delay) \
                 WHERE o.ctid = v.row_id"
            ))
            .bind(retried)
            .bind(errors)
            .bind(delays)
            .execute(&mut *tx)
            .await
            .doing(DOING)?;
        }
        let (dead, errors): (Vec<String>, Vec<&str>) = settlement
            .dead
            .iter()
            .filter_map(|d| Some((row(&d.id)?, d.error.as_str())))
            .unzip();
        if !dead.is_empty() {
            sqlx::query(&format!(
                "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = v.error, \
                 state = {DEAD}, dead_at = {now} \
                 FROM unnest($1::text[]::tid[], $2::text[]) AS v(row_id, error) \
                 WHERE o.ctid = v.row_id"
            ))
            .bind(dead)
            .bind(errors)
            .execute(&mut *tx)
            .await
            .doing(DOING)?;
        }
        // Released messages need nothing: the commit unlocks them as they were.
        inner.held.commit(tx).await.doing(DOING)?;
        Ok(sql::settled(settlement, applied))
    }
}

/// Claims by lease ([`ClaimMode::Lease`], schema version 3).
impl PostgresStore {
    crate::shared::claim_by_statement!(claim_leased);

    /// Applies a settlement in a transaction of its own, to the rows still leased under
    /// `token`.
    async fn settle_leased(
        &self,
        token: LeaseToken,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        let applied = self
            .settle_where(settlement, Fence::Lease(token), &[], &[])
            .await?;
        Ok(sql::settled(settlement, applied))
    }

    /// Applies a settlement in one transaction to the rows `fence` selects, and inserts the
    /// rows of the `unrecorded` messages that were not published; returns how many rows it
    /// changed.
    async fn settle_where(
        &self,
        settlement: &Settlement,
        fence: Fence,
        unrecorded: &[outbox_core::Message],
        order: &[MessageId],
    ) -> Result<u64, StoreError> {
        const DOING: &str = "recording publish outcomes";
        let Inner {
            pool,
            names,
            config,
            ..
        } = &*self.inner;
        let t = &names.table;
        // $2 is bound in every statement: the token, or NULL for the log relay's rows.
        let (fenced, token, available, handed, done) = match fence {
            Fence::Lease(token) => (
                format!("o.state = {PENDING} AND o.lease_token = $2 AND o.lease_until > now()"),
                Some(*token.as_uuid()),
                "now() + v.delay * interval '1 microsecond'",
                "lease_token = NULL, lease_until = NULL",
                ", lease_token = NULL, lease_until = NULL",
            ),
            // Never leased, never handed over: enqueue writes available_at = created_at, and
            // handing over moves it past created_at (schema version 6).
            Fence::LogRelayed => (
                format!(
                    "o.state = {PENDING} AND o.lease_token IS NOT DISTINCT FROM $2 \
                     AND o.available_at = o.created_at"
                ),
                None,
                "GREATEST(now() + v.delay * interval '1 microsecond', \
                 o.created_at + interval '1 microsecond')",
                "available_at = GREATEST(now(), o.created_at + interval '1 microsecond')",
                "",
            ),
        };
        let mut applied = 0;
        let mut handed_now: std::collections::HashSet<Uuid> = std::collections::HashSet::new();
        let mut tx = sql::begin(pool, Some(BEGIN_SETTLE), DOING).await?;
        if !settlement.published.is_empty() {
            let ids = uuids(&settlement.published);
            let text = if config.retention.is_some() {
                format!(
                    "UPDATE {t} AS o SET state = {PUBLISHED}, published_at = now(){done} \
                     WHERE o.id = ANY($1) AND {fenced}"
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
            let changed: Vec<Uuid> = sqlx::query_scalar(&format!(
                "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = v.error, \
                 available_at = {available}{done} \
                 FROM unnest($1::uuid[], $3::text[], $4::int8[]) AS v(id, error, delay) \
                 WHERE o.id = v.id AND {fenced} RETURNING o.id"
            ))
            .bind(ids)
            .bind(token)
            .bind(errors)
            .bind(delays)
            .fetch_all(&mut *tx)
            .await
            .doing(DOING)?;
            applied += changed.len() as u64;
            handed_now.extend(changed);
        }
        if !settlement.dead.is_empty() {
            let ids: Vec<Uuid> = settlement.dead.iter().map(|d| *d.id.as_uuid()).collect();
            let errors: Vec<&str> = settlement.dead.iter().map(|d| d.error.as_str()).collect();
            applied += sqlx::query(&format!(
                "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = v.error, \
                 state = {DEAD}, dead_at = now(){done} \
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
            let changed: Vec<Uuid> = sqlx::query_scalar(&format!(
                "UPDATE {t} AS o SET {handed} WHERE o.id = ANY($1) AND {fenced} RETURNING o.id"
            ))
            .bind(uuids(&settlement.release))
            .bind(token)
            .fetch_all(&mut *tx)
            .await
            .doing(DOING)?;
            applied += changed.len() as u64;
            handed_now.extend(changed);
        }
        // Rows for the messages that have none: dead letters at once; the others in the
        // order of the log, below.
        let (dead_rows, handed_rows): (Vec<&outbox_core::Message>, Vec<&outbox_core::Message>) =
            unrecorded
                .iter()
                .partition(|msg| settlement.dead.iter().any(|d| d.id == msg.id));
        applied += insert_rows(&mut tx, t, NewRows::new(settlement, dead_rows)).await?;
        // What is handed to the table gets sequence numbers in the order of the log, so that
        // the polling relay publishes a key's messages in commit order: rows the statements
        // above handed over are numbered anew, rows that had none are inserted.
        for id in order {
            if handed_now.contains(id.as_uuid()) {
                sqlx::query(&format!("UPDATE {t} SET seq = DEFAULT WHERE id = $1"))
                    .bind(*id.as_uuid())
                    .execute(&mut *tx)
                    .await
                    .doing(DOING)?;
            } else if let Some(msg) = handed_rows.iter().find(|msg| msg.id == *id) {
                applied += insert_rows(&mut tx, t, NewRows::new(settlement, [*msg])).await?;
            }
        }
        tx.commit().await.doing(DOING)?;
        Ok(applied)
    }
}

/// Inserts `rows`, leaving alone those whose id has a row already; returns how many were
/// inserted.
async fn insert_rows(tx: &mut PgConnection, t: &str, rows: NewRows<'_>) -> Result<u64, StoreError> {
    const DOING: &str = "recording publish outcomes";
    if rows.ids.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query(&format!(
        "INSERT INTO {t} (id, \"partition\", destination, \"key\", payload, headers, \
                 created_at, available_at, attempts, last_error, state, dead_at) \
                 SELECT v.id, v.part, v.destination, v.key, v.payload, v.headers, v.created_at, \
                 GREATEST(now() + v.delay * interval '1 microsecond', \
                 v.created_at + interval '1 microsecond'), v.attempts, v.error, v.state, \
                 CASE WHEN v.state = {DEAD} THEN now() END \
                 FROM unnest($1::uuid[], $2::int2[], $3::text[], $4::text[], $5::bytea[], \
                 $6::text[], $7::timestamptz[], $8::int8[], $9::int4[], $10::text[], $11::int2[]) \
                 AS v(id, part, destination, key, payload, headers, created_at, delay, attempts, \
                 error, state) \
                 ON CONFLICT (id) DO NOTHING"
    ))
    .bind(rows.ids)
    .bind(rows.partitions)
    .bind(rows.destinations)
    .bind(rows.keys)
    .bind(rows.payloads)
    .bind(rows.headers)
    .bind(rows.created)
    .bind(rows.delays)
    .bind(rows.attempts)
    .bind(rows.errors)
    .bind(rows.states)
    .execute(&mut *tx)
    .await
    .doing(DOING)?
    .rows_affected())
}

/// Which rows a set-based settle changes.
#[derive(Clone, Copy)]
enum Fence {
    /// The rows still leased under this token, with an unexpired lease.
    Lease(LeaseToken),
    /// The rows a log relay reads: pending, never leased nor handed over.
    LogRelayed,
}

/// The table's side of a log relay (change data capture, `outbox-pg-cdc`): what it holds as
/// its own, and the outcomes of messages read from the log. The store beside it, which
/// publishes what the log relay hands over, claims with [`StoreConfig::handed_only`].
impl PostgresStore {
    /// Of `keys` (every key when `None`), those with a message the table holds as its own:
    /// pending rows handed over (or written to become available later, or replayed), whose
    /// `available_at` is past their `created_at`. One query, through the index of waiting
    /// rows.
    pub async fn waiting_keys(
        &self,
        keys: Option<&[String]>,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        const DOING: &str = "reading the keys the outbox table holds";
        if keys.is_some_and(<[String]>::is_empty) {
            return Ok(std::collections::HashSet::new());
        }
        let mut text = format!(
            "SELECT DISTINCT \"key\" FROM {} WHERE state = {PENDING} \
             AND \"key\" IS NOT NULL AND available_at > created_at",
            self.inner.names.table
        );
        if keys.is_some() {
            text.push_str(" AND \"key\" = ANY($1)");
        }
        let query = sqlx::query_scalar::<_, String>(&text);
        let query = match keys {
            Some(keys) => query.bind(keys),
            None => query,
        };
        let keys = query.fetch_all(&self.inner.pool).await.doing(DOING)?;
        Ok(keys.into_iter().collect())
    }

    /// Records the outcomes of messages a log relay read, in one transaction, on the rows
    /// that are still the log relay's (pending, never leased nor handed over), so that
    /// recording them twice changes nothing more: `published` rows are deleted (or kept for
    /// the retention), `retry` rows get their attempt and are handed to the table, available
    /// after their delay, `dead` rows are dead-lettered, and `release` rows are handed to
    /// the table as they are, available at once.
    ///
    /// `unrecorded` are messages of the settlement that have no row (written with
    /// `pg_logical_emit_message`): those that were not published are inserted, with the same
    /// outcome, unless a row of their id exists already. The rows handed over (retried or
    /// released) get new sequence numbers, or are inserted, in the order of `order` (the
    /// log's): the polling relay then publishes each key's messages in commit order. Returns
    /// how many rows changed.
    pub async fn settle_log(
        &self,
        settlement: &Settlement,
        unrecorded: &[outbox_core::Message],
        order: &[MessageId],
    ) -> Result<u64, StoreError> {
        if settlement.is_empty() {
            return Ok(0);
        }
        self.settle_where(settlement, Fence::LogRelayed, unrecorded, order)
            .await
    }
}

impl outbox_core::LogTable for PostgresStore {
    async fn waiting(
        &self,
        keys: Option<&[String]>,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        self.waiting_keys(keys).await
    }

    async fn record(
        &self,
        settlement: &Settlement,
        unrecorded: &[outbox_core::Message],
        handed: &[MessageId],
    ) -> Result<(), StoreError> {
        self.settle_log(settlement, unrecorded, handed)
            .await
            .map(drop)
    }
}

/// The rows of messages that have none yet, with the outcome `settlement` gives each: what a
/// log relay hands to the table of the messages written without a row.
struct NewRows<'a> {
    ids: Vec<Uuid>,
    partitions: Vec<i16>,
    destinations: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    payloads: Vec<&'a [u8]>,
    headers: Vec<String>,
    created: Vec<DateTime<Utc>>,
    delays: Vec<i64>,
    attempts: Vec<i32>,
    errors: Vec<Option<&'a str>>,
    states: Vec<i16>,
}

impl<'a> NewRows<'a> {
    fn new(
        settlement: &'a Settlement,
        unrecorded: impl IntoIterator<Item = &'a outbox_core::Message>,
    ) -> Self {
        let mut outcome: HashMap<MessageId, (i64, bool, Option<&'a str>, i16)> = HashMap::new();
        for retry in &settlement.retry {
            outcome.insert(
                retry.id,
                (sql::micros(retry.delay), true, Some(&retry.error), PENDING),
            );
        }
        for dead in &settlement.dead {
            outcome.insert(dead.id, (0, true, Some(&dead.error), DEAD));
        }
        for id in &settlement.release {
            outcome.insert(*id, (0, false, None, PENDING));
        }
        let mut rows = Self {
            ids: Vec::new(),
            partitions: Vec::new(),
            destinations: Vec::new(),
            keys: Vec::new(),
            payloads: Vec::new(),
            headers: Vec::new(),
            created: Vec::new(),
            delays: Vec::new(),
            attempts: Vec::new(),
            errors: Vec::new(),
            states: Vec::new(),
        };
        for msg in unrecorded {
            let Some((delay, attempt, error, state)) = outcome.get(&msg.id) else {
                continue;
            };
            let attempts = msg.attempts.saturating_add(u32::from(*attempt));
            rows.ids.push(*msg.id.as_uuid());
            let partition = outbox_core::partition_of(msg.key.as_deref(), &msg.id);
            rows.partitions.push(i16::try_from(partition).unwrap_or(0));
            rows.destinations.push(&msg.destination);
            rows.keys.push(msg.key.as_deref());
            rows.payloads.push(&msg.payload);
            rows.headers.push(outbox_core::encode_headers(&msg.headers));
            rows.created.push(msg.created_at);
            rows.delays.push(*delay);
            rows.attempts
                .push(i32::try_from(attempts).unwrap_or(i32::MAX));
            rows.errors.push(error.or(msg.last_error.as_deref()));
            rows.states.push(*state);
        }
        rows
    }
}

fn uuids(ids: &[MessageId]) -> Vec<Uuid> {
    ids.iter().map(|id| *id.as_uuid()).collect()
}

/// The inbox's SQL on PostgreSQL.
const INBOX: InboxSql = InboxSql {
    dialect: &PG,
    create: include_str!("../migrations/postgres/inbox.sql"),
};

crate::inbox::inbox!(PostgresInbox(Postgres, INBOX), "PostgreSQL", url: "postgres://app@127.0.0.1/app", begin: "begin()");
