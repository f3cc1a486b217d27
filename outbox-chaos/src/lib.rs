//! Jepsen-style checks of the outbox guarantee, against real servers and the real relay
//! program: producers commit (and roll back) business rows with their messages while several
//! relay processes publish them; relays are killed with SIGKILL and restarted, broker and
//! database connections are cut, refused or black-holed, the broker is kept away for far longer
//! than the relays' retry budget, and the broker and the database server are restarted; then a
//! checker reads everything back from the broker and verifies that every committed message
//! arrived at least once, that no rolled-back message did, and that the first deliveries of a
//! key keep the order the relay promises (see [`history`]; commit order for the log relay of
//! the `postgres-cdc-*` combinations). Duplicates are counted.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_chaos::{Combination, Options, Profile, run};
//!
//! let options = Options {
//!     relay_bin: "target/debug/chaos-relay".into(),
//!     profile: Profile::short(),
//!     seed: 42,
//! };
//! let report = run(Combination::PostgresNats, &options).await?;
//! println!("{report}");
//! assert!(report.passed());
//! # Ok(()) }
//! ```
//!
//! The tests (`tests/chaos.rs`) run the short profile of every combination; the
//! `outbox-chaos` binary runs any profile and prints the figures. See `docs/reliability.md`.

pub mod broker;
pub mod db;
pub mod history;
pub mod profile;
pub mod relays;
mod run;

pub use history::{
    Delivery, History, OrderPromise, OrderViolation, Outcome, Verdict, Written, check, check_with,
};
pub use profile::{Profile, seed_from_env};
pub use run::{
    Combination, Fault, Options, Report, Unavailable, long_outage_floor, retry_budget,
    retry_policy, run,
};
