//! The relay records the documented metrics.

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use outbox_core::{
    MemoryStore, Message, NewMessage, PublishError, PublishOutcome, Publisher, Relay, Store,
    metrics as names,
};

/// Publishes everything except payloads equal to "poison", which fail for good.
struct PoisonRefusing;

impl Publisher for PoisonRefusing {
    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        Ok(batch
            .iter()
            .map(|m| {
                if m.payload == b"poison" {
                    PublishOutcome::Failed(PublishError::permanent("refused"))
                } else {
                    PublishOutcome::Published
                }
            })
            .collect())
    }
}

#[test]
fn a_batch_records_counters_and_histograms() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let store = MemoryStore::new();
    let mut tx = store.begin();
    for payload in ["a", "poison", "b"] {
        tx.enqueue(NewMessage::new("t", payload)).expect("enqueue");
    }
    tx.commit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let relay = Relay::builder(store.clone(), PoisonRefusing)
                .build()
                .expect("relay");
            let report = relay.run_once().await.expect("run once");
            assert_eq!((report.published, report.dead_lettered), (2, 1));
        })
    });
    let snapshot = snapshotter.snapshot().into_hashmap();
    let value = |name: &str| {
        snapshot
            .iter()
            .find(|(key, _)| key.key().name() == name)
            .map(|(_, (_, _, value))| value)
    };
    assert_eq!(value(names::PUBLISHED), Some(&DebugValue::Counter(2)));
    assert_eq!(value(names::DEAD_LETTERED), Some(&DebugValue::Counter(1)));
    assert_eq!(value(names::RETRIED), Some(&DebugValue::Counter(0)));
    assert!(
        matches!(value(names::OWNED_PARTITIONS), Some(DebugValue::Gauge(g)) if g.into_inner() == 64.0)
    );
    match value(names::COMMIT_TO_PUBLISH) {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len(), 2),
        other => panic!("commit-to-publish latency not recorded: {other:?}"),
    }
    match value(names::BATCH_SIZE) {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples[0].into_inner(), 3.0),
        other => panic!("batch size not recorded: {other:?}"),
    }
    assert!(matches!(
        value(names::PUBLISH_DURATION),
        Some(DebugValue::Histogram(_))
    ));
    let stats = rt.block_on(store.stats()).expect("stats");
    assert_eq!((stats.pending, stats.dead), (0, 1));
}

/// Publishes once the test lets it: the first call waits for `go`.
struct Gated(std::sync::Arc<tokio::sync::Semaphore>);

impl Publisher for Gated {
    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        let _permit = self.0.acquire().await;
        Ok(batch.iter().map(|_| PublishOutcome::Published).collect())
    }
}

#[test]
fn ages_and_latencies_are_on_the_store_clock_whatever_the_relay_clock_says() {
    use std::time::Duration;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The database's clock runs 90 s behind the relay's host.
    let store = MemoryStore::new().with_clock_skew(chrono::Duration::seconds(-90));
    let mut tx = store.begin();
    tx.enqueue(NewMessage::new("t", "a").key("k"))
        .expect("enqueue");
    tx.commit();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let gauge = |name: &str| {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(key, _, _, _)| key.key().name() == name)
            .map(|(_, _, _, value)| value)
    };
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let relay = Relay::builder(store.clone(), Gated(gate.clone()))
                .config(
                    outbox_core::RelayConfig::default().stats_interval(Duration::from_millis(50)),
                )
                .build()
                .expect("relay");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let running = tokio::spawn(async move {
                relay
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
            });
            // The message waits at the gate while the stats are read.
            tokio::time::sleep(Duration::from_millis(300)).await;
            match gauge(names::OLDEST_PENDING_AGE) {
                Some(DebugValue::Gauge(age)) => assert!(
                    age.into_inner() < 5.0,
                    "oldest pending age {} s: off by the clock skew",
                    age.into_inner()
                ),
                other => panic!("oldest pending age not recorded: {other:?}"),
            }
            gate.add_permits(1000);
            while store.stats().await.expect("stats").pending > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = stop.send(());
            running.await.expect("task").expect("relay");
        })
    });
    match gauge(names::COMMIT_TO_PUBLISH) {
        Some(DebugValue::Histogram(samples)) => {
            assert_eq!(samples.len(), 1);
            assert!(
                samples[0].into_inner() < 5.0,
                "commit to publish {} s: off by the clock skew",
                samples[0].into_inner()
            );
        }
        other => panic!("commit-to-publish latency not recorded: {other:?}"),
    }
}
