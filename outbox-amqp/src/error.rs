//! Errors of the AMQP publisher, and how broker failures are classified.

use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use outbox_core::PublishError;

/// A failure of the AMQP publisher outside the outcome of one message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// The configuration is invalid.
    #[error("invalid AMQP publisher configuration: {field}: {reason}")]
    Config {
        /// The setting at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The broker could not be reached, refused the connection, or the connection broke.
    #[error("AMQP connection to {uri} failed: {source}")]
    Connect {
        /// The broker URI, password hidden.
        uri: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// The connection was not established in time.
    #[error("AMQP connection to {uri} not established within {timeout:?}")]
    ConnectTimeout {
        /// The broker URI, password hidden.
        uri: String,
        /// The configured limit.
        timeout: Duration,
    },
    /// A connection attempt made while this call waited its turn just failed.
    #[error("AMQP broker at {uri} unavailable: {reason}")]
    Unavailable {
        /// The broker URI, password hidden.
        uri: String,
        /// Why the last connection attempt failed.
        reason: String,
    },
    /// A channel operation failed.
    #[error("AMQP {operation} failed: {source}")]
    Channel {
        /// What was attempted.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker did not answer in time.
    #[error("AMQP {operation} not answered within {timeout:?}")]
    Timeout {
        /// What was asked.
        operation: &'static str,
        /// The configured limit.
        timeout: Duration,
    },
    /// The broker blocked the connection (a memory or disk alarm): publishing would stall.
    #[error("the broker blocked the connection (resource alarm)")]
    Blocked,
}

impl AmqpError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        AmqpError::Config {
            field,
            reason: reason.into(),
        }
    }

    /// True when the failure may pass: everything but an invalid configuration.
    pub fn is_transient(&self) -> bool {
        !matches!(self, AmqpError::Config { .. })
    }
}

impl From<AmqpError> for PublishError {
    /// Whole-call failures. Connection failures (unreachable broker, refused credentials, lost
    /// connection) are transient: treating them as permanent would dead-letter every message
    /// of the batch for a problem that is not theirs.
    fn from(err: AmqpError) -> Self {
        let text = match &err {
            AmqpError::Config { .. } => "AMQP publisher misconfigured",
            AmqpError::Connect { .. }
            | AmqpError::ConnectTimeout { .. }
            | AmqpError::Unavailable { .. } => "AMQP broker unreachable",
            AmqpError::Channel { .. } | AmqpError::Timeout { .. } => "AMQP channel failed",
            AmqpError::Blocked => "AMQP connection blocked by the broker",
        };
        if err.is_transient() {
            PublishError::transient(text).with_source(err)
        } else {
            PublishError::permanent(text).with_source(err)
        }
    }
}

/// What a channel-level error from the broker says about the messages being published.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `NOT_FOUND - no exchange 'x' ...`: the exchange is missing.
    MissingExchange(String),
    /// `ACCESS_REFUSED - access to exchange 'x' ...`: no write permission on the exchange.
    AccessRefused(String),
    /// `PRECONDITION_FAILED - message size N is larger than configured max size M`.
    TooLarge(usize),
    /// Anything else.
    Other,
}

/// Reads a channel error sent by the broker (RabbitMQ's wording) to learn which exchange or
/// size limit caused it, so that the next attempt fails only the messages at fault.
pub(crate) fn refusal(err: &lapin::Error) -> Refusal {
    let lapin::ErrorKind::ProtocolError(amqp) = err.kind() else {
        return Refusal::Other;
    };
    let text = amqp.get_message().as_str();
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => quoted_after(text, "exchange '")
            .map(Refusal::MissingExchange)
            .unwrap_or(Refusal::Other),
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => quoted_after(text, "exchange '")
            .map(Refusal::AccessRefused)
            .unwrap_or(Refusal::Other),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => max_size(text)
            .map(Refusal::TooLarge)
            .unwrap_or(Refusal::Other),
        _ => Refusal::Other,
    }
}

fn quoted_after(text: &str, marker: &str) -> Option<String> {
    let start = text.find(marker)? + marker.len();
    let len = text[start..].find('\'')?;
    Some(text[start..start + len].to_owned())
}

fn max_size(text: &str) -> Option<usize> {
    let marker = "configured max size ";
    let start = text.find(marker)? + marker.len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError as Amqp;

    fn soft(kind: AMQPSoftError, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(Amqp::new(AMQPErrorKind::Soft(kind), text.into())).into()
    }

    #[test]
    fn broker_refusals_name_their_cause() {
        assert_eq!(
            refusal(&soft(
                AMQPSoftError::NOTFOUND,
                "NOT_FOUND - no exchange 'orders' in vhost '/'"
            )),
            Refusal::MissingExchange("orders".into())
        );
        assert_eq!(
            refusal(&soft(
                AMQPSoftError::ACCESSREFUSED,
                "ACCESS_REFUSED - access to exchange 'audit' in vhost '/' refused for user 'app'"
            )),
            Refusal::AccessRefused("audit".into())
        );
        assert_eq!(
            refusal(&soft(
                AMQPSoftError::PRECONDITIONFAILED,
                "PRECONDITION_FAILED - message size 2000000 is larger than configured max size 1048576"
            )),
            Refusal::TooLarge(1_048_576)
        );
        assert_eq!(
            refusal(&soft(
                AMQPSoftError::PRECONDITIONFAILED,
                "PRECONDITION_FAILED - unknown delivery tag 3"
            )),
            Refusal::Other
        );
    }

    #[test]
    fn connection_failures_are_transient_for_the_whole_call() {
        let err = AmqpError::ConnectTimeout {
            uri: "amqp://h".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(PublishError::from(err).is_transient());
        assert!(!PublishError::from(AmqpError::config("uri", "bad")).is_transient());
    }
}
