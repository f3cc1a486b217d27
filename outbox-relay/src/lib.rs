#![doc = include_str!("../README.md")]

mod backends;
#[cfg(feature = "cdc-postgres")]
mod cdc;
mod config;
mod http;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use outbox_core::{DeadLetterFilter, DynStore, MessageId, Relay, Store};
use tracing::{error, info, warn};

use crate::backends::AnyStore;
use crate::config::{Config, LogFormat, StoreKind, redact};

/// Exit status of a run that failed at run time (a server unreachable, a store error).
const FAILURE: u8 = 1;
/// Exit status of an invalid configuration or command line.
const USAGE: u8 = 2;

/// Publishes committed transactional-outbox messages from a database to a broker.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about)]
struct Cli {
    /// Configuration file (TOML); `OUTBOX_<SECTION>__<KEY>` variables override it.
    #[arg(short, long, env = "OUTBOX_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format (overrides `log.format`).
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Relay from the configured store to the configured broker until SIGTERM or SIGINT.
    Run,
    /// Create or upgrade the outbox tables.
    Migrate,
    /// Backlog, age of the oldest pending message, dead letters, live relays and their share.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List, replay or purge dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Validate the configuration and connect to the store and the broker.
    Check,
    /// Print the SQL that creates the outbox tables (or, with --from, upgrades them), for
    /// schema changes that go through another migration tool. Connects to nothing.
    Schema {
        /// The database (default: the configured store's).
        #[arg(long, value_enum)]
        dialect: Option<StoreKind>,
        /// The outbox table, `schema.table` where the database has schemas (default: the
        /// configured one).
        #[arg(long)]
        table: Option<String>,
        /// The schema version the tables are at; 0 (the default) creates them.
        #[arg(long, default_value_t = 0)]
        from: i32,
        /// MySQL: for the `mysql` command-line client, which splits statements at `;`: the
        /// trigger, whose body holds several, between `DELIMITER` lines.
        #[arg(long)]
        mysql_client: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
    /// List dead letters, the oldest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make dead letters pending again, to be published.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Show what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters for good.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Show what would be purged, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
struct FilterArgs {
    /// Only this message id (repeatable).
    #[arg(long = "id")]
    ids: Vec<MessageId>,
    /// Only this destination.
    #[arg(long)]
    destination: Option<String>,
    /// Only this key.
    #[arg(long)]
    key: Option<String>,
    /// Only dead letters older than this (for example `1h`, `7d`).
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// At most this many.
    #[arg(long)]
    limit: Option<u64>,
}

impl FilterArgs {
    fn filter(&self) -> DeadLetterFilter {
        let mut filter = DeadLetterFilter::all().ids(self.ids.iter().copied());
        if let Some(destination) = &self.destination {
            filter = filter.destination(destination.clone());
        }
        if let Some(key) = &self.key {
            filter = filter.key(key.clone());
        }
        if let Some(age) = self.older_than {
            let age = chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
            filter = filter.dead_before(chrono::Utc::now() - age);
        }
        if let Some(limit) = self.limit {
            filter = filter.limit(limit);
        }
        filter
    }
}

/// The `outbox-relay` program: parses the command line of the process, loads the configuration,
/// runs the subcommand and returns the exit status (0 on success, 1 on a run-time failure, 2 on
/// an invalid configuration or command line).
///
/// It installs process-wide state (the log subscriber, the TLS crypto provider, and for `run`
/// the metrics recorder), so call it once per process, from `main`:
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     outbox_relay::main()
/// }
/// ```
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Schema {
        dialect,
        table,
        from,
        mysql_client,
    } = cli.command
    {
        return schema(cli.config.as_deref(), dialect, table, from, mysql_client);
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("outbox-relay: invalid configuration: {err}");
            return ExitCode::from(USAGE);
        }
    };
    init_logging(
        cli.log_format.unwrap_or(config.log.format),
        config.log.level.as_deref(),
    );
    #[cfg(feature = "tls-rustls")]
    install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("outbox-relay: cannot start the async runtime: {err}");
            return ExitCode::from(FAILURE);
        }
    };
    let code = match runtime.block_on(execute(cli.command, config)) {
        Ok(code) => code,
        Err(err) => {
            error!("{err}");
            eprintln!("outbox-relay: {err}");
            ExitCode::from(FAILURE)
        }
    };
    // Tasks still blocked on a server that stopped answering (a detached store call, a
    // client's blocking thread) must not hold the exit past the shutdown's bound.
    runtime.shutdown_timeout(EXIT_GRACE);
    code
}

/// How long the process waits for its last tasks after the relay stopped.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// Makes ring the process's rustls crypto provider, unless one is installed already. The TLS
/// clients of the databases and brokers that build their rustls configuration without naming a
/// provider take the process's; when a build has both ring and aws-lc-rs (features unify across
/// everything linked in), rustls cannot choose by itself and such a client would panic.
#[cfg(feature = "tls-rustls")]
fn install_crypto_provider() {
    // An error means a provider is installed already, which is all that is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in a file or a log collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn execute(command: Command, config: Config) -> Result<ExitCode, BoxError> {
    match command {
        Command::Run => run(config).await,
        Command::Migrate => {
            let store = connect(&config).await?;
            store.migrate().await?;
            println!("migrated {}", describe_store(&config));
            #[cfg(feature = "cdc-postgres")]
            if let Some(cdc) = cdc::section(&config) {
                cdc::migrate(cdc)
                    .await
                    .map_err(|err| format!("log source ({}): {err}", cdc::describe(cdc)))?;
                println!("log source ready: {}", cdc::describe(cdc));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => status(&config, json).await,
        Command::DeadLetters(command) => dead_letters(&config, command).await,
        Command::Check => check(&config).await,
        // Handled by `main`: it needs no runtime, and no configuration.
        Command::Schema { .. } => Ok(ExitCode::SUCCESS),
    }
}

/// `script` for the `mysql` command-line client: each compound statement (`CREATE TRIGGER`
/// ... `BEGIN` ... `END;`, whose body holds `;`) between `DELIMITER //` and `DELIMITER ;`.
fn delimited(script: &str) -> String {
    let mut out = String::with_capacity(script.len() + 64);
    let mut rest = script;
    // At the start of a line: comments mention the statement too.
    while let Some(start) = rest.find("\nCREATE TRIGGER").map(|at| at + 1) {
        let Some(end) = rest[start..].find("\nEND;").map(|at| start + at) else {
            break;
        };
        out.push_str(&rest[..start]);
        out.push_str("DELIMITER //\n");
        out.push_str(&rest[start..end]);
        out.push_str("\nEND//\nDELIMITER ;");
        rest = &rest[end + "\nEND;".len()..];
    }
    out.push_str(rest);
    out
}

/// `outbox-relay schema`: prints the schema script of `dialect` (else the configured store's)
/// for `table` (else the configured one). Without a configuration file, an incomplete
/// configuration is no error: the store's defaults serve.
fn schema(
    file: Option<&std::path::Path>,
    dialect: Option<StoreKind>,
    table: Option<String>,
    from: i32,
    mysql_client: bool,
) -> ExitCode {
    let mut store = match Config::load(file) {
        Ok(config) => config.store,
        Err(_) if file.is_none() => outbox_sqlx::StoreConfig::new(),
        Err(err) => {
            eprintln!("outbox-relay: invalid configuration: {err}");
            return ExitCode::from(USAGE);
        }
    };
    if let Some(table) = table {
        store.table = table;
    }
    let kind = match dialect {
        Some(kind) => Ok(kind),
        None => StoreKind::from_url(store.url.as_deref().unwrap_or_default())
            .map_err(|err| format!("{err} (or name the database with --dialect)")),
    };
    match kind
        .and_then(|kind| AnyStore::schema_script(kind, &store, from).map_err(|err| err.to_string()))
    {
        Ok(script) if mysql_client => {
            print!("{}", delimited(&script));
            ExitCode::SUCCESS
        }
        Ok(script) => {
            print!("{script}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("outbox-relay: {err}");
            ExitCode::from(USAGE)
        }
    }
}

fn describe_store(config: &Config) -> String {
    format!(
        "{} (table {})",
        redact(config.store.url.as_deref().unwrap_or_default()),
        config.store.table
    )
}

async fn connect(config: &Config) -> Result<AnyStore, BoxError> {
    AnyStore::connect(&config.store)
        .await
        .map_err(|err| format!("store {}: {err}", describe_store(config)).into())
}

async fn run(config: Config) -> Result<ExitCode, BoxError> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|err| format!("cannot install the metrics recorder: {err}"))?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
    };

    let phase = http::Phase::new("connecting to the store");
    let mut background = tokio::task::JoinSet::new();
    if let Some(addr) = config.http.listen {
        let listener = http::bind(addr)
            .await
            .map_err(|err| format!("http.listen {addr}: {err}"))?;
        // The address bound: the port the system chose when the configured one is 0.
        let addr = listener.local_addr().unwrap_or(addr);
        info!(%addr, "serving /healthz, /readyz and /metrics");
        let (phase, handle) = (phase.clone(), metrics.clone());
        background.spawn(async move {
            if let Err(err) = http::serve(listener, phase, handle).await {
                error!(error = %err, "http endpoints stopped");
            }
        });
    }
    background.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            metrics.run_upkeep();
        }
    });

    let Some(store) = wait_for_store(&config, &phase, stopped()).await? else {
        background.abort_all();
        info!("outbox relay stopped before its store answered");
        return Ok(ExitCode::SUCCESS);
    };
    // Tables an older release migrated still relay (a missing piece the relay needs is a
    // schema error of its own), but writers may miss what came since.
    match store.schema_versions().await {
        Ok((found, latest)) if found < latest => warn!(
            found,
            latest,
            "the outbox tables are at an older schema version than this release's: run \
             `outbox-relay migrate` (or the script of `outbox-relay schema --from {found}`)"
        ),
        Ok(_) => {}
        // The relay's own calls report what is wrong with the store.
        Err(err) => warn!(error = %err, "could not read the outbox schema version"),
    }
    #[cfg(feature = "cdc-postgres")]
    let postgres = store.postgres();
    let store = store.into_dyn();
    let publisher = backends::publisher(&config.publisher).await?;
    info!(
        store = %describe_store(&config),
        broker = %backends::describe_publisher(&config.publisher),
        "outbox relay starting"
    );
    let relay = Relay::builder(Arc::clone(&store), Arc::clone(&publisher))
        .config(config.relay.clone())
        .build()?;
    info!(relay = %relay.id(), "relay identity");

    #[cfg(feature = "cdc-postgres")]
    if let Some(cdc) = cdc::section(&config) {
        let postgres = postgres.ok_or("cdc: the log relay needs a PostgreSQL store")?;
        let Some(source) = cdc::connect(cdc, postgres, &phase, config.relay.probe_max, stopped())
            .await
            .map_err(|err| format!("log source ({}): {err}", cdc::describe(cdc)))?
        else {
            background.abort_all();
            info!("outbox relay stopped before its log source started");
            return Ok(ExitCode::SUCCESS);
        };
        let log_relay = outbox_core::LogRelay::builder(source, Arc::clone(&publisher))
            .config(config.relay.clone())
            .build()?;
        let pauses = log_relay.clone();
        phase.running(relay.clone(), Some(Arc::new(move || pauses.pauses())));
        // Either relay failing for good stops the other.
        let (halt_tx, halt) = tokio::sync::watch::channel(false);
        let halted = || {
            let mut halt = halt.clone();
            let stopped = stopped();
            async move {
                tokio::select! {
                    () = stopped => {}
                    _ = halt.wait_for(|halted| *halted) => {}
                }
            }
        };
        let (polled, logged) = tokio::join!(
            async {
                let result = relay.run(halted()).await;
                let _ = halt_tx.send(true);
                result
            },
            async {
                let result = cdc::run(log_relay, cdc, config.relay.stats_interval, halted()).await;
                let _ = halt_tx.send(true);
                result
            },
        );
        logged.map_err(|err| format!("log relay ({}): {err}", cdc::describe(cdc)))?;
        polled?;
        background.abort_all();
        info!("outbox relay stopped");
        return Ok(ExitCode::SUCCESS);
    }
    phase.running(relay.clone(), None);

    relay.run(stopped()).await?;
    background.abort_all();
    info!("outbox relay stopped");
    Ok(ExitCode::SUCCESS)
}

/// Connects to the store, waiting while it is unreachable (a database restarting, a network
/// not up yet) as the relay waits out an outage once it runs: probing from 100 ms up to
/// `relay.probe_max` apart, `/readyz` saying why. `None` when the shutdown signal came first;
/// an error for what waiting cannot mend (a refused password, an invalid URL).
async fn wait_for_store(
    config: &Config,
    phase: &http::Phase,
    stopped: impl std::future::Future<Output = ()>,
) -> Result<Option<AnyStore>, BoxError> {
    tokio::pin!(stopped);
    let mut wait = Duration::from_millis(100);
    loop {
        match AnyStore::connect(&config.store).await {
            Ok(store) => return Ok(Some(store)),
            Err(err) if err.is_transient() => {
                let reason = format!("store {} unreachable: {err}", describe_store(config));
                warn!(error = %err, retry_in = ?wait, "the store is unreachable; waiting for it");
                phase.waiting(&reason);
            }
            Err(err) => return Err(format!("store {}: {err}", describe_store(config)).into()),
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut stopped => return Ok(None),
        }
        wait = (wait * 2).min(config.relay.probe_max);
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM: shutting down"),
                    _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
                }
            }
            Err(err) => {
                error!(error = %err, "cannot watch SIGTERM; only SIGINT stops the relay");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        info!("interrupted: shutting down");
    }
}

async fn status(config: &Config, json: bool) -> Result<ExitCode, BoxError> {
    let store = connect(config).await?.into_dyn();
    let stats = store.stats().await?;
    let members = store.members().await?;
    // On the database's clock, whatever this host's says.
    let age = stats.oldest_pending_age().map(|age| age.as_secs_f64());
    #[cfg(feature = "cdc-postgres")]
    let slot = match cdc::section(config) {
        Some(cdc) => Some(
            cdc::status(cdc)
                .await
                .map_err(|err| format!("log source ({}): {err}", cdc::describe(cdc)))?,
        ),
        None => None,
    };
    if json {
        let relays: Vec<serde_json::Value> = members
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id.as_str(),
                    "partitions": m.partitions.len(),
                    "expires_at": m.expires_at,
                })
            })
            .collect();
        #[allow(unused_mut)]
        let mut value = serde_json::json!({
            "store": describe_store(config),
            "pending": stats.pending,
            "oldest_pending": stats.oldest_pending,
            "oldest_pending_age_seconds": age,
            "dead": stats.dead,
            "published_retained": stats.published_retained,
            "relays": relays,
        });
        #[cfg(feature = "cdc-postgres")]
        if let Some(slot) = &slot {
            value["cdc"] = serde_json::json!({
                "slot": slot.slot,
                "confirmed_lsn": slot.confirmed_flush_lsn.to_string(),
                "current_wal_lsn": slot.current_wal_lsn.to_string(),
                "lag_bytes": slot.lag_bytes,
                "wal_status": slot.wal_status,
                "active": slot.active,
            });
        }
        println!("{value}");
    } else {
        println!("store       {}", describe_store(config));
        println!("pending     {}", stats.pending);
        match (stats.oldest_pending, age) {
            (Some(at), Some(age)) => println!("oldest      {} ({:.1}s ago)", at.to_rfc3339(), age),
            _ => println!("oldest      -"),
        }
        println!("dead        {}", stats.dead);
        println!("retained    {}", stats.published_retained);
        println!("relays      {} live", members.len());
        for member in &members {
            println!(
                "  {}  {} of {} partitions",
                member.id,
                member.partitions.len(),
                outbox_core::PARTITIONS
            );
        }
        #[cfg(feature = "cdc-postgres")]
        if let Some(slot) = &slot {
            println!(
                "slot        {}  confirmed {}  lag {} bytes  {}{}",
                slot.slot,
                slot.confirmed_flush_lsn,
                slot.lag_bytes,
                if slot.active { "streaming" } else { "idle" },
                if slot.is_lost() { "  LOST" } else { "" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn dead_letters(config: &Config, command: DeadLetterCommand) -> Result<ExitCode, BoxError> {
    let store = connect(config).await?.into_dyn();
    match command {
        DeadLetterCommand::List { filter, json } => {
            print_dead_letters(&store, &filter.filter(), json).await?;
        }
        DeadLetterCommand::Replay { filter, dry_run } => {
            let filter = filter.filter();
            if dry_run {
                let n = print_dead_letters(&store, &filter, false).await?;
                println!("would replay {n} dead letter(s)");
            } else {
                let n = store.replay(&filter).await?;
                println!("replayed {n} dead letter(s)");
            }
        }
        DeadLetterCommand::Purge { filter, dry_run } => {
            let filter = filter.filter();
            if dry_run {
                let n = print_dead_letters(&store, &filter, false).await?;
                println!("would purge {n} dead letter(s)");
            } else {
                let n = store.purge(&filter).await?;
                println!("purged {n} dead letter(s)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn print_dead_letters(
    store: &Arc<dyn DynStore>,
    filter: &DeadLetterFilter,
    json: bool,
) -> Result<usize, BoxError> {
    let dead = store.dead_letters(filter).await?;
    for d in &dead {
        let m = &d.message;
        if json {
            let value = serde_json::json!({
                "id": m.id,
                "destination": m.destination,
                "key": m.key,
                "attempts": m.attempts,
                "created_at": m.created_at,
                "dead_at": d.dead_at,
                "last_error": m.last_error,
                "headers": m.headers,
                "payload_bytes": m.payload.len(),
            });
            println!("{value}");
        } else {
            println!(
                "{}  {}  key={}  attempts={}  dead_at={}  error={}",
                m.id,
                m.destination,
                m.key.as_deref().unwrap_or("-"),
                m.attempts,
                d.dead_at.to_rfc3339(),
                m.last_error.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(dead.len())
}

async fn check(config: &Config) -> Result<ExitCode, BoxError> {
    println!("config      ok");
    let mut healthy = true;
    match AnyStore::connect(&config.store).await {
        Ok(store) => match store.into_dyn().stats().await {
            Ok(stats) => println!(
                "store       ok: {} ({} pending)",
                describe_store(config),
                stats.pending
            ),
            Err(err) => {
                healthy = false;
                println!("store       FAILED: {}: {err}", describe_store(config));
            }
        },
        Err(err) => {
            healthy = false;
            println!("store       FAILED: {}: {err}", describe_store(config));
        }
    }
    #[cfg(feature = "cdc-postgres")]
    if let Some(cdc) = cdc::section(config) {
        match cdc::check(cdc).await {
            Ok(slot) if slot.is_lost() => {
                healthy = false;
                println!(
                    "log source  FAILED: {}: the slot is lost ({})",
                    cdc::describe(cdc),
                    slot.wal_status
                );
            }
            Ok(slot) => println!(
                "log source  ok: {} (lag {} bytes)",
                cdc::describe(cdc),
                slot.lag_bytes
            ),
            Err(err) => {
                healthy = false;
                println!("log source  FAILED: {}: {err}", cdc::describe(cdc));
            }
        }
    }
    let broker = backends::describe_publisher(&config.publisher);
    match backends::publisher(&config.publisher).await {
        Ok(publisher) => {
            match tokio::time::timeout(Duration::from_secs(10), publisher.check_dyn()).await {
                Ok(Ok(())) => println!("broker      ok: {broker}"),
                Ok(Err(err)) => {
                    healthy = false;
                    println!("broker      FAILED: {broker}: {err}");
                }
                Err(_) => {
                    healthy = false;
                    println!("broker      FAILED: {broker}: no answer within 10s");
                }
            }
        }
        Err(err) => {
            healthy = false;
            println!("broker      FAILED: {broker}: {err}");
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FAILURE)
    })
}
