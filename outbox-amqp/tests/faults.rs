//! Broker faults under a relay: unreachable at start, connections cut mid-batch, oversized
//! messages. Nothing is lost; only what cannot be published is dead-lettered.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{AmqpHarness, broker_addr, dead_letters, enqueue, relay_config, via};
use lapin::ExchangeKind;
use outbox_amqp::AmqpPublisher;
use outbox_core::{MemoryStore, Message, MessageId, NewMessage, Publisher, Relay, Store};
use outbox_testkit::PublisherHarness;
use outbox_testkit::proxy::FaultProxy;
use outbox_testkit::relay::RunningRelay;

/// Reads until every id of `sent` arrived at least once (or `timeout`); returns the first
/// position of each id in arrival order and the number of duplicates.
async fn read_all(
    h: &AmqpHarness,
    sent: &[NewMessage],
    timeout: Duration,
) -> (Vec<MessageId>, usize) {
    let wanted: HashSet<MessageId> = sent.iter().map(NewMessage::id).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let mut duplicates = 0;
    while seen.len() < wanted.len() && tokio::time::Instant::now() < deadline {
        let left = deadline - tokio::time::Instant::now();
        for received in h
            .read(wanted.len() - seen.len(), left.min(Duration::from_secs(1)))
            .await
        {
            assert!(wanted.contains(&received.id), "an id that was never sent");
            if seen.insert(received.id) {
                order.push(received.id);
            } else {
                duplicates += 1;
            }
        }
    }
    (order, duplicates)
}

/// First deliveries of each key follow enqueue order.
fn assert_key_order(sent: &[NewMessage], arrived: &[MessageId]) {
    let position: HashMap<MessageId, (usize, Option<&str>)> = sent
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id(), (i, m.ordering_key())))
        .collect();
    let mut last: HashMap<&str, usize> = HashMap::new();
    for id in arrived {
        let (pos, key) = position[id];
        if let Some(key) = key
            && let Some(prev) = last.insert(key, pos)
        {
            assert!(pos > prev, "key {key}: #{pos} arrived before #{prev}");
        }
    }
}

fn messages(dest: &str, count: usize, keys: usize) -> Vec<NewMessage> {
    (0..count)
        .map(|i| {
            NewMessage::new(dest, format!("message {i}"))
                .key(format!("key-{}", i % keys))
                .header("seq", i.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_unreachable_at_start_gets_every_message_once_it_is_back() {
    let Some(h) = AmqpHarness::start().await else {
        return;
    };
    let proxy = FaultProxy::start(broker_addr().await).await.expect("proxy");
    proxy.set_down(true);
    let config = outbox_amqp::AmqpConfig::new(via(&common::amqp_url(), proxy.addr()))
        .connect_timeout(Duration::from_secs(2));
    let publisher = AmqpPublisher::new(config).await.expect("config");

    let probe = [Message::new(
        NewMessage::new(h.destination(), "probe"),
        outbox_core::chrono::Utc::now(),
    )];
    let err = publisher.publish(&probe).await.expect_err("unreachable");
    assert!(err.is_transient(), "{err}");
    assert!(
        publisher
            .check()
            .await
            .expect_err("unreachable")
            .is_transient()
    );

    let store = MemoryStore::new();
    let sent = messages(&h.destination(), 300, 10);
    enqueue(&store, &sent);
    let relay = Relay::builder(store.clone(), publisher.clone())
        .config(relay_config())
        .build()
        .expect("relay");
    let running = RunningRelay::spawn(relay);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        stats.pending, 300,
        "nothing published while the broker is away"
    );
    assert_eq!(
        stats.dead, 0,
        "nothing dead-lettered for an unreachable broker"
    );

    proxy.set_down(false);
    let (arrived, _) = read_all(&h, &sent, Duration::from_secs(60)).await;
    running.stop(Duration::from_secs(15)).await;
    assert_eq!(arrived.len(), sent.len(), "every message arrived");
    assert_key_order(&sent, &arrived);
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.dead), (0, 0));
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_batch_lose_nothing() {
    let Some(h) = AmqpHarness::start().await else {
        return;
    };
    let proxy = FaultProxy::start(broker_addr().await).await.expect("proxy");
    let config = outbox_amqp::AmqpConfig::new(via(&common::amqp_url(), proxy.addr()))
        .connect_timeout(Duration::from_secs(2));
    let publisher = AmqpPublisher::new(config).await.expect("config");

    let store = MemoryStore::new();
    // 400 keys: calls of up to 200 messages, so that a cut finds many of them in flight.
    let sent = messages(&h.destination(), 4000, 400);
    enqueue(&store, &sent);
    let proxy = std::sync::Arc::new(proxy);
    let cutting = outbox_testkit::CuttingPublisher::new(
        publisher.clone(),
        std::sync::Arc::clone(&proxy),
        3,
        4,
    );
    let relay = Relay::builder(store.clone(), cutting.clone())
        .config(relay_config())
        .build()
        .expect("relay");
    let running = RunningRelay::spawn(relay);
    let (arrived, duplicates) = read_all(&h, &sent, Duration::from_secs(120)).await;
    running.stop(Duration::from_secs(15)).await;
    eprintln!(
        "AMQP: {} cuts, {} connections, {} failed outcomes, {duplicates} duplicates",
        cutting.cuts(),
        proxy.connections(),
        cutting.failures()
    );
    assert!(cutting.cuts() >= 2, "connections were cut during calls");
    assert!(cutting.failures() > 0, "the cuts hit messages in flight");
    assert_eq!(arrived.len(), sent.len(), "every message arrived");
    assert_key_order(&sent, &arrived);
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.dead), (0, 0));
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_dead_lettered_while_the_others_flow() {
    let Some(h) = AmqpHarness::with(ExchangeKind::Fanout, |c| c.max_message_size(100 * 1024)).await
    else {
        return;
    };
    let dest = h.destination();
    let store = MemoryStore::new();
    let mut sent = messages(&dest, 100, 5);
    let big = NewMessage::new(dest.clone(), vec![b'x'; 100 * 1024 + 1]).key("key-0");
    // The oversized message sits in the middle of key-0's sequence: the next one of its key
    // follows once it is dead-lettered.
    sent.insert(50, big.clone());
    enqueue(&store, &sent);
    let relay = Relay::builder(store.clone(), h.publisher())
        .config(relay_config())
        .build()
        .expect("relay");
    let running = RunningRelay::spawn(relay);
    let expected: Vec<NewMessage> = sent
        .iter()
        .filter(|m| m.id() != big.id())
        .cloned()
        .collect();
    let (arrived, _) = read_all(&h, &expected, Duration::from_secs(60)).await;
    running.stop(Duration::from_secs(15)).await;
    assert_eq!(arrived.len(), expected.len(), "every other message arrived");
    assert_key_order(&expected, &arrived);
    let dead = dead_letters(&store).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, big.id());
    assert_eq!(
        dead[0].message.attempts, 1,
        "dead-lettered at the first failure"
    );
    let error = dead[0].message.last_error.clone().unwrap_or_default();
    assert!(error.contains("exceeds"), "{error}");
    assert!(
        h.read(1, Duration::from_millis(500)).await.is_empty(),
        "the big one never arrived"
    );
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_lost_during_a_call_fails_it_quickly_and_the_publisher_reconnects() {
    let Some(h) = AmqpHarness::start().await else {
        return;
    };
    let proxy = FaultProxy::start(broker_addr().await).await.expect("proxy");
    let config = outbox_amqp::AmqpConfig::new(via(&common::amqp_url(), proxy.addr()))
        .connect_timeout(Duration::from_secs(2))
        .confirm_timeout(Duration::from_secs(2));
    let publisher = AmqpPublisher::new(config).await.expect("config");
    publisher.check().await.expect("connected");
    let batch: Vec<Message> = (0..10_000)
        .map(|i| {
            Message::new(
                NewMessage::new(h.destination(), vec![b'x'; 1000]).key(format!("k{i}")),
                outbox_core::chrono::Utc::now(),
            )
        })
        .collect();

    let started = std::time::Instant::now();
    let (result, ()) = tokio::join!(publisher.publish(&batch), async {
        tokio::time::sleep(Duration::from_millis(2)).await;
        proxy.set_down(true);
    });
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "the call ended in {elapsed:?}"
    );
    match result {
        Ok(outcomes) => {
            assert_eq!(outcomes.len(), batch.len());
            let failed = outcomes.iter().filter(|o| !o.is_published()).count();
            assert!(failed > 0, "the connection was lost during the call");
            for outcome in &outcomes {
                if let outbox_core::PublishOutcome::Failed(err) = outcome {
                    assert!(err.is_transient(), "{err}");
                }
            }
        }
        Err(err) => assert!(err.is_transient(), "{err}"),
    }
    // While the broker is away, calls fail transiently and fast.
    let started = std::time::Instant::now();
    let err = publisher.publish(&batch[..1]).await.expect_err("down");
    assert!(err.is_transient(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));

    proxy.set_down(false);
    let outcomes = publisher.publish(&batch[..10]).await.expect("reconnected");
    assert!(
        outcomes
            .iter()
            .all(outbox_core::PublishOutcome::is_published)
    );
    h.teardown().await;
}
