//! Relay processes on one PostgreSQL table: throughput of 1, 2 and 4 of them with per-key order
//! checked at the broker (scaling), and the peak RSS of one draining a large backlog (memory).
//!
//! The relays are this binary in its `relay-child` mode. They join and share the partitions
//! first; the clock starts when all of them are told to go, and stops when the table is empty.

use std::process::Stdio;
use std::time::{Duration, Instant};

use outbox_sqlx::sqlx;
use outbox_testkit::env::unique_name;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::brokers::{Broker, BrokerKind};
use crate::report::Report;
use crate::services::Services;
use crate::stores::{BenchStore, StoreKind};
use crate::{Options, Res, Scenario, cpu, workload};

/// Peak RSS the project aims at for a relay draining 1,000,000 messages, in MiB.
const MEMORY_TARGET_MIB: f64 = 64.0;

pub(crate) async fn run_scaling(options: &Options, services: &Services, report: &mut Report) {
    for relays in options.relays.clone() {
        let label = format!("{relays} relay{}", if relays == 1 { "" } else { "s" });
        let outcome = scaling(options, services, relays).await;
        report.outcome(Scenario::Scaling, &label, outcome);
    }
}

pub(crate) async fn run_memory(options: &Options, services: &Services, report: &mut Report) {
    let outcome = memory(options, services).await;
    report.outcome(Scenario::Memory, "postgres-nats", outcome);
}

/// Relay processes, started and sharing the partitions, not yet relaying.
struct Relays {
    children: Vec<Child>,
}

impl Relays {
    async fn start(
        count: usize,
        options: &Options,
        services: &Services,
        store: &BenchStore,
    ) -> Res<Self> {
        let exe = std::env::current_exe()?;
        let mut relays = Relays {
            children: Vec::new(),
        };
        for _ in 0..count {
            let child = Command::new(&exe)
                .arg("relay-child")
                .args(["--postgres", &services.postgres])
                .args(["--table", &store.table])
                .args(["--nats", &services.nats])
                .args(["--batch-size", &options.batch_size.to_string()])
                .args(["--concurrency", &options.concurrency.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()?;
            relays.children.push(child);
        }
        for child in &mut relays.children {
            let stdout = child.stdout.take().ok_or("no stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
            match ready {
                Ok(Ok(Some(line))) if line.trim() == "READY" => {}
                other => return Err(format!("a relay process did not start: {other:?}").into()),
            }
        }
        // Wait until every relay owns its share, so that the clock measures relaying only.
        let pool = sqlx::PgPool::connect(&services.postgres).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (owners, owned): (i64, i64) = sqlx::query_as(&format!(
                "SELECT count(DISTINCT owner), count(*) FROM {}_partitions \
                 WHERE owner <> '' AND expires_at > now()",
                store.table
            ))
            .fetch_one(&pool)
            .await?;
            if owners == i64::try_from(count)? && owned == i64::from(outbox_core::PARTITIONS) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "relays did not share the partitions: {owners} owners of {owned}"
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pool.close().await;
        Ok(relays)
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    async fn tell(&mut self, word: &str) -> Res<()> {
        for child in &mut self.children {
            let stdin = child.stdin.as_mut().ok_or("no stdin")?;
            stdin.write_all(format!("{word}\n").as_bytes()).await?;
            stdin.flush().await?;
        }
        Ok(())
    }

    /// Stops them gracefully, killing those that do not stop within 15 s.
    async fn stop(mut self) {
        let _ = self.tell("stop").await;
        for child in &mut self.children {
            match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("a relay process did not stop; killing it");
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// Relays `n` messages with `count` relay processes; returns (seconds, cores, peak RSS KiB of
/// each process).
async fn drain_with(
    count: usize,
    options: &Options,
    services: &Services,
    store: &BenchStore,
    n: u64,
) -> Res<(Duration, serde_json::Value, Vec<u64>)> {
    let mut relays = Relays::start(count, options, services, store).await?;
    let pids = relays.pids();
    let cpu0 = cpu::sample(&pids);
    let started = Instant::now();
    relays.tell("go").await?;
    let limit = Duration::from_secs(120).max(Duration::from_millis(n));
    let result = loop {
        if !store.any_pending().await? {
            break Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            break Err(format!(
                "the relays did not drain {n} messages in {limit:?}"
            ));
        }
        if let Some(child) = relays
            .children
            .iter_mut()
            .find_map(|c| c.try_wait().ok().flatten())
        {
            break Err(format!("a relay process exited: {child}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cores = cpu::sample(&pids).cores_since(&cpu0);
    let peaks: Vec<u64> = pids
        .iter()
        .map(|pid| cpu::status_kib(*pid, "VmHWM").unwrap_or(0))
        .collect();
    relays.stop().await;
    let took = result?;
    let _ = n;
    Ok((took, json!(cores), peaks))
}

async fn scaling(options: &Options, services: &Services, count: usize) -> Res<serde_json::Value> {
    let n = options.messages();
    let keys = options.keys_for(n);
    let name = unique_name("bench_scale");
    let store = BenchStore::create(StoreKind::Postgres, services, &name, 4).await?;
    let broker = match Broker::setup(BrokerKind::Nats, services, &name).await {
        Ok(broker) => broker,
        Err(err) => {
            store.drop_all().await;
            return Err(err);
        }
    };
    let result = async {
        store.fill(&broker.destination(), n, keys).await?;
        let load = cpu::load();
        let (took, cores, peaks) = drain_with(count, options, services, &store, n).await?;
        let deliveries = broker.read_nats(n).await?;
        let (distinct, duplicates, violations) = workload::check_order(deliveries, n);
        Ok::<_, crate::BoxError>(json!({
            "relays": count,
            "messages": n,
            "workload": keys.workload().name(),
            "keys": keys.count(),
            "msgs_per_s": (n as f64 / took.as_secs_f64()).round(),
            "secs": took.as_secs_f64(),
            "delivered_distinct": distinct,
            "duplicates": duplicates,
            "order_violations": violations,
            "order_held": violations == 0 && distinct == n,
            "peak_rss_mib": peaks.iter().map(|k| (*k as f64 / 1024.0 * 10.0).round() / 10.0).collect::<Vec<_>>(),
            "batch_size": options.batch_size,
            "concurrency": options.concurrency,
            "cpu_cores": cores,
            "load_before": load,
        }))
    }
    .await;
    broker.teardown().await;
    store.drop_all().await;
    let value = result?;
    if value["order_held"] != json!(true) {
        return Err(format!("per-key order or completeness failed: {value}").into());
    }
    Ok(value)
}

async fn memory(options: &Options, services: &Services) -> Res<serde_json::Value> {
    let n = options.backlog();
    let keys = options.keys_for(n);
    let name = unique_name("bench_memory");
    let store = BenchStore::create(StoreKind::Postgres, services, &name, 4).await?;
    let broker = match Broker::setup(BrokerKind::Nats, services, &name).await {
        Ok(broker) => broker,
        Err(err) => {
            store.drop_all().await;
            return Err(err);
        }
    };
    let result = async {
        eprintln!("  filling {n} messages");
        let fill = store.fill(&broker.destination(), n, keys).await?;
        let load = cpu::load();
        let (took, cores, peaks) = drain_with(1, options, services, &store, n).await?;
        let stored = broker.stored().await?;
        if stored != Some(n) {
            return Err(format!("the stream holds {stored:?} messages, {n} expected").into());
        }
        let peak_mib = peaks.first().copied().unwrap_or(0) as f64 / 1024.0;
        Ok::<_, crate::BoxError>(json!({
            "backlog": n,
            "workload": keys.workload().name(),
            "keys": keys.count(),
            "peak_rss_mib": (peak_mib * 10.0).round() / 10.0,
            "target_mib": MEMORY_TARGET_MIB,
            "met": peak_mib > 0.0 && peak_mib <= MEMORY_TARGET_MIB,
            "msgs_per_s": (n as f64 / took.as_secs_f64()).round(),
            "secs": took.as_secs_f64(),
            "fill_msgs_per_s": (n as f64 / fill.as_secs_f64()).round(),
            "batch_size": options.batch_size,
            "concurrency": options.concurrency,
            "cpu_cores": cores,
            "load_before": load,
        }))
    }
    .await;
    broker.teardown().await;
    store.drop_all().await;
    result
}
