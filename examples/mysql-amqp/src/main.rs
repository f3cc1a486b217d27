//! A scripted run of the billing service: issues invoices, records payments (one of them
//! refused), lets the embedded relay publish the events, then lets the ledger consume them
//! from the queue, each once through its inbox. Settings come from the environment; see the
//! README.

use std::time::Duration;

use mysql_amqp::{Billing, Config, Ledger};

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

    // The ledger, a consumer service of the queue: each event applied once through its inbox,
    // then acknowledged.
    let pool = outbox::sqlx::MySqlPool::connect(&config.database_url).await?;
    let ledger = Ledger::start(pool, &format!("{}_ledger", config.table_prefix)).await?;
    let consuming = ledger.spawn_consumer(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (acme, globex) = (
            ledger.account("acme").await?,
            ledger.account("globex").await?,
        );
        if acme.received_cents == 10_000 && globex.invoiced_cents == 2_500 {
            println!(
                "ledger: acme invoiced {:.2}, received {:.2}; globex invoiced {:.2}, received {:.2}",
                acme.invoiced_cents as f64 / 100.0,
                acme.received_cents as f64 / 100.0,
                globex.invoiced_cents as f64 / 100.0,
                globex.received_cents as f64 / 100.0,
            );
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the ledger did not catch up within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consuming.abort();
    Ok(())
}
