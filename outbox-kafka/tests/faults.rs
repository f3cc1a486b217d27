//! Faults: a broker unreachable at start, connections cut in the middle of batches, a message
//! too large among others, and broker errors injected with librdkafka's mock cluster.
//!
//! The connection faults run a private tansu broker that advertises a [`FaultProxy`] in front
//! of it, so that every connection of every client goes through the proxy, after bootstrap too.
//!
//! [`FaultProxy`]: outbox_testkit::proxy::FaultProxy

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Admin, KafkaHarness, PrivateBroker, Reader, admin_or_skip, publisher_config};
use outbox_core::chrono::Utc;
use outbox_core::{
    DeadLetterFilter, MemoryStore, Message, MessageId, NewMessage, PublishOutcome, Publisher,
    Relay, RelayConfig, RetryPolicy, Store,
};
use outbox_kafka::rdkafka::mocking::MockCluster;
use outbox_kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use outbox_kafka::{KafkaConfig, KafkaPublisher};
use outbox_testkit::relay::RunningRelay;
use outbox_testkit::{PublisherHarness, Received, env};

fn stored(msg: NewMessage) -> Message {
    Message::new(msg, Utc::now())
}

/// Commits `total` messages for `topic` over `keys` keys; returns them in enqueue order.
fn enqueue(store: &MemoryStore, topic: &str, total: usize, keys: usize) -> Vec<NewMessage> {
    let sent: Vec<NewMessage> = (0..total)
        .map(|i| {
            NewMessage::new(topic, format!("message {i}"))
                .key(format!("key-{}", i % keys))
                .header("seq", i.to_string())
        })
        .collect();
    let mut tx = store.begin();
    for msg in &sent {
        tx.enqueue(msg.clone()).expect("enqueue");
    }
    tx.commit();
    sent
}

/// A relay that retries quickly and never gives up on a transient failure.
fn patient_config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(200)
        .lease(Duration::from_secs(20))
        .publish_timeout(Duration::from_secs(5))
        .poll_min(Duration::from_millis(5))
        .poll_max(Duration::from_millis(50))
        .shutdown_timeout(Duration::from_secs(5))
        .retry(
            RetryPolicy::default()
                .initial_delay(Duration::from_millis(100))
                .max_delay(Duration::from_millis(500))
                .max_attempts(10_000),
        )
}

async fn wait_drained(store: &MemoryStore, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        let stats = store.stats().await.expect("stats");
        if stats.pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} messages still pending after {bound:?}",
            stats.pending
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until every id of `sent` arrived (duplicates allowed) or `bound` passed.
async fn read_all(reader: &Reader, sent: &[NewMessage], bound: Duration) -> Vec<Received> {
    let wanted: HashSet<MessageId> = sent.iter().map(NewMessage::id).collect();
    let deadline = Instant::now() + bound;
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    while seen.len() < wanted.len() && Instant::now() < deadline {
        let batch = reader
            .read(wanted.len() - seen.len(), deadline - Instant::now())
            .await;
        seen.extend(batch.iter().map(|r| r.id).filter(|id| wanted.contains(id)));
        got.extend(batch);
    }
    got
}

/// Every message of `sent` arrived, and the first arrival of each follows enqueue order per key.
fn assert_complete_and_ordered(sent: &[NewMessage], got: &[Received]) {
    let position: HashMap<MessageId, usize> =
        sent.iter().enumerate().map(|(i, m)| (m.id(), i)).collect();
    let mut last: HashMap<&str, usize> = HashMap::new();
    let mut seen = HashSet::new();
    for r in got {
        let pos = *position.get(&r.id).expect("only sent messages");
        assert_eq!(r.payload, sent[pos].payload(), "payload of #{pos}");
        if !seen.insert(r.id) {
            continue;
        }
        let key = r.key.as_deref().expect("key");
        if let Some(prev) = last.insert(key, pos) {
            assert!(pos > prev, "key {key}: #{pos} arrived after #{prev}");
        }
    }
    let missing: Vec<usize> = sent
        .iter()
        .enumerate()
        .filter(|(_, m)| !seen.contains(&m.id()))
        .map(|(i, _)| i)
        .collect();
    assert!(missing.is_empty(), "lost messages: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_transiently_then_everything_arrives() {
    let Some(broker) = PrivateBroker::start().await else {
        return;
    };
    let admin = Admin::new(&broker.brokers());
    let topic = env::unique_name("outbox_kafka_down");
    admin.create_topic(&topic, 3).await;
    broker.proxy.set_down(true);

    // A failed delivery is reported after message.timeout.ms, below the relay's publish timeout.
    let publisher = KafkaPublisher::new(
        publisher_config(&broker.brokers()).property("message.timeout.ms", "1500"),
    )
    .await
    .expect("a publisher is created while the broker is unreachable");
    let probes: Vec<Message> = (0..3)
        .map(|i| stored(NewMessage::new(topic.clone(), format!("probe {i}")).key("probe")))
        .collect();
    let outcomes = publisher.publish(&probes).await.expect("one outcome each");
    assert_eq!(outcomes.len(), probes.len());
    for outcome in &outcomes {
        match outcome {
            PublishOutcome::Failed(err) => assert!(err.is_transient(), "{err}"),
            other => panic!("published through a proxy that is down: {other:?}"),
        }
    }
    assert!(
        publisher.check().await.is_err(),
        "check sees the broker down"
    );

    let store = MemoryStore::new();
    let sent = enqueue(&store, &topic, 300, 10);
    let relay = Relay::builder(store.clone(), publisher.clone())
        .config(patient_config())
        .build()
        .expect("relay");
    let running = RunningRelay::spawn(relay);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        store.stats().await.expect("stats").pending,
        sent.len() as u64,
        "nothing is published while the broker is unreachable"
    );

    broker.proxy.set_down(false);
    wait_drained(&store, Duration::from_secs(60)).await;
    running.stop(Duration::from_secs(15)).await;
    publisher.check().await.expect("check sees the broker back");
    assert!(
        store
            .dead_letters(&DeadLetterFilter::default())
            .await
            .expect("dead letters")
            .is_empty(),
        "transient failures are never dead-lettered here"
    );

    let reader = Reader::new(&broker.brokers(), &topic);
    let got = read_all(&reader, &sent, Duration::from_secs(30)).await;
    assert_complete_and_ordered(&sent, &got);
    drop(reader);
    admin.delete_topic(&topic).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_in_the_middle_of_batches_lose_nothing() {
    let Some(broker) = PrivateBroker::start().await else {
        return;
    };
    let admin = Admin::new(&broker.brokers());
    let topic = env::unique_name("outbox_kafka_cut");
    admin.create_topic(&topic, 3).await;
    let publisher = KafkaPublisher::new(publisher_config(&broker.brokers()))
        .await
        .expect("publisher");

    let store = MemoryStore::new();
    let sent = enqueue(&store, &topic, 4_000, 40);
    let proxy = Arc::clone(&broker.proxy);
    let done = Arc::new(AtomicBool::new(false));
    let cuts_mid_publish = Arc::new(AtomicUsize::new(0));
    let cutter = {
        let (proxy, done, cuts, store) = (
            Arc::clone(&proxy),
            Arc::clone(&done),
            Arc::clone(&cuts_mid_publish),
            store.clone(),
        );
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(150));
            while !done.load(Ordering::SeqCst) {
                interval.tick().await;
                let pending = store.stats().await.map(|s| s.pending).unwrap_or(0);
                if pending > 0 && pending < 4_000 {
                    proxy.cut();
                    cuts.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let relay = Relay::builder(store.clone(), publisher.clone())
        .config(patient_config())
        .build()
        .expect("relay");
    let running = RunningRelay::spawn(relay);
    wait_drained(&store, Duration::from_secs(120)).await;
    done.store(true, Ordering::SeqCst);
    cutter.await.expect("cutter");
    running.stop(Duration::from_secs(15)).await;

    let cuts = cuts_mid_publish.load(Ordering::SeqCst);
    eprintln!(
        "{cuts} cuts while publishing; {} connections through the proxy",
        proxy.connections()
    );
    assert!(cuts >= 3, "only {cuts} cuts landed while publishing");
    assert!(
        proxy.connections() > 3,
        "clients reconnected through the proxy"
    );
    assert!(
        store
            .dead_letters(&DeadLetterFilter::default())
            .await
            .expect("dead letters")
            .is_empty()
    );

    let reader = Reader::new(&proxy.addr().to_string(), &topic);
    let got = read_all(&reader, &sent, Duration::from_secs(60)).await;
    assert_complete_and_ordered(&sent, &got);
    let duplicates = got.len() - sent.len();
    eprintln!("{} read, {duplicates} duplicates", got.len());
    drop(reader);
    admin.delete_topic(&topic).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_dead_lettered_while_the_rest_flows() {
    let Some(admin) = admin_or_skip().await else {
        return;
    };
    let h = KafkaHarness::new(admin).await;
    let topic = h.destination();
    let store = MemoryStore::new();
    let oversized =
        NewMessage::new(topic.clone(), vec![b'x'; 2 * common::MAX_MESSAGE_BYTES]).key("key-big");
    let mut sent: Vec<NewMessage> = Vec::new();
    let mut tx = store.begin();
    for i in 0..60 {
        let msg = if i == 20 {
            oversized.clone()
        } else {
            // key-big also has messages before and after the oversized one.
            let key = if i % 3 == 0 {
                "key-big".to_owned()
            } else {
                format!("key-{}", i % 4)
            };
            NewMessage::new(topic.clone(), format!("message {i}")).key(key)
        };
        tx.enqueue(msg.clone()).expect("enqueue");
        sent.push(msg);
    }
    tx.commit();

    let relay = Relay::builder(store.clone(), h.publisher())
        .config(patient_config())
        .build()
        .expect("relay");
    let running = RunningRelay::spawn(relay);
    wait_drained(&store, Duration::from_secs(60)).await;
    running.stop(Duration::from_secs(15)).await;

    let dead = store
        .dead_letters(&DeadLetterFilter::default())
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message.id, oversized.id());
    assert_eq!(
        dead[0].message.attempts, 1,
        "dead-lettered at the first failure"
    );
    let error = dead[0].message.last_error.clone().unwrap_or_default();
    assert!(error.to_lowercase().contains("too large"), "{error}");

    let rest: Vec<NewMessage> = sent
        .into_iter()
        .filter(|m| m.id() != oversized.id())
        .collect();
    let reader = h.reader().await;
    let got = read_all(&reader, &rest, Duration::from_secs(30)).await;
    assert_complete_and_ordered(&rest, &got);
    drop(reader);
    h.teardown().await;
}

/// A publisher on librdkafka's in-process mock cluster, with topic `orders`.
async fn mock_cluster() -> (
    MockCluster<'static, outbox_kafka::rdkafka::producer::DefaultProducerContext>,
    KafkaPublisher,
) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("orders", 1, 1).expect("topic");
    let publisher = KafkaPublisher::new(
        KafkaConfig::new(cluster.bootstrap_servers()).property("message.timeout.ms", "1500"),
    )
    .await
    .expect("publisher");
    (cluster, publisher)
}

async fn publish_one(publisher: &KafkaPublisher, key: &str) -> PublishOutcome {
    let msg = stored(NewMessage::new("orders", "payload").key(key));
    // Bounded: a publisher that deadlocks while replacing its producer fails here.
    let mut outcomes = tokio::time::timeout(Duration::from_secs(30), publisher.publish(&[msg]))
        .await
        .expect("the call completes")
        .expect("one outcome");
    assert_eq!(outcomes.len(), 1);
    outcomes.remove(0)
}

fn failure(outcome: PublishOutcome) -> outbox_core::PublishError {
    match outcome {
        PublishOutcome::Failed(err) => err,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_refusals_are_permanent() {
    let (cluster, publisher) = mock_cluster().await;
    assert!(publish_one(&publisher, "a").await.is_published());

    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let err = failure(publish_one(&publisher, "a").await);
    assert!(!err.is_transient(), "{err}");
    assert!(
        publish_one(&publisher, "a").await.is_published(),
        "the next one goes through"
    );

    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let err = failure(publish_one(&publisher, "a").await);
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_chain_string().contains("\"orders\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_conditions_that_pass_are_transient() {
    let (cluster, publisher) = mock_cluster().await;
    assert!(publish_one(&publisher, "a").await.is_published());
    // librdkafka retries these itself until message.timeout.ms, then reports a timeout.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 200],
    );
    let err = failure(publish_one(&publisher, "a").await);
    assert!(err.is_transient(), "{err}");
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    assert!(publish_one(&publisher, "a").await.is_published());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_is_transient_and_the_producer_is_replaced() {
    let (cluster, publisher) = mock_cluster().await;
    assert!(publish_one(&publisher, "a").await.is_published());
    // An out-of-order sequence on the first in-flight request is fatal for the idempotent
    // producer: it refuses every message afterwards.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    let err = failure(publish_one(&publisher, "a").await);
    assert!(err.is_transient(), "{err}");
    assert!(err.to_chain_string().contains("fatal"), "{err}");
    assert!(
        publish_one(&publisher, "a").await.is_published(),
        "a new producer took over"
    );
    publisher.check().await.expect("check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_producer_is_replaced() {
    let (cluster, publisher) = mock_cluster().await;
    assert!(publish_one(&publisher, "a").await.is_published());
    // After connection cuts tansu answered every later produce of the producer id so.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let err = failure(publish_one(&publisher, "a").await);
    assert!(err.is_transient(), "{err}");
    let text = err.to_chain_string();
    assert!(
        text.contains("fenced") && text.contains("new producer"),
        "{text}"
    );
    assert!(publish_one(&publisher, "a").await.is_published());
}
