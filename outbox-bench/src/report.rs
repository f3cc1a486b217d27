//! Results: one `RESULT {json}` line each as soon as measured, tables at the end, Markdown for
//! the documentation.

use serde_json::{Value, json};

use crate::Scenario;
use crate::services::{Services, Unavailable};

/// One measured (or skipped, or failed) result.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) scenario: Scenario,
    pub(crate) label: String,
    pub(crate) value: Value,
}

/// Everything measured in this run.
#[derive(Debug)]
pub(crate) struct Report {
    quick: bool,
    pub(crate) entries: Vec<Entry>,
    machine: Value,
    failed: bool,
}

type Column = (&'static str, &'static str);

const ENQUEUE: &[Column] = &[
    ("store", "store"),
    ("writers", "writers"),
    ("tx/s without", "tx_per_s_without"),
    ("tx/s with outbox", "tx_per_s_with"),
    ("overhead", "overhead"),
    ("notify = false", "overhead_row_without_notify"),
    ("plain INSERT", "overhead_plain_insert"),
    ("target", "target_overhead"),
    ("met", "met"),
];
const INBOX: &[Column] = &[
    ("store", "store"),
    ("consumers", "consumers"),
    ("tx/s without", "tx_per_s_without"),
    ("tx/s with inbox", "tx_per_s_with"),
    ("overhead", "overhead"),
];
const DRAIN: &[Column] = &[
    ("pair", "pair"),
    ("workload", "workload"),
    ("messages", "messages"),
    ("relay msg/s", "relay_msgs_per_s"),
    ("raw publish msg/s", "raw_publish_msgs_per_s"),
    ("raw drain msg/s", "raw_drain_msgs_per_s"),
    ("hand 1 msg/s", "hand1_msgs_per_s"),
    ("hand 2 msg/s", "hand2_msgs_per_s"),
    ("ratio to lower", "ratio"),
    ("relay / hand 1", "ratio_hand1"),
    ("relay / hand 2", "ratio_hand2"),
    ("target", "target_ratio"),
    ("met", "met"),
    ("mean batch", "mean_batch"),
    ("claim ms (busy)", "claim_summary"),
    ("CPU µs/msg in relay run", "cpu_us_per_msg_relay_run"),
    ("CPU µs/msg hand 2", "cpu_us_per_msg_hand2"),
];
const LATENCY: &[Column] = &[
    ("pair", "pair"),
    ("msg/s", "achieved_msgs_per_s"),
    ("p50 ms", "p50_ms"),
    ("p95 ms", "p95_ms"),
    ("p99 ms", "p99_ms"),
    ("max ms", "max_ms"),
    ("commit to claim p50", "breakdown/commit_to_claim/p50_ms"),
    ("claim p50", "breakdown/claim/p50_ms"),
    (
        "claim to call p50",
        "breakdown/claim_to_publish_call/p50_ms",
    ),
    ("publish call p50", "breakdown/publish_call/p50_ms"),
    ("settle p50", "breakdown/settle/p50_ms"),
    ("hand p50 ms", "hand/p50_ms"),
    ("hand p99 ms", "hand/p99_ms"),
    ("p50 vs hand", "p50_vs_hand"),
    ("p99 vs hand", "p99_vs_hand"),
    ("target p50/p99", "target"),
    ("met", "met"),
];
const SCALING: &[Column] = &[
    ("relays", "relays"),
    ("messages", "messages"),
    ("msg/s", "msgs_per_s"),
    ("order held", "order_held"),
    ("duplicates", "duplicates"),
    ("peak RSS MiB", "peak_rss_mib"),
    ("cores", "cpu_cores"),
];
const MEMORY: &[Column] = &[
    ("backlog", "backlog"),
    ("peak RSS MiB", "peak_rss_mib"),
    ("target MiB", "target_mib"),
    ("met", "met"),
    ("msg/s", "msgs_per_s"),
    ("cores", "cpu_cores"),
];

const LOG_DRAIN: &[Column] = &[
    ("pair", "label"),
    ("log msg/s", "log_msgs_per_s"),
    ("polling msg/s", "polling_msgs_per_s"),
    ("raw drain msg/s", "raw_drain_msgs_per_s"),
    ("log/polling", "log_vs_polling"),
    ("log/raw", "log_vs_raw_drain"),
    ("met", "met"),
];

const LOG_LATENCY: &[Column] = &[
    ("pair", "label"),
    ("msg/s", "rate_msgs_per_s"),
    ("log p50 ms", "log_p50_ms"),
    ("log p99 ms", "log_p99_ms"),
    ("polling p50 ms", "polling_p50_ms"),
    ("polling p99 ms", "polling_p99_ms"),
    ("p50 log/polling", "p50_log_vs_polling"),
    ("met", "met"),
];

fn columns(scenario: Scenario) -> &'static [Column] {
    match scenario {
        Scenario::Enqueue => ENQUEUE,
        Scenario::Inbox => INBOX,
        Scenario::Drain => DRAIN,
        Scenario::Latency => LATENCY,
        Scenario::Scaling => SCALING,
        Scenario::Memory => MEMORY,
        Scenario::LogDrain => LOG_DRAIN,
        Scenario::LogLatency => LOG_LATENCY,
    }
}

/// A value as a table cell; `path` may go into objects with `/`.
fn cell(value: &Value, path: &str) -> String {
    if path == "claim_summary" {
        let claims = &value["store_calls"]["claims"];
        return match (claims.get("mean_ms"), claims.get("busy")) {
            (Some(mean), Some(busy)) => format!("{mean} ({busy})"),
            _ => "-".into(),
        };
    }
    if path == "target" {
        return match (value.get("target_p50_ms"), value.get("target_p99_ms")) {
            (Some(a), Some(b)) => format!("{a}/{b}"),
            _ => "-".into(),
        };
    }
    let mut v = value;
    for part in path.split('/') {
        match v.get(part) {
            Some(inner) => v = inner,
            None => return "-".into(),
        }
    }
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "NO".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => thousands(f as i64),
            _ => n.to_string(),
        },
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        Value::Array(items) => items
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn package_version(package: &str) -> Option<String> {
    command_output("dpkg-query", &["-W", "-f", "${Version}", package])
}

impl Report {
    pub(crate) fn new(quick: bool) -> Self {
        Self {
            quick,
            entries: Vec::new(),
            machine: Value::Null,
            failed: false,
        }
    }

    /// Describes the machine and the servers (printed as a `RESULT` line of scenario
    /// `machine`).
    pub(crate) async fn machine(&mut self, services: &Services) {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_mib = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| kib / 1024);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned());
        let postgres = async {
            let pool = outbox_sqlx::sqlx::PgPool::connect(&services.postgres)
                .await
                .ok()?;
            let version: String = outbox_sqlx::sqlx::query_scalar("SHOW server_version")
                .fetch_one(&pool)
                .await
                .ok()?;
            pool.close().await;
            Some(version)
        }
        .await;
        let mariadb = async {
            let pool = outbox_sqlx::sqlx::MySqlPool::connect(&services.mysql)
                .await
                .ok()?;
            let version: String = outbox_sqlx::sqlx::query_scalar("SELECT VERSION()")
                .fetch_one(&pool)
                .await
                .ok()?;
            pool.close().await;
            Some(version)
        }
        .await;
        let nats = async {
            let client = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                async_nats::connect(services.nats.as_str()),
            )
            .await
            .ok()?
            .ok()?;
            Some(client.server_info().version)
        }
        .await;
        let sqlite = async {
            let pool = outbox_sqlx::sqlx::SqlitePool::connect("sqlite::memory:")
                .await
                .ok()?;
            let version: String = outbox_sqlx::sqlx::query_scalar("SELECT sqlite_version()")
                .fetch_one(&pool)
                .await
                .ok()?;
            Some(version)
        }
        .await;
        self.machine = json!({
            "scenario": "machine",
            "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "cpu": cpu_model,
            "mem_total_mib": mem_total_mib,
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
            "quick": self.quick,
            "rustc": command_output("rustc", &["--version"]),
            "postgres": postgres,
            "mariadb": mariadb,
            "sqlite": sqlite,
            "nats_server": nats,
            "rabbitmq": package_version("rabbitmq-server"),
            "tansu": command_output("tansu", &["--version"]),
            "load": crate::cpu::load(),
        });
        println!("RESULT {}", self.machine);
    }

    /// Records what a measurement came to: a result, a skip (server missing and not
    /// required), or a failure.
    pub(crate) fn outcome(&mut self, scenario: Scenario, label: &str, outcome: crate::Res<Value>) {
        match outcome {
            Ok(value) => self.add(scenario, label, value),
            Err(err) => match err.downcast_ref::<Unavailable>() {
                Some(Unavailable::Skip(reason)) => {
                    eprintln!("  {} {label}: skipped: {reason}", scenario.name());
                    self.add(scenario, label, json!({ "skipped": reason }));
                }
                None => self.error(scenario, label, &err.to_string()),
            },
        }
    }

    pub(crate) fn error(&mut self, scenario: Scenario, label: &str, error: &str) {
        eprintln!("  {} {label}: FAILED: {error}", scenario.name());
        self.failed = true;
        self.add(scenario, label, json!({ "error": error }));
    }

    fn add(&mut self, scenario: Scenario, label: &str, mut value: Value) {
        let fields = value
            .as_object_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut line = serde_json::Map::new();
        line.insert("scenario".into(), json!(scenario.name()));
        line.insert("label".into(), json!(label));
        line.extend(fields);
        let value = Value::Object(line);
        println!("RESULT {value}");
        self.entries.push(Entry {
            scenario,
            label: label.to_owned(),
            value,
        });
    }

    /// True when nothing failed.
    pub(crate) fn ok(&self) -> bool {
        !self.failed
    }

    fn scenarios(&self) -> Vec<Scenario> {
        let mut seen = Vec::new();
        for entry in &self.entries {
            if !seen.contains(&entry.scenario) {
                seen.push(entry.scenario);
            }
        }
        seen
    }

    fn rows(&self, scenario: Scenario) -> Vec<Vec<String>> {
        self.entries
            .iter()
            .filter(|e| e.scenario == scenario)
            .map(|e| {
                if let Some(reason) = e.value.get("skipped").or_else(|| e.value.get("error")) {
                    let what = if e.value.get("skipped").is_some() {
                        "skipped"
                    } else {
                        "FAILED"
                    };
                    let mut row = vec![e.label.clone(), format!("{what}: {reason}")];
                    row.resize(columns(scenario).len(), String::new());
                    row
                } else {
                    columns(scenario)
                        .iter()
                        .map(|(_, path)| cell(&e.value, path))
                        .collect()
                }
            })
            .collect()
    }

    /// Prints one aligned table per scenario.
    pub(crate) fn print_tables(&self) {
        for scenario in self.scenarios() {
            let headers: Vec<String> = columns(scenario)
                .iter()
                .map(|(h, _)| (*h).to_owned())
                .collect();
            let rows = self.rows(scenario);
            // Skipped and failed rows say why in their second cell, which sets no width.
            let widths: Vec<usize> = (0..headers.len())
                .map(|i| {
                    rows.iter()
                        .filter(|r| r.len() < 3 || !r[2].is_empty() || i != 1)
                        .map(|r| r[i].len())
                        .chain([headers[i].len()])
                        .max()
                        .unwrap_or(0)
                        .min(60)
                })
                .collect();
            println!("\n{}", scenario.name());
            let line = |cells: &[String]| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            };
            println!("{}", line(&headers));
            for row in rows {
                println!("{}", line(&row));
            }
        }
    }

    /// The tables in Markdown, with the machine they were measured on.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        out.push_str(&format!(
            "Measured on {} cores ({}), {} MiB of memory, Linux {}, {} build, {}; PostgreSQL {}, \
             MariaDB {}, SQLite {}, NATS {}, RabbitMQ {}, {}. Load average at the start: {}.\n",
            m["nproc"],
            cell(m, "cpu"),
            m["mem_total_mib"],
            cell(m, "kernel"),
            cell(m, "build"),
            cell(m, "rustc"),
            cell(m, "postgres"),
            cell(m, "mariadb"),
            cell(m, "sqlite"),
            cell(m, "nats_server"),
            cell(m, "rabbitmq"),
            cell(m, "tansu"),
            cell(m, "load"),
        ));
        for scenario in self.scenarios() {
            out.push_str(&format!("\n### {}\n\n", scenario.name()));
            let headers: Vec<&str> = columns(scenario).iter().map(|(h, _)| *h).collect();
            out.push_str(&format!("| {} |\n", headers.join(" | ")));
            out.push_str(&format!(
                "|{}\n",
                headers.iter().map(|_| " --- |").collect::<String>()
            ));
            for row in self.rows(scenario) {
                out.push_str(&format!("| {} |\n", row.join(" | ")));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_format_numbers_and_paths() {
        let v = json!({"a": 123456.0, "b": {"c": 0.42}, "t": true, "o": {"x": 1}});
        assert_eq!(cell(&v, "a"), "123,456");
        assert_eq!(cell(&v, "b/c"), "0.42");
        assert_eq!(cell(&v, "t"), "yes");
        assert_eq!(cell(&v, "missing"), "-");
        assert_eq!(cell(&v, "o"), "x 1");
    }
}
