#![doc = include_str!("../README.md")]

mod admin;
mod config;
mod emitted;
mod error;
mod lsn;
mod outbox_log;
mod pgoutput;
mod source;

pub use admin::{CdcAdmin, SlotStatus};
pub use config::CdcConfig;
pub use error::CdcError;
pub use lsn::Lsn;
pub use outbox_log::PgOutboxLog;
pub use source::{LogBatch, PgLogSource};
