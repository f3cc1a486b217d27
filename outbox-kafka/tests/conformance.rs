//! The `outbox-testkit` publisher suite against a real Kafka-protocol broker
//! (`OUTBOX_TEST_KAFKA_BROKERS`, default `127.0.0.1:9092`).

mod common;

outbox_testkit::publisher_suite!(common::harness);

/// The suite again with `pipeline_keys`: calls then carry several messages of a key.
mod pipelined {
    use super::common::{KafkaHarness, admin_or_skip};

    async fn harness() -> Option<KafkaHarness> {
        let admin = admin_or_skip().await?;
        Some(KafkaHarness::with(admin, |config| config.pipeline_keys(true)).await)
    }

    outbox_testkit::publisher_suite!(harness);
}
