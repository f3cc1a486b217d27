//! The billing service against real servers: committed invoices and payments reach the RabbitMQ
//! queue, each event with its message id and key, in per-invoice order; refused payments leave
//! no row and no event.
//!
//! MariaDB / MySQL from `OUTBOX_TEST_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`),
//! RabbitMQ from `OUTBOX_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`). Each
//! run uses tables, an exchange and a queue of its own and removes them at the end.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use mysql_amqp::{Account, Billing, BillingEvent, Config, Error, Ledger};
use outbox::amqp::lapin::options::{
    BasicConsumeOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use outbox::amqp::lapin::types::{AMQPValue, FieldTable};
use outbox::amqp::lapin::{self, Connection, ConnectionProperties};
use outbox::sqlx::{self, mysql::MySqlPoolOptions};
use outbox::{
    MESSAGE_ID_HEADER, MessageId, MySqlStore, RelayError, Store, StoreConfig, StoreErrorKind,
};
use outbox_testkit::env::{or_skip, service_url, unique_name};
use tokio::time::Instant;

/// One delivery read back from the queue.
#[derive(Debug)]
struct Received {
    id: MessageId,
    id_header: Option<String>,
    key: Option<String>,
    routing_key: String,
    event: BillingEvent,
}

/// The servers of the tests: MariaDB / MySQL and RabbitMQ.
struct Servers {
    database_url: String,
    amqp_url: String,
    pool: sqlx::MySqlPool,
    connection: Connection,
}

impl Servers {
    /// The servers, or `None` to skip when one is missing (a failure under
    /// `OUTBOX_TEST_REQUIRE=1`).
    async fn reach() -> Option<Self> {
        let database_url = service_url("OUTBOX_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
        let amqp_url = service_url(
            "OUTBOX_TEST_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        );
        let connecting = MySqlPoolOptions::new()
            .acquire_timeout(Duration::from_secs(5))
            .connect(&database_url)
            .await;
        let pool = or_skip("MySQL", connecting)?;
        let connection = or_skip(
            "RabbitMQ",
            Connection::connect(&amqp_url, ConnectionProperties::default()).await,
        )?;
        Some(Self {
            database_url,
            amqp_url,
            pool,
            connection,
        })
    }

    /// A configuration on tables, an exchange and a queue of the test's own.
    fn config(&self) -> Config {
        let name = unique_name("billing");
        Config {
            database_url: self.database_url.clone(),
            amqp_url: self.amqp_url.clone(),
            table_prefix: name.clone(),
            exchange: name.clone(),
            queue: format!("{name}.events"),
        }
    }

    /// The outbox of `config`.
    fn outbox(&self, config: &Config) -> MySqlStore {
        MySqlStore::new(
            self.pool.clone(),
            StoreConfig::new().table(format!("{}_outbox", config.table_prefix)),
        )
        .expect("store")
    }

    /// Deletes the test's queue and exchange and drops its tables.
    async fn clean_up(self, config: &Config) {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .queue_delete(config.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete queue");
        channel
            .exchange_delete(
                config.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .expect("delete exchange");
        self.connection
            .close(200, "done".into())
            .await
            .expect("close connection");
        self.outbox(config)
            .drop_tables()
            .await
            .expect("drop outbox tables");
        let prefix = &config.table_prefix;
        sqlx::query(&format!(
            "DROP TABLE IF EXISTS {prefix}_invoices, {prefix}_payments"
        ))
        .execute(&self.pool)
        .await
        .expect("drop tables");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_billing_events_reach_the_queue_in_order_and_refused_payments_never_do() {
    let Some(servers) = Servers::reach().await else {
        return;
    };
    let config = servers.config();
    let name = config.table_prefix.clone();
    let billing = Billing::start(&config).await.expect("service starts");

    // Two invoices, both paid in full; four calls that are refused.
    let acme = billing.issue_invoice("acme", 10_000).await.expect("issue");
    let globex = billing.issue_invoice("globex", 2_500).await.expect("issue");
    billing.record_payment(acme, 4_000).await.expect("pay");
    let overpaid = billing.record_payment(acme, 9_000).await;
    assert!(
        matches!(
            overpaid,
            Err(Error::Overpayment {
                due_cents: 6_000,
                ..
            })
        ),
        "{overpaid:?}"
    );
    billing.record_payment(globex, 2_500).await.expect("pay");
    billing.record_payment(acme, 6_000).await.expect("pay");
    let unknown = billing.record_payment(globex + 1_000, 100).await;
    assert!(
        matches!(unknown, Err(Error::UnknownInvoice(_))),
        "{unknown:?}"
    );
    let zero = billing.issue_invoice("initech", 0).await;
    assert!(matches!(zero, Err(Error::InvalidAmount(0))), "{zero:?}");
    let negative = billing.record_payment(acme, -1).await;
    assert!(
        matches!(negative, Err(Error::InvalidAmount(-1))),
        "{negative:?}"
    );

    // The refused payment left no trace in the business tables.
    let invoice = billing.invoice(acme).await.expect("read").expect("invoice");
    assert_eq!(
        (invoice.paid_cents, invoice.status.as_str()),
        (10_000, "paid")
    );
    let payments: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM {name}_payments WHERE invoice_id = ?"
    ))
    .bind(acme)
    .fetch_one(&servers.pool)
    .await
    .expect("count");
    assert_eq!(payments, 2);

    assert!(
        billing
            .wait_until_published(Duration::from_secs(30))
            .await
            .expect("stats"),
        "the relay published every event"
    );
    let stats = billing.store().stats().await.expect("stats");
    assert_eq!(stats.dead, 0, "nothing dead-lettered");
    billing.shutdown().await.expect("graceful shutdown");

    // What a consumer of the queue sees.
    let channel = servers.connection.create_channel().await.expect("channel");
    let received = consume(&channel, &config.queue, 7, Duration::from_secs(30)).await;
    let expected: BTreeMap<String, Vec<&str>> = [
        (
            format!("invoice-{acme}"),
            vec![
                "invoice.issued",
                "payment.received",
                "payment.received",
                "invoice.paid",
            ],
        ),
        (
            format!("invoice-{globex}"),
            vec!["invoice.issued", "payment.received", "invoice.paid"],
        ),
    ]
    .into_iter()
    .collect();

    // At least once: drop repeats by message id, as a consumer would.
    let mut seen = HashSet::new();
    let mut arrived: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for message in &received {
        assert_eq!(message.id_header, Some(message.id.to_string()), "id header");
        assert_eq!(
            message.key.as_deref(),
            Some(message.event.key().as_str()),
            "key"
        );
        assert_eq!(
            message.routing_key,
            message.event.routing_key(),
            "routing key"
        );
        if let BillingEvent::PaymentReceived { amount_cents, .. } = message.event {
            assert_ne!(amount_cents, 9_000, "the refused payment was published");
        }
        if seen.insert(message.id) {
            arrived
                .entry(message.event.key())
                .or_default()
                .push(message.event.routing_key());
        }
    }
    assert_eq!(
        arrived, expected,
        "every committed event, in per-invoice order"
    );
    assert_eq!(seen.len(), 7, "seven distinct message ids");

    channel
        .close(200, "read".into())
        .await
        .expect("close channel");
    servers.clean_up(&config).await;
}

/// The service sees its relay stop on a permanent failure, here a dropped outbox table: the
/// relay's handle reports it, and shutdown returns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stops_on_a_permanent_failure_is_reported() {
    let Some(servers) = Servers::reach().await else {
        return;
    };
    let config = servers.config();
    let billing = Billing::start(&config).await.expect("service starts");
    assert!(billing.relay_running());

    servers
        .outbox(&config)
        .drop_tables()
        .await
        .expect("drop outbox tables");
    let deadline = Instant::now() + Duration::from_secs(30);
    while billing.relay_running() {
        assert!(
            Instant::now() < deadline,
            "the relay stops within 30 s of its table's drop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopped = billing.shutdown().await;
    assert!(
        matches!(
            &stopped,
            Err(Error::Relay(RelayError::Store(err))) if err.kind() == StoreErrorKind::Schema
        ),
        "the relay's failure, a missing table: {stopped:?}"
    );

    servers.clean_up(&config).await;
}

/// Reads `queue` until `count` deliveries came and a further second passed without more (a
/// delivery that should not exist would show), or until `timeout`.
async fn consume(
    channel: &lapin::Channel,
    queue: &str,
    count: usize,
    timeout: Duration,
) -> Vec<Received> {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    while let Ok(Some(delivery)) = tokio::time::timeout_at(deadline, consumer.next()).await {
        let delivery = delivery.expect("delivery");
        let properties = &delivery.properties;
        let header = |name: &str| {
            properties.headers().as_ref().and_then(|headers| {
                headers
                    .inner()
                    .iter()
                    .find(|(n, _)| n.as_str() == name)
                    .and_then(|(_, value)| match value {
                        AMQPValue::LongString(s) => {
                            Some(String::from_utf8(s.as_bytes().to_vec()).expect("UTF-8"))
                        }
                        _ => None,
                    })
            })
        };
        received.push(Received {
            id: properties
                .message_id()
                .as_ref()
                .expect("message_id")
                .as_str()
                .parse()
                .expect("the outbox id"),
            id_header: header(MESSAGE_ID_HEADER),
            key: header("outbox-key"),
            routing_key: delivery.routing_key.as_str().to_owned(),
            event: serde_json::from_slice(&delivery.data).expect("a billing event"),
        });
        if received.len() == count {
            deadline = Instant::now() + Duration::from_secs(1);
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_applies_each_event_once_and_drops_redeliveries() {
    let Some(servers) = Servers::reach().await else {
        return;
    };
    let config = servers.config();
    let billing = Billing::start(&config).await.expect("service starts");
    let ledger = Ledger::start(
        servers.pool.clone(),
        &format!("{}_ledger", config.table_prefix),
    )
    .await
    .expect("ledger starts");
    let consuming = ledger.spawn_consumer(&config);

    let acme = billing.issue_invoice("acme", 10_000).await.expect("issue");
    billing.record_payment(acme, 4_000).await.expect("pay");
    billing.record_payment(acme, 6_000).await.expect("pay");
    let globex = billing.issue_invoice("globex", 2_500).await.expect("issue");
    let expected = Account {
        invoiced_cents: 10_000,
        received_cents: 10_000,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ledger.account("acme").await.expect("account") != expected {
        assert!(Instant::now() < deadline, "the ledger caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The same payment delivered twice, as RabbitMQ does after a consumer crashed between its
    // commit and its acknowledgement, or a relay published again after a lost confirmation:
    // the same message id, applied once.
    let payment = BillingEvent::PaymentReceived {
        invoice_id: globex,
        payment_id: 1,
        amount_cents: 500,
    };
    let id = MessageId::new();
    let delivery = outbox::Incoming::new(
        Some(&id.to_string()),
        config.queue.as_str(),
        serde_json::to_vec(&payment).expect("json"),
    )
    .expect("incoming");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ledger
        .account("globex")
        .await
        .expect("account")
        .invoiced_cents
        != 2_500
    {
        assert!(Instant::now() < deadline, "the ledger caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = ledger.apply(&delivery).await.expect("apply");
    let again = ledger.apply(&delivery).await.expect("apply again");
    assert!(first.is_applied(), "{first:?}");
    assert_eq!(again, outbox::Processed::Duplicate);
    assert_eq!(
        ledger.account("globex").await.expect("account"),
        Account {
            invoiced_cents: 2_500,
            received_cents: 500,
        }
    );
    assert_eq!(
        ledger.account("acme").await.expect("account"),
        expected,
        "nothing applied twice"
    );

    consuming.abort();
    billing.shutdown().await.expect("graceful shutdown");
    ledger.drop_tables().await.expect("drop the ledger");
    servers.clean_up(&config).await;
}
