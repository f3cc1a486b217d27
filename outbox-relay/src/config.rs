//! The relay's configuration: a TOML file, then `OUTBOX_<SECTION>__<KEY>` environment variables
//! over it (for example `OUTBOX_STORE__URL`, `OUTBOX_RELAY__BATCH_SIZE`,
//! `OUTBOX_PUBLISHER__KIND`).

use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use outbox_core::RelayConfig;
use serde::Deserialize;

/// Sections the environment may set; other `OUTBOX_*` variables are left alone.
const SECTIONS: [&str; 6] = ["store", "publisher", "relay", "http", "log", "cdc"];

/// The whole configuration.
#[derive(Debug)]
pub(crate) struct Config {
    /// The outbox table: its URL picks the store (`postgres://`, `mysql://`, `sqlite:`).
    pub(crate) store: outbox_sqlx::StoreConfig,
    /// The broker.
    pub(crate) publisher: PublisherConfig,
    /// How the relay claims, publishes, retries and shares work.
    pub(crate) relay: RelayConfig,
    /// Health and metrics endpoints.
    pub(crate) http: HttpConfig,
    /// Logging.
    pub(crate) log: LogConfig,
    /// The log relay (change data capture), when the section is present: new messages are
    /// read from PostgreSQL's log, and the store claims only what the log relay hands over.
    #[cfg(feature = "cdc-postgres")]
    pub(crate) cdc: Option<outbox_pg_cdc::CdcConfig>,
}

/// The configuration as read, with the publisher section still untyped: it is typed by its
/// `kind` in a second step, so that errors inside it name their key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    store: outbox_sqlx::StoreConfig,
    publisher: Dict,
    #[serde(default)]
    relay: RelayConfig,
    #[serde(default)]
    http: HttpConfig,
    #[serde(default)]
    log: LogConfig,
    cdc: Option<Dict>,
}

/// The broker, chosen by `kind`.
#[derive(Debug)]
pub(crate) enum PublisherConfig {
    /// JSON lines on standard output.
    Stdout,
    /// Kafka.
    #[cfg(feature = "broker-kafka")]
    Kafka(outbox_kafka::KafkaConfig),
    /// AMQP 0.9.1 (RabbitMQ).
    #[cfg(feature = "broker-amqp")]
    Amqp(outbox_amqp::AmqpConfig),
    /// NATS JetStream.
    #[cfg(feature = "broker-nats")]
    Nats(outbox_nats::NatsConfig),
}

/// The publisher kinds this build knows.
const KINDS: &[&str] = &[
    "stdout",
    #[cfg(feature = "broker-kafka")]
    "kafka",
    #[cfg(feature = "broker-amqp")]
    "amqp",
    #[cfg(feature = "broker-nats")]
    "nats",
];

impl PublisherConfig {
    /// Types the `[publisher]` section by its `kind`.
    fn from_section(mut section: Dict) -> Result<Self, ConfigFileError> {
        let kind = match section.remove("kind") {
            Some(Value::String(_, kind)) => kind,
            Some(_) => return Err(ConfigFileError("publisher.kind: must be a string".into())),
            None => {
                return Err(ConfigFileError(format!(
                    "publisher.kind: missing (one of {})",
                    KINDS.join(", ")
                )));
            }
        };
        fn typed<T: serde::de::DeserializeOwned>(section: Dict) -> Result<T, ConfigFileError> {
            Figment::from(Serialized::defaults(section))
                .extract()
                .map_err(|err| ConfigFileError(describe(err, "publisher.")))
        }
        match kind.as_str() {
            "stdout" if section.is_empty() => Ok(PublisherConfig::Stdout),
            "stdout" => Err(ConfigFileError(format!(
                "publisher: kind stdout takes no settings, found {}",
                section
                    .keys()
                    .map(|k| format!("publisher.{k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            #[cfg(feature = "broker-kafka")]
            "kafka" => typed(section).map(PublisherConfig::Kafka),
            #[cfg(feature = "broker-amqp")]
            "amqp" => typed(section).map(PublisherConfig::Amqp),
            #[cfg(feature = "broker-nats")]
            "nats" => typed(section).map(PublisherConfig::Nats),
            other => Err(ConfigFileError(format!(
                "publisher.kind: `{other}` is not one of {} in this build",
                KINDS.join(", ")
            ))),
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            PublisherConfig::Stdout => "stdout",
            #[cfg(feature = "broker-kafka")]
            PublisherConfig::Kafka(_) => "kafka",
            #[cfg(feature = "broker-amqp")]
            PublisherConfig::Amqp(_) => "amqp",
            #[cfg(feature = "broker-nats")]
            PublisherConfig::Nats(_) => "nats",
        }
    }
}

/// `/healthz`, `/readyz` and `/metrics`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct HttpConfig {
    /// Where to listen (default `127.0.0.1:9187`; port 0 lets the system choose, and the log
    /// says which); `"off"` (or `false`) turns the endpoints off.
    #[serde(deserialize_with = "listen")]
    pub(crate) listen: Option<SocketAddr>,
}

/// `http.listen`: an address, or `"off"` / `false` for none.
fn listen<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Listen {
        On(bool),
        At(String),
    }
    match Listen::deserialize(de)? {
        Listen::On(false) => Ok(None),
        Listen::On(true) => Ok(HttpConfig::default().listen),
        Listen::At(text) if text.eq_ignore_ascii_case("off") => Ok(None),
        Listen::At(text) => text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not an address such as 127.0.0.1:9187 (or \"off\")"
            ))
        }),
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9187))),
        }
    }
}

/// Log format and level.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct LogConfig {
    /// `text` (default) or `json`.
    pub(crate) format: LogFormat,
    /// A `tracing` filter such as `info` or `outbox_core=debug,info`; `RUST_LOG` wins.
    pub(crate) level: Option<String>,
}

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// For people.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration that cannot be used; the text names the file, the key and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ConfigFileError(String);

impl Config {
    /// Reads `path` (when given) and the environment, then checks the result.
    pub(crate) fn load(path: Option<&Path>) -> Result<Self, ConfigFileError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigFileError(format!(
                    "configuration file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let env = Env::prefixed("OUTBOX_").split("__").filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            SECTIONS
                .iter()
                .any(|s| key.starts_with(&format!("{s}__")) || key.starts_with(&format!("{s}.")))
        });
        figment = figment.merge(env);
        let raw: RawConfig = figment
            .extract()
            .map_err(|err| ConfigFileError(describe(err, "")))?;
        #[cfg_attr(not(feature = "cdc-postgres"), allow(unused_mut))]
        let mut store = raw.store;
        #[cfg(feature = "cdc-postgres")]
        let cdc = match raw.cdc {
            Some(section) => {
                // The log relay's store claims only what the log relay hands over.
                store.handed_only = true;
                Some(cdc_section(section, &store)?)
            }
            None => None,
        };
        #[cfg(not(feature = "cdc-postgres"))]
        if raw.cdc.is_some() {
            return Err(ConfigFileError(
                "cdc: this build has no log relay (cargo feature cdc-postgres)".into(),
            ));
        }
        let config = Config {
            store,
            publisher: PublisherConfig::from_section(raw.publisher)?,
            relay: raw.relay,
            http: raw.http,
            log: raw.log,
            #[cfg(feature = "cdc-postgres")]
            cdc,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigFileError> {
        self.relay.validate().map_err(|err| {
            ConfigFileError(format!(
                "relay.{}: {}",
                err.field.trim_start_matches("relay."),
                err.reason
            ))
        })?;
        let url = self.store.url.as_deref().ok_or_else(|| {
            ConfigFileError("store.url: missing (postgres://, mysql:// or sqlite: URL)".into())
        })?;
        StoreKind::from_url(url).map_err(ConfigFileError)?;
        self.store
            .validate()
            .map_err(|err| ConfigFileError(format!("store.{}", err.message())))?;
        // The relay's store calls in flight (its batches and claims, a renewal, a stats or
        // cleanup call) plus the readiness probe's, and the log relay's.
        let needed = self.relay.concurrency + 3 + usize::from(self.log_relay());
        if (self.store.max_connections as usize) < needed {
            return Err(ConfigFileError(format!(
                "store.max_connections: {} is too few for relay.concurrency {}: the relay and \
                 its readiness probe can have {needed} store calls in flight",
                self.store.max_connections, self.relay.concurrency
            )));
        }
        Ok(())
    }
}

impl Config {
    /// True when the `[cdc]` section asks for the log relay.
    pub(crate) fn log_relay(&self) -> bool {
        #[cfg(feature = "cdc-postgres")]
        return self.cdc.is_some();
        #[cfg(not(feature = "cdc-postgres"))]
        return false;
    }
}

/// Types the `[cdc]` section: the replication slot and publication, and optionally a URL of
/// its own (a role with `REPLICATION`); the database defaults to the store's, and the table
/// is always the store's.
#[cfg(feature = "cdc-postgres")]
fn cdc_section(
    mut section: Dict,
    store: &outbox_sqlx::StoreConfig,
) -> Result<outbox_pg_cdc::CdcConfig, ConfigFileError> {
    if section.contains_key("table") {
        return Err(ConfigFileError(
            "cdc.table: the log relay reads the store's table; set store.table instead".into(),
        ));
    }
    let url = store.url.as_deref().unwrap_or_default();
    if StoreKind::from_url(url) != Ok(StoreKind::Postgres) {
        return Err(ConfigFileError(
            "cdc: the log relay reads PostgreSQL's log: store.url must be a postgres:// URL".into(),
        ));
    }
    if !section.contains_key("url") {
        section.insert("url".into(), Value::from(url.to_owned()));
    }
    section.insert("table".into(), Value::from(store.table.clone()));
    let config: outbox_pg_cdc::CdcConfig = Figment::from(Serialized::defaults(section))
        .extract()
        .map_err(|err| ConfigFileError(describe(err, "cdc.")))?;
    config
        .validate()
        .map_err(|err| ConfigFileError(format!("cdc: {err}")))?;
    Ok(config)
}

/// Which database a store URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StoreKind {
    Postgres,
    #[value(alias = "mariadb")]
    Mysql,
    Sqlite,
}

impl StoreKind {
    /// Reads the scheme of `url`; the error names the schemes this build supports.
    pub(crate) fn from_url(url: &str) -> Result<Self, String> {
        let scheme = url
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let kind = match scheme.as_str() {
            "postgres" | "postgresql" => StoreKind::Postgres,
            "mysql" | "mariadb" => StoreKind::Mysql,
            "sqlite" => StoreKind::Sqlite,
            _ => {
                return Err(format!(
                    "store.url: unsupported scheme `{scheme}`: use postgres://, mysql:// or sqlite:"
                ));
            }
        };
        let built = match kind {
            StoreKind::Postgres => cfg!(feature = "store-postgres"),
            StoreKind::Mysql => cfg!(feature = "store-mysql"),
            StoreKind::Sqlite => cfg!(feature = "store-sqlite"),
        };
        if built {
            Ok(kind)
        } else {
            Err(format!(
                "store.url: this build has no {kind:?} support (cargo feature store-*)"
            ))
        }
    }
}

/// Every error of a figment extraction, each with its key (after `prefix`) and where it came
/// from.
fn describe(err: figment::Error, prefix: &str) -> String {
    err.into_iter()
        .map(|e| {
            let key = if e.path.is_empty() {
                prefix.trim_end_matches('.').to_owned() + if prefix.is_empty() { "" } else { ": " }
            } else {
                format!("{prefix}{}: ", e.path.join("."))
            };
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(source) => format!(" (in {} {source})", m.name),
                    None => format!(" (in {})", m.name),
                })
                .unwrap_or_default();
            format!("{key}{}{source}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Hides the password of a URL, for logs and `status`.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => String::from("<unparsable URL>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
        assert_eq!(redact("not a url with s3cret"), "<unparsable URL>");
    }
}
