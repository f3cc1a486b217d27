//! [`CdcError`]: what went wrong, whether trying again can help, and what the operator does.

use outbox_core::{StoreError, StoreErrorKind};
use pgwire_replication::PgWireError;

use crate::Lsn;

/// A failure of the log source or of its administration.
///
/// [`CdcError::is_transient`] tells a passing condition (a connection lost, a slot another
/// process still holds) from one that needs the operator (a configuration, a missing or lost
/// slot, a change the log relay refuses to guess about). `Display` shows the cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CdcError {
    /// A setting is invalid.
    #[error("invalid log source configuration: {field}: {reason}")]
    Config {
        /// The setting at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The database is not set up for logical replication, or the role may not use it.
    #[error("PostgreSQL is not ready for the log source: {0}")]
    NotReady(String),
    /// The replication slot does not exist. It is never created silently at start: the
    /// messages committed while it was missing would be skipped.
    #[error(
        "replication slot {slot:?} does not exist: create it with the setup step \
         (CdcAdmin::ensure); if it existed before, it was dropped, and messages committed \
         since then may be missing from the log: reconcile the outbox table first"
    )]
    SlotMissing {
        /// The slot's name.
        slot: String,
    },
    /// The replication slot was invalidated: the server removed WAL it still needed, so part
    /// of the log is gone.
    #[error(
        "replication slot {slot:?} is invalidated ({reason}): the WAL it needed was removed, \
         so messages may be missing from the log; reconcile the outbox table, then drop and \
         create the slot deliberately"
    )]
    SlotLost {
        /// The slot's name.
        slot: String,
        /// What the server says (`wal_status = lost`, or its error).
        reason: String,
    },
    /// Another session streams from the slot (another relay, or one not yet gone).
    #[error("replication slot {slot:?} is in use by another session: {reason}")]
    SlotInUse {
        /// The slot's name.
        slot: String,
        /// What the server says.
        reason: String,
    },
    /// The slot or the publication exists but is not what the log source needs.
    #[error("{0}")]
    Mismatch(String),
    /// A statement on the administration connection failed.
    #[error("PostgreSQL statement failed while {doing}: {source}")]
    Database {
        /// What was being done.
        doing: String,
        /// Whether trying again may help.
        transient: bool,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The replication connection failed or the server ended the stream.
    #[error("replication stream failed while {doing}: {source}")]
    Replication {
        /// What was being done.
        doing: String,
        /// Whether trying again may help.
        transient: bool,
        /// The replication client's error.
        #[source]
        source: PgWireError,
    },
    /// The stream ended without an error (the server shut down the walsender).
    #[error("the replication stream ended: connect again to resume from the slot")]
    Ended,
    /// A message of the stream could not be decoded (a truncated or unknown message, a value
    /// of an unexpected form).
    #[error("the replication stream cannot be decoded: {0}")]
    Decode(String),
    /// The log holds a change the log source refuses to interpret: an update, delete or
    /// truncate of the outbox table, or a change of a table that is not the outbox.
    #[error("the log source stops on a change it does not interpret: {0}")]
    Unsupported(String),
    /// [`PgLogSource::confirm`](crate::PgLogSource::confirm) named a transaction this source
    /// did not deliver.
    #[error("no delivered transaction ends at {0}: confirm the end_lsn of a LogBatch")]
    UnknownBatch(Lsn),
    /// An earlier error left the source in an unknown state: connect a new one, which
    /// resumes from the slot.
    #[error("the log source failed earlier and must be connected again: {0}")]
    Failed(String),
}

impl CdcError {
    /// True when the failure may pass: connect again (after a pause) and resume from the slot.
    pub fn is_transient(&self) -> bool {
        match self {
            CdcError::Database { transient, .. } | CdcError::Replication { transient, .. } => {
                *transient
            }
            CdcError::SlotInUse { .. } | CdcError::Ended => true,
            CdcError::Config { .. }
            | CdcError::NotReady(_)
            | CdcError::SlotMissing { .. }
            | CdcError::SlotLost { .. }
            | CdcError::Mismatch(_)
            | CdcError::Decode(_)
            | CdcError::Unsupported(_)
            | CdcError::UnknownBatch(_)
            | CdcError::Failed(_) => false,
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        CdcError::Config {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn database(doing: impl Into<String>, source: sqlx::Error) -> Self {
        CdcError::Database {
            doing: doing.into(),
            transient: sqlx_transient(&source),
            source,
        }
    }

    /// Maps an error of the replication client, recognising the server's answers about the
    /// slot (its SQLSTATE is only in the text).
    pub(crate) fn replication(doing: impl Into<String>, slot: &str, source: PgWireError) -> Self {
        if let PgWireError::Server(text) = &source {
            let code = sqlstate(text);
            let does_not_exist = text.contains("does not exist");
            if code == Some("42704") && does_not_exist && text.contains("replication slot") {
                return CdcError::SlotMissing {
                    slot: slot.to_owned(),
                };
            }
            // object_in_use: "replication slot ... is active for PID ..."
            if code == Some("55006") {
                return CdcError::SlotInUse {
                    slot: slot.to_owned(),
                    reason: text.clone(),
                };
            }
            // object_not_in_prerequisite_state: "can no longer get changes from replication
            // slot", "This slot has been invalidated ..."
            if code == Some("55000") && (text.contains("invalidated") || text.contains("no longer"))
            {
                return CdcError::SlotLost {
                    slot: slot.to_owned(),
                    reason: text.clone(),
                };
            }
        }
        let transient = match &source {
            PgWireError::Server(text) => sqlstate(text).is_some_and(transient_sqlstate),
            other => other.is_transient(),
        };
        CdcError::Replication {
            doing: doing.into(),
            transient,
            source,
        }
    }
}

/// The SQLSTATE at the end of a server error's text, as the replication client writes it:
/// `... (SQLSTATE 42704)`.
fn sqlstate(text: &str) -> Option<&str> {
    let start = text.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    let code = text.get(start..start + 5)?;
    code.bytes()
        .all(|b| b.is_ascii_alphanumeric())
        .then_some(code)
}

/// Server errors that pass: a shutdown, a connection problem, too many connections, a
/// statement timeout or a conflict with recovery.
fn transient_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "57P01" | "57P02" | "57P03" | "57014" | "40001" | "40P01"
    ) || code.starts_with("08")
        || code.starts_with("53")
}

fn sqlx_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| transient_sqlstate(&code)),
        _ => false,
    }
}

impl From<CdcError> for StoreError {
    /// For the relay's policy: connection failures wait and retry, configuration and setup
    /// problems stop it with the message.
    fn from(err: CdcError) -> Self {
        let (kind, doing) = match &err {
            CdcError::Config { .. } => (StoreErrorKind::Config, "configuring the log source"),
            CdcError::NotReady(_)
            | CdcError::SlotMissing { .. }
            | CdcError::SlotLost { .. }
            | CdcError::Mismatch(_) => (StoreErrorKind::Schema, "opening the replication slot"),
            CdcError::Decode(_) | CdcError::Unsupported(_) => {
                (StoreErrorKind::Decode, "decoding the log")
            }
            CdcError::Database { .. }
            | CdcError::Replication { .. }
            | CdcError::Ended
            | CdcError::SlotInUse { .. } => (StoreErrorKind::Connection, "reading the log"),
            CdcError::UnknownBatch(_) | CdcError::Failed(_) => {
                (StoreErrorKind::Database, "reading the log")
            }
        };
        let mapped = if err.is_transient() {
            StoreError::new(kind, doing).transient()
        } else if kind == StoreErrorKind::Connection {
            // A connection error is transient by default; this one is not.
            StoreError::new(StoreErrorKind::Database, doing)
        } else {
            StoreError::new(kind, doing)
        };
        mapped.with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_answers_about_the_slot_are_recognised() {
        let missing = CdcError::replication(
            "starting",
            "s",
            PgWireError::Server(
                "ERROR: replication slot \"s\" does not exist (SQLSTATE 42704)".into(),
            ),
        );
        assert!(matches!(&missing, CdcError::SlotMissing { slot } if slot == "s"));
        assert!(!missing.is_transient());
        let busy = CdcError::replication(
            "starting",
            "s",
            PgWireError::Server(
                "ERROR: replication slot \"s\" is active for PID 42 (SQLSTATE 55006)".into(),
            ),
        );
        assert!(matches!(busy, CdcError::SlotInUse { .. }) && busy.is_transient());
        let lost = CdcError::replication(
            "reading",
            "s",
            PgWireError::Server(
                "ERROR: can no longer get changes from replication slot \"s\" (SQLSTATE 55000)"
                    .into(),
            ),
        );
        assert!(matches!(lost, CdcError::SlotLost { .. }) && !lost.is_transient());
        let shutdown = CdcError::replication(
            "reading",
            "s",
            PgWireError::Server("FATAL: terminating connection (SQLSTATE 57P01)".into()),
        );
        assert!(matches!(shutdown, CdcError::Replication { .. }) && shutdown.is_transient());
        let io = CdcError::replication(
            "reading",
            "s",
            PgWireError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        );
        assert!(io.is_transient());
        assert!(io.to_string().contains("while reading"), "{io}");
    }

    #[test]
    fn sqlstates_are_read_from_the_end_of_the_text() {
        assert_eq!(sqlstate("x (SQLSTATE 42704)"), Some("42704"));
        assert_eq!(sqlstate("x (SQLSTATE 42"), None);
        assert_eq!(sqlstate("no code"), None);
    }

    #[test]
    fn store_errors_keep_the_retry_decision() {
        let store = StoreError::from(CdcError::Ended);
        assert!(store.is_transient());
        let store = StoreError::from(CdcError::SlotMissing { slot: "s".into() });
        assert!(!store.is_transient());
        assert_eq!(store.kind(), StoreErrorKind::Schema);
        assert!(store.to_string().contains("does not exist"), "{store}");
        let store = StoreError::from(CdcError::Replication {
            doing: "reading".into(),
            transient: false,
            source: PgWireError::Auth("password authentication failed".into()),
        });
        assert!(!store.is_transient());
    }
}
