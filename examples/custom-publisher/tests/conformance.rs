//! The webhook publisher passes the same publisher suite as the workspace's own publishers.

use std::time::Duration;

use custom_publisher::WebhookPublisher;
use custom_publisher::receiver::Receiver;
use outbox::MessageId;
use outbox_testkit::{PublisherHarness, Received};

const MAX_BODY: usize = 64 * 1024;

struct Harness {
    receiver: Receiver,
    /// Deliveries already returned by `read`.
    cursor: std::sync::Mutex<usize>,
    publisher: WebhookPublisher,
    destination: String,
}

impl PublisherHarness for Harness {
    type Publisher = WebhookPublisher;

    fn publisher(&self) -> WebhookPublisher {
        self.publisher.clone()
    }

    fn destination(&self) -> String {
        self.destination.clone()
    }

    fn invalid_destination(&self) -> Option<String> {
        Some(format!("{}-missing", self.destination))
    }

    fn max_payload(&self) -> Option<usize> {
        Some(MAX_BODY)
    }

    async fn read(&self, count: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut cursor = self
            .cursor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .to_owned();
        loop {
            let got = self.receiver.deliveries(&self.destination);
            let fresh = got.len().saturating_sub(cursor);
            if fresh >= count || tokio::time::Instant::now() >= deadline {
                let taken: Vec<_> = got.into_iter().skip(cursor).take(count).collect();
                cursor += taken.len();
                *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = cursor;
                return taken
                    .into_iter()
                    .filter_map(|d| {
                        Some(Received {
                            id: d.id.parse::<MessageId>().ok()?,
                            key: d.key,
                            payload: d.payload,
                            headers: d.headers.into_iter().collect(),
                        })
                    })
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn teardown(self) {}
}

async fn harness() -> Option<Harness> {
    let receiver = Receiver::start(MAX_BODY).await.expect("receiver");
    let destination = outbox_testkit::env::unique_name("events");
    receiver.accept(&destination);
    let publisher = WebhookPublisher::connect(format!("http://{}", receiver.addr))
        .await
        .expect("publisher");
    Some(Harness {
        receiver,
        cursor: std::sync::Mutex::new(0),
        publisher,
        destination,
    })
}

outbox_testkit::publisher_suite!(harness);

/// As the workspace's publishers: `new` is lazy (it succeeds with nothing listening, and a
/// check then fails transiently, as a publish would); `connect` is eager and fails at once.
#[tokio::test]
async fn new_is_lazy_and_connect_is_eager() {
    // A port with nothing listening: bound, then released.
    let port = outbox_testkit::env::free_port().expect("free port");
    let url = format!("http://127.0.0.1:{port}");
    let lazy = WebhookPublisher::new(&url)
        .await
        .expect("new does not connect");
    let unreachable = outbox::Publisher::check(&lazy).await;
    assert!(
        unreachable.as_ref().is_err_and(|err| err.is_transient()),
        "{unreachable:?}"
    );
    let eager = WebhookPublisher::connect(&url).await;
    assert!(
        eager.is_err(),
        "connect fails when the webhook is unreachable"
    );
}
