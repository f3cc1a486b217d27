//! What the three dialects share: a statement builder with dialect-neutral arguments, the
//! statements whose text differs only in placeholders, quoting and clock expressions, and the
//! decoding of rows into messages.
//!
//! Each dialect binds [`Arg`]s to its own column types (a UUID is `uuid` on PostgreSQL,
//! `BINARY(16)` on MySQL and a `BLOB` on SQLite; a time is `timestamptz`, `DATETIME(6)` in UTC
//! or microseconds since the epoch).

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

use outbox_core::{
    Claim, DeadLetter, DeadLetterFilter, LeaseToken, Limits, Malformed, Message, MessageId,
    NewMessage, PARTITIONS, RelayId, RelayMember, Retry, Settled, Settlement, Stats, StoreError,
    decode_headers, encode_headers,
};

use crate::config::Names;

/// Row states. Stored as small integers; partial indexes and filters name them.
pub(crate) const PENDING: i16 = 0;
pub(crate) const DEAD: i16 = 1;
pub(crate) const PUBLISHED: i16 = 2;

/// Rows per INSERT statement. With six parameters per row this stays far below every
/// dialect's bind-parameter limit (PostgreSQL and MySQL 65,535, SQLite 32,766).
pub(crate) const INSERT_ROWS: usize = 1000;

/// Bytes of payload and headers per INSERT statement, to stay below MySQL's default
/// `max_allowed_packet` (16 MiB on MariaDB, 64 MiB on MySQL 8) with large messages.
pub(crate) const INSERT_BYTES: usize = 8 << 20;

/// Ids per UPDATE or DELETE statement of a settle.
pub(crate) const SETTLE_IDS: usize = 512;

/// Longest delay or lease written, so that `now + delay` never overflows a column type.
const MAX_MICROS: i64 = 100 * 365 * 24 * 3600 * 1_000_000;

/// A duration as microseconds, capped at a century.
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).map_or(MAX_MICROS, |m| m.min(MAX_MICROS))
}

/// A value to bind, in dialect-neutral form.
#[derive(Clone, Debug)]
pub(crate) enum Arg {
    /// A message id.
    Id(MessageId),
    /// A fencing token (stored like ids).
    Token(LeaseToken),
    /// A partition number.
    Small(i16),
    /// An integer (microseconds, limits).
    Int(i64),
    /// Text.
    Text(String),
    /// Nullable text.
    OptText(Option<String>),
    /// Bytes.
    Bytes(Vec<u8>),
    /// An instant.
    Time(DateTime<Utc>),
}

/// Placeholders, identifier quoting and clock of one dialect.
#[derive(Debug)]
pub(crate) struct Dialect {
    /// `$1, $2, ...` (PostgreSQL) rather than `?`.
    pub(crate) numbered: bool,
    /// Identifier quote.
    pub(crate) quote: char,
    /// The database clock, now.
    pub(crate) now: &'static str,
    /// Writes "now plus the bound number of microseconds".
    pub(crate) now_plus: fn(&mut Sql, i64),
    /// How an `UPDATE` or `DELETE` takes the first rows in some order.
    pub(crate) limited: Limited,
}

/// How an `UPDATE` or `DELETE` takes at most `n` rows in some order.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Limited {
    /// `ORDER BY ... LIMIT n` on the statement itself (MySQL, which takes no `LIMIT` in an `IN`
    /// subquery).
    Direct,
    /// `WHERE seq IN (SELECT seq ... ORDER BY ... LIMIT n)`, the subquery locking its rows
    /// (`FOR UPDATE`, or `FOR UPDATE SKIP LOCKED` where skipping is safe) when `locks`
    /// (PostgreSQL; SQLite's one writer needs no row locks).
    Subquery {
        /// The subquery locks the rows it selects.
        locks: bool,
    },
}

/// The per-key check of a MySQL or SQLite claim: no earlier pending message of the key is held
/// (leased or retried), looked up in an index of the held rows only. (PostgreSQL claims check
/// the key's first pending message instead, in the claim function of its schema version 3: no
/// index there mentions the lease columns, so that a lease update writes heap-only tuples.)
#[derive(Debug)]
pub(crate) struct HeldIndex {
    /// The condition that pending row `e` is held, as the index predicate needs it written.
    pub(crate) held: &'static str,
    /// Name the index in the statement (MySQL's optimizer prefers the plain key index, which
    /// walks the key's whole backlog: hundreds of times slower).
    pub(crate) force_index: bool,
}

impl Dialect {
    /// `name` quoted, for the column names some dialects reserve (`key`, `partition`).
    pub(crate) fn col(&self, name: &str) -> String {
        format!("{q}{name}{q}", q = self.quote)
    }
}

/// A statement under construction and its arguments.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) text: String,
    pub(crate) args: Vec<Arg>,
    numbered: bool,
}

impl Sql {
    pub(crate) fn new(dialect: &Dialect) -> Self {
        Self {
            text: String::with_capacity(256),
            args: Vec::new(),
            numbered: dialect.numbered,
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    pub(crate) fn bind(&mut self, arg: Arg) -> &mut Self {
        self.args.push(arg);
        if self.numbered {
            // Writing to a String cannot fail.
            let _ = write!(self.text, "${}", self.args.len());
        } else {
            self.text.push('?');
        }
        self
    }

    /// `(a, b, c)`.
    pub(crate) fn bind_list(&mut self, args: impl IntoIterator<Item = Arg>) -> &mut Self {
        self.text.push('(');
        for (i, arg) in args.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.bind(arg);
        }
        self.text.push(')');
        self
    }
}

/// The next power of two at least `n`: lists in statements are padded to such lengths (by
/// repeating their last element, which changes nothing in an `IN` list or a `CASE`) so that a
/// connection caches a handful of prepared statements instead of one per list length.
pub(crate) fn bucket(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// `items` padded to [`bucket`] length by repeating the last one.
pub(crate) fn padded<T: Clone>(items: &[T]) -> impl Iterator<Item = T> + '_ {
    let extra = bucket(items.len()) - items.len();
    items
        .iter()
        .cloned()
        .chain(items.last().into_iter().cycle().take(extra).cloned())
}

/// Begins a transaction on `pool` (with `statement`, or a plain `BEGIN`), in a task of its
/// own.
///
/// The relay drops in-flight store calls when it stops. Once a transaction exists, dropping
/// it rolls it back; but sqlx's MySQL `begin` (and its SQLite `begin_with`) has a window
/// after the database began the transaction and before the `Transaction` exists: cancelled
/// there, the connection would go back to the pool inside a transaction that nobody ends,
/// and its next user would run in it, holding its locks. Begun in a task of its own, the
/// transaction always comes into existence, and is rolled back if nobody waits for it any
/// more.
pub(crate) async fn begin<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    statement: Option<&'static str>,
    doing: &str,
) -> Result<sqlx::Transaction<'static, DB>, StoreError> {
    let pool = pool.clone();
    let begun = tokio::spawn(async move {
        match statement {
            Some(statement) => pool.begin_with(statement).await,
            None => pool.begin().await,
        }
    })
    .await;
    match begun {
        Ok(begun) => begun.map_err(|err| crate::error::from_sqlx(err, doing)),
        Err(err) => Err(StoreError::new(
            outbox_core::StoreErrorKind::Database,
            format!("{doing}: the task beginning the transaction failed"),
        )
        .with_source(err)),
    }
}

/// What a statement run by an `E` returns.
type QueryResult<'e, E> = <<E as sqlx::Executor<'e>>::Database as sqlx::Database>::QueryResult;

/// Runs `script` (statements separated by `;`, no parameters) on `executor`.
///
/// Not `sqlx::raw_sql(script).execute(executor)`: that is an `async fn` generic over its
/// executor, and a future that holds it across an await on `&mut *tx` is not `Send` for every
/// lifetime ("implementation of `Executor` is not general enough"), so a caller could not run
/// `migrate` in `tokio::spawn`. `Executor::execute` returns a boxed `Send` future.
pub(crate) fn run_script<'e, E>(
    executor: E,
    script: &'e str,
) -> Pin<Box<dyn Future<Output = Result<QueryResult<'e, E>, sqlx::Error>> + Send + 'e>>
where
    E: sqlx::Executor<'e>,
{
    executor.execute(sqlx::raw_sql(script))
}

/// Checks every message against `limits` before anything is written.
pub(crate) fn validate(messages: &[NewMessage], limits: &Limits) -> Result<(), StoreError> {
    for message in messages {
        message.validate(limits)?;
    }
    Ok(())
}

/// Splits `messages` into INSERT statements of at most [`INSERT_ROWS`] rows and about
/// [`INSERT_BYTES`] bytes, keeping their order.
pub(crate) fn insert_chunks(messages: &[NewMessage]) -> Vec<&[NewMessage]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, message) in messages.iter().enumerate() {
        let size = message.payload().len()
            + message
                .headers()
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
            + 128;
        if i > start && (i - start >= INSERT_ROWS || bytes + size > INSERT_BYTES) {
            chunks.push(&messages[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < messages.len() {
        chunks.push(&messages[start..]);
    }
    chunks
}

/// One multi-row INSERT of `messages`, stamped with the database clock.
pub(crate) fn insert(d: &Dialect, names: &Names, messages: &[NewMessage]) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "INSERT INTO {} (id, {}, destination, {}, payload, headers, created_at, available_at) VALUES ",
        names.table,
        d.col("partition"),
        d.col("key"),
    ));
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        // The partition is always below PARTITIONS (64).
        let partition = i16::try_from(message.partition()).unwrap_or(i16::MAX);
        sql.push("(")
            .bind(Arg::Id(message.id()))
            .push(", ")
            .bind(Arg::Small(partition))
            .push(", ")
            .bind(Arg::Text(message.destination().to_owned()))
            .push(", ")
            .bind(Arg::OptText(message.ordering_key().map(str::to_owned)))
            .push(", ")
            .bind(Arg::Bytes(message.payload().to_vec()))
            .push(", ")
            .bind(Arg::Text(encode_headers(message.headers())))
            .push(&format!(", {now}, {now})", now = d.now));
    }
    sql
}

/// The fencing condition of a settle: the rows of `ids` still pending and leased under
/// `token` with an unexpired lease.
fn push_fenced(sql: &mut Sql, d: &Dialect, ids: &[MessageId], token: LeaseToken) {
    sql.push(" WHERE id IN ")
        .bind_list(padded(ids).map(Arg::Id))
        .push(&format!(" AND state = {PENDING} AND lease_token = "))
        .bind(Arg::Token(token))
        .push(&format!(" AND lease_until > {}", d.now));
}

/// Published messages: deleted, or kept with `published_at` when there is a retention.
pub(crate) fn settle_published(
    d: &Dialect,
    names: &Names,
    retain: bool,
    ids: &[MessageId],
    token: LeaseToken,
) -> Sql {
    let mut sql = Sql::new(d);
    if retain {
        sql.push(&format!(
            "UPDATE {} SET state = {PUBLISHED}, published_at = {}, lease_token = NULL, lease_until = NULL",
            names.table, d.now
        ));
    } else {
        sql.push(&format!("DELETE FROM {}", names.table));
    }
    push_fenced(&mut sql, d, ids, token);
    sql
}

/// Messages to retry: attempts + 1, the error kept, available after each one's delay.
pub(crate) fn settle_retry(
    d: &Dialect,
    names: &Names,
    retries: &[Retry],
    token: LeaseToken,
) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "UPDATE {} SET attempts = attempts + 1, last_error = CASE id",
        names.table
    ));
    for retry in padded(retries) {
        sql.push(" WHEN ")
            .bind(Arg::Id(retry.id))
            .push(" THEN ")
            .bind(Arg::Text(retry.error));
    }
    sql.push(" END, available_at = CASE id");
    for retry in padded(retries) {
        sql.push(" WHEN ").bind(Arg::Id(retry.id)).push(" THEN ");
        (d.now_plus)(&mut sql, micros(retry.delay));
    }
    sql.push(" END, lease_token = NULL, lease_until = NULL");
    let ids: Vec<MessageId> = retries.iter().map(|r| r.id).collect();
    push_fenced(&mut sql, d, &ids, token);
    sql
}

/// Messages to dead-letter: attempts + 1, the error kept, state dead.
pub(crate) fn settle_dead(
    d: &Dialect,
    names: &Names,
    dead: &[(MessageId, String)],
    token: LeaseToken,
) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "UPDATE {} SET attempts = attempts + 1, last_error = CASE id",
        names.table
    ));
    for (id, error) in padded(dead) {
        sql.push(" WHEN ")
            .bind(Arg::Id(id))
            .push(" THEN ")
            .bind(Arg::Text(error));
    }
    sql.push(&format!(
        " END, state = {DEAD}, dead_at = {}, lease_token = NULL, lease_until = NULL",
        d.now
    ));
    let ids: Vec<MessageId> = dead.iter().map(|(id, _)| *id).collect();
    push_fenced(&mut sql, d, &ids, token);
    sql
}

/// Messages handed back unattempted: the lease cleared, nothing else.
pub(crate) fn settle_release(
    d: &Dialect,
    names: &Names,
    ids: &[MessageId],
    token: LeaseToken,
) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "UPDATE {} SET lease_token = NULL, lease_until = NULL",
        names.table
    ));
    push_fenced(&mut sql, d, ids, token);
    sql
}

/// Every statement of a settle for the dialects without arrays, outcome by outcome in the
/// order the in-memory store applies them (a message listed twice is applied once, then
/// fenced), each over at most [`SETTLE_IDS`] ids.
pub(crate) fn settle_statements(
    d: &Dialect,
    names: &Names,
    retain: bool,
    token: LeaseToken,
    settlement: &Settlement,
) -> Vec<Sql> {
    let mut statements = Vec::new();
    for ids in settlement.published.chunks(SETTLE_IDS) {
        statements.push(settle_published(d, names, retain, ids, token));
    }
    for retries in settlement.retry.chunks(SETTLE_IDS) {
        statements.push(settle_retry(d, names, retries, token));
    }
    let dead: Vec<(MessageId, String)> = settlement
        .dead
        .iter()
        .map(|dead| (dead.id, dead.error.clone()))
        .collect();
    for dead in dead.chunks(SETTLE_IDS) {
        statements.push(settle_dead(d, names, dead, token));
    }
    for ids in settlement.release.chunks(SETTLE_IDS) {
        statements.push(settle_release(d, names, ids, token));
    }
    statements
}

/// What a settle applied, from the rows its statements changed.
pub(crate) fn settled(settlement: &Settlement, applied: u64) -> Settled {
    Settled {
        applied,
        fenced: (settlement.len() as u64).saturating_sub(applied),
    }
}

/// What every store holds: its pool, configuration and validated names.
#[derive(Debug)]
pub(crate) struct Base<DB: sqlx::Database> {
    pub(crate) pool: sqlx::Pool<DB>,
    pub(crate) config: crate::StoreConfig,
    pub(crate) names: Names,
    /// [`message_columns`] of the dialect.
    pub(crate) columns: String,
}

impl<DB: sqlx::Database> Base<DB> {
    pub(crate) fn new(
        pool: sqlx::Pool<DB>,
        config: crate::StoreConfig,
        quoting: crate::config::Quoting,
        dialect: &Dialect,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            names: Names::new(&config.table, quoting)?,
            columns: message_columns(dialect),
            pool,
            config,
        })
    }

    /// The same outbox with another retention.
    pub(crate) fn with_retention(&self, retention: Option<Duration>) -> Self {
        let mut config = self.config.clone();
        config.retention = retention;
        Self {
            pool: self.pool.clone(),
            config,
            names: self.names.clone(),
            columns: self.columns.clone(),
        }
    }
}

/// `WHERE` clause selecting the dead letters `filter` matches (its limit aside).
pub(crate) fn push_dead_filter(sql: &mut Sql, d: &Dialect, filter: &DeadLetterFilter) {
    sql.push(&format!(" WHERE state = {DEAD}"));
    if !filter.ids.is_empty() {
        sql.push(" AND id IN ")
            .bind_list(filter.ids.iter().copied().map(Arg::Id));
    }
    if let Some(destination) = &filter.destination {
        sql.push(" AND destination = ")
            .bind(Arg::Text(destination.clone()));
    }
    if let Some(key) = &filter.key {
        sql.push(&format!(" AND {} = ", d.col("key")))
            .bind(Arg::Text(key.clone()));
    }
    if let Some(before) = filter.dead_before {
        sql.push(" AND dead_at < ").bind(Arg::Time(before));
    }
}

/// `head` (an `UPDATE` or `DELETE` of the outbox table, up to its `SET`) applied to the dead
/// letters `filter` matches, oldest first, at most its limit.
fn limited_dead(d: &Dialect, names: &Names, head: &str, filter: &DeadLetterFilter) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(head);
    let conditions = |sql: &mut Sql| push_dead_filter(sql, d, filter);
    let limit = limit_of(filter);
    let rows = (names.table.as_str(), "seq");
    push_limited(
        &mut sql,
        d,
        rows,
        conditions,
        "dead_at, seq",
        limit,
        " FOR UPDATE",
    );
    sql
}

/// Pushes what limits an `UPDATE` or `DELETE` of `table` to its first `limit` rows in `order`
/// among those `conditions` (a ` WHERE ...`) select, in the dialect's way (a subquery finds
/// them by `row_id`); `lock` locks them where the dialect locks rows.
pub(crate) fn push_limited(
    sql: &mut Sql,
    d: &Dialect,
    (table, row_id): (&str, &str),
    conditions: impl FnOnce(&mut Sql),
    order: &str,
    limit: i64,
    lock: &str,
) {
    if let Limited::Subquery { .. } = d.limited {
        sql.push(&format!(" WHERE {row_id} IN (SELECT {row_id} FROM {table}"));
    }
    conditions(sql);
    sql.push(&format!(" ORDER BY {order} LIMIT "))
        .bind(Arg::Int(limit));
    if let Limited::Subquery { locks } = d.limited {
        if locks {
            sql.push(lock);
        }
        sql.push(")");
    }
}

/// Makes the dead letters `filter` matches pending again, as new (attempts 0, available now).
pub(crate) fn replay(d: &Dialect, names: &Names, filter: &DeadLetterFilter) -> Sql {
    let head = format!(
        "UPDATE {} SET state = {PENDING}, attempts = 0, available_at = {}, lease_token = NULL, \
         lease_until = NULL, dead_at = NULL",
        names.table, d.now
    );
    limited_dead(d, names, &head, filter)
}

/// Deletes the dead letters `filter` matches.
pub(crate) fn purge(d: &Dialect, names: &Names, filter: &DeadLetterFilter) -> Sql {
    limited_dead(d, names, &format!("DELETE FROM {}", names.table), filter)
}

/// Lists the dead letters `filter` matches, oldest first, with `columns` and `dead_at`.
pub(crate) fn dead_letters(
    d: &Dialect,
    names: &Names,
    columns: &str,
    filter: &DeadLetterFilter,
) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!("SELECT {columns}, dead_at FROM {}", names.table));
    push_dead_filter(&mut sql, d, filter);
    sql.push(" ORDER BY dead_at, seq LIMIT ")
        .bind(Arg::Int(limit_of(filter)));
    sql
}

/// Deletes at most `limit` published messages kept longer than `retention`, oldest first;
/// rows another cleanup holds are skipped, not waited for.
pub(crate) fn cleanup(d: &Dialect, names: &Names, retention: Duration, limit: usize) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!("DELETE FROM {}", names.table));
    let conditions = |sql: &mut Sql| {
        sql.push(&format!(" WHERE state = {PUBLISHED} AND published_at < "));
        (d.now_plus)(sql, -micros(retention));
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let lock = " FOR UPDATE SKIP LOCKED";
    let rows = (names.table.as_str(), "seq");
    push_limited(&mut sql, d, rows, conditions, "published_at", limit, lock);
    sql
}

/// `filter.limit` as a bindable number (unlimited as the largest one).
pub(crate) fn limit_of(filter: &DeadLetterFilter) -> i64 {
    filter
        .limit
        .map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

/// The rows `relay` may claim (alias `o`), in the partitions it owns under an unexpired lease:
/// pending, available, not under an unexpired lease, and not held back by an earlier pending
/// message of the same key that is leased or waiting for a retry (per-key order), checked in
/// the index of held rows (`check`): without walking a key's whole backlog. The
/// subquery over the earlier messages is a plain consistent read in every dialect, also inside
/// a locking `SELECT ... FOR UPDATE SKIP LOCKED`, so a row another transaction holds still
/// blocks its key.
pub(crate) fn push_claimable(
    sql: &mut Sql,
    d: &Dialect,
    names: &Names,
    check: &HeldIndex,
    relay: &RelayId,
) {
    let (now, partition, key) = (d.now, d.col("partition"), d.col("key"));
    let table = &names.table;
    let HeldIndex { held, force_index } = check;
    let hint = if *force_index {
        format!(" FORCE INDEX ({})", names.index("held"))
    } else {
        String::new()
    };
    let key_check = format!(
        "NOT EXISTS (SELECT 1 FROM {table} e{hint} \
         WHERE e.{key} = o.{key} AND e.state = {PENDING} AND {held} AND e.seq < o.seq \
         AND (e.available_at > {now} OR e.lease_until > {now}))"
    );
    sql.push(&format!(
        "o.state = {PENDING} AND o.{partition} IN (SELECT {partition} FROM {parts} WHERE owner = ",
        parts = names.partitions
    ))
    .bind(Arg::Text(relay.as_str().to_owned()))
    .push(&format!(
        " AND expires_at > {now}) \
         AND o.available_at <= {now} \
         AND (o.lease_until IS NULL OR o.lease_until <= {now}) \
         AND (o.{key} IS NULL OR {key_check})"
    ));
}

/// Pending and dead counts, the oldest pending message and the retained ones, each through
/// its own index, and the database's clock (ages are measured on it).
pub(crate) fn stats(names: &Names, dialect: &Dialect) -> String {
    let t = &names.table;
    format!(
        "SELECT (SELECT COUNT(*) FROM {t} WHERE state = {PENDING}), \
                (SELECT MIN(created_at) FROM {t} WHERE state = {PENDING}), \
                (SELECT COUNT(*) FROM {t} WHERE state = {DEAD}), \
                (SELECT COUNT(*) FROM {t} WHERE state = {PUBLISHED}), \
                {now}",
        now = dialect.now
    )
}

/// Counts as read from the database, as a [`Stats`] as of the database's `now`.
pub(crate) fn stats_from(
    (pending, oldest, dead, published, now): (i64, Option<DateTime<Utc>>, i64, i64, DateTime<Utc>),
) -> Stats {
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Stats::new(count(pending), oldest, count(dead), count(published)).as_of(now)
}

/// Partition numbers as stored: deduplicated, sorted (the order every statement locks them
/// in, so that two of them never wait for each other in a cycle) and within range.
pub(crate) fn partition_args(partitions: &[u16]) -> Vec<i16> {
    let mut stored: Vec<i16> = partitions
        .iter()
        .filter(|p| **p < PARTITIONS)
        .filter_map(|p| i16::try_from(*p).ok())
        .collect();
    stored.sort_unstable();
    stored.dedup();
    stored
}

/// Partitions as read back, sorted.
pub(crate) fn partitions_from(stored: Vec<i16>) -> Vec<u16> {
    let mut partitions: Vec<u16> = stored
        .into_iter()
        .filter_map(|p| u16::try_from(p).ok())
        .collect();
    partitions.sort_unstable();
    partitions
}

/// Takes or renews, for `relay` until now + `ttl`, those of `partitions` (as from
/// [`partition_args`]) that are free, expired or already its own. Every partition has a row
/// from the migration on, so this is one fenced UPDATE: no inserts racing each other.
pub(crate) fn acquire(
    d: &Dialect,
    names: &Names,
    relay: &RelayId,
    partitions: &[i16],
    ttl: Duration,
) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!("UPDATE {} SET owner = ", names.partitions))
        .bind(Arg::Text(relay.as_str().to_owned()))
        .push(", expires_at = ");
    (d.now_plus)(&mut sql, micros(ttl));
    sql.push(&format!(" WHERE {} IN ", d.col("partition")))
        .bind_list(padded(partitions).map(Arg::Small))
        .push(" AND (owner = ")
        .bind(Arg::Text(relay.as_str().to_owned()))
        .push(&format!(" OR expires_at <= {})", d.now));
    sql
}

/// The partitions among `partitions` that `relay` owns under an unexpired lease.
pub(crate) fn owned(d: &Dialect, names: &Names, relay: &RelayId, partitions: &[i16]) -> Sql {
    let partition = d.col("partition");
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "SELECT {partition} FROM {} WHERE owner = ",
        names.partitions
    ))
    .bind(Arg::Text(relay.as_str().to_owned()))
    .push(&format!(" AND expires_at > {} AND {partition} IN ", d.now))
    .bind_list(padded(partitions).map(Arg::Small));
    sql
}

/// Gives up partitions of `relay`: all of them, or those of `partitions`.
pub(crate) fn release(
    d: &Dialect,
    names: &Names,
    relay: &RelayId,
    partitions: Option<&[i16]>,
) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "UPDATE {} SET owner = '', expires_at = {} WHERE owner = ",
        names.partitions, d.now
    ))
    .bind(Arg::Text(relay.as_str().to_owned()));
    if let Some(partitions) = partitions {
        sql.push(&format!(" AND {} IN ", d.col("partition")))
            .bind_list(padded(partitions).map(Arg::Small));
    }
    sql
}

/// Registers or renews `relay` until now + `ttl` (an upsert: its spelling is the dialect's).
pub(crate) fn register(
    d: &Dialect,
    names: &Names,
    relay: &RelayId,
    ttl: Duration,
    upsert: &str,
) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "INSERT INTO {} (relay, expires_at) VALUES (",
        names.relays
    ))
    .bind(Arg::Text(relay.as_str().to_owned()))
    .push(", ");
    (d.now_plus)(&mut sql, micros(ttl));
    sql.push(") ").push(upsert);
    sql
}

/// Forgets relays whose membership expired.
pub(crate) fn forget_expired(d: &Dialect, names: &Names) -> String {
    format!("DELETE FROM {} WHERE expires_at <= {}", names.relays, d.now)
}

/// Ends the membership of `relay`.
pub(crate) fn forget(d: &Dialect, names: &Names, relay: &RelayId) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!("DELETE FROM {} WHERE relay = ", names.relays))
        .bind(Arg::Text(relay.as_str().to_owned()));
    sql
}

/// Live relays with the partitions each owns under an unexpired lease, one row per pair.
pub(crate) fn members(d: &Dialect, names: &Names) -> String {
    let partition = d.col("partition");
    format!(
        "SELECT r.relay, r.expires_at, p.{partition} FROM {relays} r \
         LEFT JOIN {parts} p ON p.owner = r.relay AND p.expires_at > {now} \
         WHERE r.expires_at > {now}",
        relays = names.relays,
        parts = names.partitions,
        now = d.now
    )
}

/// Members from the rows of [`members`], sorted by relay id, partitions sorted.
pub(crate) fn members_from(rows: Vec<(String, DateTime<Utc>, Option<i16>)>) -> Vec<RelayMember> {
    let mut by_relay: BTreeMap<String, RelayMember> = BTreeMap::new();
    for (relay, expires_at, partition) in rows {
        let member = by_relay
            .entry(relay.clone())
            .or_insert_with(|| RelayMember {
                id: RelayId::new(relay),
                expires_at,
                partitions: Vec::new(),
            });
        if let Some(partition) = partition.and_then(|p| u16::try_from(p).ok()) {
            member.partitions.push(partition);
        }
    }
    by_relay
        .into_values()
        .map(|mut member| {
            member.partitions.sort_unstable();
            member
        })
        .collect()
}

/// The rows every partition needs, each free, written by the migration if missing. The
/// dialect's `insert_ignore` is the start of an INSERT that skips existing rows, its
/// `epoch` a time long past.
pub(crate) fn seed_partitions(
    names: &Names,
    d: &Dialect,
    insert_ignore: &str,
    tail: &str,
    epoch: &str,
) -> String {
    let rows: Vec<String> = (0..PARTITIONS)
        .map(|p| format!("({p}, '', {epoch})"))
        .collect();
    format!(
        "{insert_ignore} {} ({}, owner, expires_at) VALUES {}{tail}",
        names.partitions,
        d.col("partition"),
        rows.join(", ")
    )
}

/// Migration text for `names`: the placeholders `{table}`, `{partitions}`, `{relays}`,
/// `{claim}`, `{schema}` and `{ix_<suffix>}` replaced by quoted, validated names.
pub(crate) fn render(template: &str, names: &Names) -> String {
    let mut text = template
        .replace("{table}", &names.table)
        .replace("{partitions}", &names.partitions)
        .replace("{relays}", &names.relays)
        .replace("{claim}", &names.claim)
        .replace("{schema}", &names.schema);
    while let Some(start) = text.find("{ix_") {
        let Some(len) = text[start..].find('}') else {
            break;
        };
        let suffix = text[start + 4..start + len].to_owned();
        text.replace_range(start..=start + len, &names.index(&suffix));
    }
    text
}

/// Columns read back for a message, in this order by [`RowParts`].
pub(crate) fn message_columns(d: &Dialect) -> String {
    format!(
        "seq, id, destination, {}, payload, headers, created_at, attempts, last_error",
        d.col("key")
    )
}

/// `columns` ("a, b, c") each prefixed with `alias.`.
pub(crate) fn qualified_columns(columns: &str, alias: &str) -> String {
    columns
        .split(", ")
        .map(|column| format!("{alias}.{column}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The columns of one stored message, each decoded on its own so that one bad column makes
/// the row [`Malformed`] instead of failing the whole claim.
#[derive(Debug)]
pub(crate) struct RowParts {
    pub(crate) seq: i64,
    pub(crate) id: MessageId,
    pub(crate) destination: Result<String, String>,
    pub(crate) key: Result<Option<String>, String>,
    pub(crate) payload: Result<Vec<u8>, String>,
    pub(crate) headers: Result<String, String>,
    pub(crate) created_at: Result<DateTime<Utc>, String>,
    pub(crate) attempts: Result<i64, String>,
    pub(crate) last_error: Result<Option<String>, String>,
}

/// Reads column `name` of `row`, the error as text naming the column.
pub(crate) fn column<'r, R, T>(row: &'r R, name: &str) -> Result<T, String>
where
    R: sqlx::Row,
    T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'n> &'n str: sqlx::ColumnIndex<R>,
{
    row.try_get::<T, _>(name)
        .map_err(|err| format!("column {name}: {err}"))
}

impl RowParts {
    /// The message, or why it cannot be one.
    pub(crate) fn into_message(self) -> Result<Message, Malformed> {
        let id = self.id;
        let key = self.key.clone().ok().flatten();
        self.decode(true)
            .map_err(|error| Malformed { id, key, error })
    }

    /// The message as a dead letter. Columns that cannot be decoded are shown as such
    /// (destination `<undecodable>`, empty payload, no headers) with the reason added to
    /// `last_error`, instead of hiding this dead letter or the others listed with it:
    /// operators list dead letters to decide what to replay or purge.
    pub(crate) fn into_dead_letter(
        mut self,
        dead_at: Result<DateTime<Utc>, String>,
    ) -> Result<DeadLetter, StoreError> {
        let mut damage: Vec<String> = Vec::new();
        let mut take = |result: Result<(), String>| {
            if let Err(error) = result {
                damage.push(error);
            }
        };
        if let Err(error) = &self.destination {
            take(Err(error.clone()));
            self.destination = Ok(String::from("<undecodable>"));
        }
        if let Err(error) = &self.key {
            take(Err(error.clone()));
            self.key = Ok(None);
        }
        if let Err(error) = &self.payload {
            take(Err(error.clone()));
            self.payload = Ok(Vec::new());
        }
        if let Err(error) = &self.attempts {
            take(Err(error.clone()));
            self.attempts = Ok(0);
        }
        if let Err(error) = &self.last_error {
            take(Err(error.clone()));
            self.last_error = Ok(None);
        }
        let dead_at = dead_at.unwrap_or_else(|error| {
            damage.push(error);
            DateTime::<Utc>::UNIX_EPOCH
        });
        if let Err(error) = &self.created_at {
            damage.push(error.clone());
            self.created_at = Ok(dead_at);
        }
        if !damage.is_empty() {
            let last = self.last_error.clone().ok().flatten();
            let note = format!("stored row damaged: {}", damage.join("; "));
            self.last_error = Ok(Some(match last {
                Some(last) => format!("{last} ({note})"),
                None => note,
            }));
        }
        let id = self.id;
        let message = self.decode(false).map_err(|error| {
            StoreError::new(
                outbox_core::StoreErrorKind::Decode,
                format!("dead letter {id}: {error}"),
            )
        })?;
        Ok(DeadLetter::new(message, dead_at))
    }

    fn decode(self, strict_headers: bool) -> Result<Message, String> {
        let headers = self.headers.and_then(|text| {
            decode_headers(&text)
                .map_err(|err| format!("headers are not a JSON object of strings: {err}"))
        });
        let headers = match headers {
            Ok(headers) => headers,
            Err(error) if strict_headers => return Err(error),
            Err(_) => Default::default(),
        };
        let attempts = self.attempts.and_then(|n| {
            u32::try_from(n).map_err(|_| format!("column attempts: {n} is out of range"))
        })?;
        let mut new = NewMessage::new(self.destination?, self.payload?).with_id(self.id);
        if let Some(key) = self.key? {
            new = new.key(key);
        }
        for (name, value) in headers {
            new = new.header(name, value);
        }
        Ok(Message::new(new, self.created_at?).with_attempts(attempts, self.last_error?))
    }
}

/// A claim from the rows leased under `token`, in enqueue order.
pub(crate) fn assemble_claim(token: LeaseToken, mut rows: Vec<RowParts>) -> Claim {
    rows.sort_by_key(|row| row.seq);
    let mut claim = Claim {
        token,
        messages: Vec::with_capacity(rows.len()),
        malformed: Vec::new(),
    };
    for row in rows {
        match row.into_message() {
            Ok(message) => claim.messages.push(message),
            Err(malformed) => {
                tracing::warn!(id = %malformed.id, error = %malformed.error, "claimed a row that cannot be decoded");
                claim.malformed.push(malformed);
            }
        }
    }
    claim
}

/// The parts of a dead row whose id cannot be read, under a stand-in id made of its sequence
/// number, so that listing dead letters still shows it.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) fn unreadable_id_parts(
    seq: i64,
    error: String,
    created_at: Result<DateTime<Utc>, String>,
) -> RowParts {
    RowParts {
        seq,
        id: MessageId::from_uuid(uuid::Uuid::from_u64_pair(0, seq.unsigned_abs())),
        destination: Err(error),
        key: Ok(None),
        payload: Ok(Vec::new()),
        headers: Ok(String::from("{}")),
        created_at,
        attempts: Ok(0),
        last_error: Ok(None),
    }
}

/// A MessageId from 16 stored bytes.
#[cfg_attr(not(any(feature = "mysql", feature = "sqlite")), allow(dead_code))]
pub(crate) fn id_from_bytes(bytes: &[u8]) -> Result<MessageId, String> {
    uuid::Uuid::from_slice(bytes)
        .map(MessageId::from_uuid)
        .map_err(|err| format!("column id: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Names, Quoting};

    const QMARK: Dialect = Dialect {
        numbered: false,
        quote: '`',
        now: "NOW()",
        now_plus: |sql, micros| {
            sql.push("NOW() + ").bind(Arg::Int(micros));
        },
        limited: Limited::Direct,
    };

    fn names() -> Names {
        Names::new(
            "outbox",
            Quoting {
                quote: '`',
                qualified: false,
            },
        )
        .expect("valid")
    }

    #[test]
    fn lists_are_padded_to_powers_of_two() {
        assert_eq!(padded(&[1, 2, 3]).collect::<Vec<_>>(), vec![1, 2, 3, 3]);
        assert_eq!(padded(&[1]).collect::<Vec<_>>(), vec![1]);
        assert_eq!(padded::<u8>(&[]).count(), 0);
        assert_eq!(bucket(0), 1);
        assert_eq!(bucket(512), 512);
        assert_eq!(bucket(513), 1024);
    }

    #[test]
    fn placeholders_follow_the_dialect() {
        let mut sql = Sql::new(&Dialect {
            numbered: true,
            ..QMARK
        });
        sql.push("a = ")
            .bind(Arg::Int(1))
            .push(" AND b IN ")
            .bind_list([Arg::Int(2), Arg::Int(3)]);
        assert_eq!(sql.text, "a = $1 AND b IN ($2, $3)");
        let mut sql = Sql::new(&QMARK);
        sql.bind_list([Arg::Int(2), Arg::Int(3)]);
        assert_eq!(sql.text, "(?, ?)");
    }

    #[test]
    fn retries_bind_each_delay_and_error() {
        let retries = vec![
            Retry {
                id: MessageId::new(),
                delay: Duration::from_millis(5),
                error: "a".into(),
            },
            Retry {
                id: MessageId::new(),
                delay: Duration::from_millis(7),
                error: "b".into(),
            },
            Retry {
                id: MessageId::new(),
                delay: Duration::from_millis(9),
                error: "c".into(),
            },
        ];
        let sql = settle_retry(&QMARK, &names(), &retries, LeaseToken::new());
        // 4 (padded) x (id, error) + 4 x (id, delay) + 4 ids + token
        assert_eq!(sql.args.len(), 8 + 8 + 4 + 1);
        assert_eq!(sql.text.matches('?').count(), sql.args.len());
        assert!(
            sql.text
                .starts_with("UPDATE `outbox` SET attempts = attempts + 1")
        );
        assert!(
            sql.text.ends_with("AND lease_until > NOW()"),
            "{}",
            sql.text
        );
    }

    #[test]
    fn inserts_are_chunked_by_rows_and_bytes() {
        let small: Vec<NewMessage> = (0..2500)
            .map(|i| NewMessage::new("t", format!("{i}")))
            .collect();
        let sizes: Vec<usize> = insert_chunks(&small).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![1000, 1000, 500]);
        let large: Vec<NewMessage> = (0..20)
            .map(|_| NewMessage::new("t", vec![0u8; 900 * 1024]))
            .collect();
        let chunks = insert_chunks(&large);
        assert!(chunks.len() >= 3, "{}", chunks.len());
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 20);
        assert!(insert_chunks(&[]).is_empty());
        let sql = insert(&QMARK, &names(), &small[..2]);
        assert_eq!(sql.args.len(), 12);
        assert!(
            sql.text.contains("`partition`, destination, `key`"),
            "{}",
            sql.text
        );
    }

    #[test]
    fn rows_that_cannot_be_decoded_are_malformed() {
        let id = MessageId::new();
        let row = |headers: &str| RowParts {
            seq: 1,
            id,
            destination: Ok("d".into()),
            key: Ok(Some("k".into())),
            payload: Ok(b"p".to_vec()),
            headers: Ok(headers.into()),
            created_at: Ok(Utc::now()),
            attempts: Ok(2),
            last_error: Ok(Some("e".into())),
        };
        let message = row(r#"{"a":"b"}"#).into_message().expect("decodes");
        assert_eq!((message.attempts, message.headers.len()), (2, 1));
        let bad = row("{not json").into_message().expect_err("bad headers");
        assert_eq!((bad.id, bad.key.as_deref()), (id, Some("k")));
        assert!(bad.error.contains("headers"), "{}", bad.error);
        let dead = row("{not json")
            .into_dead_letter(Ok(Utc::now()))
            .expect("dead letters keep bad headers out");
        assert!(dead.message.headers.is_empty());
    }
}
