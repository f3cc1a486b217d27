//! A decoder of the `pgoutput` messages the replication client hands over undecoded (it
//! decodes Begin, Commit and logical messages itself), and of the outbox table's rows into
//! [`Message`]s.
//!
//! Protocol version 1, text values: `R` (relation), `I` (insert), and, to refuse them, `U`,
//! `D` and `T`; `Y` (type) and `O` (origin) are read and passed over. Everything else, and
//! every message that is truncated or has bytes left over, is an error: the log is never
//! guessed at.

use chrono::{DateTime, Utc};
use outbox_core::{Malformed, Message, MessageId, NewMessage, decode_headers};
use uuid::Uuid;

use crate::CdcError;

/// Type OIDs of the outbox table's columns (`pg_type`), fixed since PostgreSQL's beginnings.
const UUID: u32 = 2950;
const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;
const BYTEA: u32 = 17;
const TIMESTAMPTZ: u32 = 1184;
const INT2: u32 = 21;
const INT4: u32 = 23;
const INT8: u32 = 20;

/// One decoded `pgoutput` message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// A table's description, sent before its first change in a session (and again after
    /// its definition changed).
    Relation(Relation),
    /// A new row.
    Insert {
        /// The table's OID.
        relation: u32,
        /// Its values, one per column of the relation.
        row: Vec<Value>,
    },
    /// An update of a row of `relation`.
    Update { relation: u32 },
    /// A delete of a row of `relation`.
    Delete { relation: u32 },
    /// A truncate of `relations`.
    Truncate { relations: Vec<u32> },
    /// A type's description (sent for columns of non-builtin types).
    Type,
    /// The origin of a replicated transaction.
    Origin,
}

/// A table as described by an `R` message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Relation {
    pub(crate) oid: u32,
    pub(crate) schema: String,
    pub(crate) name: String,
    pub(crate) columns: Vec<Column>,
}

impl Relation {
    /// `schema.name`.
    pub(crate) fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// A column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) type_oid: u32,
}

/// A column value of a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change (updates only).
    Unchanged,
    /// The value in its text form.
    Text(Vec<u8>),
    /// A value in its binary form (only when binary output was asked for; it never is).
    Binary,
}

/// Reads big-endian fields, failing on a short buffer instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn truncated(&self, field: &str) -> CdcError {
        CdcError::Decode(format!("{} message truncated in {field}", self.what))
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], CdcError> {
        if self.bytes.len() < n {
            return Err(self.truncated(field));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], CdcError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &str) -> Result<u8, CdcError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16, CdcError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &str) -> Result<u32, CdcError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: &str) -> Result<i32, CdcError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    /// A NUL-terminated UTF-8 string.
    fn cstr(&mut self, field: &str) -> Result<String, CdcError> {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated(field))?;
        let text = self.take(end, field)?;
        self.take(1, field)?;
        String::from_utf8(text.to_vec())
            .map_err(|_| CdcError::Decode(format!("{} message: {field} is not UTF-8", self.what)))
    }

    /// A byte string of an `i32` length.
    fn sized(&mut self, field: &str) -> Result<Vec<u8>, CdcError> {
        let len = self.i32(field)?;
        let len = usize::try_from(len).map_err(|_| {
            CdcError::Decode(format!("{} message: {field} has length {len}", self.what))
        })?;
        Ok(self.take(len, field)?.to_vec())
    }

    fn end(&self) -> Result<(), CdcError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(CdcError::Decode(format!(
                "{} message has {} bytes left over",
                self.what,
                self.bytes.len()
            )))
        }
    }
}

/// Decodes one `pgoutput` message (the payload of an XLogData that is not a Begin, Commit
/// or logical message).
pub(crate) fn decode(data: &[u8]) -> Result<Change, CdcError> {
    let Some((&tag, rest)) = data.split_first() else {
        return Err(CdcError::Decode("empty pgoutput message".into()));
    };
    match tag {
        b'R' => {
            let mut r = Reader {
                bytes: rest,
                what: "relation",
            };
            let oid = r.u32("the relation id")?;
            let schema = r.cstr("the schema name")?;
            let name = r.cstr("the table name")?;
            let _replica_identity = r.u8("the replica identity")?;
            let count = r.u16("the column count")?;
            let mut columns = Vec::with_capacity(usize::from(count.min(1600)));
            for _ in 0..count {
                let _flags = r.u8("a column's flags")?;
                let name = r.cstr("a column's name")?;
                let type_oid = r.u32("a column's type")?;
                let _modifier = r.i32("a column's type modifier")?;
                columns.push(Column { name, type_oid });
            }
            r.end()?;
            Ok(Change::Relation(Relation {
                oid,
                schema,
                name,
                columns,
            }))
        }
        b'I' => {
            let mut r = Reader {
                bytes: rest,
                what: "insert",
            };
            let relation = r.u32("the relation id")?;
            let marker = r.u8("the new-tuple marker")?;
            if marker != b'N' {
                return Err(CdcError::Decode(format!(
                    "insert message: expected the new-tuple marker 'N', found byte {marker}"
                )));
            }
            let row = tuple(&mut r)?;
            r.end()?;
            Ok(Change::Insert { relation, row })
        }
        b'U' => {
            let mut r = Reader {
                bytes: rest,
                what: "update",
            };
            Ok(Change::Update {
                relation: r.u32("the relation id")?,
            })
        }
        b'D' => {
            let mut r = Reader {
                bytes: rest,
                what: "delete",
            };
            Ok(Change::Delete {
                relation: r.u32("the relation id")?,
            })
        }
        b'T' => {
            let mut r = Reader {
                bytes: rest,
                what: "truncate",
            };
            let count = r.u32("the relation count")?;
            let _options = r.u8("the options")?;
            let mut relations = Vec::new();
            for _ in 0..count {
                relations.push(r.u32("a relation id")?);
            }
            r.end()?;
            Ok(Change::Truncate { relations })
        }
        b'Y' => {
            let mut r = Reader {
                bytes: rest,
                what: "type",
            };
            r.u32("the type id")?;
            r.cstr("the schema name")?;
            r.cstr("the type name")?;
            r.end()?;
            Ok(Change::Type)
        }
        b'O' => {
            let mut r = Reader {
                bytes: rest,
                what: "origin",
            };
            r.take(8, "the origin's commit position")?;
            r.cstr("the origin's name")?;
            r.end()?;
            Ok(Change::Origin)
        }
        other => Err(CdcError::Decode(format!(
            "unknown pgoutput message tag {:?} (byte {other})",
            char::from(other)
        ))),
    }
}

/// TupleData: a column count, then each column as `n` (null), `u` (unchanged TOAST), `t`
/// (text) or `b` (binary), the last two with an `i32` length.
fn tuple(r: &mut Reader<'_>) -> Result<Vec<Value>, CdcError> {
    let count = r.u16("the column count")?;
    let mut row = Vec::with_capacity(usize::from(count.min(1600)));
    for _ in 0..count {
        let value = match r.u8("a column's kind")? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => Value::Text(r.sized("a text value")?),
            b'b' => {
                r.sized("a binary value")?;
                Value::Binary
            }
            other => {
                return Err(CdcError::Decode(format!(
                    "{} message: unknown column kind {:?} (byte {other})",
                    r.what,
                    char::from(other)
                )));
            }
        };
        row.push(value);
    }
    Ok(row)
}

/// Where the outbox's columns are in the rows of its relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OutboxLayout {
    table: String,
    width: usize,
    id: usize,
    destination: usize,
    key: usize,
    payload: usize,
    headers: usize,
    created_at: usize,
    available_at: Option<usize>,
    attempts: Option<usize>,
    last_error: Option<usize>,
}

impl OutboxLayout {
    /// The layout of `relation`, which must have the outbox's columns with their types
    /// (`outbox-sqlx`'s PostgreSQL schema).
    pub(crate) fn new(relation: &Relation) -> Result<Self, CdcError> {
        let table = relation.qualified();
        let find = |name: &str, types: &[u32]| -> Result<Option<usize>, CdcError> {
            let Some(index) = relation.columns.iter().position(|c| c.name == name) else {
                return Ok(None);
            };
            let type_oid = relation.columns[index].type_oid;
            if types.contains(&type_oid) {
                Ok(Some(index))
            } else {
                Err(CdcError::Mismatch(format!(
                    "the outbox table {table}: column {name} has type OID {type_oid}, not \
                     the type the outbox schema gives it (OIDs {types:?})"
                )))
            }
        };
        let required = |name: &str, types: &[u32]| -> Result<usize, CdcError> {
            find(name, types)?.ok_or_else(|| {
                CdcError::Mismatch(format!(
                    "the outbox table {table} has no column {name}: is it the outbox, \
                     migrated by outbox-sqlx?"
                ))
            })
        };
        Ok(Self {
            width: relation.columns.len(),
            id: required("id", &[UUID])?,
            destination: required("destination", &[TEXT, VARCHAR])?,
            key: required("key", &[TEXT, VARCHAR])?,
            payload: required("payload", &[BYTEA])?,
            headers: required("headers", &[TEXT, VARCHAR])?,
            created_at: required("created_at", &[TIMESTAMPTZ])?,
            available_at: find("available_at", &[TIMESTAMPTZ])?,
            attempts: find("attempts", &[INT2, INT4, INT8])?,
            last_error: find("last_error", &[TEXT, VARCHAR])?,
            table,
        })
    }

    /// The message of an inserted row; a row whose id is readable but another column is not
    /// is [`Malformed`] (for the dead letters, as the polling store does), and a row without
    /// a readable id is an error: nothing could name it.
    pub(crate) fn message(&self, row: &[Value]) -> Result<Result<Message, Malformed>, CdcError> {
        if row.len() != self.width {
            return Err(CdcError::Decode(format!(
                "an insert into {} has {} columns, its relation {}",
                self.table,
                row.len(),
                self.width
            )));
        }
        let id = text(&row[self.id], "id")
            .and_then(|id| id.ok_or_else(|| String::from("column id is NULL")))
            .and_then(|id| {
                Uuid::parse_str(id).map_err(|err| format!("column id {id:?} is not a UUID: {err}"))
            })
            .map(MessageId::from_uuid)
            .map_err(|error| CdcError::Decode(format!("an insert into {}: {error}", self.table)))?;
        let key = text(&row[self.key], "key").map(|key| key.map(str::to_owned));
        let readable_key = key.clone().ok().flatten();
        let decoded = self.decode(id, key, row);
        Ok(decoded.map_err(|error| Malformed {
            id,
            key: readable_key,
            error,
        }))
    }

    /// Whether an inserted row was written to become available later (its `available_at`
    /// past its `created_at`): such a row is the table's to publish when it is due.
    pub(crate) fn deferred(&self, row: &[Value]) -> bool {
        let Some(index) = self.available_at else {
            return false;
        };
        let time = |index: usize| {
            row.get(index)
                .and_then(|value| text(value, "").ok().flatten())
                .and_then(|text| timestamptz(text).ok())
        };
        match (time(index), time(self.created_at)) {
            (Some(available), Some(created)) => available > created,
            _ => false,
        }
    }

    fn decode(
        &self,
        id: MessageId,
        key: Result<Option<String>, String>,
        row: &[Value],
    ) -> Result<Message, String> {
        let destination = required(row, self.destination, "destination")?;
        let payload = hex_bytea(required(row, self.payload, "payload")?)?;
        let headers = decode_headers(required(row, self.headers, "headers")?)
            .map_err(|err| format!("headers are not a JSON object of strings: {err}"))?;
        let created_at = timestamptz(required(row, self.created_at, "created_at")?)?;
        let attempts = match self.attempts {
            Some(index) => match text(&row[index], "attempts")? {
                Some(n) => n
                    .parse::<u32>()
                    .map_err(|_| format!("column attempts: {n:?} is not a count"))?,
                None => 0,
            },
            None => 0,
        };
        let last_error = match self.last_error {
            Some(index) => text(&row[index], "last_error")?.map(str::to_owned),
            None => None,
        };
        let mut new = NewMessage::new(destination, payload).with_id(id);
        if let Some(key) = key? {
            new = new.key(key);
        }
        for (name, value) in headers {
            new = new.header(name, value);
        }
        Ok(Message::new(new, created_at).with_attempts(attempts, last_error))
    }
}

/// The text value of column `index`, which must not be NULL.
fn required<'v>(row: &'v [Value], index: usize, name: &str) -> Result<&'v str, String> {
    match row.get(index) {
        Some(value) => text(value, name)?.ok_or_else(|| format!("column {name} is NULL")),
        None => Err(format!("column {name} is missing")),
    }
}

/// A text value, `None` for NULL.
fn text<'v>(value: &'v Value, name: &str) -> Result<Option<&'v str>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Text(bytes) => std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|_| format!("column {name} is not UTF-8")),
        Value::Unchanged => Err(format!("column {name} is an unchanged TOAST value")),
        Value::Binary => Err(format!("column {name} is in binary form, not text")),
    }
}

/// `bytea` in PostgreSQL's hex output (`\x` then two digits a byte): the replication
/// session sets `bytea_output = hex`.
fn hex_bytea(text: &str) -> Result<Vec<u8>, String> {
    let digits = text.strip_prefix("\\x").ok_or_else(|| {
        String::from("column payload is not in bytea's hex form (\\x...): bytea_output must be hex")
    })?;
    if digits.len() % 2 != 0 {
        return Err(String::from(
            "column payload has an odd number of hex digits",
        ));
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err(format!(
            "column payload has a non-hex character {:?}",
            char::from(b)
        )),
    };
    digits
        .as_bytes()
        .chunks_exact(2)
        .map(|pair| Ok((digit(pair[0])? << 4) | digit(pair[1])?))
        .collect()
}

/// `timestamptz` in the ISO output style (`2026-12-02 18:08:16.123456+00`): the replication
/// session sets `DateStyle = ISO` and `TimeZone = UTC`, and other offsets are read too.
fn timestamptz(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
        .map(|time| time.with_timezone(&Utc))
        .map_err(|err| format!("column created_at {text:?} is not an ISO timestamp: {err}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput messages by hand.
    #[derive(Default)]
    pub(crate) struct Wire(pub(crate) Vec<u8>);

    impl Wire {
        pub(crate) fn new(tag: u8) -> Self {
            Self(vec![tag])
        }
        pub(crate) fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub(crate) fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn cstr(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        pub(crate) fn text(mut self, s: &str) -> Self {
            self.0.push(b't');
            self.0.extend_from_slice(&(s.len() as i32).to_be_bytes());
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        pub(crate) fn null(mut self) -> Self {
            self.0.push(b'n');
            self
        }
    }

    /// The outbox table's columns, in the order of outbox-sqlx's PostgreSQL migrations.
    pub(crate) const OUTBOX_COLUMNS: [(&str, u32); 16] = [
        ("seq", INT8),
        ("id", UUID),
        ("partition", INT2),
        ("destination", TEXT),
        ("key", TEXT),
        ("payload", BYTEA),
        ("headers", TEXT),
        ("created_at", TIMESTAMPTZ),
        ("available_at", TIMESTAMPTZ),
        ("attempts", INT4),
        ("last_error", TEXT),
        ("state", INT2),
        ("lease_token", UUID),
        ("lease_until", TIMESTAMPTZ),
        ("dead_at", TIMESTAMPTZ),
        ("published_at", TIMESTAMPTZ),
    ];

    pub(crate) fn relation(oid: u32, schema: &str, name: &str) -> Vec<u8> {
        let mut wire = Wire::new(b'R')
            .u32(oid)
            .cstr(schema)
            .cstr(name)
            .u8(b'd')
            .u16(OUTBOX_COLUMNS.len() as u16);
        for (column, type_oid) in OUTBOX_COLUMNS {
            wire = wire.u8(0).cstr(column).u32(type_oid).u32(u32::MAX);
        }
        wire.0
    }

    /// An insert into the outbox relation `oid` with these values of the columns that matter.
    pub(crate) fn insert(
        oid: u32,
        id: &str,
        key: Option<&str>,
        payload_hex: &str,
        headers: &str,
    ) -> Vec<u8> {
        let mut wire = Wire::new(b'I')
            .u32(oid)
            .u8(b'N')
            .u16(OUTBOX_COLUMNS.len() as u16)
            .text("1")
            .text(id)
            .text("7")
            .text("orders");
        wire = match key {
            Some(key) => wire.text(key),
            None => wire.null(),
        };
        wire.text(payload_hex)
            .text(headers)
            .text("2026-12-02 18:08:16.123456+00")
            .text("2026-12-02 18:08:16.123456+00")
            .text("0")
            .null()
            .text("0")
            .null()
            .null()
            .null()
            .null()
            .0
    }

    const ID: &str = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";

    fn layout() -> OutboxLayout {
        let Ok(Change::Relation(rel)) = decode(&relation(16385, "public", "outbox")) else {
            panic!("the relation decodes");
        };
        OutboxLayout::new(&rel).expect("the outbox layout")
    }

    fn row_of(bytes: &[u8]) -> Vec<Value> {
        match decode(bytes).expect("decodes") {
            Change::Insert { row, .. } => row,
            other => panic!("not an insert: {other:?}"),
        }
    }

    #[test]
    fn a_relation_and_an_insert_decode_into_a_message() {
        let Ok(Change::Relation(rel)) = decode(&relation(16385, "public", "outbox")) else {
            panic!("the relation decodes");
        };
        assert_eq!(
            (rel.oid, rel.qualified()),
            (16385, "public.outbox".to_owned())
        );
        assert_eq!(rel.columns.len(), 16);
        let layout = OutboxLayout::new(&rel).expect("layout");
        let bytes = insert(
            16385,
            ID,
            Some("order-1"),
            "\\x00ff7b",
            r#"{"type":"Created"}"#,
        );
        let Ok(Change::Insert { relation, row }) = decode(&bytes) else {
            panic!("the insert decodes");
        };
        assert_eq!(relation, 16385);
        let message = layout.message(&row).expect("a row").expect("a message");
        assert_eq!(message.id.to_string(), ID);
        assert_eq!(message.destination, "orders");
        assert_eq!(message.key.as_deref(), Some("order-1"));
        assert_eq!(message.payload, vec![0x00, 0xff, 0x7b]);
        assert_eq!(
            message.headers.get("type").map(String::as_str),
            Some("Created")
        );
        assert_eq!(
            message.created_at.to_rfc3339(),
            "2026-12-02T18:08:16.123456+00:00"
        );
        assert_eq!((message.attempts, message.last_error), (0, None));

        let keyless = layout
            .message(&row_of(&insert(16385, ID, None, "\\x", "{}")))
            .expect("a row")
            .expect("a message");
        assert_eq!((keyless.key, keyless.payload.len()), (None, 0));
    }

    #[test]
    fn timestamps_in_other_offsets_and_without_fractions_are_read() {
        let at = |text: &str| timestamptz(text).map(|t| t.to_rfc3339());
        assert_eq!(
            at("2026-12-02 18:08:16+00"),
            Ok("2026-12-02T18:08:16+00:00".into())
        );
        assert_eq!(
            at("2026-12-02 23:38:16.5+05:30"),
            Ok("2026-12-02T18:08:16.500+00:00".into())
        );
        assert!(at("12/02/2026 18:08:16 UTC").is_err());
        assert!(at("infinity").is_err());
    }

    #[test]
    fn bytea_is_read_in_hex_form_only() {
        assert_eq!(hex_bytea("\\x"), Ok(vec![]));
        assert_eq!(hex_bytea("\\xDEADbeef"), Ok(vec![0xde, 0xad, 0xbe, 0xef]));
        assert!(hex_bytea("\\x0").is_err());
        assert!(hex_bytea("\\x0g").is_err());
        assert!(hex_bytea("abc").is_err(), "escape form");
        assert!(hex_bytea("\\xé0").is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        for bytes in [
            relation(16385, "public", "outbox"),
            insert(16385, ID, Some("k"), "\\x01", "{}"),
            Wire::new(b'T').u32(2).u8(0).u32(1).u32(2).0,
            Wire::new(b'Y').u32(1).cstr("public").cstr("mood").0,
            Wire::new(b'O').u32(0).u32(1).cstr("origin").0,
        ] {
            assert!(decode(&bytes).is_ok());
            for len in 0..bytes.len() {
                let err = decode(&bytes[..len]).expect_err("truncated");
                assert!(matches!(err, CdcError::Decode(_)), "{len}: {err}");
            }
        }
    }

    #[test]
    fn left_over_bytes_and_unknown_tags_are_errors() {
        let mut long = insert(16385, ID, Some("k"), "\\x01", "{}");
        long.push(0);
        assert!(matches!(decode(&long), Err(CdcError::Decode(m)) if m.contains("left over")));
        for tag in [b'B', b'C', b'M', b'S', b'E', b'c', b'A', b'Z', 0, 0xff] {
            let err = decode(&Wire::new(tag).u32(1).0).expect_err("unknown");
            assert!(
                err.to_string().contains("unknown pgoutput message tag"),
                "{err}"
            );
        }
        let bad_marker = Wire::new(b'I').u32(1).u8(b'K').u16(0).0;
        assert!(decode(&bad_marker).is_err());
        let bad_kind = Wire::new(b'I').u32(1).u8(b'N').u16(1).u8(b'x').0;
        assert!(decode(&bad_kind).is_err());
        let negative = Wire::new(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .u32(u32::MAX)
            .0;
        assert!(decode(&negative).is_err());
        let huge = Wire::new(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .u32(i32::MAX as u32)
            .0;
        assert!(decode(&huge).is_err());
        let not_utf8 = Wire::new(b'R').u32(1).u8(0xff).u8(0).0;
        assert!(decode(&not_utf8).is_err());
    }

    #[test]
    fn updates_deletes_and_truncates_are_recognised() {
        assert_eq!(
            decode(&Wire::new(b'U').u32(7).u8(b'N').u16(0).0).expect("update"),
            Change::Update { relation: 7 }
        );
        assert_eq!(
            decode(&Wire::new(b'D').u32(7).u8(b'K').u16(0).0).expect("delete"),
            Change::Delete { relation: 7 }
        );
        assert_eq!(
            decode(&Wire::new(b'T').u32(2).u8(0).u32(7).u32(8).0).expect("truncate"),
            Change::Truncate {
                relations: vec![7, 8]
            }
        );
    }

    #[test]
    fn damaged_values_make_the_row_malformed_but_keep_its_id() {
        let layout = layout();
        for (payload, headers) in [
            ("\\x0", "{}"),
            ("\\x00", "{\"a\":1}"),
            ("\\x00", "not json"),
            ("escape", "{}"),
        ] {
            let malformed = layout
                .message(&row_of(&insert(16385, ID, Some("k"), payload, headers)))
                .expect("a row")
                .expect_err("malformed");
            assert_eq!(malformed.id.to_string(), ID);
            assert_eq!(malformed.key.as_deref(), Some("k"));
        }
        let no_id = layout.message(&row_of(&insert(16385, "not-a-uuid", None, "\\x", "{}")));
        assert!(matches!(no_id, Err(CdcError::Decode(_))));
        let short = layout.message(&[Value::Null]);
        assert!(matches!(short, Err(CdcError::Decode(_))));
    }

    #[test]
    fn a_table_without_the_outbox_columns_is_refused() {
        let other = Wire::new(b'R')
            .u32(1)
            .cstr("public")
            .cstr("orders")
            .u8(b'd')
            .u16(1)
            .u8(1)
            .cstr("id")
            .u32(INT8)
            .u32(u32::MAX)
            .0;
        let Ok(Change::Relation(rel)) = decode(&other) else {
            panic!("decodes");
        };
        let err = OutboxLayout::new(&rel).expect_err("not the outbox");
        assert!(
            err.to_string().contains("column id has type OID 20"),
            "{err}"
        );
    }
}
