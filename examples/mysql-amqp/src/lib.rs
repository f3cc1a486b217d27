//! A billing service on MariaDB / MySQL that announces its invoices and payments on RabbitMQ
//! through a transactional outbox.
//!
//! [`Billing::issue_invoice`] and [`Billing::record_payment`] write the business rows and their
//! events in one transaction; a payment that is refused (more than what is due, an unknown
//! invoice) returns from inside its transaction, which is dropped, hence rolled back: neither
//! the payment nor its event exists. The relay runs in the same process and publishes the
//! committed events to a topic exchange, with the invoice as ordering key, so that the events
//! of one invoice reach the queue in the order they were committed.
//!
//! [`Ledger`] consumes those events: each one applied once, through an inbox, in one
//! transaction with its effect, and acknowledged after the commit.

use std::time::Duration;

mod ledger;
pub use ledger::{Account, Ledger};

use outbox::amqp::lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use outbox::amqp::lapin::types::FieldTable;
use outbox::amqp::lapin::{self, Connection, ConnectionProperties, ExchangeKind};
use outbox::prelude::*;
use outbox::sqlx::{self, MySqlPool};
use outbox::{
    AmqpConfig, AmqpError, AmqpPublisher, ConfigError, MySqlStore, NewMessage, Relay, RelayError,
    RelayHandle, StoreConfig, StoreError,
};
use serde::{Deserialize, Serialize};

/// Settings of the service. [`Config::from_env`] reads them from the environment, with
/// defaults for servers on loopback.
///
/// No `Debug`: the URLs may hold passwords.
#[derive(Clone)]
pub struct Config {
    /// MariaDB / MySQL URL (`DATABASE_URL`, default `mysql://root@127.0.0.1:3306/test`).
    pub database_url: String,
    /// RabbitMQ URL (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).
    pub amqp_url: String,
    /// Prefix of the tables `{prefix}_invoices`, `{prefix}_payments` and `{prefix}_outbox`
    /// (`TABLE_PREFIX`, default `billing`).
    pub table_prefix: String,
    /// The topic exchange events are published to (`BILLING_EXCHANGE`, default `billing`).
    pub exchange: String,
    /// A durable queue bound to every event of the exchange (`BILLING_QUEUE`, default
    /// `billing.events`).
    pub queue: String,
}

impl Config {
    /// Reads the settings from the environment; unset variables take their defaults.
    pub fn from_env() -> Self {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|value| !value.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        Self {
            database_url: var("DATABASE_URL", "mysql://root@127.0.0.1:3306/test"),
            amqp_url: var("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            table_prefix: var("TABLE_PREFIX", "billing"),
            exchange: var("BILLING_EXCHANGE", "billing"),
            queue: var("BILLING_QUEUE", "billing.events"),
        }
    }
}

/// What the service's calls can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The amount is zero or negative: refused before anything is written.
    #[error("amounts must be positive, not {0} cents")]
    InvalidAmount(i64),
    /// No such invoice: the payment's transaction rolled back.
    #[error("there is no invoice {0}")]
    UnknownInvoice(u64),
    /// The payment is more than what is due: its transaction rolled back.
    #[error(
        "invoice {invoice_id} has {due_cents} cents due; a payment of {amount_cents} is refused"
    )]
    Overpayment {
        /// The invoice.
        invoice_id: u64,
        /// What is left to pay.
        due_cents: i64,
        /// The refused payment.
        amount_cents: i64,
    },
    /// A setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The outbox store failed.
    #[error("outbox: {0}")]
    Outbox(#[from] StoreError),
    /// An event could not be encoded.
    #[error("event encoding: {0}")]
    Json(#[from] serde_json::Error),
    /// Declaring the exchange and queue failed.
    #[error("RabbitMQ topology: {0}")]
    Topology(#[from] lapin::Error),
    /// The publisher could not be created or connected.
    #[error("AMQP publisher: {0}")]
    Publisher(#[from] AmqpError),
    /// The relay configuration is invalid.
    #[error("relay configuration: {0}")]
    RelayConfig(#[from] ConfigError),
    /// The relay stopped on a permanent failure (or its task panicked).
    #[error("relay: {0}")]
    Relay(#[from] RelayError),
}

impl Error {
    /// True for the refusals of the business rules: the caller's request was wrong, and
    /// nothing was written.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            Self::InvalidAmount(_) | Self::UnknownInvoice(_) | Self::Overpayment { .. }
        )
    }
}

/// An event of the billing exchange. Its JSON carries a `type` field; it is published with the
/// routing key of [`BillingEvent::routing_key`] and the ordering key `invoice-{id}`, which
/// consumers find in the `outbox-key` header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum BillingEvent {
    /// An invoice was issued.
    InvoiceIssued {
        /// The invoice.
        invoice_id: u64,
        /// Who is billed.
        customer: String,
        /// Amount in cents.
        amount_cents: i64,
    },
    /// A payment was recorded.
    PaymentReceived {
        /// The invoice paid.
        invoice_id: u64,
        /// The payment.
        payment_id: u64,
        /// Amount in cents.
        amount_cents: i64,
    },
    /// An invoice was paid in full.
    InvoicePaid {
        /// The invoice.
        invoice_id: u64,
    },
}

impl BillingEvent {
    /// The invoice the event is about.
    pub fn invoice_id(&self) -> u64 {
        match self {
            Self::InvoiceIssued { invoice_id, .. }
            | Self::PaymentReceived { invoice_id, .. }
            | Self::InvoicePaid { invoice_id } => *invoice_id,
        }
    }

    /// The routing key on the exchange.
    pub fn routing_key(&self) -> &'static str {
        match self {
            Self::InvoiceIssued { .. } => "invoice.issued",
            Self::PaymentReceived { .. } => "payment.received",
            Self::InvoicePaid { .. } => "invoice.paid",
        }
    }

    /// The ordering key: the events of one invoice reach the queue in commit order.
    pub fn key(&self) -> String {
        format!("invoice-{}", self.invoice_id())
    }

    /// The outbox message; destination `exchange/routing_key` (the AMQP publisher splits it).
    fn message(&self, exchange: &str) -> Result<NewMessage, serde_json::Error> {
        Ok(NewMessage::json(format!("{exchange}/{}", self.routing_key()), self)?.key(self.key()))
    }
}

/// An invoice, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invoice {
    /// Invoice id.
    pub id: u64,
    /// Who is billed.
    pub customer: String,
    /// Amount in cents.
    pub amount_cents: i64,
    /// Paid so far, in cents.
    pub paid_cents: i64,
    /// `open` or `paid`.
    pub status: String,
}

/// The statements on the service's tables, whose names come from the configuration.
struct Statements {
    insert_invoice: String,
    lock_invoice: String,
    update_invoice: String,
    insert_payment: String,
    select_invoice: String,
}

impl Statements {
    fn new(invoices: &str, payments: &str) -> Self {
        Self {
            insert_invoice: format!(
                "INSERT INTO {invoices} (customer, amount_cents, paid_cents, status) \
                 VALUES (?, ?, 0, 'open')"
            ),
            lock_invoice: format!(
                "SELECT amount_cents, paid_cents FROM {invoices} WHERE id = ? FOR UPDATE"
            ),
            update_invoice: format!(
                "UPDATE {invoices} SET paid_cents = ?, status = ? WHERE id = ?"
            ),
            insert_payment: format!(
                "INSERT INTO {payments} (invoice_id, amount_cents) VALUES (?, ?)"
            ),
            select_invoice: format!(
                "SELECT id, customer, amount_cents, paid_cents, status FROM {invoices} WHERE id = ?"
            ),
        }
    }
}

/// The billing service, with its relay running in the background.
pub struct Billing {
    pool: MySqlPool,
    store: MySqlStore,
    exchange: String,
    sql: Statements,
    /// The relay, in a task of its own: wakes it, stops it, reports how its run ended.
    relay: RelayHandle<MySqlStore, AmqpPublisher>,
}

impl Billing {
    /// Declares the RabbitMQ topology, creates the tables if missing (outbox included), and
    /// starts the relay.
    pub async fn start(config: &Config) -> Result<Self, Error> {
        let prefix = identifier(&config.table_prefix)?;
        let (invoices, payments) = (format!("{prefix}_invoices"), format!("{prefix}_payments"));
        if config.exchange.is_empty() || config.exchange.contains('/') {
            return Err(Error::Config(format!(
                "exchange {:?} must be non-empty without '/'",
                config.exchange
            )));
        }

        // The publisher never declares exchanges or queues: the application does.
        declare_topology(&config.amqp_url, &config.exchange, &config.queue).await?;

        let pool = MySqlPool::connect(&config.database_url).await?;
        let store = MySqlStore::new(
            pool.clone(),
            StoreConfig::new().table(format!("{prefix}_outbox")),
        )?;
        store.migrate().await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {invoices} (
                id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
                customer VARCHAR(255) NOT NULL,
                amount_cents BIGINT NOT NULL,
                paid_cents BIGINT NOT NULL,
                status VARCHAR(16) NOT NULL
            ) ENGINE = InnoDB"
        ))
        .execute(&pool)
        .await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {payments} (
                id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
                invoice_id BIGINT UNSIGNED NOT NULL,
                amount_cents BIGINT NOT NULL,
                received_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
            ) ENGINE = InnoDB"
        ))
        .execute(&pool)
        .await?;

        // Connects now, so that a wrong URL fails here rather than in the relay's retries.
        let publisher = AmqpPublisher::connect(AmqpConfig::new(&config.amqp_url)).await?;
        // The relay runs until `shutdown` asks it to stop.
        let relay = Relay::builder(store.clone(), publisher)
            .build()?
            .spawn(std::future::pending());

        Ok(Self {
            pool,
            store,
            exchange: config.exchange.clone(),
            sql: Statements::new(&invoices, &payments),
            relay,
        })
    }

    /// Issues an invoice: the invoice row and its `InvoiceIssued` event commit together.
    pub async fn issue_invoice(&self, customer: &str, amount_cents: i64) -> Result<u64, Error> {
        if amount_cents <= 0 {
            return Err(Error::InvalidAmount(amount_cents));
        }
        let mut tx = self.pool.begin().await?;
        let invoice_id = sqlx::query(&self.sql.insert_invoice)
            .bind(customer)
            .bind(amount_cents)
            .execute(&mut *tx)
            .await?
            .last_insert_id();
        let event = BillingEvent::InvoiceIssued {
            invoice_id,
            customer: customer.to_owned(),
            amount_cents,
        };
        self.store
            .enqueue(&mut *tx, event.message(&self.exchange)?)
            .await?;
        tx.commit().await?;
        // MySQL has no notifications: wake the relay in this process instead of waiting for
        // its next poll.
        self.relay.wake();
        Ok(invoice_id)
    }

    /// Records a payment of `invoice_id`: the payment row, the invoice's new balance, the
    /// `PaymentReceived` event and, once the invoice is paid in full, `InvoicePaid`, all in one
    /// transaction. Returns the payment id.
    pub async fn record_payment(&self, invoice_id: u64, amount_cents: i64) -> Result<u64, Error> {
        if amount_cents <= 0 {
            return Err(Error::InvalidAmount(amount_cents));
        }
        let mut tx = self.pool.begin().await?;
        // Locks the invoice: concurrent payments of one invoice run one after the other, so
        // their events are enqueued in commit order.
        let (total, paid): (i64, i64) = sqlx::query_as(&self.sql.lock_invoice)
            .bind(invoice_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::UnknownInvoice(invoice_id))?;
        if paid + amount_cents > total {
            // Returning drops `tx`: the transaction rolls back.
            return Err(Error::Overpayment {
                invoice_id,
                due_cents: total - paid,
                amount_cents,
            });
        }
        let payment_id = sqlx::query(&self.sql.insert_payment)
            .bind(invoice_id)
            .bind(amount_cents)
            .execute(&mut *tx)
            .await?
            .last_insert_id();
        let paid = paid + amount_cents;
        let status = if paid == total { "paid" } else { "open" };
        sqlx::query(&self.sql.update_invoice)
            .bind(paid)
            .bind(status)
            .bind(invoice_id)
            .execute(&mut *tx)
            .await?;

        let mut events = vec![BillingEvent::PaymentReceived {
            invoice_id,
            payment_id,
            amount_cents,
        }];
        if paid == total {
            events.push(BillingEvent::InvoicePaid { invoice_id });
        }
        let messages = events
            .iter()
            .map(|event| event.message(&self.exchange))
            .collect::<Result<Vec<_>, _>>()?;
        // One statement for both; messages of one key keep the order of the batch.
        self.store.enqueue_batch(&mut *tx, messages).await?;
        tx.commit().await?;
        self.relay.wake();
        Ok(payment_id)
    }

    /// Reads an invoice.
    pub async fn invoice(&self, invoice_id: u64) -> Result<Option<Invoice>, Error> {
        let row: Option<(u64, String, i64, i64, String)> = sqlx::query_as(&self.sql.select_invoice)
            .bind(invoice_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(
            row.map(|(id, customer, amount_cents, paid_cents, status)| Invoice {
                id,
                customer,
                amount_cents,
                paid_cents,
                status,
            }),
        )
    }

    /// Waits until the outbox holds no pending message, for at most `timeout`; returns
    /// whether it got there. Returns `false` at once if the relay stopped on a failure
    /// ([`Billing::shutdown`] then says which).
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
    /// a dropped outbox table, which [`Billing::shutdown`] then returns; a readiness probe would
    /// report it.
    pub fn relay_running(&self) -> bool {
        !self.relay.is_finished()
    }

    /// The outbox store.
    pub fn store(&self) -> &MySqlStore {
        &self.store
    }

    /// The database pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Stops the relay gracefully (it publishes or hands back what it holds) and closes the
    /// pool. Returns the relay's failure if it stopped on one.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.relay.shutdown();
        let relayed = self.relay.await;
        self.pool.close().await;
        relayed?;
        Ok(())
    }
}

/// Declares a durable topic exchange and a durable queue bound to all its routing keys.
/// Idempotent: run it at every start.
pub async fn declare_topology(amqp_url: &str, exchange: &str, queue: &str) -> Result<(), Error> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    connection.close(200, "topology declared".into()).await?;
    Ok(())
}

/// Accepts plain SQL identifiers only, since the table names are written into statements.
fn identifier(name: &str) -> Result<&str, Error> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        // The outbox table `{prefix}_outbox` must fit the store's 52 characters.
        && name.len() <= 45;
    if valid {
        Ok(name)
    } else {
        Err(Error::Config(format!(
            "table prefix {name:?} must be a plain identifier of at most 45 characters"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_prefixes_are_plain_identifiers() {
        assert!(identifier("billing").is_ok());
        for bad in [
            "",
            "9lives",
            "a-b",
            "a.b",
            "x; DROP TABLE y",
            &"a".repeat(46),
        ] {
            assert!(identifier(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn events_go_to_their_routing_key_with_the_invoice_as_key() -> Result<(), serde_json::Error> {
        let event = BillingEvent::PaymentReceived {
            invoice_id: 7,
            payment_id: 3,
            amount_cents: 500,
        };
        let message = event.message("billing")?;
        assert_eq!(message.destination(), "billing/payment.received");
        assert_eq!(message.ordering_key(), Some("invoice-7"));
        let decoded: BillingEvent = serde_json::from_slice(message.payload())?;
        assert_eq!(decoded, event);
        Ok(())
    }
}
