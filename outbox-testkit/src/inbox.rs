//! The inbox suite: the [`Inbox`](outbox_core::Inbox) contract, checked on the inbox under
//! test through an [`InboxHarness`]. Expand it with [`crate::inbox_suite!`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{MessageId, StoreError, StoreErrorKind};

/// A fresh, isolated inbox of the backend under test (a table of its own), and the consumer's
/// transactions on its database.
///
/// Each suite function takes a new harness and calls [`InboxHarness::teardown`] at its end.
pub trait InboxHarness: Send + Sync + 'static {
    /// An open transaction of the consumer.
    type Tx: Send;

    /// Begins a transaction (waiting, where the database has one writer, for the others).
    fn begin(&self) -> impl Future<Output = Self::Tx> + Send;

    /// Calls [`Inbox::record`](outbox_core::Inbox::record) in `tx`.
    fn record<'a>(
        &'a self,
        tx: &'a mut Self::Tx,
        consumer: &'a str,
        id: MessageId,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send + 'a;

    /// Commits `tx`.
    fn commit(&self, tx: Self::Tx) -> impl Future<Output = ()> + Send;

    /// Rolls `tx` back.
    fn rollback(&self, tx: Self::Tx) -> impl Future<Output = ()> + Send;

    /// Calls [`Inbox::purge`](outbox_core::Inbox::purge).
    fn purge(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Removes what the harness created.
    fn teardown(self) -> impl Future<Output = ()> + Send;
}

/// Records `id` for `consumer` in a transaction of its own that commits.
async fn record_committed<H: InboxHarness>(h: &H, consumer: &str, id: MessageId) -> bool {
    let mut tx = h.begin().await;
    let new = h.record(&mut tx, consumer, id).await.expect("record");
    h.commit(tx).await;
    new
}

/// A message is new once, then a duplicate on every later delivery.
pub async fn a_message_is_new_once<H: InboxHarness>(h: H) {
    let id = MessageId::new();
    assert!(record_committed(&h, "billing", id).await, "first delivery");
    for delivery in 2..5 {
        assert!(
            !record_committed(&h, "billing", id).await,
            "delivery {delivery} is a duplicate"
        );
    }
    assert!(
        record_committed(&h, "billing", MessageId::new()).await,
        "another message is new"
    );
    h.teardown().await;
}

/// A record in a transaction that rolls back is forgotten with it: the next delivery is new.
pub async fn rolled_back_records_are_forgotten<H: InboxHarness>(h: H) {
    let id = MessageId::new();
    let mut tx = h.begin().await;
    assert!(h.record(&mut tx, "billing", id).await.expect("record"));
    h.rollback(tx).await;
    assert!(
        record_committed(&h, "billing", id).await,
        "the rolled-back record does not count"
    );
    h.teardown().await;
}

/// Each consumer sees each message once, whatever the others did.
pub async fn consumers_are_independent<H: InboxHarness>(h: H) {
    let id = MessageId::new();
    assert!(record_committed(&h, "billing", id).await);
    assert!(record_committed(&h, "shipping", id).await);
    assert!(!record_committed(&h, "billing", id).await);
    assert!(!record_committed(&h, "shipping", id).await);
    h.teardown().await;
}

/// Deliveries of one message to several consumer instances at once: exactly one applies it.
pub async fn concurrent_deliveries_are_new_exactly_once<H: InboxHarness>(h: H) {
    let h = Arc::new(h);
    for _ in 0..5 {
        let id = MessageId::new();
        let deliveries: Vec<_> = (0..6)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move {
                    let mut tx = h.begin().await;
                    let new = h.record(&mut tx, "billing", id).await.expect("record");
                    // Hold the transaction open a moment, as the effect would.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    h.commit(tx).await;
                    new
                })
            })
            .collect();
        let mut new = 0;
        for delivery in deliveries {
            new += usize::from(delivery.await.expect("delivery task"));
        }
        assert_eq!(new, 1, "exactly one delivery of {id} is new");
    }
    teardown_shared(h).await;
}

/// A delivery recording a message while another transaction holds its record waits for that
/// transaction, and records the message when it rolls back.
pub async fn a_waiting_delivery_records_after_a_rollback<H: InboxHarness>(h: H) {
    let h = Arc::new(h);
    let id = MessageId::new();
    let mut first = h.begin().await;
    assert!(h.record(&mut first, "billing", id).await.expect("record"));
    let second = {
        let h = h.clone();
        tokio::spawn(async move {
            let mut tx = h.begin().await;
            let new = h.record(&mut tx, "billing", id).await.expect("record");
            h.commit(tx).await;
            new
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "the second delivery waits for the first"
    );
    h.rollback(first).await;
    assert!(
        second.await.expect("second delivery"),
        "the first rolled back: the second is new"
    );
    assert!(!record_committed(&*h, "billing", id).await);
    teardown_shared(h).await;
}

/// The purge deletes records older than its window, oldest first and at most its limit at a
/// time; a purged message counts as new again, a kept one as a duplicate.
pub async fn purges_delete_old_records_in_bounded_batches<H: InboxHarness>(h: H) {
    let old: Vec<MessageId> = (0..5).map(|_| MessageId::new()).collect();
    for id in &old {
        assert!(record_committed(&h, "billing", *id).await);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let fresh = MessageId::new();
    assert!(record_committed(&h, "billing", fresh).await);
    let window = Duration::from_millis(300);
    let mut batches = Vec::new();
    loop {
        let purged = h.purge(window, 2).await.expect("purge");
        batches.push(purged);
        if purged == 0 {
            break;
        }
        assert!(batches.len() < 10, "the purge ends: {batches:?}");
    }
    assert_eq!(
        batches,
        vec![2, 2, 1, 0],
        "bounded batches of the old records"
    );
    assert!(!record_committed(&h, "billing", fresh).await, "kept");
    assert!(record_committed(&h, "billing", old[0]).await, "purged");
    h.teardown().await;
}

/// Consumer names that cannot be stored are refused, and nothing is recorded.
pub async fn invalid_consumer_names_are_refused<H: InboxHarness>(h: H) {
    let id = MessageId::new();
    let too_long = "c".repeat(outbox_core::MAX_CONSUMER_NAME + 1);
    for consumer in ["", too_long.as_str(), "bill\ning"] {
        let mut tx = h.begin().await;
        let refused = h.record(&mut tx, consumer, id).await;
        h.rollback(tx).await;
        let err = refused.expect_err("an invalid consumer name is refused");
        assert_eq!(err.kind(), StoreErrorKind::Config, "{err}");
    }
    let longest = "c".repeat(outbox_core::MAX_CONSUMER_NAME);
    assert!(record_committed(&h, &longest, id).await, "the longest name");
    assert!(!record_committed(&h, &longest, id).await);
    h.teardown().await;
}

async fn teardown_shared<H: InboxHarness>(h: Arc<H>) {
    match Arc::try_unwrap(h) {
        Ok(h) => h.teardown().await,
        Err(_) => panic!("a task of the test still holds the harness"),
    }
}
