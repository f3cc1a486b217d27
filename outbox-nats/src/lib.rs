#![doc = include_str!("../README.md")]

mod config;
mod error;
mod nats;

pub use async_nats;
pub use config::{NatsConfig, StreamSpec};
pub use error::NatsError;
pub use nats::NatsPublisher;
