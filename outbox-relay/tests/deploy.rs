//! The alert rules and the Grafana dashboard shipped in `deploy/`: the rules load in
//! Prometheus and fire as their unit tests say (`promtool`, from Debian's `prometheus`
//! package), and every metric they and the dashboard name is one the relay exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use outbox_core::metrics as m;
use outbox_testkit::env::or_skip;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Metric names the relay exports.
fn exported() -> BTreeSet<&'static str> {
    [
        m::PUBLISHED,
        m::RETRIED,
        m::DEAD_LETTERED,
        m::RELEASED,
        m::FENCED,
        m::PUBLISH_ERRORS,
        m::STORE_ERRORS,
        m::BACKLOG,
        m::OLDEST_PENDING_AGE,
        m::DEAD_LETTERS,
        m::OWNED_PARTITIONS,
        m::PAUSED,
        m::PUBLISH_DURATION,
        m::COMMIT_TO_PUBLISH,
        m::BATCH_SIZE,
        // The log relay's, exported by outbox-relay with a [cdc] section.
        "outbox_cdc_slot_lag_bytes",
        "outbox_cdc_slot_confirmed_lsn",
    ]
    .into_iter()
    .collect()
}

/// Every `outbox_...` name in `text`.
fn named(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("outbox_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len().max(1)..];
        names.insert(name);
    }
    names
}

fn promtool(args: &[&str]) -> Option<std::process::Output> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy())
        .output();
    or_skip("promtool (Debian package prometheus)", out)
}

#[test]
fn alert_rules_load_and_fire_as_their_tests_say() {
    let Some(check) = promtool(&["check", "rules", "alerts.yml"]) else {
        return;
    };
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let Some(test) = promtool(&["test", "rules", "alerts.test.yml"]) else {
        return;
    };
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}

#[test]
fn the_rules_and_the_dashboard_name_only_exported_metrics() {
    let exported = exported();
    let rules = std::fs::read_to_string(deploy().join("alerts.yml")).expect("alerts.yml");
    let dashboard =
        std::fs::read_to_string(deploy().join("grafana-dashboard.json")).expect("dashboard");
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = parsed["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut queried = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            queried.extend(named(expr));
        }
    }
    let in_rules = named(&rules);
    for name in queried.iter().chain(&in_rules) {
        assert!(
            exported.contains(name.as_str()),
            "{name} is not a metric the relay exports"
        );
    }
    // Each alert the issue of operators asks for is there.
    for alert in [
        "OutboxBacklogGrowing",
        "OutboxOldestPendingTooOld",
        "OutboxDeadLetters",
        "OutboxRelayPaused",
        "OutboxPartitionsUnowned",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
}
