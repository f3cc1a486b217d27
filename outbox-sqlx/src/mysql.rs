//! [`MySqlStore`]: the outbox on MySQL 8 and MariaDB 10.6+.
//!
//! - **Claims by lease** ([`ClaimMode::Lease`], the default here): one `READ COMMITTED`
//!   transaction locks the relay's partition rows (`FOR UPDATE`), selects the next rows with
//!   `ORDER BY seq LIMIT n FOR UPDATE SKIP LOCKED`, leases them with `UPDATE ... WHERE seq IN
//!   (...)` and commits; the settle is a second transaction of set-based statements
//!   (`IN (...)`, `CASE id WHEN ...`), fenced by the token.
//! - **Claims held in a transaction** ([`ClaimMode::Transaction`]): a `READ COMMITTED`
//!   transaction finds its candidates in a consistent read, locks them by primary key
//!   (`SKIP LOCKED`) and stays open, under the claim's token, while the batch is published;
//!   the settle writes the outcomes row by row in it and commits. A relay that dies has its
//!   transaction rolled back; one that stays quiet past its lease has its connection closed by
//!   the server (the session's `wait_timeout`, set to the lease for the claim and reset before
//!   the connection goes back to the pool: MySQL 8 has no idle-transaction timeout). Not the
//!   default: on MariaDB 10.11 it drained at about 0.8 times the leased claims' rate (see
//!   docs/benchmarks.md), its row-by-row settle being the only deadlock-free one found.
//! - Never the single-statement `UPDATE ... WHERE seq IN (SELECT * FROM (SELECT ... SKIP
//!   LOCKED) x)`: MariaDB accepts it but does not skip locked rows there, and hands the same
//!   rows to two relays. `READ COMMITTED` also spares enqueues the gap locks a locking range
//!   scan takes under `REPEATABLE READ`.
//! - The per-key subquery of the claim is a consistent read even inside the locking `SELECT`
//!   (checked on MariaDB 10.11; documented for MySQL 8): a row another transaction holds
//!   still blocks the later messages of its key, and a consistent read after the lock drops
//!   the candidates behind a row it skipped.
//! - Times are `DATETIME(6)` in UTC from `UTC_TIMESTAMP(6)`, whatever the session time zone.
//! - No notifications: the relay polls (adaptively) and is woken in-process.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, Utc};
use outbox_core::{
    Claim, LeaseToken, MessageId, RelayId, Settled, Settlement, Store, StoreError, StoreErrorKind,
};
use sqlx::Connection as _;
use sqlx::mysql::{MySql, MySqlArguments, MySqlConnection, MySqlRow};
use sqlx::query::QueryAs;
use uuid::Uuid;

use crate::config::{ClaimMode, Quoting};
use crate::error::Context as _;
use crate::held::{HeldClaim, HeldRows};
use crate::inbox::InboxSql;
use crate::migrations::Schema;
use crate::shared::Base;
use crate::sql::{
    self, Arg, DEAD, Decoding, Dialect, HeldIndex, Limited, Owned, PENDING, PUBLISHED, RowParts,
    Sql, column,
};

/// The outbox schema; its last migration's version is [`MySqlStore::SCHEMA_VERSION`].
const SCHEMA: Schema = Schema {
    migrations: &[
        (1, include_str!("../migrations/mysql/0001_outbox.sql")),
        (2, include_str!("../migrations/mysql/0002_any_writer.sql")),
    ],
    dialect: &MY,
    versions_table: "CREATE TABLE IF NOT EXISTS {schema} (version INT NOT NULL PRIMARY KEY, \
                     applied_at DATETIME(6) NOT NULL) ENGINE = InnoDB",
    epoch: "'1970-01-01 00:00:00'",
    bigint: "SIGNED",
    exists: |names| {
        let mut sql = Sql::new(&MY);
        sql.push("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = COALESCE(")
            .bind(Arg::OptText(names.qualifier.clone()))
            .push(", DATABASE()) AND table_name = ")
            .bind(Arg::Text(format!("{}_schema", names.base)));
        sql
    },
    drop: "DROP TABLE IF EXISTS {table}, {partitions}, {relays}, {schema}",
    without_notify: "",
};

fn now_plus(sql: &mut Sql, micros: i64) {
    sql.push("DATE_ADD(UTC_TIMESTAMP(6), INTERVAL ")
        .bind(Arg::Int(micros))
        .push(" MICROSECOND)");
}

/// The per-key check of claims.
const HELD: HeldIndex = HeldIndex {
    held: "e.held = 1",
    force_index: true,
};

const MY: Dialect = Dialect {
    numbered: false,
    quoting: Quoting {
        quote: '`',
        qualified: true,
        qualified_triggers: true,
    },
    now: "UTC_TIMESTAMP(6)",
    now_plus,
    limited: Limited::Direct,
    // Unused: MySQL limits a DELETE itself.
    row_id: "",
    insert_ignore: ("INSERT IGNORE INTO", ""),
    upsert_relay: "ON DUPLICATE KEY UPDATE expires_at = VALUES(expires_at)",
    locks_rows: true,
    begin_write: None,
    heartbeat_in_transaction: false,
    end_held: Some(END_HELD),
};

/// Columns as MySQL stores them: ids as `BINARY(16)`, times as UTC `DATETIME(6)`, text in
/// binary-collated columns.
const DECODING: Decoding<MySqlRow> = Decoding::new(
    |row| sql::id_from_bytes(&column::<_, Vec<u8>>(row, "id")?),
    text,
    opt_text,
    |row, name| column::<_, NaiveDateTime>(row, name).map(|time| time.and_utc()),
    |row, name| column::<_, Option<NaiveDateTime>>(row, name).map(|t| t.map(|t| t.and_utc())),
);

type Arguments<'q> = MySqlArguments;

crate::shared::binding!(
    MySql,
    |uuid: Uuid| uuid.as_bytes().to_vec(),
    |time: DateTime<Utc>| time.naive_utc()
);

/// Undoes the `wait_timeout` of a held claim before its connection goes back to the pool.
const END_HELD: &str = "SET SESSION wait_timeout = DEFAULT";

/// The longest `wait_timeout` MySQL takes (a year, in seconds).
const MAX_WAIT_TIMEOUT: u64 = 31_536_000;

/// At most this many keys and rows of claims in flight are passed over by name in a claim.
const MAX_PASSED_OVER: usize = 4096;

/// Starts the claim transaction. One text-protocol round trip, so the isolation level can
/// never be left behind for the next transaction on this pooled connection.
const BEGIN_READ_COMMITTED: &str =
    "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

type Inner = Base<MySql>;

crate::shared::store! {
    /// The transactional outbox on MySQL 8.0.1+ or MariaDB 10.6+ (InnoDB).
    ///
    /// Cheap to clone: clones share the pool.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// use outbox_core::NewMessage;
    /// use outbox_sqlx::{MySqlStore, StoreConfig};
    ///
    /// let pool = outbox_sqlx::sqlx::MySqlPool::connect("mysql://app@127.0.0.1/app").await?;
    /// let store = MySqlStore::new(pool.clone(), StoreConfig::new().table("outbox"))?;
    /// store.migrate().await?;
    ///
    /// let mut tx = pool.begin().await?;
    /// // ... the service's own writes in `tx` ...
    /// store.enqueue(&mut tx, NewMessage::new("orders", "created").key("order-7")).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    MySqlStore(MySql, MY),
    /// A store on `pool` with `config`; fails with [`StoreErrorKind::Config`] when the table
    /// name is not a plain identifier (`database.table` is accepted).
    ///
    /// [`StoreErrorKind::Config`]: outbox_core::StoreErrorKind::Config
    new(crate::config::refuse_handed_only),
    /// Opens a pool of [`StoreConfig::max_connections`](crate::StoreConfig::max_connections)
    /// to [`StoreConfig::url`](crate::StoreConfig::url) and builds the store on it.
    connect("MySQL", |options| options),
}

impl MySqlStore {
    /// Creates or upgrades the outbox tables to [`Self::SCHEMA_VERSION`]. MySQL commits DDL
    /// statement by statement, so every statement is idempotent, and a named lock
    /// (`GET_LOCK`) keeps relays starting together from migrating at the same time.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        const DOING: &str = "migrating the outbox schema";
        // A connection of its own, closed at the end: the named lock dies with it even if
        // this future is dropped half-way.
        let mut conn = self.inner.pool.acquire().await.doing(DOING)?.detach();
        let lock = lock_name(&self.inner.config.table);
        let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 60)")
            .bind(&lock)
            .fetch_one(&mut conn)
            .await
            .doing(DOING)?;
        let result = if locked == Some(1) {
            self.apply_schema(&mut conn).await
        } else {
            Err(StoreError::new(
                StoreErrorKind::Database,
                "migrating the outbox schema: another migration held the lock for 60 s",
            )
            .transient())
        };
        let _ = conn.close().await;
        result
    }
}

/// `GET_LOCK` names are at most 64 characters.
fn lock_name(table: &str) -> String {
    format!("outbox-migrate:{table}").chars().take(64).collect()
}

impl MySqlStore {
    /// Drops the candidates that have an earlier pending message of their key outside the
    /// candidates.
    ///
    /// The locking scan of a claim locks every row it reads for a moment, also rows of other
    /// relays' partitions that it then lets go (InnoDB locks before the partition condition is
    /// evaluated). `SKIP LOCKED` in a concurrent claim skips such a row, and the per-key
    /// condition, which reads the row as available, would then let a later message of its key
    /// through first. A consistent read after the scan finds those skipped rows.
    async fn keep_key_order(
        &self,
        conn: &mut MySqlConnection,
        parts: &mut Vec<RowParts>,
    ) -> Result<(), StoreError> {
        let mut keys: Vec<String> = parts
            .iter()
            .filter_map(|part| part.key.as_ref().ok().cloned().flatten())
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        keys.sort_unstable();
        keys.dedup();
        let seqs: Vec<i64> = parts.iter().map(|part| part.seq).collect();
        let last = seqs.iter().copied().max().unwrap_or(i64::MAX);
        let mut earliest: HashMap<String, i64> = HashMap::new();
        for keys in keys.chunks(sql::SETTLE_IDS) {
            let mut select = Sql::new(&MY);
            select
                .push(&format!(
                    "SELECT `key`, MIN(seq) FROM {} WHERE state = {PENDING} AND `key` IN ",
                    self.inner.names.table
                ))
                .bind_list(sql::padded(keys).map(Arg::Text))
                .push(" AND seq < ")
                .bind(Arg::Int(last))
                .push(" AND seq NOT IN ")
                .bind_list(sql::padded(&seqs).map(Arg::Int))
                .push(" GROUP BY `key`");
            let rows: Vec<(Text, i64)> = bound_as(&select.text, select.args)?
                .fetch_all(&mut *conn)
                .await
                .doing("claiming outbox messages")?;
            earliest.extend(rows.into_iter().map(|(key, seq)| (key.0, seq)));
        }
        if !earliest.is_empty() {
            parts.retain(|part| {
                let key = part.key.as_ref().ok().and_then(Option::as_ref);
                key.and_then(|key| earliest.get(key))
                    .is_none_or(|first| part.seq < *first)
            });
        }
        Ok(())
    }
}

crate::shared::accessors!(MySqlStore, MySql, SCHEMA);
crate::enqueue::enqueue_methods!(MySqlStore, MySql, MySqlConnection, MY);

/// [`bound`] for `query_scalar`.
fn bound_scalar<O>(
    text: &str,
    args: Vec<Arg>,
) -> Result<sqlx::query::QueryScalar<'_, MySql, O, MySqlArguments>, StoreError>
where
    (O,): for<'r> sqlx::FromRow<'r, MySqlRow>,
{
    Ok(sqlx::query_scalar_with(text, arguments(args)?))
}

/// [`bound`] for `query_as`.
fn bound_as<O>(
    text: &str,
    args: Vec<Arg>,
) -> Result<QueryAs<'_, MySql, O, MySqlArguments>, StoreError>
where
    O: for<'r> sqlx::FromRow<'r, MySqlRow>,
{
    Ok(sqlx::query_as_with(text, arguments(args)?))
}

/// Text read from a `utf8mb4_bin` column. MySQL flags such columns as binary and sqlx then
/// refuses to decode them as `String`, so they are read as bytes and checked for UTF-8 here.
/// (The binary collation is kept: keys and destinations must compare byte for byte.)
struct Text(String);

impl sqlx::Type<MySql> for Text {
    fn type_info() -> sqlx::mysql::MySqlTypeInfo {
        <Vec<u8> as sqlx::Type<MySql>>::type_info()
    }

    fn compatible(ty: &sqlx::mysql::MySqlTypeInfo) -> bool {
        <Vec<u8> as sqlx::Type<MySql>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, MySql> for Text {
    fn decode(value: sqlx::mysql::MySqlValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let bytes = <&[u8] as sqlx::Decode<'r, MySql>>::decode(value)?;
        Ok(Self(std::str::from_utf8(bytes)?.to_owned()))
    }
}

fn text(row: &MySqlRow, name: &str) -> Result<String, String> {
    column::<_, Text>(row, name).map(|text| text.0)
}

fn opt_text(row: &MySqlRow, name: &str) -> Result<Option<String>, String> {
    column::<_, Option<Text>>(row, name).map(|text| text.map(|text| text.0))
}

crate::detached::detached_store!(MySqlStore);

impl Store for crate::detached::Direct<MySqlStore> {
    crate::shared::operations!(MY);

    async fn claim(
        &self,
        relay: &RelayId,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        match self.inner.config.claim_mode.unwrap_or(ClaimMode::Lease) {
            ClaimMode::Lease => self.claim_leased(relay, limit, lease).await,
            _ => self.claim_held(relay, limit, lease).await,
        }
    }

    async fn settle(
        &self,
        token: LeaseToken,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        match self.inner.config.claim_mode.unwrap_or(ClaimMode::Lease) {
            ClaimMode::Lease => self.settle_leased(token, settlement).await,
            _ => self.settle_held(token, settlement).await,
        }
    }
}

impl crate::detached::Direct<MySqlStore> {
    /// The partitions `relay` owns under an unexpired lease, in order, read with `lock` (`""`
    /// or `" FOR UPDATE"`).
    async fn owned(
        &self,
        conn: &mut MySqlConnection,
        relay: &RelayId,
        lock: &str,
    ) -> Result<Vec<i16>, StoreError> {
        sqlx::query_scalar(&format!(
            "SELECT `partition` FROM {} WHERE owner = ? AND expires_at > UTC_TIMESTAMP(6) \
             ORDER BY `partition`{lock}",
            self.inner.names.partitions
        ))
        .bind(relay.as_str())
        .fetch_all(conn)
        .await
        .doing("claiming outbox messages")
    }
}

/// Claims held in a transaction ([`ClaimMode::Transaction`]).
impl crate::detached::Direct<MySqlStore> {
    /// Begins a `READ COMMITTED` transaction, locks the next claimable rows and keeps the
    /// transaction open under the claim's token until [`Self::settle_held`].
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
        let until = Instant::now() + lease;
        let mut tx = sql::begin(&inner.pool, Some(BEGIN_READ_COMMITTED), DOING).await?;
        // The partitions are read, not locked: a relay taking one over meanwhile skips the
        // rows this claim holds, and drops the later messages of their keys. Read first, so
        // that a relay owning none (yet) does not scan the backlog to find so.
        let owned = self.owned(&mut tx, relay, "").await?;
        if owned.is_empty() {
            tx.commit().await.doing(DOING)?;
            return Ok(sql::assemble_claim(token, Vec::new()));
        }
        let candidates = self.candidates(&owned, limit);
        let candidates: Vec<i64> = bound_scalar(&candidates.text, candidates.args)?
            .fetch_all(&mut *tx)
            .await
            .doing(DOING)?;
        if candidates.is_empty() {
            tx.commit().await.doing(DOING)?;
            return Ok(sql::assemble_claim(token, Vec::new()));
        }
        // The candidates are locked by primary key, skipping those another claim took
        // meanwhile; the locking read sees their latest version, checked again. Through the
        // primary key only: a scan of a secondary index (the optimizer's pick for `state = 0`
        // beside a long list) would keep the locks of every pending row it read.
        let columns = sql::qualified_columns(&inner.columns, "o");
        let mut lock = Sql::new(&MY);
        lock.push(&format!(
            "SELECT {columns} FROM {} o FORCE INDEX (PRIMARY) WHERE o.seq IN ",
            inner.names.table
        ))
        .bind_list(sql::padded(&candidates).map(Arg::Int))
        .push(&format!(
            " AND o.state = {PENDING} AND o.available_at <= UTC_TIMESTAMP(6) \
             AND (o.lease_until IS NULL OR o.lease_until <= UTC_TIMESTAMP(6)) \
             ORDER BY o.seq FOR UPDATE SKIP LOCKED"
        ));
        let rows = bound(&lock.text, lock.args)?
            .fetch_all(&mut *tx)
            .await
            .doing(DOING)?;
        let (mut parts, unreadable) = DECODING.claimed(&rows);
        // Candidates behind a row that another transaction took first are dropped; they stay
        // locked by this claim until it ends, and the commit hands them back as they were.
        self.keep_key_order(&mut tx, &mut parts).await?;
        for (seq, error) in &unreadable {
            tracing::error!(seq, %error, "dead-lettering an outbox row whose id cannot be read");
            let statement = sql::bury(&MY, &inner.names, *seq, error);
            bound(&statement.text, statement.args)?
                .execute(&mut *tx)
                .await
                .doing(DOING)?;
        }
        if parts.is_empty() {
            tx.commit().await.doing(DOING)?;
            return Ok(sql::assemble_claim(token, parts));
        }
        // The server closes the connection of a claim whose relay stays quiet past its lease,
        // which rolls the claim back.
        let timeout = lease
            .as_secs_f64()
            .ceil()
            .clamp(1.0, MAX_WAIT_TIMEOUT as f64) as u64;
        sqlx::query(&format!("SET SESSION wait_timeout = {timeout}"))
            .execute(&mut *tx)
            .await
            .doing(DOING)?;
        let rows = HeldRows::new(parts.iter().map(|part| (part, None)));
        inner.held.insert(token, HeldClaim { until, tx, rows });
        Ok(sql::assemble_claim(token, parts))
    }

    /// Applies a settlement in the transaction of its claim, and commits. Outcomes of
    /// messages the claim does not hold, of a claim not held (any more), or of a claim past
    /// its lease are fenced.
    async fn settle_held(
        &self,
        token: LeaseToken,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        const DOING: &str = "recording publish outcomes";
        let inner = &*self.inner;
        if settlement.is_empty() {
            return Ok(Settled::default());
        }
        let Some(claim) = inner.held.take_live(&token).await else {
            return Ok(sql::settled(settlement, 0));
        };
        let applied = claim.rows.holds(settlement);
        let HeldClaim { mut tx, rows, .. } = claim;
        if let Err(err) = self.apply_held(&mut tx, &rows, settlement).await {
            inner.held.roll_back(tx).await;
            return Err(err);
        }
        inner.held.commit(tx).await.doing(DOING)?;
        Ok(sql::settled(settlement, applied))
    }

    /// Writes a settlement's outcomes to the rows `rows` holds, in their claim's transaction,
    /// in the order the in-memory store applies them (a message listed twice is applied
    /// once).
    ///
    /// One statement per row, each by primary key (a constant lookup, which reads no other
    /// row): MySQL reads an `IN (...)` list with a scan of the table when the table is small,
    /// and the scan waits for the rows other claims hold, which may be waiting for this one's
    /// rows: a deadlock, seen with claims of a few rows each. The published rows, the many, go
    /// in one round trip of the text protocol; failures, the few, one by one.
    async fn apply_held(
        &self,
        conn: &mut MySqlConnection,
        rows: &HeldRows,
        settlement: &Settlement,
    ) -> Result<(), StoreError> {
        const DOING: &str = "recording publish outcomes";
        let t = &self.inner.names.table;
        let mut done = HashSet::new();
        let mut fresh = |id: &MessageId| rows.seq(id).filter(|seq| done.insert(*seq));
        let mut script = String::new();
        for seq in settlement.published.iter().filter_map(&mut fresh) {
            if self.inner.config.retention.is_some() {
                script.push_str(&format!(
                    "UPDATE {t} SET state = {PUBLISHED}, published_at = UTC_TIMESTAMP(6), \
                     lease_token = NULL, lease_until = NULL WHERE seq = {seq};"
                ));
            } else {
                script.push_str(&format!("DELETE FROM {t} WHERE seq = {seq};"));
            }
        }
        if !script.is_empty() {
            sql::run_script(&mut *conn, &script).await.doing(DOING)?;
        }
        for retry in &settlement.retry {
            let Some(seq) = fresh(&retry.id) else {
                continue;
            };
            sqlx::query(&format!(
                "UPDATE {t} SET attempts = attempts + 1, last_error = ?, \
                 available_at = DATE_ADD(UTC_TIMESTAMP(6), INTERVAL ? MICROSECOND), \
                 lease_token = NULL, lease_until = NULL WHERE seq = ?"
            ))
            .bind(&retry.error)
            .bind(sql::micros(retry.delay))
            .bind(seq)
            .execute(&mut *conn)
            .await
            .doing(DOING)?;
        }
        for dead in &settlement.dead {
            let Some(seq) = fresh(&dead.id) else {
                continue;
            };
            sqlx::query(&format!(
                "UPDATE {t} SET attempts = attempts + 1, last_error = ?, state = {DEAD}, \
                 dead_at = UTC_TIMESTAMP(6), lease_token = NULL, lease_until = NULL \
                 WHERE seq = ?"
            ))
            .bind(&dead.error)
            .bind(seq)
            .execute(&mut *conn)
            .await
            .doing(DOING)?;
        }
        // Released messages need nothing: the commit unlocks them as they were.
        Ok(())
    }

    /// The first `limit` claimable rows of the `owned` partitions, by sequence number, in a
    /// consistent read: it locks nothing. (A locking scan of a secondary index keeps the
    /// locks of the rows it reads and does not take, whether `SKIP LOCKED` skipped them or
    /// a condition left them out, until the transaction ends: held for a whole publish,
    /// they would keep other claims from rows this one does not want.)
    ///
    /// What this store's claims hold is passed over, with the later messages of their keys,
    /// up to a bound on the statement's size; past it, the check after the lock keeps the
    /// order, and holds the rows it drops until this claim ends.
    fn candidates(&self, owned: &[i16], limit: usize) -> Sql {
        let inner = &*self.inner;
        let mut select = Sql::new(&MY);
        // Through the index of pending rows, in order: the optimizer sometimes picks a scan of
        // the primary key, which reads every dead and retained row before the pending ones.
        select.push(&format!(
            "SELECT o.seq FROM {} o FORCE INDEX ({}) WHERE ",
            inner.names.table,
            inner.names.index("pend")
        ));
        sql::push_claimable(&mut select, &MY, &inner.names, &HELD, Owned::Listed(owned));
        let (keys, seqs) = inner.held.in_flight();
        if keys.len() + seqs.len() <= MAX_PASSED_OVER {
            if !keys.is_empty() {
                select
                    .push(" AND (o.`key` IS NULL OR o.`key` NOT IN ")
                    .bind_list(sql::padded(&keys).map(Arg::Text))
                    .push(")");
            }
            if !seqs.is_empty() {
                select
                    .push(" AND (o.`key` IS NOT NULL OR o.seq NOT IN ")
                    .bind_list(sql::padded(&seqs).map(Arg::Int))
                    .push(")");
            }
        }
        select
            .push(" ORDER BY o.seq LIMIT ")
            .bind(Arg::Int(i64::try_from(limit).unwrap_or(i64::MAX)));
        select
    }
}

/// Claims by lease ([`ClaimMode::Lease`]).
impl crate::detached::Direct<MySqlStore> {
    async fn claim_leased(
        &self,
        relay: &RelayId,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        const DOING: &str = "claiming outbox messages";
        let Inner { pool, names, .. } = &*self.inner;
        let token = LeaseToken::new();
        let mut tx = sql::begin(pool, Some(BEGIN_READ_COMMITTED), DOING).await?;
        // Claims of one relay run one at a time, and a relay taking one of these partitions
        // over waits until this claim committed.
        let owned = self.owned(&mut tx, relay, " FOR UPDATE").await?;
        if owned.is_empty() || limit == 0 {
            tx.rollback().await.doing(DOING)?;
            return Ok(sql::assemble_claim(token, Vec::new()));
        }
        let mut select = Sql::new(&MY);
        select.push(&format!(
            "SELECT {} FROM {} o WHERE ",
            sql::qualified_columns(&self.inner.columns, "o"),
            names.table
        ));
        sql::push_claimable(&mut select, &MY, names, &HELD, Owned::Listed(&owned));
        select
            .push(" ORDER BY o.seq LIMIT ")
            .bind(Arg::Int(i64::try_from(limit).unwrap_or(i64::MAX)))
            .push(" FOR UPDATE SKIP LOCKED");
        let rows = bound(&select.text, select.args)?
            .fetch_all(&mut *tx)
            .await
            .doing(DOING)?;
        let (mut parts, unreadable) = DECODING.claimed(&rows);
        self.keep_key_order(&mut tx, &mut parts).await?;
        if parts.is_empty() {
            tx.rollback().await.doing(DOING)?;
            return self.assemble(token, (parts, unreadable)).await;
        }
        let seqs: Vec<i64> = parts.iter().map(|p| p.seq).collect();
        for seqs in seqs.chunks(sql::SETTLE_IDS) {
            let mut lease_rows = Sql::new(&MY);
            lease_rows
                .push(&format!("UPDATE {} SET lease_token = ", names.table))
                .bind(Arg::Token(token))
                .push(", lease_until = ");
            now_plus(&mut lease_rows, sql::micros(lease));
            lease_rows
                .push(" WHERE seq IN ")
                .bind_list(sql::padded(seqs).map(Arg::Int));
            bound(&lease_rows.text, lease_rows.args)?
                .execute(&mut *tx)
                .await
                .doing(DOING)?;
        }
        tx.commit().await.doing(DOING)?;
        self.assemble(token, (parts, unreadable)).await
    }

    crate::shared::settle_by_statements!(settle_leased, MY);
}

/// The inbox's SQL on MySQL or MariaDB.
const INBOX: InboxSql = InboxSql {
    dialect: &MY,
    create: include_str!("../migrations/mysql/inbox.sql"),
};

crate::inbox::inbox!(MySqlInbox(MySql, INBOX), "MySQL or MariaDB", url: "mysql://app@127.0.0.1/app", begin: "begin()");
