//! The demo relays its three events through the webhook publisher and stops gracefully.

use std::process::Command;

#[test]
fn the_demo_relays_every_event_to_the_webhook() {
    let out = Command::new(env!("CARGO_BIN_EXE_custom-publisher"))
        .output()
        .expect("the demo runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut keys: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split("(key ").nth(1)?.split(')').next())
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["order-1", "order-2", "order-3"], "{stdout}");
}
