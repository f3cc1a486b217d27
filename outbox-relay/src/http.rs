//! `/healthz` (the process is up), `/readyz` (the relay is not paused by an outage, and the
//! store and the broker answer) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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

/// Where the program is: starting (waiting for its store), or running its relay.
#[derive(Clone)]
pub(crate) struct Phase(Arc<Mutex<Stage>>);

/// What else may be paused by an outage: the log relay, when there is one.
pub(crate) type OtherPauses = Arc<dyn Fn() -> Vec<outbox_core::Pause> + Send + Sync>;

enum Stage {
    Starting(String),
    Running(DynRelay, Option<OtherPauses>),
}

impl Phase {
    /// Starting, for `reason`.
    pub(crate) fn new(reason: &str) -> Self {
        Self(Arc::new(Mutex::new(Stage::Starting(reason.to_owned()))))
    }

    /// Still starting, now for `reason`.
    pub(crate) fn waiting(&self, reason: &str) {
        *self.lock() = Stage::Starting(reason.to_owned());
    }

    /// Running `relay`, and the log relay whose pauses `log` reports, if there is one.
    pub(crate) fn running(&self, relay: DynRelay, log: Option<OtherPauses>) {
        *self.lock() = Stage::Running(relay, log);
    }

    fn relay(&self) -> Result<(DynRelay, Option<OtherPauses>), String> {
        match &*self.lock() {
            Stage::Starting(reason) => Err(reason.clone()),
            Stage::Running(relay, log) => Ok((relay.clone(), log.clone())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stage> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Clone)]
struct Probes {
    phase: Phase,
    metrics: PrometheusHandle,
}

/// Serves the endpoints on `listener` until the task is dropped.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    phase: Phase,
    metrics: PrometheusHandle,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render))
        .with_state(Probes { phase, metrics });
    axum::serve(listener, app).await
}

/// Binds the endpoints' address, so that a busy port fails at start.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn ready(State(probes): State<Probes>) -> impl IntoResponse {
    let (relay, log) = match probes.phase.relay() {
        Ok(running) => running,
        Err(reason) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: starting: {reason}\n"),
            );
        }
    };
    let log_pauses = log.map(|pauses| pauses()).unwrap_or_default();
    let paused: Vec<String> = relay
        .pauses()
        .iter()
        .map(|pause| format!("relay {pause}"))
        .chain(log_pauses.iter().map(|pause| format!("log relay {pause}")))
        .collect();
    let store = match tokio::time::timeout(PROBE_TIMEOUT, relay.store().stats_dyn()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("store: {err}")),
        Err(_) => Err("store: no answer within 3s".to_owned()),
    };
    let broker = match tokio::time::timeout(PROBE_TIMEOUT, relay.publisher().check_dyn()).await {
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
