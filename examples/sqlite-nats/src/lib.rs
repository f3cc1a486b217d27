//! An inventory service on SQLite that announces its stock movements on NATS JetStream through
//! a transactional outbox.
//!
//! [`Inventory::receive`] and [`Inventory::reserve`] change the stock and enqueue their events in
//! one SQLite transaction; a reservation of more than what is available returns from inside its
//! transaction, which is dropped, hence rolled back: the stock is unchanged and no event exists.
//! The relay runs in the same process and publishes the committed events to JetStream, with
//! the SKU as ordering key and the outbox id as `Nats-Msg-Id`, so that the stream drops a repeat
//! and the events of one SKU are stored in commit order.

use std::path::PathBuf;
use std::time::Duration;

use outbox::nats::StreamSpec;
use outbox::prelude::*;
use outbox::sqlx;
use outbox::{
    ConfigError, NatsConfig, NatsError, NatsPublisher, NewMessage, Relay, RelayError, RelayHandle,
    SqliteStore, StoreConfig, StoreError,
};
use serde::{Deserialize, Serialize};

/// Settings of the service. [`Config::from_env`] reads them from the environment.
///
/// No `Debug`: the NATS URL may hold credentials.
#[derive(Clone)]
pub struct Config {
    /// The SQLite database file, created if missing (`DATABASE_PATH`).
    pub database_path: PathBuf,
    /// NATS URL (`NATS_URL`, default `nats://127.0.0.1:4222`).
    pub nats_url: String,
    /// Every event subject starts with this token (`SUBJECT_PREFIX`, default `inventory`).
    pub subject_prefix: String,
    /// The JetStream stream storing `{subject_prefix}.>`, created at start if missing
    /// (`NATS_STREAM`, default `INVENTORY`).
    pub stream: String,
}

impl Config {
    /// Reads the settings from the environment; unset variables take their defaults, and
    /// the database is `default_database` unless `DATABASE_PATH` is set.
    pub fn from_env(default_database: impl Into<PathBuf>) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        Self {
            database_path: var("DATABASE_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| default_database.into()),
            nats_url: var("NATS_URL").unwrap_or_else(|| String::from("nats://127.0.0.1:4222")),
            subject_prefix: var("SUBJECT_PREFIX").unwrap_or_else(|| String::from("inventory")),
            stream: var("NATS_STREAM").unwrap_or_else(|| String::from("INVENTORY")),
        }
    }
}

/// What the service's calls can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The quantity is zero or negative: refused before anything is written.
    #[error("quantities must be positive, not {0}")]
    InvalidQuantity(i64),
    /// The SKU is empty or longer than an outbox key may be.
    #[error("a SKU must have 1 to 255 bytes")]
    InvalidSku,
    /// Not enough stock: the reservation's transaction rolled back.
    #[error("{sku}: {available} available, {requested} requested")]
    InsufficientStock {
        /// The SKU.
        sku: String,
        /// What is available.
        available: i64,
        /// What was asked for.
        requested: i64,
    },
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The outbox store failed.
    #[error("outbox: {0}")]
    Outbox(#[from] StoreError),
    /// An event could not be encoded.
    #[error("event encoding: {0}")]
    Json(#[from] serde_json::Error),
    /// The NATS publisher could not be created or the stream could not be ensured.
    #[error("NATS: {0}")]
    Nats(#[from] NatsError),
    /// The relay configuration is invalid.
    #[error("relay configuration: {0}")]
    RelayConfig(#[from] ConfigError),
    /// The relay stopped on a permanent failure (or its task panicked).
    #[error("relay: {0}")]
    Relay(#[from] RelayError),
}

impl Error {
    /// True for the refusals of the business rules: the request was wrong, nothing was written.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            Self::InvalidQuantity(_) | Self::InvalidSku | Self::InsufficientStock { .. }
        )
    }
}

/// An event of the inventory stream. Its JSON carries a `type` field; its subject is
/// `{subject_prefix}.{destination}` and its ordering key (header `Outbox-Key`) the SKU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum StockEvent {
    /// Stock arrived.
    StockReceived {
        /// The SKU.
        sku: String,
        /// How many arrived.
        quantity: i64,
        /// Available afterwards.
        available: i64,
    },
    /// Stock was reserved for an order.
    StockReserved {
        /// The SKU.
        sku: String,
        /// The reservation.
        reservation_id: i64,
        /// The order it is for.
        order: String,
        /// How many were reserved.
        quantity: i64,
        /// Available afterwards.
        available: i64,
    },
    /// Nothing is left of a SKU.
    StockDepleted {
        /// The SKU.
        sku: String,
    },
}

impl StockEvent {
    /// The SKU: the ordering key.
    pub fn sku(&self) -> &str {
        match self {
            Self::StockReceived { sku, .. }
            | Self::StockReserved { sku, .. }
            | Self::StockDepleted { sku } => sku,
        }
    }

    /// The outbox destination, which the publisher prefixes with [`Config::subject_prefix`].
    pub fn destination(&self) -> &'static str {
        match self {
            Self::StockReceived { .. } => "stock.received",
            Self::StockReserved { .. } => "stock.reserved",
            Self::StockDepleted { .. } => "stock.depleted",
        }
    }

    fn message(&self) -> Result<NewMessage, serde_json::Error> {
        Ok(NewMessage::json(self.destination(), self)?.key(self.sku()))
    }
}

/// The inventory service, with its relay running in the background.
pub struct Inventory {
    store: SqliteStore,
    /// The relay, in a task of its own: wakes it, stops it, reports how its run ended.
    relay: RelayHandle<SqliteStore, NatsPublisher>,
}

impl Inventory {
    /// Opens (or creates) the database with its tables and the outbox's, makes sure the stream
    /// exists, and starts the relay.
    pub async fn start(config: &Config) -> Result<Self, Error> {
        let url = format!("sqlite://{}", config.database_path.display());
        // WAL mode and a busy timeout: the relay and the service share the file.
        let store = SqliteStore::connect(StoreConfig::new().url(url)).await?;
        store.migrate().await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS stock (
                sku TEXT PRIMARY KEY,
                available INTEGER NOT NULL CHECK (available >= 0)
            );
            CREATE TABLE IF NOT EXISTS reservations (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                sku TEXT NOT NULL REFERENCES stock (sku),
                order_ref TEXT NOT NULL,
                quantity INTEGER NOT NULL
            );",
        )
        .execute(store.pool())
        .await?;

        // The stream is created at connect if missing: the relay would otherwise dead-letter
        // what nothing stores.
        let nats = NatsConfig::new(&config.nats_url)
            .subject_prefix(&config.subject_prefix)
            .ensure_stream(StreamSpec::new(
                &config.stream,
                [format!("{}.>", config.subject_prefix)],
            ));
        let publisher = NatsPublisher::connect(nats).await?;
        // The relay runs until `shutdown` asks it to stop.
        let relay = Relay::builder(store.clone(), publisher)
            .build()?
            .spawn(std::future::pending());

        Ok(Self { store, relay })
    }

    /// Adds `quantity` of `sku` to the stock and enqueues `StockReceived`, in one transaction.
    /// Returns what is available afterwards.
    pub async fn receive(&self, sku: &str, quantity: i64) -> Result<i64, Error> {
        check(sku, quantity)?;
        // BEGIN IMMEDIATE takes SQLite's write lock up front, as a transaction that writes should.
        let mut tx = self.store.pool().begin_with("BEGIN IMMEDIATE").await?;
        let available: i64 = sqlx::query_scalar(
            "INSERT INTO stock (sku, available) VALUES (?1, ?2)
             ON CONFLICT (sku) DO UPDATE SET available = available + ?2
             RETURNING available",
        )
        .bind(sku)
        .bind(quantity)
        .fetch_one(&mut *tx)
        .await?;
        let event = StockEvent::StockReceived {
            sku: sku.to_owned(),
            quantity,
            available,
        };
        self.store.enqueue(&mut *tx, event.message()?).await?;
        tx.commit().await?;
        // SQLite has no notifications: wake the relay in this process instead of waiting for
        // its next poll.
        self.relay.wake();
        Ok(available)
    }

    /// Reserves `quantity` of `sku` for `order` and enqueues `StockReserved` (and
    /// `StockDepleted` when nothing is left), in one transaction. Returns the reservation id.
    pub async fn reserve(&self, sku: &str, quantity: i64, order: &str) -> Result<i64, Error> {
        check(sku, quantity)?;
        let mut tx = self.store.pool().begin_with("BEGIN IMMEDIATE").await?;
        let available: i64 = sqlx::query_scalar("SELECT available FROM stock WHERE sku = ?")
            .bind(sku)
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or(0);
        if available < quantity {
            // Returning drops `tx`: the transaction rolls back.
            return Err(Error::InsufficientStock {
                sku: sku.to_owned(),
                available,
                requested: quantity,
            });
        }
        let available = available - quantity;
        sqlx::query("UPDATE stock SET available = ? WHERE sku = ?")
            .bind(available)
            .bind(sku)
            .execute(&mut *tx)
            .await?;
        let reservation_id =
            sqlx::query("INSERT INTO reservations (sku, order_ref, quantity) VALUES (?, ?, ?)")
                .bind(sku)
                .bind(order)
                .bind(quantity)
                .execute(&mut *tx)
                .await?
                .last_insert_rowid();

        let mut events = vec![StockEvent::StockReserved {
            sku: sku.to_owned(),
            reservation_id,
            order: order.to_owned(),
            quantity,
            available,
        }];
        if available == 0 {
            events.push(StockEvent::StockDepleted {
                sku: sku.to_owned(),
            });
        }
        let messages = events
            .iter()
            .map(StockEvent::message)
            .collect::<Result<Vec<_>, _>>()?;
        // One statement for both; messages of one key keep the order of the batch.
        self.store.enqueue_batch(&mut *tx, messages).await?;
        tx.commit().await?;
        self.relay.wake();
        Ok(reservation_id)
    }

    /// What is available of `sku`.
    pub async fn available(&self, sku: &str) -> Result<i64, Error> {
        let available: Option<i64> =
            sqlx::query_scalar("SELECT available FROM stock WHERE sku = ?")
                .bind(sku)
                .fetch_optional(self.store.pool())
                .await?;
        Ok(available.unwrap_or(0))
    }

    /// Waits until the outbox holds no pending message, for at most `timeout`; returns
    /// whether it got there. Returns `false` at once if the relay stopped on a failure
    /// ([`Inventory::shutdown`] then says which).
    pub async fn wait_until_published(&self, timeout: Duration) -> Result<bool, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.store.stats().await?.pending == 0 {
                return Ok(true);
            }
            if self.relay.is_finished() || tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the relay is running. It stops on its own only on a permanent failure, such as
    /// a dropped outbox table, which [`Inventory::shutdown`] then returns; a readiness probe
    /// would report it.
    pub fn relay_running(&self) -> bool {
        !self.relay.is_finished()
    }

    /// The outbox store.
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// Stops the relay gracefully (it publishes or hands back what it holds) and closes the
    /// database. Returns the relay's failure if it stopped on one.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.relay.shutdown();
        let relayed = self.relay.await;
        self.store.pool().close().await;
        relayed?;
        Ok(())
    }
}

fn check(sku: &str, quantity: i64) -> Result<(), Error> {
    if sku.is_empty() || sku.len() > 255 {
        return Err(Error::InvalidSku);
    }
    if quantity <= 0 {
        return Err(Error::InvalidQuantity(quantity));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_before_any_write() {
        assert!(check("sku-1", 1).is_ok());
        assert!(matches!(check("", 1), Err(Error::InvalidSku)));
        assert!(matches!(check(&"s".repeat(256), 1), Err(Error::InvalidSku)));
        assert!(matches!(check("sku-1", 0), Err(Error::InvalidQuantity(0))));
    }

    #[test]
    fn events_are_keyed_by_sku() -> Result<(), serde_json::Error> {
        let event = StockEvent::StockDepleted {
            sku: String::from("sku-1"),
        };
        let message = event.message()?;
        assert_eq!(message.destination(), "stock.depleted");
        assert_eq!(message.ordering_key(), Some("sku-1"));
        let decoded: StockEvent = serde_json::from_slice(message.payload())?;
        assert_eq!(decoded, event);
        Ok(())
    }
}
