//! The order service against real servers: orders placed and cancelled over HTTP reach the Kafka
//! topic, each event once with its key and id, in per-order order; rejected requests publish
//! nothing.
//!
//! PostgreSQL from `OUTBOX_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! Kafka from `OUTBOX_TEST_KAFKA_BROKERS` (default `127.0.0.1:9092`). Each run uses tables and a
//! topic of its own and removes them at the end.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use outbox::kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use outbox::kafka::rdkafka::client::DefaultClientContext;
use outbox::kafka::rdkafka::config::ClientConfig;
use outbox::kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use outbox::kafka::rdkafka::message::{Headers, Message};
use outbox::sqlx::{self, postgres::PgPoolOptions};
use outbox::{MESSAGE_ID_HEADER, MessageId, Store};
use outbox_testkit::env::{or_skip, service_url, unique_name};
use postgres_kafka::{Config, Order, OrderEvent, OrderService, PlaceOrder};
use reqwest::StatusCode;
use tokio::net::TcpListener;
use tokio::time::Instant;
use uuid::Uuid;

/// One record read back from the topic.
#[derive(Debug)]
struct Record {
    key: String,
    id: MessageId,
    type_header: String,
    event: OrderEvent,
}

/// The servers of the tests: PostgreSQL, and a Kafka broker with an admin client.
struct Servers {
    database_url: String,
    brokers: String,
    pool: sqlx::PgPool,
    admin: AdminClient<DefaultClientContext>,
}

impl Servers {
    /// The servers, or `None` to skip when one is missing (a failure under
    /// `OUTBOX_TEST_REQUIRE=1`).
    async fn reach() -> Option<Self> {
        let database_url = service_url(
            "OUTBOX_TEST_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        );
        let brokers = service_url("OUTBOX_TEST_KAFKA_BROKERS", "127.0.0.1:9092");
        let connecting = PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(5))
            .connect(&database_url)
            .await;
        let pool = or_skip("PostgreSQL", connecting)?;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("admin client");
        let reachable = tokio::task::block_in_place(|| {
            admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(5))
                .map(drop)
        });
        or_skip("Kafka broker", reachable)?;
        Some(Self {
            database_url,
            brokers,
            pool,
            admin,
        })
    }

    /// A topic of the test's own, created first: the broker does not create topics by itself.
    async fn topic(&self) -> String {
        let topic = unique_name("postgres_kafka_orders");
        for created in self
            .admin
            .create_topics(
                &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
                &admin_options(),
            )
            .await
            .expect("create topic")
        {
            created.expect("topic created");
        }
        topic
    }

    /// A configuration on tables and a topic of the test's own.
    async fn config(&self) -> Config {
        Config {
            database_url: self.database_url.clone(),
            kafka_brokers: self.brokers.clone(),
            listen: "127.0.0.1:0".parse().expect("address"),
            orders_table: unique_name("orders"),
            outbox_table: unique_name("outbox"),
            topic: self.topic().await,
        }
    }

    /// Drops the test's tables and deletes its topic.
    async fn clean_up(&self, config: &Config) {
        let outbox = outbox::PostgresStore::new(
            self.pool.clone(),
            outbox::StoreConfig::new().table(&config.outbox_table),
        )
        .expect("store");
        outbox.drop_tables().await.expect("drop outbox tables");
        sqlx::query(&format!("DROP TABLE IF EXISTS {}", config.orders_table))
            .execute(&self.pool)
            .await
            .expect("drop orders");
        for deleted in self
            .admin
            .delete_topics(&[&config.topic], &admin_options())
            .await
            .expect("delete topic")
        {
            if let Err((topic, code)) = deleted {
                eprintln!("deleting topic {topic}: {code:?}");
            }
        }
    }
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_orders_reach_kafka_in_order_and_rejected_requests_never_do() {
    let Some(servers) = Servers::reach().await else {
        return;
    };
    let config = servers.config().await;
    let (brokers, topic) = (servers.brokers.clone(), config.topic.clone());
    let service = OrderService::connect(&config)
        .await
        .expect("service starts");
    let store = service.relay().store().clone();
    let listener = TcpListener::bind(config.listen).await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service.serve(listener, async {
        stopped.await.ok();
    }));

    // Three orders, two of them cancelled, and three requests that are refused.
    let http = reqwest::Client::new();
    let mut orders = Vec::new();
    for (customer, total_cents) in [("ada", 4200), ("grace", 1337), ("linus", 999)] {
        let response = http
            .post(format!("{base}/orders"))
            .json(&PlaceOrder {
                customer: customer.to_owned(),
                total_cents,
            })
            .send()
            .await
            .expect("POST /orders");
        assert_eq!(response.status(), StatusCode::CREATED);
        let order: Order = response.json().await.expect("order");
        assert_eq!(order.status, "created");
        orders.push(order);
    }
    let rejected = http
        .post(format!("{base}/orders"))
        .json(&PlaceOrder {
            customer: String::from("mallory"),
            total_cents: -5,
        })
        .send()
        .await
        .expect("POST /orders");
    assert_eq!(rejected.status(), StatusCode::UNPROCESSABLE_ENTITY);

    for order in [&orders[0], &orders[2]] {
        let response = http
            .post(format!("{base}/orders/{}/cancel", order.id))
            .send()
            .await
            .expect("cancel");
        assert_eq!(response.status(), StatusCode::OK);
        let cancelled: Order = response.json().await.expect("order");
        assert_eq!(cancelled.status, "cancelled");
    }
    let again = http
        .post(format!("{base}/orders/{}/cancel", orders[0].id))
        .send()
        .await
        .expect("cancel");
    assert_eq!(again.status(), StatusCode::CONFLICT, "cancelled twice");
    let unknown = http
        .post(format!("{base}/orders/{}/cancel", Uuid::now_v7()))
        .send()
        .await
        .expect("cancel");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let read_back: Order = http
        .get(format!("{base}/orders/{}", orders[1].id))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("order");
    assert_eq!(read_back, orders[1]);

    // What a consumer of the topic sees.
    let expected: BTreeMap<String, Vec<&str>> = [
        (orders[0].id, vec!["OrderCreated", "OrderCancelled"]),
        (orders[1].id, vec!["OrderCreated"]),
        (orders[2].id, vec!["OrderCreated", "OrderCancelled"]),
    ]
    .into_iter()
    .map(|(id, types)| (id.to_string(), types))
    .collect();
    let records = consume(&brokers, &topic, 5, Duration::from_secs(30)).await;

    // At least once: drop repeats by message id, as a consumer would.
    let mut seen = HashSet::new();
    let mut arrived: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for record in &records {
        assert_eq!(
            record.key,
            record.event.order_id().to_string(),
            "key is the order id"
        );
        assert_eq!(record.type_header, record.event.name(), "type header");
        if let OrderEvent::OrderCreated { customer, .. } = &record.event {
            assert_ne!(customer, "mallory", "the rejected order was published");
        }
        if seen.insert(record.id) {
            arrived
                .entry(record.key.clone())
                .or_default()
                .push(record.event.name());
        }
    }
    assert_eq!(
        arrived, expected,
        "every committed event, in per-order order"
    );
    assert_eq!(seen.len(), 5, "five distinct message ids");

    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.dead), (0, 0), "the outbox is drained");

    stop.send(()).ok();
    server
        .await
        .expect("server task")
        .expect("graceful shutdown");

    servers.clean_up(&config).await;
}

/// The service as deployed: the binary, configured by its environment, stops gracefully on
/// SIGTERM with exit status 0, and an order placed just before is published by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_publishes_and_stops_gracefully_on_sigterm() {
    let Some(servers) = Servers::reach().await else {
        return;
    };
    let config = servers.config().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_postgres-kafka"))
        .env("DATABASE_URL", &config.database_url)
        .env("KAFKA_BROKERS", &config.kafka_brokers)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("ORDERS_TABLE", &config.orders_table)
        .env("OUTBOX_TABLE", &config.outbox_table)
        .env("ORDERS_TOPIC", &config.topic)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the service starts");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let order: Order = loop {
        let placed = http
            .post(format!("{base}/orders"))
            .json(&PlaceOrder {
                customer: String::from("ada"),
                total_cents: 4200,
            })
            .send()
            .await;
        match placed {
            Ok(response) if response.status() == StatusCode::CREATED => {
                break response.json().await.expect("order");
            }
            other => {
                assert!(Instant::now() < deadline, "the service answers: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let pid = child.id().expect("running").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(25), child.wait())
        .await
        .expect("the service stops within 25 s of SIGTERM")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean exit");
    let records = consume(
        &config.kafka_brokers,
        &config.topic,
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        records.iter().any(|r| r.event.order_id() == order.id),
        "the order's event reached Kafka: {records:?}"
    );
    servers.clean_up(&config).await;
}

/// Reads `topic` from its beginning in a consumer group of its own, until `count` records came
/// and a further second passed without more (a record that should not exist would show), or
/// until `timeout`.
async fn consume(brokers: &str, topic: &str, count: usize, timeout: Duration) -> Vec<Record> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("postgres_kafka_test"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");

    let mut deadline = Instant::now() + timeout;
    let mut records = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Err(_elapsed) => break,
            Ok(Err(err)) => {
                eprintln!("consumer error (retrying): {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Ok(message)) => {
                let header = |name: &str| {
                    message.headers().and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == name)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                };
                let record = Record {
                    key: String::from_utf8(message.key().expect("a key").to_vec()).expect("UTF-8"),
                    id: header(MESSAGE_ID_HEADER)
                        .expect("the id header")
                        .parse()
                        .expect("a message id"),
                    type_header: header("type").expect("the type header"),
                    event: serde_json::from_slice(message.payload().expect("a payload"))
                        .expect("an order event"),
                };
                records.push(record);
                if records.len() == count {
                    deadline = Instant::now() + Duration::from_secs(1);
                }
            }
        }
    }
    records
}
