//! A publisher written by a user against [`outbox::Publisher`]: it delivers each message
//! as an HTTP `POST` to a webhook, and it is checked with the same `outbox-testkit` suite as the
//! workspace's own publishers (see `tests/conformance.rs`).
//!
//! Mapping: `POST {base_url}/{destination}` with the payload as body, the message id in
//! `Outbox-Message-Id`, the key in `Outbox-Key`, and each user header as `Outbox-Header-{name}`.
//! A 2xx answer means published; 408, 429, 5xx and connection failures are transient; any
//! other answer (400, 404, 413, ...) is permanent.
//!
//! Its constructors follow the workspace's publishers: [`WebhookPublisher::new`] is lazy (the
//! first publish reaches the webhook), [`WebhookPublisher::connect`] eager (it fails when the
//! webhook cannot be reached).

use std::time::Duration;

use futures::StreamExt;
use outbox::{Message, PublishError, PublishOutcome, Publisher};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// Header carrying the message id.
pub const ID_HEADER: &str = "outbox-message-id";
/// Header carrying the ordering key.
pub const KEY_HEADER: &str = "outbox-key";
/// Prefix of the headers carrying the message's own headers.
pub const HEADER_PREFIX: &str = "outbox-header-";

/// Delivers outbox messages to a webhook.
#[derive(Clone, Debug)]
pub struct WebhookPublisher {
    client: reqwest::Client,
    base_url: String,
    in_flight: usize,
}

impl WebhookPublisher {
    /// A publisher posting to `base_url` (for example `http://127.0.0.1:8080/events`), with at
    /// most 32 requests in flight and a 10 s timeout per request. Sends nothing yet: the first
    /// publish or [`Publisher::check`] does. (Async, as every publisher's constructor is, though
    /// this one does not wait for anything.)
    pub async fn new(base_url: impl Into<String>) -> Result<Self, PublishError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|err| {
                PublishError::permanent("cannot build the HTTP client").with_source(err)
            })?;
        Ok(Self {
            client,
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            in_flight: 32,
        })
    }

    /// A publisher posting to `base_url`, checked: fails when the webhook cannot be reached, so
    /// that a wrong address shows at start rather than in the relay's retries.
    pub async fn connect(base_url: impl Into<String>) -> Result<Self, PublishError> {
        let publisher = Self::new(base_url).await?;
        publisher.check().await?;
        Ok(publisher)
    }

    fn headers(msg: &Message) -> Result<HeaderMap, PublishError> {
        let mut headers = HeaderMap::new();
        let value = |v: &str| {
            HeaderValue::from_bytes(v.as_bytes()).map_err(|_| {
                PublishError::permanent(format!("header value {v:?} cannot travel over HTTP"))
            })
        };
        headers.insert(ID_HEADER, value(&msg.id.to_string())?);
        if let Some(key) = &msg.key {
            headers.insert(KEY_HEADER, value(key)?);
        }
        for (name, v) in &msg.headers {
            let name = HeaderName::from_bytes(
                format!("{HEADER_PREFIX}{}", name.to_ascii_lowercase()).as_bytes(),
            )
            .map_err(|_| {
                PublishError::permanent(format!("header name {name:?} cannot travel over HTTP"))
            })?;
            headers.insert(name, value(v)?);
        }
        Ok(headers)
    }

    async fn post(&self, msg: &Message) -> PublishOutcome {
        let headers = match Self::headers(msg) {
            Ok(headers) => headers,
            Err(err) => return PublishOutcome::Failed(err),
        };
        let url = format!("{}/{}", self.base_url, msg.destination);
        let sent = self
            .client
            .post(url)
            .headers(headers)
            .body(msg.payload.clone())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => PublishOutcome::Published,
            Ok(response) => {
                let status = response.status();
                let text = format!("webhook answered {status}");
                let transient = status == StatusCode::REQUEST_TIMEOUT
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status.is_server_error();
                PublishOutcome::Failed(if transient {
                    PublishError::transient(text)
                } else {
                    PublishError::permanent(text)
                })
            }
            Err(err) => PublishOutcome::Failed(
                PublishError::transient("webhook unreachable").with_source(err),
            ),
        }
    }
}

impl Publisher for WebhookPublisher {
    async fn publish(&self, batch: &[Message]) -> Result<Vec<PublishOutcome>, PublishError> {
        // Concurrent requests, outcomes in batch order. Requests of one key may overlap, so
        // this publisher does not promise per-key order within a call: the relay sends one
        // message per key per call.
        let requests: Vec<_> = batch.iter().map(|msg| self.post(msg)).collect();
        Ok(futures::stream::iter(requests)
            .buffered(self.in_flight)
            .collect()
            .await)
    }

    async fn check(&self) -> Result<(), PublishError> {
        self.client
            .get(&self.base_url)
            .send()
            .await
            .map(|_| ())
            .map_err(|err| PublishError::transient("webhook unreachable").with_source(err))
    }
}

/// A webhook receiver for the demo and the tests: keeps what it is sent, per destination.
pub mod receiver {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::{DefaultBodyLimit, Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    /// One request as received.
    #[derive(Clone, Debug)]
    pub struct Delivery {
        /// The `Outbox-Message-Id` header.
        pub id: String,
        /// The `Outbox-Key` header.
        pub key: Option<String>,
        /// The `Outbox-Header-*` headers, prefix removed.
        pub headers: Vec<(String, String)>,
        /// The body.
        pub payload: Vec<u8>,
    }

    type Deliveries = Arc<Mutex<HashMap<String, Vec<Delivery>>>>;

    /// A running receiver on `127.0.0.1`. Only destinations listed in `accepted` exist (others
    /// answer 404); bodies above `max_body` bytes answer 413.
    #[derive(Clone, Debug)]
    pub struct Receiver {
        /// Where it listens.
        pub addr: SocketAddr,
        deliveries: Deliveries,
        accepted: Arc<Mutex<Vec<String>>>,
    }

    impl Receiver {
        /// Starts a receiver on a free port.
        pub async fn start(max_body: usize) -> std::io::Result<Self> {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let receiver = Self {
                addr,
                deliveries: Arc::default(),
                accepted: Arc::default(),
            };
            let app = Router::new()
                .route("/", axum::routing::get(|| async { "webhook receiver\n" }))
                .route("/{destination}", post(receive))
                .layer(DefaultBodyLimit::max(max_body))
                .with_state(receiver.clone());
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            Ok(receiver)
        }

        /// Makes `destination` exist.
        pub fn accept(&self, destination: &str) {
            self.accepted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(destination.to_owned());
        }

        /// What `destination` received so far, in arrival order.
        pub fn deliveries(&self, destination: &str) -> Vec<Delivery> {
            self.deliveries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(destination)
                .cloned()
                .unwrap_or_default()
        }
    }

    async fn receive(
        State(receiver): State<Receiver>,
        Path(destination): Path<String>,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let known = receiver
            .accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&destination);
        if !known {
            return StatusCode::NOT_FOUND;
        }
        let text = |v: &axum::http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        let Some(id) = headers.get(super::ID_HEADER).map(text) else {
            return StatusCode::BAD_REQUEST;
        };
        let delivery = Delivery {
            id,
            key: headers.get(super::KEY_HEADER).map(text),
            headers: headers
                .iter()
                .filter_map(|(name, value)| {
                    name.as_str()
                        .strip_prefix(super::HEADER_PREFIX)
                        .map(|n| (n.to_owned(), text(value)))
                })
                .collect(),
            payload: body.to_vec(),
        };
        receiver
            .deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(destination)
            .or_default()
            .push(delivery);
        StatusCode::NO_CONTENT
    }
}
