//! Private tansu brokers (a Kafka-protocol broker, in memory) for tests that need a broker of
//! their own: behind a fault proxy or a TLS terminator, which the broker advertises so that
//! every client connection, after bootstrap too, goes through it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The tansu executable: `TANSU_BIN`, else `tansu` on the `PATH`, else `~/.cargo/bin/tansu`
/// (where `outbox-kafka/scripts/start-tansu.sh` installs it).
pub fn program() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("TANSU_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("TANSU_BIN={} is not a file", bin.display()))
        };
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("tansu"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME").or_else(|| {
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo").into_os_string())
    }) {
        candidates.push(PathBuf::from(home).join("bin").join("tansu"));
    }
    candidates
        .into_iter()
        .find(|path| path.is_file())
        .ok_or_else(|| {
            "no tansu executable (set TANSU_BIN or run outbox-kafka/scripts/start-tansu.sh)"
                .to_owned()
        })
}

/// Starts a tansu of `program()`, in memory, listening on `listen` and advertising `advertised`,
/// and waits up to 30 s until it listens. Killed when the handle is dropped.
pub async fn start(listen: SocketAddr, advertised: SocketAddr) -> Result<Child, String> {
    let bin = program()?;
    let mut child = Command::new(&bin)
        .arg("broker")
        .arg("--listener-url")
        .arg(format!("tcp://{listen}"))
        .arg("--advertised-listener-url")
        .arg(format!("tcp://{advertised}"))
        .arg("--storage-engine")
        .arg("memory://tansu/")
        .arg("--silent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("starting {}: {err}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("tansu exited: {status}"));
        }
        if Instant::now() > deadline {
            return Err(format!("tansu did not listen on {listen} within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(child)
}
