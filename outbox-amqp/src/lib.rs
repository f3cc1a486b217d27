#![doc = include_str!("../README.md")]

mod amqp;
mod config;
mod error;
mod incoming;

pub use amqp::AmqpPublisher;
pub use config::{AmqpConfig, Routing, Unroutable};
pub use error::AmqpError;
pub use incoming::{DEFAULT_KEY_HEADER, incoming, incoming_with_key_header};

/// The AMQP client this crate is built on.
pub use lapin;
