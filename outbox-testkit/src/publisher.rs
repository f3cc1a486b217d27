//! The publisher suite: the [`Publisher`] contract against a real broker, read back by a real
//! consumer. Expand it with [`crate::publisher_suite!`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_core::{
    MESSAGE_ID_HEADER, MemoryStore, Message, MessageId, NewMessage, PublishOutcome, Publisher,
    Relay, Store,
};

use crate::relay::{RunningRelay, fast_config};
use crate::{PublisherHarness, Received};

const READ_TIMEOUT: Duration = Duration::from_secs(30);

fn stored(msg: NewMessage) -> Message {
    Message::new(msg, chrono::Utc::now())
}

fn assert_all_published(outcomes: &[PublishOutcome], expected: usize) {
    assert_eq!(outcomes.len(), expected, "one outcome per message");
    for (i, outcome) in outcomes.iter().enumerate() {
        assert!(
            outcome.is_published(),
            "message {i} not published: {outcome:?}"
        );
    }
}

/// Reads until `distinct` different ids arrived (or `timeout` passed): through a relay, a
/// call that timed out is published again, so duplicates are expected and must not count.
async fn read_distinct<H: PublisherHarness>(
    h: &H,
    distinct: usize,
    timeout: Duration,
) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got: Vec<Received> = Vec::new();
    let mut ids = HashSet::new();
    while ids.len() < distinct {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let batch = h.read(distinct - ids.len(), left).await;
        if batch.is_empty() {
            break;
        }
        ids.extend(batch.iter().map(|r| r.id));
        got.extend(batch);
    }
    got
}

/// Payload, key, headers and id reach the consumer unchanged.
pub async fn messages_arrive_unchanged<H: PublisherHarness>(h: H) {
    let dest = h.destination();
    let payload: Vec<u8> = (0..=255u8).collect();
    let sent = vec![
        stored(
            NewMessage::new(dest.clone(), payload.clone())
                .key("order-1")
                .header("type", "OrderCreated")
                .header("unicode", "ünïcødé ✓"),
        ),
        stored(NewMessage::new(dest.clone(), "no key")),
        stored(NewMessage::new(dest.clone(), Vec::new()).key("order-2")),
    ];
    let outcomes = h.publisher().publish(&sent).await.expect("publish");
    assert_all_published(&outcomes, sent.len());
    let got = h.read(sent.len(), READ_TIMEOUT).await;
    assert_eq!(got.len(), sent.len(), "every message read back");
    let by_id: HashMap<MessageId, &Received> = got.iter().map(|r| (r.id, r)).collect();
    for msg in &sent {
        let received = by_id
            .get(&msg.id)
            .unwrap_or_else(|| panic!("message {} not received", msg.id));
        assert_eq!(received.payload, msg.payload, "payload of {}", msg.id);
        assert_eq!(received.key, msg.key, "key of {}", msg.id);
        for (name, value) in &msg.headers {
            assert_eq!(
                received.headers.get(name),
                Some(value),
                "header {name} of {}",
                msg.id
            );
        }
        if let Some(id) = received.headers.get(MESSAGE_ID_HEADER) {
            assert_eq!(id, &msg.id.to_string(), "id header");
        }
    }
    h.teardown().await;
}

/// An empty call succeeds with no outcome; a call returns one outcome per message.
pub async fn one_outcome_per_message<H: PublisherHarness>(h: H) {
    let publisher = h.publisher();
    assert!(publisher.publish(&[]).await.expect("empty call").is_empty());
    let dest = h.destination();
    let sent: Vec<Message> = (0..25)
        .map(|i| stored(NewMessage::new(dest.clone(), format!("{i}"))))
        .collect();
    let outcomes = publisher.publish(&sent).await.expect("publish");
    assert_all_published(&outcomes, sent.len());
    let got = h.read(sent.len(), READ_TIMEOUT).await;
    let ids: HashSet<MessageId> = got.iter().map(|r| r.id).collect();
    assert_eq!(
        ids,
        sent.iter().map(|m| m.id).collect(),
        "exactly the published ids"
    );
    h.teardown().await;
}

/// Through a relay, messages of each key arrive in enqueue order.
pub async fn key_order_is_kept_through_a_relay<H: PublisherHarness>(h: H) {
    let dest = h.destination();
    let store = MemoryStore::new();
    let sent: Vec<NewMessage> = (0..400)
        .map(|i| NewMessage::new(dest.clone(), format!("{i}")).key(format!("key-{}", i % 8)))
        .collect();
    let mut tx = store.begin();
    for msg in &sent {
        tx.enqueue(msg.clone()).expect("enqueue");
    }
    tx.commit();
    let relay = Relay::builder(store.clone(), h.publisher())
        .config(fast_config().publish_timeout(Duration::from_secs(1)))
        .build()
        .expect("relay");
    let running = RunningRelay::spawn(relay);
    let got = read_distinct(&h, sent.len(), READ_TIMEOUT).await;
    running.stop(Duration::from_secs(15)).await;
    let position: HashMap<MessageId, usize> =
        sent.iter().enumerate().map(|(i, m)| (m.id(), i)).collect();
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut seen = HashSet::new();
    for received in &got {
        let pos = *position.get(&received.id).expect("a sent id");
        if !seen.insert(received.id) {
            continue;
        }
        let key = received.key.clone().expect("key kept");
        if let Some(prev) = last.insert(key.clone(), pos) {
            assert!(pos > prev, "key {key}: #{pos} arrived after #{prev}");
        }
    }
    assert_eq!(seen.len(), sent.len(), "every message arrived");
    assert_eq!(store.stats().await.expect("stats").pending, 0);
    h.teardown().await;
}

/// A message larger than the broker takes fails permanently; the others of the call go out.
pub async fn oversized_messages_fail_permanently<H: PublisherHarness>(h: H) {
    let Some(max) = h.max_payload() else {
        h.teardown().await;
        return;
    };
    let dest = h.destination();
    let sent = vec![
        stored(NewMessage::new(dest.clone(), "before")),
        stored(NewMessage::new(dest.clone(), vec![b'x'; max + 1024])),
        stored(NewMessage::new(dest.clone(), "after")),
    ];
    let outcomes = h
        .publisher()
        .publish(&sent)
        .await
        .expect("the call itself succeeds");
    assert_eq!(outcomes.len(), 3);
    assert!(
        outcomes[0].is_published() && outcomes[2].is_published(),
        "{outcomes:?}"
    );
    match &outcomes[1] {
        PublishOutcome::Failed(err) => {
            assert!(!err.is_transient(), "oversized is permanent: {err}")
        }
        other => panic!("oversized message was {other:?}"),
    }
    let got = h.read(2, READ_TIMEOUT).await;
    let ids: HashSet<MessageId> = got.iter().map(|r| r.id).collect();
    assert_eq!(ids, [sent[0].id, sent[2].id].into_iter().collect());
    h.teardown().await;
}

/// A destination the broker refuses for good fails permanently.
pub async fn invalid_destinations_fail_permanently<H: PublisherHarness>(h: H) {
    let Some(dest) = h.invalid_destination() else {
        h.teardown().await;
        return;
    };
    let msg = stored(NewMessage::new(dest, "lost?"));
    match h.publisher().publish(std::slice::from_ref(&msg)).await {
        Ok(outcomes) => match outcomes.as_slice() {
            [PublishOutcome::Failed(err)] => assert!(!err.is_transient(), "{err}"),
            other => panic!("expected one permanent failure, got {other:?}"),
        },
        Err(err) => assert!(!err.is_transient(), "{err}"),
    }
    h.teardown().await;
}

/// The relay may drop a call at its publish timeout; the publisher stays usable.
pub async fn a_dropped_call_leaves_the_publisher_usable<H: PublisherHarness>(h: H) {
    let publisher = h.publisher();
    let dest = h.destination();
    let dropped: Vec<Message> = (0..200)
        .map(|i| stored(NewMessage::new(dest.clone(), format!("d{i}"))))
        .collect();
    let _ = tokio::time::timeout(Duration::from_millis(1), publisher.publish(&dropped)).await;
    let after: Vec<Message> = (0..5)
        .map(|i| stored(NewMessage::new(dest.clone(), format!("a{i}"))))
        .collect();
    let outcomes = tokio::time::timeout(Duration::from_secs(30), publisher.publish(&after))
        .await
        .expect("the next call completes")
        .expect("publish");
    assert_all_published(&outcomes, after.len());
    let got = h
        .read(after.len() + dropped.len(), Duration::from_secs(5))
        .await;
    let ids: HashSet<MessageId> = got.iter().map(|r| r.id).collect();
    for msg in &after {
        assert!(
            ids.contains(&msg.id),
            "message published after the dropped call arrived"
        );
    }
    h.teardown().await;
}

/// `check` succeeds against a reachable broker, and `flush` completes.
pub async fn check_and_flush_succeed<H: PublisherHarness>(h: H) {
    let publisher = h.publisher();
    publisher.check().await.expect("check");
    publisher.flush().await.expect("flush");
    h.teardown().await;
}
