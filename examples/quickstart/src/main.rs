//! Quickstart: an order service that writes its orders and their events in the same SQLite
//! transactions, and an embedded relay that publishes the committed events as JSON lines on
//! standard output.
//!
//! Run it with `cargo run -p quickstart`. The events go to stdout, the narration to stderr:
//! `cargo run -p quickstart 2>/dev/null` prints the JSON lines alone.

use std::time::Duration;

use outbox::prelude::*;
use outbox::sqlx::{self, SqliteConnection};
use outbox::{JsonLinesPublisher, NewMessage, Relay, RelayConfig, SqliteStore, StoreConfig};
use serde::Serialize;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The event published when an order is placed.
#[derive(Serialize)]
struct OrderPlaced<'a> {
    order_id: i64,
    customer: &'a str,
    total_cents: i64,
}

/// The event published when an order ships.
#[derive(Serialize)]
struct OrderShipped {
    order_id: i64,
}

/// Inserts an order and enqueues its event in the caller's transaction: both are written,
/// or neither is.
async fn place_order(
    store: &SqliteStore,
    tx: &mut SqliteConnection,
    order_id: i64,
    customer: &str,
    total_cents: i64,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO orders (id, customer, total_cents, status) VALUES (?, ?, ?, 'placed')",
    )
    .bind(order_id)
    .bind(customer)
    .bind(total_cents)
    .execute(&mut *tx)
    .await?;
    let event = OrderPlaced {
        order_id,
        customer,
        total_cents,
    };
    let message = NewMessage::json("orders", &event)?
        .key(format!("order-{order_id}"))
        .header("type", "OrderPlaced");
    store.enqueue(&mut *tx, message).await?;
    Ok(())
}

/// Marks an order shipped and enqueues the event, in the caller's transaction.
async fn ship_order(
    store: &SqliteStore,
    tx: &mut SqliteConnection,
    order_id: i64,
) -> Result<(), Error> {
    sqlx::query("UPDATE orders SET status = 'shipped' WHERE id = ?")
        .bind(order_id)
        .execute(&mut *tx)
        .await?;
    let message = NewMessage::json("orders", &OrderShipped { order_id })?
        .key(format!("order-{order_id}"))
        .header("type", "OrderShipped");
    store.enqueue(&mut *tx, message).await?;
    Ok(())
}

/// Completes once the outbox holds no pending message.
async fn drained(store: SqliteStore) {
    loop {
        if store.stats().await.is_ok_and(|stats| stats.pending == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // A database file of our own, removed at exit.
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("shop.db").display());
    let store = SqliteStore::connect(StoreConfig::new().url(url)).await?;
    store.migrate().await?;
    sqlx::query(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, \
         total_cents INTEGER NOT NULL, status TEXT NOT NULL)",
    )
    .execute(store.pool())
    .await?;

    // BEGIN IMMEDIATE: a transaction that writes takes SQLite's write lock up front.
    let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await?;
    place_order(&store, &mut tx, 1, "ada", 4200).await?;
    tx.commit().await?;
    eprintln!("order 1 placed: committed");

    let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await?;
    place_order(&store, &mut tx, 2, "grace", 1337).await?;
    tx.rollback().await?;
    eprintln!("order 2 placed: rolled back (neither the order nor its event exists)");

    let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await?;
    place_order(&store, &mut tx, 3, "linus", 999).await?;
    ship_order(&store, &mut tx, 1).await?;
    tx.commit().await?;
    eprintln!("order 3 placed and order 1 shipped: committed");

    let orders: Vec<i64> = sqlx::query_scalar("SELECT id FROM orders ORDER BY id")
        .fetch_all(store.pool())
        .await?;
    eprintln!("orders in the table: {orders:?}");

    // The relay, embedded: it runs in a task of its own, publishes the committed events
    // (order-1's in enqueue order) and shuts down gracefully once its shutdown future
    // completes, here when the outbox is empty (in a service: on SIGTERM).
    eprintln!("relaying:");
    let relay = Relay::builder(store.clone(), JsonLinesPublisher::stdout())
        .config(RelayConfig::default().poll_max(Duration::from_millis(100)))
        .build()?
        .spawn(drained(store.clone()));
    // The handle completes with the relay's run: Ok once it has stopped gracefully.
    relay.await?;
    eprintln!("every committed event was published; the rolled-back one never was");
    store.pool().close().await;
    Ok(())
}
