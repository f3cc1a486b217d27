//! TLS to the database: a private PostgreSQL server that accepts TCP connections over TLS only,
//! with a certificate made by the test (`outbox_testkit::tls`), and the relay program connecting
//! with `sslmode=verify-full` and the test's authority (`sslrootcert`). Without TLS, or trusting
//! another authority, the relay cannot connect and says so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use outbox_chaos::broker;
use outbox_core::{MessageId, NewMessage};
use outbox_sqlx::{PostgresStore, StoreConfig};
use outbox_testkit::env::or_skip;
use outbox_testkit::tls::Certificates;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_chaos-relay");

/// The PostgreSQL binaries of the machine (`pg_ctl` and `initdb`).
fn pg_bin() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    std::fs::read_dir(root)
        .map_err(|e| format!("{}: {e}", root.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .find(|bin| bin.join("initdb").is_file())
        .ok_or_else(|| "no initdb under /usr/lib/postgresql".to_owned())
}

/// A private server in `dir`, run by the `postgres` user, TLS only over TCP.
struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    async fn start(dir: &Path) -> Result<(Self, Certificates), String> {
        let bin = pg_bin()?;
        let run = |program: &Path, args: Vec<String>| {
            let program = program.to_owned();
            async move {
                let out = Command::new("runuser")
                    .arg("-u")
                    .arg("postgres")
                    .arg("--")
                    .arg(&program)
                    .args(&args)
                    .output()
                    .await
                    .map_err(|e| format!("{}: {e}", program.display()))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{} {args:?}: {}",
                        program.display(),
                        String::from_utf8_lossy(&out.stderr)
                    ))
                }
            }
        };
        let chown = |path: &Path| {
            std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(path)
                .status()
                .map_err(|e| e.to_string())
        };
        std::process::Command::new("chmod")
            .arg("755")
            .arg(dir)
            .status()
            .map_err(|e| e.to_string())?;
        let data = dir.join("data");
        std::fs::create_dir(&data).map_err(|e| e.to_string())?;
        chown(&data)?;
        run(
            &bin.join("initdb"),
            vec![
                "-D".into(),
                data.display().to_string(),
                "-A".into(),
                "trust".into(),
                "-U".into(),
                "postgres".into(),
                "--no-sync".into(),
            ],
        )
        .await?;
        // Into the data directory, so that the `chown` below gives the key to the server's user.
        let certs = Certificates::generate(&data)?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .map_err(|e| e.to_string())?;
        chown(&data)?;
        std::process::Command::new("chmod")
            .arg("600")
            .arg(&certs.key)
            .status()
            .map_err(|e| e.to_string())?;
        let port = broker::free_port();
        run(
            &bin.join("pg_ctl"),
            vec![
                "-D".into(),
                data.display().to_string(),
                "-l".into(),
                data.join("server.log").display().to_string(),
                "-w".into(),
                "-o".into(),
                format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c ssl=on \
                     -c ssl_cert_file={} -c ssl_key_file={} -c fsync=off",
                    data.display(),
                    certs.cert.display(),
                    certs.key.display()
                ),
                "start".into(),
            ],
        )
        .await?;
        Ok((Self { bin, data, port }, certs))
    }

    async fn stop(self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output()
            .await;
    }
}

async fn relay(config: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("runs");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn config(dir: &Path, name: &str, url: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[store]\nurl = \"{url}\"\n[publisher]\nkind = \"stdout\"\n[http]\nlisten = \"127.0.0.1:{}\"\n",
            broker::free_port()
        ),
    )
    .expect("config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_talks_to_postgres_over_verified_tls_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((server, certs)) = or_skip(
        "a private PostgreSQL server (initdb, runuser)",
        PrivatePostgres::start(dir.path()).await,
    ) else {
        return;
    };
    let (ca, stranger) = (&certs.ca, &certs.other_ca);
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", server.port);
    let tls = format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display());
    let verified = config(dir.path(), "tls.toml", &tls);

    let (code, out) = relay(&verified, &["migrate"]).await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = relay(&verified, &["check"]).await;
    assert_eq!(code, Some(0), "{out}");

    for (name, url) in [
        ("plain", format!("{base}?sslmode=disable")),
        (
            "stranger",
            format!(
                "{base}?sslmode=verify-full&sslrootcert={}",
                stranger.display()
            ),
        ),
    ] {
        let (code, out) = relay(
            &config(dir.path(), &format!("{name}.toml"), &url),
            &["check"],
        )
        .await;
        assert_eq!(code, Some(1), "{name}: {out}");
        assert!(out.contains("store       FAILED"), "{name}: {out}");
    }

    // Messages written over TLS, relayed over TLS.
    let store = PostgresStore::connect(StoreConfig::new().url(tls.clone()))
        .await
        .expect("a TLS connection from the tests");
    let mut tx = store.pool().begin().await.expect("begin");
    let ids: Vec<MessageId> = store
        .enqueue_batch(
            &mut *tx,
            (0..20)
                .map(|i| NewMessage::new("orders", format!("{i}")).key("k"))
                .collect(),
        )
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&verified)
        .arg("run")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while outbox_core::Store::stats(&store)
        .await
        .expect("stats")
        .pending
        > 0
    {
        assert!(tokio::time::Instant::now() < deadline, "drained over TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = broker::terminate(&mut child, Duration::from_secs(15)).await;
    let mut printed = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut printed).await;
    }
    let got: Vec<MessageId> = printed
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("id")?.as_str()?.parse().ok())
        .collect();
    assert_eq!(got, ids, "every message, in order");
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    store.pool().close().await;
    server.stop().await;
}
