#![doc = include_str!("../README.md")]

mod config;
mod error;
mod incoming;
mod nats;

pub use async_nats;
pub use config::{NatsConfig, StreamSpec};
pub use error::NatsError;
pub use incoming::{DEFAULT_KEY_HEADER, incoming, incoming_with_key_header};
pub use nats::NatsPublisher;
