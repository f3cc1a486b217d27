//! Bad input to the relay program's configuration: random and mutated TOML files and
//! environment overrides never make it panic; it exits 2 with a message naming the key (or the
//! file) at fault, or it accepts the configuration. Values that parse but are extreme (huge
//! durations and sizes) are refused at start or run and stop cleanly, never panic.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;

const BIN: &str = env!("CARGO_BIN_EXE_chaos-relay");

/// Every key of the configuration and of the sections it nests, for mutation and for checking
/// that errors name one.
const KEYS: &[&str] = &[
    "store.url",
    "store.table",
    "store.retention",
    "store.max_connections",
    "store.notify_channel",
    "store.limits.max_payload_len",
    "store.limits.max_key_len",
    "publisher.kind",
    "relay.relay_id",
    "relay.batch_size",
    "relay.concurrency",
    "relay.claims",
    "relay.lease",
    "relay.publish_timeout",
    "relay.store_timeout",
    "relay.partition_lease",
    "relay.poll_min",
    "relay.poll_max",
    "relay.shutdown_timeout",
    "relay.stats_interval",
    "relay.cleanup_interval",
    "relay.cleanup_batch",
    "relay.retry.initial_delay",
    "relay.retry.max_delay",
    "relay.retry.max_attempts",
    "http.listen",
    "log.format",
    "log.level",
];

/// Keys of each publisher kind.
const PUBLISHER_KEYS: &[(&str, &[&str])] = &[
    ("stdout", &[]),
    (
        "nats",
        &["url", "subject_prefix", "ack_timeout", "max_acks_in_flight"],
    ),
    ("amqp", &["uri", "routing", "unroutable", "confirm_timeout"]),
    ("kafka", &["brokers", "topic_prefix", "enqueue_timeout"]),
];

/// Runs `chaos-relay --config <text> status` with `env`, from a directory of its own.
fn relay(dir: &Path, text: &[u8], env: &[(String, String)]) -> Output {
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).expect("write");
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(&path)
        .arg("status")
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (name, _) in std::env::vars() {
        if name.starts_with("OUTBOX_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.output().expect("the relay runs")
}

/// The property every input must have.
fn judge(text: &[u8], env: &[(String, String)], out: &Output) -> Result<(), TestCaseError> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = format!(
        "config:\n{}\nenv: {env:?}\nexit: {:?}\nstderr: {stderr}",
        String::from_utf8_lossy(text),
        out.status
    );
    prop_assert!(!stderr.contains("panicked"), "a panic: {shown}");
    let code = out.status.code();
    prop_assert!(
        matches!(code, Some(0..=2)),
        "exit 0, 1 or 2 (not a crash): {shown}"
    );
    if code == Some(2) {
        prop_assert!(stderr.contains("invalid configuration"), "{shown}");
        let names_key = KEYS
            .iter()
            .any(|k| stderr.contains(k) || stderr.contains(k.rsplit('.').next().unwrap_or(k)))
            || ["store", "publisher", "relay", "http", "log", "relay.toml"]
                .iter()
                .any(|s| stderr.contains(s));
        prop_assert!(names_key, "the error names a key or the file: {shown}");
    }
    Ok(())
}

/// A valid configuration as (section path, key, TOML value) lines; the store is a file in the
/// working directory, which is the case's own.
fn base() -> Vec<(String, String, String)> {
    [
        ("store", "url", "\"sqlite://outbox.db\"".to_owned()),
        ("store", "table", "\"outbox\"".into()),
        ("publisher", "kind", "\"stdout\"".into()),
        ("relay", "batch_size", "100".into()),
        ("relay", "lease", "\"30s\"".into()),
        ("relay", "publish_timeout", "\"5s\"".into()),
        ("relay.retry", "max_attempts", "5".into()),
        ("http", "listen", "\"127.0.0.1:0\"".into()),
        ("log", "format", "\"text\"".into()),
    ]
    .into_iter()
    .map(|(s, k, v)| (s.to_owned(), k.to_owned(), v))
    .collect()
}

fn render(lines: &[(String, String, String)]) -> String {
    let mut sections: Vec<&str> = Vec::new();
    for (section, _, _) in lines {
        if !sections.contains(&section.as_str()) {
            sections.push(section);
        }
    }
    let mut text = String::new();
    for section in sections {
        text.push_str(&format!("[{section}]\n"));
        for (s, key, value) in lines {
            if s == section {
                text.push_str(&format!("{key} = {value}\n"));
            }
        }
    }
    text
}

/// TOML values of every type, plausible and not.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just("0".to_owned()),
        Just("-1".to_owned()),
        Just("18446744073709551615".to_owned()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        "[a-z0-9 ._:/@*>-]{0,20}".prop_map(|s| format!("{s:?}")),
        any::<String>().prop_map(|s| format!("{s:?}")),
        prop_oneof![
            Just("0s"),
            Just("-1s"),
            Just("1ns"),
            Just("99999999999999999999s"),
            Just("584542046091y"),
            Just("1e3s"),
            Just("1 fortnight"),
            Just(""),
        ]
        .prop_map(|s| format!("{s:?}")),
        Just("[1, \"a\", true]".to_owned()),
        Just("{ x = 1 }".to_owned()),
        Just("1979-05-27T07:32:00Z".to_owned()),
    ]
}

/// Mutations of a valid configuration: a value replaced, a key added or removed, a publisher
/// kind with settings of another.
fn mutated() -> impl Strategy<Value = String> {
    let lines = base();
    let n = lines.len();
    let all_keys: Vec<String> = KEYS.iter().map(|k| (*k).to_owned()).collect();
    let kinds: Vec<(String, Vec<String>)> = PUBLISHER_KEYS
        .iter()
        .map(|(k, keys)| {
            (
                (*k).to_owned(),
                keys.iter().map(|s| (*s).to_owned()).collect(),
            )
        })
        .collect();
    (
        proptest::collection::vec((0..n, value()), 0..3),
        proptest::collection::vec((proptest::sample::select(all_keys), value()), 0..3),
        proptest::collection::vec(0..n, 0..2),
        proptest::option::of((
            proptest::sample::select(kinds.clone()),
            proptest::sample::select(kinds),
            proptest::collection::vec(value(), 1..3),
        )),
        "[a-z_]{1,12}",
    )
        .prop_map(move |(replace, add, remove, publisher, unknown)| {
            let mut lines = lines.clone();
            for (i, v) in replace {
                lines[i].2 = v;
            }
            for (key, v) in add {
                let (section, name) = key.rsplit_once('.').expect("dotted");
                lines.push((section.to_owned(), name.to_owned(), v));
            }
            if let Some(((kind, _), (_, keys), values)) = publisher {
                lines.retain(|(s, _, _)| s != "publisher");
                lines.push(("publisher".into(), "kind".into(), format!("{kind:?}")));
                for (key, v) in keys.iter().zip(values) {
                    lines.push(("publisher".into(), key.clone(), v));
                }
            }
            let mut removed = remove;
            removed.sort_unstable();
            removed.dedup();
            for i in removed.into_iter().rev() {
                if i < lines.len() {
                    lines.remove(i);
                }
            }
            let mut text = render(&lines);
            if unknown.len() % 3 == 0 {
                text.push_str(&format!("[relay]\n{unknown} = 1\n"));
            }
            text
        })
}

/// Byte-level damage to a valid file: bytes flipped, inserted (invalid UTF-8 too), cut.
fn damaged() -> impl Strategy<Value = Vec<u8>> {
    let text = render(&base()).into_bytes();
    let len = text.len();
    (
        proptest::collection::vec((0..len, any::<u8>()), 1..6),
        proptest::collection::vec((0..len, proptest::collection::vec(any::<u8>(), 1..8)), 0..3),
        proptest::option::of(0..len),
    )
        .prop_map(move |(flips, inserts, cut)| {
            let mut bytes = text.clone();
            for (i, b) in flips {
                bytes[i] = b;
            }
            for (i, ins) in inserts {
                let at = i.min(bytes.len());
                bytes.splice(at..at, ins);
            }
            if let Some(cut) = cut {
                bytes.truncate(cut);
            }
            bytes
        })
}

/// Environment overrides with odd values.
fn env_overrides() -> impl Strategy<Value = Vec<(String, String)>> {
    let names: Vec<String> = KEYS
        .iter()
        .filter(|k| !k.starts_with("store.url"))
        .map(|k| {
            let (section, rest) = k.split_once('.').expect("dotted");
            format!(
                "OUTBOX_{}__{}",
                section.to_uppercase(),
                rest.replace('.', "__").to_uppercase()
            )
        })
        .collect();
    proptest::collection::vec(
        (
            proptest::sample::select(names),
            prop_oneof![
                "[a-z0-9 ._:-]{0,12}",
                Just("-5".to_owned()),
                Just("99999999999999999999999".to_owned()),
                Just("[1,2]".to_owned()),
                Just("{a=1}".to_owned()),
                Just("\"quoted\"".to_owned()),
            ],
        ),
        1..3,
    )
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_configurations_parse_or_name_the_key(text in mutated()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = relay(dir.path(), text.as_bytes(), &[]);
        judge(text.as_bytes(), &[], &out)?;
    }

    #[test]
    fn damaged_files_parse_or_name_the_key(bytes in damaged()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = relay(dir.path(), &bytes, &[]);
        judge(&bytes, &[], &out)?;
    }

    #[test]
    fn odd_environment_overrides_parse_or_name_the_key(env in env_overrides()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = render(&base());
        let out = relay(dir.path(), text.as_bytes(), &env);
        judge(text.as_bytes(), &env, &out)?;
    }
}

/// A pool size no machine can hold must be refused as a configuration error, not abort the
/// process (a crash loop under a supervisor).
#[test]
fn a_huge_pool_size_is_refused_not_an_abort() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/outbox.db?mode=rwc", dir.path().display());
    let text = format!(
        "[store]\nurl = \"{url}\"\nmax_connections = 4294967295\n[publisher]\nkind = \"stdout\"\n"
    );
    let out = relay(dir.path(), text.as_bytes(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{:?}: {stderr}", out.status);
    assert!(stderr.contains("max_connections"), "{stderr}");
}

/// Values that pass parsing but are extreme: the relay refuses them at start (exit 2, naming
/// the key) or runs and stops on SIGTERM, and never panics.
#[test]
fn extreme_values_never_panic_at_run_time() {
    let cases: &[(&str, &str)] = &[
        ("relay", "lease = \"1000000000y\"\npublish_timeout = \"1s\""),
        (
            "relay",
            "lease = \"584542046090y\"\npublish_timeout = \"1s\"",
        ),
        ("relay", "partition_lease = \"500000000y\""),
        ("relay", "poll_min = \"1ns\"\npoll_max = \"1ns\""),
        ("relay", "poll_max = \"100000000y\""),
        (
            "relay",
            "stats_interval = \"1ns\"\ncleanup_interval = \"1ns\"",
        ),
        ("relay", "shutdown_timeout = \"100000000y\""),
        ("relay", "batch_size = 10000\nconcurrency = 256"),
        (
            "relay.retry",
            "initial_delay = \"100000000y\"\nmax_delay = \"100000000y\"",
        ),
        ("relay.retry", "max_attempts = 4294967295"),
        ("store", "retention = \"100000000y\""),
        ("store", "max_connections = 0"),
    ];
    for (section, lines) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/outbox.db?mode=rwc", dir.path().display());
        let mut text = String::new();
        let store_extra = if *section == "store" { *lines } else { "" };
        text.push_str(&format!("[store]\nurl = \"{url}\"\n{store_extra}\n"));
        text.push_str("[publisher]\nkind = \"stdout\"\n");
        if *section == "relay" {
            text.push_str(&format!("[relay]\n{lines}\n"));
        }
        if *section == "relay.retry" {
            text.push_str(&format!("[relay.retry]\n{lines}\n"));
        }
        text.push_str("[http]\nlisten = \"127.0.0.1:0\"\n");
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, &text).expect("write");
        let migrate = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .arg("migrate")
            .env_remove("RUST_LOG")
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&migrate.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{text}\n{stderr}");
        if migrate.status.code() == Some(2) {
            assert!(stderr.contains("invalid configuration"), "{text}\n{stderr}");
            continue;
        }
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .arg("run")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runs");
        let started = Instant::now();
        let mut exited = None;
        while started.elapsed() < Duration::from_millis(1500) {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if exited.is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    exited = Some(status);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let status = exited.unwrap_or_else(|| {
            let _ = child.kill();
            panic!("{text}\nthe relay did not stop within 20 s of SIGTERM")
        });
        let out = child.wait_with_output().expect("output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{text}\n{stderr}");
        assert!(
            matches!(status.code(), Some(0..=2)),
            "{text}\nexit {status}: {stderr}"
        );
    }
}
