//! SQL written once for the three dialects. This module holds the statement builder: a text
//! and its dialect-neutral arguments, with the placeholders, quoting and clock of a
//! [`Dialect`]; each dialect binds [`Arg`]s to its own column types (a UUID is `uuid` on
//! PostgreSQL, `BINARY(16)` on MySQL and a `BLOB` on SQLite; a time is `timestamptz`,
//! `DATETIME(6)` in UTC or microseconds since the epoch).
//!
//! - [`statements`]: the statements whose text differs only in placeholders, quoting and
//!   clock expressions;
//! - [`rows`]: what is read back, decoded into messages, members and counts;
//! - [`run`]: beginning transactions and running scripts, safe to cancel and `Send`.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{LeaseToken, MessageId};

use crate::config::Quoting;

mod rows;
mod run;
mod statements;

pub(crate) use rows::*;
pub(crate) use run::*;
pub(crate) use statements::*;

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

/// What differs between the SQL of the dialects: placeholders, identifier quoting, clock,
/// spellings and locking.
#[derive(Debug)]
pub(crate) struct Dialect {
    /// `$1, $2, ...` (PostgreSQL) rather than `?`.
    pub(crate) numbered: bool,
    /// Identifier quote, and whether a table name may be `schema.table`.
    pub(crate) quoting: Quoting,
    /// The database clock, now.
    pub(crate) now: &'static str,
    /// Writes "now plus the bound number of microseconds".
    pub(crate) now_plus: fn(&mut Sql, i64),
    /// How an `UPDATE` or `DELETE` takes the first rows in some order.
    pub(crate) limited: Limited,
    /// What a subquery of such a statement selects the rows of a table without a key of its
    /// own by (PostgreSQL `ctid`, SQLite `rowid`; unused where the statement limits itself).
    pub(crate) row_id: &'static str,
    /// An `INSERT` that skips rows whose key exists: its head (`INSERT IGNORE INTO`) and tail
    /// (` ON CONFLICT DO NOTHING`).
    pub(crate) insert_ignore: (&'static str, &'static str),
    /// The end of the `INSERT` of a relay's membership that renews an existing one.
    pub(crate) upsert_relay: &'static str,
    /// `SELECT ... FOR UPDATE` locks rows (SQLite has one writer instead).
    pub(crate) locks_rows: bool,
    /// How a transaction that writes begins (`None`: a plain `BEGIN`).
    pub(crate) begin_write: Option<&'static str>,
    /// A heartbeat runs in one transaction (MySQL runs its statements one by one: under
    /// `REPEATABLE READ` the expiry `DELETE`s of concurrent heartbeats would lock each other's
    /// rows).
    pub(crate) heartbeat_in_transaction: bool,
    /// Run in the transaction of a claim held open ([`ClaimMode::Transaction`]) before it
    /// ends: undoes the session setting that lets the database end the claim of a relay gone
    /// quiet, before the connection goes back to the pool (MySQL's `wait_timeout`; PostgreSQL
    /// sets its timeout for the transaction only).
    ///
    /// [`ClaimMode::Transaction`]: crate::ClaimMode::Transaction
    pub(crate) end_held: Option<&'static str>,
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
        format!("{q}{name}{q}", q = self.quoting.quote)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Names;

    /// A dialect with `?` placeholders, for the statement tests.
    pub(super) const QMARK: Dialect = Dialect {
        numbered: false,
        quoting: QUOTING,
        now: "NOW()",
        now_plus: |sql, micros| {
            sql.push("NOW() + ").bind(Arg::Int(micros));
        },
        limited: Limited::Direct,
        row_id: "",
        insert_ignore: ("INSERT IGNORE INTO", ""),
        upsert_relay: "",
        locks_rows: true,
        begin_write: None,
        heartbeat_in_transaction: true,
        end_held: None,
    };

    const QUOTING: Quoting = Quoting {
        quote: '`',
        qualified: false,
        qualified_triggers: false,
    };

    pub(super) fn names() -> Names {
        Names::new("outbox", QUOTING).expect("valid")
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
}
