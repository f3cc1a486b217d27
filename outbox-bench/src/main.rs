//! `outbox-bench`: measures the outbox relay against its raw parts on the servers of this
//! machine, and prints each figure next to baselines taken in the same run.
//!
//! Scenarios (each prints a table and one `RESULT {json}` line per result):
//!
//! - `enqueue`: business transactions with and without an outbox message, per store;
//! - `drain`: a backlog relayed to a broker, against a raw publish, a raw table drain and hand
//!   relays (the naive relay a user would write) on 1 and 2 workers;
//! - `latency`: commit-to-broker-ack at a steady rate, through LISTEN/NOTIFY, of the relay
//!   and of a hand relay;
//! - `scaling`: 1, 2 and 4 relay processes on one PostgreSQL table, per-key order checked;
//! - `memory`: peak RSS of a relay process draining a large backlog;
//! - `log-drain` and `log-latency`: the log relay (change data capture) next to the polling
//!   relay, on a PostgreSQL cluster of the run's own with `wal_level = logical`.
//!
//! `outbox-bench --quick` runs them all on small numbers (the CI test does); see
//! `docs/benchmarks.md` for the figures and the command that produced them.

mod brokers;
mod child;
mod cpu;
mod drain;
mod enqueue;
mod hand;
mod inbox;
mod latency;
mod logrelay;
mod plot;
mod probe;
mod report;
mod scaling;
mod services;
mod stores;
mod timing;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::report::Report;
use crate::services::Services;
use crate::workload::{Keys, Workload};

/// Boxed error of the bench: every failure ends the scenario it happened in.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Result of the bench.
pub(crate) type Res<T> = Result<T, BoxError>;

/// Benchmarks the outbox relay against raw database drains and raw broker publishes.
#[derive(Debug, Parser)]
#[command(name = "outbox-bench", about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    child: Option<ChildCommand>,
}

#[derive(Debug, Subcommand)]
enum ChildCommand {
    /// A relay process for the scaling and memory scenarios (started by the bench itself).
    #[command(hide = true)]
    RelayChild(child::ChildArgs),
}

/// A scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// Business transactions with and without an outbox message.
    Enqueue,
    /// Consumer transactions with and without an inbox record.
    Inbox,
    /// A backlog relayed to a broker, against raw baselines.
    Drain,
    /// Commit-to-ack latency at a steady rate.
    Latency,
    /// Several relay processes on one table.
    Scaling,
    /// Peak RSS of a relay process draining a large backlog.
    Memory,
    /// A backlog relayed by the log relay (change data capture), next to the polling relay.
    LogDrain,
    /// Commit-to-ack latency of the log relay, next to the polling relay.
    LogLatency,
}

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Enqueue => "enqueue",
            Scenario::Inbox => "inbox",
            Scenario::Drain => "drain",
            Scenario::Latency => "latency",
            Scenario::Scaling => "scaling",
            Scenario::Memory => "memory",
            Scenario::LogDrain => "log-drain",
            Scenario::LogLatency => "log-latency",
        }
    }
}

/// What to run and how big.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Options {
    /// Small numbers everywhere: the whole run takes well under two minutes (CI runs it).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Scenarios to run, in this order (all by default).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) scenarios: Vec<Scenario>,
    /// Drain pairs to run, as store-broker (default: postgres-nats, postgres-kafka,
    /// postgres-amqp, postgres-noop, mysql-nats, sqlite-nats); broker `noop` confirms every
    /// message at once without I/O.
    #[arg(long, value_delimiter = ',')]
    pub(crate) pairs: Vec<String>,
    /// Messages in the backlog of the drain and scaling scenarios [100000; quick 3000].
    #[arg(long)]
    pub(crate) messages: Option<u64>,
    /// Backlog of the memory scenario [1000000; quick 20000].
    #[arg(long)]
    pub(crate) backlog: Option<u64>,
    /// Messages per second of the latency scenario.
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u64,
    /// Seconds of the latency scenario [30; quick 3].
    #[arg(long)]
    pub(crate) latency_secs: Option<f64>,
    /// Seconds per enqueue measurement [4; quick 0.5].
    #[arg(long)]
    pub(crate) enqueue_secs: Option<f64>,
    /// Relay processes of the scaling scenario.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4])]
    pub(crate) relays: Vec<usize>,
    /// Relay batch size in the drain, scaling and memory scenarios.
    #[arg(long, default_value_t = 1000)]
    pub(crate) batch_size: usize,
    /// Relay batches in flight in the drain, scaling and memory scenarios.
    #[arg(long, default_value_t = 4)]
    pub(crate) concurrency: usize,
    /// Relay claims under way at once in the drain scenario (the relay's default: 2).
    #[arg(long, default_value_t = 2)]
    pub(crate) claims: usize,
    /// Messages per key of the `uniform` workload (each key comes back every
    /// `messages / messages_per_key` messages).
    #[arg(long, default_value_t = 10)]
    pub(crate) messages_per_key: u64,
    /// How the messages of the drain, scaling and memory backlogs spread over keys.
    #[arg(long, value_enum, default_value_t = Workload::Uniform)]
    pub(crate) workload: Workload,
    /// Kafka and NATS publishers with `pipeline_keys`: a call carries several messages of a
    /// key (off by default, as in the publishers).
    #[arg(long)]
    pub(crate) pipeline_keys: bool,
    /// Writes the drain and latency plot (SVG) here.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// Writes the results as a Markdown table here.
    #[arg(long)]
    pub(crate) markdown: Option<PathBuf>,
}

impl Options {
    pub(crate) fn messages(&self) -> u64 {
        self.messages
            .unwrap_or(if self.quick { 3_000 } else { 100_000 })
    }

    pub(crate) fn backlog(&self) -> u64 {
        self.backlog
            .unwrap_or(if self.quick { 20_000 } else { 1_000_000 })
    }

    pub(crate) fn latency_duration(&self) -> Duration {
        Duration::from_secs_f64(
            self.latency_secs
                .unwrap_or(if self.quick { 3.0 } else { 30.0 }),
        )
    }

    pub(crate) fn enqueue_duration(&self) -> Duration {
        Duration::from_secs_f64(
            self.enqueue_secs
                .unwrap_or(if self.quick { 0.5 } else { 4.0 }),
        )
    }

    pub(crate) fn keys_for(&self, messages: u64) -> Keys {
        Keys::new(self.workload, messages, self.messages_per_key)
    }

    fn scenarios(&self) -> Vec<Scenario> {
        if self.scenarios.is_empty() {
            vec![
                Scenario::Enqueue,
                Scenario::Inbox,
                Scenario::Drain,
                Scenario::Latency,
                Scenario::Scaling,
                Scenario::Memory,
                Scenario::LogDrain,
                Scenario::LogLatency,
            ]
        } else {
            self.scenarios.clone()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("outbox-bench: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(ChildCommand::RelayChild(args)) = cli.child {
        return match runtime.block_on(child::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("outbox-bench relay-child: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let ok = runtime.block_on(bench(cli.options));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn bench(options: Options) -> bool {
    probe::install();
    let services = Services::from_env();
    let mut report = Report::new(options.quick);
    report.machine(&services).await;
    for scenario in options.scenarios() {
        let started = std::time::Instant::now();
        eprintln!("== {} ==", scenario.name());
        match scenario {
            Scenario::Enqueue => enqueue::run(&options, &services, &mut report).await,
            Scenario::Inbox => inbox::run(&options, &services, &mut report).await,
            Scenario::Drain => drain::run(&options, &services, &mut report).await,
            Scenario::Latency => latency::run(&options, &services, &mut report).await,
            Scenario::Scaling => scaling::run_scaling(&options, &services, &mut report).await,
            Scenario::Memory => scaling::run_memory(&options, &services, &mut report).await,
            Scenario::LogDrain | Scenario::LogLatency => {
                logrelay::run(&options, &services, &mut report, scenario).await;
            }
        }
        eprintln!(
            "== {} done in {:.1}s ==",
            scenario.name(),
            started.elapsed().as_secs_f64()
        );
    }
    report.print_tables();
    if let Some(path) = &options.markdown
        && let Err(err) = std::fs::write(path, report.markdown())
    {
        eprintln!("cannot write {}: {err}", path.display());
        return false;
    }
    if let Some(path) = &options.plot
        && let Err(err) = plot::draw(&report, path)
    {
        eprintln!("cannot draw {}: {err}", path.display());
        return false;
    }
    report.ok()
}
