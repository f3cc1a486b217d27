//! A scripted run of the billing service: issues invoices, records payments (one of them
//! refused), lets the embedded relay publish the events, then reads them from the queue as a
//! consumer would. Settings come from the environment; see the README.

use std::time::Duration;

use mysql_amqp::{Billing, Config};
use outbox::amqp::incoming;
use outbox::amqp::lapin::options::{BasicAckOptions, BasicGetOptions};
use outbox::amqp::lapin::{Connection, ConnectionProperties};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let config = Config::from_env();
    let billing = Billing::start(&config).await?;

    let acme = billing.issue_invoice("acme", 10_000).await?;
    println!("invoice {acme} issued to acme: 100.00");
    let globex = billing.issue_invoice("globex", 2_500).await?;
    println!("invoice {globex} issued to globex: 25.00");
    billing.record_payment(acme, 4_000).await?;
    println!("invoice {acme}: payment of 40.00 recorded");
    match billing.record_payment(acme, 9_000).await {
        Err(err) if err.is_rejection() => {
            println!(
                "invoice {acme}: payment of 90.00 refused ({err}): rolled back, nothing enqueued"
            )
        }
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }
    billing.record_payment(acme, 6_000).await?;
    println!("invoice {acme}: payment of 60.00 recorded, paid in full");

    let published = billing
        .wait_until_published(Duration::from_secs(30))
        .await?;
    // Stops the relay gracefully; fails with the relay's error if it stopped on one.
    billing.shutdown().await?;
    if !published {
        return Err("the relay did not publish every event within 30 s".into());
    }

    // A consumer of the queue: every event with its message id (the key to deduplicate by)
    // and its ordering key, as `outbox::amqp::incoming` reads them from the delivery.
    println!("queue {}:", config.queue);
    let connection = Connection::connect(&config.amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    while let Some(message) = channel
        .basic_get(config.queue.as_str().into(), BasicGetOptions::default())
        .await?
    {
        let delivery = message.delivery;
        let event = incoming(&delivery)?;
        println!(
            "  {:<16} message_id={} key={} {}",
            event.destination,
            event.id,
            event.key.as_deref().unwrap_or_default(),
            String::from_utf8_lossy(&event.payload)
        );
        delivery.ack(BasicAckOptions::default()).await?;
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}
