//! The message model: what a service enqueues and what the relay publishes.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Number of key-hash partitions. Relays share work by owning partitions; every message belongs
/// to exactly one, computed from its key (or from its id when it has none).
///
/// Part of the stored format: changing it would move keys between partitions.
pub const PARTITIONS: u16 = 64;

/// Headers of a message, sorted by name. Values are UTF-8 strings.
pub type Headers = BTreeMap<String, String>;

/// The header every publisher sets to the message id, for brokers and consumers that deduplicate.
pub const MESSAGE_ID_HEADER: &str = "outbox-message-id";

/// Stable identity of a message: a UUID v7 (time-ordered) assigned at enqueue.
///
/// Publishers forward it to the broker (Kafka header, AMQP `message_id`, `Nats-Msg-Id`) so that
/// duplicates of an at-least-once delivery can be dropped.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A new time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps an existing UUID.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID behind this id.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The 16 bytes of the UUID, for binary columns.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

impl From<Uuid> for MessageId {
    fn from(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

/// The partition of a message: FNV-1a of its key (or of its id when it has no key), modulo
/// [`PARTITIONS`]. Stable across versions and platforms, since stores persist it.
pub fn partition_of(key: Option<&str>, id: &MessageId) -> u16 {
    let bytes: &[u8] = match key {
        Some(key) => key.as_bytes(),
        None => id.as_bytes(),
    };
    let mut hash: u32 = 0x811c_9dc5;
    for byte in bytes {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % u32::from(PARTITIONS)) as u16
}

/// A message to enqueue, built inside the transaction that changes the business data.
///
/// ```
/// use outbox_core::NewMessage;
///
/// let msg = NewMessage::new("orders", br#"{"id":42}"#.to_vec())
///     .key("order-42")
///     .header("type", "OrderCreated");
/// assert_eq!(msg.destination(), "orders");
/// assert_eq!(msg.ordering_key(), Some("order-42"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    id: MessageId,
    destination: String,
    key: Option<String>,
    payload: Vec<u8>,
    headers: Headers,
}

impl NewMessage {
    /// A message for `destination` (a topic, an exchange with its routing key, a subject: each
    /// publisher documents its mapping) with raw payload bytes.
    pub fn new(destination: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            id: MessageId::new(),
            destination: destination.into(),
            key: None,
            payload: payload.into(),
            headers: Headers::new(),
        }
    }

    /// A message whose payload is `value` serialized as JSON; sets `content-type` to
    /// `application/json`.
    ///
    /// ```
    /// # use outbox_core::NewMessage;
    /// #[derive(serde::Serialize)]
    /// struct OrderCreated { id: u64 }
    ///
    /// let msg = NewMessage::json("orders", &OrderCreated { id: 7 })?;
    /// assert_eq!(msg.payload(), br#"{"id":7}"#);
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn json<T: Serialize + ?Sized>(
        destination: impl Into<String>,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        let payload = serde_json::to_vec(value)?;
        Ok(Self::new(destination, payload).header("content-type", "application/json"))
    }

    /// Sets the ordering key: messages with the same key reach the broker in enqueue order,
    /// and publishers use it as the broker's partitioning key where there is one.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header (replacing one of the same name).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Replaces the id, for callers that derive ids themselves (it must stay unique).
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = id;
        self
    }

    /// The id the message will keep for ever.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The destination.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The ordering key, if any.
    pub fn ordering_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The partition this message belongs to.
    pub fn partition(&self) -> u16 {
        partition_of(self.key.as_deref(), &self.id)
    }

    /// Checks the message against `limits`; stores call this before writing, so a message that
    /// could never be published is refused inside the caller's transaction.
    pub fn validate(&self, limits: &Limits) -> Result<(), InvalidMessage> {
        if self.destination.is_empty() {
            return Err(InvalidMessage::EmptyDestination);
        }
        if self.destination.len() > limits.max_destination_len {
            return Err(InvalidMessage::DestinationTooLong {
                len: self.destination.len(),
                max: limits.max_destination_len,
            });
        }
        if self.destination.chars().any(char::is_control) {
            return Err(InvalidMessage::ControlCharacter {
                field: "destination",
            });
        }
        if let Some(key) = &self.key
            && key.len() > limits.max_key_len
        {
            return Err(InvalidMessage::KeyTooLong {
                len: key.len(),
                max: limits.max_key_len,
            });
        }
        if self.payload.len() > limits.max_payload_len {
            return Err(InvalidMessage::PayloadTooLarge {
                len: self.payload.len(),
                max: limits.max_payload_len,
            });
        }
        let headers_len: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if headers_len > limits.max_headers_len {
            return Err(InvalidMessage::HeadersTooLarge {
                len: headers_len,
                max: limits.max_headers_len,
            });
        }
        if self
            .headers
            .keys()
            .any(|name| name.is_empty() || name.chars().any(char::is_control))
        {
            return Err(InvalidMessage::ControlCharacter {
                field: "header name",
            });
        }
        Ok(())
    }

    /// Splits the message into its parts: id, destination, key, payload, headers.
    pub fn into_parts(self) -> (MessageId, String, Option<String>, Vec<u8>, Headers) {
        (
            self.id,
            self.destination,
            self.key,
            self.payload,
            self.headers,
        )
    }
}

/// Size limits applied at enqueue. The defaults fit every broker's defaults (Kafka's 1 MB
/// `message.max.bytes` is the smallest); raise them together with the broker's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[serde(default)]
pub struct Limits {
    /// Largest payload in bytes (default 900 KiB, below Kafka's 1 MB default).
    pub max_payload_len: usize,
    /// Largest sum of header name and value lengths in bytes (default 64 KiB).
    pub max_headers_len: usize,
    /// Longest key in bytes (default 255).
    pub max_key_len: usize,
    /// Longest destination in bytes (default 255).
    pub max_destination_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_len: 900 * 1024,
            max_headers_len: 64 * 1024,
            max_key_len: 255,
            max_destination_len: 255,
        }
    }
}

/// Why a message was refused at enqueue.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    /// The destination is empty.
    #[error("the destination is empty")]
    EmptyDestination,
    /// The destination is longer than allowed.
    #[error("the destination is {len} bytes long, the limit is {max}")]
    DestinationTooLong {
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The key is longer than allowed.
    #[error("the key is {len} bytes long, the limit is {max}")]
    KeyTooLong {
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The payload is larger than allowed.
    #[error("the payload is {len} bytes, the limit is {max}")]
    PayloadTooLarge {
        /// Actual size.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The headers are larger than allowed.
    #[error("the headers take {len} bytes, the limit is {max}")]
    HeadersTooLarge {
        /// Actual size.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A field holds a control character or is empty where it must not be.
    #[error("the {field} is empty or holds a control character")]
    ControlCharacter {
        /// Which field.
        field: &'static str,
    },
}

/// A stored message, as claimed by the relay and handed to a publisher.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// Stable id.
    pub id: MessageId,
    /// Where to publish.
    pub destination: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// User headers.
    pub headers: Headers,
    /// When the enqueue happened (the store's clock).
    pub created_at: DateTime<Utc>,
    /// Failed publish attempts so far.
    pub attempts: u32,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
}

impl Message {
    /// Builds a stored message; for stores and tests.
    pub fn new(new: NewMessage, created_at: DateTime<Utc>) -> Self {
        let (id, destination, key, payload, headers) = new.into_parts();
        Self {
            id,
            destination,
            key,
            payload,
            headers,
            created_at,
            attempts: 0,
            last_error: None,
        }
    }

    /// Sets the attempt count and last error, for stores decoding a row.
    pub fn with_attempts(mut self, attempts: u32, last_error: Option<String>) -> Self {
        self.attempts = attempts;
        self.last_error = last_error;
        self
    }
}

/// Encodes headers for storage as a JSON object.
pub fn encode_headers(headers: &Headers) -> String {
    // A map of strings always serializes.
    serde_json::to_string(headers).unwrap_or_else(|_| String::from("{}"))
}

/// Decodes headers stored by [`encode_headers`].
pub fn decode_headers(text: &str) -> Result<Headers, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        let id = MessageId::new();
        assert_eq!(
            partition_of(Some("order-1"), &id),
            partition_of(Some("order-1"), &MessageId::new())
        );
        // FNV-1a("a") = 0xe40c292c: the partition is part of the stored format.
        assert_eq!(partition_of(Some("a"), &id), (0xe40c_292c_u32 % 64) as u16);
        for i in 0..1000 {
            assert!(partition_of(Some(&format!("k{i}")), &id) < PARTITIONS);
        }
    }

    #[test]
    fn ids_are_time_ordered() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<MessageId>().ok(), Some(a));
    }

    #[test]
    fn validation_refuses_what_no_broker_takes() {
        let limits = Limits::default();
        assert!(NewMessage::new("t", vec![0; 10]).validate(&limits).is_ok());
        assert_eq!(
            NewMessage::new("", vec![]).validate(&limits),
            Err(InvalidMessage::EmptyDestination)
        );
        assert!(matches!(
            NewMessage::new("t", vec![0; limits.max_payload_len + 1]).validate(&limits),
            Err(InvalidMessage::PayloadTooLarge { .. })
        ));
        assert!(matches!(
            NewMessage::new("t\n", vec![]).validate(&limits),
            Err(InvalidMessage::ControlCharacter { .. })
        ));
        assert!(matches!(
            NewMessage::new("t", vec![])
                .key("k".repeat(300))
                .validate(&limits),
            Err(InvalidMessage::KeyTooLong { .. })
        ));
        assert!(matches!(
            NewMessage::new("t", vec![])
                .header("h", "v".repeat(70_000))
                .validate(&limits),
            Err(InvalidMessage::HeadersTooLarge { .. })
        ));
    }
}
