//! Random fault schedules for property tests: whatever fails when, no committed message is
//! lost, no rolled-back one is published, and per-key order of first deliveries holds.
//!
//! ```ignore
//! proptest::proptest! {
//!     #[test]
//!     fn random_failures_lose_nothing(schedule in outbox_testkit::schedule::schedules()) {
//!         let rt = tokio::runtime::Runtime::new().unwrap();
//!         rt.block_on(outbox_testkit::schedule::run(MyHarness::new(), schedule));
//!     }
//! }
//! ```

use std::time::Duration;

use outbox_core::{DeadLetterFilter, MessageId, NewMessage, RelayConfig, RetryPolicy, Store};
use proptest::prelude::*;

use crate::relay::{RunningRelay, check_history, fast_config};
use crate::{ScriptedPublisher, StoreHarness};

/// What happens to one message when it is published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Published at the first attempt.
    Ok,
    /// Fails transiently this many times first (fewer than [`MAX_ATTEMPTS`]).
    Transient(u32),
    /// Fails transiently every time, so it runs out of attempts if its failures count: when
    /// the broker confirms other messages of the same calls. Alone in its calls (a small batch
    /// holding nothing but its key), its failures look like an outage and count as no
    /// attempt; after a while the schedule relents and lets it through.
    Exhausted,
    /// Fails permanently.
    Permanent,
}

/// One random run: messages with their key and fate, calls that fail or hang, relay settings.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Key (one of a few, so that ordering is stressed) and fate of each message, in enqueue
    /// order; some are enqueued in transactions that roll back.
    pub messages: Vec<(Option<u8>, Fate, bool)>,
    /// Calls that fail as a whole.
    pub failed_calls: u32,
    /// Calls that hang until the publish timeout.
    pub hung_calls: u32,
    /// Relay batch size.
    pub batch_size: usize,
    /// Relay concurrency.
    pub concurrency: usize,
    /// Whether the publisher declares per-key order within a call.
    pub ordered: bool,
}

/// Attempts a message is given in a schedule run. Whole-call failures and hung calls are
/// outages, which count as no message's attempt.
pub const MAX_ATTEMPTS: u32 = 4;

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        6 => Just(Fate::Ok),
        3 => (1..MAX_ATTEMPTS).prop_map(Fate::Transient),
        1 => Just(Fate::Exhausted),
        1 => Just(Fate::Permanent),
    ]
}

/// Random schedules of up to 60 messages over 4 keys.
pub fn schedules() -> impl Strategy<Value = Schedule> {
    (
        prop::collection::vec(
            (
                prop::option::weighted(0.8, 0u8..4),
                fate(),
                prop::bool::weighted(0.1),
            ),
            1..60,
        ),
        0u32..4,
        0u32..2,
        1usize..20,
        1usize..4,
        any::<bool>(),
    )
        .prop_map(
            |(messages, failed_calls, hung_calls, batch_size, concurrency, ordered)| Schedule {
                messages,
                failed_calls,
                hung_calls,
                batch_size,
                concurrency,
                ordered,
            },
        )
}

/// Runs `schedule` on the harness's store and checks the guarantee.
pub async fn run<H: StoreHarness>(h: H, schedule: Schedule) {
    let publisher = ScriptedPublisher::new().ordered(schedule.ordered);
    publisher.fail_calls(schedule.failed_calls);
    publisher.hang_calls(schedule.hung_calls);
    let mut committed = Vec::new();
    let mut doomed: Vec<MessageId> = Vec::new();
    let mut exhausted: Vec<MessageId> = Vec::new();
    for (i, (key, fate, rolled_back)) in schedule.messages.iter().enumerate() {
        let mut msg = NewMessage::new("schedule", format!("{i}"));
        if let Some(key) = key {
            msg = msg.key(format!("k{key}"));
        }
        if *rolled_back {
            h.enqueue_rolled_back(vec![msg])
                .await
                .expect("rolled-back enqueue");
            continue;
        }
        match fate {
            Fate::Ok => {}
            Fate::Transient(times) => publisher.fail_transient(msg.id(), *times),
            Fate::Exhausted => {
                publisher.fail_transient(msg.id(), u32::MAX);
                doomed.push(msg.id());
                exhausted.push(msg.id());
            }
            Fate::Permanent => {
                publisher.fail_permanent(msg.id());
                doomed.push(msg.id());
            }
        }
        committed.push(msg);
    }
    for chunk in committed.chunks(7) {
        h.enqueue(chunk.to_vec()).await.expect("enqueue");
    }
    let config: RelayConfig = fast_config()
        .batch_size(schedule.batch_size)
        .concurrency(schedule.concurrency)
        .lease(Duration::from_secs(2))
        .publish_timeout(Duration::from_millis(150))
        .retry(
            RetryPolicy::default()
                .initial_delay(Duration::from_millis(2))
                .max_delay(Duration::from_millis(10))
                .max_attempts(MAX_ATTEMPTS),
        );
    let relay = outbox_core::Relay::builder(h.store(), publisher.clone())
        .config(config)
        .build()
        .expect("config");
    let wakeup = relay.wakeup();
    let running = RunningRelay::spawn(relay);
    let store = h.store();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // A message that fails transiently for ever is dead-lettered only once its failures are
    // its own, that is while the broker confirms other messages of the same calls: keyless
    // messages keep flowing until every doomed message is dead, or until the schedule relents.
    let mut fillers = 0;
    let relent_at = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut relented = false;
    loop {
        let stats = store.stats().await.expect("stats");
        if stats.pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox did not drain: {schedule:?}"
        );
        if !relented && tokio::time::Instant::now() >= relent_at {
            // What is still failing has never shared a call with a confirmed message: it
            // goes through from now on (published, not dead).
            relented = true;
            for id in &exhausted {
                publisher.fail_transient(*id, 0);
            }
        }
        if !relented && (stats.dead as usize) < doomed.len() {
            let filler = NewMessage::new("schedule", format!("filler {fillers}"));
            fillers += 1;
            h.enqueue(vec![filler.clone()]).await.expect("enqueue");
            committed.push(filler);
            wakeup.wake();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.stop(Duration::from_secs(10)).await;

    let dead: Vec<MessageId> = store
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("dead letters")
        .into_iter()
        .map(|d| d.message.id)
        .collect();
    let mut dead_sorted = dead.clone();
    dead_sorted.sort();
    if relented {
        // Exhausted messages the schedule let through are published, not dead.
        doomed.retain(|id| !exhausted.contains(id) || dead.contains(id));
    }
    doomed.sort();
    assert_eq!(
        dead_sorted, doomed,
        "exactly the doomed messages are dead letters"
    );
    let expected: Vec<NewMessage> = committed
        .into_iter()
        .filter(|m| !doomed.contains(&m.id()))
        .collect();
    check_history(&publisher.inner().published(), &expected);
    assert_eq!(
        publisher.overlaps(),
        0,
        "a message was in flight twice at once"
    );
    h.teardown().await;
}
