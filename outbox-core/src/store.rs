//! The [`Store`] trait: the outbox table of one database, as the relay sees it.
//!
//! A store is mechanism only. The relay decides what to claim, when to retry, when to
//! dead-letter and who owns which partition; the store persists those decisions atomically and
//! enforces the leases and fencing that keep two relays from acting on the same message.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Message, MessageId, NewMessage, StoreError, Wakeup};

/// Identity of one running relay, unique per process start.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayId(String);

impl RelayId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(Uuid::now_v7().to_string())
    }

    /// A chosen id (for example `hostname-pid`); it must be unique among live relays.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RelayId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The fencing token of one claim. Every message of a [`Claim`] carries it until the claim is
/// settled or its lease expires; settling with a token that no longer matches changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseToken(Uuid);

impl LeaseToken {
    /// A fresh, never reused token.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps a token read back from storage.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID behind the token.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        Self::new()
    }
}

/// A stored row that could not be decoded into a [`Message`]. The relay dead-letters it with
/// `error` instead of failing the batch, so one corrupted row cannot stall the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    /// Id of the row.
    pub id: MessageId,
    /// Ordering key of the row, if it could be read.
    pub key: Option<String>,
    /// Why decoding failed.
    pub error: String,
}

/// The result of [`Store::claim`]: messages leased to one relay under one fencing token.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The fencing token every message below is leased under.
    pub token: LeaseToken,
    /// Claimed messages, in enqueue order.
    pub messages: Vec<Message>,
    /// Claimed rows that could not be decoded, leased under the same token.
    pub malformed: Vec<Malformed>,
}

impl Claim {
    /// True when nothing was claimed.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.malformed.is_empty()
    }

    /// Number of rows claimed.
    pub fn len(&self) -> usize {
        self.messages.len() + self.malformed.len()
    }
}

/// A message to try again later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// The message.
    pub id: MessageId,
    /// When to make it available again, from now on the store's clock.
    pub delay: Duration,
    /// The error that made this attempt fail.
    pub error: String,
}

/// A message to dead-letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterTo {
    /// The message.
    pub id: MessageId,
    /// Why it is dead-lettered.
    pub error: String,
}

/// The outcomes of one claim, applied by [`Store::settle`] in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Confirmed by the broker: delete, or keep with `published_at` for the store's retention.
    pub published: Vec<MessageId>,
    /// Failed transiently: attempts + 1, last error kept, available again after the delay.
    pub retry: Vec<Retry>,
    /// Failed for good: attempts + 1, last error kept, never claimed again unless replayed.
    pub dead: Vec<DeadLetterTo>,
    /// Not attempted (shutdown, or an earlier message of the same key failed): available again
    /// at once, attempts unchanged.
    pub release: Vec<MessageId>,
}

impl Settlement {
    /// True when there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.published.is_empty()
            && self.retry.is_empty()
            && self.dead.is_empty()
            && self.release.is_empty()
    }

    /// Number of messages this settlement speaks of.
    pub fn len(&self) -> usize {
        self.published.len() + self.retry.len() + self.dead.len() + self.release.len()
    }
}

/// What [`Store::settle`] applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Rows changed.
    pub applied: u64,
    /// Rows left alone because the lease had expired or the token no longer matched (another
    /// relay may hold them now).
    pub fenced: u64,
}

/// A live relay and the partitions it owns, as [`Store::heartbeat`] reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayMember {
    /// The relay.
    pub id: RelayId,
    /// When its membership expires unless renewed.
    pub expires_at: DateTime<Utc>,
    /// Partitions it owns under an unexpired lease.
    pub partitions: Vec<u16>,
}

/// Figures about the outbox, for gauges and the `status` command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Messages waiting to be published (including those waiting for a retry or leased).
    pub pending: u64,
    /// Creation time of the oldest pending message, on the store's clock.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// Dead letters.
    pub dead: u64,
    /// Published messages kept for the retention period.
    pub published_retained: u64,
    /// The store's clock when these figures were read. Ages are measured on it
    /// ([`Stats::oldest_pending_age`]), and the relay reads the offset of its own clock from
    /// it, so that no figure is off by the skew between the relay's host and the database.
    pub as_of: Option<DateTime<Utc>>,
}

impl Stats {
    /// Builds stats; for stores.
    pub fn new(
        pending: u64,
        oldest_pending: Option<DateTime<Utc>>,
        dead: u64,
        published_retained: u64,
    ) -> Self {
        Self {
            pending,
            oldest_pending,
            dead,
            published_retained,
            as_of: None,
        }
    }

    /// Sets [`Stats::as_of`], the store's clock when the figures were read; for stores.
    pub fn as_of(mut self, now: DateTime<Utc>) -> Self {
        self.as_of = Some(now);
        self
    }

    /// How long the oldest pending message has waited, on the store's clock: `None` without a
    /// pending message, or when the store did not say what time it was.
    ///
    /// ```
    /// use chrono::{TimeZone, Utc};
    /// use outbox_core::Stats;
    ///
    /// let created = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
    /// let stats = Stats::new(1, Some(created), 0, 0).as_of(created + chrono::Duration::seconds(90));
    /// assert_eq!(stats.oldest_pending_age(), Some(std::time::Duration::from_secs(90)));
    /// ```
    pub fn oldest_pending_age(&self) -> Option<Duration> {
        let age = self.as_of? - self.oldest_pending?;
        Some(age.to_std().unwrap_or(Duration::ZERO))
    }
}

/// A dead-lettered message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The message as stored (`last_error` says why it died).
    pub message: Message,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
}

impl DeadLetter {
    /// Builds a dead letter; for stores.
    pub fn new(message: Message, dead_at: DateTime<Utc>) -> Self {
        Self { message, dead_at }
    }
}

/// Which dead letters to list, replay or purge. Empty fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterFilter {
    /// Only these ids.
    pub ids: Vec<MessageId>,
    /// Only this destination.
    pub destination: Option<String>,
    /// Only this key.
    pub key: Option<String>,
    /// Only those dead-lettered before this instant.
    pub dead_before: Option<DateTime<Utc>>,
    /// At most this many (the oldest first).
    pub limit: Option<u64>,
}

impl DeadLetterFilter {
    /// Matches every dead letter.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only these ids.
    pub fn ids(mut self, ids: impl IntoIterator<Item = MessageId>) -> Self {
        self.ids = ids.into_iter().collect();
        self
    }

    /// Only this destination.
    pub fn destination(mut self, destination: impl Into<String>) -> Self {
        self.destination = Some(destination.into());
        self
    }

    /// Only this key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Only those dead-lettered before `instant`.
    pub fn dead_before(mut self, instant: DateTime<Utc>) -> Self {
        self.dead_before = Some(instant);
        self
    }

    /// At most `limit` of them, the oldest first.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Whether `dead` matches this filter (limit aside); stores may use it, and the in-memory
    /// store does.
    pub fn matches(&self, dead: &DeadLetter) -> bool {
        (self.ids.is_empty() || self.ids.contains(&dead.message.id))
            && self
                .destination
                .as_deref()
                .is_none_or(|d| d == dead.message.destination)
            && self
                .key
                .as_deref()
                .is_none_or(|k| dead.message.key.as_deref() == Some(k))
            && self.dead_before.is_none_or(|t| dead.dead_at < t)
    }
}

/// The outbox table of one database.
///
/// # Three roles
///
/// The methods serve three roles; a backend implements all of them, since the relay uses all of
/// them, but they matter differently:
///
/// | role | methods | what rests on it | checked by |
/// | --- | --- | --- | --- |
/// | **claims** | [`claim`](Store::claim), [`settle`](Store::settle), [`listen`](Store::listen) | the guarantee: at least once, per-key order, fencing | the store suite's claim and settle checks, and the whole relay suite |
/// | **membership** | [`heartbeat`](Store::heartbeat), [`members`](Store::members), [`acquire`](Store::acquire), [`release`](Store::release), [`leave`](Store::leave) | several relays sharing the work: one owner per partition | `partitions_have_one_owner_at_a_time`, `heartbeats_track_live_relays`, `relays_share_the_work` |
/// | **operations** | [`stats`](Store::stats), [`dead_letters`](Store::dead_letters), [`replay`](Store::replay), [`purge`](Store::purge), [`cleanup`](Store::cleanup) | what operators see and do, retention | `stats_count_the_backlog`, `dead_letters_are_listed_replayed_and_purged`, `published_messages_are_done` |
///
/// They stay one trait: every store implements all three, the relay needs all three, and
/// splitting them would make every caller of, say, [`stats`](Store::stats) import a trait of
/// its own, for no bound that any code needs narrower than `Store`.
///
/// # Contract
///
/// Every implementation must pass the `outbox-testkit` store suite. In short:
///
/// - **Enqueue** happens in the caller's transaction through [`Enqueue`]; a message is visible
///   to [`claim`](Store::claim) only once that transaction commits.
/// - **Partitions.** Each message belongs to partition [`NewMessage::partition`]. A relay claims
///   only from partitions it owns under an unexpired partition lease
///   ([`acquire`](Store::acquire)); at most one relay owns a partition at a time.
/// - **Claim** leases up to `limit` messages to `relay` under a fresh [`LeaseToken`] for `lease`,
///   in enqueue order, skipping messages that are dead, leased under an unexpired lease, or not
///   yet available, and **every message that has an earlier message of the same key that is
///   leased or waiting for a retry** (per-key order). Concurrent claims never return the same
///   message.
/// - **Settle** applies a [`Settlement`] in one transaction, only to messages still leased under
///   `token` with an unexpired lease (fencing): a relay whose lease expired changes nothing.
/// - **How a lease is kept is the store's choice**: written on the rows and committed, or a
///   transaction that holds the rows locked from the claim to the settle, which then writes
///   the outcomes in it and commits (a store may hold a connection per claim meanwhile). So
///   every claim must be settled (the relay settles each one, with `release` for what it did
///   not publish); a claim never settled holds its messages until its lease ends.
/// - Time (lease expiry, retry delays, partition leases) is measured on the store's clock, so
///   relays on hosts with skewed clocks agree.
/// - **Cancellation.** The relay drops a call that has not answered within
///   [`RelayConfig::store_timeout`](crate::RelayConfig::store_timeout). A dropped call must
///   leave nothing behind but what a completed or failed call could have: no lock held, no
///   connection left in a half-read state for the next call.
pub trait Store: Send + Sync + 'static {
    /// Leases up to `limit` available messages of the partitions `relay` owns, for `lease`.
    fn claim(
        &self,
        relay: &RelayId,
        limit: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Applies the outcomes of a claim, fenced by its token.
    fn settle(
        &self,
        token: LeaseToken,
        settlement: &Settlement,
    ) -> impl Future<Output = Result<Settled, StoreError>> + Send;

    /// Registers or renews `relay` as live for `ttl`, forgets relays whose membership expired,
    /// and returns the live relays with the partitions each owns.
    fn heartbeat(
        &self,
        relay: &RelayId,
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<RelayMember>, StoreError>> + Send;

    /// Lists the live relays with the partitions each owns, without registering anyone (for
    /// `status` commands). Stores that cannot list them keep the default, which says so.
    fn members(&self) -> impl Future<Output = Result<Vec<RelayMember>, StoreError>> + Send {
        async {
            Err(StoreError::new(
                crate::StoreErrorKind::Config,
                "this store cannot list the live relays",
            ))
        }
    }

    /// Takes or renews the lease of each partition in `partitions` that is free, expired or
    /// already owned by `relay`, for `ttl`; returns the partitions `relay` owns afterwards among
    /// those asked for.
    fn acquire(
        &self,
        relay: &RelayId,
        partitions: &[u16],
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<u16>, StoreError>> + Send;

    /// Gives up the partitions in `partitions` that `relay` owns.
    fn release(
        &self,
        relay: &RelayId,
        partitions: &[u16],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Ends the membership of `relay` and gives up all its partitions.
    fn leave(&self, relay: &RelayId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Counts pending messages and dead letters, and says what time it is on the store's
    /// clock ([`Stats::as_of`]).
    fn stats(&self) -> impl Future<Output = Result<Stats, StoreError>> + Send;

    /// The most calls this store can serve at once, when it is bounded (the size of its
    /// connection pool); `None` (the default) when it is not. The relay refuses to start with
    /// more store calls in flight than this, since the extra ones would wait for a connection
    /// and time out.
    fn max_connections(&self) -> Option<usize> {
        None
    }

    /// Lists dead letters matching `filter`, the oldest first.
    fn dead_letters(
        &self,
        filter: &DeadLetterFilter,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, StoreError>> + Send;

    /// Makes the matching dead letters pending again (attempts reset, available at once, same
    /// id and key); returns how many.
    fn replay(
        &self,
        filter: &DeadLetterFilter,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Deletes the matching dead letters for good; returns how many.
    fn purge(
        &self,
        filter: &DeadLetterFilter,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Deletes at most `limit` published messages kept longer than the store's retention;
    /// returns how many. A store that deletes on publish returns 0.
    fn cleanup(&self, limit: usize) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Runs until cancelled, calling [`Wakeup::wake`] whenever new messages may have been
    /// committed (for example on a PostgreSQL `NOTIFY`). Stores without notifications keep the
    /// default, which waits for ever: the relay then polls.
    fn listen(&self, wakeup: Wakeup) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = wakeup;
        std::future::pending()
    }
}

/// Enqueue inside the caller's transaction, on the backend's own transaction type `Tx`
/// (for example `&mut sqlx::PgConnection`, obtained with `&mut *tx`).
///
/// The message becomes visible to the relay when, and only when, that transaction commits.
pub trait Enqueue<Tx>: Send + Sync {
    /// Writes one message in `tx`; returns its id.
    fn enqueue(
        &self,
        tx: Tx,
        message: NewMessage,
    ) -> impl Future<Output = Result<MessageId, StoreError>> + Send;

    /// Writes many messages in `tx` in one statement where the database allows; returns their
    /// ids in order. Messages of one key keep the order of `messages`.
    fn enqueue_batch(
        &self,
        tx: Tx,
        messages: Vec<NewMessage>,
    ) -> impl Future<Output = Result<Vec<MessageId>, StoreError>> + Send;
}
