//! [`KafkaPublisher`]: an idempotent librdkafka producer with `acks=all`, pipelining each batch.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::join_all;
use outbox_core::{
    Capabilities, MESSAGE_ID_HEADER, Message, PublishError, PublishOutcome, Publisher,
};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::publish_error;
use crate::{KafkaConfig, KafkaError};

/// Pause between two attempts to enqueue into a full local queue.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// Routes librdkafka's client-level errors (a broker connection lost, all brokers down) to
/// `tracing` as warnings: they are passing conditions that the delivery reports account for.
#[derive(Clone, Copy, Debug, Default)]
struct ProducerContext;

impl ClientContext for ProducerContext {
    fn error(&self, error: RdKafkaError, reason: &str) {
        warn!(target: "outbox_kafka", error = %error, reason, "Kafka client error");
    }
}

type Producer = FutureProducer<ProducerContext>;

/// Publishes outbox messages to Kafka.
///
/// - Each message goes to the topic of its destination ([`KafkaConfig::topic_for`]), with its
///   key as the Kafka key (so one key stays on one partition), its payload as the value, its id
///   in the [`MESSAGE_ID_HEADER`] header and its headers as Kafka headers.
/// - The producer is idempotent with `acks=all`: a message counts as
///   [`PublishOutcome::Published`] only on its delivery report, once every in-sync replica has
///   it, and the producer's own retries neither duplicate nor reorder it.
/// - A batch is pipelined: every message is handed to librdkafka, then all delivery reports are
///   awaited together.
/// - Clones share one producer. A producer that hit a fatal error (possible with the idempotent
///   producer), or whose producer id the broker fenced, would refuse every later message: a new
///   producer replaces it.
///
/// Needs a Tokio runtime. See the crate documentation for an example.
#[derive(Clone)]
pub struct KafkaPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    client_config: ClientConfig,
    producer: Mutex<Producer>,
}

impl KafkaPublisher {
    /// Checks `config` and creates the producer. It connects in the background: a broker that
    /// is down now makes publishes fail (transient) until it is up, not this call. (Async, as
    /// every publisher's constructor is, though this one does not wait for anything.)
    pub async fn new(config: KafkaConfig) -> Result<Self, KafkaError> {
        config.validate()?;
        let mut client_config = ClientConfig::new();
        for (name, value) in config.producer_properties() {
            client_config.set(name, value);
        }
        let producer = create(&client_config).map_err(KafkaError::Client)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client_config,
                producer: Mutex::new(producer),
            }),
        })
    }

    /// A publisher for `config`, connected: fails when the cluster cannot be reached within
    /// [`KafkaConfig::check_timeout`] or a topic of [`KafkaConfig::topics`] is missing.
    pub async fn connect(config: KafkaConfig) -> Result<Self, KafkaError> {
        let publisher = Self::new(config).await?;
        publisher.check().await.map_err(KafkaError::Unavailable)?;
        Ok(publisher)
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// Messages handed to librdkafka and not yet confirmed or failed, across all calls.
    pub fn in_flight(&self) -> usize {
        usize::try_from(self.inner.lock().in_flight_count()).unwrap_or(0)
    }
}

fn create(client_config: &ClientConfig) -> Result<Producer, RdKafkaError> {
    client_config.create_with_context(ProducerContext)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Producer> {
        self.producer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The producer, replaced first if it hit a fatal error (it then refuses every message).
    fn producer(&self) -> Result<Producer, PublishError> {
        let current = self.lock().clone();
        if let Some((code, reason)) = current.client().fatal_error() {
            self.replace(&current, &format!("fatal error {code:?}: {reason}"))
                .map_err(|err| {
                    PublishError::transient("cannot replace the Kafka producer after a fatal error")
                        .with_source(err)
                })?;
            return Ok(self.lock().clone());
        }
        Ok(current)
    }

    /// Replaces `used` by a new producer, with a new producer id, unless that happened already.
    fn replace(&self, used: &Producer, why: &str) -> Result<(), RdKafkaError> {
        let mut current = self.lock();
        if current.client().native_ptr() != used.client().native_ptr() {
            return Ok(());
        }
        warn!(target: "outbox_kafka", reason = why, "replacing the Kafka producer");
        let fresh = create(&self.client_config)?;
        let retired = std::mem::replace(&mut *current, fresh);
        drop(current);
        // The last handle on a producer waits for its threads when dropped.
        tokio::task::spawn_blocking(move || drop(retired));
        Ok(())
    }

    /// Drops a handle on a producer that may have been replaced: the last handle on a producer
    /// waits for its threads when dropped, which must not happen on the runtime's threads.
    fn release(&self, producer: Producer) {
        let replaced = self.lock().client().native_ptr() != producer.client().native_ptr();
        if replaced {
            tokio::task::spawn_blocking(move || drop(producer));
        }
    }
}

/// Why `producer` cannot go on: a fatal error (it refuses every message from then on), or the
/// broker fencing its producer id (it would refuse every later message of that producer).
fn unusable(producer: &Producer, fenced: bool) -> Option<String> {
    if let Some((code, reason)) = producer.client().fatal_error() {
        return Some(format!(
            "the Kafka producer hit a fatal error ({code:?}: {reason})"
        ));
    }
    fenced.then(|| String::from("the broker fenced the Kafka producer id"))
}

impl fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The Kafka headers of `msg`: its id, then its own headers (a header of its own named like the
/// id header is left out, so consumers find exactly one id).
fn headers_of(msg: &Message) -> OwnedHeaders {
    let id = msg.id.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len() + 1).insert(Header {
        key: MESSAGE_ID_HEADER,
        value: Some(id.as_str()),
    });
    for (name, value) in &msg.headers {
        if name != MESSAGE_ID_HEADER {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_str()),
            });
        }
    }
    headers
}

/// Hands one record to librdkafka, waiting for room while its queue is full until `deadline`.
async fn enqueue(
    producer: &Producer,
    mut record: FutureRecord<'_, str, [u8]>,
    deadline: Instant,
) -> Result<DeliveryFuture, RdKafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if Instant::now() < deadline =>
            {
                record = back;
                tokio::time::sleep(QUEUE_FULL_PAUSE).await;
            }
            Err((err, _)) => return Err(err),
        }
    }
}

impl Publisher for KafkaPublisher {
    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let config = &self.inner.config;
        let producer = self.inner.producer()?;
        let deadline = Instant::now() + config.enqueue_timeout;
        let mut outcomes: Vec<Option<PublishOutcome>> = batch.iter().map(|_| None).collect();
        let mut pending = Vec::with_capacity(batch.len());

        // Keys with a message the producer refused in this call (pipelined keys only): their
        // later messages are not handed to it.
        let mut failed_keys: HashSet<&str> = HashSet::new();
        for (index, msg) in batch.iter().enumerate() {
            if let Some(key) = msg.key.as_deref()
                && failed_keys.contains(key)
            {
                outcomes[index] = Some(PublishOutcome::Failed(PublishError::transient(
                    "not sent: an earlier message of its key failed in this call",
                )));
                continue;
            }
            let topic = config.topic_for(&msg.destination);
            let mut record = FutureRecord::<str, [u8]>::to(&topic)
                .payload(msg.payload.as_slice())
                .headers(headers_of(msg));
            if let Some(key) = msg.key.as_deref() {
                record = record.key(key);
            }
            match enqueue(&producer, record, deadline).await {
                Ok(delivery) => pending.push((index, delivery)),
                Err(err) => {
                    failed_keys.extend(msg.key.as_deref());
                    debug!(target: "outbox_kafka", id = %msg.id, %topic, error = %err, "message refused by the producer");
                    outcomes[index] = Some(PublishOutcome::Failed(publish_error(err, &topic)));
                }
            }
        }

        // Dropping this future (the relay's publish timeout) drops the receivers only: the
        // producer keeps delivering, and its reports for them are discarded.
        let reports = join_all(
            pending
                .into_iter()
                .map(|(index, delivery)| async move { (index, delivery.await) }),
        )
        .await;
        let mut fenced = false;
        for (index, report) in reports {
            let outcome = match report {
                Ok(Ok(_delivery)) => PublishOutcome::Published,
                Ok(Err((err, _message))) => {
                    let topic = config.topic_for(&batch[index].destination);
                    debug!(target: "outbox_kafka", id = %batch[index].id, %topic, error = %err, "delivery failed");
                    fenced |= err.rdkafka_error_code() == Some(RDKafkaErrorCode::ProducerFenced);
                    PublishOutcome::Failed(publish_error(err, &topic))
                }
                Err(_canceled) => PublishOutcome::Failed(PublishError::transient(
                    "the Kafka producer was closed before the delivery report",
                )),
            };
            outcomes[index] = Some(outcome);
        }
        // After a fatal error librdkafka fails what it holds with secondary codes (purged,
        // fatal): say what happened. A fenced or fatally failed producer would refuse every
        // later message: a new one, with a new producer id, takes over.
        let why = unusable(&producer, fenced);
        if let Some(why) = &why
            && let Err(err) = self.inner.replace(&producer, why)
        {
            warn!(target: "outbox_kafka", error = %err, "cannot replace the Kafka producer; trying again on the next call");
        }
        self.inner.release(producer);
        Ok(outcomes
            .into_iter()
            .map(|outcome| match (outcome, &why) {
                (Some(PublishOutcome::Failed(err)), Some(why)) if err.is_transient() => {
                    PublishOutcome::Failed(
                        PublishError::transient(format!("{why}; a new producer takes over"))
                            .with_source(err),
                    )
                }
                (Some(outcome), _) => outcome,
                (None, _) => PublishOutcome::Failed(PublishError::transient("no delivery report")),
            })
            .collect())
    }

    /// Not ordered per key unless [`KafkaConfig::pipeline_keys`] says so. The idempotent
    /// producer keeps the messages of one partition in order, but when one of them fails (a
    /// delivery timeout, a message the broker refuses) the later ones of its key in the same
    /// call may still be delivered. By default the relay therefore sends at most one message
    /// per key in a call; `pipeline_keys` accepts that relaxation for speed.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default().ordered_per_key(self.inner.config.pipeline_keys)
    }

    /// Fetches the cluster metadata; fails when no broker answers within
    /// [`KafkaConfig::check_timeout`], or when a topic named in [`KafkaConfig::topics`] does
    /// not exist.
    async fn check(&self) -> Result<(), PublishError> {
        let producer = self.inner.producer()?;
        let timeout = self.inner.config.check_timeout;
        let expected: Vec<String> = self.inner.config.topics.values().cloned().collect();
        let checked = tokio::task::spawn_blocking(move || -> Result<(), PublishError> {
            let metadata = producer
                .client()
                .fetch_metadata(None, timeout)
                .map_err(|err| {
                    PublishError::transient("cannot fetch the Kafka cluster metadata")
                        .with_source(err)
                })?;
            if metadata.brokers().is_empty() {
                return Err(PublishError::transient(
                    "the Kafka cluster metadata lists no broker",
                ));
            }
            for topic in &expected {
                let found = metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == topic && t.error().is_none());
                if !found {
                    return Err(PublishError::permanent(format!(
                        "topic {topic:?} does not exist"
                    )));
                }
            }
            Ok(())
        })
        .await;
        checked
            .map_err(|err| PublishError::transient("the metadata check failed").with_source(err))?
    }

    /// Waits up to [`KafkaConfig::flush_timeout`] until every queued message is confirmed or
    /// failed.
    async fn flush(&self) -> Result<(), PublishError> {
        let producer = self.inner.lock().clone();
        let timeout = self.inner.config.flush_timeout;
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        match flushed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(PublishError::transient(format!(
                "messages still unconfirmed after {timeout:?}"
            ))
            .with_source(err)),
            Err(err) => Err(PublishError::transient("the flush failed").with_source(err)),
        }
    }
}
