//! From `sqlx` errors to [`StoreError`]s that say what failed and whether trying again helps.
//!
//! The relay retries transient errors for ever and stops on [`StoreErrorKind::Schema`] and
//! [`StoreErrorKind::Config`], so the classification decides between "wait and retry" and
//! "tell the operator to run the migrations".

use outbox_core::{StoreError, StoreErrorKind};
use sqlx::error::DatabaseError;

/// Maps `err`, raised while `doing` something, to a [`StoreError`].
pub(crate) fn from_sqlx(err: sqlx::Error, doing: &str) -> StoreError {
    let (kind, transient) = classify(&err);
    let mut mapped = StoreError::new(kind, doing);
    if transient {
        mapped = mapped.transient();
    }
    mapped.with_source(err)
}

/// A value that could not be encoded for the database.
pub(crate) fn encode(err: sqlx::error::BoxDynError) -> StoreError {
    from_sqlx(sqlx::Error::Encode(err), "encoding a statement argument")
}

/// Shorthand for `.map_err(|err| from_sqlx(err, doing))`.
pub(crate) trait Context<T> {
    fn doing(self, doing: &str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn doing(self, doing: &str) -> Result<T, StoreError> {
        self.map_err(|err| from_sqlx(err, doing))
    }
}

fn classify(err: &sqlx::Error) -> (StoreErrorKind, bool) {
    use StoreErrorKind::{Config, Connection, Database, Decode, Schema};
    match err {
        sqlx::Error::Database(db) => classify_database(db.as_ref()),
        // The connection broke, or none could be had: the relay waits and tries again.
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => (Connection, true),
        sqlx::Error::Configuration(_) => (Config, false),
        sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => (Schema, false),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => (Decode, false),
        _ => (Database, false),
    }
}

/// What kind of database error, and whether it is transient.
fn classify_database(db: &dyn DatabaseError) -> (StoreErrorKind, bool) {
    #[cfg(feature = "postgres")]
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return classify_sqlstate(pg.code());
    }
    #[cfg(feature = "mysql")]
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return classify_mysql(my.number(), my.code().unwrap_or_default());
    }
    #[cfg(feature = "sqlite")]
    if let Some(lite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
        let code = lite.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
        return classify_sqlite(code, lite.message());
    }
    classify_sqlstate(db.code().as_deref().unwrap_or_default())
}

/// PostgreSQL SQLSTATE codes (also the fallback for MySQL's).
fn classify_sqlstate(code: &str) -> (StoreErrorKind, bool) {
    use StoreErrorKind::{Connection, Database, Schema};
    match code {
        // serialization_failure, deadlock_detected, lock_not_available, query_canceled
        // (statement_timeout), read_only_sql_transaction (a failover in progress)
        "40001" | "40P01" | "55P03" | "57014" | "25006" => (Database, true),
        // undefined_table, undefined_column, undefined_object, invalid_schema_name,
        // undefined_function (the claim function of a schema not migrated to version 3)
        "42P01" | "42703" | "42704" | "3F000" | "42883" | "42S02" | "42S22" => (Schema, false),
        // admin_shutdown (pg_terminate_backend), crash_shutdown, cannot_connect_now, and
        // idle_in_transaction_session_timeout (a held claim that outlived its lease)
        "57P01" | "57P02" | "57P03" | "25P03" => (Connection, true),
        // connection_exception, insufficient_resources (too_many_connections, ...)
        _ if code.starts_with("08") || code.starts_with("53") => (Connection, true),
        _ => (Database, false),
    }
}

/// MySQL and MariaDB error numbers.
#[cfg_attr(not(feature = "mysql"), allow(dead_code))]
fn classify_mysql(number: u16, sqlstate: &str) -> (StoreErrorKind, bool) {
    use StoreErrorKind::{Connection, Database, Schema};
    match number {
        // ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT, ER_LOCK_NOWAIT, ER_QUERY_INTERRUPTED,
        // ER_QUERY_TIMEOUT, ER_STATEMENT_TIMEOUT (MariaDB), ER_OPTION_PREVENTS_STATEMENT
        // (read-only during a failover)
        1213 | 1205 | 3572 | 1317 | 3024 | 1969 | 1290 => (Database, true),
        // ER_NO_SUCH_TABLE, ER_BAD_FIELD_ERROR, ER_BAD_DB_ERROR
        1146 | 1054 | 1049 => (Schema, false),
        // ER_CON_COUNT_ERROR, ER_SERVER_SHUTDOWN, ER_ABORTING_CONNECTION,
        // ER_NEW_ABORTING_CONNECTION, ER_CONNECTION_KILLED (MariaDB), CR_SERVER_GONE_ERROR,
        // CR_SERVER_LOST, ER_CLIENT_INTERACTION_TIMEOUT
        1040 | 1053 | 1152 | 1184 | 1927 | 2006 | 2013 | 4031 => (Connection, true),
        _ => classify_sqlstate(sqlstate),
    }
}

/// SQLite extended result codes.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
fn classify_sqlite(code: i32, message: &str) -> (StoreErrorKind, bool) {
    use StoreErrorKind::{Connection, Database, Schema};
    const SQLITE_ERROR: i32 = 1;
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_LOCKED: i32 = 6;
    const SQLITE_CANTOPEN: i32 = 14;
    match code & 0xff {
        // Another connection holds the lock past the busy timeout.
        SQLITE_BUSY | SQLITE_LOCKED => (Database, true),
        SQLITE_CANTOPEN => (Connection, true),
        SQLITE_ERROR
            if message.starts_with("no such table") || message.starts_with("no such column") =>
        {
            (Schema, false)
        }
        _ => (Database, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StoreErrorKind::{Config, Connection, Database, Schema};

    #[test]
    fn sqlstates_are_classified() {
        assert_eq!(classify_sqlstate("40P01"), (Database, true));
        assert_eq!(classify_sqlstate("40001"), (Database, true));
        assert_eq!(classify_sqlstate("42P01"), (Schema, false));
        assert_eq!(classify_sqlstate("42883"), (Schema, false));
        assert_eq!(classify_sqlstate("57P01"), (Connection, true));
        assert_eq!(classify_sqlstate("25P03"), (Connection, true));
        assert_eq!(classify_sqlstate("08006"), (Connection, true));
        assert_eq!(classify_sqlstate("23505"), (Database, false));
    }

    #[test]
    fn mysql_numbers_are_classified() {
        assert_eq!(classify_mysql(1213, "40001"), (Database, true));
        assert_eq!(classify_mysql(1205, "HY000"), (Database, true));
        assert_eq!(classify_mysql(1146, "42S02"), (Schema, false));
        assert_eq!(classify_mysql(1927, "70100"), (Connection, true));
        assert_eq!(classify_mysql(1062, "23000"), (Database, false));
        assert_eq!(classify_mysql(9999, "08S01"), (Connection, true));
    }

    #[test]
    fn sqlite_codes_are_classified() {
        assert_eq!(classify_sqlite(5, "database is locked"), (Database, true));
        assert_eq!(classify_sqlite(517, "database is locked"), (Database, true));
        assert_eq!(classify_sqlite(1, "no such table: outbox"), (Schema, false));
        assert_eq!(
            classify_sqlite(19, "UNIQUE constraint failed"),
            (Database, false)
        );
    }

    #[test]
    fn client_side_errors_are_classified() {
        let io = from_sqlx(
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            "claiming",
        );
        assert_eq!(io.kind(), Connection);
        assert!(io.is_transient());
        assert_eq!(io.message(), "claiming");
        let timeout = from_sqlx(sqlx::Error::PoolTimedOut, "settling");
        assert!(timeout.is_transient());
        let config = from_sqlx(sqlx::Error::Configuration("bad url".into()), "connecting");
        assert_eq!((config.kind(), config.is_transient()), (Config, false));
    }
}
