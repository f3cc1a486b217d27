//! Metric names, recorded through the [`metrics`] facade. Install any recorder (for example
//! `metrics-exporter-prometheus`) to export them; without one they cost next to nothing.
//!
//! | name | type | meaning |
//! | --- | --- | --- |
//! | `outbox_published_total` | counter | messages confirmed by the broker |
//! | `outbox_retried_total` | counter | failed attempts scheduled for a retry |
//! | `outbox_dead_lettered_total` | counter | messages dead-lettered (permanent failure, attempts exhausted, undecodable) |
//! | `outbox_released_total` | counter | claimed messages handed back unpublished (shutdown, key blocked, lease too short; the log relay: handed to the table) |
//! | `outbox_fenced_total` | counter | outcomes not recorded because the lease had expired (the messages will be published again) |
//! | `outbox_publish_errors_total` | counter | publish calls that failed as a whole or timed out |
//! | `outbox_store_errors_total` | counter | failed store operations |
//! | `outbox_backlog` | gauge | pending messages |
//! | `outbox_oldest_pending_age_seconds` | gauge | age of the oldest pending message, on the store's clock |
//! | `outbox_dead_letters` | gauge | dead letters kept |
//! | `outbox_owned_partitions` | gauge | partitions this relay owns |
//! | `outbox_relay_paused` | gauge, label `cause` (`broker`, `store`) | 1 while the relay is paused by an outage of that side, else 0 |
//! | `outbox_publish_duration_seconds` | histogram | duration of one publish call |
//! | `outbox_commit_to_publish_seconds` | histogram | from enqueue to broker confirmation, on the store's clock (the relay's clock corrected by its offset from the store's, read with each stats refresh) |
//! | `outbox_batch_size` | histogram | messages per claimed batch |

/// Messages confirmed by the broker.
pub const PUBLISHED: &str = "outbox_published_total";
/// Failed attempts scheduled for a retry.
pub const RETRIED: &str = "outbox_retried_total";
/// Messages dead-lettered.
pub const DEAD_LETTERED: &str = "outbox_dead_lettered_total";
/// Claimed messages handed back unpublished.
pub const RELEASED: &str = "outbox_released_total";
/// Outcomes not recorded because the lease had expired.
pub const FENCED: &str = "outbox_fenced_total";
/// Publish calls that failed as a whole or timed out.
pub const PUBLISH_ERRORS: &str = "outbox_publish_errors_total";
/// Failed store operations.
pub const STORE_ERRORS: &str = "outbox_store_errors_total";
/// Pending messages.
pub const BACKLOG: &str = "outbox_backlog";
/// Age of the oldest pending message, in seconds.
pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
/// Dead letters kept.
pub const DEAD_LETTERS: &str = "outbox_dead_letters";
/// Partitions this relay owns.
pub const OWNED_PARTITIONS: &str = "outbox_owned_partitions";
/// 1 while the relay is paused by an outage, with label `cause` = `broker` or `store`.
pub const PAUSED: &str = "outbox_relay_paused";
/// Duration of one publish call, in seconds.
pub const PUBLISH_DURATION: &str = "outbox_publish_duration_seconds";
/// From enqueue to broker confirmation, in seconds.
pub const COMMIT_TO_PUBLISH: &str = "outbox_commit_to_publish_seconds";
/// Messages per claimed batch.
pub const BATCH_SIZE: &str = "outbox_batch_size";

/// Registers descriptions of every metric with the installed recorder, and every counter at 0.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(PUBLISHED, "Messages confirmed by the broker");
    describe_counter!(RETRIED, "Failed attempts scheduled for a retry");
    describe_counter!(DEAD_LETTERED, "Messages dead-lettered");
    describe_counter!(RELEASED, "Claimed messages handed back unpublished");
    describe_counter!(
        FENCED,
        "Outcomes not recorded because the lease had expired"
    );
    describe_counter!(
        PUBLISH_ERRORS,
        "Publish calls that failed as a whole or timed out"
    );
    describe_counter!(STORE_ERRORS, "Failed store operations");
    describe_gauge!(BACKLOG, "Pending messages");
    describe_gauge!(
        OLDEST_PENDING_AGE,
        Unit::Seconds,
        "Age of the oldest pending message"
    );
    describe_gauge!(DEAD_LETTERS, "Dead letters kept");
    describe_gauge!(OWNED_PARTITIONS, "Partitions this relay owns");
    describe_gauge!(
        PAUSED,
        "1 while the relay is paused by an outage of the broker or the store"
    );
    describe_histogram!(
        PUBLISH_DURATION,
        Unit::Seconds,
        "Duration of one publish call"
    );
    describe_histogram!(
        COMMIT_TO_PUBLISH,
        Unit::Seconds,
        "From enqueue to broker confirmation"
    );
    describe_histogram!(BATCH_SIZE, "Messages per claimed batch");
    // Counters are exported from the start, at 0: a rate over a counter that never moved is
    // 0, not missing.
    for counter in [
        PUBLISHED,
        RETRIED,
        DEAD_LETTERED,
        RELEASED,
        FENCED,
        PUBLISH_ERRORS,
        STORE_ERRORS,
    ] {
        metrics::counter!(counter).increment(0);
    }
}
