//! [`SqliteStore`]: the outbox in an SQLite database file.
//!
//! SQLite has one writer at a time, which does the work row locks do elsewhere: a claim is
//! one `UPDATE ... WHERE seq IN (SELECT ... LIMIT n) RETURNING ...`, which holds the write lock
//! from its first row read to its commit; statements that belong together run in
//! `BEGIN IMMEDIATE` transactions, which take the write lock up front (waiting up to the busy
//! timeout) instead of failing on a lock upgrade. So several relay processes may share one
//! database file in WAL mode.
//!
//! Times are microseconds since the Unix epoch from SQLite's clock, i.e. the clock of the
//! host, which every process sharing the file has in common.

use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{Store, StoreError};
use sqlx::sqlite::{
    Sqlite, SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteRow,
};

use crate::config::Quoting;
use crate::error::Context as _;
use crate::inbox::InboxSql;
use crate::migrations::Schema;
use crate::shared::Base;
use crate::sql::{self, Arg, ClaimArgs, Decoding, Dialect, HeldIndex, Limited, Sql, column};
use uuid::Uuid;

/// The outbox schema; its last migration's version is [`SqliteStore::SCHEMA_VERSION`].
const SCHEMA: Schema = Schema {
    migrations: &[
        (1, include_str!("../migrations/sqlite/0001_outbox.sql")),
        (2, include_str!("../migrations/sqlite/0002_any_writer.sql")),
    ],
    dialect: &LITE,
    versions_table: "CREATE TABLE IF NOT EXISTS {schema} \
                     (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    epoch: "0",
    bigint: "INTEGER",
    exists: |names| {
        let mut sql = Sql::new(&LITE);
        sql.push("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ")
            .bind(Arg::Text(format!("{}_schema", names.base)));
        sql
    },
    drop: "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {partitions}; \
           DROP TABLE IF EXISTS {relays}; DROP TABLE IF EXISTS {schema}",
    without_notify: "",
};

/// Now, in microseconds. SQLite's clock has millisecond resolution and returns one value for
/// every use within one statement. (`julianday`, not `unixepoch('subsec')`, which is 3.42+:
/// the any-writer trigger computes the same in the writer's own SQLite library.)
const NOW: &str = "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER) * 1000)";

fn now_plus(sql: &mut Sql, micros: i64) {
    sql.push(&format!("({NOW} + "))
        .bind(Arg::Int(micros))
        .push(")");
}

/// The per-key check of claims.
const HELD: HeldIndex = HeldIndex {
    held: "(e.lease_until IS NOT NULL OR e.available_at > e.created_at)",
    force_index: false,
};

/// Transactions that write begin with `BEGIN IMMEDIATE`, which takes the write lock at once,
/// waiting for it up to the busy timeout.
const LITE: Dialect = Dialect {
    numbered: false,
    quoting: Quoting {
        quote: '"',
        qualified: false,
        qualified_triggers: false,
    },
    now: NOW,
    now_plus,
    limited: Limited::Subquery { locks: false },
    row_id: "rowid",
    // Not `INSERT OR IGNORE`, which also ignores a NOT NULL failure.
    insert_ignore: ("INSERT INTO", " ON CONFLICT DO NOTHING"),
    upsert_relay: "ON CONFLICT (relay) DO UPDATE SET expires_at = excluded.expires_at",
    locks_rows: false,
    begin_write: Some("BEGIN IMMEDIATE"),
    heartbeat_in_transaction: true,
    end_held: None,
};

/// Columns as SQLite stores them: ids as 16-byte blobs, times as microseconds since the epoch.
const DECODING: Decoding<SqliteRow> = Decoding::new(
    |row| sql::id_from_bytes(&column::<_, Vec<u8>>(row, "id")?),
    column,
    column,
    |row, name| column(row, name).map(time),
    |row, name| column::<_, Option<i64>>(row, name).map(|t| t.map(time)),
);

type Arguments<'q> = SqliteArguments<'q>;

crate::shared::binding!(
    Sqlite,
    |uuid: Uuid| uuid.as_bytes().to_vec(),
    |time: DateTime<Utc>| time.timestamp_micros()
);

/// How long a statement waits for another connection's write lock (pools from
/// [`SqliteStore::connect`]).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

type Inner = Base<Sqlite>;

crate::shared::store! {
    /// The transactional outbox in an SQLite database (3.35 or later; the bundled one is).
    ///
    /// Cheap to clone: clones share the pool. Use a file database in WAL mode
    /// ([`SqliteStore::connect`] sets it up); an in-memory database works within one pool only.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// use outbox_core::NewMessage;
    /// use outbox_sqlx::{SqliteStore, StoreConfig};
    ///
    /// let store = SqliteStore::connect(StoreConfig::new().url("sqlite://app.db")).await?;
    /// store.migrate().await?;
    ///
    /// // BEGIN IMMEDIATE takes the write lock up front, as a transaction that writes should.
    /// let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await?;
    /// // ... the service's own writes in `tx` ...
    /// store.enqueue(&mut tx, NewMessage::new("orders", "created").key("order-7")).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    SqliteStore(Sqlite, LITE),
    /// A store on `pool` with `config`; fails with [`StoreErrorKind::Config`] when the table
    /// name is not a plain identifier (SQLite takes no `schema.table`).
    ///
    /// The pool's connections should have a busy timeout (sqlx sets 5 s by default) and the
    /// database should be in WAL mode (which [`SqliteStore::migrate`] sets).
    ///
    /// [`StoreErrorKind::Config`]: outbox_core::StoreErrorKind::Config
    new(crate::config::refuse_handed_only),
    /// Opens [`StoreConfig::url`](crate::StoreConfig::url) (for example
    /// `sqlite://outbox.db`), creating the file if missing, in WAL mode with a 10 s busy
    /// timeout, with a pool of
    /// [`StoreConfig::max_connections`](crate::StoreConfig::max_connections), and builds the
    /// store on it.
    connect("the SQLite database", |options: SqliteConnectOptions| options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(BUSY_TIMEOUT)),
}

impl SqliteStore {
    /// Puts the database in WAL mode    /// Puts the database in WAL mode (readers and the writer then do not block each other)
    /// and creates or upgrades the outbox tables to [`Self::SCHEMA_VERSION`] in one
    /// `BEGIN IMMEDIATE` transaction. Idempotent.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        const DOING: &str = "migrating the outbox schema";
        // Not inside a transaction: SQLite refuses to change the journal mode there. An
        // in-memory database stays in its "memory" mode.
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&self.inner.pool)
            .await
            .doing(DOING)?;
        let mut tx = sql::begin(&self.inner.pool, LITE.begin_write, DOING).await?;
        self.apply_schema(&mut tx).await?;
        tx.commit().await.doing(DOING)
    }
}

crate::shared::accessors!(SqliteStore, Sqlite, SCHEMA);
crate::enqueue::enqueue_methods!(SqliteStore, Sqlite, SqliteConnection, LITE);

/// An instant from stored microseconds (out-of-range values, which no store writes, clamp).
fn time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl SqliteStore {
    /// A claim is one `UPDATE ... WHERE seq IN (SELECT ... LIMIT n) RETURNING ...`, which holds
    /// the write lock from its first row read to its commit.
    fn claim_statement(&self, claim: &ClaimArgs<'_>) -> Sql {
        let Inner { names, columns, .. } = &*self.inner;
        let mut statement = Sql::new(&LITE);
        statement
            .push(&format!("UPDATE {} SET lease_token = ", names.table))
            .bind(Arg::Token(claim.token))
            .push(", lease_until = ");
        now_plus(&mut statement, sql::micros(claim.lease));
        statement.push(&format!(
            " WHERE seq IN (SELECT o.seq FROM {} o WHERE ",
            names.table
        ));
        sql::push_claimable(
            &mut statement,
            &LITE,
            names,
            &HELD,
            sql::Owned::By(claim.relay),
        );
        statement
            .push(" ORDER BY o.seq LIMIT ")
            .bind(Arg::Int(claim.limit))
            .push(&format!(") RETURNING {columns}"));
        statement
    }
}

impl Store for SqliteStore {
    crate::shared::operations!(LITE);

    crate::shared::claim_by_statement!(claim);

    crate::shared::settle_by_statements!(settle, LITE);
}

/// The inbox's SQL on SQLite.
const INBOX: InboxSql = InboxSql {
    dialect: &LITE,
    create: include_str!("../migrations/sqlite/inbox.sql"),
};

crate::inbox::inbox!(SqliteInbox(Sqlite, INBOX), "SQLite", url: "sqlite://consumer.db", begin: "begin_with(\"BEGIN IMMEDIATE\")");
