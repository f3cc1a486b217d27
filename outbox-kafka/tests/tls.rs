//! KafkaPublisher over TLS (`security.protocol=ssl`, the `ssl` feature). tansu 0.6 serves
//! plaintext only (its `--cert` and `--key` options cannot be given together, and its broker
//! never uses the TLS acceptor it builds), so a private tansu broker stands behind a TLS
//! terminator of the test (rustls, with a certificate made by the test) and advertises the
//! terminator's address: every connection of every client, after bootstrap too, is TLS up to
//! the terminator and plaintext on loopback behind it. What this checks is the client side:
//! librdkafka's TLS with `ssl.ca.location`, the certificate verified, acknowledgements received
//! through TLS. Trusting another authority, the publisher reaches nothing, reports nothing as
//! published, and the reason (the certificate) is logged.
//!
//! Needs tansu (`TANSU_BIN`, else `PATH`, else `~/.cargo/bin/tansu`); skipped without it unless
//! `OUTBOX_TEST_REQUIRE=1`.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::{MESSAGE_ID_HEADER, Message, MessageId, NewMessage, PublishOutcome, Publisher};
use outbox_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use outbox_kafka::rdkafka::client::DefaultClientContext;
use outbox_kafka::rdkafka::config::ClientConfig;
use outbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox_kafka::rdkafka::message::{Headers as _, Message as _};
use outbox_kafka::rdkafka::{Offset, TopicPartitionList};
use outbox_kafka::{KafkaConfig, KafkaPublisher};
use outbox_testkit::env::{free_port, or_skip, unique_name};
use outbox_testkit::tls::{Certificates, TlsTerminator};
use tokio::process::Child;

const MESSAGES: usize = 10;
const PARTITIONS: i32 = 3;

/// Log lines, kept to check what the client said (not echoed: a refused client logs every
/// attempt).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// A private tansu behind a TLS terminator; killed when dropped, also when the test fails.
struct TlsBroker {
    _child: Child,
    terminator: TlsTerminator,
    certs: Certificates,
    _dir: tempfile::TempDir,
}

impl TlsBroker {
    async fn start() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let certs = Certificates::generate(dir.path())?;
        let broker: SocketAddr = format!("127.0.0.1:{}", free_port().map_err(|e| e.to_string())?)
            .parse()
            .map_err(|e| format!("{e}"))?;
        let terminator = TlsTerminator::start(broker, &certs)
            .await
            .map_err(|e| e.to_string())?;
        let child = outbox_testkit::tansu::start(broker, terminator.addr()).await?;
        Ok(Self {
            _child: child,
            terminator,
            certs,
            _dir: dir,
        })
    }

    /// Client properties for TLS through the terminator, trusting `ca`.
    fn client(&self, ca: &std::path::Path) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.terminator.addr().to_string())
            .set("security.protocol", "ssl")
            .set("ssl.ca.location", ca.display().to_string());
        config
    }

    async fn publisher(&self, ca: &std::path::Path) -> KafkaPublisher {
        KafkaPublisher::new(
            KafkaConfig::new(self.terminator.addr().to_string())
                .property("security.protocol", "ssl")
                .property("ssl.ca.location", ca.display().to_string())
                .property("message.timeout.ms", "5000")
                .check_timeout(Duration::from_secs(3)),
        )
        .await
        .expect("a valid configuration")
    }
}

fn batch(topic: &str) -> Vec<Message> {
    (0..MESSAGES)
        .map(|i| {
            Message::new(
                NewMessage::new(topic, format!("{i}")).key("order-1"),
                outbox_core::chrono::Utc::now(),
            )
        })
        .collect()
}

/// Reads up to `count` message ids of `topic` from the beginning, over TLS, for at most `wait`.
fn read_ids(broker: &TlsBroker, topic: &str, count: usize, wait: Duration) -> Vec<MessageId> {
    let consumer: BaseConsumer = broker
        .client(&broker.certs.ca)
        .set("group.id", unique_name("outbox_kafka_tls_reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("assignment");
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + wait;
    let mut ids = Vec::new();
    while ids.len() < count && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                let id = message
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == MESSAGE_ID_HEADER)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).parse::<MessageId>())
                    })
                    .expect("an id header")
                    .expect("a message id");
                ids.push(id);
            }
            Some(Err(err)) => eprintln!("consumer error (retrying): {err}"),
            None => {}
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_publishes_over_tls_to_a_trusted_broker_and_nothing_to_another() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("outbox_kafka=warn,librdkafka=warn")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init();
    let started = Instant::now();
    let Some(broker) = or_skip("tansu behind a TLS terminator", TlsBroker::start().await) else {
        return;
    };
    let topic = unique_name("outbox_kafka_tls");
    let admin: AdminClient<DefaultClientContext> = broker
        .client(&broker.certs.ca)
        .create()
        .expect("admin client");
    let created = admin
        .create_topics(
            [&NewTopic::new(
                &topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics over TLS");
    for result in created {
        result.unwrap_or_else(|(topic, code)| panic!("creating topic {topic}: {code:?}"));
    }

    // Trusted: acknowledged over TLS, and there with its ids, in order.
    let publisher = broker.publisher(&broker.certs.ca).await;
    publisher.check().await.expect("check over TLS");
    let messages = batch(&topic);
    let outcomes = publisher.publish(&messages).await.expect("publish");
    for outcome in &outcomes {
        assert!(outcome.is_published(), "acknowledged: {outcome:?}");
    }
    publisher.flush().await.expect("flush");
    let expected: Vec<MessageId> = messages.iter().map(|m| m.id).collect();
    let ids = tokio::task::block_in_place(|| {
        read_ids(&broker, &topic, MESSAGES, Duration::from_secs(20))
    });
    assert_eq!(ids, expected, "every message, in order, with its id");
    assert!(broker.terminator.handshakes() > 0);

    // Another authority: no handshake completes, nothing is reported as published, nothing
    // arrives, and the log says why.
    let stranger = broker.publisher(&broker.certs.other_ca).await;
    let check = stranger.check().await.expect_err("check fails");
    eprintln!("stranger: check: {check}");
    match stranger.publish(&batch(&topic)).await {
        Ok(outcomes) => {
            assert_eq!(outcomes.len(), MESSAGES);
            for outcome in &outcomes {
                match outcome {
                    PublishOutcome::Failed(err) => {
                        eprintln!("stranger: publish: {err}");
                        assert!(err.is_transient(), "retried later, never dead: {err}");
                    }
                    other => panic!("reported as published: {other:?}"),
                }
            }
        }
        Err(err) => eprintln!("stranger: publish: {err}"),
    }
    drop(stranger);
    // Everything in the topic, read again from the beginning.
    let all = tokio::task::block_in_place(|| {
        read_ids(&broker, &topic, MESSAGES + 1, Duration::from_secs(5))
    });
    assert_eq!(all, expected, "nothing more arrived");
    let logged = logs.text();
    assert!(
        logged.contains("certificate verify failed"),
        "the client log names the certificate: {}",
        logged
            .get(logged.len().saturating_sub(4000)..)
            .unwrap_or(&logged)
    );
    eprintln!("whole test in {:?}", started.elapsed());
}
