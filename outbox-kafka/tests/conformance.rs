//! The `outbox-testkit` publisher suite against a real Kafka-protocol broker
//! (`OUTBOX_TEST_KAFKA_BROKERS`, default `127.0.0.1:9092`).

mod common;

outbox_testkit::publisher_suite!(common::harness);
