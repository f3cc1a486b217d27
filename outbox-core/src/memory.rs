//! [`MemoryStore`] and [`MemoryPublisher`]: complete in-process backends, for tests, examples
//! and services that need no durability across restarts. Both pass the whole testkit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::{
    Capabilities, Claim, DeadLetter, DeadLetterFilter, Enqueue, LeaseToken, Limits, Malformed,
    Message, MessageId, NewMessage, PublishError, PublishOutcome, Publisher, RelayId, RelayMember,
    Settled, Settlement, Stats, Store, StoreError,
};

#[derive(Clone, Debug)]
enum State {
    Pending,
    Dead(DateTime<Utc>),
    Published(DateTime<Utc>),
}

#[derive(Clone, Debug)]
struct Row {
    message: Message,
    partition: u16,
    state: State,
    available_at: DateTime<Utc>,
    lease: Option<(LeaseToken, DateTime<Utc>)>,
    malformed: Option<String>,
}

impl Row {
    fn leased(&self, now: DateTime<Utc>) -> bool {
        self.lease.is_some_and(|(_, until)| until > now)
    }
}

#[derive(Debug, Default)]
struct Tables {
    rows: BTreeMap<u64, Row>,
    seq_of: HashMap<MessageId, u64>,
    next_seq: u64,
    members: HashMap<RelayId, DateTime<Utc>>,
    partitions: HashMap<u16, (RelayId, DateTime<Utc>)>,
}

impl Tables {
    fn row_mut(&mut self, id: &MessageId) -> Option<&mut Row> {
        let seq = self.seq_of.get(id)?;
        self.rows.get_mut(seq)
    }

    fn remove(&mut self, id: &MessageId) {
        if let Some(seq) = self.seq_of.remove(id) {
            self.rows.remove(&seq);
        }
    }

    fn live_members(&self, now: DateTime<Utc>) -> Vec<RelayMember> {
        let mut members: Vec<RelayMember> = self
            .members
            .iter()
            .filter(|(_, expires)| **expires > now)
            .map(|(id, expires)| RelayMember {
                id: id.clone(),
                expires_at: *expires,
                partitions: Vec::new(),
            })
            .collect();
        for (partition, (owner, expires)) in &self.partitions {
            if *expires > now
                && let Some(member) = members.iter_mut().find(|m| &m.id == owner)
            {
                member.partitions.push(*partition);
            }
        }
        for member in &mut members {
            member.partitions.sort_unstable();
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
        members
    }

    fn dead(&self, filter: &DeadLetterFilter) -> Vec<DeadLetter> {
        let mut dead: Vec<DeadLetter> = self
            .rows
            .values()
            .filter_map(|row| match row.state {
                State::Dead(at) => Some(DeadLetter::new(row.message.clone(), at)),
                _ => None,
            })
            .filter(|dead| filter.matches(dead))
            .collect();
        dead.sort_by_key(|d| d.dead_at);
        if let Some(limit) = filter.limit {
            dead.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        }
        dead
    }
}

fn after(now: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// An outbox in memory, shared by its clones.
///
/// ```
/// use outbox_core::{MemoryStore, NewMessage};
///
/// let store = MemoryStore::new();
/// let mut tx = store.begin();
/// tx.enqueue(NewMessage::new("orders", "created"));
/// drop(tx); // rolled back: nothing was written
/// let mut tx = store.begin();
/// tx.enqueue(NewMessage::new("orders", "created"));
/// tx.commit();
/// assert_eq!(store.len(), 1);
/// ```
///
/// It orders messages as the SQL stores do: by a sequence number taken when the message is
/// enqueued, not when its transaction commits. A message enqueued in a transaction that commits
/// later than another one's is claimed first if both are committed by then, and after it if it
/// was not yet committed when the other was claimed.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    tables: Arc<Mutex<Tables>>,
    retention: Option<Duration>,
    limits: Limits,
    /// The store's clock minus the host's.
    skew: chrono::Duration,
}

impl MemoryStore {
    /// An empty store that forgets published messages at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps published messages for `retention` before [`Store::cleanup`] removes them.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// Uses other enqueue limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Runs the store's clock `skew` ahead of the host's (behind when negative), as a database
    /// server whose clock differs from the relay's host: creation times, leases and retry
    /// delays are all measured on it. For tests of figures that must not depend on the skew.
    pub fn with_clock_skew(mut self, skew: chrono::Duration) -> Self {
        self.skew = skew;
        self
    }

    /// Now, on the store's clock.
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.skew
    }

    /// Starts a transaction; its messages are stored on [`MemoryTransaction::commit`] and
    /// discarded if it is dropped.
    pub fn begin(&self) -> MemoryTransaction {
        MemoryTransaction {
            store: self.clone(),
            messages: Vec::new(),
        }
    }

    /// Messages in the store (pending, dead or retained).
    pub fn len(&self) -> usize {
        self.lock().rows.len()
    }

    /// True when the store holds no message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks a stored message as undecodable, as a corrupted database row would be. For tests of
    /// the relay's handling of bad rows.
    pub fn corrupt(&self, id: MessageId, error: impl Into<String>) {
        if let Some(row) = self.lock().row_mut(&id) {
            row.malformed = Some(error.into());
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock cannot leave the tables half-updated: every change
        // is made after all checks.
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next sequence number, taken at enqueue as a database sequence is.
    fn next_seq(&self) -> u64 {
        let mut tables = self.lock();
        let seq = tables.next_seq;
        tables.next_seq += 1;
        seq
    }

    fn insert(&self, messages: Vec<(u64, NewMessage)>) {
        let now = self.now();
        let mut tables = self.lock();
        for (seq, new) in messages {
            let partition = new.partition();
            let id = new.id();
            tables.seq_of.insert(id, seq);
            tables.rows.insert(
                seq,
                Row {
                    message: Message::new(new, now),
                    partition,
                    state: State::Pending,
                    available_at: now,
                    lease: None,
                    malformed: None,
                },
            );
        }
    }
}

/// A transaction of a [`MemoryStore`]: messages enqueued in it become visible on commit.
#[derive(Debug)]
#[must_use = "a transaction that is dropped rolls back"]
pub struct MemoryTransaction {
    store: MemoryStore,
    /// The messages with the sequence numbers they took at enqueue.
    messages: Vec<(u64, NewMessage)>,
}

impl MemoryTransaction {
    /// Adds a message, checked against the store's limits; returns its id. Its place in the
    /// outbox's order is taken now, as a database sequence would give it.
    pub fn enqueue(&mut self, message: NewMessage) -> Result<MessageId, StoreError> {
        message.validate(&self.store.limits)?;
        let id = message.id();
        self.messages.push((self.store.next_seq(), message));
        Ok(id)
    }

    /// Stores the messages.
    pub fn commit(self) {
        self.store.insert(self.messages);
    }

    /// Discards the messages (as dropping does).
    pub fn rollback(self) {}
}

impl Enqueue<&mut MemoryTransaction> for MemoryStore {
    async fn enqueue(
        &self,
        tx: &mut MemoryTransaction,
        message: NewMessage,
    ) -> Result<MessageId, StoreError> {
        tx.enqueue(message)
    }

    async fn enqueue_batch(
        &self,
        tx: &mut MemoryTransaction,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageId>, StoreError> {
        for message in &messages {
            message.validate(&self.limits)?;
        }
        messages.into_iter().map(|m| tx.enqueue(m)).collect()
    }
}

impl Store for MemoryStore {
    async fn claim(
        &self,
        relay: &RelayId,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = self.now();
        let token = LeaseToken::new();
        let until = after(now, lease);
        let mut tables = self.lock();
        let owned: HashSet<u16> = tables
            .partitions
            .iter()
            .filter(|(_, (owner, expires))| owner == relay && *expires > now)
            .map(|(p, _)| *p)
            .collect();
        let mut blocked: HashSet<String> = HashSet::new();
        let mut claim = Claim {
            token,
            messages: Vec::new(),
            malformed: Vec::new(),
        };
        for row in tables.rows.values_mut() {
            if claim.len() >= limit {
                break;
            }
            if !matches!(row.state, State::Pending) {
                continue;
            }
            let key = row.message.key.clone();
            if key.as_ref().is_some_and(|k| blocked.contains(k)) {
                continue;
            }
            if row.leased(now) || row.available_at > now {
                if let Some(key) = key {
                    blocked.insert(key);
                }
                continue;
            }
            if !owned.contains(&row.partition) {
                continue;
            }
            row.lease = Some((token, until));
            match &row.malformed {
                Some(error) => claim.malformed.push(Malformed {
                    id: row.message.id,
                    key,
                    error: error.clone(),
                }),
                None => claim.messages.push(row.message.clone()),
            }
        }
        Ok(claim)
    }

    async fn settle(
        &self,
        token: LeaseToken,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        let now = self.now();
        let mut tables = self.lock();
        let mut settled = Settled::default();
        let mut holds = |tables: &mut Tables, id: &MessageId| -> bool {
            let ok = tables.row_mut(id).is_some_and(|row| {
                matches!(row.state, State::Pending)
                    && row
                        .lease
                        .is_some_and(|(t, until)| t == token && until > now)
            });
            if ok {
                settled.applied += 1;
            } else {
                settled.fenced += 1;
            }
            ok
        };
        for id in &settlement.published {
            if holds(&mut tables, id) {
                match self.retention {
                    None => tables.remove(id),
                    Some(_) => {
                        if let Some(row) = tables.row_mut(id) {
                            row.state = State::Published(now);
                            row.lease = None;
                        }
                    }
                }
            }
        }
        for retry in &settlement.retry {
            if holds(&mut tables, &retry.id)
                && let Some(row) = tables.row_mut(&retry.id)
            {
                row.message.attempts = row.message.attempts.saturating_add(1);
                row.message.last_error = Some(retry.error.clone());
                row.available_at = after(now, retry.delay);
                row.lease = None;
            }
        }
        for dead in &settlement.dead {
            if holds(&mut tables, &dead.id)
                && let Some(row) = tables.row_mut(&dead.id)
            {
                row.message.attempts = row.message.attempts.saturating_add(1);
                row.message.last_error = Some(dead.error.clone());
                row.state = State::Dead(now);
                row.lease = None;
            }
        }
        for id in &settlement.release {
            if holds(&mut tables, id)
                && let Some(row) = tables.row_mut(id)
            {
                row.lease = None;
            }
        }
        Ok(settled)
    }

    async fn heartbeat(
        &self,
        relay: &RelayId,
        ttl: Duration,
    ) -> Result<Vec<RelayMember>, StoreError> {
        let now = self.now();
        let mut tables = self.lock();
        tables.members.insert(relay.clone(), after(now, ttl));
        tables.members.retain(|_, expires| *expires > now);
        Ok(tables.live_members(now))
    }

    async fn members(&self) -> Result<Vec<RelayMember>, StoreError> {
        Ok(self.lock().live_members(self.now()))
    }

    async fn acquire(
        &self,
        relay: &RelayId,
        partitions: &[u16],
        ttl: Duration,
    ) -> Result<Vec<u16>, StoreError> {
        let now = self.now();
        let until = after(now, ttl);
        let mut tables = self.lock();
        let mut owned = Vec::new();
        for partition in partitions {
            let free = tables
                .partitions
                .get(partition)
                .is_none_or(|(owner, expires)| owner == relay || *expires <= now);
            if free {
                tables.partitions.insert(*partition, (relay.clone(), until));
                owned.push(*partition);
            }
        }
        Ok(owned)
    }

    async fn release(&self, relay: &RelayId, partitions: &[u16]) -> Result<(), StoreError> {
        let mut tables = self.lock();
        tables
            .partitions
            .retain(|partition, (owner, _)| owner != relay || !partitions.contains(partition));
        Ok(())
    }

    async fn leave(&self, relay: &RelayId) -> Result<(), StoreError> {
        let mut tables = self.lock();
        tables.partitions.retain(|_, (owner, _)| owner != relay);
        tables.members.remove(relay);
        Ok(())
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        let tables = self.lock();
        let mut stats = Stats::default();
        for row in tables.rows.values() {
            match row.state {
                State::Pending => {
                    stats.pending += 1;
                    let created = row.message.created_at;
                    stats.oldest_pending =
                        Some(stats.oldest_pending.map_or(created, |t| t.min(created)));
                }
                State::Dead(_) => stats.dead += 1,
                State::Published(_) => stats.published_retained += 1,
            }
        }
        Ok(stats.as_of(self.now()))
    }

    async fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self.lock().dead(filter))
    }

    async fn replay(&self, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        let now = self.now();
        let mut tables = self.lock();
        let ids: Vec<MessageId> = tables
            .dead(filter)
            .into_iter()
            .map(|d| d.message.id)
            .collect();
        for id in &ids {
            if let Some(row) = tables.row_mut(id) {
                row.state = State::Pending;
                row.message.attempts = 0;
                row.available_at = now;
                row.lease = None;
            }
        }
        Ok(ids.len() as u64)
    }

    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        let mut tables = self.lock();
        let ids: Vec<MessageId> = tables
            .dead(filter)
            .into_iter()
            .map(|d| d.message.id)
            .collect();
        for id in &ids {
            tables.remove(id);
        }
        Ok(ids.len() as u64)
    }

    async fn cleanup(&self, limit: usize) -> Result<u64, StoreError> {
        let Some(retention) = self.retention else {
            return Ok(0);
        };
        let cutoff =
            self.now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let mut tables = self.lock();
        let expired: Vec<MessageId> = tables
            .rows
            .values()
            .filter(|row| matches!(row.state, State::Published(at) if at < cutoff))
            .take(limit)
            .map(|row| row.message.id)
            .collect();
        for id in &expired {
            tables.remove(id);
        }
        Ok(expired.len() as u64)
    }
}

/// A broker in memory: records every message it is given, in order, and confirms it at once.
/// Shared by its clones.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use outbox_core::MemoryPublisher;
///
/// let publisher = MemoryPublisher::new();
/// // Nothing was published, so waiting for a first message times out.
/// assert!(!publisher.wait_for(1, Duration::from_millis(10)).await);
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryPublisher {
    published: Arc<Mutex<Vec<Message>>>,
    changed: Arc<Notify>,
}

impl MemoryPublisher {
    /// A publisher that has published nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every message published so far, duplicates included, in publish order.
    pub fn published(&self) -> Vec<Message> {
        self.lock().clone()
    }

    /// Number of messages published so far, duplicates included.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Waits until at least `count` messages were published; false if `timeout` passed first.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.count() >= count {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.count() >= count;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Message>> {
        self.published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Publisher for MemoryPublisher {
    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        self.lock().extend(batch.iter().cloned());
        self.changed.notify_waiters();
        Ok(batch.iter().map(|_| PublishOutcome::Published).collect())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default().ordered_per_key(true)
    }
}
