//! [`PgOutboxLog`]: the [`LogSource`] of a [`LogRelay`](outbox_core::LogRelay) on
//! PostgreSQL: messages read from the replication slot, outcomes written to the outbox table.

use outbox_core::{Deferred, LogBatch, LogPosition, LogSource, StoreError};
use outbox_sqlx::PostgresStore;

use crate::{CdcConfig, CdcError, Lsn, PgLogSource, emitted};

/// The outbox of one PostgreSQL database as a log relay sees it: committed messages read
/// from the replication slot by a [`PgLogSource`], and the outbox table, through a
/// [`PostgresStore`], for what the log relay hands over.
///
/// - A lost replication session is opened again by the next [`LogSource::next`], from the
///   slot's confirmed position: transactions delivered and not confirmed are delivered again.
/// - Its table is the [`PostgresStore`] ([`LogTable`](outbox_core::LogTable)): the outcomes
///   are written there ([`PostgresStore::settle_log`]) and, once they are committed, the
///   transactions are confirmed to the slot.
/// - Messages written without a row (`pg_logical_emit_message`, see
///   [`CdcConfig::message_prefix`]) get a row only when they are not published: a retry, a
///   dead letter, or a message handed over with its key. An envelope that cannot be read is
///   dead-lettered with destination `undecodable` and the envelope as its payload.
///
/// The polling relay beside it claims what is handed over: give its store
/// [`StoreConfig::handed_only`](outbox_sqlx::StoreConfig::handed_only).
pub struct PgOutboxLog {
    config: CdcConfig,
    store: PostgresStore,
    log: Option<PgLogSource>,
}

impl std::fmt::Debug for PgOutboxLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOutboxLog")
            .field("slot", &self.config.slot)
            .field("table", &self.config.table)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl PgOutboxLog {
    /// Opens the replication session of `config` now, so that a missing slot or publication
    /// is reported at once. `store` is the outbox table the slot reads: its table must be
    /// [`CdcConfig::table`].
    pub async fn connect(config: CdcConfig, store: PostgresStore) -> Result<Self, CdcError> {
        config.validate()?;
        if store.config().table != config.table {
            return Err(CdcError::config(
                "table",
                format!(
                    "the log source reads {:?} but the store writes {:?}: they must be the same table",
                    config.table,
                    store.config().table
                ),
            ));
        }
        let log = PgLogSource::connect(&config).await?;
        Ok(Self {
            config,
            store,
            log: Some(log),
        })
    }

    /// The outbox table.
    pub fn store(&self) -> &PostgresStore {
        &self.store
    }

    /// The open replication session, opened again after a failure.
    async fn log(&mut self) -> Result<&mut PgLogSource, CdcError> {
        let log = match self.log.take() {
            Some(log) => log,
            None => PgLogSource::connect(&self.config).await?,
        };
        Ok(self.log.insert(log))
    }
}

impl LogSource for PgOutboxLog {
    type Table = PostgresStore;

    fn table(&self) -> PostgresStore {
        self.store.clone()
    }

    async fn next(&mut self) -> Result<LogBatch, StoreError> {
        let log = self.log().await?;
        match log.next().await {
            Ok(batch) => {
                let mut rowless = Vec::new();
                for msg in &batch.messages {
                    if batch.emitted.contains_key(&msg.id) {
                        rowless.push(msg.clone());
                    }
                }
                for bad in &batch.malformed {
                    if let Some(Some(content)) = batch.emitted.get(&bad.id) {
                        rowless.push(emitted::undecodable(bad, content, batch.committed_at));
                    }
                }
                let deferred = batch
                    .deferred
                    .into_iter()
                    .map(|(id, key)| Deferred::new(id, key))
                    .collect();
                Ok(LogBatch::new(
                    LogPosition::new(batch.end_lsn.as_u64()),
                    batch.messages,
                    batch.malformed,
                )
                .deferred(deferred)
                .rowless(rowless))
            }
            Err(err) => {
                // The session is in an unknown state: the next call opens a new one, which
                // resumes from the slot.
                self.log = None;
                Err(err.into())
            }
        }
    }

    fn confirm(&mut self, positions: &[LogPosition]) -> Result<(), StoreError> {
        let Some(log) = self.log.as_mut() else {
            // The session was lost after these were delivered: the next one delivers them
            // again, and recording them again changes nothing more.
            return Ok(());
        };
        for position in positions {
            match log.confirm(Lsn::from_u64(position.get())) {
                // Delivered by a session lost since: the new one delivers it again.
                Ok(()) | Err(CdcError::UnknownBatch(_)) => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<(), StoreError> {
        match self.log.take() {
            Some(log) => log.close().await.map_err(StoreError::from),
            None => Ok(()),
        }
    }
}
