//! Runs the order service until Ctrl-C. Settings come from the environment; see the README.

use postgres_kafka::{Config, OrderService};
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
        "order service listening; Ctrl-C stops it"
    );
    service
        .serve(listener, async {
            if let Err(err) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %err, "cannot listen for Ctrl-C; stopping");
            }
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}
