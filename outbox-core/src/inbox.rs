//! [`Inbox`]: the consumer's half of the guarantee. The relay publishes each message at least
//! once; an inbox makes its effect happen once, by recording the message id in the same
//! transaction as the effect.
//!
//! See [`Incoming`](crate::Incoming) for the acknowledgement discipline: receive, record and
//! apply in one transaction, commit, then acknowledge.

use std::future::Future;
use std::time::Duration;

use crate::{MessageId, StoreError, StoreErrorKind};

/// The longest consumer name an inbox takes, in bytes.
pub const MAX_CONSUMER_NAME: usize = 255;

/// Records which messages each consumer has received, in the consumer's own transaction `Tx`
/// (for example `&mut sqlx::PgConnection`), so that a message's effect and the record of it
/// commit together or not at all.
///
/// Implementations must hold to the contract the inbox suite of `outbox-testkit` checks:
///
/// - [`record`](Inbox::record) returns `true` the first time a `(consumer, id)` pair is
///   recorded in a transaction that commits, and `false` every time after that commit.
/// - A record in a transaction that rolls back is forgotten: the next delivery is new again.
/// - Two transactions that record the same pair at once: the second waits for the first; it
///   sees a duplicate if the first commits, and records the pair if the first rolls back.
///   Exactly one of two committed transactions sees `true`.
/// - Consumers are independent: each sees each message once.
/// - [`purge`](Inbox::purge) deletes records older than its argument, at most `limit` at a
///   time, oldest first.
pub trait Inbox<Tx>: Send + Sync {
    /// Records in `tx` that `consumer` received the message `id`; `true` when it is new (apply
    /// its effect in `tx`, then commit), `false` for a duplicate (skip the effect, commit or
    /// roll back, and acknowledge the message).
    fn record(
        &self,
        tx: Tx,
        consumer: &str,
        id: MessageId,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes at most `limit` records older than `older_than` (by the database's clock),
    /// oldest first; returns how many. A redelivery of a message whose record is gone counts
    /// as new: keep records longer than the broker can redeliver.
    fn purge(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// What processing a received message came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Processed<T> {
    /// The message was new: its effect was applied, with this result.
    Applied(T),
    /// The message had been processed before: its effect was not applied again.
    Duplicate,
}

impl<T> Processed<T> {
    /// Whether the effect was applied this time.
    pub fn is_applied(&self) -> bool {
        matches!(self, Self::Applied(_))
    }
}

/// Checks a consumer name: not empty, at most [`MAX_CONSUMER_NAME`] bytes, no control
/// characters.
///
/// ```
/// assert!(outbox_core::check_consumer("billing").is_ok());
/// assert!(outbox_core::check_consumer("").is_err());
/// assert!(outbox_core::check_consumer(&"x".repeat(256)).is_err());
/// ```
pub fn check_consumer(consumer: &str) -> Result<(), StoreError> {
    let problem = if consumer.is_empty() {
        Some("it is empty".to_owned())
    } else if consumer.len() > MAX_CONSUMER_NAME {
        Some(format!(
            "it is {} bytes long, more than {MAX_CONSUMER_NAME}",
            consumer.len()
        ))
    } else if consumer.chars().any(char::is_control) {
        Some("it has control characters".to_owned())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(StoreError::new(
            StoreErrorKind::Config,
            format!(
                "invalid inbox consumer name {:?}: {problem}",
                consumer.chars().take(64).collect::<String>()
            ),
        )),
        None => Ok(()),
    }
}
