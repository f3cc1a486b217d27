//! The log relay on a PostgreSQL cluster of each test's own (`wal_level = logical`), with the
//! polling relay beside it claiming what is handed to the table: every message reaches the
//! broker, in per-key order, and the outbox table ends empty; failures are the polling
//! relay's from then on, with their attempts; an outage counts no attempt; a restart
//! resumes from the slot.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_core::{
    DeadLetterFilter, LogRelay, Message, MessageId, NewMessage, Relay, RelayConfig, RelayHandle,
    RetryPolicy, Store,
};
use outbox_pg_cdc::PgOutboxLog;
use outbox_sqlx::sqlx::{self, Executor};
use outbox_sqlx::{PostgresStore, StoreConfig};
use outbox_testkit::ScriptedPublisher;
use tokio::sync::oneshot;

use common::{Fixture, while_in_use};

fn config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(50)
        .poll_min(Duration::from_millis(10))
        .poll_max(Duration::from_millis(100))
        .probe_max(Duration::from_millis(200))
        .shutdown_timeout(Duration::from_secs(5))
        .retry(
            RetryPolicy::default()
                .initial_delay(Duration::from_millis(20))
                .max_delay(Duration::from_millis(100))
                .max_attempts(3),
        )
}

/// A log relay running in a task, stopped by [`Running::stop`].
struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), outbox_core::RelayError>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("the log relay's task")
            .expect("the log relay stops cleanly");
    }
}

impl Fixture {
    /// A log relay on the fixture's slot and table, publishing to `publisher`.
    async fn log_relay(&self, publisher: ScriptedPublisher) -> Running {
        let source = while_in_use(|| PgOutboxLog::connect(self.config.clone(), self.store.clone()))
            .await
            .expect("the log source connects");
        let relay = LogRelay::builder(source, publisher)
            .config(config())
            .build()
            .expect("log relay");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Running { stop, task }
    }

    /// The polling relay of what is handed to the table.
    fn handed_relay(
        &self,
        publisher: ScriptedPublisher,
    ) -> RelayHandle<PostgresStore, ScriptedPublisher> {
        let store = PostgresStore::new(
            self.pool.clone(),
            StoreConfig::new()
                .table(&self.config.table)
                .handed_only(true),
        )
        .expect("handed store");
        Relay::builder(store, publisher)
            .config(config())
            .build()
            .expect("polling relay")
            .spawn(std::future::pending())
    }

    async fn rows(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.config.table))
            .fetch_one(&self.pool)
            .await
            .expect("count rows")
    }

    /// Waits until the table holds only `dead` rows (dead letters), for up to 30 s.
    async fn drained(&self, dead: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.rows().await != dead {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the outbox table still holds {} rows, {dead} expected",
                self.rows().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `count` messages over `keys` keys, in transactions of `per_tx`.
async fn commit_many(
    fixture: &Fixture,
    count: usize,
    keys: usize,
    per_tx: usize,
) -> Vec<MessageId> {
    let mut ids = Vec::new();
    let all: Vec<NewMessage> = (0..count)
        .map(|i| NewMessage::new("orders", format!("m{i}")).key(format!("k{}", i % keys)))
        .collect();
    for chunk in all.chunks(per_tx) {
        ids.extend(chunk.iter().map(NewMessage::id));
        fixture.commit(chunk.to_vec()).await;
    }
    ids
}

/// Each key's messages in the order the broker got them, first deliveries only.
fn first_deliveries(published: &[Message]) -> HashMap<String, Vec<MessageId>> {
    let mut seen = HashSet::new();
    let mut by_key: HashMap<String, Vec<MessageId>> = HashMap::new();
    for msg in published {
        if seen.insert(msg.id) {
            by_key
                .entry(msg.key.clone().unwrap_or_default())
                .or_default()
                .push(msg.id);
        }
    }
    by_key
}

/// Every id of `expected` reached the broker, and each key's first deliveries keep the
/// order of `expected`.
fn assert_delivered_in_order(published: &[Message], expected: &[(MessageId, String)]) {
    let got = first_deliveries(published);
    let mut wanted: HashMap<String, Vec<MessageId>> = HashMap::new();
    for (id, key) in expected {
        wanted.entry(key.clone()).or_default().push(*id);
    }
    for (key, ids) in &wanted {
        assert_eq!(
            got.get(key).map(Vec::as_slice).unwrap_or_default(),
            ids.as_slice(),
            "key {key}: every message, once, in enqueue order"
        );
    }
}

fn keyed(fixture_ids: &[MessageId], keys: usize) -> Vec<(MessageId, String)> {
    fixture_ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, format!("k{}", i % keys)))
        .collect()
}

#[tokio::test]
async fn the_log_relay_publishes_every_message_in_order_and_empties_the_table() {
    let Some(f) = Fixture::new().await else {
        return;
    };
    let publisher = ScriptedPublisher::new();
    let relay = f.log_relay(publisher.clone()).await;
    let ids = commit_many(&f, 300, 7, 3).await;
    assert!(
        publisher
            .inner()
            .wait_for(300, Duration::from_secs(30))
            .await,
        "all 300 published"
    );
    f.drained(0).await;
    assert_delivered_in_order(&publisher.inner().published(), &keyed(&ids, 7));
    assert_eq!(
        publisher.inner().count(),
        300,
        "no duplicate without a failure"
    );
    relay.stop().await;
    // The slot was confirmed past every transaction: nothing is delivered again.
    let publisher = ScriptedPublisher::new();
    let relay = f.log_relay(publisher.clone()).await;
    let more = commit_many(&f, 5, 5, 5).await;
    assert!(publisher.inner().wait_for(5, Duration::from_secs(30)).await);
    relay.stop().await;
    let again: Vec<MessageId> = publisher.inner().published().iter().map(|m| m.id).collect();
    assert_eq!(
        again, more,
        "a restart resumes after the last confirmed transaction"
    );
    f.finish().await;
}

#[tokio::test]
async fn failed_messages_go_to_the_table_and_their_keys_follow_them() {
    let Some(f) = Fixture::new().await else {
        return;
    };
    let publisher = ScriptedPublisher::new();
    let polling = f.handed_relay(publisher.clone());
    let relay = f.log_relay(publisher.clone()).await;
    // Key a: its first message fails twice, then goes; the later ones must wait for it.
    // Key b: its second message fails for good; the later ones go on (a dead letter does
    // not hold its key back).
    let a: Vec<NewMessage> = (0..4)
        .map(|i| NewMessage::new("orders", format!("a{i}")).key("a"))
        .collect();
    let b: Vec<NewMessage> = (0..4)
        .map(|i| NewMessage::new("orders", format!("b{i}")).key("b"))
        .collect();
    publisher.fail_transient(a[0].id(), 2);
    publisher.fail_permanent(b[1].id());
    for (x, y) in a.iter().zip(&b) {
        f.commit(vec![x.clone(), y.clone()]).await;
    }
    f.drained(1).await;
    let published = publisher.inner().published();
    let order: Vec<(MessageId, String)> = a
        .iter()
        .map(|m| (m.id(), "a".to_owned()))
        .chain(
            b.iter()
                .filter(|m| m.id() != b[1].id())
                .map(|m| (m.id(), "b".to_owned())),
        )
        .collect();
    assert_delivered_in_order(&published, &order);
    let first_a = published
        .iter()
        .find(|m| m.id == a[0].id())
        .expect("a0 published");
    // The log relay counted the first failure; the polling relay's lone call that failed
    // was an outage, not an attempt.
    assert!(
        first_a.attempts >= 1,
        "the polling relay kept the log relay's attempt"
    );
    let dead = f
        .store
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, b[1].id());
    relay.stop().await;
    polling.shutdown();
    polling.await.expect("polling relay stops");
    f.finish().await;
}

#[tokio::test]
async fn a_broker_outage_pauses_the_log_relay_without_counting_attempts() {
    let Some(f) = Fixture::new().await else {
        return;
    };
    let publisher = ScriptedPublisher::new();
    publisher.outage(outbox_testkit::Outage::Refused);
    let relay = f.log_relay(publisher.clone()).await;
    let ids = commit_many(&f, 40, 4, 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(publisher.inner().count(), 0);
    assert!(publisher.checks() > 0, "the paused relay probes the broker");
    assert_eq!(f.rows().await, 40, "nothing handed over, nothing lost");
    publisher.end_outage();
    assert!(
        publisher
            .inner()
            .wait_for(40, Duration::from_secs(30))
            .await
    );
    f.drained(0).await;
    let published = publisher.inner().published();
    assert!(
        published.iter().all(|m| m.attempts == 0),
        "an outage is no attempt"
    );
    assert_delivered_in_order(&published, &keyed(&ids, 4));
    relay.stop().await;
    f.finish().await;
}

#[tokio::test]
async fn rows_written_for_later_and_malformed_rows_are_left_to_the_table() {
    let Some(f) = Fixture::new().await else {
        return;
    };
    let publisher = ScriptedPublisher::new();
    let relay = f.log_relay(publisher.clone()).await;
    let t = &f.config.table;
    // Written by hand, as another language would: one due in a second, then a plain one of
    // its key; and, past the table's checks (its triggers off), one whose headers are not
    // strings.
    let later = uuid::Uuid::now_v7();
    let broken = uuid::Uuid::now_v7();
    let after = uuid::Uuid::now_v7();
    f.pool
        .execute(
            format!(
                "BEGIN; \
                 INSERT INTO {t} (id, destination, \"key\", payload, available_at) \
                 VALUES ('{later}', 'orders', 'c', 'x', now() + interval '1 second'); \
                 INSERT INTO {t} (id, destination, \"key\", payload) VALUES ('{after}', 'orders', 'c', 'y'); \
                 COMMIT; \
                 BEGIN; SET LOCAL session_replication_role = replica; \
                 INSERT INTO {t} (id, \"partition\", destination, \"key\", payload, headers, created_at, available_at) \
                 VALUES ('{broken}', 0, 'orders', 'd', 'x', '{{\"n\": 1}}', now(), now()); \
                 COMMIT;"
            )
            .as_str(),
        )
        .await
        .expect("rows written by hand");
    let polling = f.handed_relay(publisher.clone());
    f.drained(1).await;
    let published: Vec<MessageId> = publisher.inner().published().iter().map(|m| m.id).collect();
    assert_eq!(
        published,
        vec![MessageId::from_uuid(later), MessageId::from_uuid(after)],
        "the later message of the key waited for the one due later"
    );
    let dead = f
        .store
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("dead letters");
    assert_eq!(dead[0].message.id, MessageId::from_uuid(broken));
    relay.stop().await;
    polling.shutdown();
    polling.await.expect("polling relay stops");
    f.finish().await;
}

#[tokio::test]
async fn messages_emitted_without_a_row_are_relayed_and_only_failures_get_one() {
    let Some(f) = Fixture::new().await else {
        return;
    };
    let publisher = ScriptedPublisher::new();
    let [x1, x2, rolled_back, y1, z1] = std::array::from_fn::<_, 5, _>(|_| uuid::Uuid::now_v7());
    publisher.fail_transient(MessageId::from_uuid(x1), 1);
    publisher.fail_permanent(MessageId::from_uuid(y1));
    let polling = f.handed_relay(publisher.clone());
    let relay = f.log_relay(publisher.clone()).await;
    let emit = |id: uuid::Uuid, key: &str, payload: &str| {
        format!(
            "SELECT pg_logical_emit_message(true, 'outbox', json_build_object('id', '{id}', \
             'destination', 'orders', 'key', '{key}', {payload})::text);"
        )
    };
    f.pool
        .execute(
            format!(
                "BEGIN; {} {} COMMIT; BEGIN; {} ROLLBACK; \
                 BEGIN; {} SELECT pg_logical_emit_message(true, 'outbox', 'not json'); \
                 SELECT pg_logical_emit_message(true, 'other', 'not ours'); {} COMMIT;",
                emit(x1, "x", "'payload', 'first'"),
                emit(
                    x2,
                    "x",
                    "'payload_base64', encode('\\x00ff'::bytea, 'base64')"
                ),
                emit(rolled_back, "x", "'payload', 'never'"),
                emit(y1, "y", "'payload', 'refused'"),
                emit(z1, "z", "'payload', 'plain'"),
            )
            .as_str(),
        )
        .await
        .expect("messages emitted");
    // y1's dead letter and the undecodable envelope's stay.
    f.drained(2).await;
    let published = publisher.inner().published();
    let firsts: Vec<MessageId> = first_deliveries(&published)
        .into_values()
        .flatten()
        .collect();
    for id in [x1, x2, z1] {
        assert!(firsts.contains(&MessageId::from_uuid(id)), "{id} published");
    }
    assert!(!firsts.contains(&MessageId::from_uuid(rolled_back)));
    assert!(!firsts.contains(&MessageId::from_uuid(y1)));
    assert_delivered_in_order(
        &published,
        &[
            (MessageId::from_uuid(x1), "x".to_owned()),
            (MessageId::from_uuid(x2), "x".to_owned()),
        ],
    );
    let x2_msg = published
        .iter()
        .find(|m| m.id == MessageId::from_uuid(x2))
        .expect("x2");
    assert_eq!(x2_msg.payload, vec![0x00, 0xff], "base64 payloads decode");
    let dead = f
        .store
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("dead letters");
    let mut destinations: Vec<&str> = dead
        .iter()
        .map(|d| d.message.destination.as_str())
        .collect();
    destinations.sort_unstable();
    assert_eq!(destinations, ["orders", "undecodable"]);
    let undecodable = dead
        .iter()
        .find(|d| d.message.destination == "undecodable")
        .expect("undecodable");
    assert_eq!(
        undecodable.message.payload, b"not json",
        "the envelope as written"
    );
    relay.stop().await;
    polling.shutdown();
    polling.await.expect("polling relay stops");
    f.finish().await;
}
