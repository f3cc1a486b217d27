//! The three brokers, each with a destination of its own: topology set up and removed, the
//! raw publish baseline (acks pipelined, the same client crate as the publisher), the
//! publisher under test, and what arrived; and a no-op sink, which takes the broker away to
//! show what the relay costs by itself.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream::Config as StreamConfig};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use outbox_core::{
    Capabilities, DynPublisher, MESSAGE_ID_HEADER, Message, MessageId, PublishError,
    PublishOutcome, Publisher,
};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::Res;
use crate::services::{Services, reachable};
use crate::workload::{self, Keys};

/// Acks awaited at once by the raw publish baselines.
pub(crate) const RAW_WINDOW: usize = 1024;

/// A broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BrokerKind {
    Nats,
    Kafka,
    Amqp,
    /// No broker: a publisher that confirms every message at once.
    Noop,
}

impl BrokerKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            BrokerKind::Nats => "nats",
            BrokerKind::Kafka => "kafka",
            BrokerKind::Amqp => "amqp",
            BrokerKind::Noop => "noop",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name {
            "nats" => Some(BrokerKind::Nats),
            "kafka" => Some(BrokerKind::Kafka),
            "amqp" | "rabbitmq" => Some(BrokerKind::Amqp),
            "noop" => Some(BrokerKind::Noop),
            _ => None,
        }
    }
}

/// A destination created for one measurement: a JetStream stream (file storage), a Kafka
/// topic of 3 partitions, an AMQP direct exchange bound to a durable queue, or a no-op sink.
pub(crate) struct Broker {
    pub(crate) kind: BrokerKind,
    pub(crate) name: String,
    services: Services,
    nats: Option<jetstream::Context>,
    kafka: Option<AdminClient<DefaultClientContext>>,
    amqp: Option<Connection>,
    noop: Option<Arc<NoopPublisher>>,
}

/// The `noop` broker's publisher: confirms every message at once, without I/O, and only
/// counts them (a [`outbox_core::MemoryPublisher`] would keep them all).
#[derive(Debug, Default)]
pub(crate) struct NoopPublisher {
    confirmed: AtomicU64,
}

impl NoopPublisher {
    /// Messages confirmed so far.
    pub(crate) fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }
}

impl Publisher for NoopPublisher {
    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        self.confirmed
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(batch.iter().map(|_| PublishOutcome::Published).collect())
    }

    fn capabilities(&self) -> Capabilities {
        // Confirmed in call order, and nothing ever fails.
        Capabilities::default().ordered_per_key(true)
    }
}

/// Librdkafka settings of the publisher, and `linger_ms`.
fn kafka_properties(brokers: &str, linger_ms: u32) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "8000")
        .set("linger.ms", linger_ms.to_string());
    config
}

impl Broker {
    /// Creates destination `name` on broker `kind`.
    pub(crate) async fn setup(kind: BrokerKind, services: &Services, name: &str) -> Res<Self> {
        let mut broker = Self {
            kind,
            name: name.to_owned(),
            services: services.clone(),
            nats: None,
            kafka: None,
            amqp: None,
            noop: None,
        };
        match kind {
            BrokerKind::Nats => {
                reachable("NATS", &services.nats, 4222).await?;
                let client = async_nats::connect(services.nats.as_str()).await?;
                let context = jetstream::new(client);
                context
                    .create_stream(StreamConfig {
                        name: name.to_owned(),
                        subjects: vec![format!("{name}.>")],
                        ..StreamConfig::default()
                    })
                    .await?;
                broker.nats = Some(context);
            }
            BrokerKind::Kafka => {
                reachable("Kafka broker", &services.kafka, 9092).await?;
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", services.kafka.as_str())
                    .set("socket.timeout.ms", "5000")
                    .create()?;
                let topic = NewTopic::new(name, 3, TopicReplication::Fixed(1));
                let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
                for result in admin.create_topics([&topic], &options).await? {
                    result.map_err(|(topic, code)| format!("creating topic {topic}: {code:?}"))?;
                }
                broker.kafka = Some(admin);
            }
            BrokerKind::Amqp => {
                reachable("RabbitMQ", &services.amqp, 5672).await?;
                let connection =
                    Connection::connect(&services.amqp, ConnectionProperties::default()).await?;
                let channel = connection.create_channel().await?;
                channel
                    .exchange_declare(
                        name.into(),
                        ExchangeKind::Direct,
                        ExchangeDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .queue_declare(
                        name.into(),
                        QueueDeclareOptions {
                            durable: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .queue_bind(
                        name.into(),
                        name.into(),
                        "events".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                broker.amqp = Some(connection);
            }
            BrokerKind::Noop => broker.noop = Some(Arc::new(NoopPublisher::default())),
        }
        Ok(broker)
    }

    /// The destination of messages, as the publisher wants it.
    pub(crate) fn destination(&self) -> String {
        match self.kind {
            BrokerKind::Nats => format!("{}.events", self.name),
            BrokerKind::Kafka => self.name.clone(),
            BrokerKind::Amqp => format!("{}/events", self.name),
            BrokerKind::Noop => format!("{}.events", self.name),
        }
    }

    /// The publisher under test, with its defaults (Kafka: `linger_ms`); for `noop`, the one
    /// sink of the destination, whatever the call.
    pub(crate) async fn publisher(
        &self,
        linger_ms: u32,
        pipeline_keys: bool,
    ) -> Res<Arc<dyn DynPublisher>> {
        Ok(match self.kind {
            BrokerKind::Nats => Arc::new(
                outbox_nats::NatsPublisher::connect(
                    outbox_nats::NatsConfig::new(self.services.nats.as_str())
                        .pipeline_keys(pipeline_keys),
                )
                .await?,
            ),
            BrokerKind::Kafka => Arc::new(
                outbox_kafka::KafkaPublisher::new(
                    outbox_kafka::KafkaConfig::new(self.services.kafka.as_str())
                        .property("linger.ms", linger_ms.to_string())
                        .pipeline_keys(pipeline_keys),
                )
                .await?,
            ),
            BrokerKind::Amqp => Arc::new(
                outbox_amqp::AmqpPublisher::new(outbox_amqp::AmqpConfig::new(
                    self.services.amqp.as_str(),
                ))
                .await?,
            ),
            BrokerKind::Noop => self.noop.clone().ok_or("no sink")?,
        })
    }

    /// Messages the `noop` sink confirmed so far (`None` for a real broker).
    pub(crate) fn sink_confirmed(&self) -> Option<u64> {
        self.noop.as_ref().map(|sink| sink.confirmed())
    }

    /// The raw publish baseline's client, connected and warmed by one acknowledged message
    /// (a new Kafka producer takes about half a second over its first delivery, which is
    /// start-up, not throughput); what it publishes is purged with the rest. There is none for
    /// `noop`: without I/O, nothing would be measured.
    pub(crate) async fn raw_publisher(&self, keys: Keys) -> Res<RawPublisher> {
        let client = match self.kind {
            BrokerKind::Nats => {
                let client = async_nats::connect(self.services.nats.as_str()).await?;
                RawClient::Nats(
                    jetstream::ContextBuilder::new()
                        .max_ack_inflight(RAW_WINDOW * 8)
                        .backpressure_on_inflight(true)
                        .build(client),
                )
            }
            BrokerKind::Kafka => {
                RawClient::Kafka(kafka_properties(&self.services.kafka, 5).create()?)
            }
            BrokerKind::Amqp => {
                let connection =
                    Connection::connect(&self.services.amqp, ConnectionProperties::default())
                        .await?;
                let channel = connection.create_channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                RawClient::Amqp(connection, channel)
            }
            BrokerKind::Noop => return Err("the noop sink has no raw publish".into()),
        };
        let raw = RawPublisher {
            client,
            destination: self.destination(),
            exchange: self.name.clone(),
            keys,
        };
        let confirmed = raw.publish(0..1).await?;
        if confirmed != 1 {
            return Err("the warm-up message was not confirmed".into());
        }
        Ok(raw)
    }

    /// Messages the destination holds (NATS: the stream; AMQP: the queue), `None` for Kafka
    /// (tansu's offsets are not to be trusted: see [`Broker::read_nats`] for a real count) and
    /// for the `noop` sink, which holds nothing.
    pub(crate) async fn stored(&self) -> Res<Option<u64>> {
        match self.kind {
            BrokerKind::Nats => {
                let context = self.nats.as_ref().ok_or("no NATS context")?;
                let mut stream = context.get_stream(&self.name).await?;
                Ok(Some(stream.info().await?.state.messages))
            }
            BrokerKind::Kafka | BrokerKind::Noop => Ok(None),
            BrokerKind::Amqp => {
                let connection = self.amqp.as_ref().ok_or("no AMQP connection")?;
                let channel = connection.create_channel().await?;
                let queue = channel
                    .queue_declare(
                        self.name.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                Ok(Some(u64::from(queue.message_count())))
            }
        }
    }

    /// Empties the destination (after a baseline, before the relay).
    pub(crate) async fn purge(&self) -> Res<()> {
        match self.kind {
            BrokerKind::Nats => {
                let context = self.nats.as_ref().ok_or("no NATS context")?;
                context.get_stream(&self.name).await?.purge().await?;
            }
            BrokerKind::Kafka | BrokerKind::Noop => {}
            BrokerKind::Amqp => {
                let connection = self.amqp.as_ref().ok_or("no AMQP connection")?;
                let channel = connection.create_channel().await?;
                channel
                    .queue_purge(self.name.as_str().into(), Default::default())
                    .await?;
            }
        }
        Ok(())
    }

    /// Reads the whole NATS stream in order: (key, sequence number) of each message.
    pub(crate) async fn read_nats(&self, expected: u64) -> Res<Vec<(String, u64)>> {
        let context = self.nats.as_ref().ok_or("not a NATS broker")?;
        let stream = context.get_stream(&self.name).await?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("{}_reader", self.name)),
                ack_policy: jetstream::consumer::AckPolicy::None,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..pull::Config::default()
            })
            .await?;
        let total = stream.cached_info().state.messages.max(expected);
        let mut got = Vec::with_capacity(usize::try_from(total)?);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while (got.len() as u64) < total && tokio::time::Instant::now() < deadline {
            let want = usize::try_from(total - got.len() as u64)?.min(5_000);
            let mut batch = consumer
                .batch()
                .max_messages(want)
                .expires(Duration::from_secs(1))
                .messages()
                .await?;
            let before = got.len();
            while let Some(message) = batch.next().await {
                let message = message?;
                let key = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Outbox-Key"))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                let seq = workload::seq_of(&message.payload).ok_or("payload without sequence")?;
                got.push((key, seq));
            }
            if got.len() == before {
                break;
            }
        }
        Ok(got)
    }

    /// Removes the destination.
    pub(crate) async fn teardown(self) {
        let result: Res<()> = async {
            match self.kind {
                BrokerKind::Nats => {
                    if let Some(context) = &self.nats {
                        context.delete_stream(&self.name).await?;
                    }
                }
                BrokerKind::Kafka => {
                    if let Some(admin) = &self.kafka {
                        let options =
                            AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
                        admin.delete_topics(&[self.name.as_str()], &options).await?;
                    }
                }
                BrokerKind::Amqp => {
                    if let Some(connection) = &self.amqp {
                        let channel = connection.create_channel().await?;
                        channel
                            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
                            .await?;
                        channel
                            .exchange_delete(
                                self.name.as_str().into(),
                                ExchangeDeleteOptions::default(),
                            )
                            .await?;
                        let _ = connection.close(200, "done".into()).await;
                    }
                }
                BrokerKind::Noop => {}
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            eprintln!("removing {} {}: {err}", self.kind.name(), self.name);
        }
    }
}

/// 1 for a successful Kafka delivery report.
fn delivered<T, M, C>(report: Result<Result<T, (rdkafka::error::KafkaError, M)>, C>) -> Res<u64> {
    match report {
        Ok(Ok(_)) => Ok(1),
        Ok(Err((err, _))) => Err(format!("delivery failed: {err}").into()),
        Err(_) => Err("delivery canceled".into()),
    }
}

enum RawClient {
    Nats(jetstream::Context),
    Kafka(FutureProducer),
    Amqp(Connection, lapin::Channel),
}

/// The raw publish baseline: the workload's messages with the headers the publisher sets,
/// acks pipelined ([`RAW_WINDOW`] in flight, 8 times that for Kafka), one connection.
pub(crate) struct RawPublisher {
    client: RawClient,
    destination: String,
    exchange: String,
    keys: Keys,
}

impl RawPublisher {
    /// Publishes messages `seqs` of the backlog; returns how many were confirmed.
    pub(crate) async fn publish(&self, seqs: std::ops::Range<u64>) -> Res<u64> {
        let (destination, keys) = (self.destination.as_str(), self.keys);
        match &self.client {
            RawClient::Nats(context) => {
                let mut in_flight = FuturesOrdered::new();
                let mut confirmed = 0;
                for seq in seqs {
                    let msg = workload::message(destination, seq, keys);
                    let id = MessageId::new().to_string();
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(MESSAGE_ID_HEADER, id.as_str());
                    headers.insert("Nats-Msg-Id", id.as_str());
                    headers.insert("Outbox-Key", msg.ordering_key().unwrap_or_default());
                    while in_flight.len() >= RAW_WINDOW {
                        if let Some(ack) = in_flight.next().await {
                            let _: async_nats::jetstream::publish::PublishAck = ack?;
                            confirmed += 1;
                        }
                    }
                    let ack = context
                        .publish_with_headers(
                            destination.to_owned(),
                            headers,
                            msg.payload().to_vec().into(),
                        )
                        .await?;
                    in_flight.push_back(ack.into_future());
                }
                while let Some(ack) = in_flight.next().await {
                    ack?;
                    confirmed += 1;
                }
                Ok(confirmed)
            }
            RawClient::Kafka(producer) => {
                let mut in_flight = VecDeque::new();
                let mut confirmed = 0;
                for seq in seqs {
                    let msg = workload::message(destination, seq, keys);
                    let id = MessageId::new().to_string();
                    let mut record = FutureRecord::<str, [u8]>::to(destination)
                        .payload(msg.payload())
                        .key(msg.ordering_key().unwrap_or_default())
                        .headers(OwnedHeaders::new().insert(Header {
                            key: MESSAGE_ID_HEADER,
                            value: Some(id.as_str()),
                        }));
                    while in_flight.len() >= RAW_WINDOW * 8 {
                        if let Some(delivery) = in_flight.pop_front() {
                            confirmed += delivered(delivery.await)?;
                        }
                    }
                    loop {
                        match producer.send_result(record) {
                            Ok(delivery) => break in_flight.push_back(delivery),
                            Err((err, back)) => {
                                if in_flight.is_empty() {
                                    return Err(format!("producer refused: {err}").into());
                                }
                                record = back;
                                if let Some(delivery) = in_flight.pop_front() {
                                    confirmed += delivered(delivery.await)?;
                                }
                            }
                        }
                    }
                }
                while let Some(delivery) = in_flight.pop_front() {
                    confirmed += delivered(delivery.await)?;
                }
                Ok(confirmed)
            }
            RawClient::Amqp(_, channel) => {
                let options = BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                };
                let mut in_flight = FuturesOrdered::new();
                let mut confirmed = 0;
                for seq in seqs {
                    let msg = workload::message(destination, seq, keys);
                    let id = MessageId::new().to_string();
                    let mut headers = FieldTable::default();
                    headers.insert(
                        MESSAGE_ID_HEADER.into(),
                        AMQPValue::LongString(id.as_str().into()),
                    );
                    headers.insert(
                        "outbox-key".into(),
                        AMQPValue::LongString(msg.ordering_key().unwrap_or_default().into()),
                    );
                    let properties = BasicProperties::default()
                        .with_message_id(id.into())
                        .with_delivery_mode(2)
                        .with_headers(headers);
                    while in_flight.len() >= RAW_WINDOW {
                        if let Some(confirm) = in_flight.next().await {
                            let confirm: lapin::Result<lapin::Confirmation> = confirm;
                            if !confirm?.is_ack() {
                                return Err("nack".into());
                            }
                            confirmed += 1;
                        }
                    }
                    let confirm = channel
                        .basic_publish(
                            self.exchange.as_str().into(),
                            "events".into(),
                            options,
                            msg.payload(),
                            properties,
                        )
                        .await?;
                    in_flight.push_back(confirm);
                }
                while let Some(confirm) = in_flight.next().await {
                    if !confirm?.is_ack() {
                        return Err("nack".into());
                    }
                    confirmed += 1;
                }
                Ok(confirmed)
            }
        }
    }

    /// Closes the connection.
    pub(crate) async fn close(self) {
        if let RawClient::Amqp(connection, _) = self.client {
            let _ = connection.close(200, "done".into()).await;
        }
    }
}
