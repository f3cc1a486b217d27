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

use crate::sql::{RowParts, run_script};

/// The rows one claim holds, how the database addresses each within the transaction, and
/// what later claims must pass over while it is held.
#[derive(Debug, Default)]
pub(crate) struct HeldRows {
    /// Sequence numbers by message: a settle finds its rows by primary key, never by a scan
    /// that would wait for the rows other claims hold.
    seqs: HashMap<MessageId, i64>,
    /// Row addresses by message (PostgreSQL's `ctid`); empty where a settle finds rows by
    /// sequence number (MySQL).
    rows: HashMap<MessageId, String>,
    /// Keys of the claimed messages: their later messages wait for these.
    keys: Vec<String>,
    /// Sequence numbers of the claimed messages without a key.
    keyless: Vec<i64>,
}

impl HeldRows {
    /// The rows of claimed messages, each with its row address if it has one.
    pub(crate) fn new<'a>(parts: impl IntoIterator<Item = (&'a RowParts, Option<String>)>) -> Self {
        let mut held = Self::default();
        for (part, row) in parts {
            match part.key.as_ref().ok().and_then(Option::as_ref) {
                Some(key) => held.keys.push(key.clone()),
                None => held.keyless.push(part.seq),
            }
            held.seqs.insert(part.id, part.seq);
            if let Some(row) = row {
                held.rows.insert(part.id, row);
            }
        }
        held.keys.sort_unstable();
        held.keys.dedup();
        held
    }

    /// The row of message `id`, when this claim holds it.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn row(&self, id: &MessageId) -> Option<String> {
        self.rows.get(id).cloned()
    }

    /// Whether this claim holds message `id`.
    pub(crate) fn contains(&self, id: &MessageId) -> bool {
        self.seqs.contains_key(id)
    }

    /// The sequence number of message `id`, when this claim holds it.
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    pub(crate) fn seq(&self, id: &MessageId) -> Option<i64> {
        self.seqs.get(id).copied()
    }

    /// How many of the settlement's messages this claim holds.
    pub(crate) fn holds(&self, settlement: &Settlement) -> u64 {
        let ids = settlement
            .published
            .iter()
            .chain(settlement.retry.iter().map(|r| &r.id))
            .chain(settlement.dead.iter().map(|d| &d.id))
            .chain(&settlement.release);
        ids.filter(|id| self.contains(id)).count() as u64
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
    /// Run in a claim's transaction before it ends ([`Dialect::end_held`]).
    ///
    /// [`Dialect::end_held`]: crate::sql::Dialect::end_held
    end: Option<&'static str>,
}

impl<DB: Database> std::fmt::Debug for Held<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("claims", &self.lock().len())
            .finish()
    }
}

impl<DB: Database> Held<DB> {
    /// No claim held yet; `end` is run in each claim's transaction before it ends.
    pub(crate) fn new(end: Option<&'static str>) -> Self {
        Self {
            claims: Mutex::new(HashMap::new()),
            end,
        }
    }

    /// What is run in each claim's transaction before it ends.
    pub(crate) fn end(&self) -> Option<&'static str> {
        self.end
    }

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

    /// The claim held under `token`, for its settle, if there is one and its lease has not
    /// ended; a claim past its lease is rolled back here, and its outcomes are fenced.
    pub(crate) async fn take_live(&self, token: &LeaseToken) -> Option<HeldClaim<DB>>
    where
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    {
        let claim = self.lock().remove(token)?;
        if claim.until <= Instant::now() {
            self.roll_back(claim.tx).await;
            return None;
        }
        Some(claim)
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
    /// before the caller's next statement.
    pub(crate) async fn roll_back_expired(&self, all: bool)
    where
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    {
        for claim in self.expired(all) {
            self.roll_back(claim.tx).await;
        }
    }

    /// Ends `tx`, a claim's transaction, without applying anything: its rows are left as they
    /// were. A failed rollback leaves the connection to sqlx, which closes it; the database
    /// then rolls back on its own.
    pub(crate) async fn roll_back(&self, mut tx: Transaction<'static, DB>)
    where
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    {
        if let Some(end) = self.end {
            // The connection goes back to the pool: undo what the claim set on it, if it
            // is still open.
            let _ = run_script(&mut *tx, end).await;
        }
        if let Err(err) = tx.rollback().await {
            tracing::debug!(error = %err, "ending a claim without applying it failed");
        }
    }

    /// Ends `tx`, a claim's transaction, with a commit of what it wrote.
    pub(crate) async fn commit(&self, mut tx: Transaction<'static, DB>) -> Result<(), sqlx::Error>
    where
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    {
        if let Some(end) = self.end {
            run_script(&mut *tx, end).await?;
        }
        tx.commit().await
    }
}
