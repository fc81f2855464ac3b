//! Throwaway PostgreSQL and Redis servers for the broker's store tests and
//! its benchmark.
//!
//! Each lives in its own temporary directory, listens on a free loopback
//! port and is stopped when its handle drops. PostgreSQL refuses to run as
//! root, so under root the cluster's files belong to the `postgres` user
//! and `initdb` and the server run as that user.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to come up.
const STARTUP: Duration = Duration::from_secs(60);
/// How long a server may take to stop before it is killed.
const SHUTDOWN: Duration = Duration::from_secs(20);

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// Whether a program is on the PATH.
fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
}

/// Fails (or, under `P11SHIM_ALLOW_SKIP=1`, reports a skip) when a server
/// is missing. Returns `false` when the caller should skip.
fn missing(what: &str, install: &str) -> bool {
    if std::env::var("P11SHIM_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED: {what} is not installed");
        return false;
    }
    panic!("{what} is not installed ({install}; scripts/deps.sh installs it)");
}

fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Sends `sig` and waits (bounded) for the child to exit, then kills it.
fn stop_child(child: &mut Child, sig: i32) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    signal(child, sig);
    let deadline = Instant::now() + SHUTDOWN;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let start = s.len().saturating_sub(4000);
    s.get(start..).unwrap_or(&s).to_owned()
}

/// A PostgreSQL cluster with one database owned by a password-protected
/// role, reachable on `127.0.0.1:<port>`.
#[derive(Debug)]
pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    /// `(uid, gid)` of `postgres` when this process is root.
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

/// The role the broker logs in as, and its password.
pub const PG_USER: &str = "broker";
pub const PG_PASSWORD: &str = "Pg7rTq2wStorePass";
pub const PG_DB: &str = "replay";

fn postgres_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn id_of(flag: &str, user: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, user])
        .output()
        .expect("run id");
    assert!(out.status.success(), "no user {user}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

impl Postgres {
    /// Makes and starts a cluster; `None` only when PostgreSQL is missing
    /// and `P11SHIM_ALLOW_SKIP=1`.
    pub fn start() -> Option<Postgres> {
        let Some(bin) = postgres_bin() else {
            missing(
                "PostgreSQL (/usr/lib/postgresql/*/bin/initdb)",
                "apt-get install postgresql",
            );
            return None;
        };
        // SAFETY: getuid(2) has no preconditions.
        let root = unsafe { libc::getuid() } == 0;
        let run_as = root.then(|| (id_of("-u", "postgres"), id_of("-g", "postgres")));
        let dir = tempfile::Builder::new()
            .prefix("p11shim-pg")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir(dir.path().join("sock")).expect("socket dir");
        if let Some((uid, gid)) = run_as {
            for p in [dir.path().to_owned(), dir.path().join("sock")] {
                chown(&p, Some(uid), Some(gid)).expect("chown to postgres");
            }
        }
        let mut pg = Postgres {
            dir,
            bin,
            port: free_port(),
            run_as,
            child: None,
        };
        let out = pg
            .command("initdb")
            .args(["-D"])
            .arg(pg.data())
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.launch();
        pg.psql(&format!(
            "CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}'"
        ));
        pg.psql(&format!("CREATE DATABASE {PG_DB} OWNER {PG_USER}"));
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.env("LC_ALL", "C").current_dir(self.dir.path());
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn launch(&mut self) {
        let log = File::create(self.log_path()).expect("server log");
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(self.sock())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-c", "fsync=on", "-c", "max_connections=100"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("postgres exited ({st}):\n{}", tail(&self.log_path()));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres not ready after {STARTUP:?}:\n{}",
                tail(&self.log_path())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL as the superuser over the unix socket; its output.
    /// `postgres --version` of the server binaries in use.
    pub fn version(&self) -> String {
        Command::new(self.bin.join("postgres"))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }

    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.sock())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `postgres://broker:<password>@127.0.0.1:<port>/replay`.
    pub fn url(&self) -> String {
        format!(
            "postgres://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{}/{PG_DB}",
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Fast shutdown (clients disconnected, everything committed kept).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGINT);
        }
    }

    /// Stops and starts the server again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis server with a password, `appendonly yes` and `appendfsync
/// always`, on `127.0.0.1:<port>`.
#[derive(Debug)]
pub struct Redis {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

pub const REDIS_PASSWORD: &str = "Rd4kVm8nStorePass";

impl Redis {
    /// Starts a server; `None` only when redis-server is missing and
    /// `P11SHIM_ALLOW_SKIP=1`.
    pub fn start() -> Option<Redis> {
        if !have("redis-server") || !have("redis-cli") {
            missing("redis-server", "apt-get install redis-server");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("p11shim-redis")
            .tempdir()
            .expect("temp dir");
        let mut r = Redis {
            dir,
            port: free_port(),
            child: None,
        };
        r.launch();
        Some(r)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--requirepass", REDIS_PASSWORD])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(["--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("redis-server exited ({st}):\n{}", tail(&self.log_path()));
            }
            // PONG only once the AOF is loaded (LOADING before).
            if self.try_cli(&["PING"]).is_some_and(|o| o == "PONG") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server not ready after {STARTUP:?}:\n{}",
                tail(&self.log_path())
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-a", REDIS_PASSWORD, "--no-auth-warning"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Runs a command with `redis-cli`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    /// `redis://:<password>@127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server outright (SIGKILL): what it acknowledged must be
    /// in the AOF already.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and directory (it loads
    /// the AOF).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis-server is still running");
        self.launch();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGTERM);
        }
    }
}
