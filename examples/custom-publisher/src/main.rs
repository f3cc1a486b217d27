//! Demo: an in-memory outbox relayed to a webhook by the custom publisher.

use std::time::Duration;

use custom_publisher::WebhookPublisher;
use custom_publisher::receiver::Receiver;
use outbox::{MemoryStore, NewMessage, Relay};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let receiver = Receiver::start(1 << 20).await?;
    receiver.accept("orders");
    let store = MemoryStore::new();
    // Connected: fails here if the webhook cannot be reached.
    let publisher = WebhookPublisher::connect(format!("http://{}", receiver.addr)).await?;
    // The relay, in a task of its own, until it is told to stop.
    let relay = Relay::builder(store.clone(), publisher)
        .build()?
        .spawn(std::future::pending());

    let mut tx = store.begin();
    for id in 1..=3 {
        tx.enqueue(
            NewMessage::json("orders", &format!("order {id} created"))?.key(format!("order-{id}")),
        )?;
    }
    tx.commit();
    relay.wake();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while receiver.deliveries("orders").len() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for delivery in receiver.deliveries("orders") {
        println!(
            "webhook got {} (key {}): {}",
            delivery.id,
            delivery.key.as_deref().unwrap_or("-"),
            String::from_utf8_lossy(&delivery.payload)
        );
    }
    // Graceful shutdown: the handle completes with the relay's result.
    relay.shutdown();
    relay.await?;
    Ok(())
}
