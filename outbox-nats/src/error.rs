//! Errors of the NATS publisher, and how JetStream failures are classified.

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{PublishError as JsPublishError, PublishErrorKind};
use outbox_core::PublishError;

/// A failure of the NATS publisher outside the outcome of one message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The configuration is invalid.
    #[error("invalid NATS publisher configuration: {field}: {reason}")]
    Config {
        /// The setting at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The client could not be set up.
    #[error("NATS client for {url} could not be set up: {source}")]
    Client {
        /// The server URLs, secrets hidden.
        url: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The client is not connected (the server is unreachable; the client keeps reconnecting).
    #[error("not connected to NATS at {url} ({state})")]
    NotConnected {
        /// The server URLs, secrets hidden.
        url: String,
        /// The client's connection state.
        state: String,
    },
    /// A JetStream request (stream lookup or creation, account info) failed.
    #[error("JetStream {operation} failed: {reason}")]
    JetStream {
        /// What was asked.
        operation: &'static str,
        /// Why it failed.
        reason: String,
        /// Whether trying again may help.
        transient: bool,
    },
}

impl NatsError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        NatsError::Config {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn jetstream(
        operation: &'static str,
        err: &(dyn std::error::Error + 'static),
        transient: bool,
    ) -> Self {
        NatsError::JetStream {
            operation,
            reason: chain(err),
            transient,
        }
    }

    /// True when the failure may pass.
    pub fn is_transient(&self) -> bool {
        match self {
            NatsError::Config { .. } => false,
            NatsError::Client { .. } | NatsError::NotConnected { .. } => true,
            NatsError::JetStream { transient, .. } => *transient,
        }
    }
}

impl From<NatsError> for PublishError {
    /// Whole-call failures are transient unless the configuration is invalid: a permanent
    /// whole-call failure would dead-letter every message of the batch for a problem that is
    /// not theirs.
    fn from(err: NatsError) -> Self {
        match &err {
            NatsError::Config { .. } => {
                PublishError::permanent("NATS publisher misconfigured").with_source(err)
            }
            _ => PublishError::transient("NATS unavailable").with_source(err),
        }
    }
}

/// Formats an error and its sources on one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(source) = next {
        let part = source.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = source.source();
    }
    text
}

/// What a failed JetStream publish means for its message.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No stream listens on the subject ("no responders"): resolved by a stream lookup.
    NoStream,
    /// The connection is gone or the server does not answer: the rest of the call would fail
    /// the same way.
    Lost(PublishError),
    /// A failure of this message only.
    Message(PublishError),
}

/// JetStream API error codes that a retry cannot fix for this message.
const PERMANENT_CODES: [ErrorCode; 3] = [
    ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM,
    ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM,
    ErrorCode::STREAM_SEALED,
];

/// Classifies a failed publish (at send or at ack).
pub(crate) fn classify(err: JsPublishError) -> Failure {
    match err.kind() {
        PublishErrorKind::StreamNotFound => Failure::NoStream,
        PublishErrorKind::MaxPayloadExceeded => Failure::Message(
            PublishError::permanent("message larger than the server's max_payload")
                .with_source(err),
        ),
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
            Failure::Lost(PublishError::transient("no JetStream publish ack").with_source(err))
        }
        PublishErrorKind::Other => {
            let code = std::error::Error::source(&err)
                .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
                .map(async_nats::jetstream::Error::error_code);
            match code {
                Some(code) if PERMANENT_CODES.contains(&code) => Failure::Message(
                    PublishError::permanent("the stream refused the message").with_source(err),
                ),
                Some(_) => Failure::Message(
                    PublishError::transient("the stream refused the message").with_source(err),
                ),
                None => {
                    Failure::Message(PublishError::transient("publish failed").with_source(err))
                }
            }
        }
        // Expected-sequence and expected-id checks are never requested; a retry cannot
        // change their outcome.
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            Failure::Message(PublishError::permanent("publish refused").with_source(err))
        }
        _ => Failure::Message(PublishError::transient("publish failed").with_source(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_and_missing_streams_are_told_apart() {
        assert!(matches!(
            classify(JsPublishError::new(PublishErrorKind::TimedOut)),
            Failure::Lost(err) if err.is_transient()
        ));
        assert!(matches!(
            classify(JsPublishError::new(PublishErrorKind::StreamNotFound)),
            Failure::NoStream
        ));
        assert!(matches!(
            classify(JsPublishError::new(PublishErrorKind::MaxPayloadExceeded)),
            Failure::Message(err) if !err.is_transient()
        ));
        assert!(matches!(
            classify(JsPublishError::new(PublishErrorKind::MaxAckPending)),
            Failure::Message(err) if err.is_transient()
        ));
    }

    #[test]
    fn whole_call_failures_are_transient_unless_misconfigured() {
        let err = NatsError::NotConnected {
            url: "nats://h".into(),
            state: "disconnected".into(),
        };
        assert!(PublishError::from(err).is_transient());
        assert!(!PublishError::from(NatsError::config("url", "bad")).is_transient());
    }
}
