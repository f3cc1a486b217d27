//! CPU time of the processes taking part in a measurement, from `/proc/<pid>/stat`: where the
//! two cores went tells what limits a figure.

use std::collections::BTreeMap;
use std::time::Instant;

/// Clock ticks per second of `utime` and `stime` (`CLK_TCK`, 100 on Linux).
const TICKS: f64 = 100.0;

/// Process groups, by the command name the kernel reports.
const GROUPS: [(&str, &str); 6] = [
    ("postgres", "postgres"),
    ("mariadbd", "mariadb"),
    ("nats-server", "nats"),
    ("tansu", "tansu"),
    ("beam.smp", "rabbitmq"),
    ("outbox-bench", "bench"),
];

/// CPU ticks per group at one instant.
#[derive(Clone, Debug)]
pub(crate) struct Sample {
    at: Instant,
    ticks: BTreeMap<&'static str, u64>,
}

fn stat_of(pid: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// Samples every process of the known groups; `relays` are child relay processes, counted as
/// group `relay` (the bench's own process is `bench`, which hosts in-process relays).
pub(crate) fn sample(relays: &[u32]) -> Sample {
    let mut ticks: BTreeMap<&'static str, u64> = BTreeMap::new();
    let own = std::process::id();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str() else { continue };
            let Ok(pid_number) = pid.parse::<u32>() else {
                continue;
            };
            let Some((comm, used)) = stat_of(pid) else {
                continue;
            };
            let group = if relays.contains(&pid_number) {
                Some("relay")
            } else if pid_number == own {
                Some("bench")
            } else {
                GROUPS
                    .iter()
                    .find(|(c, group)| comm == *c && *group != "bench")
                    .map(|(_, group)| *group)
            };
            if let Some(group) = group {
                *ticks.entry(group).or_default() += used;
            }
        }
    }
    Sample {
        at: Instant::now(),
        ticks,
    }
}

impl Sample {
    /// Cores used per group between `earlier` and this sample (groups that used less than
    /// 0.01 core left out).
    pub(crate) fn cores_since(&self, earlier: &Sample) -> BTreeMap<String, f64> {
        let secs = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        self.ticks
            .iter()
            .filter_map(|(group, now)| {
                let before = earlier.ticks.get(group).copied().unwrap_or(0);
                let cores = now.saturating_sub(before) as f64 / TICKS / secs;
                (cores >= 0.01).then(|| (group.to_string(), (cores * 100.0).round() / 100.0))
            })
            .collect()
    }
}

/// Load averages from `/proc/loadavg`.
pub(crate) fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// A field of `/proc/<pid>/status` in KiB (`VmHWM`, `VmRSS`).
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|line| line.starts_with(field) && line[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
