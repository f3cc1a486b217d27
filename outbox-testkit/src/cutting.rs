//! [`CuttingPublisher`]: a publisher wrapper that cuts its broker connection in the middle of
//! calls, for fault tests of real publishers.

/// A publisher that cuts the connection of `proxy` while some of its calls are under way
/// (every `every`-th call, at most `max_cuts` times), and counts the messages that failed.
#[derive(Clone, Debug)]
pub struct CuttingPublisher<P> {
    inner: P,
    proxy: std::sync::Arc<crate::proxy::FaultProxy>,
    every: usize,
    max_cuts: usize,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failures: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<P> CuttingPublisher<P> {
    /// Wraps `inner`; cuts `proxy` during every `every`-th call with more than one message, at
    /// most `max_cuts` times.
    pub fn new(
        inner: P,
        proxy: std::sync::Arc<crate::proxy::FaultProxy>,
        every: usize,
        max_cuts: usize,
    ) -> Self {
        Self {
            inner,
            proxy,
            every,
            max_cuts,
            calls: Default::default(),
            cuts: Default::default(),
            failures: Default::default(),
        }
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Messages that failed, counting every message of a failed call.
    pub fn failures(&self) -> usize {
        self.failures.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl<P: outbox_core::Publisher> outbox_core::Publisher for CuttingPublisher<P> {
    async fn publish(
        &self,
        batch: &[outbox_core::Message],
    ) -> Result<Vec<outbox_core::PublishOutcome>, outbox_core::PublishError> {
        use std::sync::atomic::Ordering::SeqCst;
        let call = self.calls.fetch_add(1, SeqCst) + 1;
        let cut = call.is_multiple_of(self.every)
            && batch.len() > 1
            && self
                .cuts
                .fetch_update(SeqCst, SeqCst, |n| (n < self.max_cuts).then_some(n + 1))
                .is_ok();
        let result = if cut {
            let (result, ()) = tokio::join!(self.inner.publish(batch), async {
                // Long enough for the call to be sending, short enough for it to be under way.
                tokio::time::sleep(std::time::Duration::from_micros(300)).await;
                self.proxy.cut();
            });
            result
        } else {
            self.inner.publish(batch).await
        };
        let failed = match &result {
            Ok(outcomes) => outcomes.iter().filter(|o| !o.is_published()).count(),
            Err(_) => batch.len(),
        };
        self.failures.fetch_add(failed, SeqCst);
        result
    }

    fn capabilities(&self) -> outbox_core::Capabilities {
        self.inner.capabilities()
    }

    async fn check(&self) -> Result<(), outbox_core::PublishError> {
        self.inner.check().await
    }

    async fn flush(&self) -> Result<(), outbox_core::PublishError> {
        self.inner.flush().await
    }
}
