//! [`AmqpPublisher`]: publishes outbox messages on one confirm-mode channel.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use outbox_core::{
    Capabilities, MESSAGE_ID_HEADER, Message, PublishError, PublishOutcome, Publisher,
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::error::{Refusal, refusal};
use crate::{AmqpConfig, AmqpError, Unroutable};

/// AMQP short strings (exchange, routing key, header names) hold at most 255 bytes.
const SHORT_MAX: usize = 255;

/// Publishes outbox messages to an AMQP 0-9-1 broker (RabbitMQ) with publisher confirms.
///
/// One connection, one channel in confirm mode. A call publishes its whole batch, then awaits
/// the confirms: a message is [`PublishOutcome::Published`] only once the broker acknowledged
/// it (for a persistent message to a durable queue, once it is written to disk). Calls are
/// served one at a time so that every confirm and returned message on the channel belongs to
/// the call in progress.
///
/// The connection is opened on the first publish (or [`AmqpPublisher::connect`]) and again
/// on the first publish after it broke; while the broker is unreachable every call fails
/// transiently. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct AmqpPublisher {
    inner: Arc<Inner>,
}

impl fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: AmqpConfig,
    uri: AMQPUri,
    /// The current connection and channel; held while (re)connecting.
    link: tokio::sync::Mutex<Slot>,
    /// Serializes publish calls on the channel.
    turn: tokio::sync::Mutex<()>,
    exchanges: Mutex<HashMap<String, Known>>,
    /// The broker's message size limit, once it refused a message for its size.
    learned_max: AtomicUsize,
}

#[derive(Default)]
struct Slot {
    link: Option<Link>,
    /// When the last connection attempt failed, and why.
    failure: Option<(Instant, String)>,
}

#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    channel: Channel,
    /// Set when a call ended without collecting all its confirms: the channel still carries
    /// them, so it is replaced before the next call.
    dirty: Arc<AtomicBool>,
}

impl Link {
    fn usable(&self) -> bool {
        self.connection.status().connected()
            && self.channel.status().connected()
            && !self.dirty.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Debug)]
enum Known {
    /// A passive declare found the exchange.
    Exists(Instant),
    /// The broker refused a publish to the exchange for want of permission.
    Refused(Instant, String),
}

/// Marks the link dirty unless disarmed: runs when the relay drops a call on timeout.
struct DirtyOnDrop(Option<Arc<AtomicBool>>);

impl DirtyOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DirtyOnDrop {
    fn drop(&mut self) {
        if let Some(dirty) = self.0.take() {
            dirty.store(true, Ordering::SeqCst);
        }
    }
}

/// One message ready to be sent.
struct Plan<'a> {
    index: usize,
    msg: &'a Message,
    exchange: &'a str,
    routing_key: &'a str,
}

type Sending<'a> =
    Pin<Box<dyn Future<Output = lapin::Result<lapin::PublisherConfirm>> + Send + 'a>>;

impl AmqpPublisher {
    /// A publisher for `config`; checks the configuration but does not connect yet (the first
    /// publish or [`Publisher::check`] does). (Async, as every publisher's constructor is,
    /// though this one does not wait for anything.)
    pub async fn new(config: AmqpConfig) -> Result<Self, AmqpError> {
        config.validate()?;
        let uri = config.parsed_uri()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                uri,
                link: tokio::sync::Mutex::new(Slot::default()),
                turn: tokio::sync::Mutex::new(()),
                exchanges: Mutex::new(HashMap::new()),
                learned_max: AtomicUsize::new(usize::MAX),
            }),
        })
    }

    /// A publisher for `config`, connected: fails when the broker cannot be reached.
    pub async fn connect(config: AmqpConfig) -> Result<Self, AmqpError> {
        let publisher = Self::new(config).await?;
        publisher.inner.link(None).await?;
        Ok(publisher)
    }

    /// The configuration.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }

    /// Closes the connection after the call in progress, if any; the next publish opens a new
    /// one.
    pub async fn close(&self) {
        let _turn = self.inner.turn.lock().await;
        let link = self.inner.link.lock().await.link.take();
        if let Some(link) = link
            && let Err(err) = link.connection.close(200, "closing".into()).await
        {
            debug!(error = %err, "AMQP connection already closed");
        }
    }
}

impl Inner {
    fn exchanges(&self) -> MutexGuard<'_, HashMap<String, Known>> {
        // The map is only ever replaced entry by entry: a panic cannot leave it inconsistent.
        self.exchanges
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn max_message_size(&self) -> usize {
        self.config
            .max_message_size
            .min(self.learned_max.load(Ordering::Relaxed))
    }

    /// The link to publish on: the current one, a new channel on the current connection, or a
    /// new connection. A caller that waited while another one failed to connect gets that
    /// failure instead of trying again at once.
    async fn link(&self, waiting_since: Option<Instant>) -> Result<Link, AmqpError> {
        let mut slot = self.link.lock().await;
        if let Some(link) = &slot.link {
            if link.usable() {
                return Ok(link.clone());
            }
            if link.connection.status().connected() {
                let connection = Arc::clone(&link.connection);
                match self.open_channel(&connection).await {
                    Ok(channel) => {
                        debug!("AMQP channel replaced");
                        let link = self.new_link(connection, channel);
                        slot.link = Some(link.clone());
                        return Ok(link);
                    }
                    Err(err) => {
                        warn!(error = %err, "could not open an AMQP channel; reconnecting");
                    }
                }
            }
        }
        slot.link = None;
        if let (Some(since), Some((failed_at, reason))) = (waiting_since, &slot.failure)
            && *failed_at >= since
        {
            return Err(AmqpError::Unavailable {
                uri: self.config.redacted_uri(),
                reason: reason.clone(),
            });
        }
        match self.open().await {
            Ok(link) => {
                slot.failure = None;
                slot.link = Some(link.clone());
                Ok(link)
            }
            Err(err) => {
                slot.failure = Some((Instant::now(), err.to_string()));
                Err(err)
            }
        }
    }

    fn new_link(&self, connection: Arc<Connection>, channel: Channel) -> Link {
        Link {
            connection,
            channel,
            dirty: Arc::new(AtomicBool::new(false)),
        }
    }

    async fn open(&self) -> Result<Link, AmqpError> {
        let uri = self.config.redacted_uri();
        let properties = ConnectionProperties::default()
            .with_connection_name(self.config.connection_name.clone().into());
        let connecting = Connection::connect_uri(self.uri.clone(), properties);
        let connection = match tokio::time::timeout(self.config.connect_timeout, connecting).await {
            Ok(Ok(connection)) => Arc::new(connection),
            Ok(Err(source)) => return Err(AmqpError::Connect { uri, source }),
            Err(_) => {
                return Err(AmqpError::ConnectTimeout {
                    uri,
                    timeout: self.config.connect_timeout,
                });
            }
        };
        let channel = self.open_channel(&connection).await?;
        info!(uri = %uri, "AMQP connection established");
        Ok(self.new_link(connection, channel))
    }

    async fn open_channel(&self, connection: &Connection) -> Result<Channel, AmqpError> {
        let opening = async {
            let channel =
                connection
                    .create_channel()
                    .await
                    .map_err(|source| AmqpError::Channel {
                        operation: "channel.open",
                        source,
                    })?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|source| AmqpError::Channel {
                    operation: "confirm.select",
                    source,
                })?;
            Ok(channel)
        };
        tokio::time::timeout(self.config.connect_timeout, opening)
            .await
            .unwrap_or_else(|_| {
                Err(AmqpError::Timeout {
                    operation: "channel.open and confirm.select",
                    timeout: self.config.connect_timeout,
                })
            })
    }

    /// Routes and checks one message; an error is the message's own permanent failure.
    fn plan<'a>(&self, index: usize, msg: &'a Message) -> Result<Plan<'a>, PublishError> {
        let (exchange, routing_key) = self
            .config
            .routing
            .route(&msg.destination, msg.key.as_deref());
        if exchange.len() > SHORT_MAX {
            return Err(PublishError::permanent(format!(
                "exchange name of {} bytes, AMQP allows {SHORT_MAX}",
                exchange.len()
            )));
        }
        if routing_key.len() > SHORT_MAX {
            return Err(PublishError::permanent(format!(
                "routing key of {} bytes, AMQP allows {SHORT_MAX}",
                routing_key.len()
            )));
        }
        if let Some(name) = msg.headers.keys().find(|name| name.len() > SHORT_MAX) {
            return Err(PublishError::permanent(format!(
                "header name of {} bytes, AMQP allows {SHORT_MAX}",
                name.len()
            )));
        }
        let max = self.max_message_size();
        if msg.payload.len() > max {
            return Err(PublishError::permanent(format!(
                "message of {} bytes exceeds the maximum message size of {max} bytes",
                msg.payload.len()
            )));
        }
        Ok(Plan {
            index,
            msg,
            exchange,
            routing_key,
        })
    }

    fn properties(&self, msg: &Message) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (name, value) in &msg.headers {
            headers.insert(
                ShortString::from(name.as_str()),
                AMQPValue::LongString(value.as_str().into()),
            );
        }
        let id = msg.id.to_string();
        headers.insert(
            MESSAGE_ID_HEADER.into(),
            AMQPValue::LongString(id.as_str().into()),
        );
        if let (Some(header), Some(key)) = (&self.config.key_header, &msg.key) {
            headers.insert(
                header.as_str().into(),
                AMQPValue::LongString(key.as_str().into()),
            );
        }
        let mut properties = BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2)
            .with_timestamp(u64::try_from(msg.created_at.timestamp()).unwrap_or(0))
            .with_headers(headers);
        if let Some(content_type) = msg
            .headers
            .iter()
            .find(|(name, value)| {
                name.eq_ignore_ascii_case("content-type") && value.len() <= SHORT_MAX
            })
            .map(|(_, value)| value)
        {
            properties = properties.with_content_type(content_type.as_str().into());
        }
        properties
    }

    /// Fails the messages whose exchange is missing or refused, checking with a passive
    /// declare the exchanges not checked within `exchange_check_ttl`. Checks run on a channel
    /// of their own, since a missing exchange closes the channel that asked.
    async fn check_exchanges<'a>(
        &self,
        link: &Link,
        plans: Vec<Plan<'a>>,
        outcomes: &mut [Option<PublishOutcome>],
    ) -> Result<Vec<Plan<'a>>, AmqpError> {
        let now = Instant::now();
        let ttl = self.config.exchange_check_ttl;
        let mut to_check: Vec<&str> = Vec::new();
        let mut refused: HashMap<&str, String> = HashMap::new();
        {
            let mut known = self.exchanges();
            for plan in &plans {
                if plan.exchange.is_empty() || to_check.contains(&plan.exchange) {
                    continue;
                }
                match known.get(plan.exchange) {
                    Some(Known::Exists(at)) if now.duration_since(*at) < ttl => {}
                    Some(Known::Refused(at, text)) if now.duration_since(*at) < ttl => {
                        refused.insert(plan.exchange, text.clone());
                    }
                    Some(_) => {
                        known.remove(plan.exchange);
                        to_check.push(plan.exchange);
                    }
                    None => to_check.push(plan.exchange),
                }
            }
        }
        let mut missing: HashSet<&str> = HashSet::new();
        let mut probe: Option<Channel> = None;
        for exchange in to_check {
            let channel =
                match probe.take() {
                    Some(channel) if channel.status().connected() => channel,
                    _ => link.connection.create_channel().await.map_err(|source| {
                        AmqpError::Channel {
                            operation: "channel.open",
                            source,
                        }
                    })?,
                };
            let options = ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            };
            let declared = channel.exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Direct,
                options,
                FieldTable::default(),
            );
            let declared = tokio::time::timeout(self.config.confirm_timeout, declared)
                .await
                .map_err(|_| AmqpError::Timeout {
                    operation: "exchange.declare (passive)",
                    timeout: self.config.confirm_timeout,
                })?;
            match declared {
                Ok(()) => {
                    self.exchanges()
                        .insert(exchange.to_owned(), Known::Exists(Instant::now()));
                    probe = Some(channel);
                }
                Err(err) if matches!(refusal(&err), Refusal::MissingExchange(_)) => {
                    missing.insert(exchange);
                }
                Err(source) => {
                    return Err(AmqpError::Channel {
                        operation: "exchange.declare (passive)",
                        source,
                    });
                }
            }
        }
        let mut ready = Vec::with_capacity(plans.len());
        for plan in plans {
            if missing.contains(plan.exchange) {
                outcomes[plan.index] = Some(PublishOutcome::Failed(PublishError::permanent(
                    format!("exchange '{}' does not exist", plan.exchange),
                )));
            } else if let Some(text) = refused.get(plan.exchange) {
                outcomes[plan.index] = Some(PublishOutcome::Failed(PublishError::permanent(
                    format!("publishing to exchange '{}' refused: {text}", plan.exchange),
                )));
            } else {
                ready.push(plan);
            }
        }
        Ok(ready)
    }

    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        let waiting_since = Instant::now();
        let _turn = self.turn.lock().await;
        let link = self.link(Some(waiting_since)).await?;
        if link.connection.status().blocked() {
            return Err(AmqpError::Blocked.into());
        }
        let mut outcomes: Vec<Option<PublishOutcome>> = batch.iter().map(|_| None).collect();
        let mut plans = Vec::with_capacity(batch.len());
        for (index, msg) in batch.iter().enumerate() {
            match self.plan(index, msg) {
                Ok(plan) => plans.push(plan),
                Err(err) => outcomes[index] = Some(PublishOutcome::Failed(err)),
            }
        }
        let plans = self.check_exchanges(&link, plans, &mut outcomes).await?;

        let guard = DirtyOnDrop(Some(Arc::clone(&link.dirty)));
        let deadline = Instant::now() + self.config.confirm_timeout;
        let options = BasicPublishOptions {
            mandatory: self.config.unroutable != Unroutable::Ignore,
            immediate: false,
        };
        // Each publish enqueues its frames when first polled: polling them once, in order,
        // pipelines the whole batch in call order before any confirm is awaited.
        let mut sends: Vec<(&Plan<'_>, Step<'_>)> = Vec::with_capacity(plans.len());
        let mut closed: Option<lapin::Error> = None;
        for plan in &plans {
            if let Some(err) = &closed {
                outcomes[plan.index] = Some(failed_on_channel(err));
                continue;
            }
            let mut send: Sending<'_> = Box::pin(link.channel.basic_publish(
                plan.exchange.into(),
                plan.routing_key.into(),
                options,
                &plan.msg.payload,
                self.properties(plan.msg),
            ));
            match futures::poll!(send.as_mut()) {
                Poll::Ready(Err(err)) => {
                    outcomes[plan.index] = Some(failed_on_channel(&err));
                    closed = Some(err);
                }
                Poll::Ready(Ok(confirm)) => sends.push((plan, Step::Sent(confirm))),
                Poll::Pending => sends.push((plan, Step::Sending(send))),
            }
        }

        let mut confirmations: Vec<(&Plan<'_>, Result<Confirmation, Failure>)> =
            Vec::with_capacity(sends.len());
        let mut returned: HashMap<String, (u16, String)> = HashMap::new();
        let mut complete = true;
        for (plan, send) in sends {
            let sent = match send {
                Step::Sent(confirm) => Ok(confirm),
                Step::Sending(send) => match tokio::time::timeout_at(deadline, send).await {
                    Err(_) => Err(Failure::TimedOut),
                    Ok(Err(err)) => Err(Failure::Channel(err)),
                    Ok(Ok(confirm)) => Ok(confirm),
                },
            };
            let confirmation = match sent {
                Err(failure) => Err(failure),
                Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                    Err(_) => Err(Failure::TimedOut),
                    Ok(Err(err)) => Err(Failure::Channel(err)),
                    Ok(Ok(confirmation)) => Ok(confirmation),
                },
            };
            if matches!(confirmation, Err(Failure::TimedOut)) {
                complete = false;
            }
            // Returned messages ride on whichever confirm the client resolved with them;
            // they are matched back to their message by id.
            let confirmation = confirmation.map(|confirmation| match confirmation {
                Confirmation::Ack(Some(message)) => {
                    note_returned(&mut returned, &message);
                    Confirmation::Ack(None)
                }
                Confirmation::Nack(Some(message)) => {
                    note_returned(&mut returned, &message);
                    Confirmation::Nack(None)
                }
                other => other,
            });
            confirmations.push((plan, confirmation));
        }
        if complete {
            guard.disarm();
        }

        for (plan, confirmation) in confirmations {
            let id = plan.msg.id.to_string();
            let outcome = match confirmation {
                Ok(Confirmation::Ack(_)) => match returned.get(&id) {
                    None => PublishOutcome::Published,
                    Some((code, text)) => {
                        let error = format!(
                            "unroutable: exchange '{}' has no queue for routing key '{}' ({code} {text})",
                            plan.exchange, plan.routing_key
                        );
                        PublishOutcome::Failed(match self.config.unroutable {
                            Unroutable::Retry => PublishError::transient(error),
                            _ => PublishError::permanent(error),
                        })
                    }
                },
                Ok(Confirmation::Nack(_)) => PublishOutcome::Failed(PublishError::transient(
                    "the broker refused the message (basic.nack)",
                )),
                Ok(Confirmation::NotRequested) => {
                    link.dirty.store(true, Ordering::SeqCst);
                    PublishOutcome::Failed(PublishError::transient(
                        "the channel was not in confirm mode; the message was not confirmed",
                    ))
                }
                Err(Failure::TimedOut) => PublishOutcome::Failed(PublishError::transient(format!(
                    "not confirmed within {:?}",
                    self.config.confirm_timeout
                ))),
                Err(Failure::Channel(err)) => {
                    PublishOutcome::Failed(self.channel_failure(plan, &err))
                }
            };
            outcomes[plan.index] = Some(outcome);
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

    /// A message whose confirm failed because the channel or connection closed. The broker
    /// closes the channel for the first message it refuses and every message in flight fails
    /// with it: only those that match the refusal fail permanently, the others transiently.
    fn channel_failure(&self, plan: &Plan<'_>, err: &lapin::Error) -> PublishError {
        match refusal(err) {
            Refusal::MissingExchange(exchange) => {
                self.exchanges().remove(&exchange);
                if exchange == plan.exchange {
                    return PublishError::permanent(format!(
                        "exchange '{exchange}' does not exist"
                    ))
                    .with_source(err.clone());
                }
            }
            Refusal::AccessRefused(exchange) => {
                let text = err.to_string();
                self.exchanges()
                    .insert(exchange.clone(), Known::Refused(Instant::now(), text));
                if exchange == plan.exchange {
                    return PublishError::permanent(format!(
                        "publishing to exchange '{exchange}' refused"
                    ))
                    .with_source(err.clone());
                }
            }
            Refusal::TooLarge(max) => {
                if self.learned_max.fetch_min(max, Ordering::Relaxed) > max {
                    warn!(max, "the broker limits messages to {max} bytes");
                }
                if plan.msg.payload.len() > max {
                    return PublishError::permanent(format!(
                        "message of {} bytes exceeds the broker's maximum message size of {max} bytes",
                        plan.msg.payload.len()
                    ))
                    .with_source(err.clone());
                }
            }
            Refusal::Other => {}
        }
        failed_on_channel_error(err)
    }
}

/// A publish whose frames are queued, waiting for them to be written or already written.
enum Step<'a> {
    Sending(Sending<'a>),
    Sent(lapin::PublisherConfirm),
}

enum Failure {
    TimedOut,
    Channel(lapin::Error),
}

fn note_returned(
    returned: &mut HashMap<String, (u16, String)>,
    message: &lapin::message::BasicReturnMessage,
) {
    if let Some(id) = message.delivery.properties.message_id() {
        returned.insert(
            id.as_str().to_owned(),
            (message.reply_code, message.reply_text.as_str().to_owned()),
        );
    }
}

fn failed_on_channel_error(err: &lapin::Error) -> PublishError {
    PublishError::transient("AMQP channel closed before the message was confirmed")
        .with_source(err.clone())
}

fn failed_on_channel(err: &lapin::Error) -> PublishOutcome {
    PublishOutcome::Failed(failed_on_channel_error(err))
}

impl Publisher for AmqpPublisher {
    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.inner.publish(batch).await
    }

    /// Messages published in one call go out in order on one channel, but with pipelined
    /// confirms a later message of a key can be confirmed after an earlier one failed: no
    /// per-key promise within a call.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    async fn check(&self) -> Result<(), PublishError> {
        let link = self.inner.link(None).await?;
        if link.connection.status().blocked() {
            return Err(AmqpError::Blocked.into());
        }
        Ok(())
    }

    /// Waits for the call in progress, if any: a call returns only once its confirms arrived,
    /// so nothing else is left to flush.
    async fn flush(&self) -> Result<(), PublishError> {
        let _turn = self.inner.turn.lock().await;
        Ok(())
    }
}
