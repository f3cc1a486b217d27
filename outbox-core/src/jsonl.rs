//! [`JsonLinesPublisher`]: one JSON object per line, to stdout or any writer.

use std::pin::Pin;

use base64::Engine as _;
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::{Capabilities, Headers, Message, MessageId, PublishError, PublishOutcome, Publisher};

type Writer = Pin<Box<dyn AsyncWrite + Send + Sync>>;

/// Writes each message as one line of JSON and counts it published once the line is flushed.
/// For the quickstart, for debugging, and for piping an outbox into other tools.
///
/// Each line holds `id`, `destination`, `key`, `headers`, `created_at`, `attempts` and the
/// payload: as `payload` (a JSON value) when it is JSON, as `payload_text` when it is other
/// UTF-8 text, else as `payload_base64`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_core::{JsonLinesPublisher, Message, NewMessage, Publisher};
///
/// let (publisher, mut output) = JsonLinesPublisher::pipe();
/// let msg = Message::new(NewMessage::new("orders", br#"{"id":1}"#.to_vec()).key("o-1"), chrono::Utc::now());
/// publisher.publish(&[msg]).await?;
/// let line = output.next_line().await?.expect("one line");
/// assert!(line.contains(r#""payload":{"id":1}"#));
/// # Ok(()) }
/// ```
pub struct JsonLinesPublisher {
    out: Mutex<Writer>,
}

impl std::fmt::Debug for JsonLinesPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonLinesPublisher").finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Line<'a> {
    id: MessageId,
    destination: &'a str,
    key: Option<&'a str>,
    headers: &'a Headers,
    created_at: chrono::DateTime<chrono::Utc>,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

impl JsonLinesPublisher {
    /// Writes to standard output.
    pub fn stdout() -> Self {
        Self::new(tokio::io::stdout())
    }

    /// Writes to `writer`.
    pub fn new(writer: impl AsyncWrite + Send + Sync + 'static) -> Self {
        Self {
            out: Mutex::new(Box::pin(writer)),
        }
    }

    /// A publisher and the lines it writes, read through an in-memory pipe (for tests).
    pub fn pipe() -> (
        Self,
        tokio::io::Lines<tokio::io::BufReader<tokio::io::DuplexStream>>,
    ) {
        use tokio::io::AsyncBufReadExt;
        let (write, read) = tokio::io::duplex(1 << 20);
        (Self::new(write), tokio::io::BufReader::new(read).lines())
    }

    fn line(msg: &Message) -> Vec<u8> {
        let json = serde_json::from_slice::<serde_json::Value>(&msg.payload).ok();
        let text = if json.is_none() {
            std::str::from_utf8(&msg.payload).ok()
        } else {
            None
        };
        let base64 = (json.is_none() && text.is_none())
            .then(|| base64::engine::general_purpose::STANDARD.encode(&msg.payload));
        let line = Line {
            id: msg.id,
            destination: &msg.destination,
            key: msg.key.as_deref(),
            headers: &msg.headers,
            created_at: msg.created_at,
            attempts: msg.attempts,
            payload: json,
            payload_text: text,
            payload_base64: base64,
        };
        // Serializing strings, maps of strings and JSON values cannot fail.
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}

impl Publisher for JsonLinesPublisher {
    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        let mut buf = Vec::with_capacity(batch.len() * 256);
        for msg in batch {
            buf.extend_from_slice(&Self::line(msg));
        }
        let mut out = self.out.lock().await;
        let written = async {
            out.write_all(&buf).await?;
            out.flush().await
        };
        written.await.map_err(|err| {
            PublishError::transient("could not write JSON lines").with_source(err)
        })?;
        Ok(batch.iter().map(|_| PublishOutcome::Published).collect())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default().ordered_per_key(true)
    }

    async fn flush(&self) -> Result<(), PublishError> {
        let mut out = self.out.lock().await;
        out.flush()
            .await
            .map_err(|err| PublishError::transient("could not flush JSON lines").with_source(err))
    }
}
