//! The `outbox-relay` binary as built by this package speaks TLS (the default `tls` feature):
//! asked for TLS, it tries it and reports what the server said, never that TLS is missing from
//! the build, and never panics. Full TLS runs against servers with certificates made by the
//! tests are in `outbox-chaos` (`tests/tls.rs`, `tests/db_tls.rs`).

use std::path::{Path, PathBuf};

use outbox_sqlx::{PostgresStore, StoreConfig, sqlx};
use outbox_testkit::env::{free_port, or_skip, service_url, unique_name};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

/// What a build without TLS says, per client.
const NO_TLS: &[&str] = &[
    "without TLS support",             // sqlx
    "needs the `rustls` feature",      // outbox-nats
    "not available at build time",     // librdkafka without OpenSSL
    "no process-level CryptoProvider", // rustls without a provider
    "panicked",
];

/// A configuration file in `dir`: the store at `store_url`, table `table`, and `publisher`.
fn config(dir: &Path, store_url: &str, table: &str, publisher: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\nurl = \"{store_url}\"\ntable = \"{table}\"\n\n[publisher]\n{publisher}\n"
        ),
    )
    .expect("config");
    path
}

/// Runs a subcommand: its exit status and everything it printed.
async fn run(config: &Path, subcommand: &str) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg(subcommand)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for missing in NO_TLS {
        assert!(!text.contains(missing), "{missing:?} in:\n{text}");
    }
    (out.status.code(), text)
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("outbox.db").display())
}

#[tokio::test]
async fn postgres_with_sslmode_require_goes_over_tls_when_the_server_offers_it() {
    let url = service_url(
        "OUTBOX_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    let Some(store) = or_skip(
        "PostgreSQL",
        PostgresStore::connect(StoreConfig::new().url(url.clone())).await,
    ) else {
        return;
    };
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(store.pool())
        .await
        .expect("SHOW ssl");
    let schema = unique_name("relay_tls");
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(store.pool())
        .await
        .expect("schema");

    let dir = tempfile::tempdir().expect("tempdir");
    let separator = if url.contains('?') { '&' } else { '?' };
    let tls = format!("{url}{separator}sslmode=require");
    let config = config(
        dir.path(),
        &tls,
        &format!("{schema}.outbox"),
        "kind = \"stdout\"",
    );
    let migrated = run(&config, "migrate").await;
    let checked = run(&config, "check").await;
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(store.pool())
        .await
        .expect("drop schema");
    store.pool().close().await;

    if ssl == "on" {
        for (code, out) in [migrated, checked] {
            assert_eq!(code, Some(0), "{out}");
        }
    } else {
        // A server without TLS refuses it; the build is not what is missing.
        let (code, out) = checked;
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("store       FAILED"), "{out}");
    }
}

#[tokio::test]
async fn a_tls_nats_url_to_a_plain_server_fails_the_tls_handshake() {
    let url = service_url("OUTBOX_TEST_NATS_URL", "nats://127.0.0.1:4222");
    let address = url
        .split("://")
        .nth(1)
        .unwrap_or(&url)
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .to_owned();
    if or_skip("NATS", tokio::net::TcpStream::connect(&address).await).is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let publisher = format!("kind = \"nats\"\nurl = \"tls://{address}\"\nconnect_timeout = \"2s\"");
    broker_check_fails(dir.path(), &publisher).await;
}

#[tokio::test]
async fn an_amqps_uri_to_a_plain_server_fails_the_tls_handshake() {
    let url = service_url(
        "OUTBOX_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    );
    let Some(rest) = url.strip_prefix("amqp://") else {
        return;
    };
    let host = rest.rsplit('@').next().unwrap_or_default();
    let address = host.split('/').next().unwrap_or_default().to_owned();
    if or_skip("RabbitMQ", tokio::net::TcpStream::connect(&address).await).is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let publisher = format!("kind = \"amqp\"\nuri = \"amqps://{rest}\"");
    broker_check_fails(dir.path(), &publisher).await;
}

#[tokio::test]
async fn kafka_over_ssl_is_accepted_by_the_build() {
    // Nothing listens on the port: the publisher is built with `security.protocol = SSL` (a
    // build without OpenSSL refuses that property) and the check fails to reach the broker.
    let port = free_port().expect("a free port");
    let dir = tempfile::tempdir().expect("tempdir");
    let publisher = format!(
        "kind = \"kafka\"\nbrokers = \"127.0.0.1:{port}\"\n\
         check_timeout = \"2s\"\nproperties = {{ \"security.protocol\" = \"SSL\" }}"
    );
    broker_check_fails(dir.path(), &publisher).await;
}

/// `check` with `publisher` (TOML of the `[publisher]` section) and a SQLite store in `dir`
/// exits 1 with the broker failed.
async fn broker_check_fails(dir: &std::path::Path, publisher: &str) {
    let (code, out) = run(&config(dir, &sqlite_url(dir), "outbox", publisher), "check").await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("broker      FAILED"), "{out}");
}
