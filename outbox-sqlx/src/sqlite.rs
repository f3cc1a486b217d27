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

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{
    Claim, DeadLetter, DeadLetterFilter, LeaseToken, RelayId, RelayMember, Stats, Store, StoreError,
};
use sqlx::query::Query;
use sqlx::sqlite::{
    Sqlite, SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow,
};
use sqlx::{Arguments as _, Row};

use crate::config::{Quoting, StoreConfig};
use crate::error::Context as _;
use crate::inbox::InboxSql;
use crate::migrations::Schema;
use crate::shared::Base;
use crate::sql::{self, Arg, DEAD, Dialect, HeldIndex, Limited, RowParts, Sql, column};

/// The outbox schema; its last migration's version is [`SqliteStore::SCHEMA_VERSION`].
const SCHEMA: Schema = Schema {
    migrations: &[(1, include_str!("../migrations/sqlite/0001_outbox.sql"))],
    dialect: &LITE,
    versions_table: "CREATE TABLE IF NOT EXISTS {schema} \
                     (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    insert_ignore: ("INSERT OR IGNORE INTO", ""),
    epoch: "0",
    bigint: "INTEGER",
};

const QUOTING: Quoting = Quoting {
    quote: '"',
    qualified: false,
};

/// Now, in microseconds. SQLite's clock has millisecond resolution and returns one value for
/// every use within one statement.
const NOW: &str = "(CAST(ROUND(unixepoch('subsec') * 1000) AS INTEGER) * 1000)";

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

const LITE: Dialect = Dialect {
    numbered: false,
    quote: '"',
    now: NOW,
    now_plus,
    limited: Limited::Subquery { locks: false },
};

/// Takes the write lock at once, waiting for it up to the busy timeout.
const BEGIN_IMMEDIATE: &str = "BEGIN IMMEDIATE";

/// How long a statement waits for another connection's write lock (pools from
/// [`SqliteStore::connect`]).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

type Inner = Base<Sqlite>;

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
#[derive(Clone, Debug)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl SqliteStore {
    /// A store on `pool` with `config`; fails with [`StoreErrorKind::Config`] when the table
    /// name is not a plain identifier (SQLite takes no `schema.table`).
    ///
    /// The pool's connections should have a busy timeout (sqlx sets 5 s by default) and the
    /// database should be in WAL mode (which [`SqliteStore::migrate`] sets).
    ///
    /// [`StoreErrorKind::Config`]: outbox_core::StoreErrorKind::Config
    pub fn new(pool: SqlitePool, config: StoreConfig) -> Result<Self, StoreError> {
        Ok(Self {
            inner: Arc::new(Base::new(pool, config, QUOTING, &LITE)?),
        })
    }

    /// Opens [`StoreConfig::url`] (for example `sqlite://outbox.db`), creating the file if
    /// missing, in WAL mode with a 10 s busy timeout, with a pool of
    /// [`StoreConfig::max_connections`], and builds the store on it.
    pub async fn connect(config: StoreConfig) -> Result<Self, StoreError> {
        const DOING: &str = "opening the SQLite database";
        let url = config.require_url("SqliteStore")?;
        let options = SqliteConnectOptions::from_str(url)
            .doing(DOING)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .connect_with(options)
            .await
            .doing(DOING)?;
        Self::new(pool, config)
    }

    /// Puts the database in WAL mode (readers and the writer then do not block each other)
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
        let mut tx = sql::begin(&self.inner.pool, Some(BEGIN_IMMEDIATE), DOING).await?;
        self.apply_schema(&mut tx).await?;
        tx.commit().await.doing(DOING)
    }

    /// The schema version of the outbox tables; 0 when they were never migrated.
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        const DOING: &str = "reading the outbox schema version";
        let base = &self.inner.names.base;
        let exists: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
        )
        .bind(format!("{base}_schema"))
        .fetch_one(&self.inner.pool)
        .await
        .doing(DOING)?;
        if exists == 0 {
            return Ok(0);
        }
        let version: i64 = sqlx::query_scalar(&format!(
            "SELECT COALESCE(MAX(version), 0) FROM {}",
            self.inner.names.schema
        ))
        .fetch_one(&self.inner.pool)
        .await
        .doing(DOING)?;
        Ok(i32::try_from(version).unwrap_or(i32::MAX))
    }

    /// Drops the outbox tables and everything in them. For tests and uninstalls.
    pub async fn drop_tables(&self) -> Result<(), StoreError> {
        let names = &self.inner.names;
        sqlx::raw_sql(&format!(
            "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {}; \
             DROP TABLE IF EXISTS {};",
            names.table, names.partitions, names.relays, names.schema
        ))
        .execute(&self.inner.pool)
        .await
        .doing("dropping the outbox tables")
        .map(drop)
    }

    async fn members_on(
        &self,
        conn: &mut SqliteConnection,
        doing: &str,
    ) -> Result<Vec<RelayMember>, StoreError> {
        let rows: Vec<(String, i64, Option<i16>)> =
            sqlx::query_as(&sql::members(&LITE, &self.inner.names))
                .fetch_all(&mut *conn)
                .await
                .doing(doing)?;
        Ok(sql::members_from(
            rows.into_iter()
                .map(|(relay, expires, partition)| (relay, time(expires), partition))
                .collect(),
        ))
    }
}

crate::shared::accessors!(SqliteStore, SqlitePool, SCHEMA);
crate::shared::apply_schema!(SqliteStore, SqliteConnection, SCHEMA);

crate::enqueue::enqueue_methods!(SqliteStore, Sqlite, SqliteConnection, LITE, |_, _| {});

/// An instant from stored microseconds (out-of-range values, which no store writes, clamp).
fn time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `args` as SQLite values: UUIDs as 16-byte blobs, times as microseconds.
fn arguments<'q>(args: Vec<Arg>) -> Result<SqliteArguments<'q>, StoreError> {
    let mut out = SqliteArguments::default();
    for arg in args {
        match arg {
            Arg::Id(id) => out.add(id.as_bytes().to_vec()),
            Arg::Token(token) => out.add(token.as_uuid().as_bytes().to_vec()),
            Arg::Small(n) => out.add(n),
            Arg::Int(n) => out.add(n),
            Arg::Text(text) => out.add(text),
            Arg::OptText(text) => out.add(text),
            Arg::Bytes(bytes) => out.add(bytes),
            Arg::Time(time) => out.add(time.timestamp_micros()),
        }
        .map_err(crate::error::encode)?;
    }
    Ok(out)
}

/// A query on `text` with `args`.
fn bound(text: &str, args: Vec<Arg>) -> Result<Query<'_, Sqlite, SqliteArguments<'_>>, StoreError> {
    Ok(sqlx::query_with(text, arguments(args)?))
}

impl SqliteStore {
    /// Dead-letters claimed rows whose id cannot be read (a SQLite column holds any bytes).
    /// Without an id the relay cannot address them, so the store does it here; left alone they
    /// would be leased again at every lease expiry and stay pending for ever.
    async fn bury(&self, rows: &[(i64, String)]) -> Result<(), StoreError> {
        for (seq, error) in rows {
            tracing::error!(seq, %error, "dead-lettering an outbox row whose id cannot be read");
            sqlx::query(&format!(
                "UPDATE {} SET state = {DEAD}, dead_at = {NOW}, attempts = attempts + 1, \
                 last_error = ?, lease_token = NULL, lease_until = NULL WHERE seq = ?",
                self.inner.names.table
            ))
            .bind(format!("the stored id cannot be read: {error}"))
            .bind(seq)
            .execute(&self.inner.pool)
            .await
            .doing("dead-lettering a row whose id cannot be read")?;
        }
        Ok(())
    }
}

fn row_parts(row: &SqliteRow) -> Result<RowParts, sqlx::Error> {
    let id: Vec<u8> = row.try_get("id")?;
    let id = sql::id_from_bytes(&id).map_err(|err| sqlx::Error::Decode(err.into()))?;
    Ok(RowParts {
        seq: row.try_get("seq")?,
        id,
        destination: column(row, "destination"),
        key: column(row, "key"),
        payload: column(row, "payload"),
        headers: column(row, "headers"),
        created_at: column::<_, i64>(row, "created_at").map(time),
        attempts: column(row, "attempts"),
        last_error: column(row, "last_error"),
    })
}

impl Store for SqliteStore {
    crate::shared::operations!(LITE);

    async fn claim(
        &self,
        relay: &RelayId,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
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
        let mut statement = Sql::new(&LITE);
        statement
            .push(&format!("UPDATE {} SET lease_token = ", names.table))
            .bind(Arg::Token(token))
            .push(", lease_until = ");
        now_plus(&mut statement, sql::micros(lease));
        statement.push(&format!(
            " WHERE seq IN (SELECT o.seq FROM {} o WHERE ",
            names.table
        ));
        sql::push_claimable(&mut statement, &LITE, names, &HELD, relay);
        statement
            .push(" ORDER BY o.seq LIMIT ")
            .bind(Arg::Int(i64::try_from(limit).unwrap_or(i64::MAX)))
            .push(&format!(") RETURNING {columns}"));
        let rows = bound(&statement.text, statement.args)?
            .fetch_all(pool)
            .await
            .doing("claiming outbox messages")?;
        let mut unreadable: Vec<(i64, String)> = Vec::new();
        let mut parts = Vec::with_capacity(rows.len());
        for row in &rows {
            match row_parts(row) {
                Ok(row) => parts.push(row),
                Err(err) => match row.try_get::<i64, _>("seq") {
                    Ok(seq) => unreadable.push((seq, err.to_string())),
                    Err(_) => tracing::error!(error = %err, "a claimed outbox row cannot be read"),
                },
            }
        }
        if !unreadable.is_empty() {
            self.bury(&unreadable).await?;
        }
        Ok(sql::assemble_claim(token, parts))
    }

    crate::shared::settle_by_statements!(LITE, Some(BEGIN_IMMEDIATE));

    async fn heartbeat(
        &self,
        relay: &RelayId,
        ttl: Duration,
    ) -> Result<Vec<RelayMember>, StoreError> {
        const DOING: &str = "renewing the relay's membership";
        let names = &self.inner.names;
        let mut tx = sql::begin(&self.inner.pool, Some(BEGIN_IMMEDIATE), DOING).await?;
        let register = sql::register(
            &LITE,
            names,
            relay,
            ttl,
            "ON CONFLICT (relay) DO UPDATE SET expires_at = excluded.expires_at",
        );
        bound(&register.text, register.args)?
            .execute(&mut *tx)
            .await
            .doing(DOING)?;
        sqlx::query(&sql::forget_expired(&LITE, names))
            .execute(&mut *tx)
            .await
            .doing(DOING)?;
        let members = self.members_on(&mut tx, DOING).await?;
        tx.commit().await.doing(DOING)?;
        Ok(members)
    }

    async fn members(&self) -> Result<Vec<RelayMember>, StoreError> {
        const DOING: &str = "listing the live relays";
        let mut conn = self.inner.pool.acquire().await.doing(DOING)?;
        self.members_on(&mut conn, DOING).await
    }

    async fn acquire(
        &self,
        relay: &RelayId,
        partitions: &[u16],
        ttl: Duration,
    ) -> Result<Vec<u16>, StoreError> {
        const DOING: &str = "acquiring partitions";
        let partitions = sql::partition_args(partitions);
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let mut statement = sql::acquire(&LITE, &self.inner.names, relay, &partitions, ttl);
        statement.push(" RETURNING \"partition\"");
        let owned: Vec<i16> = bound(&statement.text, statement.args)?
            .fetch_all(&self.inner.pool)
            .await
            .doing(DOING)?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()
            .doing(DOING)?;
        Ok(sql::partitions_from(owned))
    }

    async fn release(&self, relay: &RelayId, partitions: &[u16]) -> Result<(), StoreError> {
        let partitions = sql::partition_args(partitions);
        if partitions.is_empty() {
            return Ok(());
        }
        let statement = sql::release(&LITE, &self.inner.names, relay, Some(&partitions));
        bound(&statement.text, statement.args)?
            .execute(&self.inner.pool)
            .await
            .doing("releasing partitions")
            .map(drop)
    }

    async fn leave(&self, relay: &RelayId) -> Result<(), StoreError> {
        const DOING: &str = "leaving the relay group";
        let names = &self.inner.names;
        let mut tx = sql::begin(&self.inner.pool, Some(BEGIN_IMMEDIATE), DOING).await?;
        for statement in [
            sql::release(&LITE, names, relay, None),
            sql::forget(&LITE, names, relay),
        ] {
            bound(&statement.text, statement.args)?
                .execute(&mut *tx)
                .await
                .doing(DOING)?;
        }
        tx.commit().await.doing(DOING)
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        let (pending, oldest, dead, published, now): (i64, Option<i64>, i64, i64, i64) =
            sqlx::query_as(&sql::stats(&self.inner.names, &LITE))
                .fetch_one(&self.inner.pool)
                .await
                .doing("counting outbox messages")?;
        let oldest = oldest.map(time);
        Ok(sql::stats_from((
            pending,
            oldest,
            dead,
            published,
            time(now),
        )))
    }

    async fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
        let Inner {
            pool,
            names,
            columns,
            ..
        } = &*self.inner;
        let statement = sql::dead_letters(&LITE, names, columns, filter);
        let rows = bound(&statement.text, statement.args)?
            .fetch_all(pool)
            .await
            .doing("listing dead letters")?;
        rows.iter()
            .map(|row| {
                let parts = match row_parts(row) {
                    Ok(parts) => parts,
                    // A dead row whose id cannot be read is still listed, under a stand-in id
                    // made of its sequence number; `purge` of all dead letters removes it.
                    Err(err) => sql::unreadable_id_parts(
                        row.try_get::<i64, _>("seq").doing("listing dead letters")?,
                        err.to_string(),
                        column::<_, i64>(row, "created_at").map(time),
                    ),
                };
                parts.into_dead_letter(column::<_, i64>(row, "dead_at").map(time))
            })
            .collect()
    }
}

/// The inbox's SQL on SQLite.
const INBOX: InboxSql = InboxSql {
    dialect: &LITE,
    quoting: QUOTING,
    create: include_str!("../migrations/sqlite/inbox.sql"),
    insert_ignore: ("INSERT OR IGNORE INTO", ""),
    row_id: "rowid",
};

crate::inbox::inbox!(
    SqliteInbox,
    Sqlite,
    SqlitePool,
    SqliteConnection,
    INBOX,
    "SQLite",
    "```no_run
# async fn example(incoming: outbox_core::Incoming) -> Result<(), Box<dyn std::error::Error>> {
use outbox_sqlx::{SqliteInbox, DEFAULT_INBOX_TABLE};

let pool = outbox_sqlx::sqlx::SqlitePool::connect(\"sqlite://consumer.db\").await?;
let inbox = SqliteInbox::new(pool.clone(), DEFAULT_INBOX_TABLE)?;
inbox.migrate().await?;

let mut tx = pool.begin_with(\"BEGIN IMMEDIATE\").await?;
if inbox.record(&mut tx, \"billing\", incoming.id).await? {
    // New: apply the effect in `tx`.
}
tx.commit().await?;
# Ok(()) }
```"
);
