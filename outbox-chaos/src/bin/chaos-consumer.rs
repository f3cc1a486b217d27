//! A consumer service for the exactly-once tests: it reads the outbox's messages from NATS
//! JetStream or RabbitMQ and applies each one's effect (a per-message counter in the effects
//! table) through an inbox, in one database transaction, then acknowledges the message.
//!
//! It is killed with SIGKILL at any moment, and aborts by itself right after a commit before
//! the acknowledgement (`--crash-after N`): the broker redelivers, and the inbox must drop the
//! duplicate. Duplicates dropped are counted in the duplicates table, in the same transaction.
//!
//! Usage: `chaos-consumer <nats|amqp> <broker url> <stream or queue> <postgres|mysql url>
//! <inbox table> <effects table> <crash after N commits, 0 for never>`

use std::time::Duration;

use futures::StreamExt;
use outbox_core::{Incoming, Processed};
use outbox_nats::async_nats;
use outbox_sqlx::sqlx::{self, MySqlConnection, PgConnection};
use outbox_sqlx::{MySqlInbox, PostgresInbox};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The consumer name in the inbox.
const CONSUMER: &str = "chaos-consumer";

/// The consumer's database and inbox.
enum Db {
    Postgres(sqlx::PgPool, PostgresInbox),
    MySql(sqlx::MySqlPool, MySqlInbox),
}

struct Consumer {
    db: Db,
    effects: String,
    duplicates: String,
    crash_after: u64,
    committed: u64,
}

impl Consumer {
    /// Applies `incoming` once: the effect (or, for a duplicate, the count of duplicates) in
    /// one transaction, committed before the caller acknowledges the message.
    async fn handle(&mut self, incoming: &Incoming) -> Result<(), BoxError> {
        let id = incoming.id.to_string();
        let (effect, duplicate) = (&self.effects, &self.duplicates);
        // The effect, upserted by `$effect_sql`, through the inbox, in one transaction of
        // `$pool` (connections `$conn`); a duplicate counted instead.
        macro_rules! apply_once {
            ($pool:expr, $inbox:expr, $conn:ty, $effect_sql:expr) => {{
                let mut tx = $pool.begin().await?;
                let processed = $inbox
                    .process(&mut tx, CONSUMER, incoming, async |tx: &mut $conn| {
                        sqlx::query(&$effect_sql)
                            .bind(&id)
                            .execute(&mut *tx)
                            .await?;
                        Ok::<_, BoxError>(())
                    })
                    .await?;
                if processed == Processed::Duplicate {
                    sqlx::query(&format!("UPDATE {duplicate} SET n = n + 1"))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }};
        }
        match &self.db {
            Db::Postgres(pool, inbox) => apply_once!(
                pool,
                inbox,
                PgConnection,
                format!(
                    "INSERT INTO {effect} (id, applied) VALUES ($1, 1) \
                     ON CONFLICT (id) DO UPDATE SET applied = {effect}.applied + 1"
                )
            ),
            Db::MySql(pool, inbox) => apply_once!(
                pool,
                inbox,
                MySqlConnection,
                format!(
                    "INSERT INTO {effect} (id, applied) VALUES (?, 1) \
                     ON DUPLICATE KEY UPDATE applied = applied + 1"
                )
            ),
        }
        self.committed += 1;
        if self.crash_after > 0 && self.committed == self.crash_after {
            // Committed, not acknowledged: the broker must deliver the message again.
            std::process::abort();
        }
        Ok(())
    }
}

async fn nats(url: &str, stream: &str, consumer: &mut Consumer) -> Result<(), BoxError> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(stream).await?;
    // One durable consumer shared by every consumer process: a work queue, whose messages not
    // acknowledged within `ack_wait` are delivered again (to any process).
    let pull: async_nats::jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            "exactly-once",
            pull::Config {
                durable_name: Some("exactly-once".into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(1),
                ..pull::Config::default()
            },
        )
        .await?;
    let mut messages = pull.messages().await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        let incoming = outbox_nats::incoming(&message)?;
        consumer.handle(&incoming).await?;
        message.ack().await?;
    }
    Err("the message stream ended".into())
}

async fn amqp(url: &str, queue: &str, consumer: &mut Consumer) -> Result<(), BoxError> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel.basic_qos(20, BasicQosOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            "chaos-consumer".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let incoming = outbox_amqp::incoming(&delivery)?;
        consumer.handle(&incoming).await?;
        delivery.ack(BasicAckOptions::default()).await?;
    }
    Err("the delivery stream ended".into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [
        broker,
        broker_url,
        source,
        db_url,
        inbox_table,
        effects,
        crash_after,
    ] = &args[..]
    else {
        return Err(
            "usage: chaos-consumer <nats|amqp> <broker url> <stream or queue> \
                    <database url> <inbox table> <effects table> <crash after N>"
                .into(),
        );
    };
    let db = if db_url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(db_url).await?;
        let inbox = PostgresInbox::new(pool.clone(), inbox_table)?;
        Db::Postgres(pool, inbox)
    } else {
        let pool = sqlx::MySqlPool::connect(db_url).await?;
        let inbox = MySqlInbox::new(pool.clone(), inbox_table)?;
        Db::MySql(pool, inbox)
    };
    let mut consumer = Consumer {
        db,
        effects: effects.clone(),
        duplicates: format!("{effects}_duplicates"),
        crash_after: crash_after.parse()?,
        committed: 0,
    };
    match broker.as_str() {
        "nats" => nats(broker_url, source, &mut consumer).await,
        "amqp" => amqp(broker_url, source, &mut consumer).await,
        other => Err(format!("unknown broker {other:?}").into()),
    }
}
