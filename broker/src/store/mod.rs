//! The one-time-use store: trust on first use per identity, with optional
//! nonce-bound re-authentication.
//!
//! `consume` is atomic and durable before it returns, so credentials leave
//! the broker only after the use that released them is recorded.
//!
//! Three backends implement [`ReplayStore`] with the same semantics:
//! [`sqlite`] (the default; one broker process), [`postgres`] (several
//! broker replicas share one primary) and [`redis`] (several replicas, with a
//! weaker guarantee on failover). `docs/broker-store.md` compares them.
//!
//! `sqlite` and `postgres` also keep quorum approval requests
//! ([`approvals::ApprovalStore`], reached through [`ReplayStore::approvals`]);
//! `redis` does not, and the configuration refuses quorum rules with it.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use p11shim_proto::Reauth;
use parking_lot::{Condvar, Mutex};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::secrets::SecretSource;

pub mod approvals;
pub mod postgres;
pub mod redis;
pub mod sqlite;

/// A use of one identity (a replay key) that the broker is about to serve.
#[derive(Clone, Debug)]
pub struct Claim<'a> {
    /// SHA-256 of the identity's length-prefixed fields.
    pub key: [u8; 32],
    pub role: &'a str,
    /// Who was verified (for the operator; never a secret).
    pub subject: &'a str,
    /// SHA-256 of the client's nonce, if it sent one.
    pub nonce_hash: Option<[u8; 32]>,
    pub reauth: Reauth,
    /// Unix seconds.
    pub now: i64,
    /// Unix seconds after which the entry no longer blocks a new first use.
    pub expires_at: i64,
    /// Whether this use may be a first use. False when the identity is past
    /// the role's first-use window: then only a nonce re-authentication of
    /// a live entry can succeed, and nothing is stored.
    pub first_use: bool,
}

/// What `consume` decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No live entry existed; one now does.
    FirstUse,
    /// A live entry existed, the role allows nonce re-authentication and the
    /// nonce matched (compared in constant time).
    Reauthenticated,
    /// A live entry existed and this use is not allowed.
    AlreadyUsed,
    /// No live entry existed and `first_use` was false; nothing was stored.
    NotAllowed,
}

/// Why a store could not answer. Messages never hold a secret: passwords
/// are removed from URLs and from the backends' own error texts.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("replay store unavailable: {0}")]
    Unavailable(String),
    #[error("replay store configuration: {0}")]
    Config(String),
}

/// A replay store backend.
///
/// # Semantics of `consume` (every backend)
///
/// * No entry for `claim.key`, or an entry whose `expires_at <= claim.now`:
///   the entry becomes `{key, role, subject, nonce_hash, first_seen = now,
///   last_seen = now, expires_at}` (an expired entry is replaced in the same
///   atomic step) → [`Outcome::FirstUse`].
/// * A live entry exists, `claim.reauth` is [`Reauth::Nonce`], both the entry
///   and the claim carry a nonce hash, and the two are equal (compared in
///   constant time): `last_seen = now`, `expires_at = max(stored, claimed)`
///   → [`Outcome::Reauthenticated`].
/// * A live entry exists otherwise → [`Outcome::AlreadyUsed`]; the entry is
///   left as it was.
///
/// The decision is atomic among threads and among processes sharing the
/// store, and `FirstUse` / `Reauthenticated` are returned only once the
/// write is durable (the exact meaning per backend is in its module doc).
/// When the store cannot decide it returns [`StoreError::Unavailable`], and
/// the caller must not issue credentials.
pub trait ReplayStore: Send + Sync + fmt::Debug {
    /// Records `claim` atomically and durably, or reports why not.
    fn consume(&self, claim: &Claim<'_>) -> Result<Outcome, StoreError>;
    /// Deletes entries whose `expires_at` is before `before`; returns how many.
    /// Redis expires its keys natively and always returns 0.
    fn tidy(&self, before: i64) -> Result<u64, StoreError>;
    /// Removes the entry for `key` (an operator allowing a fresh first use);
    /// whether there was one.
    fn forget(&self, key: &[u8; 32]) -> Result<bool, StoreError>;
    /// Cheap liveness check for `/healthz`.
    fn ping(&self) -> Result<(), StoreError>;
    /// `sqlite`, `postgres` or `redis`.
    fn kind(&self) -> &'static str;
    /// The approval store of this backend (quorum requests), when it has
    /// one: `sqlite` and `postgres` do, `redis` does not.
    fn approvals(&self) -> Option<&dyn approvals::ApprovalStore> {
        None
    }
}

fn default_busy_timeout_ms() -> u64 {
    5_000
}
fn default_pool_size() -> usize {
    4
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_statement_timeout_ms() -> u64 {
    5_000
}
fn default_redis_prefix() -> String {
    "p11shim:seen:".into()
}
fn default_wait_timeout_ms() -> u64 {
    1_000
}

/// `[store]` in the broker configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// An SQLite file, created (mode 0600, parent directory 0700) when
    /// missing. One broker process only; never on a network file system.
    Sqlite {
        path: PathBuf,
        /// How long a write waits for another connection's lock.
        #[serde(default = "default_busy_timeout_ms")]
        busy_timeout_ms: u64,
    },
    /// A PostgreSQL database shared by every broker replica.
    Postgres {
        /// Where the connection URL comes from (`env:NAME`, `file:/path`,
        /// `cmd:/program …`; see [`SecretSource`]), since it may hold a
        /// password. The URL is `postgres://user:pass@host:port/db` or the
        /// key=value form; `sslmode=require` asks for TLS.
        url: String,
        /// PEM file of the CA certificates the server's certificate is
        /// checked against, instead of the system's.
        #[serde(default)]
        ca_file: Option<PathBuf>,
        /// Connections kept open at most.
        #[serde(default = "default_pool_size")]
        pool_size: usize,
        /// Connect timeout, unless the URL sets `connect_timeout`; also how
        /// long a caller waits for a free pooled connection.
        #[serde(default = "default_connect_timeout_ms")]
        connect_timeout_ms: u64,
        /// Server-side `statement_timeout` (and `lock_timeout`), and the TCP
        /// user timeout bounding an unanswered write to a dead server.
        #[serde(default = "default_statement_timeout_ms")]
        statement_timeout_ms: u64,
    },
    /// A Redis server (or primary). See `docs/broker-store.md` for why a
    /// failover can reopen replay.
    Redis {
        /// Where the URL (`redis://[user:pass@]host:port/db` or
        /// `redis+unix:///path`) comes from: a secret source, as for
        /// PostgreSQL.
        url: String,
        /// Prefix of every key the broker writes.
        #[serde(default = "default_redis_prefix")]
        key_prefix: String,
        /// Connections kept open at most.
        #[serde(default = "default_pool_size")]
        pool_size: usize,
        /// Connect timeout, and the read/write timeout of every command.
        #[serde(default = "default_connect_timeout_ms")]
        connect_timeout_ms: u64,
        /// After each write, `WAIT wait_replicas wait_timeout_ms`; fewer
        /// acknowledgements make the use fail as unavailable. 0: no WAIT.
        #[serde(default)]
        wait_replicas: u32,
        #[serde(default = "default_wait_timeout_ms")]
        wait_timeout_ms: u64,
    },
}

/// Opens the configured backend: reads the URL's secret source, connects,
/// and creates or checks the schema.
pub fn open(cfg: &StoreConfig) -> Result<Box<dyn ReplayStore>, StoreError> {
    match cfg {
        StoreConfig::Sqlite {
            path,
            busy_timeout_ms,
        } => Ok(Box::new(sqlite::SqliteStore::open(
            path,
            Duration::from_millis(*busy_timeout_ms),
        )?)),
        StoreConfig::Postgres {
            url,
            ca_file,
            pool_size,
            connect_timeout_ms,
            statement_timeout_ms,
        } => {
            let url = read_url(url)?;
            Ok(Box::new(postgres::PostgresStore::open(
                &url,
                &postgres::Options {
                    ca_file: ca_file.clone(),
                    pool_size: *pool_size,
                    connect_timeout: Duration::from_millis(*connect_timeout_ms),
                    statement_timeout: Duration::from_millis(*statement_timeout_ms),
                },
            )?))
        }
        StoreConfig::Redis {
            url,
            key_prefix,
            pool_size,
            connect_timeout_ms,
            wait_replicas,
            wait_timeout_ms,
        } => {
            let url = read_url(url)?;
            Ok(Box::new(redis::RedisStore::open(
                &url,
                &redis::Options {
                    key_prefix: key_prefix.clone(),
                    pool_size: *pool_size,
                    timeout: Duration::from_millis(*connect_timeout_ms),
                    wait_replicas: *wait_replicas,
                    wait_timeout: Duration::from_millis(*wait_timeout_ms),
                },
            )?))
        }
    }
}

fn read_url(source: &str) -> Result<Zeroizing<String>, StoreError> {
    let src =
        SecretSource::parse(source).map_err(|e| StoreError::Config(format!("store url: {e}")))?;
    src.read()
        .map_err(|e| StoreError::Config(format!("store url: {e}")))
}

/// Whether a live entry may be re-authenticated by `claim`: the role allows
/// it and both nonce hashes exist and are equal, compared in constant time.
pub(crate) fn nonce_allows(claim: &Claim<'_>, stored: Option<&[u8]>) -> bool {
    match (claim.reauth, stored, claim.nonce_hash.as_ref()) {
        (Reauth::Nonce, Some(stored), Some(claimed)) => {
            stored.len() == claimed.len() && bool::from(stored.ct_eq(claimed))
        }
        _ => false,
    }
}

/// A backend's error text with every occurrence of `secret` removed, for
/// the case a client library ever echoes its connection parameters.
pub(crate) fn scrub(message: impl fmt::Display, secret: Option<&str>) -> String {
    let m = message.to_string();
    match secret {
        Some(s) if !s.is_empty() => m.replace(s, "***"),
        _ => m,
    }
}

/// A small blocking connection pool for the network backends: at most
/// `size` connections; a connection that failed is dropped rather than
/// returned, so the next caller connects afresh.
pub(crate) struct Pool<C> {
    state: Mutex<PoolState<C>>,
    freed: Condvar,
    size: usize,
    wait: Duration,
}

struct PoolState<C> {
    idle: Vec<C>,
    open: usize,
}

/// A connection taken from a [`Pool`]; `reused` tells whether it sat idle
/// (and so may have died meanwhile) or was just made.
pub(crate) struct Pooled<C> {
    pub conn: C,
    pub reused: bool,
}

impl<C> Pool<C> {
    pub(crate) fn new(size: usize, wait: Duration) -> Pool<C> {
        Pool {
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            size: size.max(1),
            wait,
        }
    }

    /// An idle connection, or a new one from `connect` when fewer than
    /// `size` are open; waits up to the pool's wait time otherwise.
    pub(crate) fn get(
        &self,
        connect: impl FnOnce() -> Result<C, StoreError>,
    ) -> Result<Pooled<C>, StoreError> {
        let deadline = Instant::now() + self.wait;
        let mut st = self.state.lock();
        loop {
            if let Some(conn) = st.idle.pop() {
                return Ok(Pooled { conn, reused: true });
            }
            if st.open < self.size {
                st.open += 1;
                break;
            }
            if self.freed.wait_until(&mut st, deadline).timed_out() {
                return Err(StoreError::Unavailable(format!(
                    "all {} connections busy for {:?}",
                    self.size, self.wait
                )));
            }
        }
        drop(st);
        match connect() {
            Ok(conn) => Ok(Pooled {
                conn,
                reused: false,
            }),
            Err(e) => {
                self.discard();
                Err(e)
            }
        }
    }

    /// The most connections kept open.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Returns a healthy connection.
    pub(crate) fn put(&self, conn: C) {
        self.state.lock().idle.push(conn);
        self.freed.notify_one();
    }

    /// Accounts for a connection dropped after a failure.
    pub(crate) fn discard(&self) {
        let mut st = self.state.lock();
        st.open = st.open.saturating_sub(1);
        drop(st);
        self.freed.notify_one();
    }

    /// Runs `op` on a pooled connection. On error the connection is
    /// dropped; if it had sat idle and `retry` says the error came from a
    /// dead connection (the server restarted since), `op` runs once more on
    /// a fresh one. Retrying is safe for every store operation: a repeated
    /// `consume` whose first attempt did land sees its own entry and fails
    /// closed (`AlreadyUsed`) or re-authenticates again.
    pub(crate) fn run<T, E>(
        &self,
        connect: impl Fn() -> Result<C, StoreError>,
        mut op: impl FnMut(&mut C) -> Result<T, E>,
        dead: impl Fn(&C, &E) -> bool,
        to_store_error: impl Fn(E) -> StoreError,
    ) -> Result<T, StoreError> {
        let mut pooled = self.get(&connect)?;
        match op(&mut pooled.conn) {
            Ok(v) => {
                self.put(pooled.conn);
                Ok(v)
            }
            Err(e) => {
                let retry = pooled.reused && dead(&pooled.conn, &e);
                drop(pooled);
                self.discard();
                if !retry {
                    return Err(to_store_error(e));
                }
                let mut fresh = self.get(&connect)?;
                match op(&mut fresh.conn) {
                    Ok(v) => {
                        self.put(fresh.conn);
                        Ok(v)
                    }
                    Err(e) => {
                        drop(fresh);
                        self.discard();
                        Err(to_store_error(e))
                    }
                }
            }
        }
    }
}

impl<C> fmt::Debug for Pool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state.lock();
        f.debug_struct("Pool")
            .field("size", &self.size)
            .field("open", &st.open)
            .field("idle", &st.idle.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(reauth: Reauth, nonce: Option<[u8; 32]>) -> Claim<'static> {
        Claim {
            key: [1; 32],
            role: "r",
            subject: "s",
            nonce_hash: nonce,
            reauth,
            now: 0,
            expires_at: 1,
            first_use: true,
        }
    }

    #[test]
    fn nonce_rules() {
        let n = [7u8; 32];
        assert!(nonce_allows(&claim(Reauth::Nonce, Some(n)), Some(&n)));
        assert!(!nonce_allows(&claim(Reauth::Never, Some(n)), Some(&n)));
        assert!(!nonce_allows(&claim(Reauth::Nonce, None), Some(&n)));
        assert!(!nonce_allows(&claim(Reauth::Nonce, Some(n)), None));
        assert!(!nonce_allows(
            &claim(Reauth::Nonce, Some(n)),
            Some(&[7u8; 31])
        ));
        assert!(!nonce_allows(
            &claim(Reauth::Nonce, Some(n)),
            Some(&[8u8; 32])
        ));
    }

    #[test]
    fn scrub_removes_the_secret() {
        assert_eq!(scrub("x Sup3rSecret y", Some("Sup3rSecret")), "x *** y");
        assert_eq!(scrub("x y", None), "x y");
    }

    #[test]
    fn pool_bounds_and_waits() {
        let pool: Pool<u32> = Pool::new(1, Duration::from_millis(50));
        let a = pool.get(|| Ok(1)).unwrap();
        assert!(!a.reused);
        assert!(matches!(
            pool.get(|| Ok(2)),
            Err(StoreError::Unavailable(_))
        ));
        pool.put(a.conn);
        let b = pool.get(|| Ok(3)).unwrap();
        assert!(b.reused && b.conn == 1);
        // b failed: dropped, not returned.
        pool.discard();
        assert_eq!(pool.get(|| Ok(4)).unwrap().conn, 4);
    }
}
