//! Credentials never show: passwords in the store URL, the broker URL or the broker
//! properties appear in no output of the relay program (check, status, migrate, dead-letters,
//! run), in no log line (text or JSON, up to debug level) and not in /metrics, whether the
//! servers accept them or refuse them.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use outbox_chaos::broker;
use outbox_chaos::db::Db;
use outbox_testkit::env::{or_skip, unique_name};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_chaos-relay");

/// Runs every subcommand and a relay for a few seconds on `config`; returns all they printed
/// and what /metrics served.
async fn everything_printed(config: &Path, log: &str, level: &str) -> String {
    let mut all = String::new();
    let commands: [&[&str]; 6] = [
        &["check"],
        &["migrate"],
        &["status"],
        &["status", "--json"],
        &["dead-letters", "list"],
        &["dead-letters", "replay", "--dry-run"],
    ];
    for args in commands {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            Command::new(BIN)
                .arg("--config")
                .arg(config)
                .args(["--log-format", log])
                .args(args)
                .env("RUST_LOG", level)
                .env(
                    "OUTBOX_HTTP__LISTEN",
                    format!("127.0.0.1:{}", broker::free_port()),
                )
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("exits")
        .expect("runs");
        all.push_str(&String::from_utf8_lossy(&out.stdout));
        all.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let port = broker::free_port();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(["--log-format", log, "run"])
        .env("RUST_LOG", level)
        .env("OUTBOX_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let http = reqwest::Client::new();
    for path in ["/metrics", "/readyz", "/healthz"] {
        if let Ok(resp) = http
            .get(format!("http://127.0.0.1:{port}{path}"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            all.push_str(&resp.text().await.unwrap_or_default());
        }
    }
    broker::terminate(&mut child, Duration::from_secs(20)).await;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let mut stream = stream;
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text).await;
        all.push_str(&text);
    }
    all
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("config");
    path
}

fn assert_hidden(all: &str, secrets: &[&str], what: &str) {
    for secret in secrets {
        if let Some(at) = all.find(secret) {
            let from = at.saturating_sub(200);
            panic!(
                "{what}: the secret {secret:?} was printed: ...{}...",
                &all[from..(at + secret.len() + 50).min(all.len())]
            );
        }
    }
}

/// PostgreSQL (trust authentication: any password is accepted) with a password in its URL,
/// to RabbitMQ with a password it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_amqp_passwords_stay_hidden() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = unique_name("secrets");
    let mut pg = url::Url::parse(&outbox_chaos::db::postgres_url()).expect("url");
    pg.set_password(Some("Pg-S3cret-7731")).expect("password");
    let mut amqp = url::Url::parse(&broker::amqp_url()).expect("url");
    amqp.set_username("outbox-nobody").expect("user");
    amqp.set_password(Some("Amqp-S3cret-9917"))
        .expect("password");
    if or_skip(
        "PostgreSQL",
        outbox_sqlx::PostgresStore::connect(
            outbox_sqlx::StoreConfig::new()
                .url(pg.as_str())
                .table(&table),
        )
        .await,
    )
    .is_none()
    {
        return;
    }
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "[store]\nurl = \"{pg}\"\ntable = \"{table}\"\n[publisher]\nkind = \"amqp\"\n\
             uri = \"{amqp}\"\nconnect_timeout = \"2s\"\n[relay]\npublish_timeout = \"2s\"\n"
        ),
    );
    for log in ["text", "json"] {
        let all = everything_printed(&config, log, "debug").await;
        assert!(
            all.contains("***") || all.contains("****"),
            "URLs are shown redacted: {all}"
        );
        assert_hidden(&all, &["Pg-S3cret-7731", "Amqp-S3cret-9917"], log);
    }
    let store = outbox_sqlx::PostgresStore::connect(
        outbox_sqlx::StoreConfig::new()
            .url(pg.as_str())
            .table(&table),
    )
    .await
    .expect("connect");
    store.drop_tables().await.expect("drop");
}

/// MariaDB reached as a user with a password, to NATS with credentials in its URL; then an
/// unreachable MySQL server with a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_and_nats_passwords_stay_hidden() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = unique_name("sec");
    let Some(db) = or_skip(
        "MySQL",
        Db::mysql(&run, &run, &[outbox_chaos::db::key_name(0)]).await,
    ) else {
        return;
    };
    let password = url::Url::parse(db.relay_url())
        .expect("url")
        .password()
        .expect("a password")
        .to_owned();
    let nats = outbox_testkit::env::service_url("OUTBOX_TEST_NATS_URL", "nats://127.0.0.1:4222");
    let mut nats = url::Url::parse(&nats).expect("url");
    nats.set_username("relay").expect("user");
    nats.set_password(Some("Nats-S3cret-4421"))
        .expect("password");
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "[store]\nurl = \"{}\"\ntable = \"{run}\"\n[publisher]\nkind = \"nats\"\n\
             url = \"{nats}\"\nconnect_timeout = \"2s\"\n[relay]\npublish_timeout = \"2s\"\n",
            db.relay_url()
        ),
    );
    let all = everything_printed(&config, "text", "info").await;
    assert_hidden(&all, &[&password, "Nats-S3cret-4421"], "mysql and nats");
    let all = everything_printed(&config, "json", "debug,async_nats=info").await;
    assert_hidden(
        &all,
        &[&password, "Nats-S3cret-4421"],
        "mysql and nats, debug",
    );
    // An unreachable server: the error names it, without the password.
    let unreachable = write(
        dir.path(),
        "down.toml",
        "[store]\nurl = \"mysql://app:My-S3cret-0042@127.0.0.1:1/app\"\n[publisher]\nkind = \"stdout\"\n",
    );
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new(BIN)
            .arg("--config")
            .arg(&unreachable)
            .arg("check")
            .env("RUST_LOG", "debug")
            .env(
                "OUTBOX_HTTP__LISTEN",
                format!("127.0.0.1:{}", broker::free_port()),
            )
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("exits")
    .expect("runs");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("store       FAILED"), "{all}");
    assert_hidden(&all, &["My-S3cret-0042"], "unreachable mysql");
    db.teardown(&run).await;
}

/// Kafka SASL password among the producer properties, store on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_property_secrets_stay_hidden() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("outbox.db").display()
    );
    let brokers = outbox_testkit::env::service_url("OUTBOX_TEST_KAFKA_BROKERS", "127.0.0.1:9092");
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "[store]\nurl = \"{url}\"\n[publisher]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\n\
             [publisher.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\
             \"sasl.mechanisms\" = \"PLAIN\"\n\"sasl.username\" = \"relay\"\n\
             \"sasl.password\" = \"Kafka-S3cret-5150\"\n\"socket.timeout.ms\" = \"2000\"\n\
             [relay]\npublish_timeout = \"2s\"\n"
        ),
    );
    let all = everything_printed(&config, "text", "debug").await;
    assert_hidden(&all, &["Kafka-S3cret-5150"], "kafka");
}

/// At debug level, async-nats logs each connection attempt with the server's `Url` as parsed,
/// password included, and the relay passes the URL with its credentials to async-nats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_credentials_stay_hidden_at_debug_level() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("outbox.db").display()
    );
    let nats = outbox_testkit::env::service_url("OUTBOX_TEST_NATS_URL", "nats://127.0.0.1:4222");
    let mut nats = url::Url::parse(&nats).expect("url");
    nats.set_username("relay").expect("user");
    nats.set_password(Some("Nats-S3cret-4421"))
        .expect("password");
    let config = write(
        dir.path(),
        "relay.toml",
        &format!("[store]\nurl = \"{url}\"\n[publisher]\nkind = \"nats\"\nurl = \"{nats}\"\n"),
    );
    let all = everything_printed(&config, "text", "debug").await;
    assert_hidden(&all, &["Nats-S3cret-4421"], "nats at debug level");
}
