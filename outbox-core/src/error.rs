//! Errors of stores, publishers and the relay. Each says whether trying again can help.

use std::error::Error as StdError;
use std::fmt;

type Source = Box<dyn StdError + Send + Sync + 'static>;

/// Whether an operation that failed may succeed when tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Retryable {
    /// A passing condition (connection lost, timeout, broker unavailable): try again later.
    Transient,
    /// Trying again cannot help (message too large, invalid destination, bad configuration).
    Permanent,
}

/// What kind of store failure happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The database could not be reached, or the connection broke.
    Connection,
    /// The database refused or failed a statement.
    Database,
    /// The message was refused at enqueue (see [`crate::InvalidMessage`]).
    InvalidMessage,
    /// The store's configuration is invalid (for example a table name that is not an identifier).
    Config,
    /// A stored row could not be decoded.
    Decode,
    /// The outbox table is missing or has another schema version: run the migrations.
    Schema,
}

/// A failure of a [`Store`](crate::Store) operation.
///
/// Its `Display` names the kind of failure, what the store was doing, and the underlying
/// database error (which [`source`](std::error::Error::source) also returns, for downcasting):
/// one log line says what happened.
///
/// ```
/// use outbox_core::{StoreError, StoreErrorKind};
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// let err = StoreError::new(StoreErrorKind::Connection, "claiming messages").with_source(io);
/// assert_eq!(err.to_string(), "store connection failed: claiming messages: connection refused");
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{kind_text}: {message}{cause}", kind_text = kind_text(self.kind), cause = Cause(&self.message, self.source.as_deref()))]
pub struct StoreError {
    kind: StoreErrorKind,
    retryable: Retryable,
    message: String,
    #[source]
    source: Option<Source>,
}

fn kind_text(kind: StoreErrorKind) -> &'static str {
    match kind {
        StoreErrorKind::Connection => "store connection failed",
        StoreErrorKind::Database => "store statement failed",
        StoreErrorKind::InvalidMessage => "message refused",
        StoreErrorKind::Config => "invalid store configuration",
        StoreErrorKind::Decode => "stored message cannot be decoded",
        StoreErrorKind::Schema => "outbox schema missing or outdated",
    }
}

impl StoreError {
    /// A new error; connection errors are transient, every other kind permanent unless
    /// [`StoreError::transient`] says otherwise.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        let retryable = match kind {
            StoreErrorKind::Connection => Retryable::Transient,
            _ => Retryable::Permanent,
        };
        Self {
            kind,
            retryable,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Marks the error as transient (for example a deadlock or a lock timeout).
    pub fn transient(mut self) -> Self {
        self.retryable = Retryable::Transient;
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Whether trying again may help.
    pub fn retryable(&self) -> Retryable {
        self.retryable
    }

    /// True when trying again may help.
    pub fn is_transient(&self) -> bool {
        self.retryable == Retryable::Transient
    }

    /// The message without the kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<crate::InvalidMessage> for StoreError {
    fn from(err: crate::InvalidMessage) -> Self {
        StoreError::new(StoreErrorKind::InvalidMessage, err.to_string()).with_source(err)
    }
}

/// A failure to publish one message, or a whole batch.
///
/// Publishers classify: [`Retryable::Transient`] failures are retried with backoff by the relay,
/// [`Retryable::Permanent`] ones are dead-lettered at once. Its `Display` shows the underlying
/// broker error too, as [`StoreError`]'s does.
#[derive(Debug, thiserror::Error)]
#[error("{} publish failure: {message}{cause}", if self.is_transient() { "transient" } else { "permanent" }, cause = Cause(&self.message, self.source.as_deref()))]
pub struct PublishError {
    retryable: Retryable,
    message: String,
    #[source]
    source: Option<Source>,
}

impl PublishError {
    /// A failure that may pass: the relay retries with backoff.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            retryable: Retryable::Transient,
            message: message.into(),
            source: None,
        }
    }

    /// A failure that cannot pass: the relay dead-letters the message at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: Retryable::Permanent,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Whether trying again may help.
    pub fn retryable(&self) -> Retryable {
        self.retryable
    }

    /// True when trying again may help.
    pub fn is_transient(&self) -> bool {
        self.retryable == Retryable::Transient
    }

    /// The message without the classification prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error with its chain of sources, on one line, as stored in `last_error`.
    pub fn to_chain_string(&self) -> String {
        chain(self)
    }
}

/// The underlying error of a [`StoreError`] or [`PublishError`], as its `Display` appends it:
/// `": cause"`, unless the message already says it.
struct Cause<'a>(&'a str, Option<&'a (dyn StdError + Send + Sync + 'static)>);

impl fmt::Display for Cause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(source) = self.1 else {
            return Ok(());
        };
        let text = chain(source);
        if text.is_empty() || self.0.contains(&text) {
            return Ok(());
        }
        write!(f, ": {text}")
    }
}

/// Formats an error and its sources on one line, each cause once: an error whose `Display`
/// already shows its source (as every error of this crate does) is not repeated.
pub(crate) fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(source) = next {
        let part = source.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = source.source();
    }
    text
}

/// An invalid [`RelayConfig`](crate::RelayConfig) or [`RetryPolicy`](crate::RetryPolicy).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid relay configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The setting at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: impl fmt::Display) -> Self {
        Self {
            field,
            reason: reason.to_string(),
        }
    }
}

/// Why [`Relay::run`](crate::Relay::run) stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store failed permanently (for example the outbox table is missing).
    #[error(transparent)]
    Store(#[from] StoreError),
}
