//! Exactly-once effects, end to end: a producer commits events through the outbox; two relay
//! processes, killed with SIGKILL now and then, publish them; two consumer processes
//! (`chaos-consumer`) apply each event's effect through an inbox, in one transaction with the
//! inbox record, then acknowledge. The consumers are killed with SIGKILL now and then, and each
//! one also aborts by itself right after a commit, before its acknowledgement, so the broker
//! redelivers what they had committed, and their connections to the broker are cut. Every
//! event's effect must be applied exactly once:
//! none missed, none twice; the duplicates the inbox dropped are counted.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use outbox_chaos::broker::{self, Queue};
use outbox_chaos::db::{mysql_url, postgres_url};
use outbox_chaos::relays::Relays;
use outbox_core::{MessageId, NewMessage};
use outbox_sqlx::sqlx::{self, MySqlPool, PgPool};
use outbox_sqlx::{MySqlInbox, MySqlStore, PostgresInbox, PostgresStore, StoreConfig};
use outbox_testkit::env::{or_skip, unique_name};
use outbox_testkit::proxy::FaultProxy;
use tokio::process::{Child, Command};
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Events the producer commits.
const EVENTS: usize = 400;

#[derive(Clone, Copy, Debug)]
enum Pair {
    /// PostgreSQL to NATS JetStream to PostgreSQL.
    PostgresNats,
    /// MariaDB to RabbitMQ to MariaDB.
    MariaDbAmqp,
}

/// What a run counted.
#[derive(Debug, Default)]
struct Figures {
    committed: usize,
    applied: usize,
    missed: usize,
    applied_twice: usize,
    duplicates_dropped: i64,
    relay_kills: u64,
    /// Relays that exited by themselves: why.
    relay_exits: Vec<String>,
    /// Cuts of the consumers' broker connections.
    connection_cuts: u64,
    consumer_kills: u64,
    consumer_crashes: u64,
    elapsed: Duration,
}

/// The producer's outbox, on the database of the pair.
enum Outbox {
    Postgres(PostgresStore),
    MySql(MySqlStore),
}

impl Outbox {
    async fn enqueue(&self, message: NewMessage) -> Result<MessageId, BoxError> {
        Ok(match self {
            Outbox::Postgres(store) => {
                let mut tx = store.pool().begin().await?;
                let id = store.enqueue(&mut tx, message).await?;
                tx.commit().await?;
                id
            }
            Outbox::MySql(store) => {
                let mut tx = store.pool().begin().await?;
                let id = store.enqueue(&mut tx, message).await?;
                tx.commit().await?;
                id
            }
        })
    }

    async fn drop_tables(&self) {
        let _ = match self {
            Outbox::Postgres(store) => store.drop_tables().await,
            Outbox::MySql(store) => store.drop_tables().await,
        };
    }
}

/// The consumer processes: restarted when they exit, killed on cue.
struct Consumers {
    bin: String,
    args: Vec<String>,
    dir: std::path::PathBuf,
    children: Vec<Option<Child>>,
    rng: fastrand::Rng,
    kills: u64,
    crashes: u64,
    starts: u64,
}

impl Consumers {
    fn spawn(&mut self, i: usize) -> std::io::Result<Child> {
        // Each life of a consumer aborts after a number of commits of its own.
        let crash_after = self.rng.u64(15..60).to_string();
        let log =
            std::fs::File::create(self.dir.join(format!("consumer-{i}-{}.log", self.starts)))?;
        self.starts += 1;
        Command::new(&self.bin)
            .args(&self.args)
            .arg(crash_after)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
    }

    fn supervise(&mut self) -> std::io::Result<()> {
        for i in 0..self.children.len() {
            let exited = match self.children[i].as_mut() {
                Some(child) => child.try_wait()?.is_some(),
                None => true,
            };
            if exited {
                if self.children[i].is_some() {
                    self.crashes += 1;
                }
                self.children[i] = Some(self.spawn(i)?);
            }
        }
        Ok(())
    }

    async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill().await;
            self.kills += 1;
        }
    }

    async fn stop(&mut self) {
        for child in self.children.iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill().await;
        }
    }
}

/// The test's own connection to the database of the pair, to set up and read the consumer's
/// tables.
enum Check {
    Postgres(PgPool),
    MySql(MySqlPool),
}

impl Check {
    async fn execute(&self, sql: &str) -> Result<(), BoxError> {
        match self {
            Check::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(drop)?,
            Check::MySql(pool) => sqlx::query(sql).execute(pool).await.map(drop)?,
        }
        Ok(())
    }

    async fn count(&self, sql: &str) -> Result<i64, BoxError> {
        Ok(match self {
            Check::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
            Check::MySql(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
        })
    }

    async fn rows(&self, sql: &str) -> Result<Vec<(String, i64)>, BoxError> {
        Ok(match self {
            Check::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
            Check::MySql(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
        })
    }
}

/// The address of the broker of `url`.
fn broker_addr(url: &str) -> Result<SocketAddr, BoxError> {
    let url = url::Url::parse(url)?;
    let host = url.host_str().ok_or("a broker URL without host")?;
    let port = url
        .port_or_known_default()
        .ok_or("a broker URL without port")?;
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    Ok(format!("{host}:{port}").parse()?)
}

async fn run(pair: Pair, dir: &Path) -> Result<Figures, BoxError> {
    let started = Instant::now();
    let run = unique_name("once");
    let (inbox_table, effects) = (format!("{run}_inbox"), format!("{run}_effects"));
    let duplicates = format!("{effects}_duplicates");
    let db_url = match pair {
        Pair::PostgresNats => postgres_url(),
        Pair::MariaDbAmqp => mysql_url(),
    };
    // The outbox and the consumer's tables (on the same server here; the consumer only
    // knows its own tables).
    let outbox = match pair {
        Pair::PostgresNats => {
            let store = PostgresStore::connect(StoreConfig::new().url(&db_url).table(&run)).await?;
            store.migrate().await?;
            PostgresInbox::new(store.pool().clone(), &inbox_table)?
                .migrate()
                .await?;
            Outbox::Postgres(store)
        }
        Pair::MariaDbAmqp => {
            let store = MySqlStore::connect(StoreConfig::new().url(&db_url).table(&run)).await?;
            store.migrate().await?;
            MySqlInbox::new(store.pool().clone(), &inbox_table)?
                .migrate()
                .await?;
            Outbox::MySql(store)
        }
    };
    let check = match &outbox {
        Outbox::Postgres(store) => Check::Postgres(store.pool().clone()),
        Outbox::MySql(store) => Check::MySql(store.pool().clone()),
    };
    for statement in [
        format!("CREATE TABLE {effects} (id VARCHAR(64) PRIMARY KEY, applied BIGINT NOT NULL)"),
        format!("CREATE TABLE {duplicates} (n BIGINT NOT NULL)"),
        format!("INSERT INTO {duplicates} (n) VALUES (0)"),
    ] {
        check.execute(&statement).await?;
    }

    // The broker, and the relays' publisher on it.
    let (publisher, destination, broker_args, queue, proxy) = match pair {
        Pair::PostgresNats => {
            let url =
                outbox_testkit::env::service_url("OUTBOX_TEST_NATS_URL", "nats://127.0.0.1:4222");
            // The consumers reach the broker through a proxy that cuts their connections.
            let proxy = FaultProxy::start(broker_addr(&url)?).await?;
            let through = format!("nats://{}", proxy.addr());
            let stream = run.to_ascii_uppercase();
            let js = broker::jetstream(&url).await?;
            broker::create_stream(&js, &stream, &format!("{run}.>")).await?;
            let publisher = format!(
                "kind = \"nats\"\nurl = \"{url}\"\nsubject_prefix = \"{run}\"\nack_timeout = \"1s\""
            );
            (
                publisher,
                "events".to_owned(),
                vec!["nats".into(), through, stream],
                None,
                proxy,
            )
        }
        Pair::MariaDbAmqp => {
            let url = broker::amqp_url();
            let queue = Queue::declare(&url, &run).await?;
            let proxy = FaultProxy::start(broker_addr(&url)?).await?;
            let mut through = url::Url::parse(&url)?;
            through.set_host(Some("127.0.0.1"))?;
            through
                .set_port(Some(proxy.addr().port()))
                .map_err(|()| "an AMQP URL with a port")?;
            let publisher = format!("kind = \"amqp\"\nuri = \"{url}\"\nrouting = \"queue\"");
            (
                publisher,
                run.clone(),
                vec!["amqp".into(), through.to_string(), run.clone()],
                Some(queue),
                proxy,
            )
        }
    };
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{db_url}\"\ntable = \"{run}\"\nmax_connections = 7\n\n\
             [publisher]\n{publisher}\n\n\
             [relay]\nbatch_size = 50\nconcurrency = 4\nlease = \"6s\"\n\
             publish_timeout = \"2s\"\nstore_timeout = \"2s\"\npartition_lease = \"1500ms\"\n\
             poll_max = \"100ms\"\nshutdown_timeout = \"3s\"\n"
        ),
    )?;
    let mut relays = Relays::start(
        Path::new(env!("CARGO_BIN_EXE_chaos-relay")),
        &config,
        dir,
        2,
        &[],
    )?;
    let mut args = broker_args;
    args.extend([db_url.clone(), inbox_table.clone(), effects.clone()]);
    let mut consumers = Consumers {
        bin: env!("CARGO_BIN_EXE_chaos-consumer").to_owned(),
        args,
        dir: dir.to_owned(),
        children: vec![None, None],
        rng: fastrand::Rng::with_seed(outbox_chaos::seed_from_env()),
        kills: 0,
        crashes: 0,
        starts: 0,
    };
    consumers.supervise()?;

    // The producer: one event per transaction, about 100 a second, over 50 keys.
    let producer = tokio::spawn(async move {
        let mut ids = HashSet::new();
        for i in 0..EVENTS {
            let message = NewMessage::new(destination.clone(), format!("order {i}"))
                .key(format!("order-{}", i % 50));
            ids.insert(outbox.enqueue(message).await?);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok::<_, BoxError>((ids, outbox))
    });

    // Faults while the producer runs and a little after, one every 0.4 to 0.9 s: a relay or a
    // consumer killed with SIGKILL, or the consumers' broker connections cut.
    let mut rng = fastrand::Rng::with_seed(outbox_chaos::seed_from_env().wrapping_add(1));
    let faults_until = Instant::now() + Duration::from_secs(7);
    let (mut faults, mut cuts) = (0u64, 0);
    let mut next_fault = Instant::now() + Duration::from_millis(500);
    while Instant::now() < faults_until || !producer.is_finished() {
        if Instant::now() >= next_fault && Instant::now() < faults_until {
            // The kinds in turn, so that each one happens in every run.
            faults += 1;
            match faults % 3 {
                0 => {
                    relays
                        .kill(rng.usize(0..2), Duration::from_millis(300))
                        .await
                }
                1 => consumers.kill(rng.usize(0..2)).await,
                _ => {
                    // Every consumer connection to the broker at once.
                    proxy.cut();
                    cuts += 1;
                }
            }
            next_fault = Instant::now() + Duration::from_millis(rng.u64(400..900));
        }
        relays.supervise(false)?;
        consumers.supervise()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (committed, outbox) = producer.await??;

    // Everything applied, then a quiet while in which a wrongly applied redelivery would show.
    let deadline = Instant::now() + Duration::from_secs(90);
    let total = format!("SELECT COUNT(*) FROM {effects}");
    while (check.count(&total).await? as usize) < committed.len() && Instant::now() < deadline {
        relays.supervise(false)?;
        consumers.supervise()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let quiet = Instant::now() + Duration::from_secs(3);
    while Instant::now() < quiet {
        relays.supervise(false)?;
        consumers.supervise()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let rows = check
        .rows(&format!("SELECT id, applied FROM {effects}"))
        .await?;
    let applied: HashSet<MessageId> = rows.iter().filter_map(|(id, _)| id.parse().ok()).collect();
    let figures = Figures {
        committed: committed.len(),
        applied: rows.len(),
        missed: committed.difference(&applied).count(),
        applied_twice: rows.iter().filter(|(_, n)| *n != 1).count(),
        duplicates_dropped: check.count(&format!("SELECT n FROM {duplicates}")).await?,
        relay_kills: relays.killed,
        connection_cuts: cuts,
        relay_exits: relays.unexpected_exits.clone(),
        consumer_kills: consumers.kills,
        consumer_crashes: consumers.crashes,
        elapsed: started.elapsed(),
    };

    consumers.stop().await;
    relays.stop(Duration::from_secs(10)).await;
    for table in [&effects, &duplicates, &inbox_table] {
        let _ = check
            .execute(&format!("DROP TABLE IF EXISTS {table}"))
            .await;
    }
    outbox.drop_tables().await;
    if let Some(queue) = queue {
        queue.delete().await;
    }
    if let Pair::PostgresNats = pair {
        let url = outbox_testkit::env::service_url("OUTBOX_TEST_NATS_URL", "nats://127.0.0.1:4222");
        if let Ok(js) = broker::jetstream(&url).await {
            let _ = js.delete_stream(run.to_ascii_uppercase()).await;
        }
    }
    Ok(figures)
}

async fn exactly_once(pair: Pair, servers: &str) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let Some(figures) = or_skip(servers, run(pair, dir.path()).await) else {
        return;
    };
    println!(
        "{pair:?} in {:.1} s: {figures:?}",
        figures.elapsed.as_secs_f64()
    );
    if figures.missed > 0 || figures.applied_twice > 0 {
        let kept = dir.keep();
        eprintln!(
            "the relays' and consumers' logs are kept in {}",
            kept.display()
        );
    }
    assert!(figures.relay_exits.is_empty(), "relays failed: {figures:?}");
    assert!(
        figures.relay_kills > 0 && figures.consumer_kills > 0 && figures.connection_cuts > 0,
        "relays and consumers were killed, connections cut: {figures:?}"
    );
    assert_eq!(figures.committed, EVENTS, "{figures:?}");
    assert_eq!(figures.missed, 0, "effects missed: {figures:?}");
    assert_eq!(
        figures.applied_twice, 0,
        "effects applied twice: {figures:?}"
    );
    assert_eq!(figures.applied, figures.committed, "{figures:?}");
    assert!(
        figures.consumer_crashes > 0 && figures.duplicates_dropped > 0,
        "consumers crashed between commit and acknowledgement, and the redeliveries were \
         dropped: {figures:?}"
    );
}

/// Runs are heavy (two relay and two consumer processes): one at a time on this two-core
/// machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_nats_to_postgres_applies_each_effect_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    exactly_once(Pair::PostgresNats, "PostgreSQL and NATS JetStream").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_to_rabbitmq_to_mariadb_applies_each_effect_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    exactly_once(Pair::MariaDbAmqp, "MariaDB and RabbitMQ").await;
}
