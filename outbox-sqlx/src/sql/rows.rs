//! What the stores read back: rows decoded column by column into messages (a damaged column
//! makes a malformed message or a marked dead letter, not a failed claim), members, partitions
//! and counts.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use outbox_core::{
    Claim, DeadLetter, LeaseToken, Malformed, Message, MessageId, NewMessage, RelayId, RelayMember,
    Settled, Settlement, Stats, StoreError, StoreErrorKind, decode_headers,
};
use sqlx::{ColumnIndex, Decode, Row, Type};

/// What a settle applied, from the rows its statements changed.
pub(crate) fn settled(settlement: &Settlement, applied: u64) -> Settled {
    Settled {
        applied,
        fenced: (settlement.len() as u64).saturating_sub(applied),
    }
}

/// Partitions as read back, sorted.
fn partitions_from(stored: Vec<i16>) -> Vec<u16> {
    let mut partitions: Vec<u16> = stored
        .into_iter()
        .filter_map(|p| u16::try_from(p).ok())
        .collect();
    partitions.sort_unstable();
    partitions
}

/// Members from the rows of [`members`](super::members), sorted by relay id, partitions sorted.
fn members_from(rows: Vec<(String, DateTime<Utc>, Option<i16>)>) -> Vec<RelayMember> {
    let mut by_relay: BTreeMap<String, RelayMember> = BTreeMap::new();
    for (relay, expires_at, partition) in rows {
        let member = by_relay
            .entry(relay.clone())
            .or_insert_with(|| RelayMember {
                id: RelayId::new(relay),
                expires_at,
                partitions: Vec::new(),
            });
        if let Some(partition) = partition.and_then(|p| u16::try_from(p).ok()) {
            member.partitions.push(partition);
        }
    }
    by_relay
        .into_values()
        .map(|mut member| {
            member.partitions.sort_unstable();
            member
        })
        .collect()
}

/// How a dialect reads the columns whose stored types differ (ids, times, MySQL's binary text);
/// everything else reads the same from any row.
pub(crate) struct Decoding<R> {
    id: fn(&R) -> Result<MessageId, String>,
    text: Reader<R, String>,
    opt_text: Reader<R, Option<String>>,
    time: Reader<R, DateTime<Utc>>,
    opt_time: Reader<R, Option<DateTime<Utc>>>,
}

/// Reads the named column of a row as a `T`, the error as text naming the column.
type Reader<R, T> = fn(&R, &str) -> Result<T, String>;

impl<R> Decoding<R> {
    /// The id, text, optional text, time and optional time readers of a dialect.
    pub(crate) const fn new(
        id: fn(&R) -> Result<MessageId, String>,
        text: Reader<R, String>,
        opt_text: Reader<R, Option<String>>,
        time: Reader<R, DateTime<Utc>>,
        opt_time: Reader<R, Option<DateTime<Utc>>>,
    ) -> Self {
        Self {
            id,
            text,
            opt_text,
            time,
            opt_time,
        }
    }
}

impl<R> Decoding<R>
where
    R: Row,
    for<'n> &'n str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i32: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i16: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i16>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    /// The columns of a message row ([`message_columns`](super::message_columns)); an error
    /// (with the sequence number when that can be read) when its id cannot be read: such a row
    /// cannot be addressed as a message.
    pub(crate) fn parts(&self, row: &R) -> Result<RowParts, (Option<i64>, String)> {
        let seq: i64 = column(row, "seq").map_err(|err| (None, err))?;
        let id = (self.id)(row).map_err(|err| (Some(seq), err))?;
        Ok(RowParts {
            seq,
            id,
            destination: (self.text)(row, "destination"),
            key: (self.opt_text)(row, "key"),
            payload: column(row, "payload"),
            headers: (self.text)(row, "headers"),
            created_at: (self.time)(row, "created_at"),
            attempts: column::<_, i32>(row, "attempts").map(i64::from),
            last_error: (self.opt_text)(row, "last_error"),
        })
    }

    /// The claimed rows, and the sequence numbers (with the reason) of those whose id cannot
    /// be read.
    pub(crate) fn claimed(&self, rows: &[R]) -> (Vec<RowParts>, Vec<(i64, String)>) {
        let mut parts = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in rows {
            match self.parts(row) {
                Ok(row) => parts.push(row),
                Err((Some(seq), error)) => unreadable.push((seq, error)),
                Err((None, error)) => {
                    tracing::error!(%error, "a claimed outbox row cannot be read");
                }
            }
        }
        (parts, unreadable)
    }

    /// Dead letters from the rows of [`dead_letters`](super::dead_letters). A dead row whose
    /// id cannot be read is still listed, under a stand-in id made of its sequence number;
    /// `purge` of all dead letters removes it.
    pub(crate) fn dead_letters(&self, rows: &[R]) -> Result<Vec<DeadLetter>, StoreError> {
        rows.iter()
            .map(|row| {
                let parts = match self.parts(row) {
                    Ok(parts) => parts,
                    Err((Some(seq), error)) => {
                        unreadable_id_parts(seq, error, (self.time)(row, "created_at"))
                    }
                    Err((None, error)) => return Err(decode_error("listing dead letters", error)),
                };
                parts.into_dead_letter((self.time)(row, "dead_at"))
            })
            .collect()
    }

    /// Members from the rows of [`members`](super::members), sorted by relay id, partitions
    /// sorted.
    pub(crate) fn members(&self, rows: &[R]) -> Result<Vec<RelayMember>, StoreError> {
        let rows = rows
            .iter()
            .map(|row| {
                Ok((
                    (self.text)(row, "relay")?,
                    (self.time)(row, "expires_at")?,
                    column::<_, Option<i16>>(row, "partition")?,
                ))
            })
            .collect::<Result<_, String>>()
            .map_err(|error| decode_error("listing the live relays", error))?;
        Ok(members_from(rows))
    }

    /// The counts of [`stats`](super::stats), as of the database's clock.
    pub(crate) fn stats(&self, row: &R) -> Result<Stats, StoreError> {
        let read = || -> Result<Stats, String> {
            let count = |name| column::<_, i64>(row, name).map(|n| u64::try_from(n).unwrap_or(0));
            Ok(Stats::new(
                count("pending")?,
                (self.opt_time)(row, "oldest")?,
                count("dead")?,
                count("published")?,
            )
            .as_of((self.time)(row, "now")?))
        };
        read().map_err(|error| decode_error("counting outbox messages", error))
    }

    /// The partition numbers of `rows` (a `partition` column), sorted.
    pub(crate) fn partitions(&self, rows: &[R], doing: &str) -> Result<Vec<u16>, StoreError> {
        let stored = rows
            .iter()
            .map(|row| column::<_, i16>(row, "partition"))
            .collect::<Result<_, String>>()
            .map_err(|error| decode_error(doing, error))?;
        Ok(partitions_from(stored))
    }
}

/// A column that cannot be read while `doing`.
fn decode_error(doing: &str, error: String) -> StoreError {
    StoreError::new(StoreErrorKind::Decode, format!("{doing}: {error}"))
}

/// The columns of one stored message, each decoded on its own so that one bad column makes
/// the row [`Malformed`] instead of failing the whole claim.
#[derive(Debug)]
pub(crate) struct RowParts {
    pub(crate) seq: i64,
    pub(crate) id: MessageId,
    pub(crate) destination: Result<String, String>,
    pub(crate) key: Result<Option<String>, String>,
    pub(crate) payload: Result<Vec<u8>, String>,
    pub(crate) headers: Result<String, String>,
    pub(crate) created_at: Result<DateTime<Utc>, String>,
    pub(crate) attempts: Result<i64, String>,
    pub(crate) last_error: Result<Option<String>, String>,
}

/// Reads column `name` of `row`, the error as text naming the column.
pub(crate) fn column<R, T>(row: &R, name: &str) -> Result<T, String>
where
    R: Row,
    for<'r> T: Decode<'r, R::Database> + Type<R::Database>,
    for<'n> &'n str: ColumnIndex<R>,
{
    row.try_get::<T, _>(name)
        .map_err(|err| format!("column {name}: {err}"))
}

impl RowParts {
    /// The message, or why it cannot be one.
    pub(crate) fn into_message(self) -> Result<Message, Malformed> {
        let id = self.id;
        let key = self.key.clone().ok().flatten();
        self.decode(true)
            .map_err(|error| Malformed { id, key, error })
    }

    /// The message as a dead letter. Columns that cannot be decoded are shown as such
    /// (destination `<undecodable>`, empty payload, no headers) with the reason added to
    /// `last_error`, instead of hiding this dead letter or the others listed with it:
    /// operators list dead letters to decide what to replay or purge.
    pub(crate) fn into_dead_letter(
        mut self,
        dead_at: Result<DateTime<Utc>, String>,
    ) -> Result<DeadLetter, StoreError> {
        let mut damage: Vec<String> = Vec::new();
        let mut take = |result: Result<(), String>| {
            if let Err(error) = result {
                damage.push(error);
            }
        };
        if let Err(error) = &self.destination {
            take(Err(error.clone()));
            self.destination = Ok(String::from("<undecodable>"));
        }
        if let Err(error) = &self.key {
            take(Err(error.clone()));
            self.key = Ok(None);
        }
        if let Err(error) = &self.payload {
            take(Err(error.clone()));
            self.payload = Ok(Vec::new());
        }
        if let Err(error) = &self.attempts {
            take(Err(error.clone()));
            self.attempts = Ok(0);
        }
        if let Err(error) = &self.last_error {
            take(Err(error.clone()));
            self.last_error = Ok(None);
        }
        let dead_at = dead_at.unwrap_or_else(|error| {
            damage.push(error);
            DateTime::<Utc>::UNIX_EPOCH
        });
        if let Err(error) = &self.created_at {
            damage.push(error.clone());
            self.created_at = Ok(dead_at);
        }
        if !damage.is_empty() {
            let last = self.last_error.clone().ok().flatten();
            let note = format!("stored row damaged: {}", damage.join("; "));
            self.last_error = Ok(Some(match last {
                Some(last) => format!("{last} ({note})"),
                None => note,
            }));
        }
        let id = self.id;
        let message = self.decode(false).map_err(|error| {
            StoreError::new(
                outbox_core::StoreErrorKind::Decode,
                format!("dead letter {id}: {error}"),
            )
        })?;
        Ok(DeadLetter::new(message, dead_at))
    }

    fn decode(self, strict_headers: bool) -> Result<Message, String> {
        let headers = self.headers.and_then(|text| {
            decode_headers(&text)
                .map_err(|err| format!("headers are not a JSON object of strings: {err}"))
        });
        let headers = match headers {
            Ok(headers) => headers,
            Err(error) if strict_headers => return Err(error),
            Err(_) => Default::default(),
        };
        let attempts = self.attempts.and_then(|n| {
            u32::try_from(n).map_err(|_| format!("column attempts: {n} is out of range"))
        })?;
        let mut new = NewMessage::new(self.destination?, self.payload?).with_id(self.id);
        if let Some(key) = self.key? {
            new = new.key(key);
        }
        for (name, value) in headers {
            new = new.header(name, value);
        }
        Ok(Message::new(new, self.created_at?).with_attempts(attempts, self.last_error?))
    }
}

/// A claim from the rows leased under `token`, in enqueue order.
pub(crate) fn assemble_claim(token: LeaseToken, mut rows: Vec<RowParts>) -> Claim {
    rows.sort_by_key(|row| row.seq);
    let mut claim = Claim {
        token,
        messages: Vec::with_capacity(rows.len()),
        malformed: Vec::new(),
    };
    for row in rows {
        match row.into_message() {
            Ok(message) => claim.messages.push(message),
            Err(malformed) => {
                tracing::warn!(id = %malformed.id, error = %malformed.error, "claimed a row that cannot be decoded");
                claim.malformed.push(malformed);
            }
        }
    }
    claim
}

/// The parts of a dead row whose id cannot be read, under a stand-in id made of its sequence
/// number, so that listing dead letters still shows it.
pub(crate) fn unreadable_id_parts(
    seq: i64,
    error: String,
    created_at: Result<DateTime<Utc>, String>,
) -> RowParts {
    RowParts {
        seq,
        id: MessageId::from_uuid(uuid::Uuid::from_u64_pair(0, seq.unsigned_abs())),
        destination: Err(error),
        key: Ok(None),
        payload: Ok(Vec::new()),
        headers: Ok(String::from("{}")),
        created_at,
        attempts: Ok(0),
        last_error: Ok(None),
    }
}

/// A MessageId from 16 stored bytes.
#[cfg_attr(not(any(feature = "mysql", feature = "sqlite")), allow(dead_code))]
pub(crate) fn id_from_bytes(bytes: &[u8]) -> Result<MessageId, String> {
    uuid::Uuid::from_slice(bytes)
        .map(MessageId::from_uuid)
        .map_err(|err| format!("column id: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_that_cannot_be_decoded_are_malformed() {
        let id = MessageId::new();
        let row = |headers: &str| RowParts {
            seq: 1,
            id,
            destination: Ok("d".into()),
            key: Ok(Some("k".into())),
            payload: Ok(b"p".to_vec()),
            headers: Ok(headers.into()),
            created_at: Ok(Utc::now()),
            attempts: Ok(2),
            last_error: Ok(Some("e".into())),
        };
        let message = row(r#"{"a":"b"}"#).into_message().expect("decodes");
        assert_eq!((message.attempts, message.headers.len()), (2, 1));
        let bad = row("{not json").into_message().expect_err("bad headers");
        assert_eq!((bad.id, bad.key.as_deref()), (id, Some("k")));
        assert!(bad.error.contains("headers"), "{}", bad.error);
        let dead = row("{not json")
            .into_dead_letter(Ok(Utc::now()))
            .expect("dead letters keep bad headers out");
        assert!(dead.message.headers.is_empty());
    }
}
