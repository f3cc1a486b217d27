//! What every SQL store has whatever its dialect, written once: [`Base`], and macros that a
//! dialect file invokes with its own types, [`Schema`](crate::migrations::Schema) and
//! [`Dialect`](crate::sql::Dialect).
//!
//! A store is a struct with an `inner: Arc<Base<DB>>` field. Its dialect file binds arguments
//! with [`binding!`] and decodes rows with a [`Decoding`](crate::sql::Decoding); what is left
//! there is what differs: claims, settles where they differ, migration locks, notifications.
//! (Macros, not generic functions: a generic `async fn` over sqlx executors gives futures that
//! are not `Send` for every lifetime, and services spawn store calls.)

use std::time::Duration;

use outbox_core::StoreError;
use sqlx::pool::PoolOptions;
use sqlx::{Connection, Database, Pool};

use crate::StoreConfig;
use crate::config::Names;
use crate::error::Context as _;
use crate::held::Held;
use crate::sql::{Dialect, message_columns};

/// What every store holds: its pool, configuration and validated names.
#[derive(Debug)]
pub(crate) struct Base<DB: Database> {
    pub(crate) pool: Pool<DB>,
    pub(crate) config: StoreConfig,
    pub(crate) names: Names,
    /// [`message_columns`] of the dialect.
    pub(crate) columns: String,
    /// Claims held open ([`ClaimMode::Transaction`](crate::ClaimMode::Transaction)).
    pub(crate) held: Held<DB>,
}

impl<DB: Database> Base<DB> {
    pub(crate) fn new(
        pool: Pool<DB>,
        config: StoreConfig,
        dialect: &Dialect,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            names: Names::new(&config.table, dialect.quoting)?.with_channel(config.channel()),
            columns: message_columns(dialect),
            pool,
            config,
            held: Held::new(dialect.end_held),
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
            held: Held::new(self.held.end()),
        }
    }
}

/// A pool of [`StoreConfig::max_connections`] connections with `options`.
pub(crate) async fn connect<DB: Database>(
    config: &StoreConfig,
    options: <DB::Connection as Connection>::Options,
    doing: &str,
) -> Result<Pool<DB>, StoreError> {
    PoolOptions::<DB>::new()
        .max_connections(config.max_connections.max(1))
        .connect_with(options)
        .await
        .doing(doing)
}

/// `arguments(args)`, the dialect-neutral arguments as the values of `$db`, and
/// `bound(text, args)`, a query with them, for a dialect file that names its arguments type
/// `Arguments<'q>`: UUIDs (ids and lease tokens) become `$uuid(uuid)`, instants `$time(time)`.
macro_rules! binding {
    ($db:ty, $uuid:expr, $time:expr) => {
        fn arguments<'q>(
            args: Vec<$crate::sql::Arg>,
        ) -> Result<Arguments<'q>, ::outbox_core::StoreError> {
            use ::sqlx::Arguments as _;
            use $crate::sql::Arg;
            let mut out = Arguments::default();
            for arg in args {
                match arg {
                    Arg::Id(id) => out.add(($uuid)(*id.as_uuid())),
                    Arg::Token(token) => out.add(($uuid)(*token.as_uuid())),
                    Arg::Small(n) => out.add(n),
                    Arg::Int(n) => out.add(n),
                    Arg::Text(text) => out.add(text),
                    Arg::OptText(text) => out.add(text),
                    Arg::Bytes(bytes) => out.add(bytes),
                    Arg::Time(time) => out.add(($time)(time)),
                }
                .map_err($crate::error::encode)?;
            }
            Ok(out)
        }

        /// A query on `text` with `args`.
        fn bound(
            text: &str,
            args: Vec<$crate::sql::Arg>,
        ) -> Result<::sqlx::query::Query<'_, $db, Arguments<'_>>, ::outbox_core::StoreError> {
            Ok(::sqlx::query_with(text, arguments(args)?))
        }
    };
}

/// The store type `$store` on the database `$db` with the dialect `$d`, and its constructors:
/// `new(pool, config)`, which checks `config` with `$check` (a
/// `fn(&StoreConfig) -> Result<(), StoreError>`) first, and `connect(config)`, which opens a
/// pool on the URL with connect options adjusted by `$options`; each with the documentation
/// given before it.
macro_rules! store {
    (
        $(#[$doc:meta])* $store:ident($db:ty, $d:expr),
        $(#[$new:meta])* new($check:expr),
        $(#[$connect:meta])* connect($what:literal, $options:expr) $(,)?
    ) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $store {
            inner: ::std::sync::Arc<$crate::shared::Base<$db>>,
        }

        impl $store {
            $(#[$new])*
            pub fn new(
                pool: ::sqlx::Pool<$db>,
                config: $crate::StoreConfig,
            ) -> Result<Self, ::outbox_core::StoreError> {
                let check: fn(&$crate::StoreConfig) -> Result<(), ::outbox_core::StoreError> =
                    $check;
                check(&config)?;
                let base = $crate::shared::Base::new(pool, config, &$d)?;
                Ok(Self {
                    inner: ::std::sync::Arc::new(base),
                })
            }

            $(#[$connect])*
            pub async fn connect(config: $crate::StoreConfig) -> Result<Self, ::outbox_core::StoreError> {
                type Options = <<$db as ::sqlx::Database>::Connection as ::sqlx::Connection>::Options;
                const DOING: &str = concat!("connecting to ", $what);
                let url = config.require_url(stringify!($store))?;
                let options: Options = url.parse().doing(DOING)?;
                let options = ($options)(options);
                let pool = $crate::shared::connect(&config, options, DOING).await?;
                Self::new(pool, config)
            }
        }
    };
}

/// The inherent methods of `$store` on the database `$db` with the schema `$schema`: its
/// accessors, the schema version and the dropping of its tables (each run to the end in a
/// task of its own, as [`detached`](crate::detached) explains), and the helpers of
/// [`operations!`].
macro_rules! accessors {
    ($store:ident, $db:ty, $schema:expr) => {
        impl $store {
            /// The schema version this release migrates the outbox tables to and expects; a
            /// database migrated by a newer release is refused with
            /// [`StoreErrorKind::Schema`](outbox_core::StoreErrorKind::Schema).
            pub const SCHEMA_VERSION: i32 = $schema.latest();

            /// The outbox's migrations as `sqlx` migrations numbered from `first_version`,
            /// for services that run every schema change through `sqlx`'s `Migrator`
            /// (instead of [`migrate`](Self::migrate)): see [`SqlxMigrations`]($crate::SqlxMigrations).
            pub fn sqlx_migrations(&self, first_version: i64) -> $crate::SqlxMigrations {
                $schema.sqlx_migrations(&self.inner.names, first_version)
            }

            /// The SQL that creates the outbox tables of `config` (`from` 0), or upgrades them
            /// from schema version `from`, to [`Self::SCHEMA_VERSION`]: the statements
            /// [`migrate`](Self::migrate) runs, for services whose schema changes go through
            /// another migration tool (Flyway, Liquibase, Alembic, golang-migrate, ...). Each
            /// step records its version, so the store finds nothing left to do. Fails for an
            /// invalid table name or a version newer than this release's.
            pub fn schema_script(
                config: &$crate::StoreConfig,
                from: i32,
            ) -> Result<String, ::outbox_core::StoreError> {
                let names = $crate::config::Names::new(&config.table, $schema.dialect.quoting)?
                    .with_channel(config.channel());
                $schema.script(&names, from, config.notify)
            }

            /// The pool, for the service's own queries and transactions.
            pub fn pool(&self) -> &::sqlx::Pool<$db> {
                &self.inner.pool
            }

            /// The configuration.
            pub fn config(&self) -> &$crate::StoreConfig {
                &self.inner.config
            }

            /// The same outbox, keeping published messages for `retention` (or deleting them
            /// at once with `None`).
            pub fn with_retention(&self, retention: Option<::std::time::Duration>) -> Self {
                Self {
                    inner: ::std::sync::Arc::new(self.inner.with_retention(retention)),
                }
            }

            /// The schema version of the outbox tables; 0 when they were never migrated.
            pub async fn schema_version(&self) -> Result<i32, ::outbox_core::StoreError> {
                const DOING: &str = "reading the outbox schema version";
                let store = self.clone();
                $crate::detached::detached(DOING, async move {
                    let inner = &*store.inner;
                    let exists = $schema.exists(&inner.names);
                    let found: i64 = ::sqlx::query_scalar_with(&exists.text, arguments(exists.args)?)
                        .fetch_one(&inner.pool)
                        .await
                        .doing(DOING)?;
                    if found == 0 {
                        return Ok(0);
                    }
                    let version: i64 = ::sqlx::query_scalar(&$schema.current(&inner.names))
                        .fetch_one(&inner.pool)
                        .await
                        .doing(DOING)?;
                    Ok(i32::try_from(version).unwrap_or(i32::MAX))
                })
                .await
            }

            /// Drops the outbox tables and everything in them. For tests and uninstalls.
            pub async fn drop_tables(&self) -> Result<(), ::outbox_core::StoreError> {
                const DOING: &str = "dropping the outbox tables";
                let store = self.clone();
                $crate::detached::detached(DOING, async move {
                    // Claims held open would keep the tables locked.
                    store.inner.held.roll_back_expired(true).await;
                    let script = $schema.drop(&store.inner.names);
                    $crate::sql::run_script(&store.inner.pool, &script)
                        .await
                        .doing(DOING)
                        .map(drop)
                })
                .await
            }

            /// Brings the tables to the latest version of the schema on a connection the
            /// caller has locked against other migrations (and, where DDL is transactional,
            /// in a transaction of its own).
            async fn apply_schema(
                &self,
                conn: &mut <$db as ::sqlx::Database>::Connection,
            ) -> Result<(), ::outbox_core::StoreError> {
                const DOING: &str = "migrating the outbox schema";
                let names = &self.inner.names;
                $crate::sql::run_script(&mut *conn, &$schema.create_versions(names))
                    .await
                    .doing(DOING)?;
                let current: i64 = ::sqlx::query_scalar(&$schema.current(names))
                    .fetch_one(&mut *conn)
                    .await
                    .doing(DOING)?;
                for step in $schema.steps(names, current)? {
                    $crate::sql::run_script(&mut *conn, &step)
                        .await
                        .doing(DOING)?;
                }
                Ok(())
            }

            /// Runs `statement` on `conn`; the rows it changed.
            async fn execute(
                &self,
                conn: &mut <$db as ::sqlx::Database>::Connection,
                statement: $crate::sql::Sql,
                doing: &str,
            ) -> Result<u64, ::outbox_core::StoreError> {
                Ok(bound(&statement.text, statement.args)?
                    .execute(&mut *conn)
                    .await
                    .doing(doing)?
                    .rows_affected())
            }

            /// Runs `statements` in one transaction.
            async fn transaction(
                &self,
                statements: Vec<$crate::sql::Sql>,
                doing: &str,
            ) -> Result<(), ::outbox_core::StoreError> {
                let begin = $schema.dialect.begin_write;
                let mut tx = $crate::sql::begin(&self.inner.pool, begin, doing).await?;
                for statement in statements {
                    self.execute(&mut tx, statement, doing).await?;
                }
                tx.commit().await.doing(doing)
            }

            /// Registers or renews `relay`, forgets the expired relays, and lists the live
            /// ones, on `conn`.
            async fn renew(
                &self,
                conn: &mut <$db as ::sqlx::Database>::Connection,
                relay: &::outbox_core::RelayId,
                ttl: ::std::time::Duration,
            ) -> Result<Vec<::outbox_core::RelayMember>, ::outbox_core::StoreError> {
                const DOING: &str = "renewing the relay's membership";
                let (d, names) = ($schema.dialect, &self.inner.names);
                self.execute(conn, $crate::sql::register(d, names, relay, ttl), DOING)
                    .await?;
                ::sqlx::query(&$crate::sql::forget_expired(d, names))
                    .execute(&mut *conn)
                    .await
                    .doing(DOING)?;
                let rows = ::sqlx::query(&$crate::sql::members(d, names))
                    .fetch_all(&mut *conn)
                    .await
                    .doing(DOING)?;
                DECODING.members(&rows)
            }

            /// The claim of the rows leased under `token` ([`Decoding::claimed`]); the rows
            /// whose id cannot be read are dead-lettered instead (after the claim's
            /// transaction, which may hold them).
            ///
            /// [`Decoding::claimed`]: crate::sql::Decoding::claimed
            async fn assemble(
                &self,
                token: ::outbox_core::LeaseToken,
                (parts, unreadable): (Vec<$crate::sql::RowParts>, Vec<(i64, String)>),
            ) -> Result<::outbox_core::Claim, ::outbox_core::StoreError> {
                self.bury(&unreadable).await?;
                Ok($crate::sql::assemble_claim(token, parts))
            }

            /// Dead-letters claimed rows whose id cannot be read (a column of SQLite holds any
            /// bytes, and a row may be written by hand): without an id the relay cannot
            /// address them, and left alone they would be leased again at every lease expiry.
            async fn bury(&self, rows: &[(i64, String)]) -> Result<(), ::outbox_core::StoreError> {
                const DOING: &str = "dead-lettering a row whose id cannot be read";
                for (seq, error) in rows {
                    ::tracing::error!(seq, %error, "dead-lettering an outbox row whose id cannot be read");
                    let statement =
                        $crate::sql::bury($schema.dialect, &self.inner.names, *seq, error);
                    bound(&statement.text, statement.args)?
                        .execute(&self.inner.pool)
                        .await
                        .doing(DOING)?;
                }
                Ok(())
            }
        }
    };
}

/// The items of an `impl Store` block that every dialect writes alike, for the dialect `$d`:
/// the pool size, relay membership and partitions, counts, and the operator's operations on
/// dead letters and retained messages. Rows are decoded by the dialect file's `DECODING`.
macro_rules! operations {
    ($d:expr) => {
        fn max_connections(&self) -> Option<usize> {
            Some(self.inner.pool.options().get_max_connections() as usize)
        }

        async fn heartbeat(
            &self,
            relay: &::outbox_core::RelayId,
            ttl: ::std::time::Duration,
        ) -> Result<Vec<::outbox_core::RelayMember>, ::outbox_core::StoreError> {
            const DOING: &str = "renewing the relay's membership";
            if !$d.heartbeat_in_transaction {
                let mut conn = self.inner.pool.acquire().await.doing(DOING)?;
                return self.renew(&mut conn, relay, ttl).await;
            }
            let mut tx = $crate::sql::begin(&self.inner.pool, $d.begin_write, DOING).await?;
            let members = self.renew(&mut tx, relay, ttl).await?;
            tx.commit().await.doing(DOING)?;
            Ok(members)
        }

        async fn members(
            &self,
        ) -> Result<Vec<::outbox_core::RelayMember>, ::outbox_core::StoreError> {
            let rows = ::sqlx::query(&$crate::sql::members(&$d, &self.inner.names))
                .fetch_all(&self.inner.pool)
                .await
                .doing("listing the live relays")?;
            DECODING.members(&rows)
        }

        // Locks the partition rows first, in partition order (see `sql::lock_partitions`).
        async fn acquire(
            &self,
            relay: &::outbox_core::RelayId,
            partitions: &[u16],
            ttl: ::std::time::Duration,
        ) -> Result<Vec<u16>, ::outbox_core::StoreError> {
            const DOING: &str = "acquiring partitions";
            let partitions = $crate::sql::partition_args(partitions);
            if partitions.is_empty() {
                return Ok(Vec::new());
            }
            let names = &self.inner.names;
            let mut tx = $crate::sql::begin(&self.inner.pool, $d.begin_write, DOING).await?;
            let lock = $crate::sql::lock_partitions(&$d, names, &partitions);
            let take = $crate::sql::acquire(&$d, names, relay, &partitions, ttl);
            for statement in lock.into_iter().chain([take]) {
                self.execute(&mut tx, statement, DOING).await?;
            }
            let owned = $crate::sql::owned(&$d, names, relay, &partitions);
            let rows = bound(&owned.text, owned.args)?
                .fetch_all(&mut *tx)
                .await
                .doing(DOING)?;
            tx.commit().await.doing(DOING)?;
            DECODING.partitions(&rows, DOING)
        }

        async fn release(
            &self,
            relay: &::outbox_core::RelayId,
            partitions: &[u16],
        ) -> Result<(), ::outbox_core::StoreError> {
            let partitions = $crate::sql::partition_args(partitions);
            if partitions.is_empty() {
                return Ok(());
            }
            let names = &self.inner.names;
            let lock = $crate::sql::lock_partitions(&$d, names, &partitions);
            let release = $crate::sql::release(&$d, names, relay, Some(&partitions));
            let statements = lock.into_iter().chain([release]).collect();
            self.transaction(statements, "releasing partitions").await
        }

        async fn leave(
            &self,
            relay: &::outbox_core::RelayId,
        ) -> Result<(), ::outbox_core::StoreError> {
            let names = &self.inner.names;
            let lock = $crate::sql::lock_owned(&$d, names, relay);
            let statements = lock
                .into_iter()
                .chain([
                    $crate::sql::release(&$d, names, relay, None),
                    $crate::sql::forget(&$d, names, relay),
                ])
                .collect();
            self.transaction(statements, "leaving the relay group")
                .await
        }

        async fn stats(&self) -> Result<::outbox_core::Stats, ::outbox_core::StoreError> {
            let row = ::sqlx::query(&$crate::sql::stats(&self.inner.names, &$d))
                .fetch_one(&self.inner.pool)
                .await
                .doing("counting outbox messages")?;
            DECODING.stats(&row)
        }

        async fn dead_letters(
            &self,
            filter: &::outbox_core::DeadLetterFilter,
        ) -> Result<Vec<::outbox_core::DeadLetter>, ::outbox_core::StoreError> {
            let inner = &*self.inner;
            let statement = $crate::sql::dead_letters(&$d, &inner.names, &inner.columns, filter);
            let rows = bound(&statement.text, statement.args)?
                .fetch_all(&inner.pool)
                .await
                .doing("listing dead letters")?;
            DECODING.dead_letters(&rows)
        }

        async fn replay(
            &self,
            filter: &::outbox_core::DeadLetterFilter,
        ) -> Result<u64, ::outbox_core::StoreError> {
            let statement = $crate::sql::replay(&$d, &self.inner.names, filter);
            bound(&statement.text, statement.args)?
                .execute(&self.inner.pool)
                .await
                .doing("replaying dead letters")
                .map(|done| done.rows_affected())
        }

        async fn purge(
            &self,
            filter: &::outbox_core::DeadLetterFilter,
        ) -> Result<u64, ::outbox_core::StoreError> {
            let statement = $crate::sql::purge(&$d, &self.inner.names, filter);
            bound(&statement.text, statement.args)?
                .execute(&self.inner.pool)
                .await
                .doing("purging dead letters")
                .map(|done| done.rows_affected())
        }

        async fn cleanup(&self, limit: usize) -> Result<u64, ::outbox_core::StoreError> {
            let Some(retention) = self.inner.config.retention else {
                return Ok(0);
            };
            let statement = $crate::sql::cleanup(&$d, &self.inner.names, retention, limit);
            bound(&statement.text, statement.args)?
                .execute(&self.inner.pool)
                .await
                .doing("deleting expired published messages")
                .map(|done| done.rows_affected())
        }
    };
}

/// `Store::claim` as one statement, the store's `claim_statement(&ClaimArgs)`, which leases
/// the rows and returns their [`message_columns`]: the method `$name` (`claim` in an
/// `impl Store` block).
#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite")),
    allow(unused_macros)
)]
macro_rules! claim_by_statement {
    ($name:ident) => {
        async fn $name(
            &self,
            relay: &::outbox_core::RelayId,
            limit: usize,
            lease: ::std::time::Duration,
        ) -> Result<::outbox_core::Claim, ::outbox_core::StoreError> {
            let token = ::outbox_core::LeaseToken::new();
            if limit == 0 {
                return Ok($crate::sql::assemble_claim(token, Vec::new()));
            }
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let args = $crate::sql::ClaimArgs {
                relay,
                token,
                limit,
                lease,
            };
            let statement = self.claim_statement(&args);
            let rows = bound(&statement.text, statement.args)?
                .fetch_all(&self.inner.pool)
                .await
                .doing("claiming outbox messages")?;
            self.assemble(token, DECODING.claimed(&rows)).await
        }
    };
}

/// `Store::settle` of a claim by lease as one transaction of the set-based statements of
/// [`settle_statements`](crate::sql::settle_statements), for the dialect `$d`: a method
/// `$name` of an `impl` block. (PostgreSQL settles over arrays instead.)
#[cfg_attr(not(any(feature = "mysql", feature = "sqlite")), allow(unused_macros))]
macro_rules! settle_by_statements {
    ($name:ident, $d:expr) => {
        async fn $name(
            &self,
            token: ::outbox_core::LeaseToken,
            settlement: &::outbox_core::Settlement,
        ) -> Result<::outbox_core::Settled, ::outbox_core::StoreError> {
            const DOING: &str = "recording publish outcomes";
            if settlement.is_empty() {
                return Ok(::outbox_core::Settled::default());
            }
            let inner = &*self.inner;
            let retain = inner.config.retention.is_some();
            let statements =
                $crate::sql::settle_statements(&$d, &inner.names, retain, token, settlement);
            let mut applied = 0;
            let mut tx = $crate::sql::begin(&inner.pool, $d.begin_write, DOING).await?;
            for statement in statements {
                applied += bound(&statement.text, statement.args)?
                    .execute(&mut *tx)
                    .await
                    .doing(DOING)?
                    .rows_affected();
            }
            tx.commit().await.doing(DOING)?;
            Ok($crate::sql::settled(settlement, applied))
        }
    };
}

#[cfg_attr(not(any(feature = "mysql", feature = "sqlite")), allow(unused_imports))]
#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite")),
    allow(unused_imports)
)]
pub(crate) use claim_by_statement;
#[cfg_attr(not(any(feature = "mysql", feature = "sqlite")), allow(unused_imports))]
pub(crate) use settle_by_statements;
pub(crate) use {accessors, binding, operations, store};
