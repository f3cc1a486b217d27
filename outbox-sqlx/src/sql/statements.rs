//! The statements of the stores, written once: their text differs between dialects only in
//! placeholders, quoting and clock expressions.

use std::time::Duration;

use outbox_core::{
    DeadLetterFilter, LeaseToken, Limits, MessageId, NewMessage, PARTITIONS, RelayId, Retry,
    Settlement, StoreError, encode_headers,
};

use super::{
    Arg, DEAD, Dialect, HeldIndex, INSERT_BYTES, INSERT_ROWS, Limited, PENDING, PUBLISHED,
    SETTLE_IDS, Sql, micros, padded,
};
use crate::config::Names;

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

/// The start of an `UPDATE` that counts an attempt of each message of `errors` and keeps its
/// error: `UPDATE t SET attempts = attempts + 1, last_error = CASE id ... END`.
fn count_attempt(
    d: &Dialect,
    names: &Names,
    errors: impl Iterator<Item = (MessageId, String)>,
) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "UPDATE {} SET attempts = attempts + 1, last_error = CASE id",
        names.table
    ));
    for (id, error) in errors {
        sql.push(" WHEN ")
            .bind(Arg::Id(id))
            .push(" THEN ")
            .bind(Arg::Text(error));
    }
    sql.push(" END");
    sql
}

/// Messages to retry: attempts + 1, the error kept, available after each one's delay.
pub(crate) fn settle_retry(
    d: &Dialect,
    names: &Names,
    retries: &[Retry],
    token: LeaseToken,
) -> Sql {
    let errors = padded(retries).map(|retry| (retry.id, retry.error));
    let mut sql = count_attempt(d, names, errors);
    sql.push(", available_at = CASE id");
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
    let mut sql = count_attempt(d, names, padded(dead));
    sql.push(&format!(
        ", state = {DEAD}, dead_at = {}, lease_token = NULL, lease_until = NULL",
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

/// What a claim asks for: up to `limit` messages for `relay`, leased under `token` for `lease`.
pub(crate) struct ClaimArgs<'a> {
    pub(crate) relay: &'a RelayId,
    pub(crate) token: LeaseToken,
    pub(crate) limit: i64,
    pub(crate) lease: Duration,
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
    partitions: Owned<'_>,
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
    sql.push(&format!("o.state = {PENDING} AND o.{partition} IN "));
    match partitions {
        Owned::By(relay) => {
            sql.push(&format!(
                "(SELECT {partition} FROM {parts} WHERE owner = ",
                parts = names.partitions
            ))
            .bind(Arg::Text(relay.as_str().to_owned()))
            .push(&format!(" AND expires_at > {now})"));
        }
        Owned::Listed(partitions) => {
            sql.bind_list(padded(partitions).map(|p| Arg::Int(i64::from(p))));
        }
    }
    sql.push(&format!(
        " AND o.available_at <= {now} \
         AND (o.lease_until IS NULL OR o.lease_until <= {now}) \
         AND (o.{key} IS NULL OR {key_check})"
    ));
}

/// The partitions a claim takes rows from.
#[derive(Clone, Copy)]
pub(crate) enum Owned<'a> {
    /// Those the relay owns under an unexpired lease, read in the claim's statement.
    By(&'a RelayId),
    /// These, read before: a locking `SELECT` locks the rows of every table it joins, and
    /// MySQL turns the subquery of [`Owned::By`] into a join.
    Listed(&'a [i16]),
}

/// Pending and dead counts, the oldest pending message and the retained ones, each through
/// its own index, and the database's clock (ages are measured on it).
pub(crate) fn stats(names: &Names, dialect: &Dialect) -> String {
    let t = &names.table;
    format!(
        "SELECT (SELECT COUNT(*) FROM {t} WHERE state = {PENDING}) AS pending, \
                (SELECT MIN(created_at) FROM {t} WHERE state = {PENDING}) AS oldest, \
                (SELECT COUNT(*) FROM {t} WHERE state = {DEAD}) AS dead, \
                (SELECT COUNT(*) FROM {t} WHERE state = {PUBLISHED}) AS published, \
                {now} AS {q}now{q}",
        q = dialect.quoting.quote,
        now = dialect.now
    )
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

/// Locks the partition rows of `partitions` in partition order (the order claims take them
/// in) before an `UPDATE` changes them: an `UPDATE` alone may lock in the order it finds the
/// rows, and could wait for a claim that waits for it. `None` where the dialect has no row
/// locks.
pub(crate) fn lock_partitions(d: &Dialect, names: &Names, partitions: &[i16]) -> Option<Sql> {
    lock(d, names, |sql| {
        sql.push(&format!("{} IN ", d.col("partition")))
            .bind_list(padded(partitions).map(Arg::Small));
    })
}

/// Locks the partition rows `relay` owns, in partition order, as [`lock_partitions`] does.
pub(crate) fn lock_owned(d: &Dialect, names: &Names, relay: &RelayId) -> Option<Sql> {
    lock(d, names, |sql| {
        sql.push("owner = ")
            .bind(Arg::Text(relay.as_str().to_owned()));
    })
}

/// Locks the partition rows that `condition` (what it pushes after `WHERE`) selects, in
/// partition order; `None` where the dialect has no row locks.
fn lock(d: &Dialect, names: &Names, condition: impl FnOnce(&mut Sql)) -> Option<Sql> {
    let partition = d.col("partition");
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "SELECT {partition} FROM {} WHERE ",
        names.partitions
    ));
    condition(&mut sql);
    sql.push(&format!(" ORDER BY {partition} FOR UPDATE"));
    d.locks_rows.then_some(sql)
}

/// Dead-letters the row `seq`, whose id cannot be read (`error` says why): without an id the
/// relay cannot address it, and left alone it would be leased again at every lease expiry.
pub(crate) fn bury(d: &Dialect, names: &Names, seq: i64, error: &str) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "UPDATE {} SET state = {DEAD}, dead_at = {now}, attempts = attempts + 1, \
         lease_token = NULL, lease_until = NULL, last_error = ",
        names.table,
        now = d.now
    ))
    .bind(Arg::Text(format!("the stored id cannot be read: {error}")))
    .push(" WHERE seq = ")
    .bind(Arg::Int(seq));
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
pub(crate) fn register(d: &Dialect, names: &Names, relay: &RelayId, ttl: Duration) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "INSERT INTO {} (relay, expires_at) VALUES (",
        names.relays
    ))
    .bind(Arg::Text(relay.as_str().to_owned()))
    .push(", ");
    (d.now_plus)(&mut sql, micros(ttl));
    sql.push(") ").push(d.upsert_relay);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::tests::{QMARK, names};

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
}
