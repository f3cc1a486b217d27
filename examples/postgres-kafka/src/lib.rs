//! An HTTP order service on PostgreSQL that announces its orders on Kafka through a
//! transactional outbox.
//!
//! - `POST /orders` inserts an order and enqueues its `OrderCreated` event in one transaction.
//! - `POST /orders/{id}/cancel` marks it cancelled and enqueues `OrderCancelled`, in one
//!   transaction too.
//! - `GET /orders/{id}` reads it back.
//!
//! The relay runs in the same process ([`OrderService::serve`]) and publishes the committed
//! events to a Kafka topic, keyed by order id, so that the events of one order keep their order.
//! A rejected request writes nothing: an order that fails validation is refused before its
//! transaction begins, and a cancel that is not allowed returns from inside its transaction,
//! which is dropped, hence rolled back.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox::sqlx::{self, PgPool};
use outbox::{
    ConfigError, KafkaConfig, KafkaError, KafkaPublisher, NewMessage, PostgresStore, Relay,
    RelayError, StoreConfig, StoreError, Wakeup,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use uuid::Uuid;

/// The outbox destination of order events; [`Config::topic`] names its Kafka topic.
pub const ORDER_EVENTS: &str = "order-events";

/// Settings of the service. [`Config::from_env`] reads them from the environment, with
/// defaults for servers on loopback.
///
/// No `Debug`: the URLs may hold passwords.
#[derive(Clone)]
pub struct Config {
    /// PostgreSQL URL (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
    pub database_url: String,
    /// Kafka bootstrap brokers (`KAFKA_BROKERS`, default `127.0.0.1:9092`).
    pub kafka_brokers: String,
    /// Address the HTTP server listens on (`LISTEN_ADDR`, default `127.0.0.1:3000`).
    pub listen: SocketAddr,
    /// The service's own table (`ORDERS_TABLE`, default `orders`).
    pub orders_table: String,
    /// The outbox table, next to it (`OUTBOX_TABLE`, default `outbox`).
    pub outbox_table: String,
    /// The Kafka topic of order events (`ORDERS_TOPIC`, default `orders`); it must exist.
    pub topic: String,
}

impl Config {
    /// Reads the settings from the environment; unset variables take their defaults.
    pub fn from_env() -> Result<Self, Error> {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|value| !value.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        let listen = var("LISTEN_ADDR", "127.0.0.1:3000");
        Ok(Self {
            database_url: var("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
            kafka_brokers: var("KAFKA_BROKERS", "127.0.0.1:9092"),
            listen: listen
                .parse()
                .map_err(|_| Error::Config(format!("LISTEN_ADDR {listen:?} is not host:port")))?,
            orders_table: var("ORDERS_TABLE", "orders"),
            outbox_table: var("OUTBOX_TABLE", "outbox"),
            topic: var("ORDERS_TOPIC", "orders"),
        })
    }
}

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The outbox store failed.
    #[error("outbox: {0}")]
    Outbox(#[from] StoreError),
    /// The Kafka publisher could not be created, the cluster is unreachable or the topic is
    /// missing.
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The relay configuration is invalid.
    #[error("relay configuration: {0}")]
    RelayConfig(#[from] ConfigError),
    /// The relay stopped on a permanent failure.
    #[error("relay: {0}")]
    Relay(#[from] RelayError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// An order, as stored and as the API returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Order id, a UUID v7.
    pub id: Uuid,
    /// Who ordered.
    pub customer: String,
    /// Amount in cents.
    pub total_cents: i64,
    /// `created` or `cancelled`.
    pub status: String,
}

/// The body of `POST /orders`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlaceOrder {
    /// Who orders; must not be blank.
    pub customer: String,
    /// Amount in cents; must be positive.
    pub total_cents: i64,
}

/// An event of the order topic. Its JSON carries a `type` field, which is also the `type`
/// header of the Kafka record; the record key is the order id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum OrderEvent {
    /// An order was placed.
    OrderCreated {
        /// The order.
        order_id: Uuid,
        /// Who ordered.
        customer: String,
        /// Amount in cents.
        total_cents: i64,
    },
    /// An order was cancelled.
    OrderCancelled {
        /// The order.
        order_id: Uuid,
    },
}

impl OrderEvent {
    /// The order the event is about: the record key.
    pub fn order_id(&self) -> Uuid {
        match self {
            Self::OrderCreated { order_id, .. } | Self::OrderCancelled { order_id } => *order_id,
        }
    }

    /// The event type, as in the `type` field and header.
    pub fn name(&self) -> &'static str {
        match self {
            Self::OrderCreated { .. } => "OrderCreated",
            Self::OrderCancelled { .. } => "OrderCancelled",
        }
    }

    /// The outbox message: keyed by order id, so that the events of one order are published
    /// in the order they were committed.
    fn message(&self) -> Result<NewMessage, serde_json::Error> {
        Ok(NewMessage::json(ORDER_EVENTS, self)?
            .key(self.order_id().to_string())
            .header("type", self.name()))
    }
}

/// The statements on the orders table, whose name comes from the configuration.
struct Statements {
    insert: String,
    lock: String,
    cancel: String,
    select: String,
}

impl Statements {
    fn new(table: &str) -> Self {
        Self {
            insert: format!(
                "INSERT INTO {table} (id, customer, total_cents, status) \
                 VALUES ($1, $2, $3, 'created')"
            ),
            lock: format!("SELECT status FROM {table} WHERE id = $1 FOR UPDATE"),
            cancel: format!("UPDATE {table} SET status = 'cancelled' WHERE id = $1"),
            select: format!("SELECT id, customer, total_cents, status FROM {table} WHERE id = $1"),
        }
    }
}

#[derive(Clone)]
struct AppState {
    pool: PgPool,
    store: PostgresStore,
    wakeup: Wakeup,
    sql: Arc<Statements>,
}

/// The order service: its HTTP API and the relay that publishes its events.
pub struct OrderService {
    state: AppState,
    relay: Relay<PostgresStore, KafkaPublisher>,
}

impl OrderService {
    /// Connects to PostgreSQL, creates the outbox and orders tables if missing, and checks that
    /// Kafka is reachable and the topic exists.
    pub async fn connect(config: &Config) -> Result<Self, Error> {
        let orders = identifier(&config.orders_table)?;
        let pool = PgPool::connect(&config.database_url).await?;

        // The outbox lives in the service's database, next to the orders.
        let store =
            PostgresStore::new(pool.clone(), StoreConfig::new().table(&config.outbox_table))?;
        store.migrate().await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {orders} (
                id uuid PRIMARY KEY,
                customer text NOT NULL,
                total_cents bigint NOT NULL CHECK (total_cents > 0),
                status text NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now()
            )"
        ))
        .execute(&pool)
        .await?;

        // Connected now: fails at start, rather than at the first event, when Kafka is
        // unreachable or the topic was not created.
        let publisher = KafkaPublisher::connect(
            KafkaConfig::new(&config.kafka_brokers).topic(ORDER_EVENTS, &config.topic),
        )
        .await?;
        let relay = Relay::builder(store.clone(), publisher).build()?;

        Ok(Self {
            state: AppState {
                pool,
                store,
                wakeup: relay.wakeup(),
                sql: Arc::new(Statements::new(orders)),
            },
            relay,
        })
    }

    /// The HTTP API.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/orders", post(place_order))
            .route("/orders/{id}", get(order))
            .route("/orders/{id}/cancel", post(cancel_order))
            .with_state(self.state.clone())
    }

    /// The relay (its store, for example to read the outbox's stats).
    pub fn relay(&self) -> &Relay<PostgresStore, KafkaPublisher> {
        &self.relay
    }

    /// Serves the API on `listener` with the relay running beside it, until `shutdown`
    /// completes. Then it stops accepting connections, lets requests in progress finish, and
    /// stops the relay gracefully (it publishes or hands back what it holds).
    ///
    /// Returns early with an error if the relay stops on a permanent failure, such as a
    /// dropped outbox table.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let router = self.router();
        let mut relay = self.relay.spawn(std::future::pending());
        let server = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .into_future();
        tokio::select! {
            served = server => {
                // No request is in progress any more: nothing new can be enqueued.
                relay.shutdown();
                let relayed = relay.await;
                served?;
                relayed?;
                Ok(())
            }
            relayed = &mut relay => {
                // Only a permanent store failure ends the relay early; stop serving rather than
                // take orders whose events nobody publishes.
                relayed?;
                Ok(())
            }
        }
    }
}

/// Completes on SIGTERM (what Kubernetes and systemd send) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: shutting down"),
                }
                return;
            }
            Err(err) => tracing::error!(error = %err, "cannot watch SIGTERM; Ctrl-C only"),
        }
    }
    if let Err(err) = tokio::signal::ctrl_c().await {
        tracing::error!(error = %err, "cannot listen for Ctrl-C; stopping");
    }
}

/// Accepts plain SQL identifiers only, since the table name is written into statements.
fn identifier(name: &str) -> Result<&str, Error> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63;
    if valid {
        Ok(name)
    } else {
        Err(Error::Config(format!(
            "table name {name:?} is not a plain identifier"
        )))
    }
}

/// `POST /orders`: the order row and its `OrderCreated` event commit together.
async fn place_order(
    State(app): State<AppState>,
    Json(request): Json<PlaceOrder>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    let customer = request.customer.trim();
    if customer.is_empty() {
        return Err(ApiError::Invalid("customer must not be blank"));
    }
    if request.total_cents <= 0 {
        return Err(ApiError::Invalid("total_cents must be positive"));
    }
    let order = Order {
        id: Uuid::now_v7(),
        customer: customer.to_owned(),
        total_cents: request.total_cents,
        status: String::from("created"),
    };
    let event = OrderEvent::OrderCreated {
        order_id: order.id,
        customer: order.customer.clone(),
        total_cents: order.total_cents,
    };

    let mut tx = app.pool.begin().await?;
    sqlx::query(&app.sql.insert)
        .bind(order.id)
        .bind(&order.customer)
        .bind(order.total_cents)
        .execute(&mut *tx)
        .await?;
    app.store.enqueue(&mut tx, event.message()?).await?;
    tx.commit().await?;
    // The relay listens for PostgreSQL notifications too; this saves the round trip.
    app.wakeup.wake();
    tracing::info!(order = %order.id, customer = %order.customer, "order placed");

    Ok((StatusCode::CREATED, Json(order)))
}

/// `POST /orders/{id}/cancel`: the status change and its `OrderCancelled` event commit
/// together; a refused cancel drops the transaction, which rolls back.
async fn cancel_order(
    State(app): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<Order>, ApiError> {
    let mut tx = app.pool.begin().await?;
    let status: Option<String> = sqlx::query_scalar(&app.sql.lock)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    match status.as_deref() {
        None => return Err(ApiError::NotFound),
        Some("cancelled") => return Err(ApiError::Conflict("the order is already cancelled")),
        Some(_) => {}
    }
    sqlx::query(&app.sql.cancel)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let event = OrderEvent::OrderCancelled { order_id: id };
    app.store.enqueue(&mut tx, event.message()?).await?;
    let order = fetch(&mut tx, &app.sql.select, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    tx.commit().await?;
    app.wakeup.wake();
    tracing::info!(order = %id, "order cancelled");

    Ok(Json(order))
}

/// `GET /orders/{id}`.
async fn order(State(app): State<AppState>, Path(id): Path<Uuid>) -> Result<Json<Order>, ApiError> {
    let mut conn = app.pool.acquire().await?;
    fetch(&mut conn, &app.sql.select, id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound)
}

async fn fetch(
    conn: &mut sqlx::PgConnection,
    select: &str,
    id: Uuid,
) -> Result<Option<Order>, sqlx::Error> {
    let row: Option<(Uuid, String, i64, String)> =
        sqlx::query_as(select).bind(id).fetch_optional(conn).await?;
    Ok(row.map(|(id, customer, total_cents, status)| Order {
        id,
        customer,
        total_cents,
        status,
    }))
}

/// What a request can come to besides success; each maps to a status code and a JSON body
/// `{"error": "..."}`.
#[derive(Debug)]
enum ApiError {
    Invalid(&'static str),
    NotFound,
    Conflict(&'static str),
    Internal(String),
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        Self::Internal(format!("database: {err}"))
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        Self::Internal(format!("outbox: {err}"))
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(err: serde_json::Error) -> Self {
        Self::Internal(format!("event encoding: {err}"))
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            Self::Invalid(message) => (StatusCode::UNPROCESSABLE_ENTITY, *message),
            Self::NotFound => (StatusCode::NOT_FOUND, "no such order"),
            Self::Conflict(message) => (StatusCode::CONFLICT, *message),
            Self::Internal(detail) => {
                // The detail goes to the log, not to the client.
                tracing::error!(error = %detail, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        };
        (status, Json(ErrorBody { error: message })).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(identifier("orders").is_ok());
        assert!(identifier("shop_orders_2").is_ok());
        for bad in [
            "",
            "1orders",
            "orders; DROP TABLE x",
            "a.b",
            "a\"b",
            "ordérs",
        ] {
            assert!(identifier(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn events_say_their_type_in_the_payload_and_the_header() -> Result<(), serde_json::Error> {
        let order_id = Uuid::now_v7();
        let event = OrderEvent::OrderCancelled { order_id };
        let message = event.message()?;
        assert_eq!(message.ordering_key(), Some(order_id.to_string().as_str()));
        assert_eq!(
            message.headers().get("type").map(String::as_str),
            Some("OrderCancelled")
        );
        let decoded: OrderEvent = serde_json::from_slice(message.payload())?;
        assert_eq!(decoded, event);
        Ok(())
    }
}
