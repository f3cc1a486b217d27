//! The relay processes of a run: started, killed with SIGKILL, restarted, and watched for exits
//! nobody asked for. Relays can run with their clocks skewed (libfaketime): leases, retries and
//! partition ownership are on the database's clock, so skewed relays must still agree.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::broker::{free_port, terminate};

struct Slot {
    child: Option<Child>,
    /// When a killed relay is started again.
    restart_at: Option<Instant>,
}

/// The relay processes of one run.
pub struct Relays {
    bin: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    log_level: String,
    slots: Vec<Slot>,
    /// Clock offset of each relay, in seconds (0: the host's clock).
    skews: Vec<i64>,
    /// libfaketime, when some relay's clock is skewed.
    faketime: Option<PathBuf>,
    /// Processes started, restarts included.
    pub starts: u64,
    /// SIGKILLs sent.
    pub killed: u64,
    /// Exits nobody asked for: which relay, its status, the end of its log.
    pub unexpected_exits: Vec<String>,
}

impl Relays {
    /// Starts `count` relays of `bin` on `config`, logging into `dir`; relay `i` runs with its
    /// clock `skews[i]` seconds off (none when missing or 0), which needs libfaketime
    /// ([`faketime_library`]).
    pub fn start(
        bin: &Path,
        config: &Path,
        dir: &Path,
        count: usize,
        skews: &[i64],
    ) -> std::io::Result<Self> {
        let skews: Vec<i64> = (0..count)
            .map(|i| skews.get(i).copied().unwrap_or(0))
            .collect();
        let faketime = if skews.iter().any(|s| *s != 0) {
            Some(faketime_library()?)
        } else {
            None
        };
        let mut relays = Self {
            bin: bin.to_owned(),
            config: config.to_owned(),
            dir: dir.to_owned(),
            log_level: std::env::var("OUTBOX_CHAOS_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            slots: Vec::new(),
            skews,
            faketime,
            starts: 0,
            killed: 0,
            unexpected_exits: Vec::new(),
        };
        for i in 0..count {
            let child = relays.spawn(i)?;
            relays.slots.push(Slot {
                child: Some(child),
                restart_at: None,
            });
        }
        Ok(relays)
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("relay-{i}.log"))
    }

    fn spawn(&mut self, i: usize) -> std::io::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))?;
        self.starts += 1;
        let mut command = Command::new(&self.bin);
        let skew = self.skews[i];
        if let Some(library) = &self.faketime
            && skew != 0
        {
            // The wall clock only, as on a host whose clock is off: timers run on the monotonic
            // clock, which skew does not touch.
            command
                .env("LD_PRELOAD", library)
                .env("FAKETIME", format!("{skew:+}"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        command
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env("OUTBOX_LOG__LEVEL", &self.log_level)
            .env("OUTBOX_HTTP__LISTEN", format!("127.0.0.1:{}", free_port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
    }

    /// Number of relay slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True without relays.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Kills relay `i` with SIGKILL, to be started again after `down`.
    pub async fn kill(&mut self, i: usize, down: Duration) {
        let slot = &mut self.slots[i];
        if let Some(mut child) = slot.child.take() {
            let _ = child.kill().await;
            self.killed += 1;
        }
        slot.restart_at = Some(Instant::now() + down);
    }

    /// Starts the relays whose restart is due (all of them when `now_all`), and restarts those
    /// that exited by themselves, recording why.
    pub fn supervise(&mut self, now_all: bool) -> std::io::Result<()> {
        for i in 0..self.slots.len() {
            if let Some(child) = self.slots[i].child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let tail = self.log_tail(i);
                self.unexpected_exits
                    .push(format!("relay {i} exited by itself ({status}): {tail}"));
                self.slots[i].child = None;
                self.slots[i].restart_at = Some(Instant::now() + Duration::from_millis(500));
            }
            let due = self.slots[i]
                .restart_at
                .is_some_and(|at| now_all || at <= Instant::now());
            if due {
                let child = self.spawn(i)?;
                self.slots[i].child = Some(child);
                self.slots[i].restart_at = None;
            }
        }
        Ok(())
    }

    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Stops every relay with SIGTERM; returns the relays that did not exit 0 within `bound`.
    pub async fn stop(&mut self, bound: Duration) -> Vec<String> {
        let mut unclean = Vec::new();
        for i in 0..self.slots.len() {
            if let Some(mut child) = self.slots[i].child.take() {
                let pid = child.id();
                let status: Option<ExitStatus> = terminate_or_dump(
                    &mut child,
                    bound,
                    pid,
                    &self.dir.join(format!("relay-{i}.stacks")),
                )
                .await;
                if status.is_none_or(|s| !s.success()) {
                    unclean.push(format!(
                        "relay {i} on SIGTERM: {}: {}",
                        status.map_or("no exit within the bound".into(), |s| s.to_string()),
                        self.log_tail(i)
                    ));
                }
            }
        }
        unclean
    }
}

/// As [`terminate`], but a process that does not exit within `bound` first has the stacks of
/// its threads written to `stacks` (when `gdb` is installed), to show where it hangs.
async fn terminate_or_dump(
    child: &mut Child,
    bound: Duration,
    pid: Option<u32>,
    stacks: &Path,
) -> Option<ExitStatus> {
    if let Some(pid) = pid {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        if let Ok(Ok(status)) = tokio::time::timeout(bound, child.wait()).await {
            return Some(status);
        }
        let dump = Command::new("gdb")
            .args([
                "-p",
                &pid.to_string(),
                "-batch",
                "-ex",
                "thread apply all bt",
            ])
            .stdin(Stdio::null())
            .output();
        if let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(60), dump).await {
            let _ = std::fs::write(stacks, out.stdout);
        }
    }
    terminate(child, Duration::from_secs(1)).await
}

/// libfaketime's multithreaded library: `OUTBOX_CHAOS_FAKETIME` if set, else where Debian's
/// `faketime` package puts it.
pub fn faketime_library() -> std::io::Result<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("OUTBOX_CHAOS_FAKETIME") {
        Some(path) => vec![path.into()],
        None => [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
            "/usr/lib/faketime/libfaketimeMT.so.1",
            "/usr/local/lib/faketime/libfaketimeMT.so.1",
        ]
        .iter()
        .map(PathBuf::from)
        .collect(),
    };
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "libfaketime, for relays with skewed clocks, is not at {candidates:?} \
                     (install the faketime package or set OUTBOX_CHAOS_FAKETIME)"
                ),
            )
        })
}
