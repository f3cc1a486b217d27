//! AmqpPublisher over TLS (`amqps://`, the `rustls` feature): a private RabbitMQ node started by
//! the test, listening for AMQP over TLS only, with a certificate made by the test. Trusting the
//! test's authority, the publisher publishes and every message is confirmed; trusting another
//! authority it cannot connect, says why, and reports nothing as published (the queue stays as
//! it was).
//!
//! The publisher trusts the platform's roots, which `SSL_CERT_FILE` replaces; a process cannot
//! change its own environment safely, so the clients run in a child process of this test binary
//! (this same test, with `OUTBOX_AMQP_TLS_ROLE` set).
//!
//! Needs `rabbitmq-server` and `rabbitmqctl` (`RABBITMQ_BIN_DIR`, else `/usr/lib/rabbitmq/bin`,
//! else `PATH`); skipped without them unless `OUTBOX_TEST_REQUIRE=1`. The node has a name, ports,
//! data, logs and Erlang cookie of its own, so it does not touch a node already running.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use outbox_amqp::{AmqpConfig, AmqpPublisher, Routing};
use outbox_core::{Message, NewMessage, PublishOutcome, Publisher};
use outbox_testkit::env::{free_port, or_skip, unique_name};
use outbox_testkit::tls::Certificates;

const TEST: &str = "amqps_publishes_to_a_trusted_server_and_nothing_to_another";
const ROLE: &str = "OUTBOX_AMQP_TLS_ROLE";
const URI: &str = "OUTBOX_AMQP_TLS_URI";
const QUEUE: &str = "OUTBOX_AMQP_TLS_QUEUE";
const MESSAGES: usize = 10;

/// A private RabbitMQ node; stopped, killed if need be, and removed when dropped, also when the
/// test fails.
struct PrivateRabbit {
    child: Child,
    bin: PathBuf,
    node: String,
    port: u16,
    plain_port: u16,
    dist_port: u16,
    certs: Certificates,
    dir: tempfile::TempDir,
}

fn bin_dir() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("RABBITMQ_BIN_DIR")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    // The scripts under /usr/lib/rabbitmq/bin run as the caller; the wrappers in /usr/sbin would
    // switch to the `rabbitmq` user, who cannot read the test's directory.
    candidates.push(PathBuf::from("/usr/lib/rabbitmq/bin"));
    candidates.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    candidates
        .into_iter()
        .find(|dir| dir.join("rabbitmq-server").is_file() && dir.join("rabbitmqctl").is_file())
        .ok_or_else(|| "rabbitmq-server and rabbitmqctl not found (set RABBITMQ_BIN_DIR)".into())
}

impl PrivateRabbit {
    async fn start() -> Result<Self, String> {
        let bin = bin_dir()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let certs = Certificates::generate(&dir.path().join("certs"))?;
        let node = format!("{}@localhost", unique_name("outbox_tls"));
        let port = free_port().map_err(|e| e.to_string())?;
        let dist_port = free_port().map_err(|e| e.to_string())?;
        let plain_port = free_port().map_err(|e| e.to_string())?;
        let root = dir.path().to_owned();
        let path = |name: &str| root.join(name);
        let config = path("rabbitmq.conf");
        std::fs::write(
            &config,
            format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                certs.ca.display(),
                certs.cert.display(),
                certs.key.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        for empty in ["plugins", "rabbitmq-env.conf"] {
            std::fs::write(path(empty), "").map_err(|e| e.to_string())?;
        }
        let mut server = Command::new(bin.join("rabbitmq-server"));
        Self::environment(&mut server, dir.path(), &node);
        let child = server
            .env("RABBITMQ_NODE_PORT", plain_port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_CONFIG_FILE", &config)
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("plugins"))
            .env("RABBITMQ_PID_FILE", path("rabbitmq.pid"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(path("stdout.log")).map_err(|e| e.to_string())?)
            .stderr(Stdio::null())
            // Its own process group, so that the guard can end the whole tree.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("rabbitmq-server: {e}"))?;
        let mut rabbit = Self {
            child,
            bin,
            node,
            port,
            plain_port,
            dist_port,
            certs,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(status)) = rabbit.child.try_wait() {
                return Err(format!(
                    "rabbitmq-server exited ({status}): {}",
                    std::fs::read_to_string(path("stdout.log")).unwrap_or_default()
                ));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                rabbit.ctl(&["await_startup", "--timeout", "60"])?;
                return Ok(rabbit);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "RabbitMQ not listening on {port} within 90 s: {}",
                    std::fs::read_to_string(path("stdout.log")).unwrap_or_default()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What the node and its command-line tools share: the node's name, an Erlang cookie of
    /// their own (in `$HOME`), and no machine-wide environment file.
    fn environment(command: &mut Command, dir: &Path, node: &str) {
        command
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", node)
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1");
    }

    /// Runs `rabbitmqctl` against the node; its output, or why it failed.
    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut command = Command::new(self.bin.join("rabbitmqctl"));
        Self::environment(&mut command, self.dir.path(), &self.node);
        // The tool listens for the node too; by default on the node's port + 10000, which may
        // not exist for a high port.
        let cli_port = free_port().map_err(|e| e.to_string())?.to_string();
        let out = command
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CTL_DIST_PORT_MIN", &cli_port)
            .env("RABBITMQ_CTL_DIST_PORT_MAX", &cli_port)
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("rabbitmqctl: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "rabbitmqctl {args:?}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Messages in `queue`, as the node counts them.
    fn messages(&self, queue: &str) -> usize {
        let out = self
            .ctl(&[
                "list_queues",
                "name",
                "messages",
                "--quiet",
                "--no-table-headers",
            ])
            .expect("list_queues");
        out.lines()
            .filter_map(|line| line.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .and_then(|(_, count)| count.trim().parse().ok())
            .unwrap_or_else(|| panic!("queue {queue} not listed: {out}"))
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever is left of the process group (the Erlang VM and its helpers).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
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

/// Runs this test again in a child process as `role`, trusting only `ca`; its output.
async fn as_child(role: &str, ca: &Path, uri: &str, queue: &str) -> String {
    let out = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(URI, uri)
        .env(QUEUE, queue)
        .env("SSL_CERT_FILE", ca)
        .env_remove("SSL_CERT_DIR")
        .kill_on_drop(true)
        .output()
        .await
        .expect("the test binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{role} client failed:\n{text}");
    text
}

fn batch(queue: &str) -> Vec<Message> {
    (0..MESSAGES)
        .map(|i| {
            Message::new(
                NewMessage::new(queue, format!("{i}")).key("order-1"),
                outbox_core::chrono::Utc::now(),
            )
        })
        .collect()
}

fn config(uri: &str) -> AmqpConfig {
    AmqpConfig::new(uri)
        .routing(Routing::Queue)
        .connect_timeout(Duration::from_secs(10))
        .confirm_timeout(Duration::from_secs(10))
}

/// Trusting the server's authority: the publisher's messages are all confirmed and are in the
/// queue, with their ids, in order.
async fn trusted(uri: &str, queue: &str) {
    let connection = Connection::connect(uri, ConnectionProperties::default())
        .await
        .expect("a client trusting the test's authority connects");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the queue");
    let publisher = AmqpPublisher::connect(config(uri))
        .await
        .expect("the publisher connects over TLS");
    publisher.check().await.expect("check over TLS");
    let messages = batch(queue);
    let outcomes = publisher.publish(&messages).await.expect("publish");
    assert_eq!(outcomes.len(), MESSAGES);
    for outcome in &outcomes {
        assert!(outcome.is_published(), "confirmed: {outcome:?}");
    }
    for message in &messages {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("get")
            .expect("a message in the queue");
        let id = got.delivery.properties.message_id().clone().expect("an id");
        assert_eq!(id.as_str(), message.id.to_string(), "in order, with its id");
    }
    // Not acknowledged: back in the queue when the connection closes, for the parent to count.
    publisher.close().await;
    connection.close(200, "done".into()).await.expect("close");
    println!("trusted: {MESSAGES} messages confirmed over TLS");
}

/// Trusting another authority: no connection, an error that says why, nothing published.
async fn stranger(uri: &str, queue: &str) {
    let err = AmqpPublisher::connect(config(uri))
        .await
        .expect_err("a publisher trusting another authority does not connect");
    let text = chain(&err);
    println!("stranger: connect: {text}");
    assert!(
        text.contains("certificate"),
        "the error names the certificate: {text}"
    );
    let publisher = AmqpPublisher::new(config(uri))
        .await
        .expect("valid configuration");
    let check = publisher.check().await.expect_err("check fails");
    let text = chain(&check);
    println!("stranger: check: {text}");
    assert!(
        check.is_transient() && text.contains("certificate"),
        "{text}"
    );
    match publisher.publish(&batch(queue)).await {
        Ok(outcomes) => {
            assert_eq!(outcomes.len(), MESSAGES);
            for outcome in &outcomes {
                match outcome {
                    PublishOutcome::Failed(err) => {
                        assert!(err.is_transient(), "retried later, never dead: {err}");
                    }
                    other => panic!("reported as published: {other:?}"),
                }
            }
            println!("stranger: publish: every message failed");
        }
        Err(err) => {
            let text = chain(&err);
            println!("stranger: publish: {text}");
            assert!(err.is_transient() && text.contains("certificate"), "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_publishes_to_a_trusted_server_and_nothing_to_another() {
    if let Ok(role) = std::env::var(ROLE) {
        let uri = std::env::var(URI).expect("uri");
        let queue = std::env::var(QUEUE).expect("queue");
        match role.as_str() {
            "trusted" => trusted(&uri, &queue).await,
            "stranger" => stranger(&uri, &queue).await,
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let started = Instant::now();
    let Some(rabbit) = or_skip(
        "a private RabbitMQ node (rabbitmq-server, rabbitmqctl)",
        PrivateRabbit::start().await,
    ) else {
        return;
    };
    eprintln!("private RabbitMQ up in {:?}", started.elapsed());
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", rabbit.plain_port))
            .await
            .is_err(),
        "no AMQP listener without TLS"
    );
    let uri = format!("amqps://guest:guest@127.0.0.1:{}/%2f", rabbit.port);
    let queue = unique_name("outbox_tls");

    let out = as_child("trusted", &rabbit.certs.ca, &uri, &queue).await;
    eprint!("{out}");
    assert_eq!(rabbit.messages(&queue), MESSAGES, "the confirmed messages");

    let out = as_child("stranger", &rabbit.certs.other_ca, &uri, &queue).await;
    eprint!("{out}");
    assert_eq!(rabbit.messages(&queue), MESSAGES, "nothing more arrived");
    eprintln!("whole test in {:?}", started.elapsed());
}
