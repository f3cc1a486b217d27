//! [`AmqpConfig`]: where the broker is and how destinations map to exchanges and routing keys.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lapin::uri::AMQPUri;
use serde::{Deserialize, Serialize};

use crate::AmqpError;

/// How a message's destination (and key) becomes an exchange and a routing key.
///
/// | mapping | destination | exchange | routing key |
/// | --- | --- | --- | --- |
/// | `split` (default) | `orders/order.created` | `orders` | `order.created` |
/// | `split` | `orders` | `orders` | the message key, or empty |
/// | `split` | `/billing` | the default exchange | `billing` (a queue) |
/// | `exchange` | `orders/eu` | `orders/eu` | the message key, or empty |
/// | `queue` | `billing` | the default exchange | `billing` (a queue) |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Routing {
    /// `exchange/routing.key`: the exchange is what comes before the first `/`, the routing key
    /// what follows. Without a `/` the whole destination is the exchange and the routing key is
    /// the message key (empty when the message has none). An empty exchange part means the
    /// default exchange.
    #[default]
    Split,
    /// The whole destination is the exchange; the routing key is the message key (empty when
    /// the message has none).
    Exchange,
    /// The destination is a queue name, published through the default exchange.
    Queue,
}

impl Routing {
    /// The exchange and routing key for `destination` and `key`.
    ///
    /// ```
    /// use outbox_amqp::Routing;
    ///
    /// assert_eq!(Routing::Split.route("orders/order.created", Some("o-1")), ("orders", "order.created"));
    /// assert_eq!(Routing::Split.route("orders", Some("o-1")), ("orders", "o-1"));
    /// assert_eq!(Routing::Exchange.route("orders", None), ("orders", ""));
    /// assert_eq!(Routing::Split.route("/billing", None), ("", "billing"));
    /// assert_eq!(Routing::Queue.route("billing", Some("o-1")), ("", "billing"));
    /// ```
    pub fn route<'a>(&self, destination: &'a str, key: Option<&'a str>) -> (&'a str, &'a str) {
        match self {
            Routing::Split => match destination.split_once('/') {
                Some((exchange, routing_key)) => (exchange, routing_key),
                None => (destination, key.unwrap_or("")),
            },
            Routing::Exchange => (destination, key.unwrap_or("")),
            Routing::Queue => ("", destination),
        }
    }
}

/// What happens to a message that the broker cannot route to any queue.
///
/// Messages are published with the `mandatory` flag unless this is [`Unroutable::Ignore`], so the
/// broker returns a message that no queue takes instead of dropping it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Unroutable {
    /// A permanent failure: the relay dead-letters the message at once (it stays in the outbox,
    /// listable and replayable once a queue is bound).
    #[default]
    Fail,
    /// A transient failure: the relay retries with backoff, for deployments where the queues
    /// may be declared after the publisher starts. Dead-lettered after the retry policy's
    /// maximum attempts.
    Retry,
    /// Published without `mandatory`: the broker confirms and drops what it cannot route.
    Ignore,
}

/// Settings of an [`AmqpPublisher`](crate::AmqpPublisher).
///
/// `uri` is required; every other field has a default. Durations are written like `"10s"` in
/// configuration files. `Debug` hides the password of the URI.
///
/// ```
/// use std::time::Duration;
/// use outbox_amqp::{AmqpConfig, Routing, Unroutable};
///
/// let config = AmqpConfig::new("amqp://app:secret@127.0.0.1:5672/%2f")
///     .routing(Routing::Exchange)
///     .unroutable(Unroutable::Retry)
///     .confirm_timeout(Duration::from_secs(5));
/// config.validate()?;
/// assert!(!format!("{config:?}").contains("secret"));
///
/// let parsed: AmqpConfig = serde_json::from_str(
///     r#"{"uri": "amqp://127.0.0.1:5672/%2f", "routing": "queue", "confirm_timeout": "5s"}"#,
/// )?;
/// assert_eq!(parsed.routing, Routing::Queue);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// The broker, as an AMQP URI: `amqp://user:password@host:port/vhost` (the default vhost
    /// `/` is written `%2f`), or `amqps://` with the `rustls` feature. URI query parameters
    /// such as `heartbeat` and `frame_max` are honoured.
    pub uri: String,
    /// How destinations map to exchanges and routing keys (default [`Routing::Split`]).
    #[serde(default)]
    pub routing: Routing,
    /// What an unroutable message is (default [`Unroutable::Fail`], a permanent failure).
    #[serde(default)]
    pub unroutable: Unroutable,
    /// The header that carries the message key (default `outbox-key`); `null` to leave it out.
    #[serde(default = "default_key_header")]
    pub key_header: Option<String>,
    /// Largest payload published, in bytes (default 128 MiB, RabbitMQ's default
    /// `max_message_size`). A larger message fails permanently without being sent. Set it to
    /// the broker's limit when that is lower; a limit the broker reports by refusing a message
    /// is also learned and applied.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// Longest wait for the TCP connection and the AMQP handshake (default 10 s).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for the confirms of one batch (default 10 s). Messages not confirmed by
    /// then fail transiently and the channel is replaced.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Heartbeat interval proposed to the broker unless the URI sets `heartbeat`
    /// (default 10 s), so that a dead connection is noticed even when no publish is under way.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// How long an exchange found to exist (by a passive declare) is trusted before it is
    /// checked again (default 60 s). Messages for an exchange found missing fail permanently
    /// without being sent, so they cannot close the publishing channel.
    #[serde(default = "default_exchange_check_ttl", with = "humantime_serde")]
    pub exchange_check_ttl: Duration,
    /// Connection name shown in the RabbitMQ management UI (default `outbox-amqp`).
    #[serde(default = "default_connection_name")]
    pub connection_name: String,
}

fn default_key_header() -> Option<String> {
    Some(String::from(crate::DEFAULT_KEY_HEADER))
}
fn default_max_message_size() -> usize {
    128 * 1024 * 1024
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_confirm_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}
fn default_exchange_check_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_connection_name() -> String {
    String::from("outbox-amqp")
}

impl AmqpConfig {
    /// A configuration for the broker at `uri`, with every other setting at its default.
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            routing: Routing::default(),
            unroutable: Unroutable::default(),
            key_header: default_key_header(),
            max_message_size: default_max_message_size(),
            connect_timeout: default_connect_timeout(),
            confirm_timeout: default_confirm_timeout(),
            heartbeat: default_heartbeat(),
            exchange_check_ttl: default_exchange_check_ttl(),
            connection_name: default_connection_name(),
        }
    }

    /// Sets [`AmqpConfig::routing`].
    pub fn routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// Sets [`AmqpConfig::unroutable`].
    pub fn unroutable(mut self, unroutable: Unroutable) -> Self {
        self.unroutable = unroutable;
        self
    }

    /// Sets [`AmqpConfig::key_header`].
    pub fn key_header(mut self, header: Option<String>) -> Self {
        self.key_header = header;
        self
    }

    /// Sets [`AmqpConfig::max_message_size`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`AmqpConfig::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`AmqpConfig::confirm_timeout`].
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Sets [`AmqpConfig::heartbeat`].
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Sets [`AmqpConfig::exchange_check_ttl`].
    pub fn exchange_check_ttl(mut self, ttl: Duration) -> Self {
        self.exchange_check_ttl = ttl;
        self
    }

    /// Sets [`AmqpConfig::connection_name`].
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), AmqpError> {
        let uri = self.parsed_uri()?;
        // Without a TLS implementation lapin's transport connects in plain text, even to an
        // `amqps://` URI.
        if uri.scheme == lapin::uri::AMQPScheme::AMQPS && !cfg!(feature = "rustls") {
            return Err(AmqpError::config(
                "uri",
                "amqps:// needs the `rustls` feature of outbox-amqp",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(AmqpError::config("connect_timeout", "must be above zero"));
        }
        if self.confirm_timeout.is_zero() {
            return Err(AmqpError::config("confirm_timeout", "must be above zero"));
        }
        if self.max_message_size == 0 {
            return Err(AmqpError::config("max_message_size", "must be above zero"));
        }
        if self.heartbeat.as_secs() > u64::from(u16::MAX) {
            return Err(AmqpError::config(
                "heartbeat",
                "must be at most 65535 seconds",
            ));
        }
        if let Some(header) = &self.key_header
            && (header.is_empty() || header.len() > 255)
        {
            return Err(AmqpError::config(
                "key_header",
                "must be 1 to 255 bytes long",
            ));
        }
        Ok(())
    }

    /// The URI parsed, with the configured heartbeat unless the URI sets one.
    pub(crate) fn parsed_uri(&self) -> Result<AMQPUri, AmqpError> {
        let mut uri = AMQPUri::from_str(&self.uri).map_err(|reason| {
            // The parser's message may quote the URI: keep the password out of it.
            AmqpError::config(
                "uri",
                format!(
                    "{} is not a valid AMQP URI: {}",
                    redact(&self.uri),
                    reason.replace(&self.uri, &redact(&self.uri))
                ),
            )
        })?;
        if uri.query.heartbeat.is_none() {
            let secs = u16::try_from(self.heartbeat.as_secs()).unwrap_or(u16::MAX);
            uri.query.heartbeat = Some(secs);
        }
        Ok(uri)
    }

    /// The URI with its password replaced by `***`, for logs and errors.
    pub fn redacted_uri(&self) -> String {
        redact(&self.uri)
    }
}

/// `uri` with the password hidden; a URI that cannot be parsed is hidden whole.
pub(crate) fn redact(uri: &str) -> String {
    match url::Url::parse(uri) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Only fails for URLs that cannot have credentials, which had none.
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => String::from("<unparseable URI>"),
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("uri", &self.redacted_uri())
            .field("routing", &self.routing)
            .field("unroutable", &self.unroutable)
            .field("key_header", &self.key_header)
            .field("max_message_size", &self.max_message_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("exchange_check_ttl", &self.exchange_check_ttl)
            .field("connection_name", &self.connection_name)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let config = AmqpConfig::new("amqp://app:s3cr%3Et@broker:5672/%2f");
        let text = format!("{config:?}");
        assert!(!text.contains("s3cr"), "{text}");
        assert!(text.contains("app:***@broker"), "{text}");
        assert_eq!(redact("not a uri with s3cret"), "<unparseable URI>");
    }

    #[test]
    fn amqps_is_refused_without_a_tls_implementation_rather_than_sent_in_plain_text() {
        let result = AmqpConfig::new("amqps://app:secret@broker:5671/%2f").validate();
        assert_eq!(result.is_ok(), cfg!(feature = "rustls"), "{result:?}");
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let field = |c: AmqpConfig| match c.validate() {
            Err(AmqpError::Config { field, .. }) => Some(field),
            _ => None,
        };
        assert_eq!(field(AmqpConfig::new("amqp://127.0.0.1/%2f")), None);
        assert_eq!(field(AmqpConfig::new("http://[::1")), Some("uri"));
        assert_eq!(
            field(AmqpConfig::new("amqp://h/%2f").confirm_timeout(Duration::ZERO)),
            Some("confirm_timeout")
        );
        assert_eq!(
            field(AmqpConfig::new("amqp://h/%2f").key_header(Some(String::new()))),
            Some("key_header")
        );
    }

    #[test]
    fn heartbeat_goes_into_the_uri_unless_set_there() {
        let uri = AmqpConfig::new("amqp://h/%2f").parsed_uri().expect("valid");
        assert_eq!(uri.query.heartbeat, Some(10));
        let uri = AmqpConfig::new("amqp://h/%2f?heartbeat=3")
            .parsed_uri()
            .expect("valid");
        assert_eq!(uri.query.heartbeat, Some(3));
    }

    #[test]
    fn config_files_parse_with_defaults() {
        let config: AmqpConfig = serde_json::from_str(r#"{"uri":"amqp://h/%2f"}"#).expect("parses");
        assert_eq!(config, AmqpConfig::new("amqp://h/%2f"));
        assert!(
            serde_json::from_str::<AmqpConfig>(r#"{"uri":"amqp://h","rooting":"queue"}"#).is_err()
        );
    }
}
