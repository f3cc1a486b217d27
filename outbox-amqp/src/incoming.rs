//! From a received AMQP delivery to an [`Incoming`], for consumers that deduplicate with an
//! inbox (see [`outbox_core::Incoming`] for the acknowledgement discipline: commit the
//! database transaction, then `basic_ack`).

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use outbox_core::{Headers, Incoming, IncomingError, MESSAGE_ID_HEADER};

/// The header an [`AmqpPublisher`](crate::AmqpPublisher) puts the key in by default
/// ([`AmqpConfig::key_header`](crate::AmqpConfig::key_header)).
pub const DEFAULT_KEY_HEADER: &str = "outbox-key";

/// The outbox message a delivery carries, with the key in the default key header: see
/// [`incoming_with_key_header`].
pub fn incoming(delivery: &Delivery) -> Result<Incoming, IncomingError> {
    incoming_with_key_header(delivery, Some(DEFAULT_KEY_HEADER))
}

/// The outbox message a delivery carries: its id from the `message_id` property (or the
/// [`MESSAGE_ID_HEADER`] header), its routing key as destination, the key from `key_header`,
/// the other headers and the body. A delivery without an id did not come through the outbox:
/// an error, as is a header that is not text.
pub fn incoming_with_key_header(
    delivery: &Delivery,
    key_header: Option<&str>,
) -> Result<Incoming, IncomingError> {
    let properties = &delivery.properties;
    let destination = delivery.routing_key.as_str().to_owned();
    let mut headers = Headers::new();
    if let Some(table) = properties.headers() {
        for (name, value) in table.inner() {
            let text = match value {
                AMQPValue::LongString(text) => String::from_utf8(text.as_bytes().to_vec()).ok(),
                AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
                _ => None,
            };
            let text = text.ok_or_else(|| IncomingError::InvalidHeader {
                destination: destination.clone(),
                name: name.as_str().to_owned(),
            })?;
            headers.insert(name.as_str().to_owned(), text);
        }
    }
    let id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .or_else(|| headers.get(MESSAGE_ID_HEADER).cloned());
    let key = key_header.and_then(|name| headers.get(name).cloned());
    Ok(
        Incoming::new(id.as_deref(), destination, delivery.data.clone())?
            .key(key)
            .headers(headers, key_header),
    )
}
