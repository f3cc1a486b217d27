//! The NATS publisher against a JetStream server: what arrives, deduplication, subjects, what
//! fails how.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{NatsHarness, Options, nats_url, stored};
use outbox_core::{MESSAGE_ID_HEADER, Message, NewMessage, PublishOutcome, Publisher};
use outbox_nats::{NatsConfig, NatsPublisher, StreamSpec};
use outbox_testkit::PublisherHarness;
use outbox_testkit::env::unique_name;

const READ: Duration = Duration::from_secs(20);

fn permanent(outcome: &PublishOutcome) -> bool {
    matches!(outcome, PublishOutcome::Failed(err) if !err.is_transient())
}

#[tokio::test]
async fn messages_carry_id_key_headers_and_keep_call_order() {
    let Some(h) = NatsHarness::start().await else {
        return;
    };
    let dest = h.destination();
    let sent: Vec<Message> = (0..600)
        .map(|i| {
            stored(
                NewMessage::new(dest.clone(), format!("payload {i}"))
                    .key(format!("k{}", i % 7))
                    .header("type", "OrderCreated")
                    .header("unicode", "ünïcødé ✓")
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
    // One connection, acks pipelined: the stream stores the call's order.
    for (msg, received) in sent.iter().zip(&got) {
        assert_eq!(received.id, msg.id);
        assert_eq!(received.payload, msg.payload);
        assert_eq!(received.key, msg.key);
        for (name, value) in &msg.headers {
            assert_eq!(received.headers.get(name), Some(value), "{name}");
        }
        // Both id headers were checked as the message was read; `outbox_nats::incoming`
        // leaves them out of the message's own headers.
        assert_eq!(received.headers.get(MESSAGE_ID_HEADER), None);
    }
    h.teardown().await;
}

#[tokio::test]
async fn a_message_published_twice_is_stored_once() {
    let Some(h) = NatsHarness::start().await else {
        return;
    };
    let sent: Vec<Message> = (0..50)
        .map(|i| stored(NewMessage::new(h.destination(), format!("{i}"))))
        .collect();
    for _ in 0..3 {
        let outcomes = h.publisher().publish(&sent).await.expect("publish");
        assert!(
            outcomes.iter().all(PublishOutcome::is_published),
            "a duplicate ack counts as published: {outcomes:?}"
        );
    }
    let got = h.read(sent.len() * 3, Duration::from_secs(3)).await;
    assert_eq!(got.len(), sent.len(), "the stream dropped the duplicates");
    let info = h
        .admin
        .get_stream(&h.stream)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages;
    assert_eq!(info, 50);
    h.teardown().await;
}

#[tokio::test]
async fn a_subject_prefix_is_put_before_the_destination() {
    let Some(h) = NatsHarness::with(
        Options {
            prefixed: true,
            ..Options::default()
        },
        |c| c,
    )
    .await
    else {
        return;
    };
    assert_eq!(h.destination(), "events");
    let msg = stored(NewMessage::new("events", "prefixed").key("k"));
    let outcomes = h
        .publisher()
        .publish(std::slice::from_ref(&msg))
        .await
        .expect("publish");
    assert!(outcomes[0].is_published(), "{:?}", outcomes[0]);
    let raw = h.read_raw(1, READ).await;
    assert_eq!(raw[0].subject.as_str(), format!("{}.events", h.stream));
    h.teardown().await;
}

#[tokio::test]
async fn a_subject_without_a_stream_fails_permanently_alone() {
    let Some(h) = NatsHarness::start().await else {
        return;
    };
    let nowhere = h.invalid_destination().expect("a subject without stream");
    let batch: Vec<Message> = (0..30)
        .map(|i| {
            let dest = if i % 10 == 4 {
                nowhere.clone()
            } else {
                h.destination()
            };
            stored(NewMessage::new(dest, format!("{i}")))
        })
        .collect();
    let outcomes = h.publisher().publish(&batch).await.expect("publish");
    for (i, outcome) in outcomes.iter().enumerate() {
        if i % 10 == 4 {
            assert!(permanent(outcome), "#{i}: {outcome:?}");
            let PublishOutcome::Failed(err) = outcome else {
                unreachable!()
            };
            assert!(err.to_string().contains("no JetStream stream"), "{err}");
        } else {
            assert!(outcome.is_published(), "#{i}: {outcome:?}");
        }
    }
    assert_eq!(h.read(27, READ).await.len(), 27);
    h.teardown().await;
}

#[tokio::test]
async fn oversized_messages_fail_permanently_in_stream_and_server_limits() {
    let Some(h) = NatsHarness::start().await else {
        return;
    };
    let max = h.max_payload().expect("stream limit");
    let batch = [
        stored(NewMessage::new(h.destination(), "first")),
        // Above the stream's max_message_size: refused by the stream.
        stored(NewMessage::new(h.destination(), vec![b'x'; max + 1])),
        // Above the server's max_payload (1 MiB): refused by the client before sending.
        stored(NewMessage::new(
            h.destination(),
            vec![b'y'; 2 * 1024 * 1024],
        )),
        stored(NewMessage::new(h.destination(), "last")),
    ];
    let outcomes = h.publisher().publish(&batch).await.expect("publish");
    assert!(outcomes[0].is_published(), "{:?}", outcomes[0]);
    assert!(permanent(&outcomes[1]), "{:?}", outcomes[1]);
    assert!(permanent(&outcomes[2]), "{:?}", outcomes[2]);
    assert!(outcomes[3].is_published(), "{:?}", outcomes[3]);
    let got = h.read(4, Duration::from_secs(3)).await;
    let payloads: Vec<_> = got.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(payloads, vec![b"first".to_vec(), b"last".to_vec()]);
    h.teardown().await;
}

#[tokio::test]
async fn invalid_subjects_and_headers_fail_permanently_before_sending() {
    let Some(h) = NatsHarness::start().await else {
        return;
    };
    let batch = [
        stored(NewMessage::new(
            format!("{}.with space", h.stream),
            "bad subject",
        )),
        stored(NewMessage::new(format!("{}.*", h.stream), "wildcard")),
        stored(NewMessage::new(h.destination(), "bad header").header("na:me", "v")),
        stored(NewMessage::new(h.destination(), "bad value").header("name", "a\r\nb")),
        stored(NewMessage::new(h.destination(), "non-ASCII name").header("ñame", "v")),
        stored(NewMessage::new(h.destination(), "fine")),
    ];
    let outcomes = h.publisher().publish(&batch).await.expect("publish");
    for outcome in &outcomes[..5] {
        assert!(permanent(outcome), "{outcome:?}");
    }
    assert!(outcomes[5].is_published(), "{:?}", outcomes[5]);
    h.teardown().await;
}

#[tokio::test]
async fn an_unreachable_server_fails_transiently_and_fast() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let config =
        NatsConfig::new(format!("nats://127.0.0.1:{port}")).connect_timeout(Duration::from_secs(1));
    let publisher = NatsPublisher::new(config.clone())
        .await
        .expect("created while unreachable");
    let batch = [stored(NewMessage::new("x.y", "z"))];
    // The first call waits for the first connection, up to the connect timeout.
    let started = std::time::Instant::now();
    let err = publisher.publish(&batch).await.expect_err("not connected");
    assert!(err.is_transient(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Later calls fail at once.
    let started = std::time::Instant::now();
    let err = publisher.publish(&batch).await.expect_err("not connected");
    assert!(err.is_transient(), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "no wait: {:?}",
        started.elapsed()
    );
    assert!(
        publisher
            .check()
            .await
            .expect_err("not connected")
            .is_transient()
    );
    let err = NatsPublisher::connect(config)
        .await
        .expect_err("unreachable");
    assert!(err.is_transient(), "{err}");
}

#[tokio::test]
async fn the_configured_stream_is_created_at_first_use() {
    let url = nats_url();
    let Some(client) =
        outbox_testkit::env::or_skip("NATS", async_nats::connect(url.as_str()).await)
    else {
        return;
    };
    let admin = async_nats::jetstream::new(client);
    let name = unique_name("outbox_nats_ensure");
    let spec = StreamSpec::new(name.clone(), [format!("{name}.>")])
        .duplicate_window(Duration::from_secs(300))
        .max_message_size(4096)
        .memory(true);
    let publisher = NatsPublisher::new(NatsConfig::new(url).ensure_stream(spec.clone()))
        .await
        .expect("publisher");
    publisher.check().await.expect("check creates the stream");
    let mut stream = admin.get_stream(&name).await.expect("created");
    let info = stream.info().await.expect("info");
    assert_eq!(info.config.subjects, vec![format!("{name}.>")]);
    assert_eq!(info.config.max_message_size, 4096);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(300));
    // Ensuring again leaves the stream as it is.
    publisher
        .ensure_stream(&spec)
        .await
        .expect("exists already");
    let outcomes = publisher
        .publish(&[stored(NewMessage::new(format!("{name}.a"), "x"))])
        .await
        .expect("publish");
    assert!(outcomes[0].is_published());
    admin.delete_stream(&name).await.expect("delete");
}

#[tokio::test]
async fn throughput_with_acks_in_flight() {
    let Some(h) = NatsHarness::start().await else {
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
    let started = std::time::Instant::now();
    for batch in &batches {
        let outcomes = publisher.publish(batch).await.expect("publish");
        assert!(outcomes.iter().all(PublishOutcome::is_published));
    }
    let elapsed = started.elapsed();
    let total = batches.len() * 500;
    eprintln!(
        "NATS: {total} messages acknowledged in {elapsed:?} ({:.0} msg/s, batches of 500, 256 acks in flight)",
        total as f64 / elapsed.as_secs_f64()
    );
    let got = h.read(total, Duration::from_secs(60)).await;
    let ids: HashSet<_> = got.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), total);
    h.teardown().await;
}

/// With `pipeline_keys`, what a failure in the middle of a key's run does, as documented: a
/// failure found before sending stops the key's later messages in the call; a refusal by the
/// server after they were sent does not (the relaxation the setting accepts).
#[tokio::test]
async fn pipelined_keys_stop_at_a_failure_found_before_sending() {
    let Some(h) = NatsHarness::with(Options::default(), |config| config.pipeline_keys(true)).await
    else {
        return;
    };
    assert!(h.publisher().capabilities().ordered_per_key);
    let dest = h.destination();
    let keyed = |dest: &str, i: usize| stored(NewMessage::new(dest, format!("{i}")).key("k"));

    // An invalid subject fails before sending: the later messages of k are not sent; other
    // keys go on.
    let batch = vec![
        keyed(&dest, 0),
        keyed("not a subject", 1),
        keyed(&dest, 2),
        stored(NewMessage::new(dest.clone(), "other").key("j")),
    ];
    let outcomes = h.publisher().publish(&batch).await.expect("publish");
    assert!(outcomes[0].is_published(), "{outcomes:?}");
    assert!(permanent(&outcomes[1]), "{outcomes:?}");
    let PublishOutcome::Failed(err) = &outcomes[2] else {
        panic!("k's later message was sent after k failed: {outcomes:?}");
    };
    assert!(err.is_transient() && err.to_string().contains("earlier message of its key"));
    assert!(outcomes[3].is_published(), "{outcomes:?}");

    // A subject without a stream is refused by the server once sent: the later message of k,
    // sent before that answer came, is stored.
    let nowhere = h.invalid_destination().expect("a subject without stream");
    let batch = vec![keyed(&nowhere, 3), keyed(&dest, 4)];
    let outcomes = h.publisher().publish(&batch).await.expect("publish");
    assert!(permanent(&outcomes[0]), "{outcomes:?}");
    assert!(outcomes[1].is_published(), "{outcomes:?}");
    let got = h.read(3, READ).await;
    let payloads: Vec<&[u8]> = got.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(payloads, vec![&b"0"[..], b"other", b"4"]);
    h.teardown().await;
}
