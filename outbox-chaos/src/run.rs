//! One run: set up a store and a broker, start producers and relay processes, inject faults for
//! the profile's fault phase, let the outbox drain, read everything back and check it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outbox_core::MessageId;
use outbox_testkit::env::unique_name;
use outbox_testkit::proxy::FaultProxy;
use tokio::time::Instant;

use crate::broker::{self, NatsServer, Queue, Tansu};
use crate::db::{Db, key_name};
use crate::history::{Delivery, History, Verdict, check};
use crate::profile::Profile;
use crate::relays::Relays;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A store and a broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    /// PostgreSQL to NATS JetStream.
    PostgresNats,
    /// PostgreSQL to Kafka (tansu).
    PostgresKafka,
    /// MySQL / MariaDB to AMQP (RabbitMQ).
    MysqlAmqp,
    /// SQLite to NATS JetStream.
    SqliteNats,
}

impl Combination {
    /// Every combination.
    pub const ALL: [Combination; 4] = [
        Combination::PostgresNats,
        Combination::PostgresKafka,
        Combination::MysqlAmqp,
        Combination::SqliteNats,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Combination::PostgresNats => "postgres-nats",
            Combination::PostgresKafka => "postgres-kafka",
            Combination::MysqlAmqp => "mysql-amqp",
            Combination::SqliteNats => "sqlite-nats",
        }
    }

    /// The combination called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The server a run needs, for skipping when it is missing.
    pub fn servers(self) -> &'static str {
        match self {
            Combination::PostgresNats => "PostgreSQL, nats-server and libfaketime",
            Combination::PostgresKafka => "PostgreSQL and tansu",
            Combination::MysqlAmqp => "MySQL/MariaDB, RabbitMQ and libfaketime",
            Combination::SqliteNats => "nats-server",
        }
    }

    /// How far each relay's wall clock is set off, in seconds: the second relay 90 s ahead, the
    /// third 90 s behind, on the server databases, whose clock is the one leases, retries and
    /// partition ownership are measured on. SQLite has no server: its clock is the host's, one
    /// for every process on the host, and its relays keep theirs. Kafka relays keep theirs too:
    /// under libfaketime (90 s ahead or behind, the wall clock only) librdkafka stops
    /// delivering: the relay's publishes time out, and outbox-kafka's publisher suite, which
    /// passes under libfaketime with no offset, hangs. That is the fake clock inside
    /// librdkafka, not skew, which the other combinations cover.
    pub fn clock_skews(self) -> &'static [i64] {
        match self {
            Combination::PostgresNats | Combination::MysqlAmqp => &[0, 90, -90],
            Combination::PostgresKafka | Combination::SqliteNats => &[],
        }
    }
}

/// The kinds of faults, as counted in reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// A relay process killed with SIGKILL, restarted after up to 2 s.
    KillRelay,
    /// Every broker connection cut through the proxy.
    CutBroker,
    /// The broker unreachable through the proxy for up to 3 s.
    BrokerDown,
    /// The broker process stopped and started again (NATS, file storage).
    RestartBroker,
    /// Every database connection of the run terminated.
    KillDbConnections,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillRelay => "relay SIGKILL",
            Fault::CutBroker => "broker cut",
            Fault::BrokerDown => "broker down",
            Fault::RestartBroker => "broker restart",
            Fault::KillDbConnections => "db kill",
        }
    }
}

/// What a run did and found.
#[derive(Debug)]
#[non_exhaustive]
pub struct Report {
    /// Which store and broker.
    pub combination: Combination,
    /// Which profile.
    pub profile: &'static str,
    /// The seed that replays the run's choices (`OUTBOX_CHAOS_SEED`).
    pub seed: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Time from the end of the faults until the outbox was empty.
    pub drain: Duration,
    /// Faults injected, by kind.
    pub faults: BTreeMap<Fault, u64>,
    /// Database connections terminated.
    pub db_connections_killed: u64,
    /// Relay processes started (restarts included).
    pub relay_starts: u64,
    /// Each relay's clock offset in seconds.
    pub clock_skews: Vec<i64>,
    /// The checker's verdict.
    pub verdict: Verdict,
    /// Relays that exited while nobody asked.
    pub unexpected_exits: Vec<String>,
    /// Relays that did not stop cleanly on SIGTERM at the end.
    pub unclean_stops: Vec<String>,
    /// Messages still pending when the drain bound passed.
    pub pending_after_drain: u64,
    /// Dead letters left in the outbox (with their errors).
    pub dead_letters: Vec<String>,
    /// Keys whose business row version disagrees with the messages committed for it.
    pub business_mismatches: Vec<String>,
    /// The run's directory (relay logs), kept when the run failed.
    pub kept_dir: Option<PathBuf>,
}

impl Report {
    /// True when the guarantee held and every process behaved.
    pub fn passed(&self) -> bool {
        self.verdict.holds()
            && self.pending_after_drain == 0
            && self.dead_letters.is_empty()
            && self.business_mismatches.is_empty()
            && self.unexpected_exits.is_empty()
            && self.unclean_stops.is_empty()
    }

    /// Faults injected in total.
    pub fn fault_total(&self) -> u64 {
        self.faults.values().sum()
    }

    /// One Markdown table row: combination, profile, messages, faults, lost, late (still
    /// pending at the drain bound), phantoms, out of order, duplicates, time.
    pub fn markdown_row(&self) -> String {
        let faults = self
            .faults
            .iter()
            .map(|(k, n)| format!("{n} {}", k.name()))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "| {} | {} | {} committed ({} rolled back, {} aborted, {} indeterminate) | {} ({faults}) | {} | {} | {} | {} | {} | {:.0} s |",
            self.combination.name(),
            self.profile,
            self.verdict.committed,
            self.verdict.rolled_back,
            self.verdict.aborted,
            self.verdict.indeterminate,
            self.fault_total(),
            self.verdict.lost.len(),
            self.verdict.still_pending.len(),
            self.verdict.phantoms.len(),
            self.verdict.out_of_order.len(),
            self.verdict.duplicates,
            self.elapsed.as_secs_f64()
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chaos {} ({} profile, seed {}): {} in {:.1}s (drained in {:.1}s)",
            self.combination.name(),
            self.profile,
            self.seed,
            if self.passed() { "PASSED" } else { "FAILED" },
            self.elapsed.as_secs_f64(),
            self.drain.as_secs_f64()
        )?;
        writeln!(f, "  messages: {}", self.verdict)?;
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{} {n}", k.name()))
            .collect();
        writeln!(
            f,
            "  faults: {} ({}); db connections killed {}; relay processes started {}",
            self.fault_total(),
            faults.join(", "),
            self.db_connections_killed,
            self.relay_starts
        )?;
        let clocks: Vec<String> = self
            .clock_skews
            .iter()
            .map(|s| format!("{s:+} s"))
            .collect();
        writeln!(f, "  relay clocks: {}", clocks.join(", "))?;
        let lists: [(&str, Vec<String>); 8] = [
            (
                "lost",
                self.verdict.lost.iter().map(ToString::to_string).collect(),
            ),
            (
                "late (still pending when the drain bound passed)",
                self.verdict
                    .still_pending
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
            (
                "phantoms",
                self.verdict
                    .phantoms
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
            (
                "out of order (key, version, after version)",
                self.verdict
                    .out_of_order
                    .iter()
                    .map(|(k, v, after)| format!("{k} {v} after {after}"))
                    .collect(),
            ),
            ("unexpected relay exits", self.unexpected_exits.clone()),
            ("unclean stops", self.unclean_stops.clone()),
            ("dead letters", self.dead_letters.clone()),
            ("business rows", self.business_mismatches.clone()),
        ];
        for (name, items) in lists {
            if !items.is_empty() {
                writeln!(f, "  {name} ({}):", items.len())?;
                for item in items.iter().take(10) {
                    writeln!(f, "    {item}")?;
                }
            }
        }
        if self.pending_after_drain > 0 {
            writeln!(
                f,
                "  still pending after the drain bound: {}",
                self.pending_after_drain
            )?;
        }
        if let Some(dir) = &self.kept_dir {
            writeln!(f, "  logs kept in {}", dir.display())?;
        }
        Ok(())
    }
}

/// What a run needs from outside.
#[derive(Clone, Debug)]
pub struct Options {
    /// The relay executable.
    pub relay_bin: PathBuf,
    /// The profile.
    pub profile: Profile,
    /// The seed of every random choice.
    pub seed: u64,
}

/// Why a run could not start: a server missing (the caller decides whether to skip).
#[derive(Debug)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// The broker side of a run.
enum Broker {
    Nats { server: NatsServer, stream: String },
    Kafka { tansu: Tansu, topic: String },
    Amqp { queue: Queue },
}

/// Runs `combination` under `options`; `Err(Unavailable)` when a server is missing.
pub async fn run(combination: Combination, options: &Options) -> Result<Report, Unavailable> {
    let started = Instant::now();
    let profile = &options.profile;
    let unavailable = |what: &str, err: BoxError| Unavailable(format!("{what}: {err}"));
    let dir = tempfile::Builder::new()
        .prefix("outbox-chaos-")
        .tempdir()
        .map_err(|e| unavailable("temporary directory", e.into()))?;
    if !combination.clock_skews().is_empty() {
        crate::relays::faketime_library().map_err(|e| unavailable("skewed clocks", e.into()))?;
    }
    let run_name = unique_name("chaos");
    let table = run_name.clone();
    let keys: Vec<String> = (0..profile.keys).map(key_name).collect();

    let db = match combination {
        Combination::PostgresNats | Combination::PostgresKafka => {
            Db::postgres(&run_name, &table, keys.len()).await
        }
        Combination::MysqlAmqp => Db::mysql(&run_name, &table, keys.len()).await,
        Combination::SqliteNats => Db::sqlite(dir.path(), &table, keys.len()).await,
    }
    .map_err(|e| unavailable("database", e))?;

    let (broker, proxy, destination, publisher) =
        match setup_broker(combination, dir.path(), &run_name).await {
            Ok(setup) => setup,
            Err(err) => {
                db.teardown(&table).await;
                return Err(unavailable("broker", err));
            }
        };
    let publish_timeout = if matches!(broker, Broker::Kafka { .. }) {
        "3s"
    } else {
        "2s"
    };
    let config = dir.path().join("relay.toml");
    let text = format!(
        r#"[store]
url = "{url}"
table = "{table}"
max_connections = 4

[publisher]
{publisher}

[relay]
batch_size = 100
concurrency = 4
lease = "8s"
publish_timeout = "{publish_timeout}"
partition_lease = "1500ms"
poll_max = "100ms"
shutdown_timeout = "4s"
stats_interval = "1s"

[relay.retry]
initial_delay = "50ms"
max_delay = "1s"
max_attempts = 100000
"#,
        url = db.relay_url(),
    );
    std::fs::write(&config, text).map_err(|e| unavailable("relay configuration", e.into()))?;

    let history = Arc::new(History::default());
    let db = Arc::new(db);
    let stop = Arc::new(AtomicBool::new(false));
    let skews = combination.clock_skews();
    let mut relays = Relays::start(
        &options.relay_bin,
        &config,
        dir.path(),
        profile.relays,
        skews,
    )
    .map_err(|e| unavailable("relay processes", e.into()))?;

    // Producers.
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..profile.producers {
        let (db, history, stop, keys) = (
            Arc::clone(&db),
            Arc::clone(&history),
            Arc::clone(&stop),
            keys.clone(),
        );
        let (table, destination, profile) = (table.clone(), destination.clone(), profile.clone());
        let mut rng = fastrand::Rng::with_seed(options.seed.wrapping_add(p as u64 + 1));
        producers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = rng.usize(1..=profile.max_per_transaction.min(keys.len()));
                let mut chosen: Vec<String> = rng
                    .choose_multiple(keys.iter(), n)
                    .into_iter()
                    .cloned()
                    .collect();
                // Rows locked in one order everywhere: no deadlocks between producers.
                chosen.sort();
                let rollback = rng.u32(0..100) < profile.rollback_percent;
                let (outcome, written) = db.transact(&table, &destination, &chosen, rollback).await;
                history.record(outcome, written);
                tokio::time::sleep(profile.pause).await;
            }
        });
    }

    // The nemesis, and the supervisor of the relays.
    let mut rng = fastrand::Rng::with_seed(options.seed);
    let mut faults: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut db_killed = 0;
    let mut kinds = vec![
        Fault::KillRelay,
        Fault::KillRelay,
        Fault::CutBroker,
        Fault::BrokerDown,
    ];
    if matches!(broker, Broker::Nats { .. }) {
        kinds.push(Fault::RestartBroker);
    }
    if db.can_kill_connections() {
        kinds.extend([Fault::KillDbConnections, Fault::KillDbConnections]);
    }
    let mut broker = broker;
    let fault_end = Instant::now() + profile.fault_phase;
    let mut next_fault = Instant::now() + gap(&mut rng, profile);
    let mut proxy_up_at: Option<Instant> = None;
    while Instant::now() < fault_end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = relays.supervise(false);
        if proxy_up_at.is_some_and(|at| at <= Instant::now()) {
            proxy.set_down(false);
            proxy_up_at = None;
        }
        if Instant::now() < next_fault {
            continue;
        }
        next_fault = Instant::now() + gap(&mut rng, profile);
        let fault = kinds[rng.usize(..kinds.len())];
        match fault {
            Fault::KillRelay => {
                let i = rng.usize(..relays.len());
                let down = Duration::from_millis(rng.u64(100..2000));
                relays.kill(i, down).await;
            }
            Fault::CutBroker => proxy.cut(),
            Fault::BrokerDown => {
                proxy.set_down(true);
                proxy_up_at = Some(Instant::now() + Duration::from_millis(rng.u64(500..3000)));
            }
            Fault::RestartBroker => {
                if let Broker::Nats { server, .. } = &mut broker {
                    let down = Duration::from_millis(rng.u64(0..1500));
                    if let Err(err) = server.restart(false, down).await {
                        eprintln!("restarting nats-server: {err}");
                    }
                }
            }
            Fault::KillDbConnections => match db.kill_connections().await {
                Ok(n) => db_killed += n,
                Err(err) => eprintln!("killing database connections: {err}"),
            },
        }
        *faults.entry(fault).or_insert(0) += 1;
    }

    // Quiet: producers stop, the broker is reachable, every relay runs.
    stop.store(true, Ordering::Relaxed);
    while producers.join_next().await.is_some() {}
    proxy.set_down(false);
    let _ = relays.supervise(true);
    let drain_started = Instant::now();
    let drain_deadline = drain_started + profile.drain_bound;
    let mut pending = u64::MAX;
    while Instant::now() < drain_deadline {
        let _ = relays.supervise(false);
        if let Ok(stats) = db.stats().await {
            pending = stats.pending;
            if pending == 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain = drain_started.elapsed();
    let unclean_stops = relays.stop(Duration::from_secs(15)).await;
    let dead_letters = db.dead_letters().await.unwrap_or_default();

    // Read everything back and check.
    let committed = history.committed_ids();
    let read = read_back(&mut broker, &committed, profile.read_bound).await;
    let (deliveries, read_error) = match read {
        Ok(deliveries) => (deliveries, None),
        Err(err) => (Vec::new(), Some(err.to_string())),
    };
    let pending_ids = if pending == 0 {
        HashSet::new()
    } else {
        db.pending_ids(&table).await.unwrap_or_default()
    };
    let verdict = check(&history, &deliveries, &pending_ids);
    let versions = db.versions(&table).await.unwrap_or_default();
    let mut business_mismatches = business_check(&history, &deliveries, &versions);
    if let Some(err) = read_error {
        business_mismatches.push(format!("reading the broker failed: {err}"));
    }
    let mut unexpected_exits = std::mem::take(&mut relays.unexpected_exits);
    unexpected_exits.sort();

    let mut report = Report {
        combination,
        profile: profile.name,
        seed: options.seed,
        elapsed: Duration::ZERO,
        drain,
        faults,
        db_connections_killed: db_killed,
        relay_starts: relays.starts,
        clock_skews: (0..profile.relays)
            .map(|i| skews.get(i).copied().unwrap_or(0))
            .collect(),
        verdict,
        unexpected_exits,
        unclean_stops,
        pending_after_drain: if pending == u64::MAX { 0 } else { pending },
        dead_letters,
        business_mismatches,
        kept_dir: None,
    };
    drop(relays);
    teardown(broker).await;
    drop(proxy);
    if let Ok(db) = Arc::try_unwrap(db) {
        db.teardown(&table).await;
    }
    if !report.passed() {
        report.kept_dir = Some(dir.keep());
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn gap(rng: &mut fastrand::Rng, profile: &Profile) -> Duration {
    let (min, max) = profile.fault_gap;
    Duration::from_millis(rng.u64(min.as_millis() as u64..=max.as_millis() as u64))
}

async fn setup_broker(
    combination: Combination,
    dir: &Path,
    run: &str,
) -> Result<(Broker, FaultProxy, String, String), BoxError> {
    match combination {
        Combination::PostgresNats | Combination::SqliteNats => {
            let server = NatsServer::start(dir, &[]).await?;
            let proxy = FaultProxy::start(server.addr()).await?;
            let stream = run.to_ascii_uppercase();
            let js = broker::jetstream(&format!("nats://{}", server.addr())).await?;
            broker::create_stream(&js, &stream, &format!("{run}.>")).await?;
            let publisher = format!(
                "kind = \"nats\"\nurl = \"nats://{}\"\nsubject_prefix = \"{run}\"\n\
                 ack_timeout = \"1s\"\nconnect_timeout = \"1s\"\nping_interval = \"2s\"",
                proxy.addr()
            );
            Ok((
                Broker::Nats { server, stream },
                proxy,
                "events".to_owned(),
                publisher,
            ))
        }
        Combination::PostgresKafka => {
            let addr: SocketAddr = format!("127.0.0.1:{}", broker::free_port()).parse()?;
            let proxy = FaultProxy::start(addr).await?;
            let tansu = Tansu::start(addr, proxy.addr()).await?;
            let topic = run.to_owned();
            broker::create_topic(&proxy.addr().to_string(), &topic, 3).await?;
            let publisher = format!(
                "kind = \"kafka\"\nbrokers = \"{}\"\n\n[publisher.properties]\n\
                 \"message.timeout.ms\" = \"2500\"\n\"socket.timeout.ms\" = \"2000\"",
                proxy.addr()
            );
            Ok((
                Broker::Kafka {
                    tansu,
                    topic: topic.clone(),
                },
                proxy,
                topic,
                publisher,
            ))
        }
        Combination::MysqlAmqp => {
            let url = url::Url::parse(&broker::amqp_url())?;
            let upstream = tokio::net::lookup_host((
                url.host_str().unwrap_or("127.0.0.1"),
                url.port().unwrap_or(5672),
            ))
            .await?
            .next()
            .ok_or("RabbitMQ address")?;
            let queue_name = run.to_owned();
            let queue = Queue::declare(url.as_str(), &queue_name).await?;
            let proxy = FaultProxy::start(upstream).await?;
            let mut through = url.clone();
            through.set_host(Some("127.0.0.1"))?;
            through
                .set_port(Some(proxy.addr().port()))
                .map_err(|()| "amqp url")?;
            let publisher = format!(
                "kind = \"amqp\"\nuri = \"{through}\"\nrouting = \"queue\"\n\
                 connect_timeout = \"2s\"\nconfirm_timeout = \"2s\"\nheartbeat = \"2s\""
            );
            Ok((Broker::Amqp { queue }, proxy, queue_name, publisher))
        }
    }
}

async fn read_back(
    broker: &mut Broker,
    committed: &HashSet<MessageId>,
    bound: Duration,
) -> Result<Vec<Delivery>, BoxError> {
    let quiet = Duration::from_secs(2);
    match broker {
        Broker::Nats { server, stream } => {
            broker::read_stream(&format!("nats://{}", server.addr()), stream, bound).await
        }
        Broker::Kafka { tansu, topic } => {
            broker::read_topic(&tansu.addr().to_string(), topic, committed, quiet, bound).await
        }
        Broker::Amqp { queue } => queue.read(committed, quiet, bound).await,
    }
}

async fn teardown(broker: Broker) {
    match broker {
        Broker::Nats { server, .. } => server.stop().await,
        Broker::Kafka { tansu, .. } => tansu.stop().await,
        Broker::Amqp { queue } => queue.delete().await,
    }
}

/// Each key's business row must count the messages committed for it: its version is the
/// number of committed transactions that touched it.
fn business_check(
    history: &History,
    deliveries: &[Delivery],
    versions: &[(String, i64)],
) -> Vec<String> {
    let delivered: HashSet<MessageId> = deliveries.iter().map(|d| d.id).collect();
    let expected: HashMap<String, i64> = history.committed_per_key(&delivered);
    versions
        .iter()
        .filter_map(|(key, version)| {
            let want = expected.get(key).copied().unwrap_or(0);
            (want != *version).then(|| {
                format!("{key}: version {version}, {want} committed messages delivered or due")
            })
        })
        .collect()
}
