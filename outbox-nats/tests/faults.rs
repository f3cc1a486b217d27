//! Server faults under a relay: unreachable at start, connections cut mid-batch, oversized
//! messages. Nothing is lost, the stream drops what was published twice, and only what cannot
//! be published is dead-lettered.

mod common;

use std::time::Duration;

use common::{
    NatsHarness, assert_key_order, enqueue, messages, nats_url, read_all, relay_config,
    server_addr, stored, via,
};
use outbox_core::{DeadLetterFilter, MemoryStore, NewMessage, Publisher, Relay, Store};
use outbox_nats::{NatsConfig, NatsPublisher};
use outbox_testkit::PublisherHarness;
use outbox_testkit::proxy::FaultProxy;
use outbox_testkit::relay::RunningRelay;

/// A publisher through `proxy`, with acks bounded well below the relay's publish timeout.
async fn proxied(proxy: &FaultProxy) -> NatsPublisher {
    let config = NatsConfig::new(via(&nats_url(), proxy.addr()))
        .connect_timeout(Duration::from_secs(1))
        .ack_timeout(Duration::from_secs(1));
    NatsPublisher::new(config).await.expect("publisher")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_unreachable_at_start_gets_every_message_once_it_is_back() {
    let Some(h) = NatsHarness::start().await else {
        return;
    };
    let proxy = FaultProxy::start(server_addr().await).await.expect("proxy");
    proxy.set_down(true);
    let publisher = proxied(&proxy).await;
    let err = publisher
        .publish(&[stored(NewMessage::new(h.destination(), "probe"))])
        .await
        .expect_err("unreachable");
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
        "nothing published while the server is away"
    );
    assert_eq!(
        stats.dead, 0,
        "nothing dead-lettered for an unreachable server"
    );

    proxy.set_down(false);
    let (arrived, duplicates) = read_all(&h, &sent, Duration::from_secs(60)).await;
    running.stop(Duration::from_secs(15)).await;
    assert_eq!(arrived.len(), sent.len(), "every message arrived");
    assert_eq!(duplicates, 0, "the stream dropped repeated ids");
    assert_key_order(&sent, &arrived);
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.dead), (0, 0));
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_batch_lose_nothing_and_store_each_id_once() {
    let Some(h) = NatsHarness::start().await else {
        return;
    };
    let proxy = FaultProxy::start(server_addr().await).await.expect("proxy");
    let publisher = proxied(&proxy).await;
    publisher
        .check()
        .await
        .expect("connected through the proxy");

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
        "NATS: {} cuts, {} connections, {} failed outcomes, {duplicates} duplicates",
        cutting.cuts(),
        proxy.connections(),
        cutting.failures()
    );
    assert!(cutting.cuts() >= 2, "connections were cut during calls");
    assert!(cutting.failures() > 0, "the cuts hit messages in flight");
    assert_eq!(arrived.len(), sent.len(), "every message arrived");
    assert_eq!(
        duplicates, 0,
        "Nats-Msg-Id made the stream drop republished messages"
    );
    assert_key_order(&sent, &arrived);
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.dead), (0, 0));
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_dead_lettered_while_the_others_flow() {
    let Some(h) = NatsHarness::start().await else {
        return;
    };
    let max = h.max_payload().expect("a stream limit");
    let dest = h.destination();
    let store = MemoryStore::new();
    let mut sent = messages(&dest, 100, 5);
    let big = NewMessage::new(dest.clone(), vec![b'x'; max + 1]).key("key-0");
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
    let dead = store
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, big.id());
    assert_eq!(
        dead[0].message.attempts, 1,
        "dead-lettered at the first failure"
    );
    assert!(
        h.read(1, Duration::from_millis(500)).await.is_empty(),
        "the big one never arrived"
    );
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lost_during_a_call_fails_it_quickly_and_the_client_reconnects() {
    let Some(h) = NatsHarness::start().await else {
        return;
    };
    let proxy = FaultProxy::start(server_addr().await).await.expect("proxy");
    let publisher = proxied(&proxy).await;
    publisher.check().await.expect("connected");
    let batch: Vec<outbox_core::Message> = (0..10_000)
        .map(|i| stored(NewMessage::new(h.destination(), vec![b'x'; 1000]).key(format!("k{i}"))))
        .collect();

    let started = std::time::Instant::now();
    let (result, ()) = tokio::join!(publisher.publish(&batch), async {
        tokio::time::sleep(Duration::from_millis(2)).await;
        proxy.set_down(true);
    });
    let elapsed = started.elapsed();
    // Bounded by about twice the ack timeout (1 s), whatever the connection does.
    assert!(
        elapsed < Duration::from_secs(4),
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
    // While the server is away, calls fail transiently and fast.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let err = publisher.publish(&batch[..1]).await.expect_err("down");
    assert!(err.is_transient(), "{err}");
    assert!(started.elapsed() < Duration::from_millis(500));

    // The client reconnects by itself once the server is back.
    proxy.set_down(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match publisher.publish(&batch[..10]).await {
            Ok(outcomes)
                if outcomes
                    .iter()
                    .all(outbox_core::PublishOutcome::is_published) =>
            {
                break;
            }
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "not reconnected: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    h.teardown().await;
}
