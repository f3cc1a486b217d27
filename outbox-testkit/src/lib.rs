//! Conformance suites for `outbox` stores, publishers and inboxes, for this workspace's
//! backends and for third-party ones: one [`StoreHarness`], [`PublisherHarness`] or
//! [`InboxHarness`] and one macro line run the whole contract against your backend.
//!
//! ```ignore
//! // tests/conformance.rs of a store crate
//! async fn harness() -> Option<MyHarness> {
//!     // None skips (unless OUTBOX_TEST_REQUIRE=1, where a missing server must panic instead).
//!     outbox_testkit::env::or_skip("mydb", MyHarness::connect().await)
//! }
//! outbox_testkit::store_suite!(harness);
//! outbox_testkit::relay_suite!(harness);
//! ```
//!
//! The macros expand into one `#[tokio::test]` per suite function, so the test crate needs
//! `tokio` with the `macros` and `rt-multi-thread` features. Every suite function is public
//! too, to be called on its own.
//!
//! Also here: [`ScriptedPublisher`] (faults on cue), [`FaultyStore`] (settle failures on cue),
//! [`proxy::FaultProxy`] (cuts, refuses or black-holes TCP connections), [`servers`] (private
//! PostgreSQL and MariaDB servers to restart) and [`env`] (service URLs, skip-or-fail).
//!
//! With the `testcontainers` feature, [`containers`] starts the servers in Docker containers
//! for developers who have a Docker engine; the workspace's own CI runs against servers on the
//! machine and only compiles that feature. With the `tls` feature, [`tls`] makes certificates
//! for TLS tests and terminates TLS in front of servers that have none.
//!
//! This crate is for implementers and tests: its API may change between minor versions.

#[cfg(feature = "testcontainers")]
pub mod containers;
mod cutting;
pub mod env;
mod faulty;
mod harness;
pub mod inbox;
pub mod proxy;
pub mod publisher;
pub mod relay;
pub mod schedule;
mod scripted;
pub mod servers;
pub mod store;
pub mod tansu;
#[cfg(feature = "tls")]
pub mod tls;

pub use cutting::CuttingPublisher;
pub use faulty::FaultyStore;
pub use harness::{PublisherHarness, Received, StoreHarness};
pub use inbox::InboxHarness;
pub use scripted::{Outage, ScriptedPublisher};

#[doc(hidden)]
#[macro_export]
macro_rules! __suite {
    ($module:ident, $factory:path; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                if let Some(harness) = $factory().await {
                    $crate::$module::$test(harness).await;
                }
            }
        )*
    };
}

/// Expands the store suite into one `#[tokio::test]` per check. `$factory` is a path to an
/// `async fn() -> Option<impl StoreHarness>` that returns a fresh, isolated harness (or `None`
/// to skip when the server is missing and not required).
#[macro_export]
macro_rules! store_suite {
    ($factory:path) => {
        $crate::__suite!(store, $factory;
            committed_messages_are_claimed_rolled_back_never,
            claims_follow_enqueue_order_and_limit,
            claims_follow_write_order_not_commit_order,
            claims_need_partition_ownership,
            concurrent_claims_never_share_a_message,
            concurrent_claims_keep_key_order,
            expired_leases_return_messages,
            settles_are_fenced,
            later_messages_of_a_key_wait_for_earlier_ones,
            retries_count_attempts_and_keep_the_error,
            published_messages_are_done,
            dead_letters_are_listed_replayed_and_purged,
            partitions_have_one_owner_at_a_time,
            heartbeats_track_live_relays,
            stats_count_the_backlog,
            messages_round_trip_unchanged,
            invalid_messages_are_refused,
            undecodable_rows_are_reported_not_fatal,
        );
    };
}

/// Expands the inbox suite into one `#[tokio::test]` per check; `$factory` is a path to an
/// `async fn() -> Option<impl InboxHarness>`.
#[macro_export]
macro_rules! inbox_suite {
    ($factory:path) => {
        $crate::__suite!(inbox, $factory;
            a_message_is_new_once,
            rolled_back_records_are_forgotten,
            consumers_are_independent,
            concurrent_deliveries_are_new_exactly_once,
            a_waiting_delivery_records_after_a_rollback,
            purges_delete_old_records_in_bounded_batches,
            invalid_consumer_names_are_refused,
        );
    };
}

/// Expands the relay suite (the guarantee end to end on the store under test) into one
/// `#[tokio::test]` per check; `$factory` as for [`store_suite!`].
#[macro_export]
macro_rules! relay_suite {
    ($factory:path) => {
        $crate::__suite!(relay, $factory;
            relay_publishes_every_committed_message,
            transient_failures_are_retried,
            failed_and_hung_calls_lose_nothing,
            hung_store_calls_time_out_and_lose_nothing,
            failed_settles_mean_republish_not_loss,
            a_relay_dying_mid_batch_is_taken_over,
            key_order_holds_through_failures,
            retries_end_in_a_dead_letter,
            broker_outages_dead_letter_nothing,
            store_outages_pause_the_relay,
            stored_errors_are_clean,
            relays_share_the_work,
            expired_leases_cannot_settle,
            graceful_shutdown_loses_nothing,
            undecodable_rows_are_dead_lettered,
            replayed_dead_letters_are_published,
        );
    };
}

/// Expands the publisher suite into one `#[tokio::test]` per check. `$factory` is a path to an
/// `async fn() -> Option<impl PublisherHarness>` returning a harness on a fresh destination.
#[macro_export]
macro_rules! publisher_suite {
    ($factory:path) => {
        $crate::__suite!(publisher, $factory;
            messages_arrive_unchanged,
            one_outcome_per_message,
            key_order_is_kept_through_a_relay,
            oversized_messages_fail_permanently,
            invalid_destinations_fail_permanently,
            a_dropped_call_leaves_the_publisher_usable,
            check_and_flush_succeed,
        );
    };
}
