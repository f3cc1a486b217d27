//! The quickstart runs with no server, prints every committed event once, in per-order
//! order, and never the rolled-back one.

use std::process::Command;

#[test]
fn the_quickstart_prints_the_committed_events() {
    let out = Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .output()
        .expect("the quickstart runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let summary: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap_or_default().to_owned(),
                e["headers"]["type"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(
        !summary.iter().any(|(key, _)| key == "order-2"),
        "the rolled-back order is never published: {summary:?}"
    );
    let order_1: Vec<&str> = summary
        .iter()
        .filter(|(k, _)| k == "order-1")
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(order_1, ["OrderPlaced", "OrderShipped"], "per-key order");
    assert!(
        summary
            .iter()
            .any(|(k, t)| k == "order-3" && t == "OrderPlaced"),
        "{summary:?}"
    );
    let ids: std::collections::HashSet<&str> =
        events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids.len(), events.len(), "each event printed once");
}
