//! From a received NATS message to an [`Incoming`], for consumers that deduplicate with an
//! inbox (see [`outbox_core::Incoming`] for the acknowledgement discipline: commit the
//! database transaction, then `ack` the JetStream message).

use outbox_core::{Headers, Incoming, IncomingError, MESSAGE_ID_HEADER};

/// The header a [`NatsPublisher`](crate::NatsPublisher) puts the key in by default
/// ([`NatsConfig::key_header`](crate::NatsConfig::key_header)).
pub const DEFAULT_KEY_HEADER: &str = "Outbox-Key";

/// The header JetStream deduplicates on, which carries the message id too.
const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// The outbox message a NATS message carries (a JetStream `Message` dereferences to one), with
/// the key in the default key header: see [`incoming_with_key_header`].
pub fn incoming(message: &async_nats::Message) -> Result<Incoming, IncomingError> {
    incoming_with_key_header(message, Some(DEFAULT_KEY_HEADER))
}

/// The outbox message a NATS message carries: its id from the `Nats-Msg-Id` header (or the
/// [`MESSAGE_ID_HEADER`] header), its subject as destination, the key from `key_header`, the
/// other headers (the first value of each) and the payload. A message without an id did not
/// come through the outbox: an error.
pub fn incoming_with_key_header(
    message: &async_nats::Message,
    key_header: Option<&str>,
) -> Result<Incoming, IncomingError> {
    let mut headers = Headers::new();
    if let Some(map) = &message.headers {
        for (name, values) in map.iter() {
            if let Some(value) = values.first() {
                headers.insert(name.to_string(), value.as_str().to_owned());
            }
        }
    }
    let id = headers
        .get(NATS_MSG_ID)
        .or_else(|| headers.get(MESSAGE_ID_HEADER))
        .cloned();
    let key = key_header.and_then(|name| headers.get(name).cloned());
    let transport = [Some(NATS_MSG_ID), key_header];
    Ok(Incoming::new(
        id.as_deref(),
        message.subject.as_str(),
        message.payload.to_vec(),
    )?
    .key(key)
    .headers(headers, transport.into_iter().flatten()))
}
