//! The `outbox-relay` binary with a `[cdc]` section, against a PostgreSQL cluster of its own
//! (`wal_level = logical`): `migrate` creates the slot and publication, `check` and `status`
//! report them, `run` relays every message from the log, in per-key order, and empties the
//! table; `/metrics` exports the slot's lag.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use outbox_core::{MessageId, NewMessage};
use outbox_sqlx::{PostgresStore, StoreConfig};
use outbox_testkit::env::{or_skip, unique_name};
use outbox_testkit::servers::{PrivatePostgres, ServerError};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn write_config(
    dir: &Path,
    url: &str,
    table: &str,
    cdc: &str,
    http_port: u16,
) -> std::path::PathBuf {
    let path = dir.join("relay.toml");
    let text = format!(
        r#"
[store]
url = "{url}"
table = "{table}"

[publisher]
kind = "stdout"

[relay]
batch_size = 100
poll_max = "100ms"
shutdown_timeout = "3s"
stats_interval = "200ms"

[cdc]
{cdc}

[http]
listen = "127.0.0.1:{http_port}"
"#
    );
    std::fs::write(&path, text).expect("write config");
    path
}

async fn run_to_end(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .env("OUTBOX_HTTP__LISTEN", format!("127.0.0.1:{}", free_port()))
        .output()
        .await
        .expect("the binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_cdc_section_needs_a_postgres_store_and_names_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("x.db").display());
    let config = write_config(dir.path(), &url, "outbox", "slot = \"s\"", free_port());
    let (code, _, stderr) = run_to_end(&config, &["check"]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("cdc:") && stderr.contains("postgres://"),
        "{stderr}"
    );
    let config = write_config(
        dir.path(),
        "postgres://postgres@127.0.0.1:5432/test",
        "outbox",
        "slot = \"Not-A-Slot\"",
        free_port(),
    );
    let (code, _, stderr) = run_to_end(&config, &["check"]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("slot"), "{stderr}");
    let config = write_config(
        dir.path(),
        "postgres://postgres@127.0.0.1:5432/test",
        "outbox",
        "table = \"other\"",
        free_port(),
    );
    let (code, _, stderr) = run_to_end(&config, &["check"]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cdc.table"), "{stderr}");
}

#[tokio::test]
async fn the_relay_reads_the_log_in_order_and_reports_the_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = match PrivatePostgres::start_with(
        dir.path(),
        &[
            ("wal_level", "logical"),
            ("max_replication_slots", "4"),
            ("max_wal_senders", "4"),
        ],
    )
    .await
    {
        Ok(server) => server,
        Err(ServerError::Unavailable(why)) => {
            let _: Option<()> = or_skip("a private PostgreSQL cluster", Err(why));
            return;
        }
        Err(err) => panic!("the private cluster does not start: {err}"),
    };
    let table = unique_name("outbox");
    let slot = unique_name("slot");
    let http_port = free_port();
    let config = write_config(
        dir.path(),
        &server.url(),
        &table,
        &format!("slot = \"{slot}\"\npublication = \"{slot}\"\nstatus_interval = \"200ms\""),
        http_port,
    );
    let (code, stdout, stderr) = run_to_end(&config, &["migrate"]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("log source ready"), "{stdout}");
    let (code, stdout, stderr) = run_to_end(&config, &["check"]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("log source  ok"), "{stdout}");

    let store = PostgresStore::connect(StoreConfig::new().url(server.url()).table(&table))
        .await
        .expect("store");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut expected: HashMap<String, Vec<MessageId>> = HashMap::new();
    for round in 0..20 {
        let messages: Vec<NewMessage> = (0..10)
            .map(|i| NewMessage::new("orders", format!("{round}-{i}")).key(format!("k{}", i % 4)))
            .collect();
        for msg in &messages {
            expected
                .entry(msg.ordering_key().unwrap_or_default().to_owned())
                .or_default()
                .push(msg.id());
        }
        let mut tx = store.pool().begin().await.expect("begin");
        store
            .enqueue_batch(&mut *tx, messages)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
    }
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut got: HashMap<String, Vec<MessageId>> = HashMap::new();
    let mut count = 0;
    while count < 200 {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("a message within 30 s")
            .expect("read")
            .expect("the relay prints until stopped");
        let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        let id: MessageId = value["id"].as_str().expect("id").parse().expect("an id");
        let key = value["key"].as_str().unwrap_or_default().to_owned();
        got.entry(key).or_default().push(id);
        count += 1;
    }
    assert_eq!(
        got, expected,
        "every message once, each key in commit order"
    );

    // The table empties; the slot follows the confirmations; /metrics has the lag.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, stdout, stderr) = run_to_end(&config, &["status", "--json"]).await;
        assert_eq!(code, Some(0), "{stderr}");
        let status: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
        assert_eq!(status["cdc"]["slot"], slot.as_str(), "{status}");
        if status["pending"] == 0 && status["cdc"]["active"] == true {
            assert!(status["cdc"]["lag_bytes"].is_u64(), "{status}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the table empties: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, stdout, _) = run_to_end(&config, &["status"]).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains(&format!("slot        {slot}")), "{stdout}");
    let metrics = reqwest::get(format!("http://127.0.0.1:{http_port}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(metrics.contains("outbox_cdc_slot_lag_bytes"), "{metrics}");
    assert!(metrics.contains("outbox_published_total 200"), "{metrics}");
    let ready = reqwest::get(format!("http://127.0.0.1:{http_port}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);

    let pid = child.id().expect("running").to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill")
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the relay stops within its shutdown bound")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    store.drop_tables().await.expect("drop the outbox");
    server.stop().await;
}
