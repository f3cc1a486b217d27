//! One claimed batch: published in calls, each call's outcomes judged (a failure of the
//! message, or an outage of the broker), and the whole recorded in one settle.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use chrono::{DateTime, Utc};

use super::pause::{PauseCause, Pauses};
use super::{BatchReport, Inner};
use crate::error::chain;
use crate::error_text;
use crate::metrics as m;
use crate::retry::Decision;
use crate::{
    Claim, DeadLetterTo, LeaseToken, Malformed, Message, PublishOutcome, Publisher, RelayConfig,
    Retry, Settlement, Store,
};

/// What became of one publish call.
enum Call {
    /// The broker answered for each message.
    Answered(Vec<PublishOutcome>),
    /// The broker as a whole failed (unreachable, the call failed or timed out): an outage,
    /// not a failure of the messages.
    Outage(String),
    /// The relay is shutting down and gave up waiting.
    Abandoned,
}

/// A batch being published: what is decided so far, and the keys that may not go further.
#[derive(Default)]
pub(super) struct Progress {
    pub(super) settlement: Settlement,
    /// Keys with a message that failed or was handed back in this batch: their later
    /// messages are handed back too, so that they never overtake it.
    blocked: HashSet<String>,
    /// The messages of [`Settlement::release`], for a relay that publishes them again itself.
    pub(super) released: Vec<Message>,
}

impl Progress {
    fn is_blocked(&self, msg: &Message) -> bool {
        msg.key
            .as_ref()
            .is_some_and(|key| self.blocked.contains(key))
    }

    fn block(&mut self, msg: &Message) {
        if let Some(key) = &msg.key {
            self.blocked.insert(key.clone());
        }
    }

    /// Hands `messages` back untouched: available again at once, attempts unchanged.
    fn release(&mut self, messages: impl IntoIterator<Item = Message>) {
        for msg in messages {
            self.block(&msg);
            self.settlement.release.push(msg.id);
            self.released.push(msg);
        }
    }

    fn dead_letter(&mut self, msg: &Message, error: String) {
        self.block(msg);
        self.settlement
            .dead
            .push(DeadLetterTo { id: msg.id, error });
    }
}

/// What publishing a batch needs of a relay: the broker, the policy, the pause state and the
/// store's clock. The polling relay and the log relay share it.
pub(super) struct Publishing<'a, P> {
    pub(super) publisher: &'a P,
    pub(super) config: &'a RelayConfig,
    pub(super) pauses: &'a Pauses,
    /// The store's clock minus the relay's, in microseconds, when the relay knows it.
    pub(super) clock_offset_us: Option<&'a AtomicI64>,
}

impl<P> Publishing<'_, P> {
    /// Now on the store's clock, as far as the relay knows it.
    fn store_now(&self) -> DateTime<Utc> {
        let offset = self
            .clock_offset_us
            .map_or(0, |offset| offset.load(Ordering::Relaxed));
        Utc::now() + chrono::Duration::microseconds(offset)
    }
}

/// Publishes one claimed batch and records the outcomes.
pub(super) async fn process<S: Store, P: Publisher>(
    inner: &Inner<S, P>,
    claim: Claim,
    claimed_at: Instant,
    abandon: watch::Receiver<bool>,
) -> BatchReport {
    let span = info_span!("outbox.batch", relay = %inner.id, size = claim.len(), token = %claim.token.as_uuid());
    async move {
        let lease_end = claimed_at + inner.config.lease;
        let token = claim.token;
        let claimed = claim.len();
        let mut progress = Progress::default();
        dead_letter_malformed(&mut progress, claim.malformed);
        publish(
            &inner.publishing(),
            claim.messages,
            Some(lease_end),
            abandon,
            &mut progress,
        )
        .await;
        let settlement = progress.settlement;
        let mut report = BatchReport::of(claimed, &settlement);
        report.fenced = settle(inner, token, &settlement, lease_end).await;
        report.count();
        debug!(?report, "batch settled");
        report
    }
    .instrument(span)
    .await
}

/// Dead-letters rows that cannot be decoded; the later messages of their keys wait.
pub(super) fn dead_letter_malformed(progress: &mut Progress, malformed: Vec<Malformed>) {
    for bad in malformed {
        warn!(id = %bad.id, error = %bad.error, "dead-lettering a message that cannot be decoded");
        if let Some(key) = bad.key {
            progress.blocked.insert(key);
        }
        progress.settlement.dead.push(DeadLetterTo {
            id: bad.id,
            error: error_text::sanitize(&format!("cannot be decoded: {}", bad.error)),
        });
    }
}

/// Publishes `messages` in calls (one message per key per call unless the publisher keeps
/// per-key order) and records each outcome in `progress`: confirmed, retried, dead-lettered,
/// or handed back (a key blocked by an earlier failure, an outage, a shutdown, or a lease
/// that would end before the call could). Without a lease (`lease_end` `None`) only the
/// others apply.
pub(super) async fn publish<P: Publisher>(
    ctx: &Publishing<'_, P>,
    messages: Vec<Message>,
    lease_end: Option<Instant>,
    mut abandon: watch::Receiver<bool>,
    progress: &mut Progress,
) {
    let config = ctx.config;
    let ordered = ctx.publisher.capabilities().ordered_per_key;
    let mut remaining = messages;
    while !remaining.is_empty() {
        let (held_back, ready): (Vec<Message>, Vec<Message>) = remaining
            .into_iter()
            .partition(|msg| progress.is_blocked(msg));
        progress.release(held_back);
        let (call, rest) = next_call(ready, ordered);
        remaining = rest;
        if call.is_empty() {
            break;
        }
        // Publishing past the lease could race the relay that takes the messages over;
        // publishing while paused would only find the outage again (or, with the store
        // down, publish what cannot be recorded).
        let margin = config.publish_timeout + config.lease / 10;
        let past_lease = lease_end.is_some_and(|end| Instant::now() + margin > end);
        if past_lease || *abandon.borrow() || ctx.pauses.any() {
            progress.release(call.into_iter().chain(remaining.drain(..)));
            break;
        }
        match publish_call(ctx, &call, &mut abandon).await {
            Call::Answered(outcomes) => {
                if let Some(reason) = outage_in(&outcomes) {
                    // No message was confirmed and some failed transiently: the broker
                    // as a whole is failing. Permanent failures are the messages' own.
                    let messages = call.len() + remaining.len();
                    for (msg, outcome) in call.into_iter().zip(outcomes) {
                        match outcome {
                            PublishOutcome::Failed(err)
                                if !err.is_transient() && !progress.is_blocked(&msg) =>
                            {
                                progress.dead_letter(&msg, error_text::stored(&err));
                            }
                            _ => progress.release([msg]),
                        }
                    }
                    progress.release(remaining.drain(..));
                    pause_for(ctx, messages, reason);
                    break;
                }
                record(ctx, call, outcomes, progress);
            }
            Call::Outage(reason) => {
                let messages = call.len() + remaining.len();
                progress.release(call.into_iter().chain(remaining.drain(..)));
                pause_for(ctx, messages, reason);
                break;
            }
            Call::Abandoned => {
                progress.release(call.into_iter().chain(remaining.drain(..)));
                break;
            }
        }
    }
}

/// Pauses the relay for a broker outage; the messages were handed back.
fn pause_for<P: Publisher>(ctx: &Publishing<'_, P>, messages: usize, reason: String) {
    warn!(
        messages,
        %reason,
        "the broker failed the whole call: handing the messages back without counting an attempt"
    );
    ctx.pauses.pause(PauseCause::Broker, reason);
}

/// Publishes one call, bounded by the publish timeout and by the relay giving up on shutdown.
async fn publish_call<P: Publisher>(
    inner: &Publishing<'_, P>,
    call: &[Message],
    abandon: &mut watch::Receiver<bool>,
) -> Call {
    let limit = inner.config.publish_timeout;
    let started = Instant::now();
    let result = tokio::select! {
        res = tokio::time::timeout(limit, inner.publisher.publish(call)) => res,
        () = abandoned(abandon) => return Call::Abandoned,
    };
    metrics::histogram!(m::PUBLISH_DURATION).record(started.elapsed().as_secs_f64());
    let failed = |reason: String| {
        metrics::counter!(m::PUBLISH_ERRORS).increment(1);
        Call::Outage(error_text::sanitize(&reason))
    };
    match result {
        Err(_elapsed) => failed(format!("a publish call gave no answer within {limit:?}")),
        Ok(Err(err)) => failed(format!("a publish call failed: {}", chain(&err))),
        Ok(Ok(outcomes)) if outcomes.len() != call.len() => failed(format!(
            "the publisher returned {} outcomes for {} messages",
            outcomes.len(),
            call.len()
        )),
        Ok(Ok(outcomes)) => Call::Answered(outcomes),
    }
}

/// Whether a call's outcomes show an outage: nothing confirmed, and some message failed
/// transiently. Returns the reason, from the first transient failure.
fn outage_in(outcomes: &[PublishOutcome]) -> Option<String> {
    if outcomes.iter().any(PublishOutcome::is_published) {
        return None;
    }
    outcomes.iter().find_map(|outcome| match outcome {
        PublishOutcome::Failed(err) if err.is_transient() => Some(error_text::sanitize(&format!(
            "every message of a call failed, none was confirmed: {}",
            chain(err)
        ))),
        _ => None,
    })
}

/// Records the outcomes of a call in which the broker answered: confirmed messages are done,
/// failed ones are the messages' own failures, counted as attempts.
fn record<P: Publisher>(
    inner: &Publishing<'_, P>,
    call: Vec<Message>,
    outcomes: Vec<PublishOutcome>,
    progress: &mut Progress,
) {
    let store_now = inner.store_now();
    let mut confirmed = false;
    for (msg, outcome) in call.into_iter().zip(outcomes) {
        match outcome {
            PublishOutcome::Published => {
                confirmed = true;
                if let Ok(latency) = (store_now - msg.created_at).to_std() {
                    metrics::histogram!(m::COMMIT_TO_PUBLISH).record(latency.as_secs_f64());
                }
                progress.settlement.published.push(msg.id);
            }
            // An earlier message of this key failed in this batch, and an ordered publisher
            // failed this one for that reason: not an attempt of its own.
            PublishOutcome::Failed(_) if progress.is_blocked(&msg) => progress.release([msg]),
            PublishOutcome::Failed(err) => {
                let error = error_text::stored(&err);
                let attempts = msg.attempts.saturating_add(1);
                match inner.config.retry.decide(attempts, err.is_transient()) {
                    Decision::Retry(delay) => {
                        debug!(id = %msg.id, attempts, ?delay, %error, "publish failed; retrying later");
                        progress.block(&msg);
                        progress.settlement.retry.push(Retry {
                            id: msg.id,
                            delay,
                            error,
                        });
                    }
                    Decision::DeadLetter => {
                        warn!(id = %msg.id, attempts, %error, "dead-lettering message");
                        progress.dead_letter(&msg, error);
                    }
                }
            }
        }
    }
    if confirmed {
        inner.pauses.broker_confirmed();
    }
}

/// Splits `messages` into what one publish call may carry and the rest. Without per-key order
/// in the publisher, a call carries the first message of each key (and every keyless one).
pub(super) fn next_call(
    messages: Vec<Message>,
    ordered_per_key: bool,
) -> (Vec<Message>, Vec<Message>) {
    if ordered_per_key {
        return (messages, Vec::new());
    }
    let mut seen = HashSet::new();
    messages
        .into_iter()
        .partition(|msg| msg.key.as_ref().is_none_or(|key| seen.insert(key.clone())))
}

/// Completes when the relay asks in-flight batches to give up. A closed channel means the relay
/// itself is gone (its task was dropped, as in a crash): then nothing may be settled, so this
/// never completes.
async fn abandoned(abandon: &mut watch::Receiver<bool>) {
    if abandon.wait_for(|a| *a).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Records a settlement, retrying transient store failures until the lease ends (after that the
/// store would refuse it anyway). Returns how many outcomes were not recorded.
async fn settle<S: Store, P: Publisher>(
    inner: &Inner<S, P>,
    token: LeaseToken,
    settlement: &Settlement,
    lease_end: Instant,
) -> u64 {
    if settlement.is_empty() {
        return 0;
    }
    let mut backoff = Duration::from_millis(50);
    loop {
        match inner.bounded(inner.store.settle(token, settlement)).await {
            Ok(settled) => {
                if settled.fenced > 0 {
                    warn!(
                        fenced = settled.fenced,
                        "lease expired before the outcomes were recorded; those messages will be published again"
                    );
                }
                return settled.fenced;
            }
            Err(err) => {
                metrics::counter!(m::STORE_ERRORS).increment(1);
                if !err.is_transient() || Instant::now() + backoff >= lease_end {
                    warn!(error = %chain(&err), "could not record outcomes; the messages will be published again after their lease");
                    return settlement.len() as u64;
                }
                warn!(error = %chain(&err), "could not record outcomes; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PublishError;
    use chrono::Utc;

    fn failed(transient: bool) -> PublishOutcome {
        PublishOutcome::Failed(if transient {
            PublishError::transient("x")
        } else {
            PublishError::permanent("x")
        })
    }

    #[test]
    fn calls_carry_one_message_per_key_unless_ordered() {
        let msg = |key: Option<&str>| {
            let mut new = crate::NewMessage::new("t", Vec::new());
            if let Some(key) = key {
                new = new.key(key);
            }
            Message::new(new, Utc::now())
        };
        let batch = vec![
            msg(Some("a")),
            msg(Some("a")),
            msg(None),
            msg(Some("b")),
            msg(None),
            msg(Some("a")),
        ];
        let (call, rest) = next_call(batch.clone(), false);
        assert_eq!(call.len(), 4);
        assert_eq!(rest.len(), 2);
        assert_eq!(call[0].id, batch[0].id);
        assert_eq!(rest[0].id, batch[1].id);
        let (call, rest) = next_call(batch, true);
        assert_eq!((call.len(), rest.len()), (6, 0));
    }

    #[test]
    fn an_outage_is_a_call_with_nothing_confirmed_and_a_transient_failure() {
        assert!(outage_in(&[failed(true), failed(true)]).is_some());
        assert!(outage_in(&[failed(false), failed(true)]).is_some());
        assert!(outage_in(&[PublishOutcome::Published, failed(true)]).is_none());
        assert!(
            outage_in(&[failed(false)]).is_none(),
            "a refusal is an answer"
        );
        assert!(outage_in(&[]).is_none());
        let reason = outage_in(&[failed(true)]).unwrap_or_default();
        assert!(
            !reason.contains("transient publish failure: transient publish failure"),
            "{reason}"
        );
    }
}
