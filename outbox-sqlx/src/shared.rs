//! What every SQL store has whatever its dialect, written once: macros that a dialect file
//! invokes with its own types and [`Dialect`](crate::sql::Dialect). A store is a struct with
//! an `inner: Arc<Base<DB>>` field; the dialect file defines `bound(text, args)`, which binds a
//! statement's arguments in its database's types.

use std::time::Duration;

use outbox_core::StoreError;

use crate::config::Names;
use crate::sql::{Dialect, message_columns};

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

/// The accessors of `$store`, whose pool is a `$pool` and whose schema is `$schema`.
macro_rules! accessors {
    ($store:ident, $pool:ty, $schema:expr) => {
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

            /// The pool, for the service's own queries and transactions.
            pub fn pool(&self) -> &$pool {
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
        }
    };
}

/// The operator's operations of the `Store` implementation (replay, purge, cleanup) and the
/// pool size, for the dialect `$d`: items of an `impl Store` block.
macro_rules! operations {
    ($d:expr) => {
        fn max_connections(&self) -> Option<usize> {
            Some(self.inner.pool.options().get_max_connections() as usize)
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

/// `Store::settle` as one transaction (begun with `$begin`) of the set-based statements of
/// [`settle_statements`](crate::sql::settle_statements), for the dialect `$d`: an item of an
/// `impl Store` block. (PostgreSQL settles over arrays instead.)
macro_rules! settle_by_statements {
    ($d:expr, $begin:expr) => {
        async fn settle(
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
            let mut tx = $crate::sql::begin(&inner.pool, $begin, DOING).await?;
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

/// `$store::apply_schema(&self, &mut $conn)`: brings the tables to `$schema`'s latest version
/// on a connection the caller has locked against other migrations (and, where DDL is
/// transactional, in a transaction of its own).
macro_rules! apply_schema {
    ($store:ident, $conn:ty, $schema:expr) => {
        impl $store {
            async fn apply_schema(
                &self,
                conn: &mut $conn,
            ) -> Result<(), ::outbox_core::StoreError> {
                use $crate::error::Context as _;
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
        }
    };
}

pub(crate) use {accessors, apply_schema, operations, settle_by_statements};
