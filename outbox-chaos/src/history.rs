//! What the producers did and what the broker holds, and the verdict: every committed message
//! delivered at least once, no rolled-back message delivered, first deliveries of a key in
//! enqueue order, duplicates counted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;

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
    /// The version of the key's business row the transaction wrote: the per-key enqueue order,
    /// serialized by the row lock.
    pub version: i64,
    /// The payload, to check it arrives unchanged.
    pub payload: Vec<u8>,
}

/// Everything the producers did, shared by the producer tasks.
#[derive(Debug, Default)]
pub struct History {
    transactions: Mutex<Vec<(Outcome, Vec<Written>)>>,
}

impl History {
    /// Records one transaction.
    pub fn record(&self, outcome: Outcome, written: Vec<Written>) {
        self.transactions
            .lock()
            .expect("history")
            .push((outcome, written));
    }

    /// The ids of committed messages (the ones that must arrive).
    pub fn committed_ids(&self) -> HashSet<MessageId> {
        self.transactions
            .lock()
            .expect("history")
            .iter()
            .filter(|(outcome, _)| *outcome == Outcome::Committed)
            .flat_map(|(_, written)| written.iter().map(|w| w.id))
            .collect()
    }

    /// Counts of transactions and messages by outcome.
    pub fn counts(&self) -> BTreeMap<&'static str, (usize, usize)> {
        let mut counts = BTreeMap::new();
        for (outcome, written) in self.transactions.lock().expect("history").iter() {
            let name = match outcome {
                Outcome::Committed => "committed",
                Outcome::RolledBack => "rolled back",
                Outcome::Aborted => "aborted",
                Outcome::Indeterminate => "indeterminate",
            };
            let entry = counts.entry(name).or_insert((0, 0));
            entry.0 += 1;
            entry.1 += written.len();
        }
        counts
    }

    /// Per key, the messages that committed: committed ones, and those of indeterminate
    /// transactions found in `delivered` (they can only have arrived if they committed).
    pub fn committed_per_key(&self, delivered: &HashSet<MessageId>) -> HashMap<String, i64> {
        let mut counts = HashMap::new();
        for (outcome, written) in self.transactions.lock().expect("history").iter() {
            for w in written {
                let counted = match outcome {
                    Outcome::Committed => true,
                    Outcome::Indeterminate => delivered.contains(&w.id),
                    Outcome::RolledBack | Outcome::Aborted => false,
                };
                if let (true, Some(key)) = (counted, &w.key) {
                    *counts.entry(key.clone()).or_insert(0) += 1;
                }
            }
        }
        counts
    }

    fn index(&self) -> HashMap<MessageId, (Outcome, Written)> {
        self.transactions
            .lock()
            .expect("history")
            .iter()
            .flat_map(|(outcome, written)| written.iter().map(|w| (w.id, (*outcome, w.clone()))))
            .collect()
    }
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
    /// First deliveries of a key that came after a later message of that key: (key, version,
    /// version already delivered).
    pub out_of_order: Vec<(String, i64, i64)>,
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
            && self.corrupted == 0
    }
}

/// Checks `deliveries` (in broker order) against `history`; `pending` holds the ids still
/// pending in the outbox, so that late messages are told from lost ones.
pub fn check(history: &History, deliveries: &[Delivery], pending: &HashSet<MessageId>) -> Verdict {
    let index = history.index();
    let mut verdict = Verdict::default();
    for (outcome, _) in index.values() {
        match outcome {
            Outcome::Committed => verdict.committed += 1,
            Outcome::RolledBack => verdict.rolled_back += 1,
            Outcome::Aborted => verdict.aborted += 1,
            Outcome::Indeterminate => verdict.indeterminate += 1,
        }
    }
    verdict.deliveries = deliveries.len();
    let mut seen: HashSet<MessageId> = HashSet::new();
    let mut last_version: HashMap<String, i64> = HashMap::new();
    for delivery in deliveries {
        let Some((outcome, written)) = index.get(&delivery.id) else {
            verdict.unknown += 1;
            continue;
        };
        if delivery.payload != written.payload {
            verdict.corrupted += 1;
        }
        if !seen.insert(delivery.id) {
            verdict.duplicates += 1;
            continue;
        }
        match outcome {
            Outcome::RolledBack | Outcome::Aborted => verdict.phantoms.push(delivery.id),
            Outcome::Indeterminate => verdict.indeterminate_delivered += 1,
            Outcome::Committed => {}
        }
        if let Some(key) = &written.key {
            let last = last_version.entry(key.clone()).or_insert(i64::MIN);
            if written.version < *last {
                verdict
                    .out_of_order
                    .push((key.clone(), written.version, *last));
            } else {
                *last = written.version;
            }
        }
    }
    verdict.lost = index
        .iter()
        .filter(|(id, (outcome, _))| *outcome == Outcome::Committed && !seen.contains(id))
        .map(|(id, _)| *id)
        .collect();
    verdict.lost.sort();
    let (late, lost): (Vec<MessageId>, Vec<MessageId>) =
        verdict.lost.iter().partition(|id| pending.contains(id));
    verdict.lost = lost;
    verdict.still_pending = late;
    verdict
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "committed {}, rolled back {}, aborted {}, indeterminate {} ({} delivered), \
             deliveries {}, duplicates {}, lost {}, still pending {}, phantoms {}, unknown {}, \
             out of order {}, corrupted {}",
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
            self.out_of_order.len(),
            self.corrupted
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
            version,
            payload: format!("{key}/{version}").into_bytes(),
        }
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
        history.record(Outcome::Committed, vec![a1.clone(), b1.clone()]);
        history.record(Outcome::Committed, vec![a2.clone()]);
        history.record(Outcome::RolledBack, vec![rolled]);
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
        history.record(Outcome::Committed, vec![a1.clone()]);
        history.record(Outcome::Committed, vec![a2.clone()]);
        let verdict = check(&history, &[delivered(&a1)], &HashSet::from([a2.id]));
        assert!(verdict.lost.is_empty());
        assert_eq!(verdict.still_pending, vec![a2.id]);
    }

    #[test]
    fn losses_phantoms_and_reordering_are_found() {
        let history = History::default();
        let (a1, a2, a3) = (written("a", 1), written("a", 2), written("a", 3));
        let rolled = written("b", 1);
        history.record(Outcome::Committed, vec![a1.clone()]);
        history.record(Outcome::Committed, vec![a2.clone()]);
        history.record(Outcome::Committed, vec![a3.clone()]);
        history.record(Outcome::RolledBack, vec![rolled.clone()]);
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
}
