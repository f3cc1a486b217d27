//! The ledger: a consumer service of the billing events that keeps, per customer, what was
//! invoiced and what was received. Its effects are additions, which must not happen twice, and
//! RabbitMQ delivers at least once: each event goes through an inbox, in the same transaction
//! as the addition, and is acknowledged only after that transaction commits.

use futures::StreamExt;
use outbox::amqp::lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use outbox::amqp::lapin::{self, Connection, ConnectionProperties};
use outbox::sqlx::{self, MySqlConnection, MySqlPool};
use outbox::{Incoming, MySqlInbox, Processed};

use crate::{BillingEvent, Error};

/// The inbox's name for this consumer: another consumer of the same events has its own.
const CONSUMER: &str = "ledger";

/// What a customer was invoiced and paid, as the ledger knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Account {
    /// The sum of the invoices issued, in cents.
    pub invoiced_cents: i64,
    /// The sum of the payments received, in cents.
    pub received_cents: i64,
}

/// The ledger service, on its own tables (it may as well live in another database).
#[derive(Clone)]
pub struct Ledger {
    pool: MySqlPool,
    inbox: MySqlInbox,
    accounts: String,
    invoices: String,
}

impl Ledger {
    /// Creates the ledger's tables and its inbox if missing; `prefix` names them.
    pub async fn start(pool: MySqlPool, prefix: &str) -> Result<Self, Error> {
        let prefix = crate::identifier(prefix)?;
        let (accounts, invoices) = (format!("{prefix}_accounts"), format!("{prefix}_invoices"));
        for ddl in [
            format!(
                "CREATE TABLE IF NOT EXISTS {accounts} (customer VARCHAR(255) PRIMARY KEY, \
                 invoiced_cents BIGINT NOT NULL, received_cents BIGINT NOT NULL) ENGINE = InnoDB"
            ),
            // Which customer an invoice is for: payments name the invoice only.
            format!(
                "CREATE TABLE IF NOT EXISTS {invoices} (invoice_id BIGINT UNSIGNED PRIMARY KEY, \
                 customer VARCHAR(255) NOT NULL) ENGINE = InnoDB"
            ),
        ] {
            sqlx::query(&ddl).execute(&pool).await?;
        }
        let inbox = MySqlInbox::new(pool.clone(), &format!("{prefix}_inbox"))?;
        inbox.migrate().await?;
        Ok(Self {
            pool,
            inbox,
            accounts,
            invoices,
        })
    }

    /// Applies one received event once: its addition and its inbox record in one transaction.
    /// A redelivered event comes back [`Processed::Duplicate`] and changes nothing.
    pub async fn apply(&self, incoming: &Incoming) -> Result<Processed<()>, Error> {
        let event: BillingEvent = serde_json::from_slice(&incoming.payload)?;
        let mut tx = self.pool.begin().await?;
        let processed = self
            .inbox
            .process(
                &mut tx,
                CONSUMER,
                incoming,
                async |tx: &mut MySqlConnection| self.add(tx, &event).await,
            )
            .await?;
        tx.commit().await?;
        Ok(processed)
    }

    async fn add(&self, tx: &mut MySqlConnection, event: &BillingEvent) -> Result<(), Error> {
        let (accounts, invoices) = (&self.accounts, &self.invoices);
        match event {
            BillingEvent::InvoiceIssued {
                invoice_id,
                customer,
                amount_cents,
            } => {
                sqlx::query(&format!(
                    "INSERT INTO {invoices} (invoice_id, customer) VALUES (?, ?)"
                ))
                .bind(invoice_id)
                .bind(customer)
                .execute(&mut *tx)
                .await?;
                sqlx::query(&format!(
                    "INSERT INTO {accounts} (customer, invoiced_cents, received_cents) \
                     VALUES (?, ?, 0) \
                     ON DUPLICATE KEY UPDATE invoiced_cents = invoiced_cents + VALUES(invoiced_cents)"
                ))
                .bind(customer)
                .bind(amount_cents)
                .execute(&mut *tx)
                .await?;
            }
            BillingEvent::PaymentReceived {
                invoice_id,
                amount_cents,
                ..
            } => {
                // The invoice's event came first: the events of one invoice share a key, and
                // the relay publishes a key's events in commit order.
                sqlx::query(&format!(
                    "UPDATE {accounts} a JOIN {invoices} i ON i.customer = a.customer \
                     SET a.received_cents = a.received_cents + ? WHERE i.invoice_id = ?"
                ))
                .bind(amount_cents)
                .bind(invoice_id)
                .execute(&mut *tx)
                .await?;
            }
            BillingEvent::InvoicePaid { .. } => {}
        }
        Ok(())
    }

    /// [`Ledger::consume`] in a task of its own, on `config`'s broker and queue.
    pub fn spawn_consumer(
        &self,
        config: &crate::Config,
    ) -> tokio::task::JoinHandle<Result<(), Error>> {
        let (ledger, url, queue) = (self.clone(), config.amqp_url.clone(), config.queue.clone());
        tokio::spawn(async move { ledger.consume(&url, &queue).await })
    }

    /// Consumes `queue` until the connection ends: each delivery applied once, then
    /// acknowledged. A crash between the commit and the acknowledgement redelivers the event;
    /// the inbox drops it.
    pub async fn consume(&self, amqp_url: &str, queue: &str) -> Result<(), Error> {
        let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel.basic_qos(32, BasicQosOptions::default()).await?;
        let mut deliveries = channel
            .basic_consume(
                queue.into(),
                CONSUMER.into(),
                BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await?;
        while let Some(delivery) = deliveries.next().await {
            let delivery = delivery?;
            let incoming = outbox::amqp::incoming(&delivery)
                .map_err(|err| Error::Config(format!("a delivery not from the outbox: {err}")))?;
            self.apply(&incoming).await?;
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }

    /// The account of `customer`.
    pub async fn account(&self, customer: &str) -> Result<Account, Error> {
        let row: Option<(i64, i64)> = sqlx::query_as(&format!(
            "SELECT invoiced_cents, received_cents FROM {} WHERE customer = ?",
            self.accounts
        ))
        .bind(customer)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
            .map(|(invoiced_cents, received_cents)| Account {
                invoiced_cents,
                received_cents,
            })
            .unwrap_or_default())
    }

    /// Drops the ledger's tables and its inbox. For tests.
    pub async fn drop_tables(&self) -> Result<(), Error> {
        for table in [&self.accounts, &self.invoices] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                .execute(&self.pool)
                .await?;
        }
        self.inbox.drop_table().await?;
        Ok(())
    }
}
