//! [`KafkaConfig`]: where the brokers are, how destinations map to topics, and the librdkafka
//! properties passed through to the producer.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::KafkaError;

/// librdkafka's `message.timeout.ms` unless set in [`KafkaConfig::properties`]: a delivery
/// report, failed if need be, comes before the relay's default 10 s publish timeout, so the
/// relay retries what librdkafka gave up instead of piling copies into its queue.
pub(crate) const DEFAULT_MESSAGE_TIMEOUT_MS: &str = "8000";

/// librdkafka's `topic.metadata.propagation.max.ms` unless set in [`KafkaConfig::properties`]:
/// how long a topic the cluster does not know may take to appear before its messages fail
/// with "unknown topic" (permanent). Below the message timeout, so that this is the failure a
/// missing topic produces, rather than a timeout.
pub(crate) const DEFAULT_TOPIC_PROPAGATION_MS: &str = "5000";

/// Properties the publisher sets itself: its guarantee depends on them.
const ENFORCED: [(&str, &str); 2] = [("enable.idempotence", "true"), ("acks", "all")];

/// Settings of a [`KafkaPublisher`](crate::KafkaPublisher).
///
/// Built in code:
///
/// ```
/// use std::time::Duration;
/// use outbox_kafka::KafkaConfig;
///
/// let config = KafkaConfig::new("127.0.0.1:9092")
///     .topic_prefix("shop.")
///     .topic("orders", "orders-v2")
///     .property("compression.type", "lz4")
///     .property("linger.ms", "10")
///     .flush_timeout(Duration::from_secs(20));
/// assert_eq!(config.topic_for("orders"), "orders-v2");
/// assert_eq!(config.topic_for("payments"), "shop.payments");
/// ```
///
/// or read from a configuration file (durations like `"5s"`; property values may be strings,
/// numbers or booleans):
///
/// ```
/// use outbox_kafka::KafkaConfig;
///
/// let config: KafkaConfig = serde_json::from_str(r#"{
///     "brokers": "kafka-1:9092,kafka-2:9092",
///     "properties": { "linger.ms": 10, "sasl.password": "hunter2" },
///     "flush_timeout": "20s"
/// }"#)?;
/// assert_eq!(config.properties["linger.ms"], "10");
/// // Secrets stay out of logs.
/// assert!(!format!("{config:?}").contains("hunter2"));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port` separated by commas (librdkafka's `bootstrap.servers`).
    /// Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Prepended to a message's destination to name its topic, unless [`KafkaConfig::topics`]
    /// maps the destination (default empty: the destination is the topic).
    pub topic_prefix: String,
    /// Destination to topic, for destinations whose topic is named otherwise.
    pub topics: BTreeMap<String, String>,
    /// librdkafka producer properties, passed through as they are (see librdkafka's
    /// `CONFIGURATION.md`), for example `compression.type`, `linger.ms`, `security.protocol`,
    /// `sasl.*`, `ssl.*`. `enable.idempotence` and `acks` are set by the publisher and cannot be
    /// weakened; `bootstrap.servers` comes from [`KafkaConfig::brokers`].
    #[serde(deserialize_with = "properties")]
    pub properties: BTreeMap<String, String>,
    /// How long a publish call waits for room when librdkafka's local queue is full
    /// (`queue.buffering.max.messages`, `queue.buffering.max.kbytes`) before the remaining
    /// messages of the call fail as transient (default 5 s).
    #[serde(with = "humantime_serde")]
    pub enqueue_timeout: Duration,
    /// Longest wait for the cluster metadata in [`Publisher::check`](outbox_core::Publisher::check)
    /// (default 5 s).
    #[serde(with = "humantime_serde")]
    pub check_timeout: Duration,
    /// Longest wait in [`Publisher::flush`](outbox_core::Publisher::flush) for the messages
    /// still queued to be confirmed or failed (default 30 s).
    #[serde(with = "humantime_serde")]
    pub flush_timeout: Duration,
    /// Lets the relay put several messages of one key in a call (default false): they go to
    /// the key's partition in order, and the idempotent producer keeps that order through its
    /// retries, so a key with a backlog (one aggregate, one tenant) drains as fast as many keys
    /// do, instead of one delivery round trip per message.
    ///
    /// What it relaxes: when a message fails after the later messages of its key in the call
    /// were handed to the producer (a delivery timeout, a message the broker refuses), those
    /// may still be delivered, and the failed one, retried, arrives after them. A message the
    /// producer refuses at once (too large, an unknown topic, a full queue) stops the key's
    /// later messages in the call. Without it, first deliveries of a key are always in order.
    pub pipeline_keys: bool,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::from("127.0.0.1:9092"),
            topic_prefix: String::new(),
            topics: BTreeMap::new(),
            properties: BTreeMap::new(),
            enqueue_timeout: Duration::from_secs(5),
            check_timeout: Duration::from_secs(5),
            flush_timeout: Duration::from_secs(30),
            pipeline_keys: false,
        }
    }
}

impl KafkaConfig {
    /// The defaults, with `brokers` as the bootstrap brokers.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    /// Sets [`KafkaConfig::brokers`].
    pub fn brokers(mut self, brokers: impl Into<String>) -> Self {
        self.brokers = brokers.into();
        self
    }

    /// Sets [`KafkaConfig::topic_prefix`].
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// Publishes messages for `destination` to `topic` (no prefix added).
    pub fn topic(mut self, destination: impl Into<String>, topic: impl Into<String>) -> Self {
        self.topics.insert(destination.into(), topic.into());
        self
    }

    /// Sets a librdkafka producer property.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// Sets [`KafkaConfig::enqueue_timeout`].
    pub fn enqueue_timeout(mut self, timeout: Duration) -> Self {
        self.enqueue_timeout = timeout;
        self
    }

    /// Sets [`KafkaConfig::check_timeout`].
    pub fn check_timeout(mut self, timeout: Duration) -> Self {
        self.check_timeout = timeout;
        self
    }

    /// Sets [`KafkaConfig::pipeline_keys`].
    pub fn pipeline_keys(mut self, pipeline: bool) -> Self {
        self.pipeline_keys = pipeline;
        self
    }

    /// Sets [`KafkaConfig::flush_timeout`].
    pub fn flush_timeout(mut self, timeout: Duration) -> Self {
        self.flush_timeout = timeout;
        self
    }

    /// The topic messages for `destination` are published to.
    pub fn topic_for<'a>(&'a self, destination: &'a str) -> Cow<'a, str> {
        match self.topics.get(destination) {
            Some(topic) => Cow::Borrowed(topic),
            None if self.topic_prefix.is_empty() => Cow::Borrowed(destination),
            None => Cow::Owned(format!("{}{destination}", self.topic_prefix)),
        }
    }

    /// Checks the settings that the producer itself would not refuse, or would accept to the
    /// detriment of the outbox guarantee.
    pub fn validate(&self) -> Result<(), KafkaError> {
        if self.brokers.trim().is_empty() {
            return Err(KafkaError::config(
                "brokers",
                "must name at least one broker",
            ));
        }
        for (destination, topic) in &self.topics {
            if topic.is_empty() {
                return Err(KafkaError::config(
                    "topics",
                    format!("the topic of destination {destination:?} is empty"),
                ));
            }
        }
        for (name, value) in &self.properties {
            let value = value.trim();
            match name.as_str() {
                "bootstrap.servers" | "metadata.broker.list" => {
                    return Err(KafkaError::config(
                        "properties",
                        format!("{name} is set through `brokers`"),
                    ));
                }
                "enable.idempotence" if !value.eq_ignore_ascii_case("true") => {
                    return Err(KafkaError::config(
                        "properties",
                        "enable.idempotence must stay true: retries inside the producer must \
                         neither duplicate nor reorder messages",
                    ));
                }
                "acks" | "request.required.acks" if !(value == "all" || value == "-1") => {
                    return Err(KafkaError::config(
                        "properties",
                        format!(
                            "{name} must stay `all`: a message counts as published only once every in-sync replica has it"
                        ),
                    ));
                }
                "transactional.id" => {
                    return Err(KafkaError::config(
                        "properties",
                        "transactional.id is not supported: the outbox gives at-least-once \
                         delivery with message ids for deduplication",
                    ));
                }
                "delivery.report.only.error" if !value.eq_ignore_ascii_case("false") => {
                    return Err(KafkaError::config(
                        "properties",
                        "delivery.report.only.error must stay false: a message counts as \
                         published only on its delivery report",
                    ));
                }
                _ => {}
            }
        }
        if self.enqueue_timeout.is_zero() {
            return Err(KafkaError::config("enqueue_timeout", "must be above zero"));
        }
        if self.check_timeout.is_zero() {
            return Err(KafkaError::config("check_timeout", "must be above zero"));
        }
        Ok(())
    }

    /// The librdkafka properties of the producer: defaults, then the configured properties,
    /// then the ones the publisher enforces.
    pub(crate) fn producer_properties(&self) -> BTreeMap<&str, &str> {
        let mut properties = BTreeMap::from([
            ("message.timeout.ms", DEFAULT_MESSAGE_TIMEOUT_MS),
            (
                "topic.metadata.propagation.max.ms",
                DEFAULT_TOPIC_PROPAGATION_MS,
            ),
            ("client.id", "outbox-kafka"),
        ]);
        for (name, value) in &self.properties {
            properties.insert(name.as_str(), value.as_str());
        }
        properties.remove("request.required.acks");
        properties.extend(ENFORCED);
        properties.insert("bootstrap.servers", self.brokers.as_str());
        properties
    }
}

/// True for properties whose value must not appear in logs.
pub(crate) fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "key.pem",
        "oauthbearer.config",
        "token",
    ]
    .iter()
    .any(|part| name.contains(part))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(name, value)| {
                let shown = if is_secret(name) {
                    "<redacted>"
                } else {
                    value.as_str()
                };
                (name.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("topics", &self.topics)
            .field("properties", &properties)
            .field("enqueue_timeout", &self.enqueue_timeout)
            .field("check_timeout", &self.check_timeout)
            .field("flush_timeout", &self.flush_timeout)
            .field("pipeline_keys", &self.pipeline_keys)
            .finish()
    }
}

/// Reads property values written as strings, numbers or booleans.
fn properties<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Text(String),
        Integer(i64),
        Float(f64),
        Bool(bool),
    }
    let raw = BTreeMap::<String, Value>::deserialize(deserializer)?;
    Ok(raw
        .into_iter()
        .map(|(name, value)| {
            let text = match value {
                Value::Text(text) => text,
                Value::Integer(n) => n.to_string(),
                Value::Float(x) => x.to_string(),
                Value::Bool(b) => b.to_string(),
            };
            (name, text)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_then_prefix() {
        let config = KafkaConfig::default();
        assert_eq!(config.topic_for("orders"), "orders");
        let config = config
            .topic_prefix("prod.")
            .topic("orders", "legacy-orders");
        assert_eq!(config.topic_for("orders"), "legacy-orders");
        assert_eq!(config.topic_for("invoices"), "prod.invoices");
    }

    #[test]
    fn the_guarantee_cannot_be_weakened() {
        let field = |config: KafkaConfig| config.validate().err().map(|e| e.to_string());
        assert!(KafkaConfig::default().validate().is_ok());
        assert!(
            KafkaConfig::default()
                .property("acks", "-1")
                .property("enable.idempotence", "true")
                .validate()
                .is_ok()
        );
        for (name, value) in [
            ("acks", "1"),
            ("request.required.acks", "0"),
            ("enable.idempotence", "false"),
            ("bootstrap.servers", "elsewhere:9092"),
            ("transactional.id", "relay"),
            ("delivery.report.only.error", "true"),
        ] {
            let err = field(KafkaConfig::default().property(name, value));
            assert!(
                err.as_deref().is_some_and(|e| e.contains(name)
                    || e.contains("brokers")
                    || e.contains("acks")),
                "{name}={value}: {err:?}"
            );
        }
        assert!(field(KafkaConfig::new(" ")).is_some());
        assert!(field(KafkaConfig::default().topic("orders", "")).is_some());
    }

    #[test]
    fn enforced_properties_win_and_defaults_yield() {
        let config = KafkaConfig::new("b:1")
            .property("message.timeout.ms", "3000")
            .property("linger.ms", "20");
        let properties = config.producer_properties();
        assert_eq!(properties["bootstrap.servers"], "b:1");
        assert_eq!(properties["enable.idempotence"], "true");
        assert_eq!(properties["acks"], "all");
        assert_eq!(properties["message.timeout.ms"], "3000");
        assert_eq!(properties["linger.ms"], "20");
        assert_eq!(
            properties["topic.metadata.propagation.max.ms"],
            DEFAULT_TOPIC_PROPAGATION_MS
        );
    }

    #[test]
    fn reads_from_text_and_hides_secrets() {
        let config: KafkaConfig = serde_json::from_str(
            r#"{"brokers":"k:9092","topic_prefix":"p.","properties":{
                "linger.ms":10,"enable.idempotence":true,"sasl.username":"relay",
                "sasl.password":"s3cret","ssl.key.password":"k3y"},
                "enqueue_timeout":"2s"}"#,
        )
        .expect("parses");
        assert_eq!(config.properties["linger.ms"], "10");
        assert_eq!(config.properties["enable.idempotence"], "true");
        assert_eq!(config.enqueue_timeout, Duration::from_secs(2));
        assert_eq!(config.flush_timeout, Duration::from_secs(30));
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("k3y"),
            "{shown}"
        );
        assert!(
            shown.contains("relay") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(serde_json::from_str::<KafkaConfig>(r#"{"broker":"k:9092"}"#).is_err());
    }
}
