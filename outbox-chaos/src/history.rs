//! What the producers did and what the broker holds, and the verdict: every committed message
//! delivered at least once, no rolled-back message delivered, first deliveries of a key in the
//! order the relay promises, duplicates counted.
//!
//! The order promise, for two messages `a` and `b` of one key: **if `a`'s transaction had
//! committed (its `COMMIT` returned to the producer) before `b`'s INSERT was sent, `a`'s first
//! delivery precedes `b`'s.** Messages of transactions that overlap in time may arrive in
//! either order: the relay follows the enqueue sequence, assigned at the INSERT, and sees a row
//! only once its transaction committed, so neither commit order nor insert order holds for
//! overlapping transactions. When a key's transactions are serialized (its business row locked
//! first), each commits before the next inserts, and the order is the business row's version.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outbox_core::MessageId;

/// How a producer's transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `COMMIT` returned success: its messages must arrive.
    Committed,
    /// Rolled back on purpose: its messages must never arrive.
    RolledBack,
    /// Failed before `COMMIT` was sent (a killed connection, say): never committed.
    Aborted,
    /// `COMMIT` was sent but its answer was lost: either way is allowed, consistently.
    Indeterminate,
}

/// One message a producer enqueued.
#[derive(Clone, Debug)]
pub struct Written {
    /// Its id.
    pub id: MessageId,
    /// Its key, if any.
    pub key: Option<String>,
    /// The version of the key's business row the transaction wrote before enqueueing, when it
    /// locked the row first (serialized transactions): the key's enqueue order. `None` for
    /// transactions that enqueue without a lock, where the order is told by [`Written::inserted`]
    /// and the commit instants.
    pub version: Option<i64>,
    /// When the producer sent the INSERT that enqueued it (taken just before sending, on the
    /// harness's monotonic clock).
    pub inserted: Instant,
    /// The payload, to check it arrives unchanged.
    pub payload: Vec<u8>,
}

/// The order of first deliveries a relay promises for the messages of one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OrderPromise {
    /// The polling relay's: if `a`'s transaction had committed (its `COMMIT` returned) before
    /// `b`'s INSERT was sent, `a` arrives first. It follows the enqueue sequence, assigned at
    /// the INSERT, so that transactions that overlap may arrive in either order.
    #[default]
    CommitBeforeInsert,
    /// The log relay's: commit order. If `a`'s `COMMIT` had returned before `b`'s `COMMIT`
    /// was sent, `a` arrives first, whatever the order of their INSERTs. Checked on top of
    /// [`OrderPromise::CommitBeforeInsert`], which it implies.
    Commit,
}

/// One transaction of a producer.
#[derive(Clone, Debug)]
struct Transaction {
    outcome: Outcome,
    /// When its `COMMIT` was sent (taken just before), when it was.
    commit_sent: Option<Instant>,
    /// When its `COMMIT` returned (taken just after), for committed transactions.
    committed: Option<Instant>,
    written: Vec<Written>,
}

/// Everything the producers did, shared by the producer tasks.
#[derive(Debug, Default)]
pub struct History {
    transactions: Mutex<Vec<Transaction>>,
}

impl History {
    /// Records one transaction: how it ended, the instant its `COMMIT` returned (for a
    /// committed one; taken just after it returned) and what it enqueued.
    /// The instant its `COMMIT` was sent is not known: the commit-order check takes its last
    /// INSERT's instead, which came before (a bound that can only find fewer pairs ordered).
    pub fn record(&self, outcome: Outcome, committed: Option<Instant>, written: Vec<Written>) {
        self.record_commit(outcome, None, committed, written);
    }

    /// As [`History::record`], with the instant the producer sent its `COMMIT` (taken just
    /// before sending; `None` when it never sent one), for the commit-order promise.
    pub fn record_commit(
        &self,
        outcome: Outcome,
        commit_sent: Option<Instant>,
        committed: Option<Instant>,
        written: Vec<Written>,
    ) {
        self.transactions
            .lock()
            .expect("history")
            .push(Transaction {
                outcome,
                commit_sent,
                committed,
                written,
            });
    }

    /// The ids of committed messages (the ones that must arrive).
    pub fn committed_ids(&self) -> HashSet<MessageId> {
        self.transactions
            .lock()
            .expect("history")
            .iter()
            .filter(|tx| tx.outcome == Outcome::Committed)
            .flat_map(|tx| tx.written.iter().map(|w| w.id))
            .collect()
    }

    /// Counts of transactions and messages by outcome.
    pub fn counts(&self) -> BTreeMap<&'static str, (usize, usize)> {
        let mut counts = BTreeMap::new();
        for tx in self.transactions.lock().expect("history").iter() {
            let name = match tx.outcome {
                Outcome::Committed => "committed",
                Outcome::RolledBack => "rolled back",
                Outcome::Aborted => "aborted",
                Outcome::Indeterminate => "indeterminate",
            };
            let entry = counts.entry(name).or_insert((0, 0));
            entry.0 += 1;
            entry.1 += tx.written.len();
        }
        counts
    }

    /// Per key, the messages that committed: committed ones, and those of indeterminate
    /// transactions found in `found` (delivered, or still in the outbox: either way they
    /// committed).
    pub fn committed_per_key(&self, found: &HashSet<MessageId>) -> HashMap<String, i64> {
        let mut counts = HashMap::new();
        for tx in self.transactions.lock().expect("history").iter() {
            for w in &tx.written {
                let counted = match tx.outcome {
                    Outcome::Committed => true,
                    Outcome::Indeterminate => found.contains(&w.id),
                    Outcome::RolledBack | Outcome::Aborted => false,
                };
                if let (true, Some(key)) = (counted, &w.key) {
                    *counts.entry(key.clone()).or_insert(0) += 1;
                }
            }
        }
        counts
    }

    fn index(&self) -> HashMap<MessageId, Entry> {
        self.transactions
            .lock()
            .expect("history")
            .iter()
            .flat_map(|tx| {
                // No later than the COMMIT: its last INSERT, when the COMMIT's instant is
                // unknown.
                let last_insert = tx.written.iter().map(|w| w.inserted).max();
                let commit_sent = tx.commit_sent.or(last_insert);
                tx.written.iter().map(move |w| {
                    let entry = Entry {
                        outcome: tx.outcome,
                        commit_sent: commit_sent.unwrap_or(w.inserted),
                        committed: tx.committed,
                        written: w.clone(),
                    };
                    (w.id, entry)
                })
            })
            .collect()
    }
}

/// A message with its transaction's outcome.
struct Entry {
    outcome: Outcome,
    /// When its transaction's `COMMIT` was sent, or an instant before.
    commit_sent: Instant,
    committed: Option<Instant>,
    written: Written,
}

/// One message read back from the broker, in the order the broker delivered them (per key,
/// the broker's order: one stream, one queue, or one partition per key).
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The id the publisher forwarded.
    pub id: MessageId,
    /// The payload received.
    pub payload: Vec<u8>,
}

/// Two messages of one key whose first deliveries broke the order promise: `later` arrived
/// first although `earlier`'s transaction had committed before `later`'s INSERT was sent (or,
/// for the commit-order promise, before `later`'s `COMMIT` was sent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderViolation {
    /// The key.
    pub key: String,
    /// The message that had to arrive first.
    pub earlier: MessageId,
    /// The message that arrived before it.
    pub later: MessageId,
    /// How long before `later`'s INSERT (commit order: its `COMMIT`) was sent `earlier`'s
    /// `COMMIT` had returned.
    pub margin: Duration,
}

impl fmt::Display for OrderViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} arrived before {}, committed {:?} before its INSERT",
            self.key, self.later, self.earlier, self.margin
        )
    }
}

/// The checker's findings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verdict {
    /// Committed messages.
    pub committed: usize,
    /// Messages of transactions rolled back on purpose.
    pub rolled_back: usize,
    /// Messages of transactions that failed before their commit.
    pub aborted: usize,
    /// Messages of transactions whose commit had no answer.
    pub indeterminate: usize,
    /// Of those, how many arrived (hence committed).
    pub indeterminate_delivered: usize,
    /// Messages read from the broker, duplicates included.
    pub deliveries: usize,
    /// Deliveries of a message already delivered.
    pub duplicates: usize,
    /// Committed messages that never arrived and are no longer in the outbox.
    pub lost: Vec<MessageId>,
    /// Committed messages that had not arrived when the drain bound passed but are still
    /// pending in the outbox: late, not lost.
    pub still_pending: Vec<MessageId>,
    /// Rolled-back or aborted messages that arrived.
    pub phantoms: Vec<MessageId>,
    /// Messages nobody wrote.
    pub unknown: usize,
    /// First deliveries of a key with versions (serialized transactions) that came after a
    /// later message of that key: (key, version, version already delivered).
    pub out_of_order: Vec<(String, i64, i64)>,
    /// First deliveries that broke the order promise (any key): a message arrived before one
    /// whose transaction had committed before its INSERT was sent.
    pub out_of_causal_order: Vec<OrderViolation>,
    /// Under [`OrderPromise::Commit`] only, first deliveries out of commit order (any key): a
    /// message arrived before one whose transaction had committed before its own `COMMIT`
    /// was sent.
    pub out_of_commit_order: Vec<OrderViolation>,
    /// First deliveries that came after a message of the same key whose `COMMIT` returned
    /// later: allowed when the two transactions overlapped; shows that commit order is not
    /// what the relay keeps.
    pub after_later_commit: usize,
    /// First deliveries that came after a message of the same key whose INSERT was sent
    /// later: allowed when the two transactions overlapped; shows that insert order is not
    /// what the relay keeps either.
    pub after_later_insert: usize,
    /// Messages whose payload arrived changed.
    pub corrupted: usize,
}

impl Verdict {
    /// True when the guarantee held: nothing lost, nothing invented, key order kept, payloads
    /// unchanged. Duplicates are allowed (at least once).
    pub fn holds(&self) -> bool {
        self.lost.is_empty()
            && self.phantoms.is_empty()
            && self.unknown == 0
            && self.out_of_order.is_empty()
            && self.out_of_causal_order.is_empty()
            && self.out_of_commit_order.is_empty()
            && self.corrupted == 0
    }

    /// First deliveries out of order, summed over the checks (a pair may break several).
    pub fn out_of_order_total(&self) -> usize {
        self.out_of_order.len() + self.out_of_causal_order.len() + self.out_of_commit_order.len()
    }
}

/// A message's first delivery, for the order checks.
struct First {
    /// Its place among all deliveries.
    position: usize,
    id: MessageId,
    inserted: Instant,
    commit_sent: Instant,
    committed: Option<Instant>,
}

/// Checks `deliveries` (in broker order) against `history` under the polling relay's promise
/// ([`OrderPromise::CommitBeforeInsert`]); `pending` holds the ids still pending in the
/// outbox, so that late messages are told from lost ones.
pub fn check(history: &History, deliveries: &[Delivery], pending: &HashSet<MessageId>) -> Verdict {
    check_with(
        history,
        deliveries,
        pending,
        OrderPromise::CommitBeforeInsert,
    )
}

/// As [`check`], holding first deliveries to `promise`.
pub fn check_with(
    history: &History,
    deliveries: &[Delivery],
    pending: &HashSet<MessageId>,
    promise: OrderPromise,
) -> Verdict {
    let index = history.index();
    let mut verdict = Verdict::default();
    for entry in index.values() {
        match entry.outcome {
            Outcome::Committed => verdict.committed += 1,
            Outcome::RolledBack => verdict.rolled_back += 1,
            Outcome::Aborted => verdict.aborted += 1,
            Outcome::Indeterminate => verdict.indeterminate += 1,
        }
    }
    verdict.deliveries = deliveries.len();
    let mut seen: HashSet<MessageId> = HashSet::new();
    let mut last_version: HashMap<String, i64> = HashMap::new();
    let mut firsts: HashMap<String, Vec<First>> = HashMap::new();
    for (position, delivery) in deliveries.iter().enumerate() {
        let Some(entry) = index.get(&delivery.id) else {
            verdict.unknown += 1;
            continue;
        };
        let written = &entry.written;
        if delivery.payload != written.payload {
            verdict.corrupted += 1;
        }
        if !seen.insert(delivery.id) {
            verdict.duplicates += 1;
            continue;
        }
        match entry.outcome {
            Outcome::RolledBack | Outcome::Aborted => verdict.phantoms.push(delivery.id),
            Outcome::Indeterminate => verdict.indeterminate_delivered += 1,
            Outcome::Committed => {}
        }
        let Some(key) = &written.key else {
            continue;
        };
        if let Some(version) = written.version {
            let last = last_version.entry(key.clone()).or_insert(i64::MIN);
            if version < *last {
                verdict.out_of_order.push((key.clone(), version, *last));
            } else {
                *last = version;
            }
        }
        if matches!(entry.outcome, Outcome::Committed | Outcome::Indeterminate) {
            firsts.entry(key.clone()).or_default().push(First {
                position,
                id: delivery.id,
                inserted: written.inserted,
                commit_sent: entry.commit_sent,
                committed: entry.committed,
            });
        }
    }
    let mut keys: Vec<&String> = firsts.keys().collect();
    keys.sort();
    for key in keys {
        let firsts = &firsts[key];
        let violations = ordered_after_commits(key, firsts, |f| f.inserted);
        verdict.out_of_causal_order.extend(violations);
        if promise == OrderPromise::Commit {
            let violations = ordered_after_commits(key, firsts, |f| f.commit_sent);
            verdict.out_of_commit_order.extend(violations);
        }
        informative_counts(firsts, &mut verdict);
    }
    verdict.lost = index
        .iter()
        .filter(|(id, entry)| entry.outcome == Outcome::Committed && !seen.contains(id))
        .map(|(id, _)| *id)
        .collect();
    verdict.lost.sort();
    let (late, lost): (Vec<MessageId>, Vec<MessageId>) =
        verdict.lost.iter().partition(|id| pending.contains(id));
    verdict.lost = lost;
    verdict.still_pending = late;
    verdict
}

/// One order check of one key, over its first deliveries in delivery order: for each message
/// `b`, none of the messages whose `COMMIT` had returned before `start(b)` (its INSERT, or its
/// `COMMIT` being sent) may arrive after `b`.
///
/// In O(n log n): taking the messages in the order of `start`, and those whose `COMMIT` had
/// returned before each one's start (in commit order, a running prefix), the one of them
/// delivered last must have been delivered before it.
fn ordered_after_commits(
    key: &str,
    firsts: &[First],
    start: impl Fn(&First) -> Instant,
) -> Vec<OrderViolation> {
    let mut violations = Vec::new();
    let mut by_start: Vec<&First> = firsts.iter().collect();
    by_start.sort_by_key(|f| start(f));
    let mut by_commit: Vec<(&First, Instant)> = firsts
        .iter()
        .filter_map(|f| f.committed.map(|at| (f, at)))
        .collect();
    by_commit.sort_by_key(|(_, at)| *at);
    let mut before = by_commit.iter().peekable();
    // Of the messages committed before the current start, the one delivered last.
    let mut last: Option<(&First, Instant)> = None;
    for later in by_start {
        let begun = start(later);
        while let Some((earlier, at)) = before.next_if(|(_, at)| *at < begun) {
            if last.is_none_or(|(l, _)| l.position < earlier.position) {
                last = Some((earlier, *at));
            }
        }
        if let Some((earlier, at)) = last
            && earlier.position > later.position
        {
            violations.push(OrderViolation {
                key: key.to_owned(),
                earlier: earlier.id,
                later: later.id,
                margin: begun.saturating_duration_since(at),
            });
        }
    }
    violations
}

/// Informative only: how far delivery order is from commit order and from insert order.
fn informative_counts(firsts: &[First], verdict: &mut Verdict) {
    let mut latest_commit: Option<Instant> = None;
    let mut latest_insert: Option<Instant> = None;
    for first in firsts {
        if let Some(at) = first.committed {
            if latest_commit.is_some_and(|l| at < l) {
                verdict.after_later_commit += 1;
            }
            latest_commit = latest_commit.max(Some(at));
        }
        if latest_insert.is_some_and(|l| first.inserted < l) {
            verdict.after_later_insert += 1;
        }
        latest_insert = latest_insert.max(Some(first.inserted));
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "committed {}, rolled back {}, aborted {}, indeterminate {} ({} delivered), \
             deliveries {}, duplicates {}, lost {}, still pending {}, phantoms {}, unknown {}, \
             out of order {} (versions {}, commit before insert {}, commit order {}), \
             corrupted {}; allowed for overlapping transactions: after a later commit {}, \
             after a later insert {}",
            self.committed,
            self.rolled_back,
            self.aborted,
            self.indeterminate,
            self.indeterminate_delivered,
            self.deliveries,
            self.duplicates,
            self.lost.len(),
            self.still_pending.len(),
            self.phantoms.len(),
            self.unknown,
            self.out_of_order_total(),
            self.out_of_order.len(),
            self.out_of_causal_order.len(),
            self.out_of_commit_order.len(),
            self.corrupted,
            self.after_later_commit,
            self.after_later_insert
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(key: &str, version: i64) -> Written {
        Written {
            id: MessageId::new(),
            key: Some(key.to_owned()),
            version: Some(version),
            inserted: Instant::now(),
            payload: format!("{key}/{version}").into_bytes(),
        }
    }

    /// A message of a transaction that did not lock its key: its INSERT sent `inserted` ms
    /// after `t0`.
    fn unlocked(key: &str, t0: Instant, inserted: u64) -> Written {
        Written {
            id: MessageId::new(),
            key: Some(key.to_owned()),
            version: None,
            inserted: t0 + Duration::from_millis(inserted),
            payload: format!("{key}@{inserted}").into_bytes(),
        }
    }

    /// Records `w` as committed, its `COMMIT` returned `committed` ms after `t0`.
    fn commit(history: &History, w: &Written, t0: Instant, committed: u64) {
        history.record(
            Outcome::Committed,
            Some(t0 + Duration::from_millis(committed)),
            vec![w.clone()],
        );
    }

    fn delivered(w: &Written) -> Delivery {
        Delivery {
            id: w.id,
            payload: w.payload.clone(),
        }
    }

    #[test]
    fn a_clean_history_holds() {
        let history = History::default();
        let (a1, a2, b1) = (written("a", 1), written("a", 2), written("b", 1));
        let rolled = written("a", 3);
        history.record(
            Outcome::Committed,
            Some(Instant::now()),
            vec![a1.clone(), b1.clone()],
        );
        history.record(Outcome::Committed, Some(Instant::now()), vec![a2.clone()]);
        history.record(Outcome::RolledBack, None, vec![rolled]);
        let verdict = check(
            &history,
            &[
                delivered(&b1),
                delivered(&a1),
                delivered(&a1),
                delivered(&a2),
            ],
            &HashSet::new(),
        );
        assert!(verdict.holds(), "{verdict}");
        assert_eq!(verdict.duplicates, 1);
        assert_eq!(verdict.committed, 3);
    }

    #[test]
    fn late_messages_are_not_lost() {
        let history = History::default();
        let (a1, a2) = (written("a", 1), written("a", 2));
        history.record(Outcome::Committed, Some(Instant::now()), vec![a1.clone()]);
        history.record(Outcome::Committed, Some(Instant::now()), vec![a2.clone()]);
        let verdict = check(&history, &[delivered(&a1)], &HashSet::from([a2.id]));
        assert!(verdict.lost.is_empty());
        assert_eq!(verdict.still_pending, vec![a2.id]);
    }

    #[test]
    fn losses_phantoms_and_reordering_are_found() {
        let history = History::default();
        let (a1, a2, a3) = (written("a", 1), written("a", 2), written("a", 3));
        let rolled = written("b", 1);
        history.record(Outcome::Committed, Some(Instant::now()), vec![a1.clone()]);
        history.record(Outcome::Committed, Some(Instant::now()), vec![a2.clone()]);
        history.record(Outcome::Committed, Some(Instant::now()), vec![a3.clone()]);
        history.record(Outcome::RolledBack, None, vec![rolled.clone()]);
        let mut changed = delivered(&a1);
        changed.payload = b"other".to_vec();
        let verdict = check(
            &history,
            &[delivered(&a2), changed, delivered(&rolled)],
            &HashSet::new(),
        );
        assert!(!verdict.holds());
        assert_eq!(verdict.lost, vec![a3.id]);
        assert_eq!(verdict.phantoms, vec![rolled.id]);
        assert_eq!(verdict.out_of_order, vec![("a".to_owned(), 1, 2)]);
        assert_eq!(verdict.corrupted, 1);
    }

    #[test]
    fn a_message_delivered_before_one_committed_ahead_of_its_insert_is_out_of_order() {
        let t0 = Instant::now();
        let history = History::default();
        // a: INSERT at 0 ms, COMMIT returned at 10 ms; b: INSERT at 20 ms (after a's commit).
        let (a, b) = (unlocked("k", t0, 0), unlocked("k", t0, 20));
        commit(&history, &a, t0, 10);
        commit(&history, &b, t0, 30);
        let verdict = check(&history, &[delivered(&b), delivered(&a)], &HashSet::new());
        assert!(!verdict.holds(), "{verdict}");
        assert_eq!(
            verdict.out_of_causal_order,
            vec![OrderViolation {
                key: "k".to_owned(),
                earlier: a.id,
                later: b.id,
                margin: Duration::from_millis(10),
            }]
        );
        assert!(verdict.lost.is_empty() && verdict.out_of_order.is_empty());

        // The same pair in order holds; a duplicate of a after b changes nothing.
        let verdict = check(
            &history,
            &[delivered(&a), delivered(&b), delivered(&a)],
            &HashSet::new(),
        );
        assert!(verdict.holds(), "{verdict}");
        assert_eq!(verdict.duplicates, 1);
    }

    #[test]
    fn overlapping_transactions_may_arrive_in_either_order() {
        let t0 = Instant::now();
        let history = History::default();
        // a inserts first and commits last; b inserts and commits in between: they overlap.
        let (a, b) = (unlocked("k", t0, 0), unlocked("k", t0, 5));
        commit(&history, &a, t0, 20);
        commit(&history, &b, t0, 10);
        // Insert order (a, b): b arrives after a, which committed later.
        let verdict = check(&history, &[delivered(&a), delivered(&b)], &HashSet::new());
        assert!(verdict.holds(), "{verdict}");
        assert_eq!(
            (verdict.after_later_commit, verdict.after_later_insert),
            (1, 0)
        );
        // Commit order (b, a): a arrives after b, inserted later.
        let verdict = check(&history, &[delivered(&b), delivered(&a)], &HashSet::new());
        assert!(verdict.holds(), "{verdict}");
        assert_eq!(
            (verdict.after_later_commit, verdict.after_later_insert),
            (0, 1)
        );
    }

    /// Records `w` as committed, its `COMMIT` sent `sent` ms and returned `returned` ms after
    /// `t0`.
    fn commit_at(history: &History, w: &Written, t0: Instant, sent: u64, returned: u64) {
        history.record_commit(
            Outcome::Committed,
            Some(t0 + Duration::from_millis(sent)),
            Some(t0 + Duration::from_millis(returned)),
            vec![w.clone()],
        );
    }

    #[test]
    fn under_commit_order_a_later_insert_that_committed_first_must_arrive_first() {
        let t0 = Instant::now();
        let history = History::default();
        // a inserts first, b inserts then commits (sent 10, returned 12), a commits after b's
        // returned (sent 20, returned 22): b committed first, though their inserts overlap.
        let (a, b) = (unlocked("k", t0, 0), unlocked("k", t0, 5));
        commit_at(&history, &a, t0, 20, 22);
        commit_at(&history, &b, t0, 10, 12);
        let deliveries = [delivered(&a), delivered(&b)];
        // The polling relay's promise allows it (b's commit came after a's INSERT)...
        let verdict = check(&history, &deliveries, &HashSet::new());
        assert!(verdict.holds(), "{verdict}");
        // ...commit order does not.
        let verdict = check_with(&history, &deliveries, &HashSet::new(), OrderPromise::Commit);
        assert!(!verdict.holds(), "{verdict}");
        assert_eq!(
            verdict.out_of_commit_order,
            vec![OrderViolation {
                key: "k".to_owned(),
                earlier: b.id,
                later: a.id,
                margin: Duration::from_millis(8),
            }]
        );
        assert!(verdict.out_of_causal_order.is_empty());
        // In commit order it holds.
        let verdict = check_with(
            &history,
            &[delivered(&b), delivered(&a)],
            &HashSet::new(),
            OrderPromise::Commit,
        );
        assert!(verdict.holds(), "{verdict}");
    }

    #[test]
    fn under_commit_order_overlapping_commits_may_arrive_in_either_order() {
        let t0 = Instant::now();
        let history = History::default();
        // Each COMMIT is sent before the other's returned: either may have committed first.
        let (a, b) = (unlocked("k", t0, 0), unlocked("k", t0, 1));
        commit_at(&history, &a, t0, 10, 15);
        commit_at(&history, &b, t0, 11, 14);
        for deliveries in [
            [delivered(&a), delivered(&b)],
            [delivered(&b), delivered(&a)],
        ] {
            let verdict = check_with(&history, &deliveries, &HashSet::new(), OrderPromise::Commit);
            assert!(verdict.holds(), "{verdict}");
        }
        // Without the instant its COMMIT was sent, a transaction's last INSERT stands in for
        // it: an earlier instant, which finds no more pairs ordered.
        let (c, d) = (unlocked("j", t0, 0), unlocked("j", t0, 30));
        commit_at(&history, &c, t0, 20, 25);
        history.record(
            Outcome::Committed,
            Some(t0 + Duration::from_millis(40)),
            vec![d.clone()],
        );
        let verdict = check_with(
            &history,
            &[delivered(&d), delivered(&c)],
            &HashSet::new(),
            OrderPromise::Commit,
        );
        assert_eq!(verdict.out_of_commit_order.len(), 1, "{verdict}");
        assert_eq!(
            verdict.out_of_commit_order[0].margin,
            Duration::from_millis(5)
        );
    }

    #[test]
    fn the_latest_delivered_of_the_earlier_commits_is_the_one_compared() {
        let t0 = Instant::now();
        let history = History::default();
        // a and b both committed before c's INSERT; c arrives between them.
        let (a, b, c) = (
            unlocked("k", t0, 0),
            unlocked("k", t0, 1),
            unlocked("k", t0, 50),
        );
        commit(&history, &a, t0, 10);
        commit(&history, &b, t0, 40);
        commit(&history, &c, t0, 60);
        // Another key's messages, interleaved, have no say.
        let other = unlocked("other", t0, 100);
        commit(&history, &other, t0, 110);
        let verdict = check(
            &history,
            &[
                delivered(&other),
                delivered(&a),
                delivered(&c),
                delivered(&b),
            ],
            &HashSet::new(),
        );
        assert_eq!(verdict.out_of_causal_order.len(), 1, "{verdict}");
        let violation = &verdict.out_of_causal_order[0];
        assert_eq!((violation.earlier, violation.later), (b.id, c.id));
        assert_eq!(violation.margin, Duration::from_millis(10));
        // An indeterminate message that arrived is held to the promise too.
        let d = unlocked("k", t0, 70);
        history.record(Outcome::Indeterminate, None, vec![d.clone()]);
        let verdict = check(
            &history,
            &[
                delivered(&other),
                delivered(&d),
                delivered(&a),
                delivered(&b),
                delivered(&c),
            ],
            &HashSet::new(),
        );
        assert_eq!(verdict.out_of_causal_order.len(), 1, "{verdict}");
        assert_eq!(verdict.out_of_causal_order[0].later, d.id);
        assert_eq!(verdict.out_of_causal_order[0].earlier, c.id);
    }
}
