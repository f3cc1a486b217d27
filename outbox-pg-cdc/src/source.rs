//! [`PgLogSource`]: the outbox's committed inserts, read from a logical replication slot one
//! transaction at a time, and the acknowledgement that moves the slot only past transactions
//! whose every message the broker confirmed.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use outbox_core::{Malformed, Message, MessageId};
use pgwire_replication::{QueryRow, ReplicationClient, ReplicationConfig, ReplicationEvent};

use crate::config::{Connection, TableName};
use crate::emitted;
use crate::pgoutput::{self, Change, OutboxLayout, Relation};
use crate::{CdcConfig, CdcError, Lsn};

/// Session settings of the replication connection: the text forms the decoder reads
/// (`bytea` in hex, `timestamptz` in ISO and UTC), whatever the server's defaults.
const SESSION_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC -c bytea_output=hex";

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// One committed transaction's outbox messages.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogBatch {
    /// The transaction's id.
    pub xid: u32,
    /// Where its commit record starts.
    pub commit_lsn: Lsn,
    /// Where its commit record ends: what [`PgLogSource::confirm`] takes once the broker
    /// confirmed every message below.
    pub end_lsn: Lsn,
    /// When it committed (the server's clock).
    pub committed_at: DateTime<Utc>,
    /// Its outbox messages, in the order it inserted them.
    pub messages: Vec<Message>,
    /// Its outbox rows whose id is readable but another column is not, for the dead letters.
    pub malformed: Vec<Malformed>,
    /// Which of the above were written without a row
    /// ([`CdcConfig::message_prefix`](crate::CdcConfig::message_prefix)): `None` for a
    /// message, the envelope as written for a malformed one.
    pub emitted: HashMap<MessageId, Option<Bytes>>,
    /// Its rows written to become available later (`available_at` past `created_at`): the
    /// table's to publish when they are due, with their keys.
    pub deferred: Vec<(MessageId, Option<String>)>,
}

impl LogBatch {
    /// Number of rows: messages, malformed and deferred ones.
    pub fn len(&self) -> usize {
        self.messages.len() + self.malformed.len() + self.deferred.len()
    }

    /// True for a batch without rows (never returned by [`PgLogSource::next`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A transaction between its Begin and its Commit.
#[derive(Debug)]
struct Open {
    xid: u32,
    final_lsn: Lsn,
    commit_time_micros: i64,
    messages: Vec<Message>,
    malformed: Vec<Malformed>,
    emitted: HashMap<MessageId, Option<Bytes>>,
    deferred: Vec<(MessageId, Option<String>)>,
}

/// A transaction handed out (or passed over) and not yet acknowledged.
#[derive(Clone, Copy, Debug)]
struct Delivered {
    end_lsn: Lsn,
    confirmed: bool,
}

/// Reads the outbox table's committed inserts from a logical replication slot, and moves the
/// slot forward as the broker confirms them.
///
/// - [`next`](Self::next) returns the next committed transaction that inserted into the
///   outbox, as a [`LogBatch`], in commit order. Transactions without outbox rows are passed
///   over (and acknowledged in their turn).
/// - [`confirm`](Self::confirm) records that the broker confirmed every message of a batch.
///   The position acknowledged to the server is the end of the longest run of delivered
///   transactions, from the oldest, that are all confirmed: never past a transaction with
///   a message the broker has not confirmed, however the confirmations are ordered.
/// - While no transaction is open or unconfirmed, the server's keepalives move the
///   acknowledged position to the end of the WAL, so an idle slot does not hold WAL back.
///   Keepalives that ask for a reply are answered by the replication client's own task,
///   also while the caller waits for its broker.
/// - A new source resumes from the slot's confirmed position: transactions delivered but not
///   acknowledged are delivered again (at least once).
///
/// `next` is cancel-safe: it may be a branch of `tokio::select!` next to the broker's
/// confirmations, which call `confirm` in their branch.
///
/// After an error of `next` the source refuses to go on ([`CdcError::Failed`]): connect a
/// new one, which resumes from the slot.
pub struct PgLogSource {
    client: ReplicationClient,
    slot: String,
    status_interval: Duration,
    state: LogState,
    /// The last position handed to the replication client.
    pushed: Lsn,
}

/// What the source knows of the stream, apart from the connection: the relations described,
/// the transaction being read, the transactions delivered and not yet acknowledged.
#[derive(Debug)]
struct LogState {
    /// The outbox table, as configured, for messages.
    table: String,
    /// The outbox table's OID, read when connecting.
    outbox: u32,
    layout: Option<OutboxLayout>,
    relations: HashMap<u32, Relation>,
    open: Option<Open>,
    delivered: VecDeque<Delivered>,
    acknowledged: Lsn,
    failed: Option<String>,
    /// The prefix of messages written without a row.
    prefix: String,
}

impl std::fmt::Debug for PgLogSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLogSource")
            .field("slot", &self.slot)
            .field("table", &self.state.table)
            .field("acknowledged", &self.state.acknowledged)
            .field("unconfirmed", &self.state.delivered.len())
            .field("in_transaction", &self.state.open.is_some())
            .field("failed", &self.state.failed)
            .finish_non_exhaustive()
    }
}

/// Text of column `index` of `row`.
fn column(row: &QueryRow, index: usize) -> Option<String> {
    row.get(index)
        .and_then(Option::as_ref)
        .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
}

impl PgLogSource {
    /// Opens a replication session on [`CdcConfig::url`] and starts streaming from the
    /// slot's confirmed position.
    ///
    /// Fails with [`CdcError::SlotMissing`] when the slot does not exist and
    /// [`CdcError::SlotLost`] when it was invalidated (it is never created or recreated
    /// here: see [`CdcAdmin::ensure`](crate::CdcAdmin::ensure)), [`CdcError::SlotInUse`] when
    /// another session streams from it, and [`CdcError::Mismatch`] when the publication is
    /// missing.
    pub async fn connect(config: &CdcConfig) -> Result<Self, CdcError> {
        config.validate()?;
        let connection = Connection::parse(&config.url)?;
        let table = TableName::parse(&config.table)?;
        let slot = config.slot.clone();
        let replication = ReplicationConfig::new(
            connection.host.clone(),
            connection.user.clone(),
            connection.password.clone(),
            connection.dbname.clone(),
            slot.clone(),
            config.publication.as_str(),
        )
        .with_port(connection.port)
        .with_status_interval(config.status_interval)
        .with_wakeup_interval(config.status_interval.max(Duration::from_secs(1)))
        .with_application_name("outbox-pg-cdc")
        .with_options(SESSION_OPTIONS);
        let doing = format!("connecting to {connection}");
        let fail = |err| CdcError::replication(doing.clone(), &slot, err);
        let mut client = ReplicationClient::connect_gated(replication)
            .await
            .map_err(fail)?;

        // Names are validated ([a-z0-9_]+, plain identifiers): the literals are safe.
        let rows = client
            .simple_query(&format!(
                "SELECT slot_type::text, plugin::text, (database = current_database())::text, \
                        wal_status, confirmed_flush_lsn::text \
                   FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ))
            .await
            .map_err(fail)?;
        let Some(row) = rows.first() else {
            return Err(CdcError::SlotMissing { slot });
        };
        if column(row, 3).as_deref() == Some("lost") {
            return Err(CdcError::SlotLost {
                slot,
                reason: String::from("wal_status = lost"),
            });
        }
        let confirmed = column(row, 4);
        if column(row, 0).as_deref() != Some("logical")
            || column(row, 1).as_deref() != Some("pgoutput")
            || column(row, 2).as_deref() != Some("true")
            || confirmed.is_none()
        {
            return Err(CdcError::Mismatch(format!(
                "replication slot {slot} is not a logical pgoutput slot of this database \
                 (type {:?}, plugin {:?}): drop it or choose another slot name",
                column(row, 0),
                column(row, 1)
            )));
        }
        let confirmed: Lsn = confirmed.unwrap_or_default().parse()?;

        let publication = &config.publication;
        let rows = client
            .simple_query(&format!(
                "SELECT 1 FROM pg_publication WHERE pubname = '{publication}'"
            ))
            .await
            .map_err(fail)?;
        if rows.is_empty() {
            return Err(CdcError::Mismatch(format!(
                "publication {publication} does not exist: create it with the setup step \
                 (CdcAdmin::ensure)"
            )));
        }
        let rows = client
            .simple_query(&format!(
                "SELECT to_regclass({})::oid::text",
                table.regclass_literal()
            ))
            .await
            .map_err(fail)?;
        let outbox = rows
            .first()
            .and_then(|row| column(row, 0))
            .ok_or_else(|| {
                CdcError::NotReady(format!(
                    "the outbox table {} does not exist: run the store's migrations first",
                    config.table
                ))
            })?
            .parse::<u32>()
            .map_err(|_| CdcError::Decode("the outbox table's OID is not a number".into()))?;

        // Report the slot's own position until the broker confirms more: never less (which
        // the server ignores anyway), never more.
        client.update_applied_lsn(confirmed.to_wire());
        client.start().await.map_err(fail)?;
        client.wait_started().await.map_err(fail)?;
        tracing::info!(slot = %slot, from = %confirmed, "streaming the outbox's log");
        Ok(Self {
            client,
            slot,
            status_interval: config.status_interval,
            state: LogState::new(
                config.table.clone(),
                outbox,
                confirmed,
                config.message_prefix.clone(),
            ),
            pushed: confirmed,
        })
    }

    /// The next committed transaction with outbox rows, in commit order. Cancel-safe.
    pub async fn next(&mut self) -> Result<LogBatch, CdcError> {
        loop {
            if let Some(why) = &self.state.failed {
                return Err(CdcError::Failed(why.clone()));
            }
            let handled = match self.client.recv().await {
                Ok(Some(event)) => self.state.handle(event),
                Ok(None) => Err(CdcError::Ended),
                Err(err) => Err(CdcError::replication("reading the log", &self.slot, err)),
            };
            self.push_acknowledged();
            match handled {
                Ok(Some(batch)) => return Ok(batch),
                Ok(None) => {}
                Err(err) => {
                    self.state.failed = Some(err.to_string());
                    return Err(err);
                }
            }
        }
    }

    /// Records that the broker confirmed every message (and dead-lettered every malformed
    /// row) of the batch that ends at `end_lsn`, and acknowledges to the server the end of
    /// the longest run of confirmed transactions from the oldest delivered one. Confirming a
    /// batch again is harmless; an `end_lsn` this source never delivered is
    /// [`CdcError::UnknownBatch`].
    pub fn confirm(&mut self, end_lsn: Lsn) -> Result<(), CdcError> {
        self.state.confirm(end_lsn)?;
        self.push_acknowledged();
        Ok(())
    }

    /// The position acknowledged so far: reported to the server within the status interval.
    pub fn acknowledged(&self) -> Lsn {
        self.state.acknowledged
    }

    /// The last position reported to the server.
    pub fn reported(&self) -> Lsn {
        Lsn::from_wire(self.client.metrics().last_applied_lsn())
    }

    /// Transactions delivered (or passed over behind them) and not yet acknowledged.
    pub fn unconfirmed(&self) -> usize {
        self.state.delivered.len()
    }

    /// Reports the acknowledged position (waiting up to two status intervals for it to be
    /// sent), then ends the session cleanly. Unconfirmed transactions are delivered again by
    /// the next source.
    pub async fn close(mut self) -> Result<(), CdcError> {
        let deadline = tokio::time::Instant::now()
            + self.status_interval.saturating_mul(2)
            + Duration::from_secs(1);
        while self.state.failed.is_none()
            && self.client.is_running()
            && self.reported() < self.state.acknowledged
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let slot = self.slot.clone();
        match self.client.shutdown().await {
            Ok(()) => Ok(()),
            // Closing a source that already failed: its error was reported.
            Err(_) if self.state.failed.is_some() => Ok(()),
            Err(err) => Err(CdcError::replication("closing the session", &slot, err)),
        }
    }

    /// Hands a newly acknowledged position to the replication client, which reports it.
    fn push_acknowledged(&mut self) {
        if self.state.acknowledged > self.pushed {
            self.pushed = self.state.acknowledged;
            self.client.update_applied_lsn(self.pushed.to_wire());
        }
    }
}

impl LogState {
    fn new(table: String, outbox: u32, acknowledged: Lsn, prefix: String) -> Self {
        Self {
            prefix,
            table,
            outbox,
            layout: None,
            relations: HashMap::new(),
            open: None,
            delivered: VecDeque::new(),
            acknowledged,
            failed: None,
        }
    }

    fn confirm(&mut self, end_lsn: Lsn) -> Result<(), CdcError> {
        if end_lsn <= self.acknowledged {
            return Ok(());
        }
        let delivered = self
            .delivered
            .iter_mut()
            .find(|d| d.end_lsn == end_lsn)
            .ok_or(CdcError::UnknownBatch(end_lsn))?;
        delivered.confirmed = true;
        self.acknowledge_confirmed();
        Ok(())
    }

    /// Pops the confirmed transactions at the front and acknowledges the last one's end.
    fn acknowledge_confirmed(&mut self) {
        let mut end = None;
        while let Some(front) = self.delivered.front()
            && front.confirmed
        {
            end = Some(front.end_lsn);
            self.delivered.pop_front();
        }
        if let Some(end) = end {
            self.acknowledge(end);
        }
    }

    fn acknowledge(&mut self, lsn: Lsn) {
        if lsn > self.acknowledged {
            self.acknowledged = lsn;
        }
    }

    /// One event of the stream: a batch when it completes a transaction with outbox rows.
    fn handle(&mut self, event: ReplicationEvent) -> Result<Option<LogBatch>, CdcError> {
        match event {
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Every transaction that committed before wal_end was sent before this
                // keepalive; inside a transaction wal_end may lie before its commit.
                if self.open.is_none() && self.delivered.is_empty() {
                    self.acknowledge(Lsn::from_wire(wal_end));
                }
                Ok(None)
            }
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                if let Some(open) = &self.open {
                    return Err(CdcError::Decode(format!(
                        "transaction {xid} began before transaction {} committed",
                        open.xid
                    )));
                }
                self.open = Some(Open {
                    xid,
                    final_lsn: Lsn::from_wire(final_lsn),
                    commit_time_micros,
                    messages: Vec::new(),
                    malformed: Vec::new(),
                    emitted: HashMap::new(),
                    deferred: Vec::new(),
                });
                Ok(None)
            }
            ReplicationEvent::XLogData { data, .. } => {
                self.change(pgoutput::decode(&data)?)?;
                Ok(None)
            }
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                // Logical decoding messages of other writers are theirs.
                if prefix == self.prefix {
                    self.emitted(transactional, Lsn::from_wire(lsn), content)?;
                }
                Ok(None)
            }
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => self.commit(
                Lsn::from_wire(lsn),
                Lsn::from_wire(end_lsn),
                commit_time_micros,
            ),
            // Only sent when a stop position was configured, which it never is.
            ReplicationEvent::StoppedAt { .. } => Err(CdcError::Ended),
        }
    }

    fn change(&mut self, change: Change) -> Result<(), CdcError> {
        let describe = |relations: &HashMap<u32, Relation>, oid: u32| match relations.get(&oid) {
            Some(relation) => relation.qualified(),
            None => format!("relation {oid}"),
        };
        match change {
            Change::Relation(relation) => {
                if relation.oid == self.outbox {
                    self.layout = Some(OutboxLayout::new(&relation)?);
                }
                self.relations.insert(relation.oid, relation);
                Ok(())
            }
            Change::Insert { relation, row } => {
                let Some(open) = self.open.as_mut() else {
                    return Err(CdcError::Decode(format!(
                        "an insert into {} outside a transaction",
                        describe(&self.relations, relation)
                    )));
                };
                if relation != self.outbox {
                    return Err(match self.relations.get(&relation) {
                        Some(other) => CdcError::Unsupported(format!(
                            "an insert into {}, which is not the outbox table {}: the \
                             publication must publish the outbox table only",
                            other.qualified(),
                            self.table
                        )),
                        None => CdcError::Decode(format!(
                            "an insert into relation {relation}, which the stream never \
                             described"
                        )),
                    });
                }
                let Some(layout) = &self.layout else {
                    return Err(CdcError::Decode(format!(
                        "an insert into the outbox table {} before its description",
                        self.table
                    )));
                };
                match layout.message(&row)? {
                    Ok(message) if layout.deferred(&row) => {
                        open.deferred.push((message.id, message.key));
                    }
                    Ok(message) => open.messages.push(message),
                    Err(malformed) => {
                        tracing::warn!(id = %malformed.id, error = %malformed.error,
                            "an outbox row of the log cannot be decoded");
                        open.malformed.push(malformed);
                    }
                }
                Ok(())
            }
            Change::Update { relation } | Change::Delete { relation } => {
                let what = if matches!(change, Change::Update { .. }) {
                    "an UPDATE"
                } else {
                    "a DELETE"
                };
                Err(CdcError::Unsupported(format!(
                    "{what} of {}: the publication must publish inserts only \
                     (publish = 'insert')",
                    describe(&self.relations, relation)
                )))
            }
            Change::Truncate { relations } => Err(CdcError::Unsupported(format!(
                "a TRUNCATE of {}: the publication must publish inserts only \
                 (publish = 'insert')",
                relations
                    .iter()
                    .map(|oid| describe(&self.relations, *oid))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            Change::Type | Change::Origin => Ok(()),
        }
    }

    /// An outbox message written without a row, in the open transaction.
    fn emitted(&mut self, transactional: bool, lsn: Lsn, content: Bytes) -> Result<(), CdcError> {
        if !transactional {
            // Written whatever became of the writer's transaction: publishing it could
            // publish what was rolled back.
            tracing::error!(%lsn, prefix = %self.prefix,
                "an outbox message emitted outside a transaction is ignored: emit it with \
                 pg_logical_emit_message(true, ...) so that it commits with the writer's changes");
            return Ok(());
        }
        let Some(open) = self.open.as_mut() else {
            return Err(CdcError::Decode(format!(
                "a transactional message at {lsn} outside a transaction"
            )));
        };
        let committed_at = timestamp(open.commit_time_micros).unwrap_or_else(Utc::now);
        match emitted::decode(lsn, &content, committed_at) {
            Ok(message) => {
                open.emitted.insert(message.id, None);
                open.messages.push(message);
            }
            Err(malformed) => {
                tracing::warn!(id = %malformed.id, error = %malformed.error,
                    "an outbox message emitted without a row cannot be decoded");
                open.emitted.insert(malformed.id, Some(content));
                open.malformed.push(malformed);
            }
        }
        Ok(())
    }

    fn commit(
        &mut self,
        lsn: Lsn,
        end_lsn: Lsn,
        commit_time_micros: i64,
    ) -> Result<Option<LogBatch>, CdcError> {
        let Some(open) = self.open.take() else {
            return Err(CdcError::Decode(format!(
                "a commit at {lsn} without its transaction's begin"
            )));
        };
        if open.final_lsn != lsn || end_lsn <= lsn {
            return Err(CdcError::Decode(format!(
                "transaction {} began for a commit at {} and committed at {lsn}..{end_lsn}",
                open.xid, open.final_lsn
            )));
        }
        if open.messages.is_empty() && open.malformed.is_empty() && open.deferred.is_empty() {
            // Nothing for the broker: acknowledged as soon as everything before it is.
            self.delivered.push_back(Delivered {
                end_lsn,
                confirmed: true,
            });
            self.acknowledge_confirmed();
            return Ok(None);
        }
        let committed_at = timestamp(commit_time_micros).ok_or_else(|| {
            CdcError::Decode(format!(
                "transaction {} has commit time {commit_time_micros}, out of range",
                open.xid
            ))
        })?;
        self.delivered.push_back(Delivered {
            end_lsn,
            confirmed: false,
        });
        Ok(Some(LogBatch {
            xid: open.xid,
            commit_lsn: lsn,
            end_lsn,
            committed_at,
            messages: open.messages,
            malformed: open.malformed,
            emitted: open.emitted,
            deferred: open.deferred,
        }))
    }
}

/// A time of the stream (microseconds since PostgreSQL's epoch), when it is in range.
fn timestamp(micros: i64) -> Option<DateTime<Utc>> {
    micros
        .checked_add(PG_EPOCH_MICROS)
        .and_then(DateTime::from_timestamp_micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::tests::{Wire, insert, relation};
    use pgwire_replication::Lsn as WireLsn;

    const OUTBOX: u32 = 16385;

    struct Script {
        state: LogState,
        xid: u32,
        at: u64,
    }

    impl Script {
        fn new() -> Self {
            Self {
                state: LogState::new(
                    "outbox".into(),
                    OUTBOX,
                    Lsn::from_u64(0x100),
                    "outbox".into(),
                ),
                xid: 700,
                at: 0x1000,
            }
        }

        fn event(&mut self, event: ReplicationEvent) -> Result<Option<LogBatch>, CdcError> {
            self.state.handle(event)
        }

        fn data(&mut self, bytes: Vec<u8>) -> Result<Option<LogBatch>, CdcError> {
            self.event(ReplicationEvent::XLogData {
                wal_start: WireLsn(self.at),
                wal_end: WireLsn(0),
                server_time_micros: 0,
                data: bytes::Bytes::from(bytes),
            })
        }

        fn begin(&mut self) {
            self.xid += 1;
            self.at += 0x100;
            let event = ReplicationEvent::Begin {
                final_lsn: WireLsn(self.at + 0x80),
                xid: self.xid,
                commit_time_micros: 0,
            };
            assert_eq!(self.event(event).expect("begin"), None);
        }

        fn commit(&mut self) -> Option<LogBatch> {
            self.event(ReplicationEvent::Commit {
                lsn: WireLsn(self.at + 0x80),
                end_lsn: WireLsn(self.at + 0xA0),
                commit_time_micros: 1_000_000,
            })
            .expect("commit")
        }

        /// A transaction inserting `ids` into the outbox (none: a transaction the outbox
        /// does not see, which the server still frames when it has logical messages).
        fn transaction(&mut self, ids: &[String]) -> Option<LogBatch> {
            self.begin();
            for id in ids {
                assert_eq!(
                    self.data(insert(OUTBOX, id, Some("k"), "\\x01", "{}"))
                        .expect("insert"),
                    None
                );
            }
            self.commit()
        }

        fn keepalive(&mut self, wal_end: u64) {
            let event = ReplicationEvent::KeepAlive {
                wal_end: WireLsn(wal_end),
                reply_requested: false,
                server_time_micros: 0,
            };
            assert_eq!(self.event(event).expect("keepalive"), None);
        }
    }

    fn id(n: u8) -> String {
        format!("0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a{n:02x}")
    }

    fn described() -> Script {
        let mut script = Script::new();
        script
            .data(relation(OUTBOX, "public", "outbox"))
            .expect("relation");
        script
    }

    #[test]
    fn the_source_can_move_between_tasks() {
        fn send<T: Send + 'static>() {}
        send::<PgLogSource>();
        send::<LogBatch>();
    }

    #[test]
    fn a_transaction_is_one_batch_in_insert_order() {
        let mut script = described();
        let (a, b) = (id(1), id(2));
        let batch = script
            .transaction(&[a.clone(), b.clone()])
            .expect("a batch");
        let ids: Vec<String> = batch.messages.iter().map(|m| m.id.to_string()).collect();
        assert_eq!(ids, vec![a, b]);
        assert_eq!(batch.end_lsn, Lsn::from_u64(script.at + 0xA0));
        assert_eq!(batch.commit_lsn, Lsn::from_u64(script.at + 0x80));
        assert_eq!(batch.committed_at.to_rfc3339(), "2000-01-01T00:00:01+00:00");
        assert_eq!(script.state.delivered.len(), 1);
    }

    #[test]
    fn only_a_prefix_of_confirmed_transactions_is_acknowledged() {
        let mut script = described();
        let start = script.state.acknowledged;
        let first = script.transaction(&[id(1)]).expect("first");
        let second = script.transaction(&[id(2)]).expect("second");
        assert_eq!(script.transaction(&[]), None, "passed over");
        let passed_over = Lsn::from_u64(script.at + 0xA0);
        let third = script.transaction(&[id(3)]).expect("third");

        script.state.confirm(second.end_lsn).expect("confirm");
        assert_eq!(
            script.state.acknowledged, start,
            "the first is not confirmed"
        );
        script.state.confirm(first.end_lsn).expect("confirm");
        assert_eq!(
            script.state.acknowledged, passed_over,
            "first, second and the passed-over transaction behind them"
        );
        script.keepalive(third.end_lsn.as_u64() + 0x1000);
        assert_eq!(script.state.acknowledged, passed_over, "the third is open");
        script.state.confirm(third.end_lsn).expect("confirm");
        assert_eq!(script.state.acknowledged, third.end_lsn);
        assert!(script.state.delivered.is_empty());
        script
            .state
            .confirm(first.end_lsn)
            .expect("confirming again is harmless");
        assert!(matches!(
            script
                .state
                .confirm(Lsn::from_u64(third.end_lsn.as_u64() + 1)),
            Err(CdcError::UnknownBatch(_))
        ));
    }

    #[test]
    fn keepalives_advance_only_an_idle_slot() {
        let mut script = described();
        script.keepalive(0x5000);
        assert_eq!(script.state.acknowledged, Lsn::from_u64(0x5000));
        script.keepalive(0x4000);
        assert_eq!(
            script.state.acknowledged,
            Lsn::from_u64(0x5000),
            "never back"
        );
        script.at = 0x6000;
        script.begin();
        script.keepalive(0x9000);
        assert_eq!(
            script.state.acknowledged,
            Lsn::from_u64(0x5000),
            "inside a transaction"
        );
        script
            .data(insert(OUTBOX, &id(1), None, "\\x", "{}"))
            .expect("insert");
        let batch = script.commit().expect("a batch");
        script.keepalive(0x9000);
        assert_eq!(
            script.state.acknowledged,
            Lsn::from_u64(0x5000),
            "unconfirmed"
        );
        script.state.confirm(batch.end_lsn).expect("confirm");
        script.keepalive(0x9000);
        assert_eq!(script.state.acknowledged, Lsn::from_u64(0x9000));
    }

    #[test]
    fn a_transaction_without_outbox_rows_is_acknowledged_when_nothing_waits() {
        let mut script = described();
        assert_eq!(script.transaction(&[]), None);
        assert_eq!(script.state.acknowledged, Lsn::from_u64(script.at + 0xA0));
    }

    #[test]
    fn changes_the_source_does_not_interpret_fail_closed() {
        let mut script = Script::new();
        script.begin();
        let err = script
            .data(insert(OUTBOX, &id(1), None, "\\x", "{}"))
            .expect_err("outbox not described");
        assert!(matches!(err, CdcError::Decode(_)), "{err}");

        let mut script = described();
        script.begin();
        let err = script
            .data(insert(999, &id(1), None, "\\x", "{}"))
            .expect_err("unknown relation");
        assert!(err.to_string().contains("never described"), "{err}");

        let mut script = described();
        script
            .data(relation(17000, "public", "orders"))
            .expect("relation");
        script.begin();
        let err = script
            .data(insert(17000, &id(1), None, "\\x", "{}"))
            .expect_err("another table");
        assert!(matches!(err, CdcError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("public.orders"), "{err}");

        for (bytes, what) in [
            (
                Wire::new(b'U').u32(OUTBOX).u8(b'N').u16(0).0,
                "an UPDATE of public.outbox",
            ),
            (
                Wire::new(b'D').u32(OUTBOX).u8(b'K').u16(0).0,
                "a DELETE of public.outbox",
            ),
            (
                Wire::new(b'T').u32(1).u8(0).u32(OUTBOX).0,
                "a TRUNCATE of public.outbox",
            ),
        ] {
            let mut script = described();
            script.begin();
            let err = script.data(bytes).expect_err(what);
            assert!(matches!(err, CdcError::Unsupported(_)), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
    }

    #[test]
    fn broken_transaction_framing_is_an_error() {
        let mut script = described();
        let orphan = script.event(ReplicationEvent::Commit {
            lsn: WireLsn(0x10),
            end_lsn: WireLsn(0x20),
            commit_time_micros: 0,
        });
        assert!(matches!(orphan, Err(CdcError::Decode(_))));
        script.begin();
        let nested = script.event(ReplicationEvent::Begin {
            final_lsn: WireLsn(0x9999),
            xid: 1,
            commit_time_micros: 0,
        });
        assert!(matches!(nested, Err(CdcError::Decode(_))));
        let mismatched = script.event(ReplicationEvent::Commit {
            lsn: WireLsn(0x1),
            end_lsn: WireLsn(0x2),
            commit_time_micros: 0,
        });
        assert!(matches!(mismatched, Err(CdcError::Decode(_))));
        let mut script = described();
        let outside = script.data(insert(OUTBOX, &id(1), None, "\\x", "{}"));
        assert!(matches!(outside, Err(CdcError::Decode(_))));
    }
}
