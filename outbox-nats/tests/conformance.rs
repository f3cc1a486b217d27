//! The testkit's publisher suite against NATS JetStream.

mod common;

use common::{NatsHarness, Options};

/// A fresh stream with a 256 KiB `max_message_size`, so that the oversized check runs.
async fn harness() -> Option<NatsHarness> {
    NatsHarness::with(Options::default(), |config| config).await
}

outbox_testkit::publisher_suite!(harness);

/// The suite again with `pipeline_keys`: calls then carry several messages of a key.
mod pipelined {
    use super::common::{NatsHarness, Options};

    async fn harness() -> Option<NatsHarness> {
        NatsHarness::with(Options::default(), |config| config.pipeline_keys(true)).await
    }

    outbox_testkit::publisher_suite!(harness);
}
