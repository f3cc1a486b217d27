//! The store suite: the [`Store`] contract, checked operation by operation.
//!
//! Each function takes a fresh harness, runs one check and tears the harness down. Expand them
//! all with [`crate::store_suite!`].

use std::collections::HashSet;
use std::time::Duration;

use outbox_core::{
    DeadLetterFilter, DeadLetterTo, LeaseToken, MessageId, NewMessage, PARTITIONS, RelayId, Retry,
    Settlement, Store, StoreErrorKind,
};

use crate::StoreHarness;

/// Partition lease used by the suites.
pub const PARTITION_TTL: Duration = Duration::from_secs(30);

/// Every partition.
pub fn all_partitions() -> Vec<u16> {
    (0..PARTITIONS).collect()
}

/// Makes `relay` a live member owning every free partition of `store`.
pub async fn own_all<S: Store>(store: &S, relay: &RelayId) {
    store
        .heartbeat(relay, PARTITION_TTL)
        .await
        .expect("heartbeat");
    store
        .acquire(relay, &all_partitions(), PARTITION_TTL)
        .await
        .expect("acquire partitions");
}

/// A message for tests: destination `dest`, the given key, payload `"{i}"`.
pub fn message(key: Option<&str>, i: usize) -> NewMessage {
    let msg = NewMessage::new("outbox-test", format!("{i}")).header("n", i.to_string());
    match key {
        Some(key) => msg.key(key),
        None => msg,
    }
}

fn ids(claim: &outbox_core::Claim) -> Vec<MessageId> {
    claim.messages.iter().map(|m| m.id).collect()
}

const LEASE: Duration = Duration::from_secs(30);

/// Settles every message of `claim` as published.
async fn publish_all<S: Store>(store: &S, claim: &outbox_core::Claim) {
    let settlement = Settlement {
        published: ids(claim),
        ..Settlement::default()
    };
    store
        .settle(claim.token, &settlement)
        .await
        .expect("settle");
}

/// A committed enqueue is claimable; a rolled-back one never is.
pub async fn committed_messages_are_claimed_rolled_back_never<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    h.enqueue_rolled_back(vec![message(None, 0), message(Some("k"), 1)])
        .await
        .expect("rolled-back enqueue");
    let committed = h.enqueue(vec![message(None, 2)]).await.expect("enqueue");
    let claim = store.claim(&relay, 100, LEASE).await.expect("claim");
    assert_eq!(
        ids(&claim),
        committed,
        "only the committed message is claimable"
    );
    h.teardown().await;
}

/// Claims come in enqueue order, at most `limit` at a time, each message once.
pub async fn claims_follow_enqueue_order_and_limit<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let mut expected = Vec::new();
    for chunk in 0..3 {
        let batch = (0..10).map(|i| message(None, chunk * 10 + i)).collect();
        expected.extend(h.enqueue(batch).await.expect("enqueue"));
    }
    let first = store.claim(&relay, 12, LEASE).await.expect("claim");
    assert_eq!(first.messages.len(), 12);
    let second = store.claim(&relay, 100, LEASE).await.expect("claim");
    assert_eq!(second.messages.len(), 18);
    assert_ne!(
        first.token, second.token,
        "every claim has its own fencing token"
    );
    let mut got = ids(&first);
    got.extend(ids(&second));
    assert_eq!(got, expected, "enqueue order");
    assert!(
        store
            .claim(&relay, 100, LEASE)
            .await
            .expect("claim")
            .is_empty()
    );
    h.teardown().await;
}

/// The outbox's order is the order messages were written in, not the order their transactions
/// committed in: of two committed messages, the one written first is claimed first, even when
/// its transaction committed last (the order a database sequence gives). What the relay
/// promises follows from it: a message written after another one's transaction committed is
/// published after it.
pub async fn claims_follow_write_order_not_commit_order<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let first = message(Some("k"), 0);
    let second = message(Some("k"), 1);
    let overlapped = h
        .enqueue_overlapping(vec![first.clone()], vec![second.clone()])
        .await
        .expect("enqueue");
    if !overlapped {
        h.teardown().await;
        return;
    }
    let claim = store.claim(&relay, 10, LEASE).await.expect("claim");
    assert_eq!(
        ids(&claim),
        vec![first.id(), second.id()],
        "the message written first is claimed first, though its transaction committed last"
    );
    h.teardown().await;
}

/// A relay claims only from partitions it owns.
pub async fn claims_need_partition_ownership<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    h.enqueue(vec![message(Some("a"), 0)])
        .await
        .expect("enqueue");
    store
        .heartbeat(&relay, PARTITION_TTL)
        .await
        .expect("heartbeat");
    assert!(
        store
            .claim(&relay, 10, LEASE)
            .await
            .expect("claim")
            .is_empty(),
        "owns nothing yet"
    );
    let partition = message(Some("a"), 0).partition();
    let others: Vec<u16> = all_partitions()
        .into_iter()
        .filter(|p| *p != partition)
        .collect();
    store
        .acquire(&relay, &others, PARTITION_TTL)
        .await
        .expect("acquire");
    assert!(
        store
            .claim(&relay, 10, LEASE)
            .await
            .expect("claim")
            .is_empty(),
        "not the message's partition"
    );
    store
        .acquire(&relay, &[partition], PARTITION_TTL)
        .await
        .expect("acquire");
    assert_eq!(
        store
            .claim(&relay, 10, LEASE)
            .await
            .expect("claim")
            .messages
            .len(),
        1
    );
    h.teardown().await;
}

/// Concurrent claims never hand out the same message twice.
pub async fn concurrent_claims_never_share_a_message<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let total = 400;
    let batch = (0..total).map(|i| message(None, i)).collect();
    h.enqueue(batch).await.expect("enqueue");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = h.store();
        let relay = relay.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let claim = store.claim(&relay, 7, LEASE).await.expect("claim");
                if claim.is_empty() {
                    return got;
                }
                // Settled, as the relay settles every claim: a store may hold resources (a
                // connection, a transaction) for each claim until then.
                tokio::task::yield_now().await;
                publish_all(&store, &claim).await;
                got.extend(claim.messages.into_iter().map(|m| m.id));
            }
        }));
    }
    let mut seen = HashSet::new();
    for task in tasks {
        for id in task.await.expect("claimer") {
            assert!(seen.insert(id), "message {id} claimed twice");
        }
    }
    assert_eq!(seen.len(), total);
    h.teardown().await;
}

/// Concurrent claims of one relay over a few keys (as a relay with several claims under way
/// makes them) hand out each key's messages in order: a claim gets a key's messages only when
/// no other claim holds an earlier one, and then the next ones, with none skipped.
pub async fn concurrent_claims_keep_key_order<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let (keys, total) = (5, 300);
    let batch = (0..total)
        .map(|i| message(Some(&format!("k{}", i % keys)), i))
        .collect();
    h.enqueue(batch).await.expect("enqueue");
    // Per key: the index of its next message, and whether a claim holds some of it now.
    let state = std::sync::Arc::new(std::sync::Mutex::new(
        (0..keys)
            .map(|k| (format!("k{k}"), (k, false)))
            .collect::<std::collections::HashMap<String, (usize, bool)>>(),
    ));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let store = h.store();
        let relay = relay.clone();
        let state = std::sync::Arc::clone(&state);
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            let mut empty = 0;
            while empty < 20 {
                let claim = store.claim(&relay, 9, LEASE).await.expect("claim");
                if claim.is_empty() {
                    empty += 1;
                    tokio::task::yield_now().await;
                    continue;
                }
                let mut held = Vec::new();
                {
                    let mut state = state.lock().expect("state");
                    for m in &claim.messages {
                        let key = m.key.clone().expect("keyed");
                        let n: usize = std::str::from_utf8(&m.payload)
                            .expect("utf-8")
                            .parse()
                            .expect("index");
                        let entry = state.get_mut(&key).expect("known key");
                        assert!(
                            !entry.1 || held.contains(&key),
                            "message {n} of {key} claimed while another claim holds the key"
                        );
                        assert_eq!(n, entry.0, "{key}: message {n} handed out out of order");
                        entry.0 += keys;
                        entry.1 = true;
                        if !held.contains(&key) {
                            held.push(key);
                        }
                    }
                }
                // Publishing takes a while, and other claims run meanwhile.
                tokio::task::yield_now().await;
                {
                    // Still leased until the settle below: no claim may get these keys' next
                    // messages before it, whether the mark is down or not.
                    let mut state = state.lock().expect("state");
                    for key in &held {
                        state.get_mut(key).expect("known key").1 = false;
                    }
                }
                got += claim.messages.len();
                publish_all(&store, &claim).await;
            }
            got
        }));
    }
    let mut published = 0;
    for task in tasks {
        published += task.await.expect("claimer");
    }
    assert_eq!(published, total, "every message claimed once");
    h.teardown().await;
}

/// A message whose lease expired is claimed again, under a new token; the old token is fenced.
pub async fn expired_leases_return_messages<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let id = h
        .enqueue(vec![message(Some("k"), 0)])
        .await
        .expect("enqueue")[0];
    let first = store
        .claim(&relay, 10, Duration::from_millis(300))
        .await
        .expect("claim");
    assert_eq!(ids(&first), vec![id]);
    assert!(
        store
            .claim(&relay, 10, LEASE)
            .await
            .expect("claim")
            .is_empty(),
        "leased"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = store.claim(&relay, 10, LEASE).await.expect("claim");
    assert_eq!(ids(&second), vec![id], "claimable again after the lease");
    let stale = store
        .settle(
            first.token,
            &Settlement {
                published: vec![id],
                ..Settlement::default()
            },
        )
        .await
        .expect("settle");
    assert_eq!(
        (stale.applied, stale.fenced),
        (0, 1),
        "the expired lease cannot settle"
    );
    let fresh = store
        .settle(
            second.token,
            &Settlement {
                published: vec![id],
                ..Settlement::default()
            },
        )
        .await
        .expect("settle");
    assert_eq!((fresh.applied, fresh.fenced), (1, 0));
    h.teardown().await;
}

/// A settle under a token that never held the message changes nothing, and neither does a
/// settle after the lease expired even if nobody else claimed the message.
pub async fn settles_are_fenced<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let id = h.enqueue(vec![message(None, 0)]).await.expect("enqueue")[0];
    let claim = store
        .claim(&relay, 10, Duration::from_millis(300))
        .await
        .expect("claim");
    let wrong = store
        .settle(
            LeaseToken::new(),
            &Settlement {
                published: vec![id],
                ..Settlement::default()
            },
        )
        .await
        .expect("settle");
    assert_eq!((wrong.applied, wrong.fenced), (0, 1));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let late = store
        .settle(
            claim.token,
            &Settlement {
                dead: vec![DeadLetterTo {
                    id,
                    error: "late".into(),
                }],
                ..Settlement::default()
            },
        )
        .await
        .expect("settle");
    assert_eq!((late.applied, late.fenced), (0, 1), "expired lease");
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.dead), (1, 0), "nothing changed");
    h.teardown().await;
}

/// Later messages of a key wait while an earlier one is leased or waiting for a retry; other
/// keys flow; a dead letter no longer blocks its key.
pub async fn later_messages_of_a_key_wait_for_earlier_ones<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let a1 = h
        .enqueue(vec![message(Some("a"), 1)])
        .await
        .expect("enqueue")[0];
    let first = store.claim(&relay, 10, LEASE).await.expect("claim");
    assert_eq!(ids(&first), vec![a1]);
    let later = h
        .enqueue(vec![
            message(Some("a"), 2),
            message(Some("b"), 3),
            message(Some("a"), 4),
        ])
        .await
        .expect("enqueue");
    let second = store.claim(&relay, 10, LEASE).await.expect("claim");
    assert_eq!(
        ids(&second),
        vec![later[1]],
        "a2 and a4 wait for the leased a1; b flows"
    );
    // a1 fails and waits for a retry: a2 still waits.
    store
        .settle(
            first.token,
            &Settlement {
                retry: vec![Retry {
                    id: a1,
                    delay: Duration::from_millis(500),
                    error: "boom".into(),
                }],
                ..Settlement::default()
            },
        )
        .await
        .expect("settle");
    assert!(
        store
            .claim(&relay, 10, LEASE)
            .await
            .expect("claim")
            .is_empty(),
        "a1 waits, so do a2, a4"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let third = store.claim(&relay, 10, LEASE).await.expect("claim");
    assert_eq!(
        ids(&third),
        vec![a1, later[0], later[2]],
        "a1 then a2, a4 in order"
    );
    assert_eq!(third.messages[0].attempts, 1);
    // a1 dead-lettered, a2 and a4 released: they are claimable at once.
    store
        .settle(
            third.token,
            &Settlement {
                dead: vec![DeadLetterTo {
                    id: a1,
                    error: "gone".into(),
                }],
                release: vec![later[0], later[2]],
                ..Settlement::default()
            },
        )
        .await
        .expect("settle");
    let fourth = store.claim(&relay, 10, LEASE).await.expect("claim");
    assert_eq!(ids(&fourth), vec![later[0], later[2]]);
    assert_eq!(
        fourth.messages[0].attempts, 0,
        "a release does not count as an attempt"
    );
    h.teardown().await;
}

/// A retry counts the attempt, keeps the error and waits for its delay.
pub async fn retries_count_attempts_and_keep_the_error<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let id = h.enqueue(vec![message(None, 0)]).await.expect("enqueue")[0];
    for attempt in 1..=3u32 {
        let claim = store.claim(&relay, 10, LEASE).await.expect("claim");
        assert_eq!(ids(&claim), vec![id]);
        assert_eq!(claim.messages[0].attempts, attempt - 1);
        let error = format!("failure {attempt}");
        let settled = store
            .settle(
                claim.token,
                &Settlement {
                    retry: vec![Retry {
                        id,
                        delay: Duration::from_millis(200),
                        error: error.clone(),
                    }],
                    ..Settlement::default()
                },
            )
            .await
            .expect("settle");
        assert_eq!(settled.applied, 1);
        assert!(
            store
                .claim(&relay, 10, LEASE)
                .await
                .expect("claim")
                .is_empty(),
            "waits for the delay"
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    let claim = store.claim(&relay, 10, LEASE).await.expect("claim");
    assert_eq!(claim.messages[0].attempts, 3);
    assert_eq!(claim.messages[0].last_error.as_deref(), Some("failure 3"));
    h.teardown().await;
}

/// Published messages are never claimed again; with retention they are kept, then cleaned up.
pub async fn published_messages_are_done<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let ids_ = h
        .enqueue((0..5).map(|i| message(None, i)).collect())
        .await
        .expect("enqueue");
    let claim = store.claim(&relay, 10, LEASE).await.expect("claim");
    let settled = store
        .settle(
            claim.token,
            &Settlement {
                published: ids_.clone(),
                ..Settlement::default()
            },
        )
        .await
        .expect("settle");
    assert_eq!(settled.applied, 5);
    assert!(
        store
            .claim(&relay, 10, Duration::from_millis(1))
            .await
            .expect("claim")
            .is_empty()
    );
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.dead), (0, 0));

    if let Some(retaining) = h.with_retention(Duration::from_millis(300)) {
        let kept = h
            .enqueue((0..3).map(|i| message(None, i)).collect())
            .await
            .expect("enqueue");
        let claim = retaining.claim(&relay, 10, LEASE).await.expect("claim");
        retaining
            .settle(
                claim.token,
                &Settlement {
                    published: kept,
                    ..Settlement::default()
                },
            )
            .await
            .expect("settle");
        assert!(
            retaining
                .claim(&relay, 10, LEASE)
                .await
                .expect("claim")
                .is_empty(),
            "published stays published"
        );
        let stats = retaining.stats().await.expect("stats");
        assert_eq!((stats.pending, stats.published_retained), (0, 3));
        assert_eq!(
            retaining.cleanup(10).await.expect("cleanup"),
            0,
            "still within retention"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            retaining.cleanup(2).await.expect("cleanup"),
            2,
            "bounded batch"
        );
        assert_eq!(retaining.cleanup(10).await.expect("cleanup"), 1);
        assert_eq!(
            retaining.stats().await.expect("stats").published_retained,
            0
        );
    }
    h.teardown().await;
}

/// Dead letters are never claimed; they can be listed with filters, replayed and purged.
pub async fn dead_letters_are_listed_replayed_and_purged<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let mut batch: Vec<NewMessage> = (0..4).map(|i| message(Some(&format!("k{i}")), i)).collect();
    batch.push(NewMessage::new("elsewhere", "x").key("k9"));
    let ids_ = h.enqueue(batch).await.expect("enqueue");
    let claim = store.claim(&relay, 10, LEASE).await.expect("claim");
    let dead = ids_
        .iter()
        .map(|id| DeadLetterTo {
            id: *id,
            error: format!("bad {id}"),
        })
        .collect();
    store
        .settle(
            claim.token,
            &Settlement {
                dead,
                ..Settlement::default()
            },
        )
        .await
        .expect("settle");
    assert!(
        store
            .claim(&relay, 10, LEASE)
            .await
            .expect("claim")
            .is_empty(),
        "dead letters are not claimed"
    );
    assert_eq!(store.stats().await.expect("stats").dead, 5);

    let all = store
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("list");
    assert_eq!(all.len(), 5);
    let listed: HashSet<MessageId> = all.iter().map(|d| d.message.id).collect();
    assert_eq!(listed, ids_.iter().copied().collect());
    let first = all
        .iter()
        .find(|d| d.message.id == ids_[0])
        .expect("listed");
    assert_eq!(first.message.attempts, 1);
    assert_eq!(
        first.message.last_error.as_deref(),
        Some(format!("bad {}", ids_[0]).as_str())
    );
    let by_dest = store
        .dead_letters(&DeadLetterFilter::all().destination("elsewhere"))
        .await
        .expect("list");
    assert_eq!(by_dest.len(), 1);
    let by_key = store
        .dead_letters(&DeadLetterFilter::all().key("k2"))
        .await
        .expect("list");
    assert_eq!(
        by_key.iter().map(|d| d.message.id).collect::<Vec<_>>(),
        vec![ids_[2]]
    );
    assert_eq!(
        store
            .dead_letters(&DeadLetterFilter::all().limit(2))
            .await
            .expect("list")
            .len(),
        2
    );
    let before_now = store
        .dead_letters(
            &DeadLetterFilter::all().dead_before(chrono::Utc::now() - chrono::Duration::hours(1)),
        )
        .await
        .expect("list");
    assert!(before_now.is_empty());

    assert_eq!(
        store
            .replay(&DeadLetterFilter::all().ids([ids_[0], ids_[1]]))
            .await
            .expect("replay"),
        2
    );
    let again = store.claim(&relay, 10, LEASE).await.expect("claim");
    assert_eq!(
        ids(&again),
        vec![ids_[0], ids_[1]],
        "replayed messages are pending again"
    );
    assert_eq!(again.messages[0].attempts, 0);
    assert_eq!(
        store
            .purge(&DeadLetterFilter::all().key("k3"))
            .await
            .expect("purge"),
        1
    );
    assert_eq!(
        store.purge(&DeadLetterFilter::all()).await.expect("purge"),
        2
    );
    assert_eq!(store.stats().await.expect("stats").dead, 0);
    h.teardown().await;
}

/// One relay at a time owns a partition; expired or released partitions can be taken.
pub async fn partitions_have_one_owner_at_a_time<H: StoreHarness>(h: H) {
    let store = h.store();
    let (a, b) = (RelayId::new("relay-a"), RelayId::new("relay-b"));
    let short = Duration::from_millis(400);
    assert_eq!(
        store.acquire(&a, &[0, 1, 2], short).await.expect("acquire"),
        vec![0, 1, 2]
    );
    assert_eq!(
        store.acquire(&b, &[1, 2, 3], short).await.expect("acquire"),
        vec![3],
        "1 and 2 are a's"
    );
    assert_eq!(
        store.acquire(&a, &[0, 1], short).await.expect("renew"),
        vec![0, 1],
        "renewing is allowed"
    );
    store.release(&a, &[1]).await.expect("release");
    assert_eq!(
        store.acquire(&b, &[1], short).await.expect("acquire"),
        vec![1],
        "released"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        store.acquire(&b, &[0, 2], short).await.expect("acquire"),
        vec![0, 2],
        "a's leases expired"
    );
    store.leave(&b).await.expect("leave");
    assert_eq!(
        store
            .acquire(&a, &[0, 1, 2, 3], short)
            .await
            .expect("acquire"),
        vec![0, 1, 2, 3]
    );
    h.teardown().await;
}

/// Heartbeats list the live relays and what they own, and forget relays that stopped.
pub async fn heartbeats_track_live_relays<H: StoreHarness>(h: H) {
    let store = h.store();
    let (a, b) = (RelayId::new("relay-a"), RelayId::new("relay-b"));
    store
        .heartbeat(&a, Duration::from_millis(400))
        .await
        .expect("heartbeat");
    store
        .acquire(&a, &[5, 6], Duration::from_millis(400))
        .await
        .expect("acquire");
    let members = store
        .heartbeat(&b, Duration::from_secs(30))
        .await
        .expect("heartbeat");
    let ids_: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids_, vec!["relay-a", "relay-b"]);
    assert_eq!(members[0].partitions, vec![5, 6]);
    assert!(members[1].partitions.is_empty());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let members = store
        .heartbeat(&b, Duration::from_secs(30))
        .await
        .expect("heartbeat");
    assert_eq!(
        members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        vec!["relay-b"],
        "a stopped"
    );
    store.leave(&b).await.expect("leave");
    let members = store
        .heartbeat(&a, Duration::from_secs(30))
        .await
        .expect("heartbeat");
    assert_eq!(
        members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        vec!["relay-a"],
        "b left"
    );
    h.teardown().await;
}

/// Stats count pending messages, the oldest one, and dead letters.
pub async fn stats_count_the_backlog<H: StoreHarness>(h: H) {
    let store = h.store();
    let empty = store.stats().await.expect("stats");
    assert_eq!(
        (empty.pending, empty.dead, empty.oldest_pending),
        (0, 0, None)
    );
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    h.enqueue((0..7).map(|i| message(None, i)).collect())
        .await
        .expect("enqueue");
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.pending, 7);
    let oldest = stats.oldest_pending.expect("oldest");
    assert!(
        oldest > before && oldest < chrono::Utc::now() + chrono::Duration::seconds(5),
        "{oldest}"
    );
    h.teardown().await;
}

/// What is enqueued comes back unchanged: binary payload, headers, key, destination, id.
pub async fn messages_round_trip_unchanged<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let payload: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    let sent = vec![
        NewMessage::new("orders.v1", payload.clone())
            .key("clé-🔑")
            .header("type", "OrderCreated")
            .header("unicode", "ünïcødé ✓")
            .header("empty", ""),
        NewMessage::new("d", Vec::new()),
    ];
    let ids_ = h.enqueue(sent.clone()).await.expect("enqueue");
    assert_eq!(
        ids_,
        sent.iter().map(NewMessage::id).collect::<Vec<_>>(),
        "ids are kept"
    );
    let claim = store.claim(&relay, 10, LEASE).await.expect("claim");
    assert_eq!(claim.messages.len(), 2);
    let (got, empty) = (&claim.messages[0], &claim.messages[1]);
    assert_eq!(got.id, sent[0].id());
    assert_eq!(got.destination, "orders.v1");
    assert_eq!(got.key.as_deref(), Some("clé-🔑"));
    assert_eq!(got.payload, payload);
    assert_eq!(&got.headers, sent[0].headers());
    assert_eq!(got.attempts, 0);
    assert!(got.last_error.is_none());
    let age = chrono::Utc::now() - got.created_at;
    assert!(
        age < chrono::Duration::seconds(60) && age > chrono::Duration::seconds(-60),
        "{age}"
    );
    assert!(empty.payload.is_empty() && empty.key.is_none() && empty.headers.is_empty());
    h.teardown().await;
}

/// A message no broker would take is refused at enqueue, and nothing of its transaction is
/// written.
pub async fn invalid_messages_are_refused<H: StoreHarness>(h: H) {
    let store = h.store();
    let too_big = NewMessage::new(
        "t",
        vec![0u8; outbox_core::Limits::default().max_payload_len + 1],
    );
    let err = h
        .enqueue(vec![message(None, 0), too_big])
        .await
        .expect_err("an oversized payload is refused");
    assert_eq!(err.kind(), StoreErrorKind::InvalidMessage, "{err}");
    let err = h
        .enqueue(vec![NewMessage::new("", "x")])
        .await
        .expect_err("empty destination");
    assert_eq!(err.kind(), StoreErrorKind::InvalidMessage, "{err}");
    assert_eq!(
        store.stats().await.expect("stats").pending,
        0,
        "nothing written"
    );
    h.teardown().await;
}

/// A row that cannot be decoded comes back as malformed instead of failing the claim.
pub async fn undecodable_rows_are_reported_not_fatal<H: StoreHarness>(h: H) {
    let store = h.store();
    let relay = RelayId::random();
    own_all(&store, &relay).await;
    let ids_ = h
        .enqueue(vec![message(Some("k"), 0), message(Some("j"), 1)])
        .await
        .expect("enqueue");
    if !h.corrupt(ids_[0]).await {
        h.teardown().await;
        return;
    }
    let claim = store
        .claim(&relay, 10, LEASE)
        .await
        .expect("a bad row does not fail the claim");
    assert_eq!(ids(&claim), vec![ids_[1]]);
    assert_eq!(claim.malformed.len(), 1);
    assert_eq!(claim.malformed[0].id, ids_[0]);
    assert!(!claim.malformed[0].error.is_empty());
    let settled = store
        .settle(
            claim.token,
            &Settlement {
                dead: vec![DeadLetterTo {
                    id: ids_[0],
                    error: "cannot be decoded".into(),
                }],
                published: vec![ids_[1]],
                ..Settlement::default()
            },
        )
        .await
        .expect("settle");
    assert_eq!(settled.applied, 2);
    assert_eq!(store.stats().await.expect("stats").dead, 1);
    h.teardown().await;
}
