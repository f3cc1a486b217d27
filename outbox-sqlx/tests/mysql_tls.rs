//! MySqlStore over TLS: a private MariaDB server started by the test, with a certificate made
//! by the test, that refuses connections without TLS (`require_secure_transport`). A store
//! with `ssl-mode=VERIFY_IDENTITY` and the test's authority migrates, enqueues, claims and
//! settles; without TLS, or trusting another authority, it cannot connect and says why.
//!
//! Needs `mariadbd` and `mariadb-install-db` (`MARIADBD_BIN`, `MARIADB_INSTALL_DB_BIN`, else
//! `/usr/sbin/mariadbd` and `PATH`); skipped without them unless `OUTBOX_TEST_REQUIRE=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_core::{MessageId, NewMessage, RelayId, Settlement, Store, StoreErrorKind};
use outbox_sqlx::{MySqlStore, StoreConfig};
use outbox_testkit::env::{free_port, or_skip, unique_name};
use outbox_testkit::tls::Certificates;

/// A private `mariadbd` on a free loopback port, its data in a directory of its own; killed
/// and removed when dropped, also when the test fails.
struct PrivateMariaDb {
    child: Child,
    port: u16,
    certs: Certificates,
    _dir: tempfile::TempDir,
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn program(var: &str, candidates: &[&str]) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{var}={} is not a file", path.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    candidates
        .iter()
        .flat_map(|name| {
            let name = Path::new(name);
            if name.is_absolute() {
                vec![name.to_owned()]
            } else {
                std::env::split_paths(&path)
                    .map(|dir| dir.join(name))
                    .collect()
            }
        })
        .find(|p| p.is_file())
        .ok_or_else(|| format!("none of {candidates:?} found (set {var})"))
}

fn current_user() -> Result<String, String> {
    let out = Command::new("id")
        .arg("-un")
        .output()
        .map_err(|e| format!("id -un: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl PrivateMariaDb {
    async fn start() -> Result<Self, String> {
        let mariadbd = program("MARIADBD_BIN", &["mariadbd", "/usr/sbin/mariadbd"])?;
        let install = program(
            "MARIADB_INSTALL_DB_BIN",
            &["mariadb-install-db", "/usr/bin/mariadb-install-db"],
        )?;
        let user = current_user()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let certs = Certificates::generate(&dir.path().join("certs"))?;
        let data = dir.path().join("data");
        let out = Command::new(&install)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--user={user}"))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .output()
            .map_err(|e| format!("{}: {e}", install.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{}: {}{}",
                install.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let init = dir.path().join("init.sql");
        std::fs::write(&init, "CREATE DATABASE IF NOT EXISTS outbox;\n")
            .map_err(|e| e.to_string())?;
        let log = dir.path().join("error.log");
        // A port found free can be taken before the server binds it: try another.
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port().map_err(|e| e.to_string())?;
            let mut child = Command::new(&mariadbd)
                .arg("--no-defaults")
                .arg(format!("--user={user}"))
                .arg(format!("--datadir={}", data.display()))
                .arg(format!(
                    "--socket={}",
                    dir.path().join("mysqld.sock").display()
                ))
                .arg(format!(
                    "--pid-file={}",
                    dir.path().join("mysqld.pid").display()
                ))
                .arg(format!("--log-error={}", log.display()))
                .arg(format!("--init-file={}", init.display()))
                .arg(format!("--port={port}"))
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--ssl-ca={}", certs.ca.display()))
                .arg(format!("--ssl-cert={}", certs.cert.display()))
                .arg(format!("--ssl-key={}", certs.key.display()))
                .args([
                    "--require-secure-transport=ON",
                    "--skip-log-bin",
                    "--innodb-buffer-pool-size=32M",
                    "--innodb-flush-log-at-trx-commit=0",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{}: {e}", mariadbd.display()))?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!(
                        "mariadbd exited ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                let ready = std::fs::read_to_string(&log)
                    .is_ok_and(|l| l.contains("ready for connections"));
                if ready
                    && tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok()
                {
                    return Ok(Self {
                        child,
                        port,
                        certs,
                        _dir: dir,
                    });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "mariadbd not ready within 60 s: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Err(last)
    }

    fn url(&self, query: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/outbox?{query}", self.port)
    }
}

/// An error with its sources, as the relay program prints it.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

async fn connect(url: String, table: &str) -> Result<MySqlStore, outbox_core::StoreError> {
    MySqlStore::connect(StoreConfig::new().url(url).table(table).max_connections(2)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_store_works_over_verified_tls_and_refuses_plaintext_and_strangers() {
    let started = Instant::now();
    let Some(server) = or_skip(
        "a private MariaDB server (mariadbd, mariadb-install-db)",
        PrivateMariaDb::start().await,
    ) else {
        return;
    };
    eprintln!("private MariaDB up in {:?}", started.elapsed());
    let table = unique_name("outbox_tls");
    let ca = server.certs.ca.display().to_string();

    // Verified TLS: the whole life of a message.
    let store = connect(
        server.url(&format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}")),
        &table,
    )
    .await
    .expect("a store trusting the server's authority connects");
    let (_, cipher): (String, String) = sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .fetch_one(store.pool())
        .await
        .expect("status");
    assert!(!cipher.is_empty(), "the session is encrypted");
    store.migrate().await.expect("migrate over TLS");
    let mut tx = store.pool().begin().await.expect("begin");
    let ids: Vec<MessageId> = store
        .enqueue_batch(
            &mut *tx,
            (0..10)
                .map(|i| NewMessage::new("orders", format!("{i}")).key("order-1"))
                .collect(),
        )
        .await
        .expect("enqueue over TLS");
    tx.commit().await.expect("commit");
    let relay = RelayId::new("tls-relay");
    let all: Vec<u16> = (0..outbox_core::PARTITIONS).collect();
    store
        .acquire(&relay, &all, Duration::from_secs(60))
        .await
        .expect("acquire");
    let claim = store
        .claim(&relay, 100, Duration::from_secs(60))
        .await
        .expect("claim over TLS");
    let claimed: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
    assert_eq!(claimed, ids, "every message, in order");
    let settled = store
        .settle(
            claim.token,
            &Settlement {
                published: claimed,
                ..Settlement::default()
            },
        )
        .await
        .expect("settle over TLS");
    assert_eq!(settled.applied, 10);
    assert_eq!(store.stats().await.expect("stats").pending, 0);

    // Without TLS the server refuses the connection. MariaDB reports the refusal of
    // `require_secure_transport` as an access denial (1045) for the same user that was just let
    // in over TLS; MySQL 8 says "insecure transport" (3159).
    let plain = chain(
        &connect(server.url("ssl-mode=DISABLED"), &table)
            .await
            .expect_err("a connection without TLS is refused"),
    );
    eprintln!("without TLS: {plain}");
    assert!(
        plain.contains("Access denied") || plain.contains("insecure transport"),
        "{plain}"
    );

    // Trusting another authority, the client refuses the server's certificate.
    let other = server.certs.other_ca.display().to_string();
    for mode in ["VERIFY_IDENTITY", "VERIFY_CA"] {
        let err = connect(
            server.url(&format!("ssl-mode={mode}&ssl-ca={other}")),
            &table,
        )
        .await
        .expect_err("a store trusting another authority does not connect");
        let text = chain(&err);
        eprintln!("{mode} with another authority: {text}");
        assert_eq!(err.kind(), StoreErrorKind::Connection, "{text}");
        assert!(
            text.to_ascii_lowercase().contains("certificate"),
            "the error names the certificate: {text}"
        );
    }

    store.drop_tables().await.expect("drop tables");
    store.pool().close().await;
    eprintln!("whole test in {:?}", started.elapsed());
}
