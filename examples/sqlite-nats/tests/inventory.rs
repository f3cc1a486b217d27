//! The inventory service against a real NATS server: committed stock movements reach the
//! JetStream stream, each event with its `Nats-Msg-Id` and key, in per-SKU order; refused
//! reservations leave no change and no event.
//!
//! NATS with JetStream from `OUTBOX_TEST_NATS_URL` (default `nats://127.0.0.1:4222`); the
//! SQLite database is a file in a temporary directory. Each run uses a stream of its own and
//! deletes it at the end.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use outbox::nats::async_nats::{self, jetstream};
use outbox::{MESSAGE_ID_HEADER, MessageId, RelayError, Store, StoreErrorKind};
use outbox_testkit::env::{or_skip, service_url, unique_name};
use sqlite_nats::{Config, Error, Inventory, StockEvent};
use tokio::time::Instant;

/// What a test runs on: a JetStream context to read and delete its stream, a temporary
/// directory for the database, and a configuration with a stream and subject prefix of its
/// own. `None` to skip without a NATS server (a failure under `OUTBOX_TEST_REQUIRE=1`).
async fn setup() -> Option<(jetstream::Context, tempfile::TempDir, Config)> {
    let nats_url = service_url("OUTBOX_TEST_NATS_URL", "nats://127.0.0.1:4222");
    let client = or_skip("NATS", async_nats::connect(&nats_url).await)?;
    let dir = tempfile::tempdir().expect("temporary directory");
    let name = unique_name("inventory");
    let config = Config {
        database_path: dir.path().join("inventory.db"),
        nats_url,
        subject_prefix: name.clone(),
        stream: name,
    };
    Some((jetstream::new(client), dir, config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_stock_events_reach_the_stream_in_order_and_refused_ones_never_do() {
    let Some((admin, _dir, config)) = setup().await else {
        return;
    };
    let name = config.stream.clone();
    let inventory = Inventory::start(&config).await.expect("service starts");

    // Two SKUs received, reserved and depleted; four calls that are refused.
    inventory.receive("sku-lamp", 5).await.expect("receive");
    inventory.receive("sku-desk", 2).await.expect("receive");
    inventory
        .reserve("sku-lamp", 3, "order-1")
        .await
        .expect("reserve");
    let short = inventory.reserve("sku-lamp", 4, "order-2").await;
    assert!(
        matches!(
            short,
            Err(Error::InsufficientStock {
                available: 2,
                requested: 4,
                ..
            })
        ),
        "{short:?}"
    );
    inventory
        .reserve("sku-desk", 2, "order-3")
        .await
        .expect("reserve");
    let unknown = inventory.reserve("sku-ghost", 1, "order-2").await;
    assert!(
        matches!(unknown, Err(Error::InsufficientStock { .. })),
        "{unknown:?}"
    );
    let blank = inventory.receive("", 1).await;
    assert!(matches!(blank, Err(Error::InvalidSku)), "{blank:?}");
    let zero = inventory.reserve("sku-lamp", 0, "order-2").await;
    assert!(matches!(zero, Err(Error::InvalidQuantity(0))), "{zero:?}");
    inventory.receive("sku-lamp", 1).await.expect("receive");
    inventory
        .reserve("sku-lamp", 3, "order-4")
        .await
        .expect("reserve");

    // The refused reservations changed nothing.
    for sku in ["sku-lamp", "sku-desk", "sku-ghost"] {
        assert_eq!(inventory.available(sku).await.expect("read"), 0, "{sku}");
    }

    assert!(
        inventory
            .wait_until_published(Duration::from_secs(30))
            .await
            .expect("stats"),
        "the relay published every event"
    );
    let stats = inventory.store().stats().await.expect("stats");
    assert_eq!(stats.dead, 0, "nothing dead-lettered");
    inventory.shutdown().await.expect("graceful shutdown");

    // What the stream holds. JetStream drops a repeated Nats-Msg-Id, so it holds each event
    // once even if the relay had published one twice.
    let stream = admin.get_stream(&name).await.expect("the stream exists");
    let state = stream.get_info().await.expect("stream info").state;
    assert_eq!(state.messages, 8, "eight events stored");
    let mut ids = HashSet::new();
    let mut arrived: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for sequence in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(sequence).await.expect("message");
        let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
        let id: MessageId = header("Nats-Msg-Id")
            .expect("Nats-Msg-Id")
            .parse()
            .expect("the outbox id");
        assert_eq!(
            header(MESSAGE_ID_HEADER),
            Some(id.to_string()),
            "id headers agree"
        );
        assert!(ids.insert(id), "each id once");
        let event: StockEvent = serde_json::from_slice(&message.payload).expect("a stock event");
        assert_eq!(header("Outbox-Key").as_deref(), Some(event.sku()), "key");
        assert_eq!(
            message.subject.as_str(),
            format!("{name}.{}", event.destination()),
            "subject"
        );
        if let StockEvent::StockReserved { order, .. } = &event {
            assert_ne!(order, "order-2", "a refused reservation was published");
        }
        arrived
            .entry(event.sku().to_owned())
            .or_default()
            .push(event.destination());
    }
    let expected: BTreeMap<String, Vec<&str>> = [
        (
            "sku-lamp",
            vec![
                "stock.received",
                "stock.reserved",
                "stock.received",
                "stock.reserved",
                "stock.depleted",
            ],
        ),
        (
            "sku-desk",
            vec!["stock.received", "stock.reserved", "stock.depleted"],
        ),
    ]
    .into_iter()
    .map(|(sku, events)| (sku.to_owned(), events))
    .collect();
    assert_eq!(arrived, expected, "every committed event, in per-SKU order");

    admin.delete_stream(&name).await.expect("delete stream");
}

/// The service sees its relay stop on a permanent failure, here a dropped outbox table: the
/// relay's handle reports it, and shutdown returns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stops_on_a_permanent_failure_is_reported() {
    let Some((admin, _dir, config)) = setup().await else {
        return;
    };
    let inventory = Inventory::start(&config).await.expect("service starts");
    assert!(inventory.relay_running());

    inventory
        .store()
        .drop_tables()
        .await
        .expect("drop outbox tables");
    let deadline = Instant::now() + Duration::from_secs(30);
    while inventory.relay_running() {
        assert!(
            Instant::now() < deadline,
            "the relay stops within 30 s of its table's drop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopped = inventory.shutdown().await;
    assert!(
        matches!(
            &stopped,
            Err(Error::Relay(RelayError::Store(err))) if err.kind() == StoreErrorKind::Schema
        ),
        "the relay's failure, a missing table: {stopped:?}"
    );

    admin
        .delete_stream(&config.stream)
        .await
        .expect("delete stream");
}
