//! `KafkaPublisher` against a real Kafka-protocol broker (`OUTBOX_TEST_KAFKA_BROKERS`, default
//! `127.0.0.1:9092`): what a consumer reads back, topic mapping, per-key order at volume,
//! dropped calls, `check` and `flush`, and the configuration it refuses.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{KafkaHarness, Reader, admin_or_skip, brokers, publisher_config, tally};
use outbox_core::chrono::Utc;
use outbox_core::{
    MESSAGE_ID_HEADER, MemoryStore, Message, MessageId, NewMessage, PublishOutcome, Publisher,
    Relay, RelayConfig, RetryPolicy, Store,
};
use outbox_kafka::{KafkaConfig, KafkaError, KafkaPublisher};
use outbox_testkit::relay::RunningRelay;
use outbox_testkit::{PublisherHarness, env};

const READ_TIMEOUT: Duration = Duration::from_secs(30);

fn stored(msg: NewMessage) -> Message {
    Message::new(msg, Utc::now())
}

fn assert_published(outcomes: &[PublishOutcome], expected: usize) {
    assert_eq!(outcomes.len(), expected, "one outcome per message");
    for (i, outcome) in outcomes.iter().enumerate() {
        assert!(outcome.is_published(), "message {i}: {outcome:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_reads_key_payload_headers_and_id() {
    let Some(admin) = admin_or_skip().await else {
        return;
    };
    let h = KafkaHarness::new(admin).await;
    let dest = h.destination();
    let sent = vec![
        stored(
            NewMessage::new(dest.clone(), br#"{"order":1}"#.to_vec())
                .key("order-1")
                .header("type", "OrderCreated")
                .header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
        ),
        // A header named like the id header cannot pass for the id.
        stored(
            NewMessage::new(dest.clone(), "forged")
                .key("order-2")
                .header(MESSAGE_ID_HEADER, "not-the-id"),
        ),
        stored(NewMessage::new(dest.clone(), Vec::new())),
    ];
    let outcomes = h.publisher().publish(&sent).await.expect("publish");
    assert_published(&outcomes, sent.len());

    let got = h.read(sent.len(), READ_TIMEOUT).await;
    assert_eq!(got.len(), sent.len(), "exactly the messages sent: {got:?}");
    let by_id: HashMap<MessageId, _> = got.iter().map(|r| (r.id, r)).collect();
    for msg in &sent {
        let r = by_id[&msg.id];
        assert_eq!(r.payload, msg.payload);
        assert_eq!(r.key, msg.key);
        // The id travels in its header, which `outbox_kafka::incoming` takes as the id and
        // leaves out of the message's own headers.
        assert_eq!(r.headers.get(MESSAGE_ID_HEADER), None);
        for (name, value) in msg.headers.iter().filter(|(n, _)| *n != MESSAGE_ID_HEADER) {
            assert_eq!(r.headers.get(name), Some(value), "header {name}");
        }
        let expected_headers = msg
            .headers
            .keys()
            .filter(|n| *n != MESSAGE_ID_HEADER)
            .count();
        assert_eq!(
            r.headers.len(),
            expected_headers,
            "no extra header: {:?}",
            r.headers
        );
    }
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_map_to_topics() {
    let Some(admin) = admin_or_skip().await else {
        return;
    };
    let prefix = env::unique_name("outbox_kafka_prefix");
    let mapped = env::unique_name("outbox_kafka_mapped");
    let prefixed = format!("{prefix}.payments");
    admin.create_topic(&mapped, 1).await;
    admin.create_topic(&prefixed, 1).await;
    let publisher = KafkaPublisher::new(
        publisher_config(&brokers())
            .topic_prefix(format!("{prefix}."))
            .topic("orders", mapped.clone()),
    )
    .await
    .expect("publisher");
    let sent = vec![
        stored(NewMessage::new("orders", "to the mapped topic")),
        stored(NewMessage::new("payments", "to the prefixed topic")),
    ];
    assert_published(&publisher.publish(&sent).await.expect("publish"), 2);
    publisher.check().await.expect("the mapped topic exists");

    let from_mapped = Reader::new(&brokers(), &mapped).read(1, READ_TIMEOUT).await;
    let from_prefixed = Reader::new(&brokers(), &prefixed)
        .read(1, READ_TIMEOUT)
        .await;
    assert_eq!(from_mapped.first().map(|r| r.id), Some(sent[0].id));
    assert_eq!(from_prefixed.first().map(|r| r.id), Some(sent[1].id));
    admin.delete_topic(&mapped).await;
    admin.delete_topic(&prefixed).await;
}

/// One key, one partition; and through a relay, each key's messages in enqueue order. Prints
/// the rate, which includes the relay's one-message-per-key-per-call rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_keeps_key_order_at_volume() {
    let Some(admin) = admin_or_skip().await else {
        return;
    };
    let h = KafkaHarness::new(admin).await;
    let dest = h.destination();
    let (total, keys) = (3_000, 50);
    let store = MemoryStore::new();
    let sent: Vec<NewMessage> = (0..total)
        .map(|i| NewMessage::new(dest.clone(), format!("{i}")).key(format!("key-{}", i % keys)))
        .collect();
    let mut tx = store.begin();
    for msg in &sent {
        tx.enqueue(msg.clone()).expect("enqueue");
    }
    tx.commit();
    let config = RelayConfig::default()
        .batch_size(500)
        .poll_min(Duration::from_millis(5))
        .poll_max(Duration::from_millis(50))
        .retry(RetryPolicy::default().initial_delay(Duration::from_millis(50)));
    let relay = Relay::builder(store.clone(), h.publisher())
        .config(config)
        .build()
        .expect("relay");
    let started = Instant::now();
    let running = RunningRelay::spawn(relay);
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.stats().await.expect("stats").pending > 0 {
        assert!(
            Instant::now() < deadline,
            "the relay did not drain the outbox"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    running.stop(Duration::from_secs(15)).await;
    eprintln!(
        "relay published {total} messages over {keys} keys in {elapsed:?} ({:.0} msg/s)",
        total as f64 / elapsed.as_secs_f64()
    );

    let position: HashMap<MessageId, usize> =
        sent.iter().enumerate().map(|(i, m)| (m.id(), i)).collect();
    let mut got = Vec::new();
    let mut distinct = HashSet::new();
    let reader = h.reader().await;
    while distinct.len() < total {
        let batch = reader
            .read_with_partitions(total - distinct.len(), READ_TIMEOUT)
            .await;
        if batch.is_empty() {
            break;
        }
        distinct.extend(batch.iter().map(|(_, r)| r.id));
        got.extend(batch);
    }
    assert_eq!(distinct.len(), total, "every message arrived");
    let mut partition_of_key: HashMap<String, i32> = HashMap::new();
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut seen = HashSet::new();
    for (partition, r) in &got {
        let key = r.key.clone().expect("key");
        let first = *partition_of_key.entry(key.clone()).or_insert(*partition);
        assert_eq!(first, *partition, "key {key} stays on one partition");
        if !seen.insert(r.id) {
            continue;
        }
        let pos = position[&r.id];
        if let Some(prev) = last.insert(key.clone(), pos) {
            assert!(pos > prev, "key {key}: #{pos} arrived after #{prev}");
        }
    }
    drop(reader);
    h.teardown().await;
}

/// The relay may drop a call at its publish timeout: the messages already handed over are
/// still delivered, `flush` waits for them, and the publisher goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_call_is_still_delivered_and_flushed() {
    let Some(admin) = admin_or_skip().await else {
        return;
    };
    let h = KafkaHarness::new(admin).await;
    let publisher = h.publisher();
    let dest = h.destination();
    let dropped: Vec<Message> = (0..500)
        .map(|i| stored(NewMessage::new(dest.clone(), format!("dropped {i}"))))
        .collect();
    let call = tokio::time::timeout(Duration::from_millis(1), publisher.publish(&dropped)).await;
    assert!(call.is_err(), "the call was cut short");
    publisher.flush().await.expect("flush");
    assert_eq!(
        publisher.in_flight(),
        0,
        "nothing left in flight after flush"
    );
    let after = vec![stored(NewMessage::new(dest.clone(), "after"))];
    assert_published(&publisher.publish(&after).await.expect("publish"), 1);

    // The call handed the whole batch to librdkafka before its first wait, so all of it is
    // delivered, once.
    let got = h.read(dropped.len() + 1, READ_TIMEOUT).await;
    let counts = tally(&got);
    assert_eq!(counts.len(), dropped.len() + 1, "every message arrived");
    assert!(counts.values().all(|n| *n == 1), "no duplicates");
    assert!(counts.contains_key(&after[0].id));
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_cluster_and_missing_topics() {
    let Some(admin) = admin_or_skip().await else {
        return;
    };
    let publisher = KafkaPublisher::new(publisher_config(&brokers()))
        .await
        .expect("publisher");
    publisher.check().await.expect("reachable");
    publisher.flush().await.expect("nothing to flush");

    let missing = env::unique_name("outbox_kafka_missing");
    let publisher =
        KafkaPublisher::new(publisher_config(&brokers()).topic("orders", missing.clone()))
            .await
            .expect("publisher");
    let err = publisher
        .check()
        .await
        .expect_err("the mapped topic is missing");
    assert!(
        !err.is_transient() && err.message().contains(&missing),
        "{err}"
    );

    // Nothing listens on a port just freed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let publisher = KafkaPublisher::new(
        publisher_config(&closed.to_string()).check_timeout(Duration::from_secs(1)),
    )
    .await
    .expect("created even though the broker is down");
    let started = Instant::now();
    let err = publisher.check().await.expect_err("unreachable");
    assert!(err.is_transient(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by check_timeout"
    );
    drop(admin);
}

#[tokio::test]
async fn configurations_that_break_the_guarantee_are_refused() {
    for (name, value) in [
        ("acks", "1"),
        ("enable.idempotence", "false"),
        ("transactional.id", "relay-1"),
    ] {
        match KafkaPublisher::new(KafkaConfig::default().property(name, value)).await {
            Err(KafkaError::Config { .. }) => {}
            other => panic!("{name}={value}: {other:?}"),
        }
    }
    match KafkaPublisher::new(KafkaConfig::default().property("no.such.property", "1")).await {
        Err(err @ KafkaError::Client(_)) => assert!(err.to_string().contains("producer"), "{err}"),
        other => panic!("unknown property: {other:?}"),
    }
}

/// A call larger than librdkafka's local queue waits for room instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_larger_than_the_local_queue_waits_for_room() {
    let Some(admin) = admin_or_skip().await else {
        return;
    };
    let h = KafkaHarness::new(admin).await;
    let dest = h.destination();
    let publisher = KafkaPublisher::new(
        publisher_config(&brokers())
            .property("queue.buffering.max.messages", "20")
            .enqueue_timeout(Duration::from_secs(20)),
    )
    .await
    .expect("publisher");
    let sent: Vec<Message> = (0..300)
        .map(|i| stored(NewMessage::new(dest.clone(), format!("{i}")).key(format!("k{}", i % 7))))
        .collect();
    assert_published(
        &publisher.publish(&sent).await.expect("publish"),
        sent.len(),
    );
    let got = h.read(sent.len(), READ_TIMEOUT).await;
    assert_eq!(tally(&got).len(), sent.len());
    h.teardown().await;
}

/// With the broker unreachable and the local queue full, the rest of a call fails as transient
/// once `enqueue_timeout` has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_stays_full_fails_transiently() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let publisher = KafkaPublisher::new(
        publisher_config(&closed.to_string())
            .property("queue.buffering.max.messages", "5")
            .property("message.timeout.ms", "3000")
            .enqueue_timeout(Duration::from_millis(300)),
    )
    .await
    .expect("publisher");
    let sent: Vec<Message> = (0..8)
        .map(|i| stored(NewMessage::new("orders", format!("{i}"))))
        .collect();
    let started = Instant::now();
    let outcomes = publisher.publish(&sent).await.expect("outcomes");
    assert_eq!(outcomes.len(), sent.len());
    let mut queue_full = 0;
    for outcome in &outcomes {
        match outcome {
            PublishOutcome::Failed(err) => {
                assert!(err.is_transient(), "{err}");
                if err.to_chain_string().contains("QueueFull") {
                    queue_full += 1;
                }
            }
            other => panic!("nothing can be published: {other:?}"),
        }
    }
    assert_eq!(queue_full, 3, "the three that found no room: {outcomes:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// TLS and zstd exist only with the crate features that build librdkafka with them.
#[tokio::test]
async fn tls_and_zstd_follow_the_crate_features() {
    let tls = KafkaPublisher::new(
        KafkaConfig::default()
            .property("security.protocol", "SASL_SSL")
            .property("sasl.mechanisms", "SCRAM-SHA-512")
            .property("sasl.username", "relay")
            .property("sasl.password", "secret"),
    )
    .await;
    assert_eq!(tls.is_ok(), cfg!(feature = "ssl"), "{tls:?}");
    let zstd =
        KafkaPublisher::new(KafkaConfig::default().property("compression.type", "zstd")).await;
    assert_eq!(zstd.is_ok(), cfg!(feature = "zstd"), "{zstd:?}");
}

/// With `pipeline_keys`, a message the producer refuses at once (larger than
/// `message.max.bytes`) stops the later messages of its key in the call; other keys go on, and
/// what was sent arrives in call order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_keys_stop_at_a_message_the_producer_refuses() {
    let Some(admin) = admin_or_skip().await else {
        return;
    };
    let h = KafkaHarness::with(admin, |config| config.pipeline_keys(true)).await;
    let publisher = h.publisher();
    assert!(publisher.capabilities().ordered_per_key);
    let topic = h.destination();
    let keyed = |key: &str, payload: Vec<u8>| {
        Message::new(NewMessage::new(topic.clone(), payload).key(key), Utc::now())
    };
    let batch = vec![
        keyed("k", b"k0".to_vec()),
        keyed("k", vec![b'x'; common::MAX_MESSAGE_BYTES * 2]),
        keyed("k", b"k2".to_vec()),
        keyed("j", b"j0".to_vec()),
    ];
    let outcomes = publisher.publish(&batch).await.expect("publish");
    assert!(outcomes[0].is_published(), "{outcomes:?}");
    assert!(
        matches!(&outcomes[1], PublishOutcome::Failed(err) if !err.is_transient()),
        "{outcomes:?}"
    );
    let PublishOutcome::Failed(err) = &outcomes[2] else {
        panic!("k's later message was sent after k failed: {outcomes:?}");
    };
    assert!(err.is_transient() && err.to_string().contains("earlier message of its key"));
    assert!(outcomes[3].is_published(), "{outcomes:?}");
    let got = h.read(2, Duration::from_secs(20)).await;
    let mut payloads: Vec<&[u8]> = got.iter().map(|m| m.payload.as_slice()).collect();
    payloads.sort_unstable();
    assert_eq!(payloads, vec![&b"j0"[..], b"k0"]);
    h.teardown().await;
}
