//! Shared by the integration tests: the broker under test, topics created and deleted per test,
//! a consumer that reads a topic back, the publisher harness, and private brokers behind a
//! fault-injecting proxy.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use outbox_core::MessageId;
use outbox_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use outbox_kafka::rdkafka::client::DefaultClientContext;
use outbox_kafka::rdkafka::config::ClientConfig;
use outbox_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use outbox_kafka::rdkafka::message::{BorrowedMessage, Message as _};
use outbox_kafka::rdkafka::{Offset, TopicPartitionList};
use outbox_kafka::{KafkaConfig, KafkaPublisher};
use outbox_testkit::proxy::FaultProxy;
use outbox_testkit::{PublisherHarness, Received, env, tansu};
use tokio::process::Child;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The producer's `message.max.bytes` in the harness: librdkafka refuses larger messages.
pub const MAX_MESSAGE_BYTES: usize = 100_000;

/// Logs to the test output when `RUST_LOG` is set, e.g. `RUST_LOG=outbox_core=debug,librdkafka=info`.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Bootstrap address of the shared broker under test.
pub fn brokers() -> String {
    env::service_url("OUTBOX_TEST_KAFKA_BROKERS", "127.0.0.1:9092")
}

/// Creates and deletes topics.
pub struct Admin {
    client: AdminClient<DefaultClientContext>,
}

impl Admin {
    pub fn new(brokers: &str) -> Self {
        let client = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("socket.timeout.ms", "5000")
            .create()
            .expect("admin client");
        Self { client }
    }

    /// Connects to the cluster, for deciding whether to skip.
    pub async fn reachable(&self) -> Result<(), String> {
        let client = self.client.inner();
        let metadata =
            tokio::task::block_in_place(|| client.fetch_metadata(None, Duration::from_secs(5)));
        metadata.map(|_| ()).map_err(|err| err.to_string())
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = self
            .client
            .create_topics([&topic], &options)
            .await
            .expect("create topics");
        for result in results {
            result.unwrap_or_else(|(topic, code)| panic!("creating topic {topic}: {code:?}"));
        }
    }

    /// Deletes a topic; a failure is only reported, as the broker forgets everything anyway.
    pub async fn delete_topic(&self, name: &str) {
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        match self.client.delete_topics(&[name], &options).await {
            Ok(results) => {
                for result in results {
                    if let Err((topic, code)) = result {
                        eprintln!("deleting topic {topic}: {code:?}");
                    }
                }
            }
            Err(err) => eprintln!("deleting topic {name}: {err}"),
        }
    }
}

/// The shared broker's admin client, or `None` to skip when it is unreachable (a panic when
/// `OUTBOX_TEST_REQUIRE=1`).
pub async fn admin_or_skip() -> Option<Admin> {
    let admin = Admin::new(&brokers());
    env::or_skip("Kafka broker", admin.reachable().await)?;
    Some(admin)
}

/// The publisher configuration of the tests for `brokers`.
pub fn publisher_config(brokers: &str) -> KafkaConfig {
    KafkaConfig::new(brokers).property("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
}

/// Reads one topic from its beginning: every partition assigned at once, no consumer group
/// coordination (dropping a consumer in the middle of a group rebalance can block for good).
pub struct Reader {
    consumer: StreamConsumer,
    /// Next offset expected per partition, to report a consumer that skips or rewinds.
    next: std::sync::Mutex<BTreeMap<i32, i64>>,
}

impl Reader {
    pub fn new(brokers: &str, topic: &str) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", env::unique_name("outbox_kafka_reader"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .create()
            .expect("consumer");
        let metadata = tokio::task::block_in_place(|| {
            consumer.fetch_metadata(Some(topic), Duration::from_secs(10))
        })
        .expect("topic metadata");
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        assert!(!partitions.is_empty(), "topic {topic} has partitions");
        let mut assignment = TopicPartitionList::new();
        for partition in partitions {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .expect("assignment");
        }
        consumer.assign(&assignment).expect("assign");
        Self {
            consumer,
            next: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Reads until `count` messages came or `timeout` passed.
    pub async fn read(&self, count: usize, timeout: Duration) -> Vec<Received> {
        self.read_with_partitions(count, timeout)
            .await
            .into_iter()
            .map(|(_, received)| received)
            .collect()
    }

    /// As [`Reader::read`], with the partition of each message.
    pub async fn read_with_partitions(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Vec<(i32, Received)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < count {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_elapsed) => break,
                Ok(Ok(message)) => {
                    let (partition, offset) = (message.partition(), message.offset());
                    let mut next = self.next.lock().expect("offsets");
                    let expected = next.insert(partition, offset + 1).unwrap_or(0);
                    if offset != expected {
                        eprintln!(
                            "partition {partition}: read offset {offset}, expected {expected}"
                        );
                    }
                    got.push((partition, received(&message)));
                }
                Ok(Err(err)) => {
                    eprintln!("consumer error (retrying): {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        got
    }
}

/// A record as the suite expects it, through [`outbox_kafka::incoming`]: the suite's checks
/// of ids, keys, headers and payloads check the conversion too.
fn received(message: &BorrowedMessage<'_>) -> Received {
    // The publisher never sends a null value (a tombstone), even for an empty payload.
    assert!(message.payload().is_some(), "a value, not a tombstone");
    let incoming = outbox_kafka::incoming(message).expect("an outbox record");
    Received {
        id: incoming.id,
        key: incoming.key,
        payload: incoming.payload,
        headers: incoming.headers,
    }
}

/// The publisher harness: a topic of its own on the shared broker, 3 partitions.
pub struct KafkaHarness {
    publisher: KafkaPublisher,
    admin: Admin,
    topic: String,
    reader: Mutex<Reader>,
}

impl KafkaHarness {
    pub async fn new(admin: Admin) -> Self {
        Self::with(admin, |config| config).await
    }

    /// A harness whose publisher's configuration `configure` adjusts.
    pub async fn with(admin: Admin, configure: impl FnOnce(KafkaConfig) -> KafkaConfig) -> Self {
        let brokers = brokers();
        let topic = env::unique_name("outbox_kafka");
        admin.create_topic(&topic, 3).await;
        let publisher = KafkaPublisher::new(configure(publisher_config(&brokers)))
            .await
            .expect("publisher");
        let reader = Mutex::new(Reader::new(&brokers, &topic));
        Self {
            publisher,
            admin,
            topic,
            reader,
        }
    }
}

impl KafkaHarness {
    /// The harness's consumer, for reads beyond [`PublisherHarness::read`].
    pub async fn reader(&self) -> tokio::sync::MutexGuard<'_, Reader> {
        self.reader.lock().await
    }
}

/// A fresh harness, or `None` to skip.
pub async fn harness() -> Option<KafkaHarness> {
    let admin = admin_or_skip().await?;
    Some(KafkaHarness::new(admin).await)
}

impl PublisherHarness for KafkaHarness {
    type Publisher = KafkaPublisher;

    fn publisher(&self) -> KafkaPublisher {
        self.publisher.clone()
    }

    fn destination(&self) -> String {
        self.topic.clone()
    }

    fn invalid_destination(&self) -> Option<String> {
        // No topic auto-creation: a topic nobody created is refused for good.
        Some(env::unique_name("outbox_kafka_missing"))
    }

    fn max_payload(&self) -> Option<usize> {
        // Leaves room for the key, headers and record overhead.
        Some(MAX_MESSAGE_BYTES - 1_000)
    }

    async fn read(&self, count: usize, timeout: Duration) -> Vec<Received> {
        self.reader.lock().await.read(count, timeout).await
    }

    async fn teardown(self) {
        drop(self.reader);
        self.admin.delete_topic(&self.topic).await;
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A tansu broker of one test, in memory, reachable only through a [`FaultProxy`]: it
/// advertises the proxy's address, so that every connection of every client, after bootstrap
/// too, goes through the proxy.
pub struct PrivateBroker {
    child: Child,
    pub proxy: std::sync::Arc<FaultProxy>,
    broker: SocketAddr,
}

impl PrivateBroker {
    /// Starts one, or returns `None` to skip when tansu is not installed (a panic when
    /// `OUTBOX_TEST_REQUIRE=1`).
    pub async fn start() -> Option<Self> {
        init_tracing();
        env::or_skip("tansu", tansu::program())?;
        let broker: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("address");
        let proxy = FaultProxy::start(broker).await.expect("proxy");
        let child = tansu::start(broker, proxy.addr())
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        Some(Self {
            child,
            proxy: std::sync::Arc::new(proxy),
            broker,
        })
    }

    /// The address clients bootstrap from: the proxy.
    pub fn brokers(&self) -> String {
        self.proxy.addr().to_string()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Counts how often each id was read.
pub fn tally(received: &[Received]) -> BTreeMap<MessageId, usize> {
    let mut counts = BTreeMap::new();
    for r in received {
        *counts.entry(r.id).or_insert(0) += 1;
    }
    counts
}
