//! The [`Publisher`] trait: one broker, as the relay sees it.

use std::future::Future;

use crate::{Message, PublishError};

/// The outcome of publishing one message.
#[derive(Debug)]
#[non_exhaustive]
pub enum PublishOutcome {
    /// The broker confirmed the message (acks=all, publisher confirm, JetStream ack, ...).
    Published,
    /// The message was not confirmed.
    Failed(PublishError),
}

impl PublishOutcome {
    /// True for [`PublishOutcome::Published`].
    pub fn is_published(&self) -> bool {
        matches!(self, PublishOutcome::Published)
    }
}

/// What a publisher promises beyond the trait's contract.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Messages of one key given in one [`Publisher::publish`] call reach the broker in call
    /// order, and once one of them fails no later one of that key in the call is published.
    /// When false, the relay never puts two messages of one key in the same call.
    ///
    /// A publisher whose broker answers for each message only after the later ones were sent
    /// can keep the second half only for failures it sees before sending; it may still offer
    /// this as an option that its documentation says relaxes first-delivery order (the Kafka
    /// and NATS publishers' `pipeline_keys`), never by default.
    pub ordered_per_key: bool,
}

impl Capabilities {
    /// Sets [`Capabilities::ordered_per_key`].
    pub fn ordered_per_key(mut self, ordered: bool) -> Self {
        self.ordered_per_key = ordered;
        self
    }
}

/// A broker.
///
/// # Contract
///
/// Every implementation must pass the `outbox-testkit` publisher suite. In short:
///
/// - [`publish`](Publisher::publish) returns exactly one outcome per message, in the order of
///   `batch`; an outcome is [`PublishOutcome::Published`] only once the broker confirmed it.
/// - A publisher never decides to retry or to dead-letter: it classifies each failure as
///   transient or permanent and the relay decides. It may pipeline within a call.
/// - `Err` means the whole call failed (for example the broker is unreachable): every message
///   counts as failed with that error.
/// - Every message is published with its id (as [`crate::MESSAGE_ID_HEADER`] or the broker's
///   own id field), its key and its headers.
/// - The relay bounds each call with its publish timeout and may drop the future: a publisher
///   must stay usable afterwards.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `batch` and reports one outcome per message.
    fn publish(
        &self,
        batch: &[Message],
    ) -> impl Future<Output = Result<Vec<PublishOutcome>, PublishError>> + Send;

    /// What this publisher promises; none by default.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Checks that the broker is reachable, for readiness probes and `check` commands.
    fn check(&self) -> impl Future<Output = Result<(), PublishError>> + Send {
        async { Ok(()) }
    }

    /// Waits until everything handed to the broker is confirmed or failed; called on shutdown.
    fn flush(&self) -> impl Future<Output = Result<(), PublishError>> + Send {
        async { Ok(()) }
    }
}
