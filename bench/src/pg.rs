//! A throwaway PostgreSQL cluster for the broker benchmark: `initdb` in the
//! run's temporary directory, a server on a free loopback port with
//! `fsync=on` (every commit reaches the disk, as in production), one
//! database owned by a password-protected role. Under root the cluster
//! belongs to the `postgres` user, since PostgreSQL refuses to run as root.
//! The same recipe as the tests' `tests/src/peers/databases.rs`, with the
//! benchmark's error handling (any failure ends the run).

use std::fs::File;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::p11::die;

const STARTUP: Duration = Duration::from_secs(60);
const SHUTDOWN: Duration = Duration::from_secs(20);
const USER: &str = "broker";
const PASSWORD: &str = "BenchPg5kQv9StorePass";
const DB: &str = "replay";

/// A running cluster; stopped (fast shutdown) when dropped.
#[derive(Debug)]
pub struct Postgres {
    /// Owned by the server's user; removed after the server has stopped.
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
    pub version: String,
}

/// The newest `/usr/lib/postgresql/<major>/bin`.
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
    Command::new("id")
        .args([flag, user])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or_else(|| die(format_args!("no user {user} to run PostgreSQL as")))
}

fn is_root() -> bool {
    // SAFETY: getuid(2) has no preconditions.
    unsafe { libc::getuid() == 0 }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| die(format_args!("no free loopback port: {e}")))
}

impl Postgres {
    /// Makes and starts a cluster in a temporary directory of its own.
    pub fn start() -> Postgres {
        let bin = postgres_bin().unwrap_or_else(|| {
            die("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)")
        });
        let tmp = tempfile::Builder::new()
            .prefix("p11shim-bench-pg-")
            .tempdir()
            .unwrap_or_else(|e| die(format_args!("cannot create a temporary directory: {e}")));
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir_all(dir.join("sock"))
            .unwrap_or_else(|e| die(format_args!("cannot create {}: {e}", dir.display())));
        let run_as = is_root().then(|| (id_of("-u", "postgres"), id_of("-g", "postgres")));
        if let Some((uid, gid)) = run_as {
            for p in [dir.clone(), dir.join("sock")] {
                chown(&p, Some(uid), Some(gid))
                    .unwrap_or_else(|e| die(format_args!("chown {}: {e}", p.display())));
            }
        }
        let version = Command::new(bin.join("postgres"))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let mut pg = Postgres {
            _tmp: tmp,
            dir,
            bin,
            port: free_port(),
            run_as,
            child: None,
            version,
        };
        let out = pg
            .command("initdb")
            .arg("-D")
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
            .unwrap_or_else(|e| die(format_args!("cannot run initdb: {e}")));
        if !out.status.success() {
            die(format_args!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        pg.launch();
        pg.psql(&format!("CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'"));
        pg.psql(&format!("CREATE DATABASE {DB} OWNER {USER}"));
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.env("LC_ALL", "C").current_dir(&self.dir);
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn tail(&self) -> String {
        let s = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let start = s.len().saturating_sub(3000);
        s.get(start..).unwrap_or(&s).to_owned()
    }

    fn launch(&mut self) {
        let log = File::create(self.log_path())
            .unwrap_or_else(|e| die(format_args!("cannot create the server log: {e}")));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| die(format_args!("server log: {e}")));
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(self.dir.join("sock"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
            .args(["-c", "max_connections=100"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| die(format_args!("cannot start postgres: {e}")));
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                die(format_args!("postgres exited ({st}):\n{}", self.tail()));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            if Instant::now() > deadline {
                die(format_args!(
                    "postgres not ready after {STARTUP:?}:\n{}",
                    self.tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL as the superuser over the unix socket.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.dir.join("sock"))
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
            .unwrap_or_else(|e| die(format_args!("cannot run psql: {e}")));
        if !out.status.success() {
            die(format_args!(
                "psql {sql}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The broker's connection URL (it holds the password: written to a
    /// 0600 file, never printed).
    pub fn url(&self) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{DB}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) on our own child's pid; SIGINT is a fast shutdown.
            unsafe {
                libc::kill(pid, libc::SIGINT);
            }
        }
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
}
