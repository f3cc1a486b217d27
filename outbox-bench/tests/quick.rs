//! The benchmark's `--quick` profile keeps working: it runs every scenario on small numbers
//! and prints at least one `RESULT` line per scenario (a skip when a server is missing and
//! `OUTBOX_TEST_REQUIRE` is unset, a failure of the run when it is set).

use std::collections::BTreeSet;
use std::process::Command;

#[test]
fn quick_profile_prints_one_result_per_scenario() {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox-bench"))
        .arg("--quick")
        .output()
        .expect("the bench binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "outbox-bench --quick failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let mut scenarios = BTreeSet::new();
    for line in stdout.lines() {
        let Some(json) = line.strip_prefix("RESULT ") else {
            continue;
        };
        let value: serde_json::Value = serde_json::from_str(json).expect("RESULT lines are JSON");
        let scenario = value["scenario"].as_str().expect("a scenario").to_owned();
        assert!(
            value.get("error").is_none(),
            "a result failed: {value}\n{stderr}"
        );
        scenarios.insert(scenario);
    }
    for scenario in ["enqueue", "inbox", "drain", "latency", "scaling", "memory"] {
        assert!(
            scenarios.contains(scenario),
            "no RESULT line for {scenario}:\n{stdout}\n{stderr}"
        );
    }
}
