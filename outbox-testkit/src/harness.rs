//! What a backend provides to run the suites against it.

use std::future::Future;
use std::time::Duration;

use outbox_core::{Headers, MessageId, NewMessage, Publisher, Store, StoreError};

/// A fresh, isolated outbox of the store under test (for example a table of its own), and the
/// means to write to it as a service would.
///
/// Each suite function takes a new harness and calls [`StoreHarness::teardown`] at its end.
pub trait StoreHarness: Send + Sync + 'static {
    /// The store under test.
    type Store: Store + Clone;

    /// A handle on the store; every call returns one on the same outbox.
    fn store(&self) -> Self::Store;

    /// Writes `messages` in one transaction that commits.
    fn enqueue(
        &self,
        messages: Vec<NewMessage>,
    ) -> impl Future<Output = Result<Vec<MessageId>, StoreError>> + Send;

    /// Writes `messages` in one transaction that rolls back.
    fn enqueue_rolled_back(
        &self,
        messages: Vec<NewMessage>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes `first` and `second` in two transactions that overlap: `first`'s transaction
    /// writes, then `second`'s writes and commits, then `first`'s commits. Returns false (the
    /// checks that need it are then skipped) when the store cannot hold two writing
    /// transactions open at once (SQLite).
    fn enqueue_overlapping(
        &self,
        first: Vec<NewMessage>,
        second: Vec<NewMessage>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = (first, second);
        async { Ok(false) }
    }

    /// A handle on the same outbox that keeps published messages for `retention`; `None` when
    /// the store cannot keep them (the retention tests are then skipped).
    fn with_retention(&self, retention: Duration) -> Option<Self::Store>;

    /// Damages the stored row of `id` so that it can no longer be decoded (for example invalid
    /// JSON in its headers column); returns false when the store cannot be damaged this way.
    fn corrupt(&self, id: MessageId) -> impl Future<Output = bool> + Send;

    /// Removes what the harness created.
    fn teardown(self) -> impl Future<Output = ()> + Send;
}

/// A message as a consumer read it back from the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The message id the publisher forwarded.
    pub id: MessageId,
    /// The key, if the broker carries one.
    pub key: Option<String>,
    /// The payload.
    pub payload: Vec<u8>,
    /// User headers as received (brokers may add their own; the suite checks those it sent).
    pub headers: Headers,
}

/// A publisher under test on a fresh destination, and a consumer reading that destination.
pub trait PublisherHarness: Send + Sync + 'static {
    /// The publisher under test; clones share one connection.
    type Publisher: Publisher + Clone;

    /// A handle on the publisher.
    fn publisher(&self) -> Self::Publisher;

    /// A destination of this harness alone, created if the broker needs that, which the
    /// publisher accepts and [`PublisherHarness::read`] reads.
    fn destination(&self) -> String;

    /// A destination the broker refuses for good (no such topic, exchange or stream), so
    /// publishing to it is a permanent failure; `None` when the broker accepts any destination.
    fn invalid_destination(&self) -> Option<String>;

    /// The largest payload the broker accepts on [`PublisherHarness::destination`], if it has
    /// a limit small enough to test (publishing more must fail permanently).
    fn max_payload(&self) -> Option<usize>;

    /// Reads the next `count` messages from [`PublisherHarness::destination`], waiting at most
    /// `timeout`; returns what arrived in arrival order (fewer on timeout). A later call goes on
    /// after what earlier calls returned.
    fn read(&self, count: usize, timeout: Duration) -> impl Future<Output = Vec<Received>> + Send;

    /// Removes what the harness created.
    fn teardown(self) -> impl Future<Output = ()> + Send;
}
