//! One run: start a private database server (PostgreSQL, MariaDB) or a SQLite file and a
//! broker, each behind a fault proxy for the relays, start producers and relay processes (for
//! the log relay, after `migrate` created its replication slot), inject faults for the
//! profile's fault phase, let the outbox drain, read everything back and check it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outbox_core::{MessageId, RetryPolicy};
use outbox_testkit::env::unique_name;
use outbox_testkit::proxy::FaultProxy;
use outbox_testkit::servers::Restart;
use tokio::time::Instant;

use crate::broker::{self, NatsServer, Queue, Tansu};
use crate::db::{Db, DbServer, Shape, concurrent_key_name, key_name};
use crate::history::{Delivery, History, OrderPromise, Verdict, check_with};
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
    /// PostgreSQL's log (a logical replication slot, the relay's `[cdc]`) to NATS JetStream.
    PostgresCdcNats,
    /// PostgreSQL's log (a logical replication slot, the relay's `[cdc]`) to AMQP (RabbitMQ).
    PostgresCdcAmqp,
}

impl Combination {
    /// Every combination.
    pub const ALL: [Combination; 6] = [
        Combination::PostgresNats,
        Combination::PostgresKafka,
        Combination::MysqlAmqp,
        Combination::SqliteNats,
        Combination::PostgresCdcNats,
        Combination::PostgresCdcAmqp,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Combination::PostgresNats => "postgres-nats",
            Combination::PostgresKafka => "postgres-kafka",
            Combination::MysqlAmqp => "mysql-amqp",
            Combination::SqliteNats => "sqlite-nats",
            Combination::PostgresCdcNats => "postgres-cdc-nats",
            Combination::PostgresCdcAmqp => "postgres-cdc-amqp",
        }
    }

    /// The combination called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The servers and programs a run needs, for skipping when one is missing.
    pub fn servers(self) -> &'static str {
        match self {
            Combination::PostgresNats => {
                "a private PostgreSQL (initdb, pg_ctl), nats-server and libfaketime"
            }
            Combination::PostgresKafka => "a private PostgreSQL (initdb, pg_ctl) and tansu",
            Combination::MysqlAmqp => {
                "a private MariaDB (mariadb-install-db, mariadbd), RabbitMQ and libfaketime"
            }
            Combination::SqliteNats => "nats-server",
            Combination::PostgresCdcNats => {
                "a private PostgreSQL with logical WAL (initdb, pg_ctl), nats-server and \
                 libfaketime"
            }
            Combination::PostgresCdcAmqp => {
                "a private PostgreSQL with logical WAL (initdb, pg_ctl), RabbitMQ and libfaketime"
            }
        }
    }

    /// Whether the relays run the log relay (`[cdc]`): new messages read from a logical
    /// replication slot, which one relay process at a time streams while the others stand by,
    /// beside a polling relay that claims only what the log relay hands to the table.
    pub fn is_cdc(self) -> bool {
        matches!(
            self,
            Combination::PostgresCdcNats | Combination::PostgresCdcAmqp
        )
    }

    /// The order of a key's first deliveries the relay promises: commit order when it reads
    /// the log, else the polling relay's (a message committed before another's INSERT
    /// arrives first).
    pub fn order_promise(self) -> OrderPromise {
        if self.is_cdc() {
            OrderPromise::Commit
        } else {
            OrderPromise::CommitBeforeInsert
        }
    }

    /// Whether the store is a database server of the run's own (which the nemesis can black-hole
    /// and restart), rather than a SQLite file.
    pub fn has_db_server(self) -> bool {
        !matches!(self, Combination::SqliteNats)
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
            Combination::PostgresNats
            | Combination::MysqlAmqp
            | Combination::PostgresCdcNats
            | Combination::PostgresCdcAmqp => &[0, 90, -90],
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
    /// The broker unreachable through the proxy (connections refused and cut) for up to 3 s.
    BrokerDown,
    /// The broker black-holed through the proxy for 1 to 4 s: connections accepted and kept,
    /// nothing forwarded either way.
    BlackholeBroker,
    /// The broker down or black-holed (one of the two at random) for at least ten times the
    /// relays' whole retry budget, and at least as long as all their attempts at a message can
    /// take (see [`Report::long_outage_floor`]).
    LongBrokerOutage,
    /// The broker process stopped and started again (NATS, file storage).
    RestartBroker,
    /// Every database connection of the run terminated.
    KillDbConnections,
    /// The relays' database connections black-holed through their proxy for 1 to 6 s (the
    /// producers connect directly).
    BlackholeDb,
    /// The private database server stopped (cleanly or by a crash, at random) and started
    /// again on the same port and data after up to 1 s.
    RestartDb,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillRelay => "relay SIGKILL",
            Fault::CutBroker => "broker cut",
            Fault::BrokerDown => "broker down",
            Fault::BlackholeBroker => "broker black hole",
            Fault::LongBrokerOutage => "long broker outage",
            Fault::RestartBroker => "broker restart",
            Fault::KillDbConnections => "db kill",
            Fault::BlackholeDb => "db black hole",
            Fault::RestartDb => "db restart",
        }
    }
}

/// The relays' retry policy: the real policy with few attempts and short delays, so that an
/// outage far longer than its whole budget shows whether outages are counted as attempts.
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy::default()
        .initial_delay(Duration::from_millis(50))
        .max_delay(Duration::from_millis(200))
        .max_attempts(3)
}

/// The whole retry budget of `policy`: the sum of the delays of all its attempts, without
/// jitter (which only shortens them). 350 ms for [`retry_policy`] (50 + 100 + 200 ms).
pub fn retry_budget(policy: &RetryPolicy) -> Duration {
    let exact = policy.clone().jitter(0.0);
    (1..=policy.max_attempts).map(|n| exact.delay(n)).sum()
}

/// The shortest long broker outage: ten times the retry budget, or, when longer, the time all
/// the attempts at one message can take when each publish waits out `publish_timeout`.
pub fn long_outage_floor(policy: &RetryPolicy, publish_timeout: Duration) -> Duration {
    let budget = retry_budget(policy);
    (budget * 10).max(publish_timeout * policy.max_attempts + budget)
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
    /// The relays' retry budget (the sum of the delays of all attempts).
    pub retry_budget: Duration,
    /// The shortest long broker outage ([`long_outage_floor`]).
    pub long_outage_floor: Duration,
    /// The long broker outages: how long each lasted, and whether the broker was down or
    /// black-holed.
    pub long_outages: Vec<(Duration, &'static str)>,
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
    /// Dead letters left in the outbox.
    pub dead_letter_count: u64,
    /// The first 20 of them, with their errors.
    pub dead_letters: Vec<String>,
    /// Keys whose business row version disagrees with the messages committed for it.
    pub business_mismatches: Vec<String>,
    /// Database restarts that did not go as asked: the server did not stop (or start) within
    /// `pg_ctl`'s minute, say. Each is a failure of the run (the harness then crashes the
    /// server and starts it again, so that the run goes on).
    pub db_restart_failures: Vec<String>,
    /// Why the outbox could not be read once the relays were stopped, when it could not: then
    /// messages still in it cannot be told from lost ones, and the run fails.
    pub outbox_unreadable: Option<String>,
    /// The run's directory (relay logs), kept when the run failed (or `OUTBOX_CHAOS_KEEP=1`).
    pub kept_dir: Option<PathBuf>,
}

impl Report {
    /// True when the guarantee held and every process behaved.
    pub fn passed(&self) -> bool {
        self.verdict.holds()
            && self.pending_after_drain == 0
            && self.dead_letter_count == 0
            && self.dead_letters.is_empty()
            && self.business_mismatches.is_empty()
            && self.db_restart_failures.is_empty()
            && self.outbox_unreadable.is_none()
            && self.unexpected_exits.is_empty()
            && self.unclean_stops.is_empty()
    }

    /// Faults injected in total.
    pub fn fault_total(&self) -> u64 {
        self.faults.values().sum()
    }

    /// One Markdown table row: combination, profile, messages, faults, lost, late (still
    /// pending at the drain bound), phantoms, out of order, dead letters, duplicates, time.
    pub fn markdown_row(&self) -> String {
        let faults = self
            .faults
            .iter()
            .map(|(k, n)| format!("{n} {}", k.name()))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "| {} | {} | {} committed ({} rolled back, {} aborted, {} indeterminate) | {} ({faults}) | {} | {} | {} | {} | {} | {} | {:.0} s |",
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
            self.verdict.out_of_order_total(),
            self.dead_letter_count,
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
        let outages: Vec<String> = self
            .long_outages
            .iter()
            .map(|(d, how)| format!("{:.1} s {how}", d.as_secs_f64()))
            .collect();
        writeln!(
            f,
            "  retry budget {} ms; long broker outages (at least {:.1} s): {}",
            self.retry_budget.as_millis(),
            self.long_outage_floor.as_secs_f64(),
            outages.join(", ")
        )?;
        let lists: [(&str, Vec<String>); 11] = [
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
            (
                "out of order (committed before the INSERT of one that arrived first)",
                self.verdict
                    .out_of_causal_order
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
            (
                "out of commit order (committed before the COMMIT of one that arrived first)",
                self.verdict
                    .out_of_commit_order
                    .iter()
                    .map(|v| {
                        format!(
                            "{}: {} arrived before {}, committed {:?} before its COMMIT",
                            v.key, v.later, v.earlier, v.margin
                        )
                    })
                    .collect(),
            ),
            (
                "database restarts that failed",
                self.db_restart_failures.clone(),
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
        if self.dead_letter_count > self.dead_letters.len() as u64 {
            writeln!(
                f,
                "  dead letters in the outbox: {} (the first {} above)",
                self.dead_letter_count,
                self.dead_letters.len()
            )?;
        }
        if self.pending_after_drain > 0 {
            writeln!(
                f,
                "  still pending after the drain bound: {}",
                self.pending_after_drain
            )?;
        }
        if let Some(why) = &self.outbox_unreadable {
            writeln!(
                f,
                "  the outbox could not be read at the end ({why}): messages still in it count \
                 as lost"
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

/// A fault proxy and when its outages end: faults that overlap extend each other, so that the
/// end of a short one never lifts a longer one.
struct Faulted {
    proxy: FaultProxy,
    down_until: Option<Instant>,
    blackhole_until: Option<Instant>,
}

impl Faulted {
    fn new(proxy: FaultProxy) -> Self {
        Self {
            proxy,
            down_until: None,
            blackhole_until: None,
        }
    }

    fn later(until: Option<Instant>, span: Duration) -> Option<Instant> {
        let end = Instant::now() + span;
        Some(until.map_or(end, |u| u.max(end)))
    }

    /// Refuses and cuts connections for `span` (or longer, if already down for longer).
    fn down_for(&mut self, span: Duration) {
        self.down_until = Self::later(self.down_until, span);
        self.proxy.set_down(true);
    }

    /// Black-holes connections for `span` (or longer, if already black-holed for longer).
    fn blackhole_for(&mut self, span: Duration) {
        self.blackhole_until = Self::later(self.blackhole_until, span);
        self.proxy.set_blackhole(true);
    }

    /// Lifts the outages whose time is up.
    fn lift_due(&mut self) {
        let now = Instant::now();
        if self.down_until.is_some_and(|at| at <= now) {
            self.proxy.set_down(false);
            self.down_until = None;
        }
        if self.blackhole_until.is_some_and(|at| at <= now) {
            self.proxy.set_blackhole(false);
            self.blackhole_until = None;
        }
    }

    /// Lifts every outage.
    fn lift_all(&mut self) {
        self.down_until = Some(Instant::now());
        self.blackhole_until = Some(Instant::now());
        self.lift_due();
    }
}

/// A long broker outage of the schedule.
struct LongOutage {
    start: Instant,
    span: Duration,
    blackhole: bool,
}

/// Spreads `count` long outages over the fault phase `[begin, begin + phase)`, one in each
/// equal window, each between `floor` and 1.25 times `floor` long (a window shorter than that
/// makes its outage run past the window).
fn schedule_long_outages(
    rng: &mut fastrand::Rng,
    begin: Instant,
    phase: Duration,
    count: usize,
    floor: Duration,
) -> Vec<LongOutage> {
    let window = phase / count.max(1) as u32;
    (0..count)
        .map(|i| {
            let span = floor.mul_f64(1.0 + rng.f64() * 0.25);
            let slack = window.saturating_sub(span);
            let start = begin + window * i as u32 + slack.mul_f64(rng.f64());
            LongOutage {
                start,
                span,
                blackhole: rng.bool(),
            }
        })
        .collect()
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
    // The log relay's replication slot and publication: names of the run's own.
    let slot = format!("{run_name}_slot");
    let publication = format!("{run_name}_pub");
    let keys: Vec<String> = (0..profile.keys).map(key_name).collect();
    let concurrent_keys: Vec<String> = (0..profile.concurrent_keys)
        .map(concurrent_key_name)
        .collect();
    let all_keys: Vec<String> = keys.iter().chain(&concurrent_keys).cloned().collect();

    // The database: a private server behind a proxy for the relays, or a SQLite file.
    let server = match combination {
        Combination::PostgresNats | Combination::PostgresKafka => {
            Some(DbServer::postgres(dir.path()).await)
        }
        Combination::PostgresCdcNats | Combination::PostgresCdcAmqp => {
            Some(DbServer::postgres_logical(dir.path()).await)
        }
        Combination::MysqlAmqp => Some(DbServer::mariadb(dir.path()).await),
        Combination::SqliteNats => None,
    }
    .transpose()
    .map_err(|e| unavailable("database server", e.into()))?;
    let db_proxy = match &server {
        Some(server) => Some(
            FaultProxy::start(server.addr())
                .await
                .map_err(|e| unavailable("database proxy", e.into()))?,
        ),
        None => None,
    };
    let relay_db_addr = db_proxy.as_ref().map(FaultProxy::addr);
    let db = match (&server, combination) {
        (Some(server), Combination::MysqlAmqp) => {
            Db::mysql_at(&server.url(), relay_db_addr, &run_name, &table, &all_keys).await
        }
        (Some(server), _) => {
            Db::postgres(&server.url(), relay_db_addr, &run_name, &table, &all_keys)
                .await
                .map(|db| {
                    if combination.is_cdc() {
                        db.with_replication_slot(&slot)
                    } else {
                        db
                    }
                })
        }
        (None, _) => Db::sqlite(dir.path(), &table, &all_keys).await,
    };
    let db = match db {
        Ok(db) => db,
        Err(err) => {
            if let Some(server) = server {
                server.stop().await;
            }
            return Err(unavailable("database", err));
        }
    };

    let (broker, proxy, destination, publisher) =
        match setup_broker(combination, dir.path(), &run_name).await {
            Ok(setup) => setup,
            Err(err) => {
                db.teardown(&table).await;
                if let Some(server) = server {
                    server.stop().await;
                }
                return Err(unavailable("broker", err));
            }
        };
    let publish_timeout = if matches!(broker, Broker::Kafka { .. }) {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(2)
    };
    let policy = retry_policy();
    let retry_budget = retry_budget(&policy);
    let outage_floor = long_outage_floor(&policy, publish_timeout);
    let config = dir.path().join("relay.toml");
    // store_timeout: a store call that hangs in a black hole is abandoned after 3 s and
    // retried like any failed call.
    let mut text = format!(
        r#"[store]
url = "{url}"
table = "{table}"
max_connections = {max_connections}

[publisher]
{publisher}

[relay]
batch_size = 100
concurrency = 4
lease = "8s"
publish_timeout = "{publish_timeout}ms"
store_timeout = "3s"
partition_lease = "1500ms"
poll_max = "100ms"
shutdown_timeout = "4s"
stats_interval = "1s"

[relay.retry]
initial_delay = "{initial}ms"
max_delay = "{max}ms"
multiplier = {multiplier:?}
jitter = {jitter:?}
max_attempts = {attempts}
"#,
        url = db.relay_url(),
        // The program needs one per batch under way, a renewal, a stats or cleanup call and
        // its readiness probe (concurrency + 3), and one more for the log relay.
        max_connections = 7 + usize::from(combination.is_cdc()),
        publish_timeout = publish_timeout.as_millis(),
        initial = policy.initial_delay.as_millis(),
        max = policy.max_delay.as_millis(),
        multiplier = policy.multiplier,
        jitter = policy.jitter,
        attempts = policy.max_attempts,
    );
    if combination.is_cdc() {
        // The log relay reads the store's table on the store's URL (through the database's
        // fault proxy, as every relay connection).
        text.push_str(&format!(
            "\n[cdc]\nslot = \"{slot}\"\npublication = \"{publication}\"\n\
             status_interval = \"200ms\"\n"
        ));
    }
    std::fs::write(&config, text).map_err(|e| unavailable("relay configuration", e.into()))?;
    if combination.is_cdc() {
        // `outbox-relay migrate` creates the publication and the slot (after the table, which
        // the harness migrated already): from then on the slot keeps every committed message.
        if let Err(err) = migrate(&options.relay_bin, &config).await {
            teardown(broker).await;
            db.teardown(&table).await;
            if let Some(server) = server {
                server.stop().await;
            }
            return Err(unavailable(
                "the relay's migrate (slot and publication)",
                err,
            ));
        }
    }

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

    // Producers: serialized ones on `keys`, concurrent ones on `concurrent_keys`.
    let mut producers = tokio::task::JoinSet::new();
    let serialized = (0..profile.producers).map(|p| (p, false));
    let concurrent = (0..profile.concurrent_producers).map(|p| (p + 1000, true));
    for (p, open) in serialized.chain(concurrent) {
        let (db, history, stop) = (Arc::clone(&db), Arc::clone(&history), Arc::clone(&stop));
        let keys = if open {
            concurrent_keys.clone()
        } else {
            keys.clone()
        };
        let (table, destination, profile) = (table.clone(), destination.clone(), profile.clone());
        // SQLite has one writer at a time: a transaction held open only holds everyone up.
        let hold = if combination.has_db_server() {
            profile.hold
        } else {
            Duration::ZERO
        };
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
                let shape = if open {
                    let hold = rng.u64(0..=hold.as_millis() as u64);
                    Shape::Concurrent {
                        hold: Duration::from_millis(hold),
                    }
                } else {
                    Shape::Serialized
                };
                let rollback = rng.u32(0..100) < profile.rollback_percent;
                let done = db
                    .transact(&table, &destination, &chosen, shape, rollback)
                    .await;
                history.record_commit(done.outcome, done.commit_sent, done.committed, done.written);
                tokio::time::sleep(profile.pause).await;
            }
        });
    }

    // The nemesis, and the supervisor of the relays.
    let mut rng = fastrand::Rng::with_seed(options.seed);
    let mut faults: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut db_killed = 0;
    let mut db_restart_failures = Vec::new();
    let mut kinds = vec![
        Fault::KillRelay,
        Fault::KillRelay,
        Fault::CutBroker,
        Fault::BrokerDown,
        Fault::BlackholeBroker,
    ];
    if matches!(broker, Broker::Nats { .. }) {
        kinds.push(Fault::RestartBroker);
    }
    if db.can_kill_connections() {
        kinds.extend([Fault::KillDbConnections, Fault::KillDbConnections]);
    }
    if server.is_some() {
        kinds.extend([Fault::BlackholeDb, Fault::RestartDb]);
    }
    // `OUTBOX_CHAOS_FAULTS=db-restart,broker-cut` keeps only the faults named (`none`: none),
    // to tell which fault a finding needs; `OUTBOX_CHAOS_VERBOSE=1` prints each fault as it
    // comes and the backlog while the outbox drains.
    let verbose = std::env::var_os("OUTBOX_CHAOS_VERBOSE").is_some_and(|v| v == "1");
    let only: Option<Vec<String>> = std::env::var("OUTBOX_CHAOS_FAULTS")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
    let allowed = |fault: Fault| {
        only.as_ref()
            .is_none_or(|names| names.iter().any(|n| *n == fault.name().replace(' ', "-")))
    };
    kinds.retain(|f| allowed(*f));
    let mut broker = broker;
    let mut server = server;
    let mut proxy = Faulted::new(proxy);
    let mut db_proxy = db_proxy.map(Faulted::new);
    let fault_begin = Instant::now();
    let mut long_outages = schedule_long_outages(
        &mut rng,
        fault_begin,
        profile.fault_phase,
        if allowed(Fault::LongBrokerOutage) {
            profile.long_outages
        } else {
            0
        },
        outage_floor,
    );
    long_outages.reverse();
    // The fault phase lasts at least until the last long outage is over.
    let fault_end = long_outages
        .iter()
        .map(|o| o.start + o.span)
        .fold(fault_begin + profile.fault_phase, Instant::max);
    let mut outages_done = Vec::new();
    let mut next_fault = Instant::now() + gap(&mut rng, profile);
    while Instant::now() < fault_end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = relays.supervise(false);
        proxy.lift_due();
        if let Some(db_proxy) = db_proxy.as_mut() {
            db_proxy.lift_due();
        }
        // Long outages are scheduled; other faults come at random meanwhile.
        if let Some(outage) = long_outages.pop_if(|o| o.start <= Instant::now()) {
            let how = if outage.blackhole {
                proxy.blackhole_for(outage.span);
                "black hole"
            } else {
                proxy.down_for(outage.span);
                "down"
            };
            if verbose {
                eprintln!(
                    "{:>6.1} s: long broker outage ({how}) for {:.1} s",
                    fault_begin.elapsed().as_secs_f64(),
                    outage.span.as_secs_f64()
                );
            }
            outages_done.push((outage.span, how));
            *faults.entry(Fault::LongBrokerOutage).or_insert(0) += 1;
        }
        if Instant::now() < next_fault {
            continue;
        }
        next_fault = Instant::now() + gap(&mut rng, profile);
        let Some(&fault) = rng.choice(&kinds) else {
            continue;
        };
        if verbose {
            eprintln!(
                "{:>6.1} s: {}",
                fault_begin.elapsed().as_secs_f64(),
                fault.name()
            );
        }
        match fault {
            Fault::KillRelay => {
                let i = rng.usize(..relays.len());
                let down = Duration::from_millis(rng.u64(100..2000));
                relays.kill(i, down).await;
            }
            Fault::CutBroker => proxy.proxy.cut(),
            Fault::BrokerDown => proxy.down_for(Duration::from_millis(rng.u64(500..3000))),
            Fault::BlackholeBroker => {
                proxy.blackhole_for(Duration::from_millis(rng.u64(1000..4000)));
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
            Fault::BlackholeDb => {
                if let Some(db_proxy) = db_proxy.as_mut() {
                    db_proxy.blackhole_for(Duration::from_millis(rng.u64(1000..6000)));
                }
            }
            Fault::RestartDb => {
                if let Some(server) = server.as_mut() {
                    let how = if rng.bool() {
                        Restart::Clean
                    } else {
                        Restart::Crash
                    };
                    let down = Duration::from_millis(rng.u64(0..1000));
                    let began = Instant::now();
                    if let Err(err) = server.restart(how, down).await {
                        // A server that does not stop when asked (a clean shutdown that waits
                        // for a client) is a finding; a crash brings it back so that the run
                        // goes on.
                        let failure = format!(
                            "at {:.1} s, a {} restart: {err} (after {:.1} s)",
                            began.duration_since(fault_begin).as_secs_f64(),
                            if how == Restart::Clean {
                                "clean"
                            } else {
                                "crash"
                            },
                            began.elapsed().as_secs_f64()
                        );
                        eprintln!("restarting the database server: {failure}");
                        db_restart_failures.push(failure);
                        if let Err(err) = server.restart(Restart::Crash, Duration::ZERO).await {
                            eprintln!("crashing the database server: {err}");
                            db_restart_failures.push(format!("then crashing it: {err}"));
                        }
                    }
                    if verbose {
                        eprintln!(
                            "{:>6.1} s: db restart ({how:?}) done in {:.1} s",
                            fault_begin.elapsed().as_secs_f64(),
                            began.elapsed().as_secs_f64()
                        );
                    }
                }
            }
            Fault::LongBrokerOutage => {}
        }
        *faults.entry(fault).or_insert(0) += 1;
    }

    // Quiet: producers stop, the broker and the database are reachable, every relay runs.
    stop.store(true, Ordering::Relaxed);
    while producers.join_next().await.is_some() {}
    proxy.lift_all();
    if let Some(db_proxy) = db_proxy.as_mut() {
        db_proxy.lift_all();
    }
    let _ = relays.supervise(true);
    let drain_started = Instant::now();
    let drain_deadline = drain_started + profile.drain_bound;
    let mut pending = u64::MAX;
    while Instant::now() < drain_deadline {
        let _ = relays.supervise(false);
        if let Ok(stats) = db.stats().await {
            pending = stats.pending;
            if verbose {
                eprintln!(
                    "drain {:>5.1} s: {pending} pending",
                    drain_started.elapsed().as_secs_f64()
                );
            }
            if pending == 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain = drain_started.elapsed();
    let unclean_stops = relays.stop(Duration::from_secs(15)).await;
    let dead_letters = db.dead_letters().await.unwrap_or_default();
    let dead_letter_count = match db.stats().await {
        Ok(stats) => stats.dead,
        Err(_) => dead_letters.len() as u64,
    };

    // Read everything back and check.
    let committed = history.committed_ids();
    let read = read_back(&mut broker, &committed, profile.read_bound).await;
    let (deliveries, read_error) = match read {
        Ok(deliveries) => (deliveries, None),
        Err(err) => (Vec::new(), Some(err.to_string())),
    };
    // Pending unknown (the outbox never answered while it drained) or not 0: which messages
    // are still there. When the outbox cannot be read, late cannot be told from lost.
    let (pending_ids, outbox_unreadable) = if pending == 0 {
        (HashSet::new(), None)
    } else {
        match db.pending_ids(&table).await {
            Ok(ids) => {
                if pending == u64::MAX {
                    pending = ids.len() as u64;
                }
                (ids, None)
            }
            Err(err) => (HashSet::new(), Some(err.to_string())),
        }
    };
    let verdict = check_with(
        &history,
        &deliveries,
        &pending_ids,
        combination.order_promise(),
    );
    let versions = db.versions(&table).await.unwrap_or_default();
    let mut business_mismatches = business_check(&history, &deliveries, &pending_ids, &versions);
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
        retry_budget,
        long_outage_floor: outage_floor,
        long_outages: outages_done,
        relay_starts: relays.starts,
        clock_skews: (0..profile.relays)
            .map(|i| skews.get(i).copied().unwrap_or(0))
            .collect(),
        verdict,
        unexpected_exits,
        unclean_stops,
        pending_after_drain: if pending == u64::MAX { 0 } else { pending },
        dead_letter_count,
        dead_letters,
        business_mismatches,
        db_restart_failures,
        outbox_unreadable,
        kept_dir: None,
    };
    drop(relays);
    teardown(broker).await;
    drop(proxy);
    if let Ok(db) = Arc::try_unwrap(db) {
        db.teardown(&table).await;
    }
    drop(db_proxy);
    if let Some(server) = server {
        server.stop().await;
    }
    // `OUTBOX_CHAOS_KEEP=1` keeps the logs of a run that passed too.
    if !report.passed() || std::env::var_os("OUTBOX_CHAOS_KEEP").is_some_and(|v| v == "1") {
        report.kept_dir = Some(dir.keep());
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Runs `relay_bin --config config migrate` (the outbox table, then, with `[cdc]`, the
/// publication and the replication slot), for at most a minute.
async fn migrate(relay_bin: &Path, config: &Path) -> Result<(), BoxError> {
    let run = tokio::process::Command::new(relay_bin)
        .arg("--config")
        .arg(config)
        .arg("migrate")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .map_err(|_| "no exit within 60 s")??;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
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
        Combination::PostgresNats | Combination::SqliteNats | Combination::PostgresCdcNats => {
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
        Combination::MysqlAmqp | Combination::PostgresCdcAmqp => {
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
/// number of committed transactions that touched it. A message of an indeterminate transaction
/// committed if it was delivered or is still pending in the outbox (`pending`).
fn business_check(
    history: &History,
    deliveries: &[Delivery],
    pending: &HashSet<MessageId>,
    versions: &[(String, i64)],
) -> Vec<String> {
    let mut found: HashSet<MessageId> = deliveries.iter().map(|d| d.id).collect();
    found.extend(pending.iter().copied());
    let expected: HashMap<String, i64> = history.committed_per_key(&found);
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
