//! A graceful shutdown with default settings ends within its bound, even when the broker and
//! the database stopped answering, and loses nothing: the bound a Kubernetes grace period
//! needs. Runs on a paused clock, so the bound is measured exactly and the test takes no time.

use std::time::Duration;

use outbox_core::{MemoryStore, NewMessage, Relay, RelayConfig, Store};
use outbox_testkit::relay::check_history;
use outbox_testkit::{FaultyStore, ScriptedPublisher};
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn shutdown_ends_within_its_bound_when_broker_and_database_hang() {
    let defaults = RelayConfig::default();
    assert_eq!(
        defaults.shutdown_timeout,
        Duration::from_secs(20),
        "the documented default"
    );
    let memory = MemoryStore::new();
    let sent: Vec<NewMessage> = (0..40)
        .map(|i| NewMessage::new("t", format!("m{i}")).key(format!("k{}", i % 4)))
        .collect();
    let mut tx = memory.begin();
    for msg in &sent {
        tx.enqueue(msg.clone()).expect("enqueue");
    }
    tx.commit();

    let store = FaultyStore::new(memory.clone());
    let publisher = ScriptedPublisher::new();
    publisher.hang_all(true);
    let relay = Relay::builder(store.clone(), publisher.clone())
        .build()
        .expect("default relay");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    while publisher.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // From now on nothing answers: publishes hang, and so does every store call (the
    // settles that would hand messages back, giving up the partitions).
    store.hang_all(true);
    let signalled = Instant::now();
    let _ = stop.send(());
    running
        .await
        .expect("the relay task")
        .expect("a hung broker and store are not errors");
    let took = signalled.elapsed();
    assert!(
        took <= defaults.shutdown_timeout,
        "shutdown took {took:?}, past its bound of {:?}",
        defaults.shutdown_timeout
    );

    // What the stopped relay could not hand back returns when its lease expires. The store
    // keeps time by the host's clock, which the paused test clock does not move: the next
    // relay sees the store as it will be once every lease of the stopped one has expired.
    store.hang_all(false);
    publisher.hang_all(false);
    let expired = defaults.lease.max(defaults.partition_lease) * 2;
    let later = memory
        .clone()
        .with_clock_skew(chrono::Duration::from_std(expired).expect("a duration"));
    let next = Relay::builder(later, publisher.clone())
        .build()
        .expect("default relay");
    let deadline = Instant::now() + defaults.lease * 3;
    while memory.stats().await.expect("stats").pending > 0 {
        assert!(Instant::now() < deadline, "the messages come back");
        next.run_once().await.expect("run once");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check_history(&publisher.inner().published(), &sent);
}
