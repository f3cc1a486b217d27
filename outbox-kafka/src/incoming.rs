//! From a received Kafka record to an [`Incoming`], for consumers that deduplicate with an
//! inbox (see [`outbox_core::Incoming`] for the acknowledgement discipline: commit the
//! database transaction, then commit the offset).

use outbox_core::{Headers, Incoming, IncomingError, MESSAGE_ID_HEADER};
use rdkafka::message::{Headers as _, Message};

/// The outbox message a record carries: its id from the [`MESSAGE_ID_HEADER`] header, the
/// topic as destination, the record key as key, the other headers and the value.
///
/// Works on any received record (`BorrowedMessage` from a `StreamConsumer` or `BaseConsumer`,
/// or an `OwnedMessage`). A record without the id header did not come through the outbox: an
/// error, as is a key or a header that is not UTF-8 text.
pub fn incoming<M: Message>(record: &M) -> Result<Incoming, IncomingError> {
    let destination = record.topic().to_owned();
    let mut headers = Headers::new();
    let mut id = None;
    if let Some(kafka) = record.headers() {
        for header in kafka.iter() {
            let value = header.value.unwrap_or_default();
            let value =
                String::from_utf8(value.to_vec()).map_err(|_| IncomingError::InvalidHeader {
                    destination: destination.clone(),
                    name: header.key.to_owned(),
                })?;
            if header.key == MESSAGE_ID_HEADER {
                id = Some(value);
            } else {
                headers.insert(header.key.to_owned(), value);
            }
        }
    }
    let key = record
        .key()
        .map(|key| {
            String::from_utf8(key.to_vec()).map_err(|_| IncomingError::InvalidHeader {
                destination: destination.clone(),
                name: String::from("(the record key)"),
            })
        })
        .transpose()?;
    let payload = record.payload().unwrap_or_default().to_vec();
    Ok(Incoming::new(id.as_deref(), destination, payload)?
        .key(key)
        .headers(headers, []))
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_core::MessageId;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    fn record(headers: OwnedHeaders, key: Option<&[u8]>) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            key.map(<[u8]>::to_vec),
            "orders".to_owned(),
            Timestamp::NotAvailable,
            0,
            0,
            Some(headers),
        )
    }

    #[test]
    fn a_record_of_the_outbox_becomes_an_incoming_message() {
        let id = MessageId::new();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: MESSAGE_ID_HEADER,
                value: Some(&id.to_string()),
            })
            .insert(Header {
                key: "type",
                value: Some("OrderPlaced"),
            });
        let incoming = incoming(&record(headers, Some(b"order-1"))).expect("incoming");
        assert_eq!(incoming.id, id);
        assert_eq!(incoming.destination, "orders");
        assert_eq!(incoming.key.as_deref(), Some("order-1"));
        assert_eq!(incoming.headers.len(), 1);
        assert_eq!(incoming.payload, b"{}");
    }

    #[test]
    fn records_from_elsewhere_are_refused_with_a_reason() {
        let missing = incoming(&record(OwnedHeaders::new(), None)).expect_err("no id");
        assert!(matches!(missing, IncomingError::MissingId { .. }));
        let bad = OwnedHeaders::new().insert(Header {
            key: MESSAGE_ID_HEADER,
            value: Some(&[0xff_u8, 0xfe][..]),
        });
        let err = incoming(&record(bad, None)).expect_err("not text");
        assert!(matches!(err, IncomingError::InvalidHeader { .. }), "{err}");
    }
}
