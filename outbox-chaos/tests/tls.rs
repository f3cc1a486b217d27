//! TLS to the broker: a certificate authority and a server certificate made by the test
//! (`outbox_testkit::tls`), a private `nats-server` that requires TLS, and the relay program
//! connecting with `tls://` (outbox-nats's `rustls` feature), trusting the test's authority
//! through `SSL_CERT_FILE`. A relay that does not trust the server's certificate publishes
//! nothing and loses nothing.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use outbox_chaos::broker::{self, NatsServer};
use outbox_core::{MessageId, NewMessage, Store};
use outbox_nats::async_nats;
use outbox_sqlx::{SqliteStore, StoreConfig};
use outbox_testkit::env::{or_skip, unique_name};
use outbox_testkit::tls::Certificates;
use tokio::process::Command;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_chaos-relay");

async fn tls_client(addr: std::net::SocketAddr, ca: &Path) -> async_nats::jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.to_owned())
        .require_tls(true)
        .connect(format!("tls://{addr}"))
        .await
        .expect("a TLS client trusting the test CA connects");
    async_nats::jetstream::new(client)
}

async fn relay_output(config: &Path, ca: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .env("SSL_CERT_FILE", ca)
        .output()
        .await
        .expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_over_tls_to_a_server_it_trusts_and_never_to_one_it_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certificates::generate(dir.path()).expect("certificates");
    let (ca, stranger) = (certs.ca.clone(), certs.other_ca.clone());
    let tls = [
        "--tls".to_owned(),
        "--tlscert".to_owned(),
        certs.cert.display().to_string(),
        "--tlskey".to_owned(),
        certs.key.display().to_string(),
    ];
    let Some(server) = or_skip("nats-server", NatsServer::start(dir.path(), &tls).await) else {
        return;
    };
    let prefix = unique_name("tls");
    let stream = prefix.to_ascii_uppercase();
    let js = tls_client(server.addr(), &ca).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.>")],
        ..Default::default()
    })
    .await
    .expect("stream");

    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("outbox.db").display()
    );
    let store = SqliteStore::connect(StoreConfig::new().url(url.clone()))
        .await
        .expect("sqlite");
    store.migrate().await.expect("migrate");
    let mut tx = store
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("begin");
    let ids: Vec<MessageId> = store
        .enqueue_batch(
            &mut *tx,
            (0..20)
                .map(|i| NewMessage::new("events", format!("{i}")).key("k"))
                .collect(),
        )
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{url}\"\n[publisher]\nkind = \"nats\"\nurl = \"tls://{}\"\n\
             subject_prefix = \"{prefix}\"\nconnect_timeout = \"2s\"\nack_timeout = \"2s\"\n\
             [relay]\npublish_timeout = \"3s\"\n[http]\nlisten = \"127.0.0.1:{}\"\n",
            server.addr(),
            broker::free_port()
        ),
    )
    .expect("config");

    // Not trusted: the check says so, and a running relay publishes nothing and loses nothing.
    let (code, stdout, stderr) = relay_output(&config, &stranger, &["check"]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("broker      FAILED"), "{stdout}");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env_remove("RUST_LOG")
        .env("SSL_CERT_FILE", &stranger)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (stats.pending, stats.dead),
        (20, 0),
        "nothing lost, nothing dead"
    );
    assert_eq!(
        broker::terminate(&mut child, Duration::from_secs(15))
            .await
            .and_then(|s| s.code()),
        Some(0)
    );

    // Trusted: everything arrives, over TLS.
    let (code, stdout, stderr) = relay_output(&config, &ca, &["check"]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env_remove("RUST_LOG")
        .env("SSL_CERT_FILE", &ca)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.stats().await.expect("stats").pending > 0 {
        assert!(Instant::now() < deadline, "the relay drains over TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        broker::terminate(&mut child, Duration::from_secs(15))
            .await
            .and_then(|s| s.code()),
        Some(0)
    );
    let mut stream = js.get_stream(&stream).await.expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 20);
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut got = Vec::new();
    while got.len() < 20 {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("a message")
            .expect("some")
            .expect("ok");
        let id: MessageId = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .and_then(|v| v.as_str().parse().ok())
            .expect("id");
        got.push(id);
    }
    assert_eq!(got, ids, "every message, in order");

    // A `nats://` URL to a server that requires TLS is upgraded to TLS by the client: the
    // certificate is still checked.
    let plain = dir.path().join("plain.toml");
    std::fs::write(
        &plain,
        std::fs::read_to_string(&config)
            .expect("config")
            .replace("tls://", "nats://"),
    )
    .expect("config");
    let (code, stdout, _) = relay_output(&plain, &stranger, &["check"]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("broker      FAILED"), "{stdout}");
    server.stop().await;
}
