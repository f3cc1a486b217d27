//! The `outbox-relay` binary, started as a process against real servers.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use outbox_core::{MessageId, NewMessage, Store};
use outbox_sqlx::{PostgresStore, SqliteStore, StoreConfig};
use outbox_testkit::env::{or_skip, service_url, unique_name};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

fn amqp_url() -> String {
    service_url(
        "OUTBOX_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}

fn postgres_url() -> String {
    service_url(
        "OUTBOX_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

/// A relay configuration file in `dir`; `relay_extra` lands in `[relay]`.
fn write_config(dir: &Path, store_url: &str, table: &str, publisher: &str, http: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    let text = format!(
        r#"
[store]
url = "{store_url}"
table = "{table}"

[publisher]
{publisher}

[relay]
batch_size = 100
lease = "4s"
publish_timeout = "1s"
partition_lease = "1s"
poll_max = "100ms"
shutdown_timeout = "3s"

[relay.retry]
initial_delay = "50ms"
max_delay = "200ms"

[http]
{http}
"#
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn command(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .kill_on_drop(true);
    cmd.env_remove("RUST_LOG");
    // Every process gets endpoints of its own, so that tests and relays run side by side.
    cmd.env("OUTBOX_HTTP__LISTEN", format!("127.0.0.1:{}", free_port()));
    cmd
}

async fn run_to_end(config: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    let out = command(config, args)
        .output()
        .await
        .expect("the binary runs");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn sigterm(child: &mut Child, bound: Duration) -> ExitStatus {
    let pid = child.id().expect("running").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(killed.success());
    tokio::time::timeout(bound, child.wait())
        .await
        .expect("the relay stops within its shutdown bound")
        .expect("wait")
}

async fn sqlite_store(dir: &Path, table: &str) -> (SqliteStore, String) {
    let url = format!("sqlite://{}?mode=rwc", dir.join("outbox.db").display());
    let store = SqliteStore::connect(StoreConfig::new().url(url.clone()).table(table))
        .await
        .expect("sqlite");
    store.migrate().await.expect("migrate");
    (store, url)
}

async fn enqueue_sqlite(store: &SqliteStore, messages: Vec<NewMessage>) -> Vec<MessageId> {
    let mut tx = store.pool().begin().await.expect("begin");
    let ids = store
        .enqueue_batch(&mut *tx, messages)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    ids
}

fn keyed(destination: &str, n: usize, keys: usize) -> Vec<NewMessage> {
    (0..n)
        .map(|i| NewMessage::new(destination, format!("{i}")).key(format!("key-{}", i % keys)))
        .collect()
}

/// Reads the JSON lines a stdout relay prints and returns the ids in print order.
fn printed_ids(stdout: &str) -> Vec<MessageId> {
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|v| v.get("id")?.as_str()?.parse().ok())
        .collect()
}

#[tokio::test]
async fn bad_configuration_exits_2_and_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "[store]\nurl = \"sqlite://x.db\"\n[publisher]\nkind = \"stdout\"\n[relay]\nleese = \"1s\"\n",
            "relay.leese",
        ),
        (
            "[store]\nurl = \"sqlite://x.db\"\n[publisher]\nkind = \"stdout\"\n[relay]\nbatch_size = 0\n",
            "relay.batch_size",
        ),
        (
            "[store]\nurl = \"redis://x\"\n[publisher]\nkind = \"stdout\"\n",
            "store.url",
        ),
        (
            "[store]\ntable = \"t\"\n[publisher]\nkind = \"stdout\"\n",
            "store.url",
        ),
        (
            "[store]\nurl = \"sqlite://x.db\"\n[publisher]\nkind = \"carrier-pigeon\"\n",
            "publisher.kind",
        ),
        (
            "[store]\nurl = \"sqlite://x.db\"\n[publisher]\nkind = \"amqp\"\nuri = \"amqp://h\"\nrouting = \"sideways\"\n",
            "publisher.routing",
        ),
        (
            "[store]\nurl = \"sqlite://x.db\"\n[publisher]\nkind = \"stdout\"\n[http]\nlisten = \"not an address\"\n",
            "http.listen",
        ),
        (
            "[store]\nurl = \"sqlite://x.db\"\nmax_connections = 4\n[publisher]\nkind = \"stdout\"\n",
            "store.max_connections",
        ),
        ("[store\nurl = ", "relay.toml"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, text).expect("write");
        let out = command(&path, &["check"])
            .env_remove("OUTBOX_HTTP__LISTEN")
            .output()
            .await
            .expect("runs");
        let (status, stderr) = (out.status, String::from_utf8_lossy(&out.stderr));
        assert_eq!(status.code(), Some(2), "{text}\n{stderr}");
        assert!(stderr.contains(key), "the error names {key}: {stderr}");
    }
    let (status, _, stderr) = run_to_end(&dir.path().join("missing.toml"), &["run"]).await;
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("does not exist"), "{stderr}");
}

#[tokio::test]
async fn environment_overrides_the_file_and_secrets_stay_hidden() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, url) = sqlite_store(dir.path(), "outbox").await;
    let config = write_config(
        dir.path(),
        "postgres://app:hunter2@127.0.0.1:1/none",
        "outbox",
        "kind = \"stdout\"",
        "",
    );
    let mut cmd = command(&config, &["status", "--json"]);
    cmd.env("OUTBOX_STORE__URL", &url);
    let out = cmd.output().await.expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(status["pending"], 0);

    // A store that cannot be reached: the error says which, without its password.
    let (code, stdout, stderr) = run_to_end(&config, &["check"]).await;
    assert_eq!(code.code(), Some(1));
    assert!(stdout.contains("store       FAILED"), "{stdout}");
    assert!(
        !stdout.contains("hunter2") && !stderr.contains("hunter2"),
        "{stdout}{stderr}"
    );
    assert!(stdout.contains("app:***@"), "{stdout}");
}

/// `outbox-relay schema ARGS` with no configuration file; its exit status, stdout, stderr.
async fn schema(args: &[&str]) -> (ExitStatus, String, String) {
    let output = Command::new(BIN)
        .arg("schema")
        .args(args)
        .env_remove("OUTBOX_CONFIG")
        .output()
        .await
        .expect("run outbox-relay");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("UTF-8");
    (output.status, text(output.stdout), text(output.stderr))
}

#[tokio::test]
async fn schema_prints_what_migrate_runs_for_other_migration_tools() {
    let config = StoreConfig::new().table("app.events");
    for (dialect, from, expected) in [
        ("postgres", 0, PostgresStore::schema_script(&config, 0)),
        ("postgres", 3, PostgresStore::schema_script(&config, 3)),
        (
            "mysql",
            0,
            outbox_sqlx::MySqlStore::schema_script(&config, 0),
        ),
    ] {
        let (status, stdout, stderr) = schema(&[
            "--dialect",
            dialect,
            "--table",
            "app.events",
            "--from",
            &from.to_string(),
        ])
        .await;
        assert!(status.success(), "{stderr}");
        assert_eq!(stdout, expected.expect("script"), "{dialect} from {from}");
    }
    // For the `mysql` client: the trigger between DELIMITER lines, nothing else changed.
    let (status, delimited, stderr) = schema(&["--dialect", "mysql", "--mysql-client"]).await;
    assert!(status.success(), "{stderr}");
    let plain = outbox_sqlx::MySqlStore::schema_script(&StoreConfig::new(), 0).expect("script");
    assert!(
        delimited.contains("\nDELIMITER //\nCREATE TRIGGER"),
        "{delimited}"
    );
    assert!(delimited.contains("\nEND//\nDELIMITER ;"), "{delimited}");
    let undelimited = delimited
        .replace("DELIMITER //\n", "")
        .replace("END//\nDELIMITER ;", "END;");
    assert_eq!(undelimited, plain);

    let (status, _, stderr) = schema(&["--dialect", "postgres", "--from", "99"]).await;
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("newer than"), "{stderr}");
    let (status, _, stderr) = schema(&[]).await;
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("--dialect"), "{stderr}");

    // Applied as a migration tool would, the script leaves what `migrate` leaves.
    let (status, script, stderr) = schema(&["--dialect", "sqlite", "--table", "events"]).await;
    assert!(status.success(), "{stderr}");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
    let store = SqliteStore::connect(StoreConfig::new().url(url).table("events"))
        .await
        .expect("connect");
    outbox_sqlx::sqlx::raw_sql(&script)
        .execute(store.pool())
        .await
        .expect("the printed script");
    assert_eq!(
        store.schema_version().await.expect("version"),
        SqliteStore::SCHEMA_VERSION
    );
    store.migrate().await.expect("nothing left to do");
    let ids = enqueue_sqlite(&store, keyed("orders", 3, 2)).await;
    assert_eq!(ids.len(), 3);
}

#[tokio::test]
async fn migrate_status_and_check_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("fresh.db").display()
    );
    let config = write_config(dir.path(), &url, "events", "kind = \"stdout\"", "");
    let (status, _, stderr) = run_to_end(&config, &["status"]).await;
    assert_eq!(status.code(), Some(1), "no table yet: {stderr}");
    assert!(
        stderr.contains("migrat") || stderr.contains("schema"),
        "{stderr}"
    );
    let (status, stdout, stderr) = run_to_end(&config, &["migrate"]).await;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("migrated"));
    let (status, _, _) = run_to_end(&config, &["migrate"]).await;
    assert!(status.success(), "migrating twice is harmless");
    let (status, stdout, stderr) = run_to_end(&config, &["status"]).await;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("pending     0"), "{stdout}");
    let (status, stdout, _) = run_to_end(&config, &["check"]).await;
    assert!(status.success(), "{stdout}");
    assert!(stdout.contains("broker      ok"), "{stdout}");

    let unreachable = write_config(
        dir.path(),
        &url,
        "events",
        "kind = \"amqp\"\nuri = \"amqp://guest:guest@127.0.0.1:1/%2f\"\nconnect_timeout = \"1s\"",
        "",
    );
    let (status, stdout, _) = run_to_end(&unreachable, &["check"]).await;
    assert_eq!(status.code(), Some(1));
    assert!(stdout.contains("broker      FAILED"), "{stdout}");
}

#[tokio::test]
async fn sigterm_stops_gracefully_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, url) = sqlite_store(dir.path(), "outbox").await;
    let config = write_config(dir.path(), &url, "outbox", "kind = \"stdout\"", "");
    let first = keyed("orders", 3000, 20);
    let mut expected: Vec<MessageId> = enqueue_sqlite(&store, first).await;

    // Stop the relay while it drains the backlog, then let a second one finish.
    let mut stdout_all = String::new();
    for round in 0..2 {
        let mut child = command(&config, &["run"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let reader = tokio::spawn(async move {
            let mut text = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let more = enqueue_sqlite(&store, keyed("orders", 200, 20)).await;
            expected.extend(more);
        } else {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while store.stats().await.expect("stats").pending > 0 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the second relay drains the outbox"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let status = sigterm(&mut child, Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(0), "SIGTERM is a clean exit");
        stdout_all.push_str(&reader.await.expect("reader"));
    }
    let printed: HashSet<MessageId> = printed_ids(&stdout_all).into_iter().collect();
    let missing: Vec<_> = expected.iter().filter(|id| !printed.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} messages never published",
        missing.len()
    );
    assert_eq!(store.stats().await.expect("stats").pending, 0);
}

/// A queue of the test's own on the RabbitMQ server, read in arrival order.
struct Queue {
    channel: lapin::Channel,
    name: String,
}

impl Queue {
    async fn declare(name: &str) -> Option<Self> {
        let conn = or_skip(
            "RabbitMQ",
            Connection::connect(&amqp_url(), ConnectionProperties::default()).await,
        )?;
        let channel = conn.create_channel().await.expect("channel");
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare queue");
        Some(Self {
            channel,
            name: name.to_owned(),
        })
    }

    /// Reads `count` messages (or what arrives before `timeout`): (id, key) in arrival order.
    async fn read(&self, count: usize, timeout: Duration) -> Vec<(MessageId, Option<String>)> {
        let mut consumer = self
            .channel
            .basic_consume(
                self.name.as_str().into(),
                unique_name("reader").as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while got.len() < count {
            let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(deadline, consumer.next()).await
            else {
                break;
            };
            let props = &delivery.properties;
            let id = props
                .message_id()
                .as_ref()
                .and_then(|s| s.as_str().parse().ok())
                .expect("message_id");
            let key = props.headers().as_ref().and_then(|h| {
                h.inner().get("outbox-key").and_then(|v| match v {
                    lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                })
            });
            got.push((id, key));
        }
        got
    }

    async fn delete(self) {
        let _ = self
            .channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

fn amqp_publisher(uri: &str) -> String {
    format!("kind = \"amqp\"\nuri = \"{uri}\"\nrouting = \"queue\"\nconnect_timeout = \"1s\"")
}

#[tokio::test]
async fn a_replayed_dead_letter_is_published() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, url) = sqlite_store(dir.path(), "outbox").await;
    let queue_name = unique_name("replay");
    let config = write_config(dir.path(), &url, "outbox", &amqp_publisher(&amqp_url()), "");
    // No queue yet: the message is unroutable, a permanent failure, hence a dead letter.
    let ids = enqueue_sqlite(
        &store,
        vec![NewMessage::new(queue_name.clone(), "hello").key("k")],
    )
    .await;
    let mut child = command(&config, &["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.stats().await.expect("stats").dead == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the message is dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, stdout, _) = run_to_end(&config, &["dead-letters", "list"]).await;
    assert!(status.success());
    assert!(stdout.contains(&ids[0].to_string()), "{stdout}");
    let Some(queue) = Queue::declare(&queue_name).await else {
        return;
    };
    let (status, stdout, _) = run_to_end(
        &config,
        &["dead-letters", "replay", "--dry-run", "--key", "k"],
    )
    .await;
    assert!(status.success());
    assert!(stdout.contains("would replay 1"), "{stdout}");
    assert_eq!(
        store.stats().await.expect("stats").dead,
        1,
        "a dry run changes nothing"
    );
    let (status, stdout, _) = run_to_end(
        &config,
        &["dead-letters", "replay", "--id", &ids[0].to_string()],
    )
    .await;
    assert!(status.success());
    assert!(stdout.contains("replayed 1"), "{stdout}");
    let got = queue.read(1, Duration::from_secs(30)).await;
    assert_eq!(
        got.first().map(|(id, _)| *id),
        Some(ids[0]),
        "the replayed message arrives"
    );
    assert_eq!(
        sigterm(&mut child, Duration::from_secs(15)).await.code(),
        Some(0)
    );
    let (status, stdout, _) = run_to_end(&config, &["dead-letters", "purge"]).await;
    assert!(status.success());
    assert!(stdout.contains("purged 0"), "{stdout}");
    queue.delete().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test]
async fn an_unreachable_broker_is_not_ready_and_delivers_once_back() {
    let Some(broker) = or_skip("RabbitMQ", tokio::net::lookup_host("127.0.0.1:5672").await) else {
        return;
    };
    let broker: Vec<_> = broker.collect();
    let amqp = url::Url::parse(&amqp_url()).expect("url");
    let upstream = tokio::net::lookup_host((
        amqp.host_str().unwrap_or("127.0.0.1"),
        amqp.port().unwrap_or(5672),
    ))
    .await
    .expect("resolve")
    .next()
    .or_else(|| broker.first().copied())
    .expect("address");
    let proxy = outbox_testkit::proxy::FaultProxy::start(upstream)
        .await
        .expect("proxy");
    proxy.set_down(true);
    let mut through = amqp.clone();
    through.set_port(Some(proxy.addr().port())).expect("port");
    through.set_host(Some("127.0.0.1")).expect("host");

    let dir = tempfile::tempdir().expect("tempdir");
    let (store, url) = sqlite_store(dir.path(), "outbox").await;
    let queue_name = unique_name("unreachable");
    let Some(queue) = Queue::declare(&queue_name).await else {
        return;
    };
    let port = free_port();
    let config = write_config(
        dir.path(),
        &url,
        "outbox",
        &amqp_publisher(through.as_str()),
        "",
    );
    let sent = enqueue_sqlite(&store, keyed(&queue_name, 200, 5)).await;
    let mut child = command(&config, &["run"])
        .env("OUTBOX_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        // Two attempts 50 ms apart: an outage of seconds is many times the retry budget, and
        // must still dead-letter nothing.
        .env("OUTBOX_RELAY__RETRY__MAX_ATTEMPTS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let http = http.clone();
        async move {
            http.get(format!("http://127.0.0.1:{port}{path}"))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .ok()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(resp) = get("/healthz").await {
            assert!(resp.status().is_success());
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "/healthz answers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = get("/readyz").await.expect("/readyz answers");
    assert_eq!(ready.status().as_u16(), 503, "the broker is down");
    assert!(ready.text().await.unwrap_or_default().contains("broker"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ready = get("/readyz").await.expect("/readyz answers");
    assert_eq!(ready.status().as_u16(), 503, "the broker is down");
    let reason = ready.text().await.unwrap_or_default();
    assert!(reason.contains("relay paused"), "{reason}");
    let metrics = get("/metrics")
        .await
        .expect("/metrics answers")
        .text()
        .await
        .unwrap_or_default();
    assert!(
        metrics.contains("outbox_relay_paused{cause=\"broker\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        store.stats().await.expect("stats").pending,
        200,
        "nothing lost while the broker is down"
    );
    assert_eq!(
        store.stats().await.expect("stats").dead,
        0,
        "an unreachable broker is not a reason to dead-letter"
    );

    proxy.set_down(false);
    let got = queue.read(sent.len(), Duration::from_secs(60)).await;
    let ids: HashSet<MessageId> = got.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        sent.iter().copied().collect(),
        "every message arrives once the broker is back"
    );
    let ready = get("/readyz").await.expect("/readyz answers");
    assert_eq!(ready.status().as_u16(), 200);
    assert_eq!(store.stats().await.expect("stats").dead, 0);
    let metrics = get("/metrics")
        .await
        .expect("/metrics answers")
        .text()
        .await
        .unwrap_or_default();
    assert!(metrics.contains("outbox_published_total"), "{metrics}");
    assert!(metrics.contains("outbox_publish_errors_total"), "{metrics}");
    assert!(
        metrics.contains("outbox_relay_paused{cause=\"broker\"} 0"),
        "{metrics}"
    );
    assert_eq!(
        sigterm(&mut child, Duration::from_secs(15)).await.code(),
        Some(0)
    );
    queue.delete().await;
}

#[tokio::test]
async fn three_relays_share_one_database() {
    let table = unique_name("relay_cli");
    let Some(store) = or_skip(
        "PostgreSQL",
        PostgresStore::connect(StoreConfig::new().url(postgres_url()).table(&table)).await,
    ) else {
        return;
    };
    store.migrate().await.expect("migrate");
    let queue_name = unique_name("shared");
    let Some(queue) = Queue::declare(&queue_name).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &postgres_url(),
        &table,
        &amqp_publisher(&amqp_url()),
        "",
    );
    let mut relays: Vec<Child> = (0..3)
        .map(|_| {
            command(&config, &["run"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect();
    // Let them find each other and split the partitions.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, stdout, _) = run_to_end(&config, &["status", "--json"]).await;
        let status: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
        let shares: Vec<u64> = status["relays"]
            .as_array()
            .map(|r| r.iter().filter_map(|m| m["partitions"].as_u64()).collect())
            .unwrap_or_default();
        if shares.len() == 3 && shares.iter().all(|s| *s > 0) && shares.iter().sum::<u64>() == 64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "three relays share the partitions: {stdout}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut sent = Vec::new();
    for _ in 0..10 {
        let batch = keyed(&queue_name, 200, 40);
        let mut tx = store.pool().begin().await.expect("begin");
        sent.extend(
            store
                .enqueue_batch(&mut *tx, batch.clone())
                .await
                .expect("enqueue")
                .into_iter()
                .zip(batch),
        );
        tx.commit().await.expect("commit");
    }
    let got = queue.read(sent.len(), Duration::from_secs(90)).await;
    for relay in &mut relays {
        assert_eq!(
            sigterm(relay, Duration::from_secs(15)).await.code(),
            Some(0)
        );
    }
    let position: HashMap<MessageId, usize> = sent
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i))
        .collect();
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut seen = HashSet::new();
    for (id, key) in &got {
        if !seen.insert(*id) {
            continue;
        }
        let pos = position[id];
        let key = key.clone().expect("key header");
        if let Some(prev) = last.insert(key.clone(), pos) {
            assert!(pos > prev, "key {key}: #{pos} arrived after #{prev}");
        }
    }
    assert_eq!(seen.len(), sent.len(), "every message arrived");
    queue.delete().await;
    store.drop_tables().await.expect("drop");
}

/// A relay started while its database is unreachable waits for it, as it waits out an outage
/// once running: `/healthz` answers, `/readyz` says why it is not ready, and it relays once the
/// database answers.
#[tokio::test]
async fn a_store_unreachable_at_start_is_waited_for() {
    let table = unique_name("relay_wait");
    let Some(store) = or_skip(
        "PostgreSQL",
        PostgresStore::connect(StoreConfig::new().url(postgres_url()).table(&table)).await,
    ) else {
        return;
    };
    store.migrate().await.expect("migrate");
    let pg = url::Url::parse(&postgres_url()).expect("url");
    let upstream = tokio::net::lookup_host((
        pg.host_str().unwrap_or("127.0.0.1"),
        pg.port().unwrap_or(5432),
    ))
    .await
    .expect("resolve")
    .next()
    .expect("address");
    let proxy = outbox_testkit::proxy::FaultProxy::start(upstream)
        .await
        .expect("proxy");
    proxy.set_down(true);
    let mut through = pg.clone();
    through.set_host(Some("127.0.0.1")).expect("host");
    through.set_port(Some(proxy.addr().port())).expect("port");

    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        through.as_str(),
        &table,
        "kind = \"stdout\"",
        "",
    );
    let port = free_port();
    let mut child = command(&config, &["run"])
        .env("OUTBOX_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let http = http.clone();
        async move {
            http.get(format!("http://127.0.0.1:{port}{path}"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while get("/healthz").await.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "/healthz answers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the relay waits for its store instead of exiting"
    );
    let ready = get("/readyz").await.expect("/readyz answers");
    assert_eq!(ready.status().as_u16(), 503);
    let reason = ready.text().await.unwrap_or_default();
    assert!(
        reason.contains("starting") && reason.contains("unreachable"),
        "{reason}"
    );

    let sent = keyed("orders", 5, 2);
    let mut tx = store.pool().begin().await.expect("begin");
    let ids = store.enqueue_batch(&mut *tx, sent).await.expect("enqueue");
    tx.commit().await.expect("commit");
    proxy.set_down(false);
    let mut printed = Vec::new();
    while printed.len() < ids.len() {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the relay publishes once its store answers")
            .expect("stdout")
            .expect("a line");
        printed.extend(printed_ids(&line));
    }
    let printed: HashSet<MessageId> = printed.into_iter().collect();
    assert_eq!(printed, ids.iter().copied().collect());
    assert_eq!(
        sigterm(&mut child, Duration::from_secs(25)).await.code(),
        Some(0)
    );
    store.drop_tables().await.expect("drop");
}

/// With default settings, SIGTERM ends the program within 25 s even when its broker stopped
/// answering in the middle of the run (a black hole: connections open, nothing comes back),
/// so Kubernetes' default grace period of 30 s never has to kill it; nothing is lost.
#[tokio::test]
async fn sigterm_with_default_settings_exits_within_25_s_when_the_broker_hangs() {
    let amqp = url::Url::parse(&amqp_url()).expect("url");
    let Some(upstream) = or_skip(
        "RabbitMQ",
        tokio::net::lookup_host((
            amqp.host_str().unwrap_or("127.0.0.1"),
            amqp.port().unwrap_or(5672),
        ))
        .await,
    ) else {
        return;
    };
    let upstream: Vec<_> = upstream.collect();
    let proxy = outbox_testkit::proxy::FaultProxy::start(upstream[0])
        .await
        .expect("proxy");
    let mut through = amqp.clone();
    through.set_host(Some("127.0.0.1")).expect("host");
    through.set_port(Some(proxy.addr().port())).expect("port");
    let queue_name = unique_name("hung");
    let Some(queue) = Queue::declare(&queue_name).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, url) = sqlite_store(dir.path(), "outbox").await;
    // Nothing but the store and the broker: every relay setting at its default.
    let config = dir.path().join("defaults.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{url}\"\n\n[publisher]\nkind = \"amqp\"\nuri = \"{through}\"\nrouting = \"queue\"\n"
        ),
    )
    .expect("write config");
    let first = enqueue_sqlite(&store, keyed(&queue_name, 50, 5)).await;
    let mut child = command(&config, &["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let got = queue.read(first.len(), Duration::from_secs(30)).await;
    assert_eq!(got.len(), first.len(), "the relay runs");
    proxy.set_blackhole(true);
    let second = enqueue_sqlite(&store, keyed(&queue_name, 50, 5)).await;
    // Let the relay claim them and hang in publishing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let signalled = tokio::time::Instant::now();
    let status = sigterm(&mut child, Duration::from_secs(30)).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "a clean exit");
    assert!(
        took <= Duration::from_secs(25),
        "SIGTERM to exit took {took:?}"
    );
    println!("SIGTERM to exit, broker black-holed: {took:?}");
    proxy.set_blackhole(false);
    assert_eq!(
        store.stats().await.expect("stats").dead,
        0,
        "nothing dead-lettered"
    );
    // What the stopped relay held is handed back: the next relay publishes it.
    let mut next = command(&config, &["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // One reader for all of them (each read is a consumer of its own); the hung publish may
    // also have gone out once the black hole lifted: duplicates are allowed.
    let seen: HashSet<MessageId> = queue
        .read(2 * second.len(), Duration::from_secs(20))
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let missing = second.iter().filter(|id| !seen.contains(id)).count();
    assert_eq!(
        missing, 0,
        "the held messages are published by the next relay"
    );
    assert_eq!(
        sigterm(&mut next, Duration::from_secs(25)).await.code(),
        Some(0)
    );
    queue.delete().await;
}

/// What operators expect of a process: counters exported at 0 from the start, endpoints that
/// can be turned off or put on a port the system picks, and logs without colour codes when
/// they go to a file or a collector.
#[tokio::test]
async fn counters_start_at_zero_listeners_can_be_off_and_logs_have_no_colours() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, url) = sqlite_store(dir.path(), "outbox").await;
    let port = free_port();
    let config = write_config(dir.path(), &url, "outbox", "kind = \"stdout\"", "");
    let first = command(&config, &["run"])
        .env("OUTBOX_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        match http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
        {
            Ok(response) => break response.text().await.expect("body"),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("/metrics never answered: {err}"),
        }
    };
    for counter in [
        "outbox_published_total 0",
        "outbox_retried_total 0",
        "outbox_dead_lettered_total 0",
        "outbox_publish_errors_total 0",
        "outbox_store_errors_total 0",
    ] {
        assert!(metrics.contains(counter), "{counter} in:\n{metrics}");
    }
    // A second relay on the same host: endpoints off, and a third on a port of the system's
    // choosing, which the log names. Neither exits for an address in use.
    let mut others = Vec::new();
    for listen in ["off", "127.0.0.1:0"] {
        others.push(
            command(&config, &["run"])
                .env("OUTBOX_HTTP__LISTEN", listen)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for other in &mut others {
        assert!(
            other.try_wait().expect("status").is_none(),
            "the relay keeps running"
        );
    }
    for mut child in others.into_iter().chain([first]) {
        let mut stderr = child.stderr.take().expect("stderr");
        assert_eq!(
            sigterm(&mut child, Duration::from_secs(15)).await.code(),
            Some(0)
        );
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text)
            .await
            .expect("read the log");
        assert!(text.contains("relay starting"), "{text}");
        assert!(
            !text.contains('\u{1b}'),
            "no colour codes in a piped log: {text:?}"
        );
    }
}
