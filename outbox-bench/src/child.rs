//! The relay process of the scaling and memory scenarios: `outbox-bench relay-child`.
//!
//! It joins the relays of its table and takes its share of the partitions, prints `READY`,
//! waits for `go` on standard input, then relays until it reads `stop` (or standard input
//! closes) and shuts down gracefully.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{DynPublisher, DynStore, Relay, RelayConfig};
use outbox_sqlx::{PostgresStore, StoreConfig};
use tokio::io::AsyncBufReadExt;

use crate::Res;

/// Arguments of a relay process.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct ChildArgs {
    /// PostgreSQL URL.
    #[arg(long)]
    postgres: String,
    /// Outbox table.
    #[arg(long)]
    table: String,
    /// NATS URL.
    #[arg(long)]
    nats: String,
    /// Relay batch size.
    #[arg(long)]
    batch_size: usize,
    /// Batches in flight.
    #[arg(long)]
    concurrency: usize,
    /// Partition lease, in milliseconds (short, so that relays share the partitions fast).
    #[arg(long, default_value_t = 1500)]
    partition_lease_ms: u64,
}

pub(crate) async fn run(args: ChildArgs) -> Res<()> {
    let store = PostgresStore::connect(
        StoreConfig::new()
            .url(args.postgres.as_str())
            .table(args.table.as_str())
            .max_connections(u32::try_from(args.concurrency)? + 4),
    )
    .await?;
    let publisher =
        outbox_nats::NatsPublisher::connect(outbox_nats::NatsConfig::new(args.nats.as_str()))
            .await?;
    let store: Arc<dyn DynStore> = Arc::new(store);
    let publisher: Arc<dyn DynPublisher> = Arc::new(publisher);
    let config = RelayConfig::default()
        .relay_id(format!("bench-relay-{}", std::process::id()))
        .batch_size(args.batch_size)
        .concurrency(args.concurrency)
        .partition_lease(Duration::from_millis(args.partition_lease_ms));
    let relay = Relay::builder(store, publisher).config(config).build()?;

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    // Join and take partitions until told to go.
    relay.rebalance().await?;
    println!("READY");
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(line) if line.trim() == "go" => break,
                Some(_) => {}
                None => return Ok(()),
            },
            _ = tick.tick() => {
                relay.rebalance().await?;
            }
        }
    }
    relay
        .run(async move {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) if line.trim() == "stop" => return,
                    Ok(Some(_)) => {}
                    _ => return,
                }
            }
        })
        .await?;
    Ok(())
}
