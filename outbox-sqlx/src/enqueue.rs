//! Enqueueing, the one operation a service calls, written once for every dialect.
//!
//! [`enqueue_methods!`] gives a store inherent `enqueue` and `enqueue_batch` methods that take
//! what `sqlx`'s own `Acquire` takes (`&mut tx`, `&mut *tx`, a `&mut` connection, `&pool`),
//! so that the common case needs no trait import, and implements
//! [`Enqueue`](outbox_core::Enqueue) on `&mut Connection` by calling them, for code generic
//! over stores. (A PostgreSQL relay is woken by the table's own trigger, as for any writer.)

/// What an enqueue does when `messages` are written in more than one statement (a large
/// batch): in a transaction of their own (a savepoint inside the caller's transaction), so
/// that the batch is written whole or not at all, whatever the caller passed.
pub(crate) fn needs_own_transaction(messages: &[outbox_core::NewMessage]) -> bool {
    crate::sql::insert_chunks(messages).len() > 1
}

/// Implements the enqueue methods of `$store` on the database `$db` with connections `$conn`
/// and the dialect `$d`.
macro_rules! enqueue_methods {
    ($store:ident, $db:ty, $conn:ty, $d:expr) => {
        impl $store {
            /// Writes `messages`, checked against the limits, on `conn`, in chunks that stay
            /// under the database's bind-parameter and packet limits.
            async fn insert(
                &self,
                conn: &mut $conn,
                messages: Vec<::outbox_core::NewMessage>,
            ) -> Result<Vec<::outbox_core::MessageId>, ::outbox_core::StoreError> {
                use $crate::error::Context as _;
                $crate::sql::validate(&messages, &self.inner.config.limits)?;
                let ids = messages.iter().map(::outbox_core::NewMessage::id).collect();
                for chunk in $crate::sql::insert_chunks(&messages) {
                    let statement = $crate::sql::insert(&$d, &self.inner.names, chunk);
                    bound(&statement.text, statement.args)?
                        .persistent(chunk.len() == 1)
                        .execute(&mut *conn)
                        .await
                        .doing("enqueueing into the outbox")?;
                }
                Ok(ids)
            }

            /// Adds `message` to the outbox in the caller's transaction and returns its id.
            /// The relay sees it when, and only when, that transaction commits.
            ///
            /// `executor` is what `sqlx`'s `execute` takes: `&mut tx` or `&mut *tx` for a
            /// transaction (the usual case: the service's own writes and the message commit
            /// together), a `&mut` connection, or `&pool` for a message on its own.
            pub fn enqueue<'c, A>(
                &self,
                executor: A,
                message: ::outbox_core::NewMessage,
            ) -> impl ::std::future::Future<
                Output = Result<::outbox_core::MessageId, ::outbox_core::StoreError>,
            > + Send
            where
                A: ::sqlx::Acquire<'c, Database = $db> + Send,
            {
                let id = message.id();
                let batch = self.enqueue_batch(executor, vec![message]);
                async move {
                    batch.await?;
                    Ok(id)
                }
            }

            /// Adds `messages` to the outbox in the caller's transaction, in as few statements
            /// as the database allows, and returns their ids in order; messages of one key
            /// keep the order of `messages`. The batch is written whole or not at all. Takes
            /// what [`enqueue`](Self::enqueue) takes.
            //
            // Not an `async fn`: its future is declared `Send`, so that a caller's future
            // holding it is `Send` without the compiler proving it again for every lifetime
            // of `A` (which it cannot: "implementation of `Acquire` is not general enough").
            pub fn enqueue_batch<'c, A>(
                &self,
                executor: A,
                messages: Vec<::outbox_core::NewMessage>,
            ) -> impl ::std::future::Future<
                Output = Result<Vec<::outbox_core::MessageId>, ::outbox_core::StoreError>,
            > + Send
            where
                A: ::sqlx::Acquire<'c, Database = $db> + Send,
            {
                use $crate::error::Context as _;
                const DOING: &str = "enqueueing into the outbox";
                async move {
                    if messages.is_empty() {
                        return Ok(Vec::new());
                    }
                    let mut conn = executor.acquire().await.doing(DOING)?;
                    if !$crate::enqueue::needs_own_transaction(&messages) {
                        return self.insert(&mut conn, messages).await;
                    }
                    let mut tx = ::sqlx::Connection::begin(&mut *conn).await.doing(DOING)?;
                    let ids = self.insert(&mut tx, messages).await?;
                    tx.commit().await.doing(DOING)?;
                    Ok(ids)
                }
            }
        }

        impl<'c> ::outbox_core::Enqueue<&'c mut $conn> for $store {
            async fn enqueue(
                &self,
                tx: &'c mut $conn,
                message: ::outbox_core::NewMessage,
            ) -> Result<::outbox_core::MessageId, ::outbox_core::StoreError> {
                $store::enqueue(self, tx, message).await
            }

            async fn enqueue_batch(
                &self,
                tx: &'c mut $conn,
                messages: Vec<::outbox_core::NewMessage>,
            ) -> Result<Vec<::outbox_core::MessageId>, ::outbox_core::StoreError> {
                $store::enqueue_batch(self, tx, messages).await
            }
        }
    };
}

pub(crate) use enqueue_methods;
