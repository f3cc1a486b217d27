//! A RabbitMQ harness: a fresh fanout exchange with one queue bound to it, read by a consumer.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use outbox_amqp::{AmqpConfig, AmqpPublisher};
use outbox_core::{
    DeadLetterFilter, MemoryStore, NewMessage, Relay, RelayConfig, RetryPolicy, Store,
};
use outbox_testkit::env::{or_skip, service_url, unique_name};
use outbox_testkit::{PublisherHarness, Received};
use tokio::sync::Mutex;

pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker under test.
pub fn amqp_url() -> String {
    service_url("OUTBOX_TEST_AMQP_URL", DEFAULT_URL)
}

/// `url` with its host and port replaced by `addr` (to go through a proxy).
pub fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let mut url = url::Url::parse(url).expect("valid AMQP URL");
    url.set_host(Some(&addr.ip().to_string())).expect("host");
    url.set_port(Some(addr.port())).expect("port");
    url.to_string()
}

/// The broker's TCP address, for a proxy.
pub async fn broker_addr() -> std::net::SocketAddr {
    let url = url::Url::parse(&amqp_url()).expect("valid AMQP URL");
    let host = url.host_str().expect("host").to_owned();
    let port = url.port().unwrap_or(5672);
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("resolve")
        .next()
        .expect("an address")
}

/// A fresh exchange (fanout unless told otherwise) and a queue bound to it, on the test broker.
pub struct AmqpHarness {
    publisher: AmqpPublisher,
    pub exchange: String,
    pub queue: String,
    max_payload: Option<usize>,
    _connection: Connection,
    channel: Channel,
    consumer: Mutex<Consumer>,
}

impl AmqpHarness {
    /// A harness with the default publisher configuration, or `None` to skip.
    pub async fn start() -> Option<Self> {
        Self::with(ExchangeKind::Fanout, |config| config).await
    }

    /// A harness whose exchange is of `kind` (bound with routing key `bound`) and whose publisher
    /// configuration is changed by `configure`.
    pub async fn with(
        kind: ExchangeKind,
        configure: impl FnOnce(AmqpConfig) -> AmqpConfig,
    ) -> Option<Self> {
        Self::build(kind, "bound", configure).await
    }

    pub async fn build(
        kind: ExchangeKind,
        binding: &str,
        configure: impl FnOnce(AmqpConfig) -> AmqpConfig,
    ) -> Option<Self> {
        let url = amqp_url();
        let connection = or_skip(
            "RabbitMQ",
            Connection::connect(&url, ConnectionProperties::default()).await,
        )?;
        let channel = connection.create_channel().await.expect("channel");
        let exchange = unique_name("outbox_amqp");
        let queue = format!("{exchange}_q");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
        channel
            .queue_declare(
                queue.as_str().into(),
                // Auto-delete: a test that panics before its teardown leaves nothing behind
                // once its connection closes (the exchange goes with its last binding).
                QueueDeclareOptions {
                    durable: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind queue");
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let config = configure(AmqpConfig::new(url));
        let max_payload = (config.max_message_size < 1024 * 1024 * 1024)
            .then_some(config.max_message_size)
            .filter(|max| *max <= 16 * 1024 * 1024);
        let publisher = AmqpPublisher::new(config).await.expect("valid config");
        Some(Self {
            publisher,
            exchange,
            queue,
            max_payload,
            _connection: connection,
            channel,
            consumer: Mutex::new(consumer),
        })
    }
}

impl AmqpHarness {
    /// Reads `count` deliveries as they came, waiting at most `timeout`.
    pub async fn read_raw(&self, count: usize, timeout: Duration) -> Vec<lapin::message::Delivery> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut consumer = self.consumer.lock().await;
        let mut got = Vec::with_capacity(count);
        while got.len() < count {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(delivery))) => got.push(delivery),
                Ok(Some(Err(err))) => panic!("consumer failed: {err}"),
                Ok(None) | Err(_) => break,
            }
        }
        got
    }
}

/// Decodes a delivery as the suite expects it, through [`outbox_amqp::incoming`]: the
/// suite's checks of ids, keys, headers and payloads check the conversion too.
pub fn received(delivery: &lapin::message::Delivery) -> Received {
    let incoming = outbox_amqp::incoming(delivery).expect("an outbox delivery");
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned()),
        Some(incoming.id.to_string()),
        "message_id is the outbox id"
    );
    Received {
        id: incoming.id,
        key: incoming.key,
        payload: incoming.payload,
        headers: incoming.headers,
    }
}

impl PublisherHarness for AmqpHarness {
    type Publisher = AmqpPublisher;

    fn publisher(&self) -> AmqpPublisher {
        self.publisher.clone()
    }

    fn destination(&self) -> String {
        self.exchange.clone()
    }

    fn invalid_destination(&self) -> Option<String> {
        Some(unique_name("outbox_amqp_missing"))
    }

    fn max_payload(&self) -> Option<usize> {
        self.max_payload
    }

    async fn read(&self, count: usize, timeout: Duration) -> Vec<Received> {
        self.read_raw(count, timeout)
            .await
            .iter()
            .map(received)
            .collect()
    }

    async fn teardown(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        self.publisher.close().await;
    }
}

/// Settings for relays in tests: short leases and retry delays.
pub fn relay_config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(200)
        .lease(Duration::from_secs(6))
        .publish_timeout(Duration::from_secs(2))
        .partition_lease(Duration::from_millis(900))
        .poll_min(Duration::from_millis(5))
        .poll_max(Duration::from_millis(50))
        .shutdown_timeout(Duration::from_secs(3))
        .retry(
            RetryPolicy::default()
                .initial_delay(Duration::from_millis(50))
                .max_delay(Duration::from_millis(300))
                .max_attempts(1000),
        )
}

/// Enqueues `messages` in one committed transaction.
pub fn enqueue(store: &MemoryStore, messages: &[NewMessage]) {
    let mut tx = store.begin();
    for msg in messages {
        tx.enqueue(msg.clone()).expect("enqueue");
    }
    tx.commit();
}

/// Runs `relay` until `done` holds for what the harness read so far (or `timeout`), then stops
/// it; returns everything read.
pub async fn relay_until<P: outbox_core::Publisher>(
    relay: Relay<MemoryStore, P>,
    harness: &AmqpHarness,
    expected: usize,
    timeout: Duration,
) -> Vec<Received> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let relay = relay.clone();
        async move {
            relay
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    let got = harness.read(expected, timeout).await;
    let _ = stop.send(());
    running
        .await
        .expect("relay task")
        .expect("relay ran without error");
    got
}

/// The dead letters of `store`.
pub async fn dead_letters(store: &MemoryStore) -> Vec<outbox_core::DeadLetter> {
    store
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("dead letters")
}
