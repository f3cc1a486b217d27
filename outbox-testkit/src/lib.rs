//! Conformance suites for `outbox` stores and publishers, for this workspace's backends and for
//! third-party ones.
//!
//! A backend implements [`StoreHarness`] or [`PublisherHarness`] and expands the matching
//! macro in an integration test; every suite function becomes one `#[tokio::test]`.
//!
//! This crate is for implementers and tests: its API may change between minor versions.

pub mod env;
mod harness;
pub mod proxy;

pub use harness::{PublisherHarness, Received, StoreHarness};
