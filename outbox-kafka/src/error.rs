//! Errors of this crate, and how producer failures are classified for the relay.

use outbox_core::{PublishError, Retryable};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};

/// Why a [`KafkaPublisher`](crate::KafkaPublisher) could not be created or connected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    /// The configuration is invalid.
    #[error("invalid Kafka publisher configuration: {field}: {reason}")]
    Config {
        /// The setting at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// librdkafka refused the configuration or could not create the producer.
    #[error("cannot create the Kafka producer: {0}")]
    Client(#[source] RdKafkaError),
    /// [`KafkaPublisher::connect`](crate::KafkaPublisher::connect) found the cluster
    /// unreachable, or a configured topic missing.
    #[error("Kafka cluster not ready: {0}")]
    Unavailable(#[source] outbox_core::PublishError),
}

impl KafkaError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Config {
            field,
            reason: reason.into(),
        }
    }
}

/// Whether a producer error can pass.
///
/// Permanent: the message itself or its topic is at fault, and sending it again would fail the
/// same way: message too large, invalid or unknown topic or partition (librdkafka reports an
/// unknown topic only after `topic.metadata.propagation.max.ms`), authorization refused, a
/// record or timestamp the broker refuses, a configuration the broker refuses.
///
/// Transient: everything else, notably timeouts, transport failures, a full local queue, not
/// enough in-sync replicas, leader changes, fatal producer errors (the publisher replaces its
/// producer) and failed authentication (credentials can be fixed without touching messages).
/// An unknown error is transient: the relay retries it (and counts an attempt only while the
/// broker confirms other messages), while a wrong permanent verdict would dead-letter messages
/// that could have been delivered.
pub fn classify(err: &RdKafkaError) -> Retryable {
    match err.rdkafka_error_code() {
        Some(code) if is_permanent(code) => Retryable::Permanent,
        _ => Retryable::Transient,
    }
}

fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidTopic
            | C::UnknownTopic
            | C::UnknownPartition
            | C::UnknownTopicOrPartition
            | C::UnknownTopicId
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidRecord
            | C::InvalidTimestamp
            | C::InvalidRequiredAcks
            | C::UnsupportedForMessageFormat
            | C::UnsupportedCompressionType
            | C::PolicyViolation
            | C::InvalidConfig
            | C::InvalidArgument
            | C::BadMessage
    )
}

/// A [`PublishError`] for a producer failure on `topic`, classified by [`classify`].
pub(crate) fn publish_error(err: RdKafkaError, topic: &str) -> PublishError {
    let text = format!("topic {topic:?}: {err}");
    let publish = match classify(&err) {
        Retryable::Permanent => PublishError::permanent(text),
        _ => PublishError::transient(text),
    };
    publish.with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce(code: RDKafkaErrorCode) -> Retryable {
        classify(&RdKafkaError::MessageProduction(code))
    }

    #[test]
    fn message_and_topic_faults_are_permanent() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidTopic,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::UnknownPartition,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
        ] {
            assert_eq!(produce(code), Retryable::Permanent, "{code:?}");
        }
    }

    #[test]
    fn passing_conditions_are_transient() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::NotEnoughReplicasAfterAppend,
            RDKafkaErrorCode::LeaderNotAvailable,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::NetworkException,
            RDKafkaErrorCode::PurgeQueue,
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::Authentication,
        ] {
            assert_eq!(produce(code), Retryable::Transient, "{code:?}");
        }
        assert_eq!(classify(&RdKafkaError::Canceled), Retryable::Transient);
    }

    #[test]
    fn publish_errors_name_the_topic_and_keep_the_cause() {
        let err = publish_error(
            RdKafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            "orders",
        );
        assert!(!err.is_transient());
        let text = err.to_chain_string();
        assert!(text.contains("\"orders\""), "{text}");
        assert!(text.to_lowercase().contains("too large"), "{text}");
    }
}
