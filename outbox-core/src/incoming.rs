//! [`Incoming`]: a message as a consumer receives it from the broker, with the stable id that
//! makes it safe to process again.
//!
//! Delivery is at least once, so a consumer sees some messages twice: after a relay published
//! again a message whose confirmation was lost, or after the broker redelivered one the consumer
//! did not acknowledge. Each broker crate turns its client's received message into an
//! [`Incoming`] (`outbox_kafka::incoming`, `outbox_amqp::incoming`, `outbox_nats::incoming`),
//! and an inbox records its id in the consumer's own transaction, so that the effect of each
//! message happens once.
//!
//! # The acknowledgement discipline
//!
//! 1. Receive the message and turn it into an [`Incoming`].
//! 2. In **one database transaction**: record the id in the inbox and, if it is new, apply the
//!    effect; then commit.
//! 3. Only then acknowledge it to the broker (AMQP `basic_ack`, JetStream `ack`, Kafka offset
//!    commit).
//!
//! A crash between 2 and 3 redelivers the message; the inbox knows its id, so the effect is not
//! applied twice. Acknowledging first would lose the message in a crash before the commit.

use std::fmt;

use serde::de::DeserializeOwned;

use crate::{Headers, MESSAGE_ID_HEADER, MessageId};

/// A message received from a broker: the id the relay published it with, where it came from,
/// its key, its headers and its payload.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Incoming {
    /// The outbox message id, the same on every delivery of the message.
    pub id: MessageId,
    /// Where it was received from: the Kafka topic, the AMQP routing key (or the queue, for the
    /// default exchange), the NATS subject.
    pub destination: String,
    /// The ordering key, when the message has one.
    pub key: Option<String>,
    /// The headers the message was enqueued with; those the transport added (the id, the key)
    /// are left out.
    pub headers: Headers,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Incoming {
    /// An incoming message with the id `id`, as the broker carried it (the text of a UUID).
    ///
    /// ```
    /// use outbox_core::Incoming;
    ///
    /// let incoming = Incoming::new(Some("01932c4e-8a6c-7d2a-b4a1-1f9c0e2b3d4f"), "orders", "{}")?
    ///     .key(Some("order-1".into()));
    /// assert_eq!(incoming.key.as_deref(), Some("order-1"));
    /// assert!(Incoming::new(None, "orders", "{}").is_err());
    /// assert!(Incoming::new(Some("42"), "orders", "{}").is_err());
    /// # Ok::<(), outbox_core::IncomingError>(())
    /// ```
    pub fn new(
        id: Option<&str>,
        destination: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<Self, IncomingError> {
        let destination = destination.into();
        let id = match id {
            None => return Err(IncomingError::MissingId { destination }),
            Some(text) => {
                text.trim()
                    .parse()
                    .map_err(|err: uuid::Error| IncomingError::InvalidId {
                        destination: destination.clone(),
                        value: text.chars().take(64).collect(),
                        reason: err.to_string(),
                    })?
            }
        };
        Ok(Self {
            id,
            destination,
            key: None,
            headers: Headers::new(),
            payload: payload.into(),
        })
    }

    /// Sets the key.
    pub fn key(mut self, key: Option<String>) -> Self {
        self.key = key;
        self
    }

    /// Sets the headers, leaving out the transport's own: [`MESSAGE_ID_HEADER`] and the names in
    /// `transport` (the broker's id header, the key header).
    pub fn headers<'a>(
        mut self,
        headers: impl IntoIterator<Item = (String, String)>,
        transport: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let transport: Vec<&str> = transport.into_iter().collect();
        self.headers = headers
            .into_iter()
            .filter(|(name, _)| {
                !name.eq_ignore_ascii_case(MESSAGE_ID_HEADER)
                    && !transport.iter().any(|t| name.eq_ignore_ascii_case(t))
            })
            .collect();
        self
    }

    /// The payload, parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("id", &self.id)
            .field("destination", &self.destination)
            .field("key", &self.key)
            .field("headers", &self.headers)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// A received message that cannot be an [`Incoming`]: it did not come through the outbox, or
/// was damaged on the way. A consumer usually dead-letters it on the broker's side.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IncomingError {
    /// The message carries no outbox message id.
    #[error(
        "a message from {destination:?} carries no outbox message id (header {MESSAGE_ID_HEADER:?} or the broker's own id): it was not published by an outbox relay"
    )]
    MissingId {
        /// Where it came from.
        destination: String,
    },
    /// The id is not a UUID.
    #[error(
        "a message from {destination:?} carries the message id {value:?}, which is not a UUID: {reason}"
    )]
    InvalidId {
        /// Where it came from.
        destination: String,
        /// The id as received (at most 64 characters of it).
        value: String,
        /// Why it does not parse.
        reason: String,
    },
    /// A header the broker carried is not text.
    #[error("a message from {destination:?} has a header {name:?} that is not UTF-8 text")]
    InvalidHeader {
        /// Where it came from.
        destination: String,
        /// The header's name.
        name: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_headers_are_left_out_in_any_case() {
        let id = MessageId::new().to_string();
        let incoming = Incoming::new(Some(&id), "t", "x")
            .expect("valid id")
            .headers(
                [
                    ("outbox-message-id".to_owned(), id.clone()),
                    ("Nats-Msg-Id".to_owned(), id.clone()),
                    ("type".to_owned(), "OrderPlaced".to_owned()),
                ],
                ["nats-msg-id"],
            );
        assert_eq!(incoming.headers.len(), 1);
        assert_eq!(incoming.headers["type"], "OrderPlaced");
    }

    #[test]
    fn bad_ids_say_where_the_message_came_from() {
        let err = Incoming::new(Some("not-a-uuid"), "orders", "x").expect_err("invalid");
        assert!(err.to_string().contains("\"orders\""), "{err}");
        assert!(err.to_string().contains("not-a-uuid"), "{err}");
        let err = Incoming::new(None, "orders", "x").expect_err("missing");
        assert!(matches!(err, IncomingError::MissingId { .. }));
    }

    #[test]
    fn json_payloads_parse() {
        let id = MessageId::new().to_string();
        let incoming = Incoming::new(Some(&id), "t", r#"{"n":7}"#).expect("valid");
        let value: serde_json::Value = incoming.json().expect("json");
        assert_eq!(value["n"], 7);
    }
}
