//! Claims held in a transaction ([`ClaimMode::Transaction`](crate::ClaimMode::Transaction)):
//! the open transactions of a store's claims, each under its claim's token until the settle
//! commits it or the lease ends.
//!
//! A claim's rows stay locked by its transaction while the batch is published; the settle
//! writes the outcomes in that transaction and commits. Nothing else fences: a transaction
//! that is rolled back (its relay died, its connection broke, or it outlived its lease) leaves
//! its rows as they were, pending, and a later settle under its token finds nothing to apply.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use outbox_core::{LeaseToken, MessageId, Settlement};
use sqlx::{Database, Transaction};

use crate::sql::RowParts;

/// The rows one claim holds: how the database addresses each message's row within the
/// transaction, and what later claims must pass over while it is held.
#[derive(Debug, Default)]
pub(crate) struct HeldRows {
    rows: HashMap<MessageId, String>,
    /// Keys of the claimed messages: their later messages wait for these.
    keys: Vec<String>,
    /// Sequence numbers of the claimed messages without a key.
    keyless: Vec<i64>,
}

impl HeldRows {
    /// The rows of claimed messages, each with its row address.
    pub(crate) fn new<'a>(parts: impl IntoIterator<Item = (&'a RowParts, String)>) -> Self {
        let mut held = Self::default();
        for (part, row) in parts {
            match part.key.as_ref().ok().and_then(Option::as_ref) {
                Some(key) => held.keys.push(key.clone()),
                None => held.keyless.push(part.seq),
            }
            held.rows.insert(part.id, row);
        }
        held.keys.sort_unstable();
        held.keys.dedup();
        held
    }

    /// The row of message `id`, when this claim holds it.
    pub(crate) fn row(&self, id: &MessageId) -> Option<String> {
        self.rows.get(id).cloned()
    }

    /// How many of the settlement's messages this claim holds.
    pub(crate) fn holds(&self, settlement: &Settlement) -> u64 {
        let ids = settlement
            .published
            .iter()
            .chain(settlement.retry.iter().map(|r| &r.id))
            .chain(settlement.dead.iter().map(|d| &d.id))
            .chain(&settlement.release);
        ids.filter(|id| self.rows.contains_key(id)).count() as u64
    }
}

/// One claim's open transaction.
pub(crate) struct HeldClaim<DB: Database> {
    /// The lease's end, on this process's clock; the database ends the transaction on its
    /// own a little later (its idle timeout counts from the claim's answer).
    pub(crate) until: Instant,
    pub(crate) tx: Transaction<'static, DB>,
    pub(crate) rows: HeldRows,
}

/// The claims a store holds open, by token.
pub(crate) struct Held<DB: Database> {
    claims: Mutex<HashMap<LeaseToken, HeldClaim<DB>>>,
}

impl<DB: Database> Default for Held<DB> {
    fn default() -> Self {
        Self {
            claims: Mutex::new(HashMap::new()),
        }
    }
}

impl<DB: Database> std::fmt::Debug for Held<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("claims", &self.lock().len())
            .finish()
    }
}

impl<DB: Database> Held<DB> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseToken, HeldClaim<DB>>> {
        // A panic while the map was locked cannot leave it half-changed: every use is one
        // insert, remove or read.
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The keys, and the keyless rows' sequence numbers, of every claim held: a new claim
    /// passes over them.
    pub(crate) fn in_flight(&self) -> (Vec<String>, Vec<i64>) {
        let claims = self.lock();
        let mut keys = Vec::new();
        let mut keyless = Vec::new();
        for claim in claims.values() {
            keys.extend(claim.rows.keys.iter().cloned());
            keyless.extend(&claim.rows.keyless);
        }
        (keys, keyless)
    }

    /// Keeps `claim` open under `token`.
    pub(crate) fn insert(&self, token: LeaseToken, claim: HeldClaim<DB>) {
        self.lock().insert(token, claim);
    }

    /// The claim held under `token`, if any, whether its lease ended or not.
    pub(crate) fn take(&self, token: &LeaseToken) -> Option<HeldClaim<DB>> {
        self.lock().remove(token)
    }

    /// Removes the claims whose lease ended (or every claim, with `all`), for the caller to
    /// roll back.
    fn expired(&self, all: bool) -> Vec<HeldClaim<DB>> {
        let now = Instant::now();
        let mut claims = self.lock();
        let ended: Vec<LeaseToken> = claims
            .iter()
            .filter(|(_, claim)| all || claim.until <= now)
            .map(|(token, _)| *token)
            .collect();
        ended
            .iter()
            .filter_map(|token| claims.remove(token))
            .collect()
    }

    /// Rolls back the claims whose lease ended (or all of them), so that their rows are free
    /// before the caller's next statement. A failed rollback leaves the connection to sqlx,
    /// which closes it; the database then rolls back on its own.
    pub(crate) async fn roll_back_expired(&self, all: bool) {
        for claim in self.expired(all) {
            if let Err(err) = claim.tx.rollback().await {
                tracing::debug!(error = %err, "rolling back an expired claim failed");
            }
        }
    }
}
