//! Store calls that run to the end even when their caller stops waiting.
//!
//! The relay drops in-flight store calls when it stops, and callers put timeouts around them.
//! A `sqlx` MySQL connection dropped in the middle of a statement can lose step with its
//! server: it reads a packet as a 4-byte header and then its payload, in two steps, so that a
//! read cancelled between them has consumed the header and takes the payload for the next
//! one; and a statement cancelled while it was being prepared leaves the rest of the server's
//! answer unread while the connection believes it has seen it all. Back in the pool, such a
//! connection waits for bytes the server never sends: in the ping the pool runs on every
//! returned connection, for ever, holding its slot (the pool runs dry, and closing it never
//! ends), or in the next call given the connection, which then never returns, while the
//! server shows the connection idle.
//!
//! So every call of such a store runs in a task of its own, holding clones of its arguments:
//! the statements in flight always finish, their transaction commits or rolls back, and the
//! connection goes back to the pool in step with the server. The caller can still stop
//! waiting at any time. A claim finished for a caller that is gone hands its messages back at
//! once; the other calls are applied or not as a whole, as they would have been had the caller
//! waited.

use std::future::Future;
use std::ops::Deref;

use outbox_core::{Claim, Settlement, Store, StoreError, StoreErrorKind};
use tokio::sync::oneshot;

/// A store whose [`Store`] implementation runs each call in the caller's task, statement by
/// statement: cancelling it half-way would cancel a statement half-way. A store implements the
/// trait on this wrapper, and [`detached_store!`] implements it on the store itself by running
/// those calls in tasks of their own.
#[cfg_attr(not(feature = "mysql"), allow(dead_code))]
#[derive(Clone, Debug)]
pub(crate) struct Direct<S>(pub(crate) S);

impl<S> Deref for Direct<S> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.0
    }
}

/// Runs `call` (one store call with everything it needs owned) in a task of its own and waits
/// for its result. Dropping the returned future stops the waiting, not the call.
pub(crate) async fn detached<T, F>(doing: &'static str, call: F) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, StoreError>> + Send + 'static,
    T: Send + 'static,
{
    detached_or(doing, call, |_| async {}).await
}

/// [`detached`], handing the result of a call that nobody waits for any more to `abandoned`.
pub(crate) async fn detached_or<T, F, A, AF>(
    doing: &'static str,
    call: F,
    abandoned: A,
) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, StoreError>> + Send + 'static,
    T: Send + 'static,
    A: FnOnce(Result<T, StoreError>) -> AF + Send + 'static,
    AF: Future<Output = ()> + Send,
{
    let (answer, answered) = oneshot::channel();
    tokio::spawn(async move {
        if let Err(result) = answer.send(call.await) {
            abandoned(result).await;
        }
    });
    match answered.await {
        Ok(result) => result,
        // The task panicked, or the runtime is shutting down.
        Err(_) => Err(StoreError::new(
            StoreErrorKind::Database,
            format!("{doing}: the task running the call ended without an answer"),
        )),
    }
}

/// Hands back at once the messages of a claim whose caller stopped waiting for it, instead of
/// leaving them leased until the lease lapses.
#[cfg_attr(not(feature = "mysql"), allow(dead_code))]
pub(crate) async fn release_abandoned<S: Store>(store: &S, claim: Result<Claim, StoreError>) {
    let Ok(claim) = claim else {
        return;
    };
    if claim.is_empty() {
        return;
    }
    let release = Settlement {
        release: claim
            .messages
            .iter()
            .map(|message| message.id)
            .chain(claim.malformed.iter().map(|malformed| malformed.id))
            .collect(),
        ..Settlement::default()
    };
    if let Err(error) = store.settle(claim.token, &release).await {
        tracing::debug!(%error, "could not hand back an abandoned claim; its lease will lapse");
    }
}

/// `impl Store for $store` on top of `impl Store for Direct<$store>`: every call but `listen`
/// runs [`detached`]. `listen` runs in the caller's task: it lasts until the caller stops
/// waiting, which is how it ends.
#[cfg(feature = "mysql")]
macro_rules! detached_store {
    ($store:ty) => {
        impl ::outbox_core::Store for $store {
            async fn claim(
                &self,
                relay: &::outbox_core::RelayId,
                limit: usize,
                lease: ::std::time::Duration,
            ) -> Result<::outbox_core::Claim, ::outbox_core::StoreError> {
                let (store, relay) = (self.direct(), relay.clone());
                let owner = store.clone();
                $crate::detached::detached_or(
                    "claiming outbox messages",
                    async move {
                        <$crate::detached::Direct<$store> as ::outbox_core::Store>::claim(
                            &store, &relay, limit, lease,
                        )
                        .await
                    },
                    |claim| async move {
                        $crate::detached::release_abandoned(&owner, claim).await;
                    },
                )
                .await
            }

            async fn settle(
                &self,
                token: ::outbox_core::LeaseToken,
                settlement: &::outbox_core::Settlement,
            ) -> Result<::outbox_core::Settled, ::outbox_core::StoreError> {
                if settlement.is_empty() {
                    return Ok(::outbox_core::Settled::default());
                }
                let (store, settlement) = (self.direct(), settlement.clone());
                $crate::detached::detached("recording publish outcomes", async move {
                    <$crate::detached::Direct<$store> as ::outbox_core::Store>::settle(
                        &store,
                        token,
                        &settlement,
                    )
                    .await
                })
                .await
            }

            async fn heartbeat(
                &self,
                relay: &::outbox_core::RelayId,
                ttl: ::std::time::Duration,
            ) -> Result<Vec<::outbox_core::RelayMember>, ::outbox_core::StoreError> {
                let (store, relay) = (self.direct(), relay.clone());
                $crate::detached::detached("renewing the relay's membership", async move {
                    <$crate::detached::Direct<$store> as ::outbox_core::Store>::heartbeat(
                        &store, &relay, ttl,
                    )
                    .await
                })
                .await
            }

            async fn members(
                &self,
            ) -> Result<Vec<::outbox_core::RelayMember>, ::outbox_core::StoreError> {
                let store = self.direct();
                $crate::detached::detached("listing the live relays", async move {
                    <$crate::detached::Direct<$store> as ::outbox_core::Store>::members(&store)
                        .await
                })
                .await
            }

            async fn acquire(
                &self,
                relay: &::outbox_core::RelayId,
                partitions: &[u16],
                ttl: ::std::time::Duration,
            ) -> Result<Vec<u16>, ::outbox_core::StoreError> {
                let (store, relay, partitions) =
                    (self.direct(), relay.clone(), partitions.to_vec());
                $crate::detached::detached("acquiring partitions", async move {
                    <$crate::detached::Direct<$store> as ::outbox_core::Store>::acquire(
                        &store,
                        &relay,
                        &partitions,
                        ttl,
                    )
                    .await
                })
                .await
            }

            async fn release(
                &self,
                relay: &::outbox_core::RelayId,
                partitions: &[u16],
            ) -> Result<(), ::outbox_core::StoreError> {
                let (store, relay, partitions) =
                    (self.direct(), relay.clone(), partitions.to_vec());
                $crate::detached::detached("releasing partitions", async move {
                    <$crate::detached::Direct<$store> as ::outbox_core::Store>::release(
                        &store,
                        &relay,
                        &partitions,
                    )
                    .await
                })
                .await
            }

            async fn leave(
                &self,
                relay: &::outbox_core::RelayId,
            ) -> Result<(), ::outbox_core::StoreError> {
                let (store, relay) = (self.direct(), relay.clone());
                $crate::detached::detached("leaving the relay group", async move {
                    <$crate::detached::Direct<$store> as ::outbox_core::Store>::leave(
                        &store, &relay,
                    )
                    .await
                })
                .await
            }

            async fn stats(&self) -> Result<::outbox_core::Stats, ::outbox_core::StoreError> {
                let store = self.direct();
                $crate::detached::detached("counting outbox messages", async move {
                    <$crate::detached::Direct<$store> as ::outbox_core::Store>::stats(&store).await
                })
                .await
            }

            fn max_connections(&self) -> Option<usize> {
                <$crate::detached::Direct<$store> as ::outbox_core::Store>::max_connections(
                    &self.direct(),
                )
            }

            async fn dead_letters(
                &self,
                filter: &::outbox_core::DeadLetterFilter,
            ) -> Result<Vec<::outbox_core::DeadLetter>, ::outbox_core::StoreError> {
                let (store, filter) = (self.direct(), filter.clone());
                $crate::detached::detached("listing dead letters", async move {
                    <$crate::detached::Direct<$store> as ::outbox_core::Store>::dead_letters(
                        &store, &filter,
                    )
                    .await
                })
                .await
            }

            async fn replay(
                &self,
                filter: &::outbox_core::DeadLetterFilter,
            ) -> Result<u64, ::outbox_core::StoreError> {
                let (store, filter) = (self.direct(), filter.clone());
                $crate::detached::detached("replaying dead letters", async move {
                    <$crate::detached::Direct<$store> as ::outbox_core::Store>::replay(
                        &store, &filter,
                    )
                    .await
                })
                .await
            }

            async fn purge(
                &self,
                filter: &::outbox_core::DeadLetterFilter,
            ) -> Result<u64, ::outbox_core::StoreError> {
                let (store, filter) = (self.direct(), filter.clone());
                $crate::detached::detached("purging dead letters", async move {
                    <$crate::detached::Direct<$store> as ::outbox_core::Store>::purge(
                        &store, &filter,
                    )
                    .await
                })
                .await
            }

            async fn cleanup(&self, limit: usize) -> Result<u64, ::outbox_core::StoreError> {
                let store = self.direct();
                $crate::detached::detached("deleting expired published messages", async move {
                    <$crate::detached::Direct<$store> as ::outbox_core::Store>::cleanup(
                        &store, limit,
                    )
                    .await
                })
                .await
            }

            async fn listen(
                &self,
                wakeup: ::outbox_core::Wakeup,
            ) -> Result<(), ::outbox_core::StoreError> {
                <$crate::detached::Direct<$store> as ::outbox_core::Store>::listen(
                    &self.direct(),
                    wakeup,
                )
                .await
            }
        }

        impl $store {
            /// This store, with the calls that run in the caller's task.
            fn direct(&self) -> $crate::detached::Direct<$store> {
                $crate::detached::Direct(self.clone())
            }
        }
    };
}

#[cfg(feature = "mysql")]
pub(crate) use detached_store;
