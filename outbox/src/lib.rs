#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub use outbox_core::*;

/// The traits to have in scope to call stores and publishers: `use outbox::prelude::*;`.
pub mod prelude {
    pub use outbox_core::{Enqueue, Inbox, Publisher, Store};
}

/// The SQL stores and their configuration (features `postgres`, `mysql`, `sqlite`), and the
/// `sqlx` they are built on, so that pools and transactions come from the same version.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub mod sql {
    pub use outbox_sqlx::*;
}

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub use outbox_sqlx::{DEFAULT_INBOX_TABLE, SqlxMigrations, StoreConfig, sqlx};

#[cfg(feature = "postgres")]
pub use outbox_sqlx::{PostgresInbox, PostgresStore};

#[cfg(feature = "mysql")]
pub use outbox_sqlx::{MySqlInbox, MySqlStore};

#[cfg(feature = "sqlite")]
pub use outbox_sqlx::{SqliteInbox, SqliteStore};

/// The Kafka publisher (feature `kafka`), and `rdkafka`.
#[cfg(feature = "kafka")]
pub mod kafka {
    pub use outbox_kafka::*;
}

#[cfg(feature = "kafka")]
pub use outbox_kafka::{KafkaConfig, KafkaError, KafkaPublisher};

/// The AMQP publisher (feature `amqp`), and `lapin`.
#[cfg(feature = "amqp")]
pub mod amqp {
    pub use outbox_amqp::*;
}

#[cfg(feature = "amqp")]
pub use outbox_amqp::{AmqpConfig, AmqpError, AmqpPublisher};

/// The NATS JetStream publisher (feature `nats`), and `async_nats`.
#[cfg(feature = "nats")]
pub mod nats {
    pub use outbox_nats::*;
}

#[cfg(feature = "nats")]
pub use outbox_nats::{NatsConfig, NatsError, NatsPublisher};
