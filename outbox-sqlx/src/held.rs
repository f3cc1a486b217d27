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

/// One claim's open transaction.
pub(crate) struct HeldClaim<DB: Database> {
    /// The lease's end, on this process's clock; the database ends the transaction on its
    /// own a little later (its idle timeout counts from the claim's answer).
    pub(crate) until: Instant,
    pub(crate) tx: Transaction<'static, DB>,
    /// Each claimed message's row, as the database addresses it within the transaction.
    pub(crate) rows: HashMap<MessageId, String>,
}

impl<DB: Database> HeldClaim<DB> {
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
        // insert or remove.
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    pub(crate) fn expired(&self, all: bool) -> Vec<HeldClaim<DB>> {
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
