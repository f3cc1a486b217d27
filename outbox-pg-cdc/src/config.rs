//! [`CdcConfig`]: where the database is, which outbox table the log is read for, and the
//! names of the slot and publication that carry it; the validation that keeps every name
//! that reaches SQL or a replication command a plain identifier.

use std::fmt;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::CdcError;

/// Longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`).
const MAX_IDENT: usize = 63;

/// Settings of a [`PgLogSource`](crate::PgLogSource) and a [`CdcAdmin`](crate::CdcAdmin).
/// Only the URL is required; build one with the setters:
///
/// ```
/// use std::time::Duration;
/// use outbox_pg_cdc::CdcConfig;
///
/// let config = CdcConfig::new("postgres://relay:s3cret@db.example:5432/app")
///     .table("app.outbox")
///     .slot("outbox_orders")
///     .publication("outbox_orders")
///     .status_interval(Duration::from_millis(500));
/// config.validate()?;
/// assert!(!format!("{config:?}").contains("s3cret"));
///
/// let parsed: CdcConfig = serde_json::from_str(
///     r#"{"url": "postgres://relay@db/app", "slot": "outbox_orders", "status_interval": "2s"}"#,
/// )?;
/// assert_eq!(parsed.status_interval, Duration::from_secs(2));
/// assert_eq!(parsed.table, "outbox");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// It deserializes from configuration files (durations as `"1s"`); `Debug` never shows the
/// password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
#[serde(default, deny_unknown_fields)]
pub struct CdcConfig {
    /// The database: `postgres://user:password@host:port/dbname`. The `host`, `port`,
    /// `user`, `password` and `dbname` query parameters are read too (`host=/run/postgresql`
    /// for a Unix socket). The database name defaults to the user name. `sslmode` may be
    /// `disable`, `allow` or `prefer`, and the connection is then made without TLS: this
    /// release of the log source has none. The role needs `REPLICATION` (or superuser) to
    /// stream, and to create the publication it must own the outbox table.
    pub url: String,
    /// The outbox table, as `outbox-sqlx` names it (default `outbox`): `table` or
    /// `schema.table`, each part matching `[A-Za-z_][A-Za-z0-9_]*` (at most 63 characters).
    /// Names are quoted, hence case-sensitive.
    pub table: String,
    /// The logical replication slot (default `outbox_cdc`): `[a-z0-9_]`, 1 to 63 characters.
    /// The slot keeps the position up to which the broker confirmed every message; the server
    /// keeps the WAL from there on.
    pub slot: String,
    /// The publication that carries the outbox table's inserts (default `outbox_cdc`):
    /// `[a-z0-9_]`, 1 to 63 characters.
    pub publication: String,
    /// How often the acknowledged position is reported to the server at most (default 1 s):
    /// the slot's `confirmed_flush_lsn` trails the broker's confirmations by up to this much.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// The prefix of the messages written without a row (default `outbox`):
    /// `pg_logical_emit_message(true, '<prefix>', <JSON envelope>)` in the writer's
    /// transaction. Logical decoding messages of other prefixes are left alone. 1 to 64
    /// characters.
    pub message_prefix: String,
}

impl Default for CdcConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            table: String::from("outbox"),
            slot: String::from("outbox_cdc"),
            publication: String::from("outbox_cdc"),
            status_interval: Duration::from_secs(1),
            message_prefix: String::from("outbox"),
        }
    }
}

impl CdcConfig {
    /// The defaults with `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Sets [`CdcConfig::url`].
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Sets [`CdcConfig::table`].
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Sets [`CdcConfig::slot`].
    pub fn slot(mut self, slot: impl Into<String>) -> Self {
        self.slot = slot.into();
        self
    }

    /// Sets [`CdcConfig::publication`].
    pub fn publication(mut self, publication: impl Into<String>) -> Self {
        self.publication = publication.into();
        self
    }

    /// Sets [`CdcConfig::message_prefix`].
    pub fn message_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.message_prefix = prefix.into();
        self
    }

    /// Sets [`CdcConfig::status_interval`].
    pub fn status_interval(mut self, interval: Duration) -> Self {
        self.status_interval = interval;
        self
    }

    /// Checks every setting without connecting: the URL, the table name, the slot and
    /// publication names, the status interval.
    pub fn validate(&self) -> Result<(), CdcError> {
        Connection::parse(&self.url)?;
        TableName::parse(&self.table)?;
        check_replication_name("slot", &self.slot)?;
        check_replication_name("publication", &self.publication)?;
        if self.status_interval.is_zero() || self.status_interval > Duration::from_secs(3600) {
            return Err(CdcError::config(
                "status_interval",
                format!("{:?} is not between 1 ns and 1 h", self.status_interval),
            ));
        }
        if self.message_prefix.is_empty() || self.message_prefix.len() > 64 {
            return Err(CdcError::config(
                "message_prefix",
                format!("{:?} is not 1 to 64 characters", self.message_prefix),
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for CdcConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match Connection::parse(&self.url) {
            Ok(connection) => connection.to_string(),
            // No telling where a secret sits in a URL that does not parse.
            Err(_) => String::from("********"),
        };
        f.debug_struct("CdcConfig")
            .field("url", &url)
            .field("table", &self.table)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("status_interval", &self.status_interval)
            .field("message_prefix", &self.message_prefix)
            .finish()
    }
}

/// Slot and publication names: the replication client writes them into its
/// `START_REPLICATION` command unquoted, so nothing but `[a-z0-9_]{1,63}` is let through.
fn check_replication_name(field: &'static str, name: &str) -> Result<(), CdcError> {
    let valid = (1..=MAX_IDENT).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(CdcError::config(
            field,
            format!("{name:?} must match [a-z0-9_]{{1,{MAX_IDENT}}}"),
        ))
    }
}

/// `^[A-Za-z_][A-Za-z0-9_]{0,62}$`, as `outbox-sqlx` checks table names.
fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    name.len() <= MAX_IDENT
        && (first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The outbox table's name, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableName {
    pub(crate) schema: Option<String>,
    pub(crate) name: String,
}

impl TableName {
    pub(crate) fn parse(table: &str) -> Result<Self, CdcError> {
        let invalid = |why: &str| {
            CdcError::config(
                "table",
                format!(
                    "{table:?}: {why}; names must match [A-Za-z_][A-Za-z0-9_]* (at most \
                     {MAX_IDENT} characters per part)"
                ),
            )
        };
        let parts: Vec<&str> = table.split('.').collect();
        let (schema, name) = match parts.as_slice() {
            [name] => (None, *name),
            [schema, name] => (Some(*schema), *name),
            _ => return Err(invalid("at most one `.` may separate schema and table")),
        };
        for part in schema.iter().chain(std::iter::once(&name)) {
            if !is_identifier(part) {
                return Err(invalid(&format!("{part:?} is not a plain identifier")));
            }
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// Quoted (and qualified when a schema was given), for SQL: `"app"."outbox"`.
    pub(crate) fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }

    /// As a `regclass` literal, for `to_regclass('...')`: identifiers hold no quote, so the
    /// literal is safe as it is.
    pub(crate) fn regclass_literal(&self) -> String {
        format!("'{}'", self.quoted())
    }
}

/// Where and as whom to connect, parsed from [`CdcConfig::url`].
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Connection {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) dbname: String,
}

impl Connection {
    pub(crate) fn parse(text: &str) -> Result<Self, CdcError> {
        let bad = |reason: String| CdcError::config("url", reason);
        if text.is_empty() {
            return Err(bad("required".into()));
        }
        // The text may hold a password: errors never repeat it.
        let url = url::Url::parse(text).map_err(|err| bad(format!("not a URL ({err})")))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(bad(format!(
                "the scheme is {:?}, not postgres:// or postgresql://",
                url.scheme()
            )));
        }
        let decode = |part: &str, what: &str| {
            percent_decode_str(part)
                .decode_utf8()
                .map(|text| text.into_owned())
                .map_err(|_| bad(format!("the {what} is not UTF-8 once percent-decoded")))
        };
        let mut host = decode(url.host_str().unwrap_or_default(), "host")?;
        // IPv6 literals keep their brackets in the URL; the socket address takes none.
        if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            host = inner.to_owned();
        }
        let mut port = url.port();
        let mut user = decode(url.username(), "user name")?;
        let mut password = decode(url.password().unwrap_or_default(), "password")?;
        let mut dbname = decode(url.path().trim_start_matches('/'), "database name")?;
        for (name, value) in url.query_pairs() {
            match name.as_ref() {
                "host" => host = value.into_owned(),
                "port" => {
                    port = Some(value.parse().map_err(|_| {
                        bad(format!(
                            "port {value:?} is not a number between 0 and 65535"
                        ))
                    })?);
                }
                "user" => user = value.into_owned(),
                "password" => password = value.into_owned(),
                "dbname" => dbname = value.into_owned(),
                "sslmode" => match value.as_ref() {
                    "disable" | "allow" | "prefer" => {}
                    other => {
                        return Err(bad(format!(
                            "sslmode={other}: this release of the log source connects \
                             without TLS (use disable, or a private network)"
                        )));
                    }
                },
                _ => {}
            }
        }
        if host.is_empty() {
            return Err(bad("no host".into()));
        }
        if user.is_empty() {
            return Err(bad("no user name".into()));
        }
        if dbname.is_empty() {
            dbname.clone_from(&user);
        }
        Ok(Self {
            host,
            port: port.unwrap_or(5432),
            user,
            password,
            dbname,
        })
    }

    /// Options of a normal (not replication) connection to the same database as the same
    /// role, for administration.
    pub(crate) fn connect_options(&self) -> PgConnectOptions {
        let options = PgConnectOptions::new_without_pgpass()
            .port(self.port)
            .username(&self.user)
            .database(&self.dbname)
            .ssl_mode(PgSslMode::Disable)
            .application_name("outbox-pg-cdc");
        let options = if self.host.starts_with('/') {
            options.socket(&self.host)
        } else {
            options.host(&self.host)
        };
        if self.password.is_empty() {
            options
        } else {
            options.password(&self.password)
        }
    }
}

/// `postgres://user:********@host:port/dbname`.
impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let password = if self.password.is_empty() {
            ""
        } else {
            ":********"
        };
        write!(
            f,
            "postgres://{}{password}@{}:{}/{}",
            self.user, self.host, self.port, self.dbname
        )
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Connection({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_with_their_defaults() {
        let c = Connection::parse("postgres://relay:p%40ss@db.example:6543/app").expect("valid");
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.user.as_str(),
                c.password.as_str(),
                c.dbname.as_str()
            ),
            ("db.example", 6543, "relay", "p@ss", "app")
        );
        let c = Connection::parse("postgresql://relay@127.0.0.1").expect("valid");
        assert_eq!(
            (c.port, c.dbname.as_str(), c.password.as_str()),
            (5432, "relay", "")
        );
        let c = Connection::parse(
            "postgres://relay@localhost/app?host=/run/postgresql&port=5433&sslmode=disable",
        )
        .expect("valid");
        assert_eq!((c.host.as_str(), c.port), ("/run/postgresql", 5433));
        let c = Connection::parse("postgres://relay@[::1]:5432/app").expect("valid");
        assert_eq!(c.host, "::1");
    }

    #[test]
    fn bad_urls_are_refused_without_showing_the_password() {
        for url in [
            "",
            "mysql://relay:s3cret@db/app",
            "postgres://:s3cret@db/app",
            "postgres://relay:s3cret@db/app?sslmode=require",
            "postgres://relay:s3cret@db/app?port=x",
            "not a url s3cret",
        ] {
            let err = Connection::parse(url).expect_err(url);
            assert!(
                matches!(err, CdcError::Config { field: "url", .. }),
                "{url}: {err}"
            );
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn names_are_plain_identifiers() {
        let ok = CdcConfig::new("postgres://relay@db/app");
        assert!(ok.validate().is_ok());
        assert!(ok.clone().table("App_1.Outbox_2").validate().is_ok());
        for table in [
            "a; DROP TABLE b",
            "a.b.c",
            "",
            "a\"b",
            "1a",
            "tablé",
            "a.",
            ".a",
        ] {
            let err = ok.clone().table(table).validate().expect_err(table);
            assert!(
                matches!(err, CdcError::Config { field: "table", .. }),
                "{err}"
            );
        }
        let long = "a".repeat(64);
        for name in ["", "Outbox", "a-b", "a b", "a'b", "ä", long.as_str(), "x;y"] {
            let err = ok.clone().slot(name).validate().expect_err(name);
            assert!(
                matches!(err, CdcError::Config { field: "slot", .. }),
                "{err}"
            );
            let err = ok.clone().publication(name).validate().expect_err(name);
            assert!(
                matches!(
                    err,
                    CdcError::Config {
                        field: "publication",
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert!(ok.clone().slot("a".repeat(63)).validate().is_ok());
        let err = ok
            .status_interval(Duration::ZERO)
            .validate()
            .expect_err("zero");
        assert!(matches!(
            err,
            CdcError::Config {
                field: "status_interval",
                ..
            }
        ));
    }

    #[test]
    fn tables_are_quoted() {
        let table = TableName::parse("app.outbox").expect("valid");
        assert_eq!(table.quoted(), r#""app"."outbox""#);
        assert_eq!(table.regclass_literal(), r#"'"app"."outbox"'"#);
        assert_eq!(
            TableName::parse("outbox").expect("valid").quoted(),
            r#""outbox""#
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let config = CdcConfig::new("postgres://relay:s3cret@db/app?password=other");
        let text = format!("{config:?}");
        assert!(
            !text.contains("s3cret") && !text.contains("other"),
            "{text}"
        );
        assert!(text.contains("db"), "{text}");
        let text = format!("{:?}", CdcConfig::new("s3cret not a url"));
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn configuration_text_is_read() {
        let config: CdcConfig =
            serde_json::from_str(r#"{"url": "postgres://r@h/d", "status_interval": "250ms"}"#)
                .expect("parses");
        assert_eq!(config.status_interval, Duration::from_millis(250));
        assert_eq!(config.slot, "outbox_cdc");
        assert!(serde_json::from_str::<CdcConfig>(r#"{"slots": "x"}"#).is_err());
    }
}
