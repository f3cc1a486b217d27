//! The relay suite: the guarantee, end to end, on the store under test.
//!
//! At least once through publish, settle and relay failures; per-key order through failures;
//! retries with backoff then dead letters; several relays sharing one store; fencing; graceful
//! shutdown. Expand them all with [`crate::relay_suite!`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use outbox_core::{
    DeadLetterFilter, MemoryPublisher, Message, MessageId, NewMessage, Publisher, Relay,
    RelayConfig, RelayError, RetryPolicy, Store,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::store::message;
use crate::{FaultyStore, Outage, ScriptedPublisher, StoreHarness};

/// Settings that make the suite quick: short leases, polls and retry delays.
pub fn fast_config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(50)
        .concurrency(4)
        .lease(Duration::from_secs(3))
        .publish_timeout(Duration::from_millis(500))
        .partition_lease(Duration::from_millis(900))
        .poll_min(Duration::from_millis(5))
        .poll_max(Duration::from_millis(50))
        .shutdown_timeout(Duration::from_secs(2))
        .stats_interval(Duration::from_millis(200))
        .cleanup_interval(Duration::from_millis(200))
        .retry(
            RetryPolicy::default()
                .initial_delay(Duration::from_millis(20))
                .max_delay(Duration::from_millis(100))
                .max_attempts(5),
        )
}

/// A relay running in a task of its own.
pub struct RunningRelay {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), RelayError>>,
}

impl RunningRelay {
    /// Starts `relay.run` in a task.
    pub fn spawn<S: Store, P: Publisher>(relay: Relay<S, P>) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            relay
                .run(async {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            stop: Some(stop),
            handle,
        }
    }

    /// Asks for a graceful shutdown and waits for it; panics if the relay failed or took longer
    /// than `bound`.
    pub async fn stop(mut self, bound: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(bound, &mut self.handle)
            .await
            .expect("the relay stops within its bound")
            .expect("the relay task");
        result.expect("the relay ran without error");
    }

    /// Kills the relay's task as a crash would look to the store: no settle, no release, no
    /// goodbye. (A process crash is tested with the `outbox-relay` binary.)
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

fn relay<S: Store, P: Publisher>(store: S, publisher: P, config: RelayConfig) -> Relay<S, P> {
    Relay::builder(store, publisher)
        .config(config)
        .build()
        .expect("valid config")
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn drained<S: Store>(store: S) -> bool {
    store.stats().await.is_ok_and(|s| s.pending == 0)
}

/// Checks a publish history against what was enqueued: every id in `expected` was published at
/// least once, nothing else was, and first deliveries of each key follow enqueue order.
/// Returns the number of duplicates.
pub fn check_history(published: &[Message], expected: &[NewMessage]) -> usize {
    let position: HashMap<MessageId, usize> = expected
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id(), i))
        .collect();
    let mut first_seen = HashSet::new();
    let mut last_of_key: HashMap<String, usize> = HashMap::new();
    let mut duplicates = 0;
    for msg in published {
        let Some(&pos) = position.get(&msg.id) else {
            panic!("message {} was published but never committed", msg.id);
        };
        if !first_seen.insert(msg.id) {
            duplicates += 1;
            continue;
        }
        if let Some(key) = &msg.key {
            if let Some(&prev) = last_of_key.get(key) {
                assert!(
                    pos > prev,
                    "key {key}: message #{pos} first delivered after #{prev}"
                );
            }
            last_of_key.insert(key.clone(), pos);
        }
    }
    let missing: Vec<_> = expected
        .iter()
        .filter(|m| !first_seen.contains(&m.id()))
        .map(NewMessage::id)
        .collect();
    assert!(
        missing.is_empty(),
        "{} committed messages never published: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    duplicates
}

fn workload(messages: usize, keys: usize) -> Vec<NewMessage> {
    (0..messages)
        .map(|i| {
            if i % 7 == 6 {
                message(None, i)
            } else {
                message(Some(&format!("key-{}", i % keys)), i)
            }
        })
        .collect()
}

/// Every committed message is published, none that rolled back; a wake-up is enough to start.
pub async fn relay_publishes_every_committed_message<H: StoreHarness>(h: H) {
    let publisher = MemoryPublisher::new();
    let relay_ = relay(
        h.store(),
        publisher.clone(),
        fast_config().poll_max(Duration::from_secs(5)),
    );
    let wakeup = relay_.wakeup();
    let running = RunningRelay::spawn(relay_);
    let sent = workload(300, 10);
    for chunk in sent.chunks(30) {
        h.enqueue(chunk.to_vec()).await.expect("enqueue");
        h.enqueue_rolled_back(vec![message(Some("key-1"), 9999)])
            .await
            .expect("rollback");
        wakeup.wake();
    }
    assert!(
        publisher
            .wait_for(sent.len(), Duration::from_secs(20))
            .await,
        "all published"
    );
    eventually("the outbox is drained", Duration::from_secs(10), || {
        drained(h.store())
    })
    .await;
    running.stop(Duration::from_secs(10)).await;
    check_history(&publisher.published(), &sent);
    h.teardown().await;
}

/// Transient failures are retried until the message is published (at least once).
pub async fn transient_failures_are_retried<H: StoreHarness>(h: H) {
    let publisher = ScriptedPublisher::new();
    let sent = workload(40, 4);
    for msg in sent.iter().step_by(3) {
        publisher.fail_transient(msg.id(), 2);
    }
    h.enqueue(sent.clone()).await.expect("enqueue");
    let running = RunningRelay::spawn(relay(h.store(), publisher.clone(), fast_config()));
    eventually("the outbox is drained", Duration::from_secs(20), || {
        drained(h.store())
    })
    .await;
    running.stop(Duration::from_secs(10)).await;
    check_history(&publisher.inner().published(), &sent);
    assert!(
        publisher.failures() >= 2 * 14,
        "the scripted failures happened"
    );
    assert_eq!(h.store().stats().await.expect("stats").dead, 0);
    h.teardown().await;
}

/// Calls that fail as a whole, and calls that hang past the publish timeout, lose nothing.
pub async fn failed_and_hung_calls_lose_nothing<H: StoreHarness>(h: H) {
    let publisher = ScriptedPublisher::new();
    publisher.fail_calls(3);
    publisher.hang_calls(2);
    let sent = workload(60, 6);
    h.enqueue(sent.clone()).await.expect("enqueue");
    let running = RunningRelay::spawn(relay(h.store(), publisher.clone(), fast_config()));
    eventually("the outbox is drained", Duration::from_secs(30), || {
        drained(h.store())
    })
    .await;
    running.stop(Duration::from_secs(10)).await;
    check_history(&publisher.inner().published(), &sent);
    assert_eq!(h.store().stats().await.expect("stats").dead, 0);
    h.teardown().await;
}

/// Store calls that never answer are abandoned after the store timeout and retried: the relay
/// does not stall, and nothing is lost.
pub async fn hung_store_calls_time_out_and_lose_nothing<H: StoreHarness>(h: H) {
    let store = FaultyStore::new(h.store());
    // The relay's first calls (its first renewals of membership and partitions) never answer:
    // without a bound on store calls it would never start.
    store.hang_calls(3);
    let publisher = MemoryPublisher::new();
    let sent = workload(60, 6);
    h.enqueue(sent.clone()).await.expect("enqueue");
    let running = RunningRelay::spawn(relay(
        store.clone(),
        publisher.clone(),
        fast_config().store_timeout(Duration::from_millis(300)),
    ));
    assert!(
        publisher.wait_for(10, Duration::from_secs(20)).await,
        "the relay got past its hung calls"
    );
    // Then settles, claims and renewals, whichever come next.
    store.hang_calls(3);
    eventually("the outbox is drained", Duration::from_secs(30), || {
        drained(h.store())
    })
    .await;
    eventually(
        "every scripted hang happened",
        Duration::from_secs(10),
        || std::future::ready(store.hung() == 6),
    )
    .await;
    running.stop(Duration::from_secs(10)).await;
    check_history(&publisher.published(), &sent);
    assert_eq!(h.store().stats().await.expect("stats").dead, 0);
    h.teardown().await;
}

/// When recording outcomes fails, the messages are published again after their lease: at
/// least once, never lost.
pub async fn failed_settles_mean_republish_not_loss<H: StoreHarness>(h: H) {
    let store = FaultyStore::new(h.store());
    store.fail_settles(1000);
    let publisher = MemoryPublisher::new();
    let sent = workload(20, 4);
    h.enqueue(sent.clone()).await.expect("enqueue");
    let config = fast_config()
        .lease(Duration::from_secs(1))
        .publish_timeout(Duration::from_millis(300));
    let running = RunningRelay::spawn(relay(store.clone(), publisher.clone(), config));
    assert!(
        publisher
            .wait_for(sent.len(), Duration::from_secs(10))
            .await
    );
    // Outcomes cannot be recorded: the messages stay pending and come back after the lease.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        h.store().stats().await.expect("stats").pending > 0,
        "nothing was recorded"
    );
    store.fail_settles(0);
    eventually("the outbox is drained", Duration::from_secs(20), || {
        drained(h.store())
    })
    .await;
    running.stop(Duration::from_secs(10)).await;
    let duplicates = check_history(&publisher.published(), &sent);
    assert!(duplicates > 0, "unrecorded publishes are repeated");
    h.teardown().await;
}

/// A relay that dies in the middle of a batch loses nothing: another relay takes the batch
/// once the lease expires.
pub async fn a_relay_dying_mid_batch_is_taken_over<H: StoreHarness>(h: H) {
    let crashing = ScriptedPublisher::new();
    crashing.crash_after(3);
    let sent = workload(30, 3);
    h.enqueue(sent.clone()).await.expect("enqueue");
    // A publish timeout longer than the test needs: the crashed call must not time out and
    // hand its messages back before the relay is killed.
    let config = fast_config()
        .concurrency(1)
        .lease(Duration::from_secs(4))
        .publish_timeout(Duration::from_secs(2));
    let first = RunningRelay::spawn(relay(h.store(), crashing.clone(), config.clone()));
    tokio::time::timeout(Duration::from_secs(10), crashing.crashed())
        .await
        .expect("the scripted crash happens");
    first.kill().await;
    let survivor = MemoryPublisher::new();
    let started = tokio::time::Instant::now();
    let second = RunningRelay::spawn(relay(h.store(), survivor.clone(), config.clone()));
    eventually("the outbox is drained", Duration::from_secs(30), || {
        drained(h.store())
    })
    .await;
    second.stop(Duration::from_secs(10)).await;
    assert!(
        started.elapsed() >= config.lease / 4,
        "the dead relay's lease was respected: {:?}",
        started.elapsed()
    );
    let mut history = crashing.inner().published();
    history.extend(survivor.published());
    check_history(&history, &sent);
    h.teardown().await;
}

/// When a message of a key fails, later messages of that key wait until it is published or
/// dead-lettered, while other keys keep flowing.
pub async fn key_order_holds_through_failures<H: StoreHarness>(h: H) {
    let publisher = ScriptedPublisher::new();
    let blocked: Vec<NewMessage> = (0..5).map(|i| message(Some("slow"), i)).collect();
    let flowing: Vec<NewMessage> = (0..20)
        .map(|i| message(Some(&format!("fast-{}", i % 4)), 100 + i))
        .collect();
    publisher.fail_transient(blocked[0].id(), 3);
    publisher.fail_permanent(blocked[2].id());
    let mut sent = blocked.clone();
    sent.extend(flowing.iter().cloned());
    h.enqueue(sent.clone()).await.expect("enqueue");
    let config = fast_config().retry(
        RetryPolicy::default()
            .initial_delay(Duration::from_millis(200))
            .max_delay(Duration::from_millis(200))
            .jitter(0.0)
            .max_attempts(10),
    );
    let running = RunningRelay::spawn(relay(h.store(), publisher.clone(), config));
    eventually("the outbox is drained", Duration::from_secs(30), || {
        drained(h.store())
    })
    .await;
    running.stop(Duration::from_secs(10)).await;

    let history = publisher.inner().published();
    let position = |id: MessageId| history.iter().position(|m| m.id == id);
    let slow_first = position(blocked[0].id()).expect("slow-0 published after its retries");
    for msg in &flowing {
        assert!(
            position(msg.id()).expect("published") < slow_first,
            "other keys did not wait for slow-0"
        );
    }
    assert!(
        position(blocked[2].id()).is_none(),
        "slow-2 failed permanently"
    );
    let mut expected: Vec<NewMessage> = sent.clone();
    expected.retain(|m| m.id() != blocked[2].id());
    check_history(&history, &expected);
    let dead = h
        .store()
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("list");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, blocked[2].id());
    assert_eq!(
        publisher.max_per_key_in_call(),
        1,
        "an unordered publisher gets one message per key per call"
    );
    h.teardown().await;
}

/// Retries back off up to the maximum attempts, then the message is dead-lettered with the
/// last error; a permanent failure dead-letters at once. Failures count as attempts here
/// because the broker confirms other messages of the same calls: the failures are the
/// messages' own.
pub async fn retries_end_in_a_dead_letter<H: StoreHarness>(h: H) {
    let publisher = ScriptedPublisher::new();
    let doomed = message(Some("d"), 0);
    let permanent = message(Some("p"), 1);
    publisher.fail_transient(doomed.id(), u32::MAX);
    publisher.fail_permanent(permanent.id());
    let ok = message(Some("d"), 2);
    h.enqueue(vec![doomed.clone(), permanent.clone(), ok.clone()])
        .await
        .expect("enqueue");
    let config = fast_config().retry(
        RetryPolicy::default()
            .initial_delay(Duration::from_millis(50))
            .max_delay(Duration::from_millis(400))
            .multiplier(2.0)
            .jitter(0.0)
            .max_attempts(4),
    );
    let started = tokio::time::Instant::now();
    let relay_ = relay(h.store(), publisher.clone(), config);
    let wakeup = relay_.wakeup();
    let running = RunningRelay::spawn(relay_);
    // Other keys keep flowing while d-0 is retried, so that the broker confirms messages in
    // the calls that fail d-0: those failures are d-0's own.
    let mut fillers = Vec::new();
    let deadline = started + Duration::from_secs(30);
    while !drained(h.store()).await {
        assert!(tokio::time::Instant::now() < deadline, "the outbox drains");
        let filler = message(Some(&format!("filler-{}", fillers.len())), 100);
        h.enqueue(vec![filler.clone()]).await.expect("enqueue");
        fillers.push(filler);
        wakeup.wake();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    running.stop(Duration::from_secs(10)).await;
    // Delays 50 + 100 + 200 ms between the four attempts.
    assert!(
        took >= Duration::from_millis(350),
        "backoff was applied: {took:?}"
    );
    let dead = h
        .store()
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("list");
    let doomed_dead = dead
        .iter()
        .find(|d| d.message.id == doomed.id())
        .expect("doomed is dead");
    assert_eq!(doomed_dead.message.attempts, 4);
    assert!(
        doomed_dead
            .message
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("scripted transient")),
        "{:?}",
        doomed_dead.message.last_error
    );
    let permanent_dead = dead
        .iter()
        .find(|d| d.message.id == permanent.id())
        .expect("permanent is dead");
    assert_eq!(permanent_dead.message.attempts, 1, "dead-lettered at once");
    assert!(
        permanent_dead
            .message
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("scripted permanent"))
    );
    let published: Vec<MessageId> = publisher
        .inner()
        .published()
        .iter()
        .filter(|m| m.key.as_deref() == Some("d"))
        .map(|m| m.id)
        .collect();
    assert_eq!(
        published,
        vec![ok.id()],
        "d-2 went out after d-0 was dead-lettered"
    );
    fillers.push(ok);
    check_history(&publisher.inner().published(), &fillers);
    h.teardown().await;
}

/// A broker that is down, whichever way (refusing every call, hanging every call, failing
/// every message of every call), for many times the retry policy's whole budget, dead-letters
/// nothing and costs no message an attempt: the relay pauses, says so, probes the broker and
/// resumes within seconds of its recovery.
pub async fn broker_outages_dead_letter_nothing<H: StoreHarness>(h: H) {
    let publisher = ScriptedPublisher::new();
    // Two attempts 20 ms apart: an outage of a second is fifty times the budget.
    let config = fast_config().probe_max(Duration::from_millis(500)).retry(
        RetryPolicy::default()
            .initial_delay(Duration::from_millis(20))
            .max_delay(Duration::from_millis(20))
            .max_attempts(2),
    );
    let relay_ = relay(h.store(), publisher.clone(), config);
    let wakeup = relay_.wakeup();
    let running = RunningRelay::spawn(relay_.clone());
    let mut sent = Vec::new();
    for (round, outage) in [Outage::Refused, Outage::Hung, Outage::FailsEveryMessage]
        .into_iter()
        .enumerate()
    {
        publisher.outage(outage);
        let batch: Vec<NewMessage> = (0..30)
            .map(|i| message(Some(&format!("key-{}", i % 5)), round * 100 + i))
            .collect();
        h.enqueue(batch.clone()).await.expect("enqueue");
        sent.extend(batch);
        wakeup.wake();
        eventually(
            &format!("the relay pauses for {outage:?}"),
            Duration::from_secs(10),
            || {
                let paused = relay_
                    .pauses()
                    .iter()
                    .any(|p| p.cause == outbox_core::PauseCause::Broker);
                std::future::ready(paused)
            },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stats = h.store().stats().await.expect("stats");
        assert_eq!(stats.dead, 0, "{outage:?} dead-lettered messages");
        assert!(stats.pending > 0, "nothing was published during {outage:?}");
        publisher.end_outage();
        let recovered = tokio::time::Instant::now();
        eventually(
            &format!("the outbox drains after {outage:?}"),
            Duration::from_secs(20),
            || drained(h.store()),
        )
        .await;
        assert!(
            recovered.elapsed() < Duration::from_secs(5),
            "resumed {:?} after the broker recovered from {outage:?}",
            recovered.elapsed()
        );
        assert!(relay_.pauses().is_empty(), "{:?}", relay_.pauses());
    }
    running.stop(Duration::from_secs(10)).await;
    assert!(publisher.checks() > 0, "the broker was probed");
    assert_eq!(h.store().stats().await.expect("stats").dead, 0);
    check_history(&publisher.inner().published(), &sent);
    h.teardown().await;
}

/// A store that is down pauses the relay too: nothing is dead-lettered, and the relay resumes
/// once the store answers.
pub async fn store_outages_pause_the_relay<H: StoreHarness>(h: H) {
    let store = FaultyStore::new(h.store());
    let publisher = MemoryPublisher::new();
    let config = fast_config().probe_max(Duration::from_millis(500));
    let relay_ = relay(store.clone(), publisher.clone(), config);
    let running = RunningRelay::spawn(relay_.clone());
    let first = workload(20, 4);
    h.enqueue(first.clone()).await.expect("enqueue");
    assert!(
        publisher
            .wait_for(first.len(), Duration::from_secs(10))
            .await
    );
    store.set_down(true);
    let second = workload(20, 4);
    h.enqueue(second.clone()).await.expect("enqueue");
    eventually("the relay pauses", Duration::from_secs(10), || {
        let paused = relay_
            .pauses()
            .iter()
            .any(|p| p.cause == outbox_core::PauseCause::Store);
        std::future::ready(paused)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.set_down(false);
    eventually("the outbox drains", Duration::from_secs(20), || {
        drained(h.store())
    })
    .await;
    eventually("the relay resumes", Duration::from_secs(5), || {
        std::future::ready(relay_.pauses().is_empty())
    })
    .await;
    running.stop(Duration::from_secs(10)).await;
    assert_eq!(h.store().stats().await.expect("stats").dead, 0);
    let mut all = first;
    all.extend(second);
    check_history(&publisher.published(), &all);
    h.teardown().await;
}

/// Whatever text a broker puts in an error (NUL bytes, control characters, credentials,
/// megabytes), the store records it: cleaned, bounded, and without a repeated prefix.
pub async fn stored_errors_are_clean<H: StoreHarness>(h: H) {
    let publisher = ScriptedPublisher::new();
    let msg = message(Some("e"), 0);
    let ok = message(Some("f"), 1);
    let nasty = format!(
        "refused\0by amqp://app:s3cret@mq:5672/vhost\r\n\u{1b}[31m {}",
        "x".repeat(1 << 20)
    );
    publisher.fail_permanent_with(msg.id(), nasty);
    h.enqueue(vec![msg.clone(), ok.clone()])
        .await
        .expect("enqueue");
    let relay_ = relay(h.store(), publisher.clone(), fast_config());
    let report = relay_.run_once().await.expect("run once");
    assert_eq!((report.published, report.dead_lettered), (1, 1));
    assert_eq!(report.fenced, 0, "the outcome was recorded");
    let dead = h
        .store()
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("list");
    let error = dead[0].message.last_error.clone().unwrap_or_default();
    assert!(
        error.starts_with("permanent publish failure: refused"),
        "{error}"
    );
    assert!(!error.contains("s3cret"), "{error}");
    assert!(!error.chars().any(char::is_control), "{error:?}");
    assert!(
        error.len() <= outbox_core::MAX_ERROR_TEXT,
        "{}",
        error.len()
    );
    assert_eq!(error.matches("publish failure").count(), 1, "{error}");
    h.teardown().await;
}

/// Several relays on one store share the work: no message in flight at two relays at once,
/// every relay does a share, per-key order holds, and the share of a relay that died is taken
/// over once its lease expires.
pub async fn relays_share_the_work<H: StoreHarness>(h: H) {
    let publisher = ScriptedPublisher::new();
    let config = fast_config().batch_size(20);
    let relays: Vec<_> = (0..3)
        .map(|_| {
            let counting = ScriptedPublisher::wrap(publisher.clone());
            let relay_ = relay(h.store(), counting.clone(), config.clone());
            (RunningRelay::spawn(relay_), counting)
        })
        .collect();
    // Let the relays see each other and split the partitions.
    tokio::time::sleep(config.partition_lease * 2).await;
    let first = workload(600, 60);
    for chunk in first.chunks(100) {
        h.enqueue(chunk.to_vec()).await.expect("enqueue");
    }
    eventually(
        "the first workload is drained",
        Duration::from_secs(30),
        || drained(h.store()),
    )
    .await;
    for (_, counting) in &relays {
        assert!(counting.calls() > 0, "every relay published a share");
    }
    let mut relays = relays.into_iter();
    let (victim, _) = relays.next().expect("three relays");
    victim.kill().await;
    let second = workload(300, 60);
    h.enqueue(second.clone()).await.expect("enqueue");
    eventually(
        "the dead relay's share is taken over",
        Duration::from_secs(30),
        || drained(h.store()),
    )
    .await;
    for (running, _) in relays {
        running.stop(Duration::from_secs(10)).await;
    }
    assert_eq!(
        publisher.overlaps(),
        0,
        "no message was in flight at two relays at once"
    );
    let mut all = first;
    all.extend(second);
    check_history(&publisher.inner().published(), &all);
    h.teardown().await;
}

/// Outcomes recorded after the lease expired are refused: the messages are published again
/// instead of being marked by a relay that no longer holds them.
pub async fn expired_leases_cannot_settle<H: StoreHarness>(h: H) {
    let store = FaultyStore::new(h.store());
    store.delay_settles(Duration::from_millis(1300));
    let publisher = MemoryPublisher::new();
    let sent = workload(5, 5);
    h.enqueue(sent.clone()).await.expect("enqueue");
    let config = fast_config()
        .lease(Duration::from_secs(1))
        .publish_timeout(Duration::from_millis(300));
    let relay_ = relay(store.clone(), publisher.clone(), config);
    let report = relay_.run_once().await.expect("run once");
    assert_eq!(report.published, 5);
    assert_eq!(report.fenced, 5, "the lease expired before the settle");
    assert_eq!(
        h.store().stats().await.expect("stats").pending,
        5,
        "still pending: they go out again"
    );
    store.delay_settles(Duration::ZERO);
    let again = relay_.run_once().await.expect("run once");
    assert_eq!((again.published, again.fenced), (5, 0));
    assert!(drained(h.store()).await);
    h.teardown().await;
}

/// On shutdown the relay stops claiming, abandons publishes that outlast the shutdown timeout,
/// releases their messages at once, and returns within its bound; nothing is lost.
pub async fn graceful_shutdown_loses_nothing<H: StoreHarness>(h: H) {
    let publisher = ScriptedPublisher::new();
    publisher.hang_all(true);
    let sent = workload(30, 3);
    h.enqueue(sent.clone()).await.expect("enqueue");
    let config = fast_config()
        .lease(Duration::from_secs(60))
        .publish_timeout(Duration::from_secs(20))
        .shutdown_timeout(Duration::from_millis(300));
    let running = RunningRelay::spawn(relay(h.store(), publisher.clone(), config.clone()));
    eventually("publishing started", Duration::from_secs(10), || {
        let calls = publisher.calls();
        async move { calls > 0 }
    })
    .await;
    running.stop(Duration::from_secs(8)).await;
    // Released, not left leased for the 60 s lease: another relay publishes them right away.
    let next = MemoryPublisher::new();
    let running = RunningRelay::spawn(relay(h.store(), next.clone(), config));
    eventually(
        "the released messages are published",
        Duration::from_secs(15),
        || drained(h.store()),
    )
    .await;
    running.stop(Duration::from_secs(10)).await;
    check_history(&next.published(), &sent);
    h.teardown().await;
}

/// A stored row that cannot be decoded is dead-lettered with a clear error; the relay goes on.
pub async fn undecodable_rows_are_dead_lettered<H: StoreHarness>(h: H) {
    let sent = workload(10, 2);
    let ids = h.enqueue(sent.clone()).await.expect("enqueue");
    if !h.corrupt(ids[0]).await {
        h.teardown().await;
        return;
    }
    let publisher = MemoryPublisher::new();
    let running = RunningRelay::spawn(relay(h.store(), publisher.clone(), fast_config()));
    eventually("the outbox is drained", Duration::from_secs(20), || {
        drained(h.store())
    })
    .await;
    running.stop(Duration::from_secs(10)).await;
    let dead = h.store().dead_letters(&DeadLetterFilter::all()).await;
    let stats = h.store().stats().await.expect("stats");
    assert_eq!(stats.dead, 1, "the bad row is a dead letter");
    if let Ok(dead) = dead
        && let Some(d) = dead.first()
    {
        assert!(
            d.message
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("decode")),
            "{:?}",
            d.message.last_error
        );
    }
    check_history(&publisher.published(), &sent[1..]);
    h.teardown().await;
}

/// A replayed dead letter is published.
pub async fn replayed_dead_letters_are_published<H: StoreHarness>(h: H) {
    let publisher = ScriptedPublisher::new();
    let msg = message(Some("r"), 0);
    publisher.fail_permanent(msg.id());
    h.enqueue(vec![msg.clone()]).await.expect("enqueue");
    let relay_ = relay(h.store(), publisher.clone(), fast_config());
    let report = relay_.run_once().await.expect("run once");
    assert_eq!(report.dead_lettered, 1);
    relay_.store().leave(relay_.id()).await.expect("leave");
    let publisher_ok = MemoryPublisher::new();
    let relay_ok = relay(h.store(), publisher_ok.clone(), fast_config());
    assert_eq!(
        relay_ok.run_once().await.expect("run once").claimed,
        0,
        "dead letters wait"
    );
    relay_
        .store()
        .replay(&DeadLetterFilter::all().ids([msg.id()]))
        .await
        .expect("replay");
    let report = relay_ok.run_once().await.expect("run once");
    assert_eq!(report.published, 1);
    assert_eq!(publisher_ok.published()[0].id, msg.id());
    h.teardown().await;
}
