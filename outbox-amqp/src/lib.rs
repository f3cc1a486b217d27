#![doc = include_str!("../README.md")]

mod amqp;
mod config;
mod error;

pub use amqp::AmqpPublisher;
pub use config::{AmqpConfig, Routing, Unroutable};
pub use error::AmqpError;

/// The AMQP client this crate is built on.
pub use lapin;
