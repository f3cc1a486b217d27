//! `/healthz` (the process is up), `/readyz` (store and broker reachable) and `/metrics`
//! (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox_core::{DynPublisher, DynStore};

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct Probes {
    store: Arc<dyn DynStore>,
    publisher: Arc<dyn DynPublisher>,
    metrics: PrometheusHandle,
}

/// Serves the endpoints on `listener` until the task is dropped.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn DynStore>,
    publisher: Arc<dyn DynPublisher>,
    metrics: PrometheusHandle,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render))
        .with_state(Probes {
            store,
            publisher,
            metrics,
        });
    axum::serve(listener, app).await
}

/// Binds the endpoints' address, so that a busy port fails at start.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn ready(State(probes): State<Probes>) -> impl IntoResponse {
    let store = match tokio::time::timeout(PROBE_TIMEOUT, probes.store.stats_dyn()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("store: {err}")),
        Err(_) => Err("store: no answer within 3s".to_owned()),
    };
    let broker = match tokio::time::timeout(PROBE_TIMEOUT, probes.publisher.check_dyn()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("broker: {err}")),
        Err(_) => Err("broker: no answer within 3s".to_owned()),
    };
    match (store, broker) {
        (Ok(()), Ok(())) => (StatusCode::OK, "ready\n".to_owned()),
        (store, broker) => {
            let reasons: Vec<String> = [store.err(), broker.err()].into_iter().flatten().collect();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", reasons.join("; ")),
            )
        }
    }
}

async fn render(State(probes): State<Probes>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        probes.metrics.render(),
    )
}
