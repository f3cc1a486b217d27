//! [`MySqlStore`]: the outbox on MySQL 8 and MariaDB 10.6+.
//!
//! - Claims run in one `READ COMMITTED` transaction: lock the relay's partition rows
//!   (`FOR UPDATE`), select the next rows with `ORDER BY seq LIMIT n FOR UPDATE SKIP LOCKED`,
//!   lease them with `UPDATE ... WHERE seq IN (...)`, commit. Never the single-statement
//!   `UPDATE ... WHERE seq IN (SELECT * FROM (SELECT ... SKIP LOCKED) x)`: MariaDB accepts it
//!   but does not skip locked rows there, and hands the same rows to two relays.
//!   `READ COMMITTED` also spares enqueues the gap locks a locking range scan takes under
//!   `REPEATABLE READ`.
//! - The per-key subquery of the claim is a consistent read even inside the locking `SELECT`
//!   (checked on MariaDB 10.11; documented for MySQL 8): a row another transaction holds
//!   still blocks the later messages of its key.
//! - Settles are one transaction of set-based statements (`IN (...)`, `CASE id WHEN ...`).
//! - Times are `DATETIME(6)` in UTC from `UTC_TIMESTAMP(6)`, whatever the session time zone.
//! - No notifications: the relay polls (adaptively) and is woken in-process.

use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDateTime;
use outbox_core::{
    Claim, DeadLetter, DeadLetterFilter, LeaseToken, RelayId, RelayMember, Stats, Store,
    StoreError, StoreErrorKind,
};
use sqlx::mysql::{MySql, MySqlArguments, MySqlConnection, MySqlPool, MySqlPoolOptions, MySqlRow};
use std::collections::HashMap;

use sqlx::query::{Query, QueryAs};
use sqlx::{Arguments as _, Connection as _, Row};

use crate::config::{Quoting, StoreConfig};
use crate::error::Context as _;
use crate::inbox::InboxSql;
use crate::migrations::Schema;
use crate::shared::Base;
use crate::sql::{self, Arg, Dialect, HeldIndex, Limited, PENDING, RowParts, Sql, column};

/// The outbox schema; its last migration's version is [`MySqlStore::SCHEMA_VERSION`].
const SCHEMA: Schema = Schema {
    migrations: &[(1, include_str!("../migrations/mysql/0001_outbox.sql"))],
    dialect: &MY,
    versions_table: "CREATE TABLE IF NOT EXISTS {schema} (version INT NOT NULL PRIMARY KEY, \
                     applied_at DATETIME(6) NOT NULL) ENGINE = InnoDB",
    insert_ignore: ("INSERT IGNORE INTO", ""),
    epoch: "'1970-01-01 00:00:00'",
    bigint: "SIGNED",
};

const QUOTING: Quoting = Quoting {
    quote: '`',
    qualified: true,
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
    quote: '`',
    now: "UTC_TIMESTAMP(6)",
    now_plus,
    limited: Limited::Direct,
};

/// Starts the claim transaction. One text-protocol round trip, so the isolation level can
/// never be left behind for the next transaction on this pooled connection.
const BEGIN_READ_COMMITTED: &str =
    "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

type Inner = Base<MySql>;

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
#[derive(Clone, Debug)]
pub struct MySqlStore {
    inner: Arc<Inner>,
}

impl MySqlStore {
    /// A store on `pool` with `config`; fails with [`StoreErrorKind::Config`] when the table
    /// name is not a plain identifier (`database.table` is accepted).
    ///
    /// [`StoreErrorKind::Config`]: outbox_core::StoreErrorKind::Config
    pub fn new(pool: MySqlPool, config: StoreConfig) -> Result<Self, StoreError> {
        Ok(Self {
            inner: Arc::new(Base::new(pool, config, QUOTING, &MY)?),
        })
    }

    /// Opens a pool of [`StoreConfig::max_connections`] to [`StoreConfig::url`] and builds the
    /// store on it.
    pub async fn connect(config: StoreConfig) -> Result<Self, StoreError> {
        let url = config.require_url("MySqlStore")?;
        let pool = MySqlPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .connect(url)
            .await
            .doing("connecting to MySQL")?;
        Self::new(pool, config)
    }

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

    /// The schema version of the outbox tables; 0 when they were never migrated.
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        let store = self.clone();
        crate::detached::detached("reading the outbox schema version", async move {
            store.schema_version_direct().await
        })
        .await
    }

    async fn schema_version_direct(&self) -> Result<i32, StoreError> {
        const DOING: &str = "reading the outbox schema version";
        let (schema, base) = crate::config::split_table(&self.inner.config.table, true)?;
        let exists: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ?",
        )
        .bind(schema)
        .bind(format!("{base}_schema"))
        .fetch_one(&self.inner.pool)
        .await
        .doing(DOING)?;
        if exists == 0 {
            return Ok(0);
        }
        let version: i64 = sqlx::query_scalar(&format!(
            "SELECT CAST(COALESCE(MAX(version), 0) AS SIGNED) FROM {}",
            self.inner.names.schema
        ))
        .fetch_one(&self.inner.pool)
        .await
        .doing(DOING)?;
        Ok(i32::try_from(version).unwrap_or(i32::MAX))
    }

    /// Drops the outbox tables and everything in them. For tests and uninstalls.
    pub async fn drop_tables(&self) -> Result<(), StoreError> {
        const DOING: &str = "dropping the outbox tables";
        let store = self.clone();
        crate::detached::detached(DOING, async move {
            let names = &store.inner.names;
            sqlx::raw_sql(&format!(
                "DROP TABLE IF EXISTS {}, {}, {}, {}",
                names.table, names.partitions, names.relays, names.schema
            ))
            .execute(&store.inner.pool)
            .await
            .doing(DOING)
            .map(drop)
        })
        .await
    }

    async fn members_on(
        &self,
        conn: &mut MySqlConnection,
        doing: &str,
    ) -> Result<Vec<RelayMember>, StoreError> {
        let rows: Vec<(Text, NaiveDateTime, Option<i16>)> =
            sqlx::query_as(&sql::members(&MY, &self.inner.names))
                .fetch_all(&mut *conn)
                .await
                .doing(doing)?;
        Ok(sql::members_from(
            rows.into_iter()
                .map(|(relay, expires, partition)| (relay.0, expires.and_utc(), partition))
                .collect(),
        ))
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

crate::shared::accessors!(MySqlStore, MySqlPool, SCHEMA);
crate::shared::apply_schema!(MySqlStore, MySqlConnection, SCHEMA);

crate::enqueue::enqueue_methods!(MySqlStore, MySql, MySqlConnection, MY, |_, _| {});

/// `args` as MySQL values: UUIDs as 16 bytes, times as UTC `DATETIME`s.
fn arguments(args: Vec<Arg>) -> Result<MySqlArguments, StoreError> {
    let mut out = MySqlArguments::default();
    for arg in args {
        match arg {
            Arg::Id(id) => out.add(id.as_bytes().to_vec()),
            Arg::Token(token) => out.add(token.as_uuid().as_bytes().to_vec()),
            Arg::Small(n) => out.add(n),
            Arg::Int(n) => out.add(n),
            Arg::Text(text) => out.add(text),
            Arg::OptText(text) => out.add(text),
            Arg::Bytes(bytes) => out.add(bytes),
            Arg::Time(time) => out.add(time.naive_utc()),
        }
        .map_err(crate::error::encode)?;
    }
    Ok(out)
}

/// A query on `text` with `args`.
fn bound(text: &str, args: Vec<Arg>) -> Result<Query<'_, MySql, MySqlArguments>, StoreError> {
    Ok(sqlx::query_with(text, arguments(args)?))
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

fn row_parts(row: &MySqlRow) -> Result<RowParts, sqlx::Error> {
    let id: Vec<u8> = row.try_get("id")?;
    let id = sql::id_from_bytes(&id).map_err(|err| sqlx::Error::Decode(err.into()))?;
    Ok(RowParts {
        seq: row.try_get("seq")?,
        id,
        destination: text(row, "destination"),
        key: opt_text(row, "key"),
        payload: column(row, "payload"),
        headers: text(row, "headers"),
        created_at: column::<_, NaiveDateTime>(row, "created_at").map(|t| t.and_utc()),
        attempts: column::<_, i32>(row, "attempts").map(i64::from),
        last_error: opt_text(row, "last_error"),
    })
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
        const DOING: &str = "claiming outbox messages";
        let Inner {
            pool,
            names,
            columns,
            ..
        } = &*self.inner;
        let token = LeaseToken::new();
        let mut tx = sql::begin(pool, Some(BEGIN_READ_COMMITTED), DOING).await?;
        // Claims of one relay run one at a time, and a relay taking one of these partitions
        // over waits until this claim committed.
        let owned: Vec<i16> = sqlx::query_scalar(&format!(
            "SELECT `partition` FROM {} WHERE owner = ? AND expires_at > UTC_TIMESTAMP(6) \
             ORDER BY `partition` FOR UPDATE",
            names.partitions
        ))
        .bind(relay.as_str())
        .fetch_all(&mut *tx)
        .await
        .doing(DOING)?;
        if owned.is_empty() || limit == 0 {
            tx.rollback().await.doing(DOING)?;
            return Ok(sql::assemble_claim(token, Vec::new()));
        }
        let mut select = Sql::new(&MY);
        select.push(&format!(
            "SELECT {} FROM {} o WHERE ",
            sql::qualified_columns(columns, "o"),
            names.table
        ));
        sql::push_claimable(&mut select, &MY, names, &HELD, relay);
        select
            .push(" ORDER BY o.seq LIMIT ")
            .bind(Arg::Int(i64::try_from(limit).unwrap_or(i64::MAX)))
            .push(" FOR UPDATE SKIP LOCKED");
        let rows = bound(&select.text, select.args)?
            .fetch_all(&mut *tx)
            .await
            .doing(DOING)?;
        let mut parts: Vec<RowParts> = rows
            .iter()
            .filter_map(|row| match row_parts(row) {
                Ok(parts) => Some(parts),
                Err(err) => {
                    tracing::error!(error = %err, "a claimed outbox row has no readable id");
                    None
                }
            })
            .collect();
        self.keep_key_order(&mut tx, &mut parts).await?;
        if parts.is_empty() {
            tx.rollback().await.doing(DOING)?;
            return Ok(sql::assemble_claim(token, parts));
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
        Ok(sql::assemble_claim(token, parts))
    }

    crate::shared::settle_by_statements!(MY, None);

    /// Three statements without a transaction: under `REPEATABLE READ` the expiry `DELETE`
    /// of concurrent heartbeats would lock each other's rows.
    async fn heartbeat(
        &self,
        relay: &RelayId,
        ttl: Duration,
    ) -> Result<Vec<RelayMember>, StoreError> {
        const DOING: &str = "renewing the relay's membership";
        let names = &self.inner.names;
        let mut conn = self.inner.pool.acquire().await.doing(DOING)?;
        let register = sql::register(
            &MY,
            names,
            relay,
            ttl,
            "ON DUPLICATE KEY UPDATE expires_at = VALUES(expires_at)",
        );
        bound(&register.text, register.args)?
            .execute(&mut *conn)
            .await
            .doing(DOING)?;
        sqlx::query(&sql::forget_expired(&MY, names))
            .execute(&mut *conn)
            .await
            .doing(DOING)?;
        self.members_on(&mut conn, DOING).await
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
        let names = &self.inner.names;
        let mut tx = sql::begin(&self.inner.pool, None, DOING).await?;
        let update = sql::acquire(&MY, names, relay, &partitions, ttl);
        bound(&update.text, update.args)?
            .execute(&mut *tx)
            .await
            .doing(DOING)?;
        let owned = sql::owned(&MY, names, relay, &partitions);
        let owned: Vec<i16> = bound(&owned.text, owned.args)?
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
        let statement = sql::release(&MY, &self.inner.names, relay, Some(&partitions));
        bound(&statement.text, statement.args)?
            .execute(&self.inner.pool)
            .await
            .doing("releasing partitions")
            .map(drop)
    }

    async fn leave(&self, relay: &RelayId) -> Result<(), StoreError> {
        const DOING: &str = "leaving the relay group";
        let names = &self.inner.names;
        let mut tx = sql::begin(&self.inner.pool, None, DOING).await?;
        for statement in [
            sql::release(&MY, names, relay, None),
            sql::forget(&MY, names, relay),
        ] {
            bound(&statement.text, statement.args)?
                .execute(&mut *tx)
                .await
                .doing(DOING)?;
        }
        tx.commit().await.doing(DOING)
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        let (pending, oldest, dead, published, now): (
            i64,
            Option<NaiveDateTime>,
            i64,
            i64,
            NaiveDateTime,
        ) = sqlx::query_as(&sql::stats(&self.inner.names, &MY))
            .fetch_one(&self.inner.pool)
            .await
            .doing("counting outbox messages")?;
        let oldest = oldest.map(|t| t.and_utc());
        Ok(sql::stats_from((
            pending,
            oldest,
            dead,
            published,
            now.and_utc(),
        )))
    }

    async fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
        let Inner {
            pool,
            names,
            columns,
            ..
        } = &*self.inner;
        let statement = sql::dead_letters(&MY, names, columns, filter);
        let rows = bound(&statement.text, statement.args)?
            .fetch_all(pool)
            .await
            .doing("listing dead letters")?;
        rows.iter()
            .map(|row| {
                let parts = row_parts(row).doing("listing dead letters")?;
                parts.into_dead_letter(
                    column::<_, NaiveDateTime>(row, "dead_at").map(|t| t.and_utc()),
                )
            })
            .collect()
    }
}

/// The inbox's SQL on MySQL or MariaDB.
const INBOX: InboxSql = InboxSql {
    dialect: &MY,
    quoting: QUOTING,
    create: include_str!("../migrations/mysql/inbox.sql"),
    insert_ignore: ("INSERT IGNORE INTO", ""),
    // Unused: MySQL limits the DELETE itself.
    row_id: "",
};

crate::inbox::inbox!(
    MySqlInbox,
    MySql,
    MySqlPool,
    MySqlConnection,
    INBOX,
    "MySQL or MariaDB",
    "```no_run
# async fn example(incoming: outbox_core::Incoming) -> Result<(), Box<dyn std::error::Error>> {
use outbox_sqlx::{MySqlInbox, DEFAULT_INBOX_TABLE};

let pool = outbox_sqlx::sqlx::MySqlPool::connect(\"mysql://app@127.0.0.1/app\").await?;
let inbox = MySqlInbox::new(pool.clone(), DEFAULT_INBOX_TABLE)?;
inbox.migrate().await?;

let mut tx = pool.begin().await?;
if inbox.record(&mut tx, \"billing\", incoming.id).await? {
    // New: apply the effect in `tx`.
}
tx.commit().await?;
// ... then acknowledge the message to the broker.
# Ok(()) }
```"
);
