//! [`ScriptedPublisher`]: a publisher that fails on cue, for testing relays and stores.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use outbox_core::{Capabilities, Message, MessageId, PublishError, PublishOutcome, Publisher};
use tokio::sync::Notify;

/// Wraps a publisher (by default a [`outbox_core::MemoryPublisher`]) and injects faults:
/// transient or permanent failures of chosen messages, whole-call errors, calls that hang past
/// the publish timeout, and a crash in the middle of a call. It also watches the relay: it
/// counts messages that were in flight twice at once and the most messages of one key in one
/// call.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use outbox_core::{Message, NewMessage, Publisher};
/// use outbox_testkit::ScriptedPublisher;
///
/// let publisher = ScriptedPublisher::new();
/// let msg = Message::new(NewMessage::new("t", "x"), chrono::Utc::now());
/// publisher.fail_transient(msg.id, 1);
/// let first = publisher.publish(std::slice::from_ref(&msg)).await.unwrap();
/// assert!(!first[0].is_published());
/// let second = publisher.publish(std::slice::from_ref(&msg)).await.unwrap();
/// assert!(second[0].is_published());
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ScriptedPublisher<P = outbox_core::MemoryPublisher> {
    inner: P,
    state: Arc<Mutex<ScriptState>>,
    crashed: Arc<Notify>,
    ordered: bool,
}

/// A scripted broker outage: what publish calls (and checks) meet while it lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outage {
    /// Every call fails as a whole with a transient error, and so does every check: a broker
    /// that refuses connections.
    Refused,
    /// Every call and every check hangs until dropped: a broker behind a black hole.
    Hung,
    /// Every message of every call fails transiently while checks succeed: a broker that
    /// accepts connections but cannot take messages (no leader, storage unavailable).
    FailsEveryMessage,
}

#[derive(Debug, Default)]
struct ScriptState {
    transient: HashMap<MessageId, u32>,
    permanent: HashMap<MessageId, String>,
    outage: Option<Outage>,
    checks: u64,
    fail_calls: u32,
    hang_calls: u32,
    hang_all: bool,
    crash_after: Option<usize>,
    in_flight: HashSet<MessageId>,
    overlaps: u64,
    calls: u64,
    max_per_key_in_call: usize,
    failures: u64,
}

impl ScriptedPublisher<outbox_core::MemoryPublisher> {
    /// A scripted [`outbox_core::MemoryPublisher`] that does not keep per-key order in a call
    /// (so the relay sends one message per key per call).
    pub fn new() -> Self {
        Self::wrap(outbox_core::MemoryPublisher::new())
    }
}

impl Default for ScriptedPublisher<outbox_core::MemoryPublisher> {
    fn default() -> Self {
        Self::new()
    }
}

struct InFlight<'a> {
    state: &'a Mutex<ScriptState>,
    ids: Vec<MessageId>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for id in &self.ids {
            state.in_flight.remove(id);
        }
    }
}

impl<P: Publisher + Clone> ScriptedPublisher<P> {
    /// Wraps `inner`.
    pub fn wrap(inner: P) -> Self {
        Self {
            inner,
            state: Arc::default(),
            crashed: Arc::default(),
            ordered: false,
        }
    }

    /// Declares per-key order within a call (the script then fails every later message of a
    /// key after one of that key failed, as such a publisher must).
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// The wrapped publisher.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, ScriptState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `id` fails transiently its next `times` attempts.
    pub fn fail_transient(&self, id: MessageId, times: u32) {
        self.lock().transient.insert(id, times);
    }

    /// `id` fails permanently.
    pub fn fail_permanent(&self, id: MessageId) {
        self.fail_permanent_with(id, "scripted permanent failure");
    }

    /// `id` fails permanently with an error that says `text` (any text: control characters,
    /// NUL bytes, a URL with a password, megabytes of it).
    pub fn fail_permanent_with(&self, id: MessageId, text: impl Into<String>) {
        self.lock().permanent.insert(id, text.into());
    }

    /// Starts a broker outage of the given kind, until [`ScriptedPublisher::end_outage`].
    pub fn outage(&self, outage: Outage) {
        self.lock().outage = Some(outage);
    }

    /// Ends the outage: calls and checks go through again.
    pub fn end_outage(&self) {
        self.lock().outage = None;
    }

    /// Checks ([`Publisher::check`]) so far.
    pub fn checks(&self) -> u64 {
        self.lock().checks
    }

    /// The next `calls` calls fail as a whole with a transient error.
    pub fn fail_calls(&self, calls: u32) {
        self.lock().fail_calls = calls;
    }

    /// The next `calls` calls never return (until the relay drops them).
    pub fn hang_calls(&self, calls: u32) {
        self.lock().hang_calls = calls;
    }

    /// Every call hangs until [`ScriptedPublisher::hang_all`] is set back to false.
    pub fn hang_all(&self, hang: bool) {
        self.lock().hang_all = hang;
    }

    /// The next call publishes its first `messages` messages, then hangs for ever as if the
    /// process had died, and so does every later call until [`ScriptedPublisher::hang_all`]
    /// is set back to false; [`ScriptedPublisher::crashed`] completes at that point.
    pub fn crash_after(&self, messages: usize) {
        self.lock().crash_after = Some(messages);
    }

    /// Completes once a scripted crash happened.
    pub async fn crashed(&self) {
        self.crashed.notified().await;
    }

    /// How many times a message was handed to the publisher while it was already in flight in
    /// another call: must stay 0.
    pub fn overlaps(&self) -> u64 {
        self.lock().overlaps
    }

    /// Calls so far.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// Scripted failures reported so far.
    pub fn failures(&self) -> u64 {
        self.lock().failures
    }

    /// The most messages of one key seen in one call.
    pub fn max_per_key_in_call(&self) -> usize {
        self.lock().max_per_key_in_call
    }
}

impl<P: Publisher + Clone> Publisher for ScriptedPublisher<P> {
    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        let (hang, fail_call, crash, outage) = {
            let mut state = self.lock();
            state.calls += 1;
            let mut per_key: HashMap<&str, usize> = HashMap::new();
            for msg in batch {
                if let Some(key) = &msg.key {
                    let n = per_key.entry(key).or_default();
                    *n += 1;
                    state.max_per_key_in_call = state.max_per_key_in_call.max(*n);
                }
                if !state.in_flight.insert(msg.id) {
                    state.overlaps += 1;
                }
            }
            let outage = state.outage;
            let hang = state.hang_all || state.hang_calls > 0 || outage == Some(Outage::Hung);
            if state.hang_calls > 0 {
                state.hang_calls -= 1;
            }
            let fail_call = !hang && state.fail_calls > 0;
            if fail_call {
                state.fail_calls -= 1;
                state.failures += 1;
            }
            let crash = if hang || fail_call {
                None
            } else {
                state.crash_after.take()
            };
            if crash.is_some() {
                // A dead process publishes nothing more, whatever its relay tries next.
                state.hang_all = true;
            }
            (hang, fail_call, crash, outage)
        };
        let _guard = InFlight {
            state: &self.state,
            ids: batch.iter().map(|m| m.id).collect(),
        };
        if hang {
            return std::future::pending().await;
        }
        if fail_call {
            return Err(PublishError::transient(
                "scripted failure of the whole call",
            ));
        }
        match outage {
            Some(Outage::Refused) => {
                return Err(PublishError::transient(
                    "scripted outage: connection refused",
                ));
            }
            Some(Outage::FailsEveryMessage) => {
                return Ok(batch
                    .iter()
                    .map(|_| {
                        PublishOutcome::Failed(PublishError::transient(
                            "scripted outage: the broker cannot take messages",
                        ))
                    })
                    .collect());
            }
            Some(Outage::Hung) | None => {}
        }
        if let Some(k) = crash {
            let head = &batch[..k.min(batch.len())];
            let _ = self.inner.publish(head).await;
            self.crashed.notify_waiters();
            self.crashed.notify_one();
            return std::future::pending().await;
        }

        // Decide each message's fate, then publish the survivors through the inner publisher.
        let mut failed_keys: HashSet<String> = HashSet::new();
        let mut fates: Vec<Option<PublishError>> = Vec::with_capacity(batch.len());
        {
            let mut state = self.lock();
            for msg in batch {
                let fate =
                    if self.ordered && msg.key.as_ref().is_some_and(|k| failed_keys.contains(k)) {
                        Some(PublishError::transient(
                            "an earlier message of this key failed in this call",
                        ))
                    } else if let Some(text) = state.permanent.get(&msg.id) {
                        Some(PublishError::permanent(text.clone()))
                    } else if let Some(left) =
                        state.transient.get_mut(&msg.id).filter(|left| **left > 0)
                    {
                        *left -= 1;
                        Some(PublishError::transient("scripted transient failure"))
                    } else {
                        None
                    };
                if fate.is_some() {
                    state.failures += 1;
                    if let Some(key) = &msg.key {
                        failed_keys.insert(key.clone());
                    }
                }
                fates.push(fate);
            }
        }
        let survivors: Vec<Message> = batch
            .iter()
            .zip(&fates)
            .filter(|(_, fate)| fate.is_none())
            .map(|(msg, _)| msg.clone())
            .collect();
        let mut inner = self.inner.publish(&survivors).await?.into_iter();
        Ok(fates
            .into_iter()
            .map(|fate| match fate {
                Some(err) => PublishOutcome::Failed(err),
                None => inner.next().unwrap_or_else(|| {
                    PublishOutcome::Failed(PublishError::transient(
                        "inner publisher lost an outcome",
                    ))
                }),
            })
            .collect())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default().ordered_per_key(self.ordered)
    }

    async fn check(&self) -> Result<(), PublishError> {
        let outage = {
            let mut state = self.lock();
            state.checks += 1;
            state.outage
        };
        match outage {
            Some(Outage::Refused) => Err(PublishError::transient(
                "scripted outage: connection refused",
            )),
            Some(Outage::Hung) => std::future::pending().await,
            Some(Outage::FailsEveryMessage) | None => self.inner.check().await,
        }
    }
}
