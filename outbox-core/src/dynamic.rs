//! Dyn-compatible mirrors of [`Store`] and [`Publisher`], so a binary can choose backends at run
//! time: every `Store` is a [`DynStore`], and `Arc<dyn DynStore>` is a `Store` again (the same
//! for publishers).
//!
//! ```
//! use std::sync::Arc;
//! use outbox_core::{DynPublisher, DynStore, MemoryPublisher, MemoryStore, Relay};
//!
//! let store: Arc<dyn DynStore> = Arc::new(MemoryStore::new());
//! let publisher: Arc<dyn DynPublisher> = Arc::new(MemoryPublisher::new());
//! let relay = Relay::builder(store, publisher).build()?;
//! # Ok::<(), outbox_core::ConfigError>(())
//! ```

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::{
    Capabilities, Claim, DeadLetter, DeadLetterFilter, LeaseToken, Message, PublishError,
    PublishOutcome, Publisher, RelayId, RelayMember, Settled, Settlement, Stats, Store, StoreError,
    Wakeup,
};

/// The dyn-compatible form of [`Store`], implemented for every store.
#[allow(missing_docs)]
pub trait DynStore: Send + Sync + 'static {
    fn claim_dyn<'a>(
        &'a self,
        relay: &'a RelayId,
        limit: usize,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;
    fn settle_dyn<'a>(
        &'a self,
        token: LeaseToken,
        settlement: &'a Settlement,
    ) -> BoxFuture<'a, Result<Settled, StoreError>>;
    fn heartbeat_dyn<'a>(
        &'a self,
        relay: &'a RelayId,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<RelayMember>, StoreError>>;
    fn members_dyn(&self) -> BoxFuture<'_, Result<Vec<RelayMember>, StoreError>>;
    fn acquire_dyn<'a>(
        &'a self,
        relay: &'a RelayId,
        partitions: &'a [u16],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<u16>, StoreError>>;
    fn release_dyn<'a>(
        &'a self,
        relay: &'a RelayId,
        partitions: &'a [u16],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn leave_dyn<'a>(&'a self, relay: &'a RelayId) -> BoxFuture<'a, Result<(), StoreError>>;
    fn stats_dyn(&self) -> BoxFuture<'_, Result<Stats, StoreError>>;
    fn max_connections_dyn(&self) -> Option<usize>;
    fn dead_letters_dyn<'a>(
        &'a self,
        filter: &'a DeadLetterFilter,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, StoreError>>;
    fn replay_dyn<'a>(
        &'a self,
        filter: &'a DeadLetterFilter,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;
    fn purge_dyn<'a>(
        &'a self,
        filter: &'a DeadLetterFilter,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;
    fn cleanup_dyn(&self, limit: usize) -> BoxFuture<'_, Result<u64, StoreError>>;
    fn listen_dyn(&self, wakeup: Wakeup) -> BoxFuture<'_, Result<(), StoreError>>;
}

impl<S: Store> DynStore for S {
    fn claim_dyn<'a>(
        &'a self,
        relay: &'a RelayId,
        limit: usize,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(self.claim(relay, limit, lease))
    }
    fn settle_dyn<'a>(
        &'a self,
        token: LeaseToken,
        settlement: &'a Settlement,
    ) -> BoxFuture<'a, Result<Settled, StoreError>> {
        Box::pin(self.settle(token, settlement))
    }
    fn heartbeat_dyn<'a>(
        &'a self,
        relay: &'a RelayId,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<RelayMember>, StoreError>> {
        Box::pin(self.heartbeat(relay, ttl))
    }
    fn members_dyn(&self) -> BoxFuture<'_, Result<Vec<RelayMember>, StoreError>> {
        Box::pin(self.members())
    }
    fn acquire_dyn<'a>(
        &'a self,
        relay: &'a RelayId,
        partitions: &'a [u16],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<u16>, StoreError>> {
        Box::pin(self.acquire(relay, partitions, ttl))
    }
    fn release_dyn<'a>(
        &'a self,
        relay: &'a RelayId,
        partitions: &'a [u16],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.release(relay, partitions))
    }
    fn leave_dyn<'a>(&'a self, relay: &'a RelayId) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.leave(relay))
    }
    fn stats_dyn(&self) -> BoxFuture<'_, Result<Stats, StoreError>> {
        Box::pin(self.stats())
    }
    fn max_connections_dyn(&self) -> Option<usize> {
        self.max_connections()
    }
    fn dead_letters_dyn<'a>(
        &'a self,
        filter: &'a DeadLetterFilter,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, StoreError>> {
        Box::pin(self.dead_letters(filter))
    }
    fn replay_dyn<'a>(
        &'a self,
        filter: &'a DeadLetterFilter,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(self.replay(filter))
    }
    fn purge_dyn<'a>(
        &'a self,
        filter: &'a DeadLetterFilter,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(self.purge(filter))
    }
    fn cleanup_dyn(&self, limit: usize) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.cleanup(limit))
    }
    fn listen_dyn(&self, wakeup: Wakeup) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.listen(wakeup))
    }
}

macro_rules! forward_store {
    ($ty:ty, $($deref:tt)*) => {
        impl Store for $ty {
            async fn claim(&self, relay: &RelayId, limit: usize, lease: Duration) -> Result<Claim, StoreError> {
                ($($deref)* self).claim_dyn(relay, limit, lease).await
            }
            async fn settle(&self, token: LeaseToken, settlement: &Settlement) -> Result<Settled, StoreError> {
                ($($deref)* self).settle_dyn(token, settlement).await
            }
            async fn heartbeat(&self, relay: &RelayId, ttl: Duration) -> Result<Vec<RelayMember>, StoreError> {
                ($($deref)* self).heartbeat_dyn(relay, ttl).await
            }
            async fn members(&self) -> Result<Vec<RelayMember>, StoreError> {
                ($($deref)* self).members_dyn().await
            }
            async fn acquire(&self, relay: &RelayId, partitions: &[u16], ttl: Duration) -> Result<Vec<u16>, StoreError> {
                ($($deref)* self).acquire_dyn(relay, partitions, ttl).await
            }
            async fn release(&self, relay: &RelayId, partitions: &[u16]) -> Result<(), StoreError> {
                ($($deref)* self).release_dyn(relay, partitions).await
            }
            async fn leave(&self, relay: &RelayId) -> Result<(), StoreError> {
                ($($deref)* self).leave_dyn(relay).await
            }
            async fn stats(&self) -> Result<Stats, StoreError> {
                ($($deref)* self).stats_dyn().await
            }
            fn max_connections(&self) -> Option<usize> {
                ($($deref)* self).max_connections_dyn()
            }
            async fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
                ($($deref)* self).dead_letters_dyn(filter).await
            }
            async fn replay(&self, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
                ($($deref)* self).replay_dyn(filter).await
            }
            async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
                ($($deref)* self).purge_dyn(filter).await
            }
            async fn cleanup(&self, limit: usize) -> Result<u64, StoreError> {
                ($($deref)* self).cleanup_dyn(limit).await
            }
            async fn listen(&self, wakeup: Wakeup) -> Result<(), StoreError> {
                ($($deref)* self).listen_dyn(wakeup).await
            }
        }
    };
}

forward_store!(Arc<dyn DynStore>, **);
forward_store!(Box<dyn DynStore>, **);

/// The dyn-compatible form of [`Publisher`], implemented for every publisher.
#[allow(missing_docs)]
pub trait DynPublisher: Send + Sync + 'static {
    fn publish_dyn<'a>(
        &'a self,
        batch: &'a [Message],
    ) -> BoxFuture<'a, Result<Vec<PublishOutcome>, PublishError>>;
    fn capabilities_dyn(&self) -> Capabilities;
    fn check_dyn(&self) -> BoxFuture<'_, Result<(), PublishError>>;
    fn flush_dyn(&self) -> BoxFuture<'_, Result<(), PublishError>>;
}

impl<P: Publisher> DynPublisher for P {
    fn publish_dyn<'a>(
        &'a self,
        batch: &'a [Message],
    ) -> BoxFuture<'a, Result<Vec<PublishOutcome>, PublishError>> {
        Box::pin(self.publish(batch))
    }
    fn capabilities_dyn(&self) -> Capabilities {
        self.capabilities()
    }
    fn check_dyn(&self) -> BoxFuture<'_, Result<(), PublishError>> {
        Box::pin(self.check())
    }
    fn flush_dyn(&self) -> BoxFuture<'_, Result<(), PublishError>> {
        Box::pin(self.flush())
    }
}

macro_rules! forward_publisher {
    ($ty:ty) => {
        impl Publisher for $ty {
            async fn publish(
                &self,
                batch: &[Message],
            ) -> Result<Vec<PublishOutcome>, PublishError> {
                (**self).publish_dyn(batch).await
            }
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities_dyn()
            }
            async fn check(&self) -> Result<(), PublishError> {
                (**self).check_dyn().await
            }
            async fn flush(&self) -> Result<(), PublishError> {
                (**self).flush_dyn().await
            }
        }
    };
}

forward_publisher!(Arc<dyn DynPublisher>);
forward_publisher!(Box<dyn DynPublisher>);

#[cfg(test)]
mod tests {
    use super::*;

    // Fails to compile if either trait stops being dyn-compatible.
    #[allow(dead_code)]
    fn object_safe(_: &dyn DynStore, _: &dyn DynPublisher) {}
}
