//! The three stores, each on an outbox table of its own: filling a backlog, the raw drain
//! baseline, business transactions, counting and cleaning up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{DynStore, NewMessage, Store};
use outbox_sqlx::sqlx::{self, Row};
use outbox_sqlx::{
    ClaimMode, MySqlInbox, MySqlStore, PostgresInbox, PostgresStore, SqliteInbox, SqliteStore,
    StoreConfig,
};

use crate::Res;
use crate::services::{Services, reachable};
use crate::workload::{self, Keys};

/// A database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreKind {
    Postgres,
    MySql,
    Sqlite,
}

impl StoreKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            StoreKind::Postgres => "postgres",
            StoreKind::MySql => "mysql",
            StoreKind::Sqlite => "sqlite",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name {
            "postgres" | "pg" => Some(StoreKind::Postgres),
            "mysql" | "mariadb" => Some(StoreKind::MySql),
            "sqlite" => Some(StoreKind::Sqlite),
            _ => None,
        }
    }
}

#[derive(Clone)]
enum Any {
    Postgres(PostgresStore),
    MySql(MySqlStore),
    Sqlite(SqliteStore),
}

/// The connection pool of an outbox table's database.
#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
    /// SQLite: nothing speaks to it directly.
    Sqlite,
}

/// A consumer's inbox on one of the databases.
#[derive(Clone)]
pub(crate) enum BenchInbox {
    Postgres(PostgresInbox),
    MySql(MySqlInbox),
    Sqlite(SqliteInbox),
}

impl BenchInbox {
    /// Drops the inbox table.
    pub(crate) async fn drop_table(&self) -> Res<()> {
        match self {
            BenchInbox::Postgres(i) => i.drop_table().await?,
            BenchInbox::MySql(i) => i.drop_table().await?,
            BenchInbox::Sqlite(i) => i.drop_table().await?,
        }
        Ok(())
    }
}

/// An outbox table (and a business table next to it) created for one measurement.
#[derive(Clone)]
pub(crate) struct BenchStore {
    pub(crate) kind: StoreKind,
    pub(crate) table: String,
    store: Any,
    /// PostgreSQL: the same outbox with `notify = false`, on the same pool: its `migrate`
    /// removes the table's notify trigger.
    quiet: Option<PostgresStore>,
    /// The SQLite file's directory, removed with the tables.
    dir: Option<std::path::PathBuf>,
}

/// A writer's plain `INSERT` of one message into outbox table `table` of a `kind` database.
fn plain_insert(kind: StoreKind, table: &str) -> String {
    match kind {
        StoreKind::Postgres => format!(
            "INSERT INTO \"{table}\" (destination, \"key\", payload, headers) VALUES ($1, $2, $3, $4)"
        ),
        StoreKind::MySql => format!(
            "INSERT INTO `{table}` (destination, `key`, payload, headers) VALUES (?, ?, ?, ?)"
        ),
        StoreKind::Sqlite => format!(
            "INSERT INTO \"{table}\" (destination, \"key\", payload, headers) VALUES (?, ?, ?, ?)"
        ),
    }
}

/// [`plain_insert`]'s statement with `event`'s values bound.
fn plain_query<'q, DB>(
    insert: &'q str,
    event: &'q NewMessage,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(insert)
        .bind(event.destination())
        .bind(event.ordering_key())
        .bind(event.payload())
        .bind(outbox_core::encode_headers(event.headers()))
}

/// The business table next to outbox table `table`.
fn orders(table: &str) -> String {
    format!("{table}_orders")
}

/// The `INSERT` of one order row into the business table next to outbox table `table`.
fn order_insert(kind: StoreKind, table: &str) -> String {
    let orders = orders(table);
    match kind {
        StoreKind::Postgres => format!("INSERT INTO {orders} (customer, amount) VALUES ($1, $2)"),
        StoreKind::MySql | StoreKind::Sqlite => {
            format!("INSERT INTO {orders} (customer, amount) VALUES (?, ?)")
        }
    }
}

/// [`order_insert`]'s statement with the order's values bound.
fn order_query<'q, DB>(
    insert: &'q str,
    customer: &'q str,
    amount: i64,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(insert).bind(customer).bind(amount)
}

/// How the relay's store claims (`OUTBOX_BENCH_CLAIMS=lease` or `transaction`; by default,
/// the store's own choice), so that runs of both can be compared.
fn claim_mode() -> Option<ClaimMode> {
    match std::env::var("OUTBOX_BENCH_CLAIMS").as_deref() {
        Ok("lease") => Some(ClaimMode::Lease),
        Ok("transaction") => Some(ClaimMode::Transaction),
        _ => None,
    }
}

impl BenchStore {
    /// Creates outbox table `table` (migrated) and its business table, on a pool of
    /// `connections`.
    pub(crate) async fn create(
        kind: StoreKind,
        services: &Services,
        table: &str,
        connections: u32,
    ) -> Res<Self> {
        let mut config = StoreConfig::new().table(table).max_connections(connections);
        if let Some(mode) = claim_mode() {
            config = config.claim_mode(mode);
        }
        let (store, dir) = match kind {
            StoreKind::Postgres => {
                reachable("PostgreSQL", &services.postgres, 5432).await?;
                let store = PostgresStore::connect(config.url(services.postgres.as_str())).await?;
                (Any::Postgres(store), None)
            }
            StoreKind::MySql => {
                reachable("MariaDB", &services.mysql, 3306).await?;
                let store = MySqlStore::connect(config.url(services.mysql.as_str())).await?;
                (Any::MySql(store), None)
            }
            StoreKind::Sqlite => {
                let dir = std::env::temp_dir().join(table);
                std::fs::create_dir_all(&dir)?;
                let url = format!("sqlite://{}", dir.join("outbox.db").display());
                let store = SqliteStore::connect(config.url(url)).await?;
                (Any::Sqlite(store), Some(dir))
            }
        };
        let quiet = match &store {
            Any::Postgres(s) => Some(PostgresStore::new(
                s.pool().clone(),
                StoreConfig::new().table(table).notify(false),
            )?),
            _ => None,
        };
        let this = Self {
            kind,
            table: table.to_owned(),
            store,
            quiet,
            dir,
        };
        this.migrate().await?;
        Ok(this)
    }

    async fn migrate(&self) -> Res<()> {
        let orders = orders(&self.table);
        match &self.store {
            Any::Postgres(s) => {
                s.migrate().await?;
                sqlx::query(&format!(
                    "CREATE TABLE IF NOT EXISTS {orders} (id BIGINT GENERATED ALWAYS AS IDENTITY \
                     PRIMARY KEY, customer TEXT NOT NULL, amount BIGINT NOT NULL, \
                     created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                ))
                .execute(s.pool())
                .await?;
            }
            Any::MySql(s) => {
                s.migrate().await?;
                sqlx::query(&format!(
                    "CREATE TABLE IF NOT EXISTS {orders} (id BIGINT NOT NULL AUTO_INCREMENT \
                     PRIMARY KEY, customer VARCHAR(64) NOT NULL, amount BIGINT NOT NULL, \
                     created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE = InnoDB"
                ))
                .execute(s.pool())
                .await?;
            }
            Any::Sqlite(s) => {
                s.migrate().await?;
                sqlx::query(&format!(
                    "CREATE TABLE IF NOT EXISTS {orders} (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                     customer TEXT NOT NULL, amount INTEGER NOT NULL, \
                     created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
                ))
                .execute(s.pool())
                .await?;
            }
        }
        Ok(())
    }

    /// The pool behind the table, for code that speaks SQL to it directly.
    pub(crate) fn pool(&self) -> Pool {
        match &self.store {
            Any::Postgres(s) => Pool::Postgres(s.pool().clone()),
            Any::MySql(s) => Pool::MySql(s.pool().clone()),
            Any::Sqlite(_) => Pool::Sqlite,
        }
    }

    /// The store behind the dyn-compatible trait, for a relay.
    pub(crate) fn dyn_store(&self) -> Arc<dyn DynStore> {
        match &self.store {
            Any::Postgres(s) => Arc::new(s.clone()),
            Any::MySql(s) => Arc::new(s.clone()),
            Any::Sqlite(s) => Arc::new(s.clone()),
        }
    }

    /// Enqueues messages `0..n` of a backlog with keys `keys`, 1,000 per transaction, then
    /// refreshes the planner's statistics (unless `OUTBOX_BENCH_NO_ANALYZE` is set: a backlog
    /// written faster than autovacuum analyzes it). Returns the time the enqueue took.
    pub(crate) async fn fill(&self, destination: &str, n: u64, keys: Keys) -> Res<Duration> {
        const CHUNK: u64 = 1000;
        let started = Instant::now();
        let mut seq = 0;
        while seq < n {
            let end = (seq + CHUNK).min(n);
            let batch: Vec<NewMessage> = (seq..end)
                .map(|i| workload::message(destination, i, keys))
                .collect();
            match &self.store {
                Any::Postgres(s) => {
                    let mut tx = s.pool().begin().await?;
                    s.enqueue_batch(&mut *tx, batch).await?;
                    tx.commit().await?;
                }
                Any::MySql(s) => {
                    let mut tx = s.pool().begin().await?;
                    s.enqueue_batch(&mut *tx, batch).await?;
                    tx.commit().await?;
                }
                Any::Sqlite(s) => {
                    let mut tx = s.pool().begin_with("BEGIN IMMEDIATE").await?;
                    s.enqueue_batch(&mut *tx, batch).await?;
                    tx.commit().await?;
                }
            }
            seq = end;
        }
        let took = started.elapsed();
        if std::env::var_os("OUTBOX_BENCH_NO_ANALYZE").is_none() {
            self.analyze().await?;
        }
        Ok(took)
    }

    /// Refreshes the planner's statistics (as autovacuum would after a large insert).
    pub(crate) async fn analyze(&self) -> Res<()> {
        let t = &self.table;
        match &self.store {
            Any::Postgres(s) => {
                sqlx::query(&format!("VACUUM ANALYZE {t}"))
                    .execute(s.pool())
                    .await?;
            }
            Any::MySql(s) => {
                sqlx::query(&format!("ANALYZE TABLE {t}"))
                    .execute(s.pool())
                    .await?;
            }
            Any::Sqlite(s) => {
                sqlx::query("ANALYZE").execute(s.pool()).await?;
            }
        }
        Ok(())
    }

    /// Messages not yet published.
    pub(crate) async fn pending(&self) -> Res<u64> {
        let stats = match &self.store {
            Any::Postgres(s) => s.stats().await?,
            Any::MySql(s) => s.stats().await?,
            Any::Sqlite(s) => s.stats().await?,
        };
        Ok(stats.pending)
    }

    /// Whether any message is pending: one index probe, cheap enough to poll while relays
    /// drain (the store's stats count the whole backlog).
    pub(crate) async fn any_pending(&self) -> Res<bool> {
        let query = format!("SELECT seq FROM {} WHERE state = 0 LIMIT 1", self.table);
        let found = match &self.store {
            Any::Postgres(s) => sqlx::query(&query)
                .fetch_optional(s.pool())
                .await?
                .is_some(),
            Any::MySql(s) => sqlx::query(&query)
                .fetch_optional(s.pool())
                .await?
                .is_some(),
            Any::Sqlite(s) => sqlx::query(&query)
                .fetch_optional(s.pool())
                .await?
                .is_some(),
        };
        Ok(found)
    }

    /// The raw drain baseline: claims and deletes the whole table in batches of `batch`,
    /// reading every row back as the relay does, without publishing anything, on one
    /// connection. Returns the rows drained.
    pub(crate) async fn raw_drain(&self, batch: usize) -> Res<u64> {
        let t = &self.table;
        let limit = i64::try_from(batch)?;
        let mut drained = 0u64;
        loop {
            let rows = match &self.store {
                Any::Postgres(s) => {
                    let rows = sqlx::query(&format!(
                        "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} WHERE state = 0 \
                         ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) \
                         RETURNING seq, id, destination, \"key\", payload, headers, created_at"
                    ))
                    .bind(limit)
                    .fetch_all(s.pool())
                    .await?;
                    for row in &rows {
                        let _: (i64, uuid::Uuid, String, Option<String>, Vec<u8>, String) = (
                            row.try_get(0)?,
                            row.try_get(1)?,
                            row.try_get(2)?,
                            row.try_get(3)?,
                            row.try_get(4)?,
                            row.try_get(5)?,
                        );
                    }
                    rows.len()
                }
                Any::MySql(s) => {
                    let mut tx = s.pool().begin().await?;
                    let rows = sqlx::query(&format!(
                        "SELECT seq, id, destination, `key`, payload, headers, created_at FROM {t} \
                         WHERE state = 0 ORDER BY seq LIMIT ? FOR UPDATE SKIP LOCKED"
                    ))
                    .bind(limit)
                    .fetch_all(&mut *tx)
                    .await?;
                    let mut seqs = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let seq: i64 = row.try_get(0)?;
                        // utf8mb4_bin columns come back as binary strings.
                        let _: Vec<u8> = row.try_get(1)?;
                        let _: Vec<u8> = row.try_get(2)?;
                        let _: Option<Vec<u8>> = row.try_get(3)?;
                        let _: Vec<u8> = row.try_get(4)?;
                        let _: Vec<u8> = row.try_get(5)?;
                        seqs.push(seq.to_string());
                    }
                    if !seqs.is_empty() {
                        sqlx::query(&format!(
                            "DELETE FROM {t} WHERE seq IN ({})",
                            seqs.join(",")
                        ))
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                    rows.len()
                }
                Any::Sqlite(s) => {
                    let rows = sqlx::query(&format!(
                        "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} WHERE state = 0 \
                         ORDER BY seq LIMIT ?) \
                         RETURNING seq, id, destination, \"key\", payload, headers, created_at"
                    ))
                    .bind(limit)
                    .fetch_all(s.pool())
                    .await?;
                    for row in &rows {
                        let _: (i64, Vec<u8>, String, Option<String>, Vec<u8>, String) = (
                            row.try_get(0)?,
                            row.try_get(1)?,
                            row.try_get(2)?,
                            row.try_get(3)?,
                            row.try_get(4)?,
                            row.try_get(5)?,
                        );
                    }
                    rows.len()
                }
            };
            if rows == 0 {
                return Ok(drained);
            }
            drained += rows as u64;
        }
    }

    /// PostgreSQL: turns the outbox table's `NOTIFY` off (`StoreConfig::notify(false)` and
    /// `migrate`), to tell the cost of the row from the cost of the wake-up.
    pub(crate) async fn without_notify(&self) -> Res<()> {
        let quiet = self.quiet.as_ref().ok_or("no quiet store")?;
        Ok(quiet.migrate().await?)
    }

    /// One business transaction: an order row, and with `outbox` its event in the outbox,
    /// written by the store's `enqueue`, or with `plain` by a plain `INSERT` of destination,
    /// key, payload and headers that leaves the rest to the database, as a writer in another
    /// language would.
    pub(crate) async fn business_tx(&self, i: u64, outbox: Option<&str>, plain: bool) -> Res<()> {
        let insert = plain_insert(self.kind, &self.table);
        let order = order_insert(self.kind, &self.table);
        let customer = format!("customer-{}", i % 1000);
        let event = outbox.map(|destination| {
            let mut payload = format!(
                "{{\"type\":\"OrderCreated\",\"order\":{i},\"customer\":\"{customer}\",\"amount\":{}}}",
                i % 997
            )
            .into_bytes();
            payload.resize(workload::PAYLOAD, b' ');
            NewMessage::new(destination, payload)
                .key(format!("order-{i}"))
                .header("type", "OrderCreated")
        });
        let amount = i64::try_from(i % 997)?;
        match &self.store {
            Any::Postgres(s) => {
                let mut tx = s.pool().begin().await?;
                order_query(&order, &customer, amount)
                    .execute(&mut *tx)
                    .await?;
                match event {
                    Some(event) if plain => {
                        plain_query(&insert, &event).execute(&mut *tx).await?;
                    }
                    Some(event) => {
                        s.enqueue(&mut *tx, event).await?;
                    }
                    None => {}
                }
                tx.commit().await?;
            }
            Any::MySql(s) => {
                let mut tx = s.pool().begin().await?;
                order_query(&order, &customer, amount)
                    .execute(&mut *tx)
                    .await?;
                match event {
                    Some(event) if plain => {
                        plain_query(&insert, &event).execute(&mut *tx).await?;
                    }
                    Some(event) => {
                        s.enqueue(&mut *tx, event).await?;
                    }
                    None => {}
                }
                tx.commit().await?;
            }
            Any::Sqlite(s) => {
                let mut tx = s.pool().begin_with("BEGIN IMMEDIATE").await?;
                order_query(&order, &customer, amount)
                    .execute(&mut *tx)
                    .await?;
                match event {
                    Some(event) if plain => {
                        plain_query(&insert, &event).execute(&mut *tx).await?;
                    }
                    Some(event) => {
                        s.enqueue(&mut *tx, event).await?;
                    }
                    None => {}
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// A consumer's inbox on the same database, in table `{table}_inbox`, migrated.
    pub(crate) async fn inbox(&self) -> Res<BenchInbox> {
        let table = format!("{}_inbox", self.table);
        let inbox = match &self.store {
            Any::Postgres(s) => BenchInbox::Postgres(PostgresInbox::new(s.pool().clone(), &table)?),
            Any::MySql(s) => BenchInbox::MySql(MySqlInbox::new(s.pool().clone(), &table)?),
            Any::Sqlite(s) => BenchInbox::Sqlite(SqliteInbox::new(s.pool().clone(), &table)?),
        };
        match &inbox {
            BenchInbox::Postgres(i) => i.migrate().await?,
            BenchInbox::MySql(i) => i.migrate().await?,
            BenchInbox::Sqlite(i) => i.migrate().await?,
        }
        Ok(inbox)
    }

    /// One consumer transaction: the effect of message `i` (an order row, as
    /// [`BenchStore::business_tx`] writes) and, with `inbox`, its record in the inbox first.
    pub(crate) async fn consumer_tx(&self, i: u64, inbox: Option<&BenchInbox>) -> Res<()> {
        let order = order_insert(self.kind, &self.table);
        let customer = format!("customer-{}", i % 1000);
        let amount = i64::try_from(i % 997)?;
        let id = outbox_core::MessageId::new();
        let matching = matches!(
            (&self.store, inbox),
            (_, None)
                | (Any::Postgres(_), Some(BenchInbox::Postgres(_)))
                | (Any::MySql(_), Some(BenchInbox::MySql(_)))
                | (Any::Sqlite(_), Some(BenchInbox::Sqlite(_)))
        );
        if !matching {
            return Err("an inbox on another database than the store's".into());
        }
        match (&self.store, inbox) {
            (Any::Postgres(s), inbox) => {
                let mut tx = s.pool().begin().await?;
                if let Some(BenchInbox::Postgres(inbox)) = inbox
                    && !inbox.record(&mut tx, "bench", id).await?
                {
                    return Err("a new message counted as a duplicate".into());
                }
                order_query(&order, &customer, amount)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            (Any::MySql(s), inbox) => {
                let mut tx = s.pool().begin().await?;
                if let Some(BenchInbox::MySql(inbox)) = inbox
                    && !inbox.record(&mut tx, "bench", id).await?
                {
                    return Err("a new message counted as a duplicate".into());
                }
                order_query(&order, &customer, amount)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            (Any::Sqlite(s), inbox) => {
                let mut tx = s.pool().begin_with("BEGIN IMMEDIATE").await?;
                if let Some(BenchInbox::Sqlite(inbox)) = inbox
                    && !inbox.record(&mut tx, "bench", id).await?
                {
                    return Err("a new message counted as a duplicate".into());
                }
                order_query(&order, &customer, amount)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Drops the tables (and the SQLite file).
    pub(crate) async fn drop_all(&self) {
        let orders = orders(&self.table);
        let result: Res<()> = async {
            match &self.store {
                Any::Postgres(s) => {
                    s.drop_tables().await?;
                    sqlx::query(&format!("DROP TABLE IF EXISTS {orders}"))
                        .execute(s.pool())
                        .await?;
                    s.pool().close().await;
                }
                Any::MySql(s) => {
                    s.drop_tables().await?;
                    sqlx::query(&format!("DROP TABLE IF EXISTS {orders}"))
                        .execute(s.pool())
                        .await?;
                    s.pool().close().await;
                }
                Any::Sqlite(s) => s.pool().close().await,
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            eprintln!("cleaning up {}: {err}", self.table);
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
