#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]
// Without a dialect feature there is no store, and the shared code has no user.
#![cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code, unused_imports)
)]

mod config;
mod detached;
mod enqueue;
mod error;
// SQLite claims by lease only.
#[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
mod held;
mod inbox;
mod migrations;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
mod shared;
// With some dialects left out, some shared helpers are unused.
#[cfg_attr(
    not(all(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use config::{ClaimMode, StoreConfig};
pub use inbox::DEFAULT_INBOX_TABLE;
pub use migrations::SqlxMigrations;
#[cfg(feature = "mysql")]
pub use mysql::{MySqlInbox, MySqlStore};
#[cfg(feature = "postgres")]
pub use postgres::{PostgresInbox, PostgresStore};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteInbox, SqliteStore};

/// The `sqlx` this crate is built on, so that pools and transactions handed to the stores come
/// from the same version.
pub use sqlx;

/// Refuses a database migrated by a newer release: this one would misread its rows.
pub(crate) fn check_version(found: i32, latest: i32) -> Result<(), outbox_core::StoreError> {
    if found > latest {
        return Err(outbox_core::StoreError::new(
            outbox_core::StoreErrorKind::Schema,
            format!(
                "the outbox schema is at version {found}, newer than the {latest} this \
                 release of outbox-sqlx knows: upgrade the library"
            ),
        ));
    }
    Ok(())
}
