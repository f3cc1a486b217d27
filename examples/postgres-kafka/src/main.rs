//! Runs the order service until SIGTERM or Ctrl-C. Settings come from the environment; see the
//! README.

use postgres_kafka::{Config, OrderService, shutdown_signal};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let config = Config::from_env()?;
    let service = OrderService::connect(&config).await?;
    let listener = TcpListener::bind(config.listen).await?;
    tracing::info!(
        addr = %listener.local_addr()?,
        topic = %config.topic,
        "order service listening; SIGTERM or Ctrl-C stops it"
    );
    service.serve(listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}
