//! The replay store on Redis: for several broker replicas when PostgreSQL
//! is not at hand, with a weaker guarantee.
//!
//! Each entry is one string key, `<prefix><hex key>`, holding the entry as
//! JSON and expiring natively at `expires_at` (`PX`), so [`tidy`] has
//! nothing to do and returns 0.
//!
//! * First use: `SET key entry NX PX ttl`; `OK` means the key was absent.
//! * A key that exists is read; if its `expires_at <= now` (the broker's
//!   clock ran ahead of Redis's) or its nonce matches (compared here, in
//!   constant time), it is replaced by a Lua compare-and-set that writes
//!   only if the key still holds what was read. A lost race goes around
//!   again, a bounded number of times.
//!
//! Durability is the server's: with `appendonly yes` and `appendfsync
//! always` a write is in the AOF before Redis answers. Replication is
//! asynchronous: a primary that fails over before its replicas have a key
//! loses it, and the identity can be used once more. `wait_replicas` makes
//! every write wait (`WAIT`) for that many replicas and fail as unavailable
//! otherwise; a first use that was not acknowledged is removed again (only
//! if still ours), so the client may retry. This narrows the window but
//! does not close it (a replica that acknowledged may still not be the one
//! promoted). Use PostgreSQL where a replay after failover is unacceptable.
//!
//! The URL may hold a password: it is never logged and errors name only the
//! address. TLS (`rediss://`) is not built in; use a loopback or unix-socket
//! connection, or a TLS tunnel.
//!
//! [`tidy`]: ReplayStore::tidy

use std::fmt;
use std::time::Duration;

use redis::{Client, Connection, ConnectionLike, IntoConnectionInfo, RedisError, Script};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{Claim, Outcome, Pool, ReplayStore, StoreError, nonce_allows, scrub};

/// Replaces the key only if it still holds ARGV[1].
const CAS: &str = "
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0";

/// Deletes the key only if it still holds ARGV[1].
const CAD: &str = "
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Tuning of [`RedisStore::open`]; see `StoreConfig::Redis`.
#[derive(Clone, Debug)]
pub struct Options {
    pub key_prefix: String,
    pub pool_size: usize,
    /// Connect timeout and the read/write timeout of every command.
    pub timeout: Duration,
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
}

/// What a key holds.
#[derive(Serialize, Deserialize)]
struct Entry {
    v: u32,
    role: String,
    subject: String,
    /// Hex.
    nonce_hash: Option<String>,
    first_seen: i64,
    last_seen: i64,
    expires_at: i64,
}

/// See the module documentation.
pub struct RedisStore {
    client: Client,
    opts: Options,
    password: Option<Zeroizing<String>>,
    target: String,
    cas: Script,
    cad: Script,
    pool: Pool<Connection>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("target", &self.target)
            .field("key_prefix", &self.opts.key_prefix)
            .field("wait_replicas", &self.opts.wait_replicas)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// Why one attempt failed.
enum Fail {
    Redis(RedisError),
    Other(String),
}

impl From<RedisError> for Fail {
    fn from(e: RedisError) -> Fail {
        Fail::Redis(e)
    }
}

impl RedisStore {
    /// Connects once (so a wrong URL or password fails at startup).
    pub fn open(url: &str, opts: &Options) -> Result<RedisStore, StoreError> {
        let info = url.into_connection_info().map_err(|_| {
            StoreError::Config("the Redis URL does not parse (it is not shown here)".into())
        })?;
        let password = info
            .redis_settings()
            .password()
            .map(|p| Zeroizing::new(p.to_owned()));
        let target = format!("{}/{}", info.addr(), info.redis_settings().db());
        let client = Client::open(info).map_err(|_| {
            StoreError::Config(format!(
                "redis {target}: unsupported URL (rediss:// is not built in)"
            ))
        })?;
        let store = RedisStore {
            client,
            opts: opts.clone(),
            password,
            target,
            cas: Script::new(CAS),
            cad: Script::new(CAD),
            pool: Pool::new(opts.pool_size, opts.timeout),
        };
        store.ping()?;
        Ok(store)
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let fail = |e: RedisError| self.error("connect", Fail::Redis(e));
        let con = self
            .client
            .get_connection_with_timeout(self.opts.timeout)
            .map_err(fail)?;
        // A WAIT may legitimately take its own timeout to answer.
        con.set_read_timeout(Some(self.opts.timeout + self.opts.wait_timeout))
            .map_err(fail)?;
        con.set_write_timeout(Some(self.opts.timeout))
            .map_err(fail)?;
        Ok(con)
    }

    fn redis_key(&self, key: &[u8; 32]) -> String {
        format!("{}{}", self.opts.key_prefix, hex(key))
    }

    /// `WAIT` for the configured replicas after a write.
    fn replicated(&self, c: &mut Connection) -> Result<bool, Fail> {
        if self.opts.wait_replicas == 0 {
            return Ok(true);
        }
        let acked: i64 = redis::cmd("WAIT")
            .arg(self.opts.wait_replicas)
            .arg(u64::try_from(self.opts.wait_timeout.as_millis()).unwrap_or(u64::MAX))
            .query(c)?;
        Ok(acked >= i64::from(self.opts.wait_replicas))
    }

    fn consume_once(&self, c: &mut Connection, claim: &Claim<'_>) -> Result<Outcome, Fail> {
        let key = self.redis_key(&claim.key);
        let fresh = Entry {
            v: 1,
            role: claim.role.to_owned(),
            subject: claim.subject.to_owned(),
            nonce_hash: claim.nonce_hash.as_ref().map(|n| hex(n)),
            first_seen: claim.now,
            last_seen: claim.now,
            expires_at: claim.expires_at,
        };
        let fresh = serde_json::to_string(&fresh).map_err(|e| Fail::Other(e.to_string()))?;
        let fresh_ttl = ttl_ms(claim.now, claim.expires_at);
        for _ in 0..8 {
            if claim.first_use {
                let set: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&fresh)
                    .arg("NX")
                    .arg("PX")
                    .arg(fresh_ttl)
                    .query(c)?;
                if set.is_some() {
                    return self.first_use_done(c, &key, &fresh);
                }
            }
            let current: Option<String> = redis::cmd("GET").arg(&key).query(c)?;
            let Some(current) = current else {
                if !claim.first_use {
                    return Ok(Outcome::NotAllowed);
                }
                continue; // expired or forgotten since: try the first use again
            };
            let stored: Entry = serde_json::from_str(&current)
                .map_err(|_| Fail::Other(format!("{key} does not hold a replay entry")))?;
            if stored.expires_at <= claim.now && !claim.first_use {
                return Ok(Outcome::NotAllowed);
            }
            if stored.expires_at <= claim.now {
                if self.cas(c, &key, &current, &fresh, fresh_ttl)? {
                    return self.first_use_done(c, &key, &fresh);
                }
                continue;
            }
            let stored_nonce = match &stored.nonce_hash {
                Some(h) => {
                    Some(unhex(h).ok_or_else(|| Fail::Other(format!("{key}: bad nonce hash")))?)
                }
                None => None,
            };
            if !nonce_allows(claim, stored_nonce.as_deref()) {
                return Ok(Outcome::AlreadyUsed);
            }
            let expires_at = stored.expires_at.max(claim.expires_at);
            let updated = Entry {
                last_seen: claim.now,
                expires_at,
                ..stored
            };
            let updated =
                serde_json::to_string(&updated).map_err(|e| Fail::Other(e.to_string()))?;
            if self.cas(c, &key, &current, &updated, ttl_ms(claim.now, expires_at))? {
                if !self.replicated(c)? {
                    return Err(Fail::Other(format!(
                        "fewer than {} replicas acknowledged the re-authentication",
                        self.opts.wait_replicas
                    )));
                }
                return Ok(Outcome::Reauthenticated);
            }
        }
        Err(Fail::Other(
            "the entry kept changing under this claim".into(),
        ))
    }

    fn cas(
        &self,
        c: &mut Connection,
        key: &str,
        expected: &str,
        new: &str,
        ttl: u64,
    ) -> Result<bool, Fail> {
        let n: i64 = self
            .cas
            .key(key)
            .arg(expected)
            .arg(new)
            .arg(ttl)
            .invoke(c)?;
        Ok(n == 1)
    }

    fn first_use_done(&self, c: &mut Connection, key: &str, entry: &str) -> Result<Outcome, Fail> {
        if self.replicated(c)? {
            return Ok(Outcome::FirstUse);
        }
        // Not issued: take the entry back so the client's retry can be a
        // first use, unless someone else's write replaced it meanwhile.
        let _: i64 = self.cad.key(key).arg(entry).invoke(c)?;
        Err(Fail::Other(format!(
            "fewer than {} replicas acknowledged the first use",
            self.opts.wait_replicas
        )))
    }

    fn run<T>(
        &self,
        what: &str,
        op: impl FnMut(&mut Connection) -> Result<T, Fail>,
    ) -> Result<T, StoreError> {
        self.pool
            .run(|| self.connect(), op, dead, |e| self.error(what, e))
    }

    fn error(&self, what: &str, e: Fail) -> StoreError {
        let text = match e {
            Fail::Redis(e) => e.to_string(),
            Fail::Other(m) => m,
        };
        let text = scrub(text, self.password.as_deref().map(String::as_str));
        StoreError::Unavailable(format!("redis {}: {what}: {text}", self.target))
    }
}

fn dead(c: &Connection, e: &Fail) -> bool {
    match e {
        Fail::Redis(e) => !c.is_open() || e.is_io_error() || e.is_connection_dropped(),
        Fail::Other(_) => false,
    }
}

/// Milliseconds from `now` to `expires_at`, at least 1 (`PX` refuses 0): an
/// entry that is already expired is dropped by Redis at once.
fn ttl_ms(now: i64, expires_at: i64) -> u64 {
    u64::try_from(expires_at.saturating_sub(now))
        .unwrap_or(0)
        .saturating_mul(1000)
        .max(1)
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    b.iter()
        .flat_map(|x| [DIGITS[usize::from(x >> 4)], DIGITS[usize::from(x & 15)]])
        .map(char::from)
        .collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl ReplayStore for RedisStore {
    fn consume(&self, claim: &Claim<'_>) -> Result<Outcome, StoreError> {
        self.run("consume", |c| self.consume_once(c, claim))
    }

    /// Redis expires entries itself (`PX` at `expires_at`): nothing to do.
    fn tidy(&self, _before: i64) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn forget(&self, key: &[u8; 32]) -> Result<bool, StoreError> {
        let key = self.redis_key(key);
        self.run("forget", |c| {
            let n: i64 = redis::cmd("DEL").arg(&key).query(c)?;
            Ok(n > 0)
        })
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.run("ping", |c| {
            let _: String = redis::cmd("PING").query(c)?;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex("0001abff").unwrap(), b);
        assert!(unhex("0g").is_none() && unhex("abc").is_none());
    }

    #[test]
    fn ttl_is_positive() {
        assert_eq!(ttl_ms(10, 12), 2000);
        assert_eq!(ttl_ms(10, 10), 1);
        assert_eq!(ttl_ms(10, 5), 1);
    }
}
