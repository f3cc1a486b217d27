//! Wake-ups: cutting the relay's idle wait short when messages were committed.

use std::sync::Arc;

use tokio::sync::Notify;

/// A handle that wakes an idle relay. Cheap to clone; waking a busy relay costs nothing and a
/// wake-up sent while it was busy is kept until it next waits.
///
/// Call [`Wakeup::wake`] after committing an enqueue in the process that runs the relay, so the
/// message goes out at once instead of at the next poll.
#[derive(Clone, Debug, Default)]
pub struct Wakeup(Arc<Notify>);

impl Wakeup {
    /// A new handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes the relay.
    pub fn wake(&self) {
        self.0.notify_one();
    }

    /// Waits for a wake-up.
    pub async fn woken(&self) {
        self.0.notified().await;
    }
}
