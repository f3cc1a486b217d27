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
/// order. Opaque to the relay, which hands them back to [`LogSource::settle`].
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

/// One committed transaction's outbox messages, read from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogBatch {
    /// Where the transaction ends: what [`LogSource::settle`] confirms.
    pub position: LogPosition,
    /// Its messages, in the order it wrote them.
    pub messages: Vec<Message>,
    /// Its rows whose id reads but another column does not: dead-lettered by id.
    pub malformed: Vec<Malformed>,
}

impl LogBatch {
    /// A transaction's messages; for sources.
    pub fn new(position: LogPosition, messages: Vec<Message>, malformed: Vec<Malformed>) -> Self {
        Self {
            position,
            messages,
            malformed,
        }
    }

    /// Number of rows: messages and malformed ones.
    pub fn len(&self) -> usize {
        self.messages.len() + self.malformed.len()
    }

    /// True for a transaction without rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the outbox table holds of some messages read from the log: those it publishes itself
/// (the polling relay), so that the log relay must not, and the keys whose later messages
/// must follow them there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Waiting {
    /// Messages asked about that the table already holds as its own: handed over earlier
    /// (a retry, a message delivered again after a restart), or written to become available
    /// later.
    pub ids: HashSet<MessageId>,
    /// Keys asked about with a message the table holds as its own and has not published.
    pub keys: HashSet<String>,
}

/// Committed outbox messages read from a database's log, in commit order, with the outbox
/// table beside it for what the log relay cannot publish itself.
///
/// # Contract
///
/// - [`next`](LogSource::next) returns the next committed transaction with outbox rows, in
///   commit order, decoded from the log (never by reading the row again); it waits while
///   there is none. It is cancel-safe. A transaction delivered and not confirmed is delivered
///   again after a restart (at least once). A transient error (a lost connection) may be
///   followed by more calls, which resume from the last confirmed position; an error that is
///   not transient (a slot that was lost, a table that is gone) stops the relay.
/// - [`waiting`](LogSource::waiting) says which of some messages and keys the table holds as
///   its own. A message written to the table to become available later, or handed over by
///   [`settle`](LogSource::settle), is the table's: the polling relay publishes it, with its
///   retries, and the later messages of its key follow it there.
/// - [`settle`](LogSource::settle) applies the outcomes in one transaction, only to rows
///   that are still the log relay's (pending, never handed over), so that applying them twice
///   changes nothing more: `published` rows are deleted (or kept for the retention),
///   `retry` rows get their attempt and are handed to the table, available after their
///   delay, `dead` rows are dead-lettered, `release` rows are handed to the table as they
///   are, available at once. Only after that transaction commits are the positions in
///   `confirm` confirmed: the source's log may then drop those transactions.
/// - The relay bounds `waiting` and `settle` with its store timeout and may drop them: a
///   dropped call must leave nothing behind but what a completed or failed one could have.
pub trait LogSource: Send + 'static {
    /// The next committed transaction with outbox rows (cancel-safe).
    fn next(&mut self) -> impl Future<Output = Result<LogBatch, StoreError>> + Send;

    /// Which of `ids` and `keys` the outbox table holds as its own.
    fn waiting(
        &mut self,
        ids: &[MessageId],
        keys: &[String],
    ) -> impl Future<Output = Result<Waiting, StoreError>> + Send;

    /// Applies `settlement` to the rows still the log relay's, then confirms every position
    /// of `confirm`.
    fn settle(
        &mut self,
        settlement: &Settlement,
        confirm: &[LogPosition],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reports the confirmed position and ends the session; called once, when the relay
    /// stops. Sources without a session keep the default.
    fn close(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }
}
