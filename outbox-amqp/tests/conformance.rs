//! The testkit's publisher suite against RabbitMQ.

mod common;

use common::AmqpHarness;
use lapin::ExchangeKind;

/// A fresh fanout exchange and queue; a 1 MiB publisher limit so that the oversized check runs.
async fn harness() -> Option<AmqpHarness> {
    AmqpHarness::with(ExchangeKind::Fanout, |config| {
        config.max_message_size(1024 * 1024)
    })
    .await
}

outbox_testkit::publisher_suite!(harness);
