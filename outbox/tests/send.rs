//! Every public future of the publishers, the in-memory backends and the relay is `Send` and
//! can be spawned: a service runs them from `tokio::spawn`, an axum handler or an
//! `#[async_trait]` method. This file only has to compile; a future that stops being `Send`
//! (a guard held across an await, a borrow that is not general enough) breaks the build. The
//! SQL stores have the same check in `outbox-sqlx/tests/send.rs`.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use outbox::prelude::*;
use outbox::{
    DynPublisher, DynStore, JsonLinesPublisher, MemoryPublisher, MemoryStore, Message, NewMessage,
    Relay, RelayHandle, Wakeup,
};

/// Compiles only for futures a multi-threaded runtime can spawn.
fn spawnable<F: Future + Send + 'static>(_: F) {}

/// Every `Publisher` method, on a shared publisher, inside a spawned task.
fn publisher_methods<P: Publisher>(publisher: P) {
    let publisher = std::sync::Arc::new(publisher);
    let p = publisher.clone();
    spawnable(async move {
        let batch: Vec<Message> = Vec::new();
        let _ = p.publish(&batch).await;
    });
    let p = publisher.clone();
    spawnable(async move { p.check().await });
    spawnable(async move { publisher.flush().await });
}

/// Every `Store` method, inside a spawned task.
fn store_methods<S: Store + Clone>(store: S) {
    spawnable(async move {
        let relay = outbox::RelayId::random();
        let _ = store.claim(&relay, 10, Duration::from_secs(1)).await;
        let _ = store
            .settle(outbox::LeaseToken::new(), &Default::default())
            .await;
        let _ = store.heartbeat(&relay, Duration::from_secs(1)).await;
        let _ = store.members().await;
        let _ = store.acquire(&relay, &[0, 1], Duration::from_secs(1)).await;
        let _ = store.release(&relay, &[0]).await;
        let _ = store.leave(&relay).await;
        let _ = store.stats().await;
        let filter = outbox::DeadLetterFilter::all();
        let _ = store.dead_letters(&filter).await;
        let _ = store.replay(&filter).await;
        let _ = store.purge(&filter).await;
        let _ = store.cleanup(10).await;
        let _ = store.listen(Wakeup::new()).await;
    });
}

/// Every public async method of the relay, and its handle.
fn relay_methods<S: Store + Clone, P: Publisher + Clone>(relay: Relay<S, P>) {
    let r = relay.clone();
    spawnable(async move { r.rebalance().await });
    let r = relay.clone();
    spawnable(async move { r.run_once().await });
    let r = relay.clone();
    spawnable(async move { r.run(std::future::pending()).await });
    let handle: RelayHandle<S, P> = relay.spawn(std::future::pending());
    spawnable(handle);
}

fn in_process_backends(store: MemoryStore, publisher: MemoryPublisher) {
    store_methods(store.clone());
    publisher_methods(publisher.clone());
    publisher_methods(JsonLinesPublisher::stdout());
    let p = publisher.clone();
    spawnable(async move { p.wait_for(1, Duration::from_secs(1)).await });
    spawnable(async move {
        let mut tx = store.begin();
        let _ = store.enqueue(&mut tx, NewMessage::new("t", "x")).await;
        let _ = store
            .enqueue_batch(&mut tx, vec![NewMessage::new("t", "x")])
            .await;
        tx.commit();
    });
    spawnable(async move { Wakeup::new().woken().await });
}

fn dyn_backends(store: std::sync::Arc<dyn DynStore>, publisher: std::sync::Arc<dyn DynPublisher>) {
    store_methods(store.clone());
    publisher_methods(publisher.clone());
    relay_methods(Relay::builder(store, publisher).build().expect("relay"));
}

#[cfg(feature = "kafka")]
fn kafka(config: outbox::KafkaConfig, publisher: outbox::KafkaPublisher) {
    publisher_methods(publisher);
    let c = config.clone();
    spawnable(async move { outbox::KafkaPublisher::new(c).await });
    spawnable(async move { outbox::KafkaPublisher::connect(config).await });
}

#[cfg(feature = "amqp")]
fn amqp(config: outbox::AmqpConfig, publisher: outbox::AmqpPublisher) {
    let p = publisher.clone();
    spawnable(async move { p.close().await });
    publisher_methods(publisher);
    let c = config.clone();
    spawnable(async move { outbox::AmqpPublisher::new(c).await });
    spawnable(async move { outbox::AmqpPublisher::connect(config).await });
}

#[cfg(feature = "nats")]
fn nats(
    config: outbox::NatsConfig,
    publisher: outbox::NatsPublisher,
    spec: outbox::nats::StreamSpec,
) {
    let p = publisher.clone();
    spawnable(async move { p.ensure_stream(&spec).await });
    publisher_methods(publisher);
    let c = config.clone();
    spawnable(async move { outbox::NatsPublisher::new(c).await });
    spawnable(async move { outbox::NatsPublisher::connect(config).await });
}

#[test]
fn public_futures_are_send() {
    // The checks above are made by the compiler; this test exists so that `cargo test` builds
    // this file.
}
