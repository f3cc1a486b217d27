//! Private database servers for tests that must stop, restart or cut a server: a PostgreSQL
//! cluster and a MariaDB server of the test's own, on free loopback ports, with their data in
//! a directory the test gives, so that the shared servers are never touched.
//!
//! ```no_run
//! # async fn example() -> Result<(), outbox_testkit::servers::ServerError> {
//! use std::time::Duration;
//! use outbox_testkit::servers::{PrivatePostgres, Restart};
//!
//! let dir = std::env::temp_dir().join("my-test");
//! # std::fs::create_dir_all(&dir).ok();
//! let mut postgres = PrivatePostgres::start(&dir).await?;
//! let url = postgres.url(); // postgres://postgres@127.0.0.1:PORT/postgres
//! postgres.restart(Restart::Crash, Duration::from_millis(200)).await?;
//! postgres.stop().await; // also done, more bluntly, on drop
//! # Ok(()) }
//! ```
//!
//! Run as root (as CI does), the servers run as the `postgres` and `mysql` users, which own
//! their directories; run as another user, they run as that user. The programs are found under
//! `/usr/lib/postgresql/*/bin` (`OUTBOX_TEST_PG_BIN` names another directory), and as
//! `mariadbd` and `mariadb-install-db` (`MARIADBD_BIN`, `MARIADB_INSTALL_DB_BIN`, else the
//! `PATH` and `/usr/sbin`). A missing program or user is [`ServerError::Unavailable`], for the
//! caller to skip (see [`crate::env::or_skip`]).
//!
//! Both servers are tuned for tests and still keep every committed transaction through a crash
//! of the server process (not of the machine): PostgreSQL runs with `fsync = off` (its WAL
//! is written to the kernel at each commit, `synchronous_commit` stays on), MariaDB with
//! `innodb_flush_log_at_trx_commit = 2` (its log is written to the kernel at each commit).

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Why a private server could not be started or restarted.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerError {
    /// Its programs, or the user it runs as, are missing on this machine: skip the test, or
    /// fail it when servers are required.
    Unavailable(String),
    /// The programs are there, but the server did not start, stop or restart as asked.
    Failed(String),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Unavailable(why) => write!(f, "unavailable: {why}"),
            ServerError::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

impl std::error::Error for ServerError {}

fn failed(what: impl fmt::Display, err: impl fmt::Display) -> ServerError {
    ServerError::Failed(format!("{what}: {err}"))
}

/// How a server is restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// A clean shutdown first (PostgreSQL's fast mode, SIGTERM to MariaDB): open connections
    /// are ended by the server.
    Clean,
    /// The server process dies at once (PostgreSQL's immediate mode, SIGKILL to MariaDB) and
    /// recovers from its log on start.
    Crash,
}

/// Whether this process runs as root: the servers then run as their own users.
fn is_root() -> bool {
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Fails as unavailable when the system user `user` does not exist.
async fn system_user(user: &str) -> Result<(), ServerError> {
    let found = Command::new("id")
        .arg("-u")
        .arg(user)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if found {
        Ok(())
    } else {
        Err(ServerError::Unavailable(format!(
            "no system user `{user}` to run the server as"
        )))
    }
}

/// Gives `path` (recursively) to `user`.
async fn chown(path: &Path, user: &str) -> Result<(), ServerError> {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:{user}"))
        .arg(path)
        .status()
        .await
        .map_err(|e| failed("chown", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(failed(format!("chown {}", path.display()), status))
    }
}

/// Lets other users through `dir` (the servers' users reach their directories inside it).
fn traversable(dir: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir).map_err(|e| failed(dir.display(), e))?;
    let mut permissions = meta.permissions();
    permissions.set_mode(permissions.mode() | 0o711);
    std::fs::set_permissions(dir, permissions).map_err(|e| failed(dir.display(), e))
}

fn program(var: &str, name: &str, extra: &[&str]) -> Result<PathBuf, ServerError> {
    if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(ServerError::Unavailable(format!(
                "{var}={} is not a file",
                path.display()
            )))
        };
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    candidates.extend(extra.iter().map(PathBuf::from));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| ServerError::Unavailable(format!("no `{name}` program (set {var})")))
}

/// Runs `program` with `args`, as `user` (through `runuser`) when given; fails with its
/// output when it fails.
async fn run(user: Option<&str>, program: &Path, args: &[String]) -> Result<(), ServerError> {
    let mut command = match user {
        Some(user) => {
            let mut command = Command::new("runuser");
            command.arg("-u").arg(user).arg("--").arg(program);
            command
        }
        None => Command::new(program),
    };
    let out = command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| failed(program.display(), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ServerError::Failed(format!(
            "{} {}: {}: {}{}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn free_port() -> Result<u16, ServerError> {
    crate::env::free_port().map_err(|e| failed("a free port", e))
}

/// The directory of PostgreSQL's server programs: `OUTBOX_TEST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` that has `initdb` (Debian's layout).
fn postgres_bin() -> Result<PathBuf, ServerError> {
    if let Some(dir) = std::env::var_os("OUTBOX_TEST_PG_BIN").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.join("initdb").is_file() {
            Ok(dir)
        } else {
            Err(ServerError::Unavailable(format!(
                "OUTBOX_TEST_PG_BIN={} has no initdb",
                dir.display()
            )))
        };
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| ServerError::Unavailable(format!("{}: {e}", root.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
        .collect();
    // Version directories are numbers: the longest name, then the greatest, is the newest.
    dirs.sort_by_key(|d| (d.as_os_str().len(), d.clone()));
    dirs.pop().ok_or_else(|| {
        ServerError::Unavailable(format!(
            "no initdb and pg_ctl under {}/*/bin (set OUTBOX_TEST_PG_BIN)",
            root.display()
        ))
    })
}

/// A PostgreSQL cluster of a test's own: `initdb` into `DIR/postgres/data`, a server on a free
/// loopback port with its socket in `DIR/postgres` and its log in `DIR/postgres/server.log`.
/// Trust authentication, superuser `postgres`. Stopped, and its data removed, by
/// [`PrivatePostgres::stop`] or on drop (the log stays, for a test that keeps its directory).
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    home: PathBuf,
    port: u16,
    user: Option<&'static str>,
    running: bool,
}

impl PrivatePostgres {
    /// Creates and starts a cluster in `dir` (which is made traversable by other users, for
    /// the `postgres` user to reach its directory), in about a second.
    pub async fn start(dir: &Path) -> Result<Self, ServerError> {
        Self::start_with(dir, &[]).await
    }

    /// [`PrivatePostgres::start`] with server settings written into the cluster's
    /// `postgresql.conf`, so that they hold across restarts too:
    ///
    /// ```no_run
    /// # async fn example(dir: &std::path::Path) -> Result<(), outbox_testkit::servers::ServerError> {
    /// use outbox_testkit::servers::PrivatePostgres;
    ///
    /// let postgres = PrivatePostgres::start_with(dir, &[("wal_level", "logical")]).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// A name that is not a plain identifier (letters, digits, `_` and `.`) is
    /// [`ServerError::Failed`]; values are quoted.
    pub async fn start_with(dir: &Path, settings: &[(&str, &str)]) -> Result<Self, ServerError> {
        let mut conf = String::new();
        for (name, value) in settings {
            let plain = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
            if !plain || value.contains(['\n', '\r']) {
                return Err(ServerError::Failed(format!(
                    "server setting {name:?} = {value:?}: not a plain name and one-line value"
                )));
            }
            // A quoted value of postgresql.conf: backslashes escape, quotes are doubled.
            let quoted = value.replace('\\', "\\\\").replace('\'', "''");
            conf.push_str(&format!("{name} = '{quoted}'\n"));
        }
        let bin = postgres_bin()?;
        let user = if is_root() {
            system_user("postgres").await?;
            Some("postgres")
        } else {
            None
        };
        traversable(dir)?;
        let home = dir.join("postgres");
        std::fs::create_dir_all(&home).map_err(|e| failed(home.display(), e))?;
        if let Some(user) = user {
            chown(&home, user).await?;
        }
        let mut server = Self {
            bin,
            home,
            port: 0,
            user,
            running: false,
        };
        run(
            user,
            &server.bin.join("initdb"),
            &[
                "-D".into(),
                server.data().display().to_string(),
                "-A".into(),
                "trust".into(),
                "-U".into(),
                "postgres".into(),
                "--no-sync".into(),
            ],
        )
        .await?;
        if !conf.is_empty() {
            // Appended by this process (root, or the cluster's owner): the file keeps its owner.
            use std::io::Write as _;
            let path = server.data().join("postgresql.conf");
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .and_then(|mut file| file.write_all(format!("\n{conf}").as_bytes()))
                .map_err(|e| failed(path.display(), e))?;
        }
        // A port found free can be taken before the server binds it: try another.
        let mut last = None;
        for _ in 0..3 {
            server.port = free_port()?;
            match server.pg_ctl_start().await {
                Ok(()) => {
                    server.running = true;
                    return Ok(server);
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| ServerError::Failed("postgres did not start".into())))
    }

    fn data(&self) -> PathBuf {
        self.home.join("data")
    }

    async fn pg_ctl_start(&self) -> Result<(), ServerError> {
        run(
            self.user,
            &self.bin.join("pg_ctl"),
            &[
                "-D".into(),
                self.data().display().to_string(),
                "-l".into(),
                self.home.join("server.log").display().to_string(),
                "-w".into(),
                "-t".into(),
                "60".into(),
                "-o".into(),
                format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                     -c max_connections=200",
                    self.port,
                    self.home.display()
                ),
                "start".into(),
            ],
        )
        .await
    }

    async fn pg_ctl_stop(&self, mode: &str) -> Result<(), ServerError> {
        run(
            self.user,
            &self.bin.join("pg_ctl"),
            &[
                "-D".into(),
                self.data().display().to_string(),
                "-m".into(),
                mode.into(),
                "-w".into(),
                "-t".into(),
                "60".into(),
                "stop".into(),
            ],
        )
        .await
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Its log file.
    pub fn log(&self) -> PathBuf {
        self.home.join("server.log")
    }

    /// Stops the server as `how` says, waits `down`, and starts it again on the same port and
    /// data; returns once it accepts connections. Every connection is ended.
    pub async fn restart(&mut self, how: Restart, down: Duration) -> Result<(), ServerError> {
        let mode = match how {
            Restart::Clean => "fast",
            Restart::Crash => "immediate",
        };
        self.pg_ctl_stop(mode).await?;
        self.running = false;
        tokio::time::sleep(down).await;
        self.pg_ctl_start().await?;
        self.running = true;
        Ok(())
    }

    /// Stops the server (immediate mode: the data is thrown away next) and removes its data.
    pub async fn stop(mut self) {
        if self.running {
            let _ = self.pg_ctl_stop("immediate").await;
            self.running = false;
        }
        let _ = std::fs::remove_dir_all(self.data());
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let pg_ctl = self.bin.join("pg_ctl");
            let mut command = match self.user {
                Some(user) => {
                    let mut command = std::process::Command::new("runuser");
                    command.arg("-u").arg(user).arg("--").arg(pg_ctl);
                    command
                }
                None => std::process::Command::new(pg_ctl),
            };
            let _ = command
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(self.data());
    }
}

/// A MariaDB server of a test's own: `mariadb-install-db` into `DIR/mariadb/data`, `mariadbd`
/// on a free loopback port with its socket, pid file and error log in `DIR/mariadb`. User
/// `root` without a password, database `test`. Stopped, and its data removed, by
/// [`PrivateMariaDb::stop`] or on drop (the error log stays).
#[derive(Debug)]
pub struct PrivateMariaDb {
    mariadbd: PathBuf,
    home: PathBuf,
    port: u16,
    user: Option<&'static str>,
    child: Option<Child>,
}

impl PrivateMariaDb {
    /// Creates and starts a server in `dir` (made traversable by other users, for the `mysql`
    /// user to reach its directory), in about 4 s, most of it `mariadb-install-db`.
    pub async fn start(dir: &Path) -> Result<Self, ServerError> {
        let mariadbd = program("MARIADBD_BIN", "mariadbd", &["/usr/sbin/mariadbd"])?;
        let install = program(
            "MARIADB_INSTALL_DB_BIN",
            "mariadb-install-db",
            &["/usr/bin/mariadb-install-db"],
        )?;
        let user = if is_root() {
            system_user("mysql").await?;
            Some("mysql")
        } else {
            None
        };
        traversable(dir)?;
        let home = dir.join("mariadb");
        std::fs::create_dir_all(&home).map_err(|e| failed(home.display(), e))?;
        let init = home.join("init.sql");
        std::fs::write(&init, "CREATE DATABASE IF NOT EXISTS test;\n")
            .map_err(|e| failed(init.display(), e))?;
        if let Some(user) = user {
            chown(&home, user).await?;
        }
        let mut args = vec![
            "--no-defaults".to_owned(),
            format!("--datadir={}", home.join("data").display()),
            "--auth-root-authentication-method=normal".to_owned(),
            "--skip-test-db".to_owned(),
        ];
        if let Some(user) = user {
            // As root it runs the bootstrap as, and gives the data to, that user.
            args.push(format!("--user={user}"));
        }
        run(None, &install, &args).await?;
        let mut server = Self {
            mariadbd,
            home,
            port: 0,
            user,
            child: None,
        };
        let mut last = None;
        for _ in 0..3 {
            server.port = free_port()?;
            match server.spawn().await {
                Ok(()) => return Ok(server),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| ServerError::Failed("mariadbd did not start".into())))
    }

    fn error_log(&self) -> PathBuf {
        self.home.join("error.log")
    }

    /// Starts `mariadbd` and waits until it is ready for connections (up to 60 s).
    async fn spawn(&mut self) -> Result<(), ServerError> {
        let log = self.error_log();
        // Readiness is told by a line of the log written after this start.
        let from = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let mut command = Command::new(&self.mariadbd);
        command.arg("--no-defaults");
        if let Some(user) = self.user {
            // Started as root, mariadbd exits at once without a user to run as.
            command.arg(format!("--user={user}"));
        }
        let mut child = command
            .arg(format!("--datadir={}", self.home.join("data").display()))
            .arg(format!(
                "--socket={}",
                self.home.join("mysqld.sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.home.join("mysqld.pid").display()
            ))
            .arg(format!("--log-error={}", log.display()))
            .arg(format!(
                "--init-file={}",
                self.home.join("init.sql").display()
            ))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-log-bin",
                "--max-connections=300",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=2",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failed(self.mariadbd.display(), e))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read(&log).unwrap_or_default();
            let new = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ServerError::Failed(format!(
                    "mariadbd exited ({status}): {}",
                    new.trim()
                )));
            }
            if new.contains("ready for connections")
                && tokio::net::TcpStream::connect(self.addr()).await.is_ok()
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(ServerError::Failed(format!(
                    "mariadbd not ready within 60 s: {}",
                    new.trim()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends the server process: SIGTERM (waiting up to 30 s, then SIGKILL) when `clean`, else
    /// SIGKILL.
    async fn end(&mut self, clean: bool) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if clean && let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = child.kill().await;
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `mysql://root@127.0.0.1:PORT/test`.
    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/test", self.port)
    }

    /// Its error log.
    pub fn log(&self) -> PathBuf {
        self.error_log()
    }

    /// Ends the server process as `how` says, waits `down`, and starts it again on the same
    /// port and data; returns once it is ready for connections. Every connection is ended.
    pub async fn restart(&mut self, how: Restart, down: Duration) -> Result<(), ServerError> {
        self.end(how == Restart::Clean).await;
        tokio::time::sleep(down).await;
        self.spawn().await
    }

    /// Stops the server (SIGKILL: the data is thrown away next) and removes its data.
    pub async fn stop(mut self) {
        self.end(false).await;
        let _ = std::fs::remove_dir_all(self.home.join("data"));
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(self.home.join("data"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accepts(addr: SocketAddr) -> bool {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    }

    fn or_skip<T>(result: Result<T, ServerError>) -> Option<T> {
        match result {
            Err(ServerError::Unavailable(why)) => {
                crate::env::or_skip("a private database server", Err::<T, _>(why))
            }
            other => Some(other.expect("the server starts")),
        }
    }

    #[tokio::test]
    async fn a_private_postgres_restarts_and_goes_away() {
        let dir = tempfile_dir("pg");
        let Some(mut server) = or_skip(PrivatePostgres::start(&dir).await) else {
            return;
        };
        assert!(accepts(server.addr()).await);
        for how in [Restart::Clean, Restart::Crash] {
            server
                .restart(how, Duration::from_millis(100))
                .await
                .expect("restart");
            assert!(accepts(server.addr()).await, "{how:?}");
        }
        let (addr, data) = (server.addr(), server.data());
        server.stop().await;
        assert!(!accepts(addr).await);
        assert!(!data.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn settings_that_could_break_the_configuration_file_are_refused() {
        let dir = std::env::temp_dir();
        for setting in [
            ("bad name", "1"),
            ("", "1"),
            ("a=b", "1"),
            ("x", "1\nfsync = on"),
        ] {
            let err = PrivatePostgres::start_with(&dir, &[setting])
                .await
                .expect_err("refused");
            assert!(matches!(err, ServerError::Failed(_)), "{setting:?}: {err}");
        }
    }

    #[tokio::test]
    async fn a_private_mariadb_restarts_and_goes_away() {
        let dir = tempfile_dir("mariadb");
        let Some(mut server) = or_skip(PrivateMariaDb::start(&dir).await) else {
            return;
        };
        assert!(accepts(server.addr()).await);
        for how in [Restart::Clean, Restart::Crash] {
            server
                .restart(how, Duration::from_millis(100))
                .await
                .expect("restart");
            assert!(accepts(server.addr()).await, "{how:?}");
        }
        let addr = server.addr();
        let data = server.home.join("data");
        server.stop().await;
        assert!(!accepts(addr).await);
        assert!(!data.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(crate::env::unique_name(&format!("outbox_{what}")));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        dir
    }
}
