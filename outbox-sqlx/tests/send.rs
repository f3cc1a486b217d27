//! Every public future of the SQL stores and inboxes is `Send` and can be spawned: a service runs them
//! from `tokio::spawn`, an axum handler or an `#[async_trait]` method. This file only has to
//! compile; a future that stops being `Send` (a guard held across an await, a borrow that is
//! not general enough) breaks the build.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use outbox_core::{DeadLetterFilter, Enqueue, LeaseToken, NewMessage, RelayId, Store, Wakeup};
use outbox_sqlx::{
    MySqlInbox, MySqlStore, PostgresInbox, PostgresStore, SqliteInbox, SqliteStore, StoreConfig,
};

/// Compiles only for futures a multi-threaded runtime can spawn.
fn spawnable<F: Future + Send + 'static>(_: F) {}

/// Every `Store` method, inside a spawned task.
fn store_methods<S: Store + Clone>(store: S) {
    spawnable(async move {
        let relay = RelayId::random();
        let _ = store.claim(&relay, 10, Duration::from_secs(1)).await;
        let _ = store.settle(LeaseToken::new(), &Default::default()).await;
        let _ = store.heartbeat(&relay, Duration::from_secs(1)).await;
        let _ = store.members().await;
        let _ = store.acquire(&relay, &[0, 1], Duration::from_secs(1)).await;
        let _ = store.release(&relay, &[0]).await;
        let _ = store.leave(&relay).await;
        let _ = store.stats().await;
        let filter = DeadLetterFilter::all();
        let _ = store.dead_letters(&filter).await;
        let _ = store.replay(&filter).await;
        let _ = store.purge(&filter).await;
        let _ = store.cleanup(10).await;
        let _ = store.listen(Wakeup::new()).await;
    });
}

/// The inherent methods of a store, for each form of executor `sqlx` accepts, and its
/// `Enqueue` implementation, inside spawned tasks.
macro_rules! inherent_methods {
    ($store:ident) => {{
        fn check(store: $store) {
            let s = store.clone();
            spawnable(async move {
                let _ = s.migrate().await;
                let _ = s.schema_version().await;
                let _ = s.drop_tables().await;
            });
            spawnable(async move {
                let _ = $store::connect(StoreConfig::new().url("x://")).await;
            });
            let s = store.clone();
            spawnable(async move {
                let mut tx = s.pool().begin().await.expect("begin");
                let _ = s.enqueue(&mut tx, NewMessage::new("t", "x")).await;
                let _ = s.enqueue(&mut *tx, NewMessage::new("t", "x")).await;
                let _ = s
                    .enqueue_batch(&mut tx, vec![NewMessage::new("t", "x")])
                    .await;
                let _ = Enqueue::enqueue(&s, &mut *tx, NewMessage::new("t", "x")).await;
                let _ = Enqueue::enqueue_batch(&s, &mut *tx, vec![]).await;
                let _ = tx.commit().await;
            });
            let s = store.clone();
            spawnable(async move {
                let mut conn = s.pool().acquire().await.expect("acquire");
                let _ = s.enqueue(&mut *conn, NewMessage::new("t", "x")).await;
                let _ = s.enqueue(s.pool(), NewMessage::new("t", "x")).await;
            });
            store_methods(store);
        }
        check
    }};
}

fn postgres(store: PostgresStore) {
    inherent_methods!(PostgresStore)(store);
}

fn mysql(store: MySqlStore) {
    inherent_methods!(MySqlStore)(store);
}

fn sqlite(store: SqliteStore) {
    inherent_methods!(SqliteStore)(store);
}

/// Every public method of an inbox, inside spawned tasks.
macro_rules! inbox_methods {
    ($inbox:ident) => {{
        fn check(inbox: $inbox) {
            let i = inbox.clone();
            spawnable(async move {
                let _ = i.migrate().await;
                let _ = i.purge(Duration::from_secs(1), 10).await;
                let _ = outbox_core::Inbox::purge(&i, Duration::from_secs(1), 10).await;
                let _ = i.drop_table().await;
            });
            spawnable(async move {
                let mut tx = inbox.pool().begin().await.expect("begin");
                let id = outbox_core::MessageId::new();
                let _ = inbox.record(&mut tx, "c", id).await;
                let _ = inbox.record(&mut *tx, "c", id).await;
                let _ = outbox_core::Inbox::record(&inbox, &mut *tx, "c", id).await;
                let incoming = outbox_core::Incoming::new(Some(&id.to_string()), "t", "x");
                if let Ok(incoming) = incoming {
                    let _ = inbox
                        .process(&mut tx, "c", &incoming, async |_conn| {
                            Ok::<_, outbox_core::StoreError>(())
                        })
                        .await;
                }
                let _ = tx.commit().await;
            });
        }
        check
    }};
}

fn inboxes(postgres: PostgresInbox, mysql: MySqlInbox, sqlite: SqliteInbox) {
    inbox_methods!(PostgresInbox)(postgres);
    inbox_methods!(MySqlInbox)(mysql);
    inbox_methods!(SqliteInbox)(sqlite);
}
