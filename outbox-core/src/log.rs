//! The [`LogSource`] trait: the outbox read from a database's log (change data capture), as
//! the [`LogRelay`](crate::LogRelay) sees it.
//!
//! A log source is mechanism only, as a [`Store`](crate::Store) is: it hands out committed
//! transactions' messages in commit order and persists the outcomes the relay decides. The
//! relay's policy (calls per key, retries, dead letters, outages, shutdown) is the polling
//! relay's, shared with it.

use std::collections::HashSet;
use std::future::Future;

use crate::{Malformed, Message, MessageId, Settlement, StoreError};

/// Where a transaction ends in the log, as its source counts: positions grow in commit
/// order. Opaque to the relay, which hands them back to [`LogSource::confirm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPosition(u64);

impl LogPosition {
    /// Wraps a source's position (for example a PostgreSQL LSN).
    pub const fn new(position: u64) -> Self {
        Self(position)
    }

    /// The source's position.
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// A row written to become available later (its `available_at` past its `created_at`): the
/// table's to publish when it is due, and the later messages of its key follow it there.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Deferred {
    /// The row's message id.
    pub id: MessageId,
    /// Its ordering key.
    pub key: Option<String>,
}

impl Deferred {
    /// A deferred row; for sources.
    pub fn new(id: MessageId, key: Option<String>) -> Self {
        Self { id, key }
    }
}

/// One committed transaction's outbox messages, read from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogBatch {
    /// Where the transaction ends: what [`LogSource::confirm`] confirms.
    pub position: LogPosition,
    /// Its messages, in the order it wrote them.
    pub messages: Vec<Message>,
    /// Its rows whose id reads but another column does not: dead-lettered by id.
    pub malformed: Vec<Malformed>,
    /// Its rows written to become available later, left to the table.
    pub deferred: Vec<Deferred>,
    /// The rows to insert for its messages (and malformed ones) that were written without a
    /// row (a table-less writer), should they not be published: a retry, a dead letter, a
    /// message handed over with its key. Empty for messages that have a row.
    pub rowless: Vec<Message>,
}

impl LogBatch {
    /// A transaction's messages and malformed rows; for sources.
    pub fn new(position: LogPosition, messages: Vec<Message>, malformed: Vec<Malformed>) -> Self {
        Self {
            position,
            messages,
            malformed,
            deferred: Vec::new(),
            rowless: Vec::new(),
        }
    }

    /// Sets [`LogBatch::deferred`].
    pub fn deferred(mut self, deferred: Vec<Deferred>) -> Self {
        self.deferred = deferred;
        self
    }

    /// Sets [`LogBatch::rowless`].
    pub fn rowless(mut self, rowless: Vec<Message>) -> Self {
        self.rowless = rowless;
        self
    }

    /// Number of rows: messages, malformed and deferred ones.
    pub fn len(&self) -> usize {
        self.messages.len() + self.malformed.len() + self.deferred.len()
    }

    /// True for a transaction without rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The outbox table beside a log: what the log relay hands over to it, and which keys it holds
/// messages of. Cheap to clone: the log relay records each batch's outcomes in a task of its
/// own while it reads and publishes the next.
///
/// # Contract
///
/// - [`waiting`](LogTable::waiting) says which keys have a message the table holds as its
///   own: pending rows handed over (or written to become available later, or replayed),
///   which the polling relay publishes. The later messages of those keys follow them there.
/// - [`record`](LogTable::record) applies a settlement in one transaction, only to rows
///   that are still the log relay's (pending, never handed over), so that recording it twice
///   changes nothing more: `published` rows are deleted (or kept for the retention), `retry`
///   rows get their attempt and are handed to the table, available after their delay, `dead`
///   rows are dead-lettered, `release` rows are handed to the table as they are. `unrecorded`
///   are the rows to insert, with their outcome, for messages that have none (see
///   [`LogBatch::rowless`]); a row of the same id that exists already is left as it is.
///   `handed` lists the retried and released messages in the order of the log: the rows
///   handed over by this call take the table's order in that order (PostgreSQL: new `seq`
///   values), so that the polling relay publishes a key's messages in commit order.
/// - The relay bounds both with its store timeout and may drop them: a dropped call must
///   leave nothing behind but what a completed or failed one could have.
pub trait LogTable: Clone + Send + Sync + 'static {
    /// Of `keys` (every key when `None`), those with a message the table holds as its own.
    fn waiting(
        &self,
        keys: Option<&[String]>,
    ) -> impl Future<Output = Result<HashSet<String>, StoreError>> + Send;

    /// Applies `settlement` to the rows still the log relay's, inserts the rows of
    /// `unrecorded` that were not published, and orders what it handed over as `handed` says.
    fn record(
        &self,
        settlement: &Settlement,
        unrecorded: &[Message],
        handed: &[MessageId],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Committed outbox messages read from a database's log, in commit order, with the outbox
/// table beside it ([`LogTable`]) for what the log relay cannot publish itself.
///
/// # Contract
///
/// - [`next`](LogSource::next) returns the next committed transaction with outbox rows, in
///   commit order, decoded from the log (never by reading the row again); it waits while
///   there is none. It is cancel-safe. A transaction delivered and not confirmed is delivered
///   again after a restart (at least once). A transient error (a lost connection) may be
///   followed by more calls, which resume from the last confirmed position; an error that is
///   not transient (a slot that was lost, a table that is gone) stops the relay.
/// - [`confirm`](LogSource::confirm) is called once the outcomes of every message of the
///   transactions ending at `positions` are recorded in the table: the source's log may then
///   drop them. Positions may come out of commit order; a source confirms a position only
///   once every earlier transaction is confirmed too. A position delivered by a session
///   that was lost since is ignored (the new session delivers it again).
pub trait LogSource: Send + 'static {
    /// The table beside the log.
    type Table: LogTable;

    /// The table beside the log.
    fn table(&self) -> Self::Table;

    /// The next committed transaction with outbox rows (cancel-safe).
    fn next(&mut self) -> impl Future<Output = Result<LogBatch, StoreError>> + Send;

    /// The transactions ending at `positions` are recorded.
    fn confirm(&mut self, positions: &[LogPosition]) -> Result<(), StoreError>;

    /// Reports the confirmed position and ends the session: when the relay stops, and while
    /// the table cannot be written (a database that shuts down waits for the end of its
    /// replication sessions). A later [`next`](LogSource::next) opens a new session, which
    /// resumes from the confirmed position. Sources without a session keep the default.
    fn close(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }
}
