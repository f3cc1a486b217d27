//! A scripted run of the inventory service: receives and reserves stock (one reservation is
//! refused), lets the embedded relay publish the events, then reads them back from the stream.
//! The SQLite database lives in a temporary directory; other settings come from the
//! environment (see the README).

use std::time::Duration;

use outbox::nats::async_nats::{self, jetstream};
use sqlite_nats::{Config, Inventory};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    // A database of our own, removed at exit.
    let dir = tempfile::tempdir()?;
    let config = Config::from_env(dir.path().join("inventory.db"));
    let inventory = Inventory::start(&config).await?;

    // Where the stream stands before this run, to read back this run's events only.
    let client = async_nats::connect(&config.nats_url).await?;
    let stream = jetstream::new(client).get_stream(&config.stream).await?;
    let before = stream.get_info().await?.state.last_sequence;

    let available = inventory.receive("sku-lamp", 5).await?;
    println!("sku-lamp: 5 received, {available} available");
    let available = inventory.receive("sku-desk", 2).await?;
    println!("sku-desk: 2 received, {available} available");
    inventory.reserve("sku-lamp", 3, "order-1").await?;
    println!("sku-lamp: 3 reserved for order-1");
    match inventory.reserve("sku-lamp", 4, "order-2").await {
        Err(err) if err.is_rejection() => {
            println!("sku-lamp: 4 for order-2 refused ({err}): rolled back, nothing enqueued")
        }
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }
    inventory.reserve("sku-desk", 2, "order-3").await?;
    println!("sku-desk: 2 reserved for order-3, none left");

    let published = inventory
        .wait_until_published(Duration::from_secs(30))
        .await?;
    // Stops the relay gracefully; fails with the relay's error if it stopped on one.
    inventory.shutdown().await?;
    if !published {
        return Err("the relay did not publish every event within 30 s".into());
    }

    // A reader of the stream: every event with its Nats-Msg-Id (the id the stream deduplicates
    // by) and its key.
    let last = stream.get_info().await?.state.last_sequence;
    println!("stream {}:", config.stream);
    for sequence in before + 1..=last {
        let message = stream.get_raw_message(sequence).await?;
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
                .unwrap_or_default()
        };
        println!(
            "  {:<26} Nats-Msg-Id={} key={} {}",
            message.subject.as_str(),
            header("Nats-Msg-Id"),
            header("Outbox-Key"),
            String::from_utf8_lossy(&message.payload)
        );
    }
    Ok(())
}
