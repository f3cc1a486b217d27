//! Messages written without a row: `pg_logical_emit_message(true, prefix, content)` in the
//! writer's transaction, `content` a JSON envelope. Such a message is in the log only when the
//! transaction commits, as an inserted row is; the outbox table gets a row only if the message
//! fails (its retry, or its dead letter).
//!
//! The envelope, a JSON object:
//!
//! | field | type | meaning |
//! | --- | --- | --- |
//! | `destination` | string, required | topic, subject or queue |
//! | `key` | string | ordering key |
//! | `payload` | string | the payload as UTF-8 text |
//! | `payload_base64` | string | the payload as base64 (whitespace ignored, so PostgreSQL's `encode(bytes, 'base64')` serves); at most one of the two, none for an empty payload |
//! | `headers` | object of strings | headers |
//! | `id` | string (UUID) | the message id; when missing, one is derived from the message's position in the log, the same whenever it is read again |

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use outbox_core::{Malformed, Message, MessageId, NewMessage};
use serde::Deserialize;
use uuid::Uuid;

use crate::Lsn;

/// Destination of the dead letter of an envelope that cannot be read.
pub(crate) const UNDECODABLE: &str = "undecodable";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    id: Option<Uuid>,
    destination: String,
    key: Option<String>,
    payload: Option<String>,
    payload_base64: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// The id of a message emitted without one: derived from where it is in the log, so that it
/// is the same whenever the log is read again.
pub(crate) fn derived_id(lsn: Lsn) -> MessageId {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(b"outboxlg");
    bytes[8..].copy_from_slice(&lsn.as_u64().to_be_bytes());
    MessageId::from_uuid(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// The message of an emitted envelope at `lsn`, committed at `committed_at`; an envelope that
/// cannot be read is [`Malformed`], under its id when it has a readable one.
pub(crate) fn decode(
    lsn: Lsn,
    content: &[u8],
    committed_at: DateTime<Utc>,
) -> Result<Message, Malformed> {
    let envelope: Envelope = match serde_json::from_slice(content) {
        Ok(envelope) => envelope,
        Err(err) => {
            // Its id and key, if those still read.
            let partial: serde_json::Value =
                serde_json::from_slice(content).unwrap_or(serde_json::Value::Null);
            let id = partial
                .get("id")
                .and_then(serde_json::Value::as_str)
                .and_then(|id| Uuid::parse_str(id).ok())
                .map_or_else(|| derived_id(lsn), MessageId::from_uuid);
            let key = partial
                .get("key")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned);
            return Err(Malformed {
                id,
                key,
                error: format!("the emitted envelope is not one: {err}"),
            });
        }
    };
    let id = envelope
        .id
        .map_or_else(|| derived_id(lsn), MessageId::from_uuid);
    let malformed = |error: String| Malformed {
        id,
        key: envelope.key.clone(),
        error,
    };
    if envelope.destination.is_empty() {
        return Err(malformed(
            "the emitted envelope's destination is empty".into(),
        ));
    }
    let payload = match (&envelope.payload, &envelope.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(malformed(
                "the emitted envelope has both payload and payload_base64".into(),
            ));
        }
        (Some(text), None) => text.clone().into_bytes(),
        (None, Some(encoded)) => {
            let compact: String = encoded.split_whitespace().collect();
            base64::engine::general_purpose::STANDARD
                .decode(compact)
                .map_err(|err| malformed(format!("payload_base64 is not base64: {err}")))?
        }
        (None, None) => Vec::new(),
    };
    let mut new = NewMessage::new(envelope.destination.clone(), payload).with_id(id);
    if let Some(key) = &envelope.key {
        new = new.key(key.clone());
    }
    for (name, value) in &envelope.headers {
        new = new.header(name.clone(), value.clone());
    }
    Ok(Message::new(new, committed_at))
}

/// The dead letter of an emitted envelope that cannot be read: its content as the payload.
pub(crate) fn undecodable(malformed: &Malformed, content: &[u8], at: DateTime<Utc>) -> Message {
    let mut new = NewMessage::new(UNDECODABLE, content.to_vec()).with_id(malformed.id);
    if let Some(key) = &malformed.key {
        new = new.key(key.clone());
    }
    Message::new(new, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
    }

    #[test]
    fn envelopes_decode_with_text_or_base64_payloads() {
        let id = Uuid::now_v7();
        let text = format!(
            r#"{{"id": "{id}", "destination": "orders", "key": "o-1", "payload": "hé", "headers": {{"a": "b"}}}}"#
        );
        let msg = decode(Lsn::from_u64(7), text.as_bytes(), at()).expect("decodes");
        assert_eq!(msg.id, MessageId::from_uuid(id));
        assert_eq!(msg.destination, "orders");
        assert_eq!(msg.key.as_deref(), Some("o-1"));
        assert_eq!(msg.payload, "hé".as_bytes());
        assert_eq!(msg.headers.get("a").map(String::as_str), Some("b"));
        assert_eq!(msg.created_at, at());
        // PostgreSQL's encode(..., 'base64') breaks lines every 76 characters.
        let encoded = r#"{"destination": "d", "payload_base64": "AAEC\n/w=="}"#;
        let msg = decode(Lsn::from_u64(9), encoded.as_bytes(), at()).expect("decodes");
        assert_eq!(msg.payload, vec![0, 1, 2, 255]);
        assert_eq!(
            msg.id,
            derived_id(Lsn::from_u64(9)),
            "the same id every time"
        );
        assert_ne!(derived_id(Lsn::from_u64(9)), derived_id(Lsn::from_u64(10)));
    }

    #[test]
    fn bad_envelopes_are_malformed_under_their_id() {
        let id = Uuid::now_v7();
        let both = format!(
            r#"{{"id": "{id}", "destination": "d", "key": "k", "payload": "x", "payload_base64": "eA=="}}"#
        );
        let bad = decode(Lsn::from_u64(1), both.as_bytes(), at()).expect_err("refused");
        assert_eq!(bad.id, MessageId::from_uuid(id));
        assert_eq!(bad.key.as_deref(), Some("k"));
        let unknown = format!(r#"{{"id": "{id}", "destination": "d", "topic": "x"}}"#);
        let bad = decode(Lsn::from_u64(1), unknown.as_bytes(), at()).expect_err("refused");
        assert_eq!(bad.id, MessageId::from_uuid(id));
        assert!(bad.error.contains("topic"), "{}", bad.error);
        let bad = decode(Lsn::from_u64(3), b"not json", at()).expect_err("refused");
        assert_eq!(bad.id, derived_id(Lsn::from_u64(3)));
        let empty = decode(Lsn::from_u64(4), br#"{"destination": ""}"#, at()).expect_err("refused");
        assert!(empty.error.contains("destination"));
        let dead = undecodable(&bad, b"not json", at());
        assert_eq!(dead.destination, UNDECODABLE);
        assert_eq!(dead.payload, b"not json");
    }
}
