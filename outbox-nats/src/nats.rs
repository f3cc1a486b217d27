//! [`NatsPublisher`]: publishes outbox messages to JetStream with a window of acks in flight.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::{self, context::GetStreamByNameErrorKind, publish::PublishAck};
use async_nats::{ConnectOptions, Event, HeaderMap, HeaderName, HeaderValue, ServerAddr};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use outbox_core::{
    Capabilities, MESSAGE_ID_HEADER, Message, PublishError, PublishOutcome, Publisher,
};
use tracing::{debug, info, warn};

use crate::config::valid_subject;
use crate::error::{Failure, classify};
use crate::{NatsConfig, NatsError, StreamSpec};

/// What one publish call has come to so far.
struct CallState<'a> {
    batch: &'a [Message],
    /// One outcome per message, once known.
    outcomes: Vec<Option<PublishOutcome>>,
    /// Messages no stream answered for: their subject is looked up once the call is over.
    no_stream: Vec<usize>,
    /// Why the connection was lost, if it was: the rest of the call is not sent.
    lost: Option<String>,
    /// Keys with a failed message in this call (pipelined keys only): their later messages
    /// are not sent.
    failed_keys: HashSet<String>,
}

impl<'a> CallState<'a> {
    fn new(batch: &'a [Message]) -> Self {
        Self {
            batch,
            outcomes: batch.iter().map(|_| None).collect(),
            no_stream: Vec::new(),
            lost: None,
            failed_keys: HashSet::new(),
        }
    }

    /// Records the stream's answer for message `index`.
    fn settle(
        &mut self,
        index: usize,
        result: Result<PublishAck, jetstream::context::PublishError>,
    ) {
        // A duplicate ack means the stream already holds this id: published.
        let outcome = match result {
            Ok(_ack) => PublishOutcome::Published,
            Err(err) => {
                self.failed_keys.extend(self.batch[index].key.clone());
                match classify(err) {
                    Failure::NoStream => {
                        self.no_stream.push(index);
                        return;
                    }
                    Failure::Lost(err) => {
                        self.lost.get_or_insert_with(|| err.to_chain_string());
                        PublishOutcome::Failed(err)
                    }
                    Failure::Message(err) => PublishOutcome::Failed(err),
                }
            }
        };
        self.outcomes[index] = Some(outcome);
    }
}

/// The header JetStream deduplicates on.
const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// Publishes outbox messages to NATS JetStream.
///
/// Each message goes to the subject of its destination with a `Nats-Msg-Id` header holding its
/// id, so that the stream drops a message published twice within its duplicate window. A call
/// sends up to [`NatsConfig::max_acks_in_flight`] messages before awaiting the oldest ack, then
/// one more per ack. A message is [`PublishOutcome::Published`] once the stream acknowledged it
/// (stored, or recognised as a duplicate of a stored one).
///
/// The client reconnects by itself; while it is not connected every call fails at once with
/// a transient error. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct NatsPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: NatsConfig,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// Whether [`NatsConfig::ensure_stream`] was done.
    stream_ready: AtomicBool,
    ensuring: tokio::sync::Mutex<()>,
    /// Until then, calls wait for the first connection instead of failing at once.
    first_connect_by: tokio::time::Instant,
}

impl fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsPublisher")
            .field("config", &self.inner.config)
            .field("state", &self.inner.client.connection_state())
            .finish_non_exhaustive()
    }
}

impl NatsPublisher {
    /// A publisher for `config`. The client connects in the background and keeps reconnecting,
    /// so this succeeds while the servers are unreachable (publishing then fails transiently).
    pub async fn new(config: NatsConfig) -> Result<Self, NatsError> {
        config.validate()?;
        // Credentials travel in the connect options, never inside the server addresses: the
        // client logs those addresses (at debug level) as it connects.
        let mut credentials: Option<(String, Option<String>)> = None;
        let mut servers: Vec<ServerAddr> = Vec::new();
        for server in config.servers()? {
            let mut parsed = url::Url::parse(&server).map_err(|err| {
                NatsError::config("url", format!("{}: {err}", config.redacted_url()))
            })?;
            if !parsed.username().is_empty() && credentials.is_none() {
                let user = percent_decode(parsed.username());
                let password = parsed.password().map(percent_decode);
                credentials = Some((user, password));
            }
            // Infallible for the URLs `servers()` accepted (they have a host).
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            servers.push(
                ServerAddr::from_str(parsed.as_str())
                    .map_err(|err| NatsError::config("url", err.to_string()))?,
            );
        }
        let url = config.redacted_url();
        let log_url = url.clone();
        let mut options = ConnectOptions::new();
        options = match credentials {
            Some((user, Some(password))) => options.user_and_password(user, password),
            Some((token, None)) => options.token(token),
            None => options,
        };
        let options = options
            .name(&config.connection_name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.ack_timeout))
            .ping_interval(config.ping_interval)
            .event_callback(move |event| {
                let url = log_url.clone();
                async move {
                    match event {
                        Event::Connected => info!(%url, "NATS connected"),
                        Event::Disconnected => warn!(%url, "NATS disconnected; reconnecting"),
                        other => debug!(%url, event = %other, "NATS client event"),
                    }
                }
            });
        let client = options
            .connect(servers)
            .await
            .map_err(|source| NatsError::Client { url, source })?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            // Acks of calls the relay dropped are awaited in the background: this bounds how
            // long they hold their place in the in-flight limit.
            .ack_timeout(config.ack_timeout)
            .max_ack_inflight(config.max_acks_in_flight.saturating_mul(8).max(5_000))
            .backpressure_on_inflight(true)
            .build(client.clone());
        let config_connect_timeout = config.connect_timeout;
        Ok(Self {
            inner: Arc::new(Inner {
                stream_ready: AtomicBool::new(config.ensure_stream.is_none()),
                config,
                client,
                jetstream,
                ensuring: tokio::sync::Mutex::new(()),
                first_connect_by: tokio::time::Instant::now() + config_connect_timeout,
            }),
        })
    }

    /// A publisher for `config`, connected within [`NatsConfig::connect_timeout`] (and with
    /// [`NatsConfig::ensure_stream`] done): fails when the servers cannot be reached.
    pub async fn connect(config: NatsConfig) -> Result<Self, NatsError> {
        let publisher = Self::new(config).await?;
        publisher.inner.connected().await?;
        publisher.inner.ensure_configured_stream().await?;
        Ok(publisher)
    }

    /// The configuration.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// The NATS client, for what this crate does not cover.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The JetStream context the publisher uses.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.jetstream
    }

    /// Creates the stream `spec` unless a stream of that name exists (an existing stream is
    /// left as it is).
    pub async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), NatsError> {
        self.inner.ensure_stream(spec).await
    }
}

impl Inner {
    fn not_connected(&self) -> NatsError {
        let state = match self.client.connection_state() {
            State::Pending => "connecting",
            State::Connected => "connected",
            State::Disconnected => "disconnected, reconnecting",
        };
        NatsError::NotConnected {
            url: self.config.redacted_url(),
            state: state.to_owned(),
        }
    }

    /// Ok when connected. Right after [`NatsPublisher::new`] this waits for the first
    /// connection, up to the connect timeout; afterwards a client that is not connected
    /// (the servers are unreachable, it is reconnecting) fails at once.
    async fn connected(&self) -> Result<(), NatsError> {
        loop {
            match self.client.connection_state() {
                State::Connected => return Ok(()),
                State::Pending if tokio::time::Instant::now() < self.first_connect_by => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                _ => return Err(self.not_connected()),
            }
        }
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), NatsError> {
        spec.validate()?;
        let max_message_size = match spec.max_message_size {
            Some(max) => i32::try_from(max).unwrap_or(i32::MAX),
            None => -1,
        };
        let config = StreamConfig {
            name: spec.name.clone(),
            subjects: spec.subjects.clone(),
            duplicate_window: spec.duplicate_window.unwrap_or_default(),
            max_message_size,
            storage: if spec.memory {
                StorageType::Memory
            } else {
                StorageType::File
            },
            num_replicas: spec.replicas,
            ..StreamConfig::default()
        };
        match self.jetstream.get_or_create_stream(config).await {
            Ok(_) => {
                debug!(stream = %spec.name, "JetStream stream ready");
                Ok(())
            }
            Err(err) => {
                use async_nats::jetstream::context::CreateStreamErrorKind as Kind;
                let transient = matches!(err.kind(), Kind::TimedOut | Kind::Response);
                Err(NatsError::jetstream("stream creation", &err, transient))
            }
        }
    }

    async fn ensure_configured_stream(&self) -> Result<(), NatsError> {
        if self.stream_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self.ensuring.lock().await;
        if self.stream_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(spec) = &self.config.ensure_stream {
            self.ensure_stream(spec).await?;
        }
        self.stream_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Builds the subject and headers of `msg`; an error is the message's own permanent
    /// failure.
    fn prepare(&self, msg: &Message) -> Result<(String, HeaderMap), PublishError> {
        let subject = self.config.subject(&msg.destination);
        if !valid_subject(&subject, false) {
            return Err(PublishError::permanent(format!(
                "{subject:?} is not a valid NATS subject to publish to"
            )));
        }
        let mut headers = HeaderMap::new();
        let mut insert = |name: &str, value: &str| -> Result<(), PublishError> {
            let header = HeaderName::from_str(name)
                .ok()
                .filter(|_| !name.is_empty())
                .ok_or_else(|| {
                    PublishError::permanent(format!(
                        "header name {name:?} is not valid in NATS (printable ASCII, no ':')"
                    ))
                })?;
            let value = HeaderValue::from_str(value).map_err(|_| {
                PublishError::permanent(format!("the value of header {name:?} holds a line break"))
            })?;
            headers.insert(header, value);
            Ok(())
        };
        for (name, value) in &msg.headers {
            insert(name, value)?;
        }
        let id = msg.id.to_string();
        insert(MESSAGE_ID_HEADER, &id)?;
        insert(NATS_MSG_ID, &id)?;
        if let (Some(header), Some(key)) = (&self.config.key_header, &msg.key) {
            insert(header, key)?;
        }
        Ok((subject, headers))
    }

    /// Why no stream took messages on `subject`: a missing stream is a configuration problem
    /// that retrying cannot fix (permanent); a stream that exists but did not answer (leader
    /// election, restart) is transient.
    async fn no_stream(&self, subject: &str) -> PublishError {
        match self.jetstream.stream_by_subject(subject).await {
            Err(err) if matches!(err.kind(), GetStreamByNameErrorKind::NotFound) => {
                PublishError::permanent(format!(
                    "no JetStream stream stores subject {subject:?}: create one (see ensure_stream)"
                ))
            }
            Ok(stream) => PublishError::transient(format!(
                "stream {stream:?} stores subject {subject:?} but did not answer"
            )),
            Err(err) => PublishError::transient(format!(
                "no JetStream stream answered on subject {subject:?} and the lookup failed"
            ))
            .with_source(err),
        }
    }

    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        self.connected().await?;
        self.ensure_configured_stream().await?;

        let mut call = CallState::new(batch);
        let mut in_flight = FuturesOrdered::new();
        let window = self.config.max_acks_in_flight;

        for (index, msg) in batch.iter().enumerate() {
            if call.lost.is_none() && self.client.connection_state() != State::Connected {
                call.lost = Some(self.not_connected().to_string());
            }
            if let Some(reason) = &call.lost {
                call.outcomes[index] = Some(PublishOutcome::Failed(PublishError::transient(
                    format!("not sent: an earlier message of the call got no ack ({reason})"),
                )));
                continue;
            }
            if msg
                .key
                .as_deref()
                .is_some_and(|key| call.failed_keys.contains(key))
            {
                call.outcomes[index] = Some(PublishOutcome::Failed(PublishError::transient(
                    "not sent: an earlier message of its key failed in this call",
                )));
                continue;
            }
            let (subject, headers) = match self.prepare(msg) {
                Ok(prepared) => prepared,
                Err(err) => {
                    call.failed_keys.extend(msg.key.clone());
                    call.outcomes[index] = Some(PublishOutcome::Failed(err));
                    continue;
                }
            };
            while in_flight.len() >= window {
                if let Some((done, result)) = in_flight.next().await {
                    call.settle(done, result);
                }
            }
            // Sending waits for room in the client's buffer and in the context's in-flight
            // limit: bounded like an ack.
            let sending =
                self.jetstream
                    .publish_with_headers(subject, headers, msg.payload.clone().into());
            let sent = tokio::time::timeout(self.config.ack_timeout, sending)
                .await
                .unwrap_or_else(|_| {
                    Err(jetstream::context::PublishError::new(
                        jetstream::context::PublishErrorKind::TimedOut,
                    ))
                });
            match sent {
                Ok(ack) => in_flight.push_back(async move { (index, ack.await) }),
                Err(err) => call.settle(index, Err(err)),
            }
        }
        while let Some((done, result)) = in_flight.next().await {
            call.settle(done, result);
        }
        let CallState {
            mut outcomes,
            no_stream,
            ..
        } = call;

        let mut lookups: HashMap<String, (bool, String)> = HashMap::new();
        for index in no_stream {
            let subject = self.config.subject(&batch[index].destination);
            if !lookups.contains_key(&subject) {
                let err = self.no_stream(&subject).await;
                lookups.insert(subject.clone(), (err.is_transient(), err.to_chain_string()));
            }
            let (transient, text) = &lookups[&subject];
            outcomes[index] = Some(PublishOutcome::Failed(if *transient {
                PublishError::transient(text.clone())
            } else {
                PublishError::permanent(text.clone())
            }));
        }

        Ok(outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    PublishOutcome::Failed(PublishError::transient("message was not sent"))
                })
            })
            .collect())
    }

    async fn check(&self) -> Result<(), PublishError> {
        self.connected().await?;
        self.jetstream_info().await?;
        self.ensure_configured_stream().await?;
        Ok(())
    }

    /// Asks JetStream for the account's information: answers only when JetStream is enabled
    /// for the account. Read loosely, since servers older than the client add or lack fields.
    async fn jetstream_info(&self) -> Result<(), NatsError> {
        let request = self.client.request("$JS.API.INFO", Vec::new().into());
        let reply = tokio::time::timeout(self.config.ack_timeout, request)
            .await
            .map_err(|_| NatsError::JetStream {
                operation: "account info",
                reason: format!("no answer within {:?}", self.config.ack_timeout),
                transient: true,
            })?
            .map_err(|err| {
                let reason = match err.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        "JetStream is not enabled on the server or for the account".to_owned()
                    }
                    _ => err.to_string(),
                };
                NatsError::JetStream {
                    operation: "account info",
                    reason,
                    transient: true,
                }
            })?;
        let body: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|err| NatsError::jetstream("account info", &err, true))?;
        match body.get("error") {
            Some(error) => Err(NatsError::JetStream {
                operation: "account info",
                reason: error.to_string(),
                transient: true,
            }),
            None => Ok(()),
        }
    }

    async fn flush(&self) -> Result<(), PublishError> {
        match tokio::time::timeout(self.config.ack_timeout, self.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(PublishError::transient("NATS flush failed").with_source(err)),
            Err(_) => Err(PublishError::transient(format!(
                "NATS flush not done within {:?}",
                self.config.ack_timeout
            ))),
        }
    }
}

impl Publisher for NatsPublisher {
    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.inner.publish(batch).await
    }

    /// Messages of a call are sent in order on one connection, but with acks pipelined a later
    /// message of a key can be stored after an earlier one failed: no per-key promise within a
    /// call, unless [`NatsConfig::pipeline_keys`] accepts that relaxation.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default().ordered_per_key(self.inner.config.pipeline_keys)
    }

    /// Connected, JetStream answering for the account, and the configured stream in place.
    async fn check(&self) -> Result<(), PublishError> {
        self.inner.check().await
    }

    /// Writes out what the client buffered. Each call awaits its own acks, so nothing else is
    /// pending.
    async fn flush(&self) -> Result<(), PublishError> {
        self.inner.flush().await
    }
}

/// Decodes the `%XX` escapes of a URL's user or password part.
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}
