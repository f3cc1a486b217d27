//! `/healthz` (the process is up), `/readyz` (the relay is not paused by an outage, and the
//! store and the broker answer) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox_core::{DynPublisher, DynStore, Relay};

/// The relay the endpoints report on.
pub(crate) type DynRelay = Relay<Arc<dyn DynStore>, Arc<dyn DynPublisher>>;

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct Probes {
    relay: DynRelay,
    metrics: PrometheusHandle,
}

/// Serves the endpoints on `listener` until the task is dropped.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    relay: DynRelay,
    metrics: PrometheusHandle,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render))
        .with_state(Probes { relay, metrics });
    axum::serve(listener, app).await
}

/// Binds the endpoints' address, so that a busy port fails at start.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn ready(State(probes): State<Probes>) -> impl IntoResponse {
    let paused: Vec<String> = probes
        .relay
        .pauses()
        .iter()
        .map(|pause| format!("relay {pause}"))
        .collect();
    let store = match tokio::time::timeout(PROBE_TIMEOUT, probes.relay.store().stats_dyn()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("store: {err}")),
        Err(_) => Err("store: no answer within 3s".to_owned()),
    };
    let broker =
        match tokio::time::timeout(PROBE_TIMEOUT, probes.relay.publisher().check_dyn()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("broker: {err}")),
            Err(_) => Err("broker: no answer within 3s".to_owned()),
        };
    match (store, broker) {
        (Ok(()), Ok(())) if paused.is_empty() => (StatusCode::OK, "ready\n".to_owned()),
        (store, broker) => {
            let reasons: Vec<String> = paused
                .into_iter()
                .chain([store.err(), broker.err()].into_iter().flatten())
                .collect();
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
