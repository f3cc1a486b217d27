//! [`CdcAdmin`]: checks that the database can serve the log, creates the publication and the
//! slot, reports the slot's lag, and removes both; over a normal (not replication)
//! connection.

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Executor, Row};

use crate::config::{Connection, TableName};
use crate::{CdcConfig, CdcError, Lsn};

/// SQLSTATE `duplicate_object`: a slot (or publication) another process created first.
const DUPLICATE_OBJECT: &str = "42710";
/// SQLSTATE `unique_violation`: a publication another process created while this one
/// waited for its catalog row.
const UNIQUE_VIOLATION: &str = "23505";
/// SQLSTATE `object_in_use`: a slot some session streams from.
const OBJECT_IN_USE: &str = "55006";

/// Where a replication slot stands ([`CdcAdmin::slot_status`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotStatus {
    /// The slot's name.
    pub slot: String,
    /// Up to where the broker confirmed every message (or the log had nothing for the
    /// outbox): a source connecting now resumes from here.
    pub confirmed_flush_lsn: Lsn,
    /// The server's current WAL position.
    pub current_wal_lsn: Lsn,
    /// WAL bytes the slot holds back: `current_wal_lsn - confirmed_flush_lsn`.
    pub lag_bytes: u64,
    /// The server's `wal_status`: `reserved`, `extended`, `unreserved` (about to be lost),
    /// or `lost` (invalidated: the source refuses to start).
    pub wal_status: String,
    /// Whether a session streams from the slot now.
    pub active: bool,
}

impl SlotStatus {
    /// True when the slot was invalidated (`wal_status = lost`).
    pub fn is_lost(&self) -> bool {
        self.wal_status == "lost"
    }
}

/// Setup and inspection of the publication and slot of a [`CdcConfig`].
///
/// ```no_run
/// # async fn example() -> Result<(), outbox_pg_cdc::CdcError> {
/// use outbox_pg_cdc::{CdcAdmin, CdcConfig};
///
/// let admin = CdcAdmin::connect(CdcConfig::new("postgres://relay@db/app")).await?;
/// admin.check().await?; // wal_level, privileges, the outbox table
/// admin.ensure().await?; // publication and slot, once
/// let status = admin.slot_status().await?;
/// println!("{} bytes behind at {}", status.lag_bytes, status.confirmed_flush_lsn);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct CdcAdmin {
    pool: PgPool,
    config: CdcConfig,
    table: TableName,
}

impl CdcAdmin {
    /// Connects to [`CdcConfig::url`] (a pool of at most two connections).
    pub async fn connect(config: CdcConfig) -> Result<Self, CdcError> {
        config.validate()?;
        let connection = Connection::parse(&config.url)?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(connection.connect_options())
            .await
            .map_err(|err| CdcError::database(format!("connecting to {connection}"), err))?;
        Self::new(pool, config)
    }

    /// On an existing pool (its role is the one checked and used).
    pub fn new(pool: PgPool, config: CdcConfig) -> Result<Self, CdcError> {
        config.validate()?;
        let table = TableName::parse(&config.table)?;
        Ok(Self {
            pool,
            config,
            table,
        })
    }

    /// The pool it runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Checks what the log source needs, each failure saying how to fix it: PostgreSQL 14 or
    /// later, `wal_level = logical`, replication slots and WAL senders allowed, a role with
    /// `REPLICATION` (or superuser), and the outbox table.
    pub async fn check(&self) -> Result<(), CdcError> {
        const DOING: &str = "checking the server's settings";
        let row = sqlx::query(
            "SELECT current_setting('server_version_num')::int4 AS version, \
                    current_setting('wal_level') AS wal_level, \
                    current_setting('max_replication_slots')::int4 AS slots, \
                    current_setting('max_wal_senders')::int4 AS senders, \
                    r.rolreplication OR r.rolsuper AS may_replicate, \
                    current_user::text AS role \
               FROM pg_roles r WHERE r.rolname = current_user",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|err| CdcError::database(DOING, err))?;
        let get = |err| CdcError::database(DOING, err);
        let version: i32 = row.try_get("version").map_err(get)?;
        let wal_level: String = row.try_get("wal_level").map_err(get)?;
        let slots: i32 = row.try_get("slots").map_err(get)?;
        let senders: i32 = row.try_get("senders").map_err(get)?;
        let may_replicate: bool = row.try_get("may_replicate").map_err(get)?;
        let role: String = row.try_get("role").map_err(get)?;
        if version < 140_000 {
            return Err(CdcError::NotReady(format!(
                "the server is PostgreSQL {version}, and the log source needs 14 or later"
            )));
        }
        if wal_level != "logical" {
            return Err(CdcError::NotReady(format!(
                "wal_level is {wal_level}, and logical replication needs wal_level = logical: \
                 set it (ALTER SYSTEM SET wal_level = logical, or in postgresql.conf) and \
                 restart PostgreSQL"
            )));
        }
        if slots < 1 || senders < 1 {
            return Err(CdcError::NotReady(format!(
                "max_replication_slots is {slots} and max_wal_senders is {senders}: each must \
                 be at least 1 for the log source (set them and restart PostgreSQL)"
            )));
        }
        if !may_replicate {
            return Err(CdcError::NotReady(format!(
                "role {role:?} may not stream the log: grant it with \
                 ALTER ROLE \"{role}\" REPLICATION (or connect as a role that has it)"
            )));
        }
        self.outbox_table().await?;
        Ok(())
    }

    /// The outbox table's schema and name as the server resolves them.
    async fn outbox_table(&self) -> Result<(String, String), CdcError> {
        let row = sqlx::query(
            "SELECT n.nspname::text AS schema, c.relname::text AS name \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.oid = to_regclass($1)",
        )
        .bind(self.table.quoted())
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| CdcError::database("looking up the outbox table", err))?;
        let Some(row) = row else {
            return Err(CdcError::NotReady(format!(
                "the outbox table {} does not exist: run the store's migrations \
                 (PostgresStore::migrate) first",
                self.config.table
            )));
        };
        let get = |err| CdcError::database("looking up the outbox table", err);
        Ok((
            row.try_get("schema").map_err(get)?,
            row.try_get("name").map_err(get)?,
        ))
    }

    /// Creates what is missing, after [`CdcAdmin::check`]: the publication
    /// `FOR TABLE <outbox> WITH (publish = 'insert')` and the logical slot (`pgoutput`).
    /// Idempotent, and safe when processes run it at once. An existing publication or slot
    /// that is not what the source needs is an error, as is a slot that was invalidated:
    /// neither is changed or recreated here.
    ///
    /// The slot starts at the server's current position: messages committed before it was
    /// created are not in its log (relay them with the polling relay first).
    pub async fn ensure(&self) -> Result<(), CdcError> {
        self.check().await?;
        self.ensure_publication().await?;
        self.ensure_slot().await
    }

    async fn ensure_publication(&self) -> Result<(), CdcError> {
        let publication = &self.config.publication;
        if self.publication_flags().await?.is_none() {
            // The name is [a-z0-9_]+ and the table quoted plain identifiers: nothing to escape.
            let create = format!(
                "CREATE PUBLICATION {publication} FOR TABLE {} WITH (publish = 'insert')",
                self.table.quoted()
            );
            if let Err(err) = self.pool.execute(create.as_str()).await
                && !matches!(
                    sqlstate(&err).as_deref(),
                    Some(DUPLICATE_OBJECT | UNIQUE_VIOLATION)
                )
            {
                return Err(CdcError::database(
                    format!("creating publication {publication}"),
                    err,
                ));
            }
        }
        let Some((all_tables, insert, update, delete, truncate)) = self.publication_flags().await?
        else {
            return Err(CdcError::Mismatch(format!(
                "publication {publication} was dropped while it was being set up"
            )));
        };
        let tables: Vec<(String, String)> = sqlx::query_as(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
              WHERE pubname = $1",
        )
        .bind(publication)
        .fetch_all(&self.pool)
        .await
        .map_err(|err| CdcError::database("reading the publication's tables", err))?;
        let outbox = self.outbox_table().await?;
        if all_tables || !insert || update || delete || truncate || tables != [outbox.clone()] {
            return Err(CdcError::Mismatch(format!(
                "publication {publication} exists but does not publish exactly the inserts of \
                 {}.{} (FOR ALL TABLES: {all_tables}; tables: {tables:?}; insert {insert}, \
                 update {update}, delete {delete}, truncate {truncate}): drop it \
                 (CdcAdmin::drop) or choose another publication name",
                outbox.0, outbox.1
            )));
        }
        Ok(())
    }

    async fn publication_flags(&self) -> Result<Option<(bool, bool, bool, bool, bool)>, CdcError> {
        sqlx::query_as(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate \
               FROM pg_publication WHERE pubname = $1",
        )
        .bind(&self.config.publication)
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| CdcError::database("reading the publication", err))
    }

    async fn ensure_slot(&self) -> Result<(), CdcError> {
        let slot = &self.config.slot;
        if self.slot_row().await?.is_none() {
            let created = sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
                .bind(slot)
                .execute(&self.pool)
                .await;
            if let Err(err) = created
                && sqlstate(&err).as_deref() != Some(DUPLICATE_OBJECT)
            {
                return Err(CdcError::database(format!("creating slot {slot}"), err));
            }
        }
        let Some(found) = self.slot_row().await? else {
            return Err(CdcError::SlotMissing { slot: slot.clone() });
        };
        found.usable(slot)
    }

    async fn slot_row(&self) -> Result<Option<SlotRow>, CdcError> {
        let row = sqlx::query(
            "SELECT slot_type::text AS slot_type, plugin::text AS plugin, \
                    database::text AS database, current_database()::text AS current, \
                    wal_status, confirmed_flush_lsn::text AS confirmed, active, \
                    pg_current_wal_lsn()::text AS current_lsn \
               FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.config.slot)
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| CdcError::database("reading the replication slot", err))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let get = |err| CdcError::database("reading the replication slot", err);
        Ok(Some(SlotRow {
            slot_type: row.try_get("slot_type").map_err(get)?,
            plugin: row.try_get("plugin").map_err(get)?,
            database: row.try_get("database").map_err(get)?,
            current_database: row.try_get("current").map_err(get)?,
            wal_status: row.try_get("wal_status").map_err(get)?,
            confirmed: row.try_get("confirmed").map_err(get)?,
            active: row.try_get("active").map_err(get)?,
            current_lsn: row.try_get("current_lsn").map_err(get)?,
        }))
    }

    /// The slot's confirmed position, the server's WAL position, the bytes between them, and
    /// whether the slot is in use or lost. A missing slot is [`CdcError::SlotMissing`].
    pub async fn slot_status(&self) -> Result<SlotStatus, CdcError> {
        let slot = &self.config.slot;
        let found = self
            .slot_row()
            .await?
            .ok_or_else(|| CdcError::SlotMissing { slot: slot.clone() })?;
        let confirmed = match &found.confirmed {
            Some(text) => text.parse()?,
            None => Lsn::ZERO,
        };
        let current: Lsn = found.current_lsn.parse()?;
        Ok(SlotStatus {
            slot: slot.clone(),
            confirmed_flush_lsn: confirmed,
            current_wal_lsn: current,
            lag_bytes: current.bytes_since(confirmed),
            wal_status: found.wal_status.unwrap_or_default(),
            active: found.active,
        })
    }

    /// Drops the slot and the publication, those that exist. The slot must not be in use
    /// ([`CdcError::SlotInUse`] otherwise: stop the source first). Its position is gone for
    /// good: a slot created again starts at the server's current position.
    pub async fn drop(&self) -> Result<(), CdcError> {
        let slot = &self.config.slot;
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
              WHERE slot_name = $1",
        )
        .bind(slot)
        .execute(&self.pool)
        .await;
        match dropped {
            Ok(_) => {}
            Err(err) if sqlstate(&err).as_deref() == Some(OBJECT_IN_USE) => {
                return Err(CdcError::SlotInUse {
                    slot: slot.clone(),
                    reason: err.to_string(),
                });
            }
            Err(err) => {
                return Err(CdcError::database(format!("dropping slot {slot}"), err));
            }
        }
        let publication = &self.config.publication;
        self.pool
            .execute(format!("DROP PUBLICATION IF EXISTS {publication}").as_str())
            .await
            .map_err(|err| {
                CdcError::database(format!("dropping publication {publication}"), err)
            })?;
        Ok(())
    }
}

/// A row of `pg_replication_slots`.
struct SlotRow {
    slot_type: String,
    plugin: Option<String>,
    database: Option<String>,
    current_database: String,
    wal_status: Option<String>,
    confirmed: Option<String>,
    active: bool,
    current_lsn: String,
}

impl SlotRow {
    /// Whether the source can stream from this slot.
    fn usable(&self, slot: &str) -> Result<(), CdcError> {
        if self.wal_status.as_deref() == Some("lost") {
            return Err(CdcError::SlotLost {
                slot: slot.to_owned(),
                reason: String::from("wal_status = lost"),
            });
        }
        if self.slot_type != "logical"
            || self.plugin.as_deref() != Some("pgoutput")
            || self.database.as_deref() != Some(self.current_database.as_str())
        {
            return Err(CdcError::Mismatch(format!(
                "replication slot {slot} exists but is not a logical pgoutput slot of database \
                 {} (type {}, plugin {:?}, database {:?}): drop it or choose another slot name",
                self.current_database, self.slot_type, self.plugin, self.database
            )));
        }
        Ok(())
    }
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned())
}
