//! Credentials in the URL reach a server that requires them, and only through the connect
//! options: a private `nats-server` with a user and password accepts the publisher, refuses a
//! wrong password, and the publisher's errors never show the password.

use std::process::Stdio;
use std::time::Duration;

use outbox_core::Publisher;
use outbox_nats::{NatsConfig, NatsPublisher};
use outbox_testkit::env::or_skip;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct PrivateServer {
    child: tokio::process::Child,
    port: u16,
}

impl PrivateServer {
    async fn start(user: &str, password: &str) -> Option<Self> {
        let port = free_port();
        let child = tokio::process::Command::new(
            std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".into()),
        )
        .args([
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--user",
            user,
            "--pass",
            password,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
        let child = or_skip("nats-server binary", child)?;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(Self { child, port });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the private nats-server did not listen on {port}");
    }
}

#[tokio::test]
async fn url_credentials_authenticate_and_stay_out_of_errors() {
    let Some(mut server) = PrivateServer::start("relay", "N4ts-pa%ss").await else {
        return;
    };
    // `%` must be escaped in a URL: the publisher decodes it before authenticating.
    let good = format!("nats://relay:N4ts-pa%25ss@127.0.0.1:{}", server.port);
    let publisher =
        NatsPublisher::connect(NatsConfig::new(good).connect_timeout(Duration::from_secs(5)))
            .await
            .expect("the right credentials are accepted");
    // No JetStream on this server, but the connection is up and authenticated.
    let check = publisher.check().await;
    assert!(
        check
            .as_ref()
            .err()
            .is_none_or(|e| !e.to_string().contains("N4ts")),
        "{check:?}"
    );

    let bad = format!("nats://relay:wrong-S3cret@127.0.0.1:{}", server.port);
    let refused =
        NatsPublisher::connect(NatsConfig::new(bad).connect_timeout(Duration::from_secs(2))).await;
    let err = refused.expect_err("a wrong password is refused");
    let text = format!("{err} {err:?}");
    assert!(
        !text.contains("wrong-S3cret"),
        "the password stays hidden: {text}"
    );
    let _ = server.child.kill().await;
}
