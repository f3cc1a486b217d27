//! Bad messages through the relay program and real brokers: oversized payloads and headers,
//! invalid destination names, header values a broker cannot carry, and SQL injection attempts
//! in table names. Each gets a clear error at enqueue or a dead letter; the relay neither
//! panics nor stops, and the good messages of the same key still arrive, in order.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use outbox_chaos::broker::{self, NatsServer, Queue};
use outbox_core::{DeadLetterFilter, Limits, MessageId, NewMessage, Store, StoreErrorKind};
use outbox_sqlx::{PostgresStore, SqliteStore, StoreConfig};
use outbox_testkit::env::{or_skip, unique_name};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_chaos-relay");

fn write_config(dir: &Path, store_url: &str, table: &str, publisher: &str) -> std::path::PathBuf {
    let path = dir.join("relay.toml");
    let text = format!(
        "[store]\nurl = \"{store_url}\"\ntable = \"{table}\"\n\n[publisher]\n{publisher}\n\n\
         [relay]\nlease = \"4s\"\npublish_timeout = \"2s\"\npartition_lease = \"1s\"\n\
         poll_max = \"100ms\"\n\n[relay.retry]\ninitial_delay = \"50ms\"\nmax_delay = \"200ms\"\n\
         max_attempts = 3\n\n[http]\nlisten = \"127.0.0.1:{}\"\n",
        broker::free_port()
    );
    std::fs::write(&path, text).expect("config");
    path
}

fn relay(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    cmd
}

async fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    broker::terminate(child, Duration::from_secs(15))
        .await
        .expect("the relay stops on SIGTERM")
}

async fn sqlite(dir: &Path, limits: Limits) -> (SqliteStore, String) {
    let url = format!("sqlite://{}?mode=rwc", dir.join("outbox.db").display());
    let store = SqliteStore::connect(
        StoreConfig::new()
            .url(url.clone())
            .table("outbox")
            .limits(limits),
    )
    .await
    .expect("sqlite");
    store.migrate().await.expect("migrate");
    (store, url)
}

async fn enqueue(store: &SqliteStore, messages: Vec<NewMessage>) -> Vec<MessageId> {
    let mut tx = store
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("begin");
    let ids = store
        .enqueue_batch(&mut *tx, messages)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    ids
}

/// Waits until nothing is pending; panics after `bound`.
async fn drained(store: &SqliteStore, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        let stats = store.stats().await.expect("stats");
        if stats.pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} messages still pending",
            stats.pending
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn generous() -> Limits {
    let mut limits = Limits::default();
    limits.max_payload_len = 8 * 1024 * 1024;
    limits.max_headers_len = 4 * 1024 * 1024;
    limits
}

/// Messages over the store's limits are refused inside the service's transaction, with an
/// error naming the limit; the transaction goes on and commits the rest.
#[tokio::test]
async fn oversized_payloads_and_headers_are_refused_at_enqueue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = sqlite(dir.path(), Limits::default()).await;
    let mut tx = store
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("begin");
    let too_big = NewMessage::new("orders", vec![0u8; 901 * 1024]).key("k");
    let err = store
        .enqueue(&mut *tx, too_big)
        .await
        .expect_err("payload over the limit");
    assert_eq!(err.kind(), StoreErrorKind::InvalidMessage, "{err}");
    assert!(err.to_string().contains("payload"), "{err}");
    let fat_headers = NewMessage::new("orders", "x")
        .key("k")
        .header("big", "v".repeat(70 * 1024));
    let err = store
        .enqueue(&mut *tx, fat_headers)
        .await
        .expect_err("headers over the limit");
    assert_eq!(err.kind(), StoreErrorKind::InvalidMessage, "{err}");
    assert!(err.to_string().contains("header"), "{err}");
    let long_key = NewMessage::new("orders", "x").key("k".repeat(1000));
    assert!(store.enqueue(&mut *tx, long_key).await.is_err());
    let fine = store
        .enqueue(&mut *tx, NewMessage::new("orders", "ok").key("k"))
        .await
        .expect("a good message still goes in");
    tx.commit().await.expect("commit");
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.pending, 1, "only {fine} was written");
}

/// Through NATS: a payload above the server's max_payload, subjects that are not valid, and a
/// header value with a line break are dead-lettered with their errors; the good messages of
/// the key arrive in order and the relay keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_nats_cannot_take_are_dead_letters_and_the_key_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(server) = or_skip("nats-server", NatsServer::start(dir.path(), &[]).await) else {
        return;
    };
    let prefix = unique_name("bad");
    let stream = prefix.to_ascii_uppercase();
    let url = format!("nats://{}", server.addr());
    let js = broker::jetstream(&url).await.expect("connect");
    broker::create_stream(&js, &stream, &format!("{prefix}.>"))
        .await
        .expect("stream");
    let (store, store_url) = sqlite(dir.path(), generous()).await;
    let good = |i: usize| NewMessage::new("events", format!("good {i}")).key("k");
    let bad = vec![
        NewMessage::new("events", vec![7u8; 2 * 1024 * 1024]).key("k"),
        NewMessage::new("bad subject", "x").key("k"),
        NewMessage::new("wild.*", "x").key("k"),
        NewMessage::new("a..b", "x").key("k"),
        NewMessage::new("events", "x")
            .key("k")
            .header("evil", "line\r\nNats-Msg-Id: forged"),
    ];
    let mut messages = Vec::new();
    for (i, b) in bad.into_iter().enumerate() {
        messages.push(good(i));
        messages.push(b);
    }
    messages.push(good(99));
    let ids = enqueue(&store, messages).await;
    let good_ids: Vec<MessageId> = ids.iter().copied().step_by(2).collect();
    let config = write_config(
        dir.path(),
        &store_url,
        "outbox",
        &format!(
            "kind = \"nats\"\nurl = \"{url}\"\nsubject_prefix = \"{prefix}\"\nack_timeout = \"1s\""
        ),
    );
    let mut child = relay(&config, &["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drained(&store, Duration::from_secs(60)).await;
    assert!(
        child.try_wait().expect("status").is_none(),
        "the relay keeps running"
    );
    assert_eq!(sigterm(&mut child).await.code(), Some(0));
    let stderr = {
        let mut text = String::new();
        if let Some(mut err) = child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = err.read_to_string(&mut text).await;
        }
        text
    };
    assert!(!stderr.contains("panicked"), "{stderr}");
    let dead = store
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 5, "{dead:?}");
    for d in &dead {
        let error = d.message.last_error.clone().unwrap_or_default();
        assert!(!error.is_empty(), "a dead letter says why");
    }
    let got: Vec<MessageId> = broker::read_stream(&url, &stream, Duration::from_secs(20))
        .await
        .expect("read")
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(
        got, good_ids,
        "the good messages, in order, and nothing else"
    );
    server.stop().await;
}

/// Through AMQP: a routing key above 255 bytes, a queue that does not exist (unroutable) and a
/// payload above `max_message_size` are dead-lettered; the good messages arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_amqp_cannot_take_are_dead_letters_and_the_key_goes_on() {
    let name = unique_name("bad_amqp");
    let Some(queue) = or_skip("RabbitMQ", Queue::declare(&broker::amqp_url(), &name).await) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, store_url) = sqlite(dir.path(), generous()).await;
    let good = |i: usize| NewMessage::new(name.clone(), format!("good {i}")).key("k");
    let bad = vec![
        NewMessage::new(unique_name("no_such_queue"), "x").key("k"),
        NewMessage::new(name.clone(), vec![1u8; 200_000]).key("k"),
        NewMessage::new(name.clone(), "x")
            .key("k")
            .header("h".repeat(300), "x"),
    ];
    let mut messages = Vec::new();
    for (i, b) in bad.into_iter().enumerate() {
        messages.push(good(i));
        messages.push(b);
    }
    messages.push(good(99));
    let ids = enqueue(&store, messages).await;
    let good_ids: Vec<MessageId> = ids.iter().copied().step_by(2).collect();
    let config = write_config(
        dir.path(),
        &store_url,
        "outbox",
        &format!(
            "kind = \"amqp\"\nuri = \"{}\"\nrouting = \"queue\"\nmax_message_size = 100000\n\
             connect_timeout = \"2s\"",
            broker::amqp_url()
        ),
    );
    let mut child = relay(&config, &["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    drained(&store, Duration::from_secs(60)).await;
    assert!(child.try_wait().expect("status").is_none(), "still running");
    assert_eq!(sigterm(&mut child).await.code(), Some(0));
    let dead = store
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 3, "{dead:?}");
    let wanted = good_ids.iter().copied().collect();
    let got: Vec<MessageId> = queue
        .read(&wanted, Duration::from_millis(500), Duration::from_secs(20))
        .await
        .expect("read")
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(
        got, good_ids,
        "the good messages, in order, and nothing else"
    );
    queue.delete().await;
}

const INJECTIONS: &[&str] = &[
    "victim; DROP TABLE victim",
    "outbox\"; DROP TABLE victim; --",
    "outbox` ; DROP TABLE victim; --",
    "x' OR '1'='1",
    "outbox/*",
    "a.b.c",
    "public.victim; --",
];

/// Table names that carry SQL are refused before any statement runs: a clear error naming the
/// table, exit status 1 or 2, and the victim table untouched.
#[tokio::test]
async fn injection_in_table_names_is_refused_and_harms_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, url) = sqlite(dir.path(), Limits::default()).await;
    outbox_sqlx::sqlx::query("CREATE TABLE victim (x INTEGER)")
        .execute(store.pool())
        .await
        .expect("victim");
    let mut urls = vec![url];
    let pg_table = unique_name("victim");
    let pg = match PostgresStore::connect(
        StoreConfig::new()
            .url(outbox_chaos::db::postgres_url())
            .table(&pg_table),
    )
    .await
    {
        Ok(pg) => {
            pg.migrate().await.expect("migrate");
            urls.push(outbox_chaos::db::postgres_url());
            Some(pg)
        }
        Err(err) => {
            or_skip::<(), _>("PostgreSQL", Err(err));
            None
        }
    };
    for url in &urls {
        for attempt in INJECTIONS {
            let attempt = attempt.replace(
                "victim",
                if url.starts_with("sqlite") {
                    "victim"
                } else {
                    &pg_table
                },
            );
            let config = write_config(
                dir.path(),
                url,
                &attempt.replace('"', "\\\""),
                "kind = \"stdout\"",
            );
            for command in [&["migrate"][..], &["status"], &["run"]] {
                let out =
                    tokio::time::timeout(Duration::from_secs(30), relay(&config, command).output())
                        .await
                        .expect("exits at once")
                        .expect("runs");
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(
                    matches!(out.status.code(), Some(1 | 2)),
                    "{attempt} {command:?}: {:?} {stderr}",
                    out.status
                );
                assert!(!stderr.contains("panicked"), "{stderr}");
                // PostgreSQL checks the notify channel, named after the table, first.
                assert!(
                    (stderr.contains("invalid outbox table name")
                        || stderr.contains("invalid notify channel"))
                        && (stderr.contains(&attempt) || stderr.contains(&format!("{attempt:?}"))),
                    "{attempt} {command:?}: the error says why: {stderr}"
                );
            }
        }
    }
    outbox_sqlx::sqlx::query("SELECT count(*) FROM victim")
        .execute(store.pool())
        .await
        .expect("the victim table is still there");
    if let Some(pg) = pg {
        assert_eq!(pg.stats().await.expect("still there").pending, 0);
        pg.drop_tables().await.expect("drop");
    }
}

/// The README of the relay promises exit status 2 and the key at fault for an invalid
/// configuration; an invalid table name is one.
#[tokio::test]
async fn an_invalid_table_name_is_an_invalid_configuration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, url) = sqlite(dir.path(), Limits::default()).await;
    let config = write_config(
        dir.path(),
        &url,
        "victim; DROP TABLE victim",
        "kind = \"stdout\"",
    );
    let out = relay(&config, &["check"]).output().await.expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("store.table"), "{stderr}");
}
