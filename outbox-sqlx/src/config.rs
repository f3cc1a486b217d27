//! [`StoreConfig`]: the outbox table, retention, limits and wake-up channel of a store, and the
//! validation that keeps table names from ever carrying SQL.

use std::fmt;
use std::time::Duration;

use outbox_core::{Limits, StoreError, StoreErrorKind};
use serde::Deserialize;

/// Largest pool a store opens: far above what one relay or service needs, far below what
/// would exhaust memory (each pooled connection reserves buffers up front).
const MAX_CONNECTIONS: u32 = 1000;

/// Longest identifier part PostgreSQL keeps (`NAMEDATALEN - 1`); MySQL allows 64.
const MAX_IDENT: usize = 63;

/// Longest suffix appended to the table name for the tables and indexes the store derives
/// from it (`_partitions`). The table part is limited so that every derived name still fits
/// [`MAX_IDENT`]: PostgreSQL would otherwise truncate them silently, and two truncated names
/// could collide.
const LONGEST_SUFFIX: usize = "_partitions".len();

/// Settings of a [`PostgresStore`](crate::PostgresStore), [`MySqlStore`](crate::MySqlStore) or
/// [`SqliteStore`](crate::SqliteStore). Every field has a default; build one with the setters:
///
/// ```
/// use std::time::Duration;
/// use outbox_sqlx::StoreConfig;
///
/// let config = StoreConfig::new()
///     .table("app.outbox")
///     .retention(Duration::from_secs(24 * 3600));
/// assert_eq!(config.table, "app.outbox");
/// ```
///
/// It also deserializes from configuration files (durations as `"1h"`, `"30s"`), for the
/// standalone relay; `Debug` never shows the password of [`StoreConfig::url`].
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Database URL, used by the stores' `connect` constructors (not by `new`, which takes a
    /// pool). May hold a password: it is never printed.
    pub url: Option<String>,
    /// Outbox table name (default `outbox`). PostgreSQL and MySQL accept `schema.table`
    /// (`database.table` on MySQL). Each part must match `[A-Za-z_][A-Za-z0-9_]*`, at most 63
    /// characters, and the table part at most 52 so that the derived names
    /// `{table}_partitions`, `{table}_relays` and `{table}_schema` fit too. Names are quoted,
    /// hence case-sensitive.
    pub table: String,
    /// Keep published messages, marked with `published_at`, for this long before
    /// [`Store::cleanup`](outbox_core::Store::cleanup) deletes them; `None` (the default)
    /// deletes them as soon as they are published.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// Limits checked at enqueue (the default [`Limits`] fit every broker's defaults).
    pub limits: Limits,
    /// PostgreSQL only: the `NOTIFY` channel the outbox table's trigger signals on (for every
    /// `INSERT`, enqueue's or another writer's) and
    /// [`Store::listen`](outbox_core::Store::listen) listens to. Defaults to the table name.
    /// [`PostgresStore::migrate`](crate::PostgresStore::migrate) sets the trigger's channel.
    pub notify_channel: Option<String>,
    /// PostgreSQL only: whether the outbox table sends a `NOTIFY` that wakes a listening relay
    /// when a transaction that inserted into it commits (default true);
    /// [`PostgresStore::migrate`](crate::PostgresStore::migrate) adds or removes the table's
    /// trigger accordingly. PostgreSQL commits notifying transactions one at a time (it holds
    /// a cluster-wide lock while it queues their notifications), so with many concurrent
    /// writers they no longer share disk flushes: measured with 8 writers, 1.6x to 2.0x slower
    /// than without the outbox, against 1.1x to 1.4x without the `NOTIFY`. Without it the
    /// relay finds new messages by polling, between its `poll_min` and `poll_max` (a busy
    /// relay polls every `poll_min`).
    pub notify: bool,
    /// Connections of the pool the `connect` constructors open (default 10). A relay has up to
    /// its `concurrency` + 2 store calls in flight (6 with the default concurrency of 4) and
    /// refuses to start on a smaller pool; the rest serves the service's own transactions, or
    /// the readiness probe of `outbox-relay`.
    pub max_connections: u32,
    /// How a claim keeps its messages from other claims while they are published; `None`
    /// (the default) lets the store pick what measured fastest on it: PostgreSQL
    /// [`ClaimMode::Transaction`], MySQL [`ClaimMode::Lease`]. PostgreSQL and MySQL take both;
    /// SQLite, with one writer, claims by lease whatever this says (a write transaction held
    /// while a batch is published would block the service's own writes).
    pub claim_mode: Option<ClaimMode>,
    /// PostgreSQL only, with [`ClaimMode::Transaction`]: claim only the messages handed to
    /// the table (default false). Set it on the store of the polling relay that runs beside a
    /// log relay (change data capture, `outbox-pg-cdc`): the log relay publishes new messages
    /// itself and hands the table those it could not publish (with their attempt and retry
    /// delay), the later messages of their keys, messages written to become available later,
    /// and replayed dead letters; this store claims those only, so that no message is
    /// published by both.
    pub handed_only: bool,
}

/// How a claim keeps the messages it took from every other claim until their outcomes are
/// recorded ([`StoreConfig::claim_mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ClaimMode {
    /// The claim is a transaction held open while its batch is published: it locks the rows
    /// (`FOR UPDATE SKIP LOCKED`), and the settle deletes the published ones and writes back
    /// the others in the same transaction before it commits. Each message is written about as
    /// often as a hand-written `DELETE ... RETURNING` relay writes it. A relay that dies, or
    /// goes quiet for longer than its lease, has its transaction rolled back by the database
    /// and its messages claimed again. Each batch in flight holds a pooled connection from its
    /// claim to its settle.
    Transaction,
    /// The claim writes a lease (token and expiry) on its rows and commits; the settle is a
    /// second transaction, fenced by the token. Each message is written one more time, and no
    /// connection is held while a batch is published.
    Lease,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            table: String::from("outbox"),
            retention: None,
            limits: Limits::default(),
            notify_channel: None,
            notify: true,
            max_connections: 10,
            claim_mode: None,
            handed_only: false,
        }
    }
}

impl StoreConfig {
    /// The default configuration: table `outbox`, no retention, default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`StoreConfig::url`].
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Sets [`StoreConfig::table`].
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Sets [`StoreConfig::retention`].
    pub fn retention(mut self, retention: impl Into<Option<Duration>>) -> Self {
        self.retention = retention.into();
        self
    }

    /// Sets [`StoreConfig::limits`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets [`StoreConfig::notify_channel`].
    pub fn notify_channel(mut self, channel: impl Into<String>) -> Self {
        self.notify_channel = Some(channel.into());
        self
    }

    /// Sets [`StoreConfig::notify`].
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Sets [`StoreConfig::max_connections`].
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }

    /// Sets [`StoreConfig::handed_only`].
    pub fn handed_only(mut self, handed_only: bool) -> Self {
        self.handed_only = handed_only;
        self
    }

    /// Sets [`StoreConfig::claim_mode`].
    pub fn claim_mode(mut self, mode: ClaimMode) -> Self {
        self.claim_mode = Some(mode);
        self
    }

    /// The notify channel in effect: the configured one, else the table name.
    pub(crate) fn channel(&self) -> &str {
        self.notify_channel.as_deref().unwrap_or(&self.table)
    }

    /// Checks the settings that do not depend on the database: the table name (schema
    /// qualification is checked by each store, since SQLite takes none), the pool size and the
    /// notification channel. The stores' constructors call it; configuration loaders may call
    /// it earlier to report errors before connecting.
    pub fn validate(&self) -> Result<(), StoreError> {
        // Each message starts with the name of the setting at fault.
        split_table(&self.table, true)
            .map_err(|err| config_error(format!("table: {}", err.message())))?;
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            return Err(config_error(format!(
                "max_connections: {} is not between 1 and {MAX_CONNECTIONS}",
                self.max_connections
            )));
        }
        if let Some(channel) = &self.notify_channel
            && !is_identifier(channel)
        {
            return Err(config_error(format!(
                "notify_channel: {channel:?} does not match [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        Ok(())
    }

    /// The URL for `connect` after [`StoreConfig::validate`], or a configuration error naming
    /// the store.
    pub(crate) fn require_url(&self, store: &str) -> Result<&str, StoreError> {
        self.validate()?;
        match self.url.as_deref() {
            Some(url) if !url.is_empty() => Ok(url),
            _ => Err(config_error(format!(
                "{store}: `url` is required to connect"
            ))),
        }
    }
}

/// The check of the stores that cannot claim only handed messages (every store but
/// PostgreSQL's).
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) fn refuse_handed_only(config: &StoreConfig) -> Result<(), StoreError> {
    if config.handed_only {
        return Err(config_error(
            "handed_only: only the PostgreSQL store claims only handed messages (a log relay \
             reads PostgreSQL's log)",
        ));
    }
    Ok(())
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("table", &self.table)
            .field("retention", &self.retention)
            .field("limits", &self.limits)
            .field("notify_channel", &self.notify_channel)
            .field("notify", &self.notify)
            .field("max_connections", &self.max_connections)
            .field("claim_mode", &self.claim_mode)
            .field("handed_only", &self.handed_only)
            .finish()
    }
}

/// `url` with its password (in the authority or in a `password` query parameter) replaced.
/// A URL that does not parse is hidden whole, since there is no telling where a secret sits.
pub(crate) fn redact_url(url: &str) -> String {
    const HIDDEN: &str = "********";
    let Ok(mut parsed) = url::Url::parse(url) else {
        return String::from(HIDDEN);
    };
    if parsed.password().is_some() {
        // Only fails for URLs that cannot have a password, and this one has one.
        let _ = parsed.set_password(Some(HIDDEN));
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(name, value)| {
                let secret = name.to_ascii_lowercase().contains("password");
                let value = if secret {
                    HIDDEN.to_owned()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

pub(crate) fn config_error(message: impl Into<String>) -> StoreError {
    StoreError::new(StoreErrorKind::Config, message)
}

/// How a dialect quotes identifiers and whether it accepts `schema.table`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quoting {
    pub(crate) quote: char,
    pub(crate) qualified: bool,
    /// Trigger names are qualified like their table's (MySQL: a trigger lives in its table's
    /// database; PostgreSQL takes no schema in a trigger's name).
    pub(crate) qualified_triggers: bool,
}

/// The validated names of one outbox: its table and the tables and indexes derived from it,
/// quoted for the dialect.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    /// The outbox table, quoted and qualified.
    pub(crate) table: String,
    /// `{table}_partitions`: partition leases.
    pub(crate) partitions: String,
    /// `{table}_relays`: live relays.
    pub(crate) relays: String,
    /// `{table}_schema`: applied migrations.
    pub(crate) schema: String,
    /// `{table}_claim`: the claim function of leased claims (PostgreSQL).
    pub(crate) claim: String,
    /// The table name without schema and quotes, for index names.
    pub(crate) base: String,
    /// The schema (database, on MySQL) the table is qualified with, unquoted.
    pub(crate) qualifier: Option<String>,
    /// The channel a plain `INSERT` notifies on commit (PostgreSQL's trigger).
    pub(crate) channel: String,
    qualified_triggers: bool,
    /// Quote character of the dialect, for index names.
    quote: char,
}

impl Names {
    /// Validates `table` and derives every name from it.
    pub(crate) fn new(table: &str, quoting: Quoting) -> Result<Self, StoreError> {
        let (schema, base) = split_table(table, quoting.qualified)?;
        let q = quoting.quote;
        let qualify = |name: &str| match schema {
            Some(schema) => format!("{q}{schema}{q}.{q}{name}{q}"),
            None => format!("{q}{name}{q}"),
        };
        Ok(Self {
            table: qualify(base),
            partitions: qualify(&format!("{base}_partitions")),
            relays: qualify(&format!("{base}_relays")),
            schema: qualify(&format!("{base}_schema")),
            claim: qualify(&format!("{base}_claim")),
            base: base.to_owned(),
            qualifier: schema.map(str::to_owned),
            channel: table.to_owned(),
            qualified_triggers: quoting.qualified_triggers,
            quote: q,
        })
    }

    /// The same names with the notify channel `channel`.
    pub(crate) fn with_channel(mut self, channel: &str) -> Self {
        channel.clone_into(&mut self.channel);
        self
    }

    /// `{base}_{suffix}`, quoted and qualified like the table: a function's name.
    pub(crate) fn function(&self, suffix: &str) -> String {
        let q = self.quote;
        match &self.qualifier {
            Some(schema) => format!("{q}{schema}{q}.{q}{}_{suffix}{q}", self.base),
            None => format!("{q}{}_{suffix}{q}", self.base),
        }
    }

    /// `{base}_{suffix}`, quoted, qualified where the dialect qualifies triggers.
    pub(crate) fn trigger(&self, suffix: &str) -> String {
        if self.qualified_triggers {
            self.function(suffix)
        } else {
            self.index(suffix)
        }
    }

    /// An index name derived from the table, quoted (unqualified: indexes live with their table).
    pub(crate) fn index(&self, suffix: &str) -> String {
        let q = self.quote;
        format!("{q}{}_{suffix}{q}", self.base)
    }
}

/// Splits and validates a table name: returns the schema (if any) and the table part.
pub(crate) fn split_table(
    table: &str,
    qualified: bool,
) -> Result<(Option<&str>, &str), StoreError> {
    let invalid = |why: &str| {
        config_error(format!(
            "invalid outbox table name {table:?}: {why}; names must match \
             [A-Za-z_][A-Za-z0-9_]* (at most {MAX_IDENT} characters per part)"
        ))
    };
    let parts: Vec<&str> = table.split('.').collect();
    let (schema, base) = match parts.as_slice() {
        [base] => (None, *base),
        [schema, base] if qualified => (Some(*schema), *base),
        [_, _] => return Err(invalid("this database takes no schema-qualified name")),
        _ => return Err(invalid("at most one `.` may separate schema and table")),
    };
    for part in schema.iter().chain(std::iter::once(&base)) {
        if !is_identifier(part) {
            return Err(invalid(&format!("{part:?} is not a plain identifier")));
        }
    }
    if base.len() + LONGEST_SUFFIX > MAX_IDENT {
        return Err(invalid(&format!(
            "the table part may have at most {} characters, so that `{{table}}_partitions` fits",
            MAX_IDENT - LONGEST_SUFFIX
        )));
    }
    Ok((schema, base))
}

/// `^[A-Za-z_][A-Za-z0-9_]{0,62}$`
pub(crate) fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    name.len() <= MAX_IDENT
        && (first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Quoting = Quoting {
        quote: '"',
        qualified: false,
        qualified_triggers: false,
    };
    const SCHEMAS: Quoting = Quoting {
        quote: '"',
        qualified: true,
        qualified_triggers: true,
    };

    #[test]
    fn identifiers_are_accepted_and_quoted() {
        let names = Names::new("outbox", PLAIN).expect("valid");
        assert_eq!(names.table, r#""outbox""#);
        assert_eq!(names.partitions, r#""outbox_partitions""#);
        assert_eq!(names.index("pending"), r#""outbox_pending""#);
        let names = Names::new("App_1.Outbox_2", SCHEMAS).expect("valid");
        assert_eq!(names.table, r#""App_1"."Outbox_2""#);
        assert_eq!(names.relays, r#""App_1"."Outbox_2_relays""#);
        let mysql = Quoting {
            quote: '`',
            qualified: true,
            qualified_triggers: true,
        };
        assert_eq!(
            Names::new("_x", mysql).expect("valid").schema,
            "`_x_schema`"
        );
        assert!(Names::new(&"a".repeat(52), PLAIN).is_ok());
        assert!(Names::new(&format!("{}.t", "s".repeat(63)), SCHEMAS).is_ok());
    }

    #[test]
    fn validation_names_the_setting_at_fault() {
        let message = |config: StoreConfig| config.validate().map_err(|e| e.message().to_owned());
        assert_eq!(message(StoreConfig::new()), Ok(()));
        assert!(
            message(StoreConfig::new().table("a; DROP TABLE b"))
                .is_err_and(|m| m.starts_with("table: "))
        );
        assert!(
            message(StoreConfig::new().max_connections(0))
                .is_err_and(|m| m.starts_with("max_connections: "))
        );
        assert!(
            message(StoreConfig::new().max_connections(u32::MAX))
                .is_err_and(|m| m.starts_with("max_connections: "))
        );
        assert!(
            message(StoreConfig::new().notify_channel("a'b"))
                .is_err_and(|m| m.starts_with("notify_channel: "))
        );
    }

    #[test]
    fn injection_attempts_are_config_errors() {
        let long = "a".repeat(64);
        let long_base = "a".repeat(53);
        let long_schema = format!("{}.t", "s".repeat(64));
        let attempts = [
            "x; DROP TABLE y",
            "outbox; --",
            "a\"b",
            "a`b",
            "a'b",
            "a b",
            "",
            " outbox",
            "outbox ",
            "1outbox",
            "a.b.c",
            ".outbox",
            "outbox.",
            "a..b",
            "tablé",
            "表",
            "out\u{0}box",
            "out\nbox",
            "a-b",
            long.as_str(),
            long_base.as_str(),
            long_schema.as_str(),
        ];
        for attempt in attempts {
            let err = Names::new(attempt, SCHEMAS).expect_err(attempt);
            assert_eq!(err.kind(), StoreErrorKind::Config, "{attempt:?}");
            assert!(err.message().contains("invalid outbox table name"), "{err}");
        }
        let err = Names::new("app.outbox", PLAIN).expect_err("no schemas here");
        assert_eq!(err.kind(), StoreErrorKind::Config);
    }

    #[test]
    fn debug_hides_passwords() {
        let config = StoreConfig::new()
            .url("postgres://app:s3cr3t@db.example:5432/app?sslmode=require&password=other")
            .table("outbox");
        let text = format!("{config:?}");
        assert!(
            !text.contains("s3cr3t") && !text.contains("other"),
            "{text}"
        );
        assert!(
            text.contains("db.example") && text.contains("sslmode=require"),
            "{text}"
        );
        let text = format!("{:?}", StoreConfig::new().url("not a url with s3cr3t"));
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[test]
    fn parses_from_configuration_text() {
        let config: StoreConfig = serde_json_like(
            r#"{"url":"sqlite://x.db","table":"events","retention":"2h","limits":{"max_key_len":64}}"#,
        );
        assert_eq!(config.retention, Some(Duration::from_secs(7200)));
        assert_eq!(config.table, "events");
        assert_eq!(config.limits.max_key_len, 64);
        assert_eq!(config.max_connections, 10);
    }

    #[test]
    fn claim_modes_are_read_by_name() {
        assert_eq!(
            serde_json_like(r#"{"claim_mode": "lease"}"#).claim_mode,
            Some(ClaimMode::Lease)
        );
        assert_eq!(serde_json_like("{}").claim_mode, None);
        assert!(serde_json::from_str::<StoreConfig>(r#"{"claim_mode": "leases"}"#).is_err());
    }

    fn serde_json_like(text: &str) -> StoreConfig {
        serde_json::from_str(text).expect("parses")
    }
}
