#![doc = include_str!("../README.md")]

mod config;
mod dynamic;
mod error;
mod error_text;
mod inbox;
mod incoming;
mod jsonl;
mod log;
mod memory;
mod message;
pub mod metrics;
mod publisher;
mod relay;
mod retry;
mod store;
mod wakeup;

pub use config::RelayConfig;
pub use dynamic::{DynPublisher, DynStore};
pub use error::{ConfigError, PublishError, RelayError, Retryable, StoreError, StoreErrorKind};
pub use error_text::{MAX_ERROR_TEXT, sanitize as sanitize_error_text};
pub use inbox::{Inbox, MAX_CONSUMER_NAME, Processed, check_consumer};
pub use incoming::{Incoming, IncomingError};
pub use jsonl::JsonLinesPublisher;
pub use log::{Deferred, LogBatch, LogPosition, LogSource, LogTable};
pub use memory::{MemoryPublisher, MemoryStore, MemoryTransaction};
pub use message::{
    Headers, InvalidMessage, Limits, MESSAGE_ID_HEADER, Message, MessageId, NewMessage, PARTITIONS,
    decode_headers, encode_headers, partition_of,
};
pub use publisher::{Capabilities, PublishOutcome, Publisher};
pub use relay::{
    BatchReport, LogRelay, LogRelayBuilder, Pause, PauseCause, Relay, RelayBuilder, RelayHandle,
};
pub use retry::{Decision, RetryPolicy};
pub use store::{
    Claim, DeadLetter, DeadLetterFilter, DeadLetterTo, Enqueue, LeaseToken, Malformed, RelayId,
    RelayMember, Retry, Settled, Settlement, Stats, Store,
};
pub use wakeup::Wakeup;

pub use chrono;
pub use uuid;

/// The workspace README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct WorkspaceReadme;
