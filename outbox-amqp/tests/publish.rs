//! The AMQP publisher against RabbitMQ: what arrives, how destinations route, what fails how.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{AmqpHarness, amqp_url};
use lapin::ExchangeKind;
use outbox_amqp::{AmqpConfig, AmqpPublisher, Routing, Unroutable};
use outbox_core::{MESSAGE_ID_HEADER, Message, NewMessage, PublishOutcome, Publisher};
use outbox_testkit::PublisherHarness;

const READ: Duration = Duration::from_secs(20);

fn stored(msg: NewMessage) -> Message {
    Message::new(msg, outbox_core::chrono::Utc::now())
}

fn permanent(outcome: &PublishOutcome) -> bool {
    matches!(outcome, PublishOutcome::Failed(err) if !err.is_transient())
}

fn transient(outcome: &PublishOutcome) -> bool {
    matches!(outcome, PublishOutcome::Failed(err) if err.is_transient())
}

#[tokio::test]
async fn messages_carry_id_key_headers_and_keep_key_order() {
    let Some(h) = AmqpHarness::start().await else {
        return;
    };
    let dest = h.destination();
    let sent: Vec<Message> = (0..300)
        .map(|i| {
            stored(
                NewMessage::new(dest.clone(), format!("payload {i}"))
                    .key(format!("k{}", i % 7))
                    .header("type", "OrderCreated")
                    .header("content-type", "text/plain")
                    .header("seq", i.to_string()),
            )
        })
        .collect();
    let outcomes = h.publisher().publish(&sent).await.expect("publish");
    assert_eq!(outcomes.len(), sent.len());
    assert!(
        outcomes.iter().all(PublishOutcome::is_published),
        "{outcomes:?}"
    );

    let got = h.read(sent.len(), READ).await;
    assert_eq!(got.len(), sent.len());
    // One channel, one queue: the consumer sees call order, hence key order.
    for (msg, received) in sent.iter().zip(&got) {
        assert_eq!(received.id, msg.id);
        assert_eq!(received.payload, msg.payload);
        assert_eq!(received.key, msg.key);
        assert_eq!(
            received.headers.get("type").map(String::as_str),
            Some("OrderCreated")
        );
        assert_eq!(received.headers.get("seq"), msg.headers.get("seq"));
        // The id travels as message_id (checked as the delivery is read) and in its header,
        // which `outbox_amqp::incoming` leaves out of the message's own headers.
        assert_eq!(received.headers.get(MESSAGE_ID_HEADER), None);
    }
    h.teardown().await;
}

#[tokio::test]
async fn deliveries_are_persistent_with_message_id_and_content_type() {
    let Some(h) = AmqpHarness::start().await else {
        return;
    };
    let msg = stored(
        NewMessage::new(h.destination(), r#"{"a":1}"#)
            .header("content-type", "application/json")
            .key("order-9"),
    );
    let outcomes = h
        .publisher()
        .publish(std::slice::from_ref(&msg))
        .await
        .expect("publish");
    assert!(outcomes[0].is_published());
    let got = h.read_raw(1, READ).await;
    let properties = &got[0].properties;
    assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned()),
        Some(msg.id.to_string())
    );
    assert_eq!(
        properties.content_type().as_ref().map(|t| t.as_str()),
        Some("application/json")
    );
    assert_eq!(
        *properties.timestamp(),
        Some(msg.created_at.timestamp() as u64)
    );
    assert_eq!(
        got[0].routing_key.as_str(),
        "order-9",
        "the key is the routing key"
    );
    h.teardown().await;
}

#[tokio::test]
async fn split_routing_uses_the_part_after_the_slash_as_routing_key() {
    let Some(h) = AmqpHarness::build(ExchangeKind::Direct, "orders.created", |c| c).await else {
        return;
    };
    let routed = stored(NewMessage::new(
        format!("{}/orders.created", h.exchange),
        "routed",
    ));
    let unrouted = stored(NewMessage::new(
        format!("{}/orders.deleted", h.exchange),
        "nowhere",
    ));
    // Without a slash the key is the routing key.
    let by_key = stored(NewMessage::new(h.exchange.clone(), "by key").key("orders.created"));
    let batch = [routed.clone(), unrouted.clone(), by_key.clone()];
    let outcomes = h.publisher().publish(&batch).await.expect("publish");
    assert!(outcomes[0].is_published(), "{:?}", outcomes[0]);
    assert!(
        permanent(&outcomes[1]),
        "unroutable is permanent: {:?}",
        outcomes[1]
    );
    assert!(outcomes[2].is_published(), "{:?}", outcomes[2]);
    let got = h.read(2, READ).await;
    let ids: Vec<_> = got.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![routed.id, by_key.id]);
    h.teardown().await;
}

#[tokio::test]
async fn queue_routing_publishes_through_the_default_exchange() {
    let Some(h) = AmqpHarness::with(ExchangeKind::Fanout, |c| c.routing(Routing::Queue)).await
    else {
        return;
    };
    let direct = stored(NewMessage::new(h.queue.clone(), "to the queue").key("k"));
    let missing = stored(NewMessage::new(
        format!("{}_none", h.queue),
        "no such queue",
    ));
    let outcomes = h
        .publisher()
        .publish(&[direct.clone(), missing])
        .await
        .expect("publish");
    assert!(outcomes[0].is_published(), "{:?}", outcomes[0]);
    assert!(permanent(&outcomes[1]), "{:?}", outcomes[1]);
    let got = h.read(1, READ).await;
    assert_eq!(got[0].id, direct.id);
    assert_eq!(got[0].key.as_deref(), Some("k"));
    h.teardown().await;
}

#[tokio::test]
async fn unroutable_messages_follow_the_configured_policy() {
    for (policy, check) in [
        (Unroutable::Retry, transient as fn(&PublishOutcome) -> bool),
        (
            Unroutable::Ignore,
            PublishOutcome::is_published as fn(&PublishOutcome) -> bool,
        ),
    ] {
        let Some(h) =
            AmqpHarness::build(ExchangeKind::Direct, "bound", |c| c.unroutable(policy)).await
        else {
            return;
        };
        let batch = [
            stored(NewMessage::new(format!("{}/bound", h.exchange), "a")),
            stored(NewMessage::new(format!("{}/unbound", h.exchange), "b")),
            stored(NewMessage::new(format!("{}/bound", h.exchange), "c")),
        ];
        let outcomes = h.publisher().publish(&batch).await.expect("publish");
        assert!(
            outcomes[0].is_published() && outcomes[2].is_published(),
            "{outcomes:?}"
        );
        assert!(check(&outcomes[1]), "{policy:?}: {:?}", outcomes[1]);
        let got = h.read(2, READ).await;
        assert_eq!(got.len(), 2);
        h.teardown().await;
    }
}

#[tokio::test]
async fn a_missing_exchange_fails_its_messages_only() {
    let Some(h) = AmqpHarness::start().await else {
        return;
    };
    let missing = h.invalid_destination().expect("a missing exchange");
    let batch: Vec<Message> = (0..20)
        .map(|i| {
            let dest = if i % 5 == 2 {
                missing.clone()
            } else {
                h.destination()
            };
            stored(NewMessage::new(dest, format!("{i}")))
        })
        .collect();
    for round in 0..2 {
        // The second round finds the missing exchange already known to be missing.
        let outcomes = h.publisher().publish(&batch).await.expect("publish");
        for (i, outcome) in outcomes.iter().enumerate() {
            if i % 5 == 2 {
                assert!(permanent(outcome), "round {round}, #{i}: {outcome:?}");
            } else {
                assert!(outcome.is_published(), "round {round}, #{i}: {outcome:?}");
            }
        }
    }
    let got = h.read(32, READ).await;
    assert_eq!(got.len(), 32);
    h.teardown().await;
}

#[tokio::test]
async fn an_exchange_deleted_after_its_check_fails_permanently_not_the_others() {
    let Some(h) = AmqpHarness::start().await else {
        return;
    };
    let doomed = AmqpHarness::start().await.expect("second harness");
    let publisher = h.publisher();
    let first = [stored(NewMessage::new(doomed.destination(), "checked"))];
    assert!(publisher.publish(&first).await.expect("publish")[0].is_published());
    let doomed_exchange = doomed.destination();
    doomed.teardown().await;

    // The exchange is still trusted from its check: the broker closes the channel over it.
    let batch = [
        stored(NewMessage::new(h.destination(), "before")),
        stored(NewMessage::new(doomed_exchange.clone(), "gone")),
        stored(NewMessage::new(h.destination(), "after")),
    ];
    let outcomes = publisher.publish(&batch).await.expect("publish");
    assert!(permanent(&outcomes[1]), "{:?}", outcomes[1]);
    for i in [0, 2] {
        assert!(
            outcomes[i].is_published() || transient(&outcomes[i]),
            "#{i}: {:?}",
            outcomes[i]
        );
    }
    // The next call works on a new channel, and the exchange is checked again.
    let outcomes = publisher.publish(&batch).await.expect("publish");
    assert!(
        outcomes[0].is_published() && outcomes[2].is_published(),
        "{outcomes:?}"
    );
    assert!(permanent(&outcomes[1]), "{:?}", outcomes[1]);
    h.teardown().await;
}

#[tokio::test]
async fn oversized_messages_fail_permanently_without_closing_the_channel() {
    let Some(h) = AmqpHarness::with(ExchangeKind::Fanout, |c| c.max_message_size(64 * 1024)).await
    else {
        return;
    };
    let batch = [
        stored(NewMessage::new(h.destination(), vec![1u8; 64 * 1024])),
        stored(NewMessage::new(h.destination(), vec![2u8; 64 * 1024 + 1])),
        stored(NewMessage::new(h.destination(), "small")),
    ];
    let outcomes = h.publisher().publish(&batch).await.expect("publish");
    assert!(outcomes[0].is_published(), "{:?}", outcomes[0]);
    assert!(permanent(&outcomes[1]), "{:?}", outcomes[1]);
    assert!(outcomes[2].is_published(), "{:?}", outcomes[2]);
    let got = h.read(2, READ).await;
    assert_eq!(got[0].payload.len(), 64 * 1024);
    assert_eq!(got[1].payload, b"small");
    h.teardown().await;
}

#[tokio::test]
async fn invalid_names_fail_permanently_before_sending() {
    let Some(h) = AmqpHarness::start().await else {
        return;
    };
    let batch = [
        stored(NewMessage::new("x".repeat(300), "long exchange")),
        stored(NewMessage::new(h.destination(), "long header").header("h".repeat(300), "v")),
        stored(NewMessage::new(h.destination(), "fine")),
    ];
    let outcomes = h.publisher().publish(&batch).await.expect("publish");
    assert!(permanent(&outcomes[0]), "{:?}", outcomes[0]);
    assert!(permanent(&outcomes[1]), "{:?}", outcomes[1]);
    assert!(outcomes[2].is_published(), "{:?}", outcomes[2]);
    h.teardown().await;
}

#[tokio::test]
async fn concurrent_calls_each_get_their_own_outcomes() {
    let Some(h) = AmqpHarness::build(ExchangeKind::Direct, "bound", |c| c).await else {
        return;
    };
    let calls: Vec<Vec<Message>> = (0..4)
        .map(|call| {
            (0..100)
                .map(|i| {
                    // Every tenth message of every call is unroutable.
                    let rk = if i % 10 == 3 { "unbound" } else { "bound" };
                    stored(NewMessage::new(
                        format!("{}/{rk}", h.exchange),
                        format!("{call}-{i}"),
                    ))
                })
                .collect()
        })
        .collect();
    let publisher = h.publisher();
    let results =
        futures::future::join_all(calls.iter().map(|batch| publisher.publish(batch))).await;
    let mut expected = HashSet::new();
    for (batch, result) in calls.iter().zip(results) {
        let outcomes = result.expect("publish");
        for (i, (msg, outcome)) in batch.iter().zip(&outcomes).enumerate() {
            if i % 10 == 3 {
                assert!(permanent(outcome), "{outcome:?}");
            } else {
                assert!(outcome.is_published(), "{outcome:?}");
                expected.insert(msg.id);
            }
        }
    }
    let got = h.read(expected.len(), READ).await;
    let ids: HashSet<_> = got.iter().map(|r| r.id).collect();
    assert_eq!(ids, expected);
    h.teardown().await;
}

#[tokio::test]
async fn check_fails_transiently_when_the_broker_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let config = AmqpConfig::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
        .connect_timeout(Duration::from_secs(2));
    let publisher = AmqpPublisher::new(config.clone()).await.expect("config");
    let err = publisher.check().await.expect_err("nothing listens");
    assert!(err.is_transient(), "{err}");
    let err = publisher
        .publish(&[stored(NewMessage::new("x", "y"))])
        .await
        .expect_err("whole call fails");
    assert!(err.is_transient(), "{err}");
    assert!(AmqpPublisher::connect(config).await.is_err());
}

#[tokio::test]
async fn refused_credentials_are_a_transient_whole_call_failure() {
    let Some(h) = AmqpHarness::start().await else {
        return;
    };
    let mut url = url::Url::parse(&amqp_url()).expect("url");
    url.set_username("outbox_nobody").expect("user");
    url.set_password(Some("wrong-secret")).expect("password");
    let config = AmqpConfig::new(url.to_string()).connect_timeout(Duration::from_secs(5));
    let publisher = AmqpPublisher::new(config).await.expect("config");
    let err = publisher
        .publish(&[stored(NewMessage::new(h.destination(), "y"))])
        .await
        .expect_err("refused");
    assert!(err.is_transient(), "{err}");
    assert!(
        !err.to_chain_string().contains("wrong-secret"),
        "{}",
        err.to_chain_string()
    );
    h.teardown().await;
}

#[tokio::test]
async fn throughput_with_pipelined_confirms() {
    let Some(h) = AmqpHarness::start().await else {
        return;
    };
    let dest = h.destination();
    let batches: Vec<Vec<Message>> = (0..20)
        .map(|_| {
            (0..500)
                .map(|i| {
                    stored(NewMessage::new(dest.clone(), vec![b'x'; 100]).key(format!("k{i}")))
                })
                .collect()
        })
        .collect();
    let publisher = h.publisher();
    publisher.check().await.expect("check");
    let started = std::time::Instant::now();
    for batch in &batches {
        let outcomes = publisher.publish(batch).await.expect("publish");
        assert!(outcomes.iter().all(PublishOutcome::is_published));
    }
    let elapsed = started.elapsed();
    let total = batches.len() * 500;
    eprintln!(
        "AMQP: {total} messages confirmed in {elapsed:?} ({:.0} msg/s, batches of 500)",
        total as f64 / elapsed.as_secs_f64()
    );
    let got = h.read(total, Duration::from_secs(60)).await;
    let mut counts: HashMap<_, usize> = HashMap::new();
    for r in &got {
        *counts.entry(r.id).or_default() += 1;
    }
    assert_eq!(counts.len(), total);
    h.teardown().await;
}
