//! [`NatsConfig`]: where the servers are, how destinations become subjects, how many acks may
//! be awaited at once.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::NatsError;

/// A JetStream stream that [`NatsPublisher`](crate::NatsPublisher) creates when it is missing
/// (see [`NatsConfig::ensure_stream`] and [`NatsPublisher::ensure_stream`](crate::NatsPublisher::ensure_stream)).
///
/// Only settings that NATS 2.9 servers know are offered; an existing stream is left as it is.
///
/// ```
/// use std::time::Duration;
/// use outbox_nats::StreamSpec;
///
/// let spec = StreamSpec::new("ORDERS", ["orders.>"])
///     .duplicate_window(Duration::from_secs(600))
///     .max_message_size(1024 * 1024);
/// assert_eq!(spec.subjects, vec!["orders.>".to_string()]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    /// Stream name (no spaces, `.`, `*` or `>`).
    pub name: String,
    /// Subjects the stream stores, wildcards allowed (for example `orders.>`).
    pub subjects: Vec<String>,
    /// Window within which a repeated `Nats-Msg-Id` is dropped (server default: 2 min when
    /// unset). Make it longer than the longest outage after which the relay republishes.
    #[serde(default, with = "humantime_serde")]
    pub duplicate_window: Option<Duration>,
    /// Largest message the stream takes, in bytes (server default: unlimited up to the
    /// server's `max_payload`).
    #[serde(default)]
    pub max_message_size: Option<usize>,
    /// Keep messages in memory instead of files (default false: file storage).
    #[serde(default)]
    pub memory: bool,
    /// Replicas in a cluster (default 1).
    #[serde(default = "one")]
    pub replicas: usize,
}

fn one() -> usize {
    1
}

impl StreamSpec {
    /// A file-backed stream `name` storing `subjects`, with the server's defaults otherwise.
    pub fn new(
        name: impl Into<String>,
        subjects: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            duplicate_window: None,
            max_message_size: None,
            memory: false,
            replicas: 1,
        }
    }

    /// Sets [`StreamSpec::duplicate_window`].
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = Some(window);
        self
    }

    /// Sets [`StreamSpec::max_message_size`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = Some(bytes);
        self
    }

    /// Sets [`StreamSpec::memory`].
    pub fn memory(mut self, memory: bool) -> Self {
        self.memory = memory;
        self
    }

    /// Sets [`StreamSpec::replicas`].
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), NatsError> {
        if self.name.is_empty()
            || self.name.chars().any(|c| {
                c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\')
            })
        {
            return Err(NatsError::config(
                "ensure_stream.name",
                "must be non-empty without whitespace, '.', '*', '>', '/' or '\\'",
            ));
        }
        if self.subjects.is_empty() {
            return Err(NatsError::config(
                "ensure_stream.subjects",
                "must list at least one subject",
            ));
        }
        if let Some(subject) = self.subjects.iter().find(|s| !valid_subject(s, true)) {
            return Err(NatsError::config(
                "ensure_stream.subjects",
                format!("{subject:?} is not a valid subject"),
            ));
        }
        if self
            .max_message_size
            .is_some_and(|max| max == 0 || i32::try_from(max).is_err())
        {
            return Err(NatsError::config(
                "ensure_stream.max_message_size",
                "must be between 1 and 2^31 - 1",
            ));
        }
        if self.replicas == 0 {
            return Err(NatsError::config(
                "ensure_stream.replicas",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// True for a subject of dot-separated non-empty tokens without whitespace; wildcard tokens
/// (`*`, and `>` as the last token) only when `wildcards`.
pub(crate) fn valid_subject(subject: &str, wildcards: bool) -> bool {
    if subject.is_empty() || subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    tokens.iter().enumerate().all(|(i, token)| match *token {
        "" => false,
        "*" => wildcards,
        ">" => wildcards && i == tokens.len() - 1,
        _ => true,
    })
}

/// Settings of a [`NatsPublisher`](crate::NatsPublisher).
///
/// `url` is required; every other field has a default. Durations are written like `"5s"` in
/// configuration files. `Debug` hides passwords and tokens in the URL.
///
/// ```
/// use std::time::Duration;
/// use outbox_nats::{NatsConfig, StreamSpec};
///
/// let config = NatsConfig::new("nats://app:secret@127.0.0.1:4222")
///     .subject_prefix("outbox")
///     .max_acks_in_flight(512)
///     .ack_timeout(Duration::from_secs(3))
///     .ensure_stream(StreamSpec::new("OUTBOX", ["outbox.>"]));
/// config.validate()?;
/// assert_eq!(config.subject("orders.created"), "outbox.orders.created");
/// assert!(!format!("{config:?}").contains("secret"));
///
/// let parsed: NatsConfig = serde_json::from_str(
///     r#"{"url": "nats://127.0.0.1:4222", "ack_timeout": "3s", "max_acks_in_flight": 128}"#,
/// )?;
/// assert_eq!(parsed.max_acks_in_flight, 128);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// The server, or several separated by commas: `nats://host:4222`, with credentials as
    /// `nats://user:password@host:4222` or a token as `nats://token@host:4222`; `tls://` with
    /// the `rustls` feature.
    pub url: String,
    /// Prefix of every subject: the subject is `{prefix}.{destination}` (default none: the
    /// destination is the subject).
    #[serde(default)]
    pub subject_prefix: Option<String>,
    /// Header that carries the message key (default `Outbox-Key`); `null` to leave it out.
    #[serde(default = "default_key_header")]
    pub key_header: Option<String>,
    /// Publish acks awaited at once within one call (default 256): the call sends that many
    /// messages, then sends one more each time the oldest ack arrives.
    #[serde(default = "default_window")]
    pub max_acks_in_flight: usize,
    /// Longest wait for one publish ack (default 5 s). A message not acknowledged by then fails
    /// transiently, and the rest of the call fails at once without being sent.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Longest wait for a TCP connection and the NATS handshake (default 5 s).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Interval of the client's pings (default 10 s): a dead connection is noticed after two
    /// unanswered pings.
    #[serde(default = "default_ping_interval", with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A stream to create when missing, at the first publish (default none: streams are the
    /// deployment's business).
    #[serde(default)]
    pub ensure_stream: Option<StreamSpec>,
    /// Client name shown in the server's monitoring (default `outbox-nats`).
    #[serde(default = "default_name")]
    pub connection_name: String,
    /// Lets the relay put several messages of one key in a call (default false), sent in order
    /// on the one connection with their acks pipelined, instead of one message per key per
    /// call: a key with a backlog (one aggregate, one tenant) then drains as fast as many
    /// keys do, instead of one publish round trip per message.
    ///
    /// What it relaxes: when the stream refuses a message after the later messages of its key
    /// in the call were sent (no stream on its subject, a stream limit, no ack in time), those
    /// later messages may be stored, and the failed one, retried, arrives after them. A
    /// failure found before sending (an invalid subject or header, a lost connection) stops the
    /// key's later messages in the call, as does an ack failure that comes back before they
    /// are sent. Without it, first deliveries of a key are always in order.
    #[serde(default)]
    pub pipeline_keys: bool,
}

fn default_key_header() -> Option<String> {
    Some(String::from(crate::DEFAULT_KEY_HEADER))
}
fn default_window() -> usize {
    256
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_ping_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_name() -> String {
    String::from("outbox-nats")
}

impl NatsConfig {
    /// A configuration for the servers at `url`, with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            subject_prefix: None,
            key_header: default_key_header(),
            max_acks_in_flight: default_window(),
            ack_timeout: default_ack_timeout(),
            connect_timeout: default_connect_timeout(),
            ping_interval: default_ping_interval(),
            ensure_stream: None,
            connection_name: default_name(),
            pipeline_keys: false,
        }
    }

    /// Sets [`NatsConfig::subject_prefix`].
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = Some(prefix.into());
        self
    }

    /// Sets [`NatsConfig::key_header`].
    pub fn key_header(mut self, header: Option<String>) -> Self {
        self.key_header = header;
        self
    }

    /// Sets [`NatsConfig::max_acks_in_flight`].
    pub fn max_acks_in_flight(mut self, window: usize) -> Self {
        self.max_acks_in_flight = window;
        self
    }

    /// Sets [`NatsConfig::ack_timeout`].
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Sets [`NatsConfig::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`NatsConfig::ping_interval`].
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// Sets [`NatsConfig::ensure_stream`].
    pub fn ensure_stream(mut self, stream: StreamSpec) -> Self {
        self.ensure_stream = Some(stream);
        self
    }

    /// Sets [`NatsConfig::pipeline_keys`].
    pub fn pipeline_keys(mut self, pipeline: bool) -> Self {
        self.pipeline_keys = pipeline;
        self
    }

    /// Sets [`NatsConfig::connection_name`].
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// The subject a destination is published to.
    pub fn subject(&self, destination: &str) -> String {
        match &self.subject_prefix {
            Some(prefix) => format!("{prefix}.{destination}"),
            None => destination.to_owned(),
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), NatsError> {
        let servers = self.servers()?;
        if servers.iter().any(|s| s.starts_with("tls://")) && !cfg!(feature = "rustls") {
            return Err(NatsError::config(
                "url",
                "tls:// needs the `rustls` feature of outbox-nats",
            ));
        }
        if let Some(prefix) = &self.subject_prefix
            && !valid_subject(prefix, false)
        {
            return Err(NatsError::config(
                "subject_prefix",
                "must be dot-separated tokens without whitespace or wildcards",
            ));
        }
        if let Some(header) = &self.key_header
            && (header.is_empty() || !header.chars().all(|c| c.is_ascii_graphic() && c != ':'))
        {
            return Err(NatsError::config(
                "key_header",
                "must be printable ASCII without ':'",
            ));
        }
        if self.max_acks_in_flight == 0 || self.max_acks_in_flight > 65_536 {
            return Err(NatsError::config(
                "max_acks_in_flight",
                "must be between 1 and 65536",
            ));
        }
        for (field, value) in [
            ("ack_timeout", self.ack_timeout),
            ("connect_timeout", self.connect_timeout),
            ("ping_interval", self.ping_interval),
        ] {
            if value.is_zero() {
                return Err(NatsError::config(field, "must be above zero"));
            }
        }
        if let Some(stream) = &self.ensure_stream {
            stream.validate()?;
        }
        Ok(())
    }

    /// The server URLs, checked.
    pub(crate) fn servers(&self) -> Result<Vec<String>, NatsError> {
        let servers: Vec<String> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if servers.is_empty() {
            return Err(NatsError::config("url", "no server given"));
        }
        for server in &servers {
            if let Err(err) = server.parse::<async_nats::ServerAddr>() {
                return Err(NatsError::config(
                    "url",
                    format!("{} is not a NATS server URL: {err}", redact(server)),
                ));
            }
        }
        Ok(servers)
    }

    /// The URL with passwords and tokens replaced by `***`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        self.url
            .split(',')
            .map(|server| redact(server.trim()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `server` with its password (or token) hidden; a URL that cannot be parsed is hidden whole.
pub(crate) fn redact(server: &str) -> String {
    let with_scheme = if server.contains("://") {
        server.to_owned()
    } else {
        format!("nats://{server}")
    };
    match url::Url::parse(&with_scheme) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            } else if !url.username().is_empty() {
                // A user name alone is a token.
                let _ = url.set_username("***");
            }
            url.to_string()
        }
        Err(_) => String::from("<unparseable URL>"),
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.redacted_url())
            .field("subject_prefix", &self.subject_prefix)
            .field("key_header", &self.key_header)
            .field("max_acks_in_flight", &self.max_acks_in_flight)
            .field("ack_timeout", &self.ack_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("ensure_stream", &self.ensure_stream)
            .field("connection_name", &self.connection_name)
            .field("pipeline_keys", &self.pipeline_keys)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_passwords_and_tokens() {
        let config = NatsConfig::new("nats://app:s3cret@a:4222, nats://t0ken@b:4222");
        let text = format!("{config:?}");
        assert!(
            !text.contains("s3cret") && !text.contains("t0ken"),
            "{text}"
        );
        assert!(text.contains("app:***@a:4222"), "{text}");
    }

    #[test]
    fn subjects_are_checked() {
        assert!(valid_subject("orders.created", false));
        assert!(valid_subject("orders.>", true));
        assert!(!valid_subject("orders.>", false));
        assert!(!valid_subject("orders.*.x", false));
        assert!(valid_subject("orders.*.x", true));
        assert!(!valid_subject("orders..x", false));
        assert!(!valid_subject(".orders", false));
        assert!(!valid_subject("orders x", false));
        assert!(!valid_subject("a.>.b", true));
        assert!(!valid_subject("", false));
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let field = |c: NatsConfig| match c.validate() {
            Err(NatsError::Config { field, .. }) => Some(field),
            _ => None,
        };
        assert_eq!(field(NatsConfig::new("nats://127.0.0.1:4222")), None);
        assert_eq!(field(NatsConfig::new(" , ")), Some("url"));
        assert_eq!(
            field(NatsConfig::new("nats://h:4222").subject_prefix("a.>")),
            Some("subject_prefix")
        );
        assert_eq!(
            field(NatsConfig::new("nats://h:4222").max_acks_in_flight(0)),
            Some("max_acks_in_flight")
        );
        assert_eq!(
            field(NatsConfig::new("nats://h:4222").key_header(Some("a:b".into()))),
            Some("key_header")
        );
        assert_eq!(
            field(NatsConfig::new("nats://h:4222").ensure_stream(StreamSpec::new("A.B", ["x"]))),
            Some("ensure_stream.name")
        );
        assert_eq!(
            field(NatsConfig::new("nats://h:4222").ensure_stream(StreamSpec::new("A", ["x y"]))),
            Some("ensure_stream.subjects")
        );
    }

    #[test]
    fn config_files_parse_with_defaults() {
        let config: NatsConfig =
            serde_json::from_str(r#"{"url":"nats://h:4222"}"#).expect("parses");
        assert_eq!(config, NatsConfig::new("nats://h:4222"));
        let config: NatsConfig = serde_json::from_str(
            r#"{"url":"nats://h:4222","ensure_stream":{"name":"S","subjects":["s.>"],"duplicate_window":"10m"}}"#,
        )
        .expect("parses");
        assert_eq!(
            config.ensure_stream,
            Some(StreamSpec::new("S", ["s.>"]).duplicate_window(Duration::from_secs(600)))
        );
        assert!(serde_json::from_str::<NatsConfig>(r#"{"url":"x","prefix":"a"}"#).is_err());
    }
}
