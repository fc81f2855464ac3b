//! Replay store conformance: one set of cases, run against SQLite, a
//! throwaway PostgreSQL cluster and a throwaway Redis server. Plus the
//! double consume from two OS processes (PostgreSQL and SQLite), and an
//! ignored throughput measurement.
//!
//! Times in claims are logical (small Unix seconds) except where Redis's
//! own expiry is under test, so "expired" never depends on the wall clock.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use p11shim_broker::store::{self, Claim, Outcome, ReplayStore, StoreConfig, StoreError};
use p11shim_proto::Reauth;
use p11shim_tests::TempDir;
use p11shim_tests::peers::databases::{PG_PASSWORD, Postgres, REDIS_PASSWORD, Redis, free_port};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
    Redis,
}

/// One backend under test: its server (if any), a private directory, and
/// how to open a store on it.
struct Fixture {
    kind: Kind,
    dir: TempDir,
    pg: Option<Postgres>,
    redis: Option<Redis>,
}

impl Fixture {
    /// `None` only when the server is missing and skipping is allowed.
    fn new(kind: Kind) -> Option<Fixture> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (pg, redis) = match kind {
            Kind::Sqlite => (None, None),
            Kind::Postgres => (Some(Postgres::start()?), None),
            Kind::Redis => (None, Some(Redis::start()?)),
        };
        let f = Fixture {
            kind,
            dir,
            pg,
            redis,
        };
        if let Some(url) = f.url() {
            write_secret(&f.url_file(), &url);
        }
        Some(f)
    }

    fn url(&self) -> Option<String> {
        self.pg
            .as_ref()
            .map(Postgres::url)
            .or_else(|| self.redis.as_ref().map(Redis::url))
    }

    fn url_file(&self) -> PathBuf {
        self.dir.path().join("store-url")
    }

    fn sqlite_path(&self) -> PathBuf {
        self.dir.path().join("state/seen.db")
    }

    /// The `[store]` table, as the broker's configuration would give it.
    fn config(&self) -> StoreConfig {
        let v = match self.kind {
            Kind::Sqlite => json!({"kind": "sqlite", "path": self.sqlite_path()}),
            Kind::Postgres => json!({
                "kind": "postgres",
                "url": format!("file:{}", self.url_file().display()),
                "pool_size": 8,
            }),
            Kind::Redis => json!({
                "kind": "redis",
                "url": format!("file:{}", self.url_file().display()),
                "pool_size": 8,
            }),
        };
        serde_json::from_value(v).expect("store config")
    }

    fn open(&self) -> Box<dyn ReplayStore> {
        let s = store::open(&self.config()).unwrap_or_else(|e| panic!("open: {e}"));
        let want = match self.kind {
            Kind::Sqlite => "sqlite",
            Kind::Postgres => "postgres",
            Kind::Redis => "redis",
        };
        assert_eq!(s.kind(), want);
        s
    }

    /// Restarts the server: PostgreSQL with a fast shutdown, Redis killed
    /// outright (SIGKILL) so only what reached the AOF survives.
    fn restart_server(&mut self) {
        if let Some(pg) = &mut self.pg {
            pg.restart();
        }
        if let Some(r) = &mut self.redis {
            r.kill();
            r.start_again();
        }
    }
}

fn write_secret(path: &Path, value: &str) {
    std::fs::write(path, value).expect("write secret");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// A distinct 32-byte key per (short) name.
fn key(name: &str) -> [u8; 32] {
    assert!(name.len() < 32, "key name too long: {name}");
    let mut k = [0xa5; 32];
    k[..name.len()].copy_from_slice(name.as_bytes());
    k[31] = u8::try_from(name.len()).expect("len");
    k
}

fn nonce(n: u8) -> Option<[u8; 32]> {
    Some([n; 32])
}

/// A claim for `name` at logical time `now`, live until `expires_at`.
fn claim(
    name: &str,
    now: i64,
    expires_at: i64,
    reauth: Reauth,
    nonce: Option<[u8; 32]>,
) -> Claim<'static> {
    Claim {
        key: key(name),
        role: "hsm-client",
        subject: "aws:123456789012:us-east-1:i-0abc",
        nonce_hash: nonce,
        reauth,
        now,
        expires_at,
        first_use: true,
    }
}

fn consume(s: &dyn ReplayStore, c: &Claim<'_>) -> Outcome {
    s.consume(c).unwrap_or_else(|e| panic!("consume: {e}"))
}

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("time")
}

/// The cases, written once.
mod cases {
    use super::*;
    use Outcome::*;
    use Reauth::{Never, Nonce};

    pub fn first_use(f: &mut Fixture) {
        let s = f.open();
        s.ping().expect("ping");
        assert_eq!(
            consume(&*s, &claim("a", 1000, 2000, Nonce, nonce(1))),
            FirstUse
        );
        assert_eq!(consume(&*s, &claim("b", 1000, 2000, Never, None)), FirstUse);
    }

    /// Past the first-use window only a re-authentication of a live entry
    /// succeeds, and a refused claim stores nothing.
    pub fn first_use_not_allowed(f: &mut Fixture) {
        let s = f.open();
        let mut late = claim("a", 1000, 2000, Nonce, nonce(1));
        late.first_use = false;
        assert_eq!(consume(&*s, &late), NotAllowed);
        assert_eq!(consume(&*s, &late), NotAllowed, "nothing was stored");
        assert_eq!(
            consume(&*s, &claim("a", 1000, 2000, Nonce, nonce(1))),
            FirstUse
        );
        let mut again = claim("a", 1500, 2500, Nonce, nonce(1));
        again.first_use = false;
        assert_eq!(consume(&*s, &again), Reauthenticated);
        let mut wrong = claim("a", 1600, 2600, Nonce, nonce(2));
        wrong.first_use = false;
        assert_eq!(consume(&*s, &wrong), AlreadyUsed);
        let mut expired = claim("a", 9000, 9900, Nonce, nonce(1));
        expired.first_use = false;
        assert_eq!(consume(&*s, &expired), NotAllowed);
    }

    pub fn replay(f: &mut Fixture) {
        let s = f.open();
        let c = claim("a", 1000, 2000, Nonce, None);
        assert_eq!(consume(&*s, &c), FirstUse);
        assert_eq!(consume(&*s, &c), AlreadyUsed);
        let mut later = claim("a", 1500, 3000, Nonce, None);
        later.subject = "someone else";
        assert_eq!(consume(&*s, &later), AlreadyUsed);
    }

    pub fn nonce_reauth(f: &mut Fixture) {
        let s = f.open();
        assert_eq!(
            consume(&*s, &claim("a", 1000, 2000, Nonce, nonce(1))),
            FirstUse
        );
        assert_eq!(
            consume(&*s, &claim("a", 1100, 2000, Nonce, nonce(1))),
            Reauthenticated
        );
        // Re-authentication extends the entry to the later expiry…
        assert_eq!(
            consume(&*s, &claim("a", 1200, 3000, Nonce, nonce(1))),
            Reauthenticated
        );
        assert_eq!(
            consume(&*s, &claim("a", 2500, 4000, Never, None)),
            AlreadyUsed
        );
        // …and an earlier one never shortens it.
        assert_eq!(
            consume(&*s, &claim("a", 2600, 2700, Nonce, nonce(1))),
            Reauthenticated
        );
        assert_eq!(
            consume(&*s, &claim("a", 2800, 4000, Never, None)),
            AlreadyUsed
        );
    }

    pub fn wrong_nonce(f: &mut Fixture) {
        let s = f.open();
        assert_eq!(
            consume(&*s, &claim("a", 1000, 2000, Nonce, nonce(1))),
            FirstUse
        );
        assert_eq!(
            consume(&*s, &claim("a", 1100, 2000, Nonce, nonce(2))),
            AlreadyUsed
        );
        // The failed attempt changed nothing: the right nonce still works.
        assert_eq!(
            consume(&*s, &claim("a", 1200, 2000, Nonce, nonce(1))),
            Reauthenticated
        );
    }

    pub fn missing_nonce(f: &mut Fixture) {
        let s = f.open();
        assert_eq!(
            consume(&*s, &claim("a", 1000, 2000, Nonce, nonce(1))),
            FirstUse
        );
        assert_eq!(
            consume(&*s, &claim("a", 1100, 2000, Nonce, None)),
            AlreadyUsed
        );
        // An entry made without a nonce can never be re-authenticated.
        assert_eq!(consume(&*s, &claim("b", 1000, 2000, Nonce, None)), FirstUse);
        assert_eq!(
            consume(&*s, &claim("b", 1100, 2000, Nonce, nonce(1))),
            AlreadyUsed
        );
        assert_eq!(
            consume(&*s, &claim("b", 1100, 2000, Nonce, None)),
            AlreadyUsed
        );
    }

    pub fn reauth_never(f: &mut Fixture) {
        let s = f.open();
        assert_eq!(
            consume(&*s, &claim("a", 1000, 2000, Never, nonce(1))),
            FirstUse
        );
        assert_eq!(
            consume(&*s, &claim("a", 1100, 2000, Never, nonce(1))),
            AlreadyUsed
        );
        assert_eq!(
            consume(&*s, &claim("a", 1200, 2000, Never, nonce(1))),
            AlreadyUsed
        );
    }

    pub fn expired_entry_allows_new_first_use(f: &mut Fixture) {
        let s = f.open();
        assert_eq!(
            consume(&*s, &claim("a", 1000, 2000, Nonce, nonce(1))),
            FirstUse
        );
        assert_eq!(
            consume(&*s, &claim("a", 1999, 3000, Never, None)),
            AlreadyUsed
        );
        // expires_at <= now: the entry no longer blocks, and is replaced.
        assert_eq!(
            consume(&*s, &claim("a", 2000, 3000, Nonce, nonce(2))),
            FirstUse
        );
        assert_eq!(
            consume(&*s, &claim("a", 2100, 3000, Nonce, nonce(1))),
            AlreadyUsed
        );
        assert_eq!(
            consume(&*s, &claim("a", 2200, 3000, Nonce, nonce(2))),
            Reauthenticated
        );
    }

    pub fn tidy(f: &mut Fixture) {
        let s = f.open();
        assert_eq!(consume(&*s, &claim("a", 1000, 1100, Never, None)), FirstUse);
        assert_eq!(consume(&*s, &claim("b", 1000, 1200, Never, None)), FirstUse);
        assert_eq!(consume(&*s, &claim("c", 1000, 1300, Never, None)), FirstUse);
        if f.kind == Kind::Redis {
            redis_native_expiry(f, &*s);
            return;
        }
        assert_eq!(s.tidy(1200).expect("tidy"), 1, "only a (1100 < 1200) goes");
        assert_eq!(s.tidy(1200).expect("tidy"), 0);
        // b and c are still there; a is gone (its delete is what made
        // a new first use possible, not its expiry: now is 1050).
        assert!(!s.forget(&key("a")).expect("forget"));
        assert_eq!(
            consume(&*s, &claim("b", 1050, 1400, Never, None)),
            AlreadyUsed
        );
        assert_eq!(
            consume(&*s, &claim("c", 1050, 1400, Never, None)),
            AlreadyUsed
        );
        assert_eq!(s.tidy(i64::MAX).expect("tidy"), 2);
    }

    /// Redis: `tidy` does nothing (0), expiry is Redis's own `PX`.
    fn redis_native_expiry(f: &Fixture, s: &dyn ReplayStore) {
        let r = f.redis.as_ref().expect("redis");
        assert_eq!(s.tidy(i64::MAX).expect("tidy"), 0);
        assert_eq!(
            consume(s, &claim("b", 1050, 1400, Never, None)),
            AlreadyUsed
        );
        let hex: String = key("c").iter().map(|b| format!("{b:02x}")).collect();
        let pttl: i64 = r
            .cli(&["PTTL", &format!("p11shim:seen:{hex}")])
            .parse()
            .expect("pttl");
        assert!(
            pttl > 0 && pttl <= 300_000,
            "c lives 300 s from its claim: {pttl}"
        );
        // A one-second entry disappears by itself.
        let now = unix_now();
        assert_eq!(
            consume(s, &claim("short", now, now + 1, Never, None)),
            FirstUse
        );
        let hex: String = key("short").iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("p11shim:seen:{hex}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while r.cli(&["EXISTS", &name]) == "1" {
            assert!(Instant::now() < deadline, "{name} never expired");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            consume(s, &claim("short", now, now + 60, Never, None)),
            FirstUse
        );
    }

    pub fn forget(f: &mut Fixture) {
        let s = f.open();
        assert_eq!(consume(&*s, &claim("a", 1000, 2000, Never, None)), FirstUse);
        assert!(s.forget(&key("a")).expect("forget"));
        assert!(!s.forget(&key("a")).expect("forget"));
        assert!(!s.forget(&key("never-seen")).expect("forget"));
        assert_eq!(consume(&*s, &claim("a", 1100, 2000, Never, None)), FirstUse);
    }

    /// 16 threads consume one key at once: exactly one first use. With the
    /// role's nonce, the 15 others re-authenticate; without, they are
    /// refused. Ten keys each, for confidence.
    pub fn concurrent_one_key(f: &mut Fixture) {
        let s: Arc<dyn ReplayStore> = Arc::from(f.open());
        for round in 0..20 {
            let with_nonce = round % 2 == 0;
            let name = format!("race-{round}");
            let barrier = Arc::new(Barrier::new(16));
            let threads: Vec<_> = (0..16)
                .map(|_| {
                    let (s, barrier, name) = (s.clone(), barrier.clone(), name.clone());
                    std::thread::spawn(move || {
                        let c = if with_nonce {
                            claim(&name, 1000, 2000, Nonce, nonce(9))
                        } else {
                            claim(&name, 1000, 2000, Never, None)
                        };
                        barrier.wait();
                        consume(&*s, &c)
                    })
                })
                .collect();
            let outcomes: Vec<Outcome> = threads
                .into_iter()
                .map(|t| t.join().expect("thread"))
                .collect();
            let count = |o: Outcome| outcomes.iter().filter(|x| **x == o).count();
            assert_eq!(count(FirstUse), 1, "round {round}: {outcomes:?}");
            let others = if with_nonce {
                Reauthenticated
            } else {
                AlreadyUsed
            };
            assert_eq!(count(others), 15, "round {round}: {outcomes:?}");
        }
    }

    /// What was consumed survives the store being closed and the server
    /// restarted (SQLite: the file reopened; PostgreSQL: a fast restart and
    /// new connections; Redis: SIGKILL, then the AOF reloaded).
    pub fn durable_across_reopen(f: &mut Fixture) {
        {
            let s = f.open();
            for i in 0..5 {
                let c = claim(&format!("d{i}"), 1000, 2000, Nonce, nonce(i));
                assert_eq!(consume(&*s, &c), FirstUse);
            }
        }
        f.restart_server();
        let s = f.open();
        for i in 0..5 {
            let name = format!("d{i}");
            assert_eq!(
                consume(&*s, &claim(&name, 1100, 2000, Never, None)),
                AlreadyUsed
            );
            assert_eq!(
                consume(&*s, &claim(&name, 1100, 2000, Nonce, nonce(i))),
                Reauthenticated
            );
        }
    }

    /// A store that cannot reach its server fails as unavailable, within
    /// its connect timeout, and names no secret.
    pub fn server_down_is_unavailable(f: &mut Fixture) {
        let secret_free = |e: &StoreError| {
            let m = format!("{e} {e:?}");
            assert!(
                !m.contains(PG_PASSWORD) && !m.contains(REDIS_PASSWORD),
                "a secret in: {m}"
            );
        };
        if f.kind == Kind::Sqlite {
            // The "server" of SQLite is its directory: make it a file.
            let blocker = f.dir.path().join("not-a-dir");
            std::fs::write(&blocker, b"").expect("write");
            let cfg = serde_json::from_value(json!({
                "kind": "sqlite", "path": blocker.join("seen.db"),
            }))
            .expect("config");
            let e = store::open(&cfg).expect_err("open under a file");
            assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
            return;
        }
        let scheme = if f.kind == Kind::Postgres {
            "postgres"
        } else {
            "redis"
        };
        let pw = if f.kind == Kind::Postgres {
            PG_PASSWORD
        } else {
            REDIS_PASSWORD
        };
        let open_at = |port: u16| {
            let url = if f.kind == Kind::Postgres {
                format!("{scheme}://broker:{pw}@127.0.0.1:{port}/replay")
            } else {
                format!("{scheme}://:{pw}@127.0.0.1:{port}/0")
            };
            let file = f.dir.path().join(format!("down-{port}"));
            write_secret(&file, &url);
            let mut cfg = json!({
                "kind": scheme,
                "url": format!("file:{}", file.display()),
                "connect_timeout_ms": 500,
            });
            if f.kind == Kind::Postgres {
                cfg["statement_timeout_ms"] = json!(500);
            }
            let cfg: StoreConfig = serde_json::from_value(cfg).expect("config");
            store::open(&cfg)
        };
        // Nothing listens.
        let e = open_at(free_port()).expect_err("nobody listens");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        secret_free(&e);
        // Something accepts the connection and never answers.
        let mute = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = mute.local_addr().expect("addr").port();
        let e = open_at(port).expect_err("a mute server");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        secret_free(&e);
        drop(mute);

        // A store whose server goes away reports it, then recovers by
        // itself once the server is back (dead pooled connections are
        // replaced).
        let s = f.open();
        assert_eq!(consume(&*s, &claim("a", 1000, 2000, Never, None)), FirstUse);
        if let Some(pg) = &mut f.pg {
            pg.stop();
        }
        if let Some(r) = &mut f.redis {
            r.kill();
        }
        let e = s
            .consume(&claim("b", 1000, 2000, Never, None))
            .expect_err("server down");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        secret_free(&e);
        assert!(s.ping().is_err());
        if let Some(pg) = &mut f.pg {
            pg.restart();
        }
        if let Some(r) = &mut f.redis {
            r.start_again();
        }
        s.ping().expect("ping after the restart");
        assert_eq!(
            consume(&*s, &claim("a", 1100, 2000, Never, None)),
            AlreadyUsed
        );
        assert_eq!(consume(&*s, &claim("b", 1100, 2000, Never, None)), FirstUse);
    }

    /// A wrong password is refused at open, and the message names neither
    /// password.
    pub fn wrong_password(f: &mut Fixture) {
        let url = f.url().expect("a networked backend");
        let real = if f.kind == Kind::Postgres {
            PG_PASSWORD
        } else {
            REDIS_PASSWORD
        };
        let bad = "Xw2WrongPassQ9";
        write_secret(&f.url_file(), &url.replace(real, bad));
        let e = store::open(&f.config()).expect_err("wrong password");
        let m = format!("{e} {e:?}");
        assert!(matches!(e, StoreError::Unavailable(_)), "{m}");
        assert!(!m.contains(bad) && !m.contains(real), "a secret in: {m}");
    }
}

/// One `#[test]` per case and backend; cases after the kind only where
/// they apply (SQLite has no credentials).
macro_rules! conformance {
    ($backend:ident, $kind:expr $(, $extra:ident)*) => {
        mod $backend {
            use super::*;

            fn run(case: fn(&mut Fixture)) {
                if let Some(mut f) = Fixture::new($kind) {
                    case(&mut f);
                }
            }

            #[test]
            fn first_use() {
                run(cases::first_use)
            }
            #[test]
            fn replay() {
                run(cases::replay)
            }
            #[test]
            fn first_use_not_allowed() {
                run(cases::first_use_not_allowed)
            }
            #[test]
            fn nonce_reauth() {
                run(cases::nonce_reauth)
            }
            #[test]
            fn wrong_nonce() {
                run(cases::wrong_nonce)
            }
            #[test]
            fn missing_nonce() {
                run(cases::missing_nonce)
            }
            #[test]
            fn reauth_never() {
                run(cases::reauth_never)
            }
            #[test]
            fn expired_entry_allows_new_first_use() {
                run(cases::expired_entry_allows_new_first_use)
            }
            #[test]
            fn tidy() {
                run(cases::tidy)
            }
            #[test]
            fn forget() {
                run(cases::forget)
            }
            #[test]
            fn concurrent_one_key() {
                run(cases::concurrent_one_key)
            }
            #[test]
            fn durable_across_reopen() {
                run(cases::durable_across_reopen)
            }
            #[test]
            fn server_down_is_unavailable() {
                run(cases::server_down_is_unavailable)
            }
            $(
                #[test]
                fn $extra() {
                    run(cases::$extra)
                }
            )*
        }
    };
}

conformance!(sqlite, Kind::Sqlite);
conformance!(postgres, Kind::Postgres, wrong_password);
conformance!(redis, Kind::Redis, wrong_password);

// ---- Two OS processes consume the same keys ----

const WORKER_ENV: &str = "P11SHIM_STORE_WORKER";
const ROUNDS: usize = 20;

/// The worker side of `two_processes_*`, run only when the parent test
/// re-executes this binary (ignored otherwise) with
/// `P11SHIM_STORE_WORKER=<id>:<dir>`. The
/// worker opens its own store from `<dir>/store.json`, and for each round
/// meets the other worker at a file barrier, consumes the round's key and
/// writes the outcome to `<dir>/out-<id>`.
#[test]
#[ignore = "the worker of two_processes_*, started by them"]
fn two_process_worker_entry() {
    let spec =
        std::env::var(WORKER_ENV).expect("started by two_processes_* with P11SHIM_STORE_WORKER");
    let (id, dir) = spec.split_once(':').expect("id:dir");
    let (id, dir) = (id.parse::<usize>().expect("id"), PathBuf::from(dir));
    let cfg: StoreConfig =
        serde_json::from_slice(&std::fs::read(dir.join("store.json")).expect("store.json"))
            .expect("config");
    let s = store::open(&cfg).unwrap_or_else(|e| panic!("worker {id}: open: {e}"));
    let other = 1 - id;
    let mut out = String::new();
    for round in 0..ROUNDS {
        std::fs::write(dir.join(format!("ready-{round}-{id}")), b"").expect("ready");
        let theirs = dir.join(format!("ready-{round}-{other}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        // Spin (no sleep) so both processes leave the barrier together.
        while !theirs.exists() {
            assert!(
                Instant::now() < deadline,
                "worker {id}: no partner in round {round}"
            );
            std::thread::yield_now();
        }
        let c = claim(&format!("proc-{round}"), 1000, 2000, Reauth::Never, None);
        let o = s.consume(&c).unwrap_or_else(|e| panic!("worker {id}: {e}"));
        out.push_str(&format!("{round} {o:?}\n"));
    }
    std::fs::write(dir.join(format!("out-{id}")), out).expect("out");
}

fn two_processes(kind: Kind) {
    let Some(f) = Fixture::new(kind) else {
        return;
    };
    // The store exists (schema made) before the workers race on it.
    drop(f.open());
    let work = f.dir.path().join("work");
    std::fs::create_dir(&work).expect("work dir");
    let cfg = match kind {
        Kind::Sqlite => json!({"kind": "sqlite", "path": f.sqlite_path()}),
        _ => json!({"kind": "postgres", "url": format!("file:{}", f.url_file().display())}),
    };
    std::fs::write(work.join("store.json"), cfg.to_string()).expect("store.json");
    let exe = std::env::current_exe().expect("current exe");
    let mut children: Vec<_> = (0..2)
        .map(|id| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "two_process_worker_entry",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(WORKER_ENV, format!("{id}:{}", work.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn worker")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    for (id, child) in children.iter_mut().enumerate() {
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                assert!(st.success(), "worker {id} failed ({st})");
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("worker {id} did not finish");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut by_round: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for id in 0..2 {
        let out = std::fs::read_to_string(work.join(format!("out-{id}")))
            .unwrap_or_else(|e| panic!("worker {id} wrote nothing: {e}"));
        for line in out.lines() {
            let (round, o) = line.split_once(' ').expect("line");
            by_round
                .entry(round.parse().expect("round"))
                .or_default()
                .push(o.to_owned());
        }
    }
    assert_eq!(by_round.len(), ROUNDS);
    for (round, mut outcomes) in by_round {
        outcomes.sort();
        assert_eq!(outcomes, ["AlreadyUsed", "FirstUse"], "round {round}");
    }
}

#[test]
fn two_processes_postgres() {
    two_processes(Kind::Postgres);
}

#[test]
fn two_processes_sqlite() {
    two_processes(Kind::Sqlite);
}

// ---- Throughput ----

/// First uses of distinct keys per second, from 1 and from 8 threads, for
/// each backend. Run by hand:
/// `cargo nextest run -p p11shim-tests --test broker_store --run-ignored only --no-capture throughput`.
#[test]
#[ignore = "a measurement, not a check"]
fn throughput() {
    for kind in [Kind::Sqlite, Kind::Postgres, Kind::Redis] {
        let Some(f) = Fixture::new(kind) else {
            continue;
        };
        let s: Arc<dyn ReplayStore> = Arc::from(f.open());
        for threads in [1usize, 8] {
            let per_thread = 2000 / threads;
            let start = Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        for i in 0..per_thread {
                            let c = claim(
                                &format!("tp-{threads}-{t}-{i}"),
                                1000,
                                2000,
                                Reauth::Never,
                                None,
                            );
                            assert_eq!(consume(&*s, &c), Outcome::FirstUse);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("thread");
            }
            let n = per_thread * threads;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "throughput {kind:?} threads={threads}: {n} first uses in {secs:.2} s = {:.0}/s",
                n as f64 / secs
            );
        }
    }
}
