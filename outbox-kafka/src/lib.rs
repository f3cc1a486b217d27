#![doc = include_str!("../README.md")]

mod config;
mod error;
mod incoming;
mod kafka;

pub use config::KafkaConfig;
pub use error::{KafkaError, classify};
pub use incoming::incoming;
pub use kafka::KafkaPublisher;

/// The Kafka client this crate is built on, for matching versions and error codes.
pub use rdkafka;
