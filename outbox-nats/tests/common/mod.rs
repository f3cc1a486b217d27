//! A NATS JetStream harness: a fresh stream on `{name}.>` read by a durable pull consumer.

#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, stream::Config as StreamConfig};
use futures::StreamExt;
use outbox_core::{MESSAGE_ID_HEADER, Message, MessageId, NewMessage, RelayConfig, RetryPolicy};
use outbox_nats::{NatsConfig, NatsPublisher};
use outbox_testkit::env::{or_skip, service_url, unique_name};
use outbox_testkit::{PublisherHarness, Received};

pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// The server under test.
pub fn nats_url() -> String {
    service_url("OUTBOX_TEST_NATS_URL", DEFAULT_URL)
}

/// The server's TCP address, for a proxy.
pub async fn server_addr() -> std::net::SocketAddr {
    let url = url::Url::parse(&nats_url()).expect("valid NATS URL");
    let host = url.host_str().expect("host").to_owned();
    let port = url.port().unwrap_or(4222);
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("resolve")
        .next()
        .expect("an address")
}

/// `url` with its host and port replaced by `addr` (to go through a proxy).
pub fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let mut url = url::Url::parse(url).expect("valid NATS URL");
    url.set_host(Some(&addr.ip().to_string())).expect("host");
    url.set_port(Some(addr.port())).expect("port");
    url.to_string()
}

pub fn stored(msg: NewMessage) -> Message {
    Message::new(msg, outbox_core::chrono::Utc::now())
}

/// A fresh stream `{name}` storing `{name}.>`, read by a durable pull consumer.
pub struct NatsHarness {
    publisher: NatsPublisher,
    pub stream: String,
    /// What the harness's destination is, as given to the publisher.
    pub destination: String,
    max_payload: Option<usize>,
    pub admin: jetstream::Context,
    consumer: PullConsumer,
}

pub struct Options {
    /// The stream's `max_message_size`.
    pub max_message_size: Option<usize>,
    /// Publish through `subject_prefix = {name}` with destination `events` instead of the
    /// full subject.
    pub prefixed: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_message_size: Some(256 * 1024),
            prefixed: false,
        }
    }
}

impl NatsHarness {
    /// A harness with the default publisher configuration, or `None` to skip.
    pub async fn start() -> Option<Self> {
        Self::with(Options::default(), |config| config).await
    }

    pub async fn with(
        options: Options,
        configure: impl FnOnce(NatsConfig) -> NatsConfig,
    ) -> Option<Self> {
        let url = nats_url();
        let client = or_skip("NATS", async_nats::connect(url.as_str()).await)?;
        let admin = jetstream::new(client);
        let stream = unique_name("outbox_nats");
        let config = StreamConfig {
            name: stream.clone(),
            subjects: vec![format!("{stream}.>")],
            max_message_size: options
                .max_message_size
                .map_or(-1, |max| i32::try_from(max).expect("fits")),
            ..StreamConfig::default()
        };
        // A NATS 2.9 server creating a stream while another test deletes the account's last
        // one can lose a race on the stream directory ("could not create storage directory"):
        // a few tries.
        let mut created = admin.create_stream(config.clone()).await;
        for _ in 0..4 {
            if created.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            created = admin.create_stream(config.clone()).await;
        }
        let stream_handle = or_skip("NATS JetStream", created)?;
        let consumer: PullConsumer = stream_handle
            .create_consumer(pull::Config {
                durable_name: Some(format!("{stream}_reader")),
                ack_policy: AckPolicy::None,
                deliver_policy: DeliverPolicy::All,
                ..pull::Config::default()
            })
            .await
            .expect("consumer");
        let mut config = NatsConfig::new(url);
        let destination = if options.prefixed {
            config = config.subject_prefix(stream.clone());
            String::from("events")
        } else {
            format!("{stream}.events")
        };
        let publisher = NatsPublisher::connect(configure(config))
            .await
            .expect("publisher");
        Some(Self {
            publisher,
            stream,
            destination,
            max_payload: options.max_message_size,
            admin,
            consumer,
        })
    }

    /// Messages as they came, waiting at most `timeout` for `count` of them.
    pub async fn read_raw(&self, count: usize, timeout: Duration) -> Vec<async_nats::Message> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::with_capacity(count);
        while got.len() < count {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let wait = (deadline - now)
                .min(Duration::from_secs(1))
                .max(Duration::from_millis(50));
            let mut batch = self
                .consumer
                .batch()
                .max_messages(count - got.len())
                .expires(wait)
                .messages()
                .await
                .expect("pull request");
            while let Some(message) = batch.next().await {
                let message = message.expect("message");
                got.push(message.message);
            }
        }
        got
    }
}

/// Decodes a message as the suite expects it, through [`outbox_nats::incoming`]: the suite's
/// checks of ids, keys, headers and payloads check the conversion too.
pub fn received(message: &async_nats::Message) -> Received {
    let incoming = outbox_nats::incoming(message).expect("an outbox message");
    let both = message
        .headers
        .as_ref()
        .and_then(|h| h.get(MESSAGE_ID_HEADER))
        .map(|v| v.as_str().to_owned());
    assert_eq!(both, Some(incoming.id.to_string()), "both id headers agree");
    Received {
        id: incoming.id,
        key: incoming.key,
        payload: incoming.payload,
        headers: incoming.headers,
    }
}

impl PublisherHarness for NatsHarness {
    type Publisher = NatsPublisher;

    fn publisher(&self) -> NatsPublisher {
        self.publisher.clone()
    }

    fn destination(&self) -> String {
        self.destination.clone()
    }

    fn invalid_destination(&self) -> Option<String> {
        // A subject no stream stores (with a prefix, under the prefix: still no stream).
        Some(format!("{}.events", unique_name("outbox_nats_nowhere")))
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
        let _ = self.admin.delete_stream(&self.stream).await;
    }
}

/// Settings for relays in tests: short leases and retry delays, retries without end.
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
pub fn enqueue(store: &outbox_core::MemoryStore, messages: &[NewMessage]) {
    let mut tx = store.begin();
    for msg in messages {
        tx.enqueue(msg.clone()).expect("enqueue");
    }
    tx.commit();
}

pub fn messages(dest: &str, count: usize, keys: usize) -> Vec<NewMessage> {
    (0..count)
        .map(|i| {
            NewMessage::new(dest, format!("message {i}"))
                .key(format!("key-{}", i % keys))
                .header("seq", i.to_string())
        })
        .collect()
}

/// Reads until every id of `sent` arrived at least once (or `timeout`); returns the ids in
/// order of first arrival and the number of duplicates.
pub async fn read_all(
    h: &NatsHarness,
    sent: &[NewMessage],
    timeout: Duration,
) -> (Vec<MessageId>, usize) {
    let wanted: HashSet<MessageId> = sent.iter().map(NewMessage::id).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let mut duplicates = 0;
    while seen.len() < wanted.len() && tokio::time::Instant::now() < deadline {
        let left = deadline - tokio::time::Instant::now();
        for received in h
            .read(wanted.len() - seen.len(), left.min(Duration::from_secs(1)))
            .await
        {
            assert!(wanted.contains(&received.id), "an id that was never sent");
            if seen.insert(received.id) {
                order.push(received.id);
            } else {
                duplicates += 1;
            }
        }
    }
    (order, duplicates)
}

/// First arrivals of each key follow enqueue order.
pub fn assert_key_order(sent: &[NewMessage], arrived: &[MessageId]) {
    let position: HashMap<MessageId, (usize, Option<&str>)> = sent
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id(), (i, m.ordering_key())))
        .collect();
    let mut last: HashMap<&str, usize> = HashMap::new();
    for id in arrived {
        let (pos, key) = position[id];
        if let Some(key) = key
            && let Some(prev) = last.insert(key, pos)
        {
            assert!(pos > prev, "key {key}: #{pos} arrived before #{prev}");
        }
    }
}
