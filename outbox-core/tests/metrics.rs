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
