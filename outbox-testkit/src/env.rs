//! Where the test servers are, and what to do when one is missing.

use std::sync::atomic::{AtomicU64, Ordering};

/// The value of environment variable `var`, or `default` (a loopback address) when unset.
pub fn service_url(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// True when `OUTBOX_TEST_REQUIRE=1`: a missing server must fail the run instead of skipping.
pub fn required() -> bool {
    std::env::var("OUTBOX_TEST_REQUIRE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Decides what a test does when `service` cannot be reached: panics with `error` when
/// [`required`], else prints why it is skipped and returns `None`.
///
/// ```
/// let reachable: Option<u16> = outbox_testkit::env::or_skip("example", Ok::<u16, String>(5432));
/// assert_eq!(reachable, Some(5432));
/// ```
pub fn or_skip<T, E: std::fmt::Display>(service: &str, result: Result<T, E>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(err) if required() => {
            panic!("{service} is required (OUTBOX_TEST_REQUIRE=1) but unreachable: {err}")
        }
        Err(err) => {
            eprintln!(
                "skipping: {service} unreachable: {err} (set OUTBOX_TEST_REQUIRE=1 to fail instead)"
            );
            None
        }
    }
}

/// A name no other test of this run or of a concurrent run uses: `prefix` plus process id,
/// time and a counter; lowercase letters, digits and underscores only.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{nanos:x}_{n}", std::process::id())
}

/// A TCP port on `127.0.0.1` that was free a moment ago (bound, then released), for servers
/// a test starts: retry on the rare clash with another process that took it in between.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
