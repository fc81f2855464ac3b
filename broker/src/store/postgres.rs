//! The replay store for several broker replicas: one PostgreSQL database.
//!
//! A first use is one statement, `INSERT … ON CONFLICT (key) DO UPDATE …
//! WHERE expires_at <= now RETURNING`, which PostgreSQL runs atomically even
//! under READ COMMITTED: of concurrent inserts of one key exactly one
//! returns a row, and an expired entry is replaced in the same step. The
//! nonce path locks the live row (`SELECT … FOR UPDATE`) in the same
//! transaction before it compares and updates. Every session runs with
//! `synchronous_commit = on`, so a commit is on the primary's disk (and on
//! a synchronous standby's, when the cluster names one) before `consume`
//! returns.
//!
//! Connections live in a small pool. One that fails is dropped; one that
//! died while idle (the server restarted) is replaced and the operation
//! run once more. `statement_timeout`, `lock_timeout` and the TCP user
//! timeout keep a stuck server from holding a caller forever.
//!
//! TLS: `sslmode=prefer` (the default) or `require` in the URL; the server's
//! certificate and host name are checked against the system's CAs or
//! `ca_file`. The URL may hold a password: it is never logged, and errors
//! name only the hosts, ports, database and user.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use openssl::ssl::{SslConnector, SslMethod};
use parking_lot::{Condvar, Mutex};
use postgres::config::Host;
use postgres::{Client, Config};
use postgres_openssl::MakeTlsConnector;
use zeroize::Zeroizing;

use super::approvals::{
    ApprovalRecord, ApprovalStore, Consumed, Decided, ListFilter, Signoff, State, approvers_json,
    judge, key_json, parse_approvers, parse_key, parse_state, status_condition,
};
use super::{Claim, Outcome, Pool, ReplayStore, StoreError, nonce_allows, scrub};

const SCHEMA_VERSION: i32 = 1;
/// The approval tables' version (component `approvals` of `p11shim_schema`).
const APPROVALS_SCHEMA_VERSION: i32 = 1;
/// Serializes schema creation among replicas starting together
/// (`CREATE TABLE IF NOT EXISTS` alone races on the catalog).
const SCHEMA_LOCK: i64 = 0x7031_3173_6869_6d01;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS p11shim_seen (
    key        bytea PRIMARY KEY CHECK (octet_length(key) = 32),
    role       text NOT NULL,
    subject    text NOT NULL,
    nonce_hash bytea CHECK (nonce_hash IS NULL OR octet_length(nonce_hash) = 32),
    first_seen bigint NOT NULL,
    last_seen  bigint NOT NULL,
    expires_at bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS p11shim_seen_expires_at ON p11shim_seen (expires_at);
";

const APPROVALS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS p11shim_approvals (
    id              text PRIMARY KEY,
    role            text NOT NULL,
    subject         text NOT NULL,
    key_json        text NOT NULL,
    key_fingerprint text NOT NULL,
    op              text NOT NULL,
    mechanism       bigint,
    data_sha256     text,
    created_at      bigint NOT NULL,
    expires_at      bigint NOT NULL,
    m               integer NOT NULL,
    approvers_json  text NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'consumed')),
    consumed_at     bigint,
    approval_data   bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS p11shim_approvals_open
    ON p11shim_approvals (role, subject, key_fingerprint, op);
CREATE INDEX IF NOT EXISTS p11shim_approvals_expires_at ON p11shim_approvals (expires_at);
CREATE TABLE IF NOT EXISTS p11shim_approval_decisions (
    id        text NOT NULL REFERENCES p11shim_approvals (id) ON DELETE CASCADE,
    approver  text NOT NULL,
    approve   boolean NOT NULL,
    at        bigint NOT NULL,
    seq       integer NOT NULL,
    signature bytea NOT NULL,
    PRIMARY KEY (id, approver)
);
";

const APPROVAL_COLUMNS: &str = "id, role, subject, key_json, op, mechanism, data_sha256, \
     created_at, expires_at, m, approvers_json, status, consumed_at, approval_data";

/// Serializes the creation of requests with one idempotency key among
/// replicas (a transaction-scoped advisory lock on its hash).
const OPEN_APPROVAL_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 7031))";

const FIRST_USE: &str = "
INSERT INTO p11shim_seen AS s (key, role, subject, nonce_hash, first_seen, last_seen, expires_at)
VALUES ($1, $2, $3, $4, $5, $5, $6)
ON CONFLICT (key) DO UPDATE SET
    role = EXCLUDED.role, subject = EXCLUDED.subject, nonce_hash = EXCLUDED.nonce_hash,
    first_seen = EXCLUDED.first_seen, last_seen = EXCLUDED.last_seen,
    expires_at = EXCLUDED.expires_at
WHERE s.expires_at <= EXCLUDED.first_seen
RETURNING 1";

/// Tuning of [`PostgresStore::open`]; see `StoreConfig::Postgres`.
#[derive(Clone, Debug)]
pub struct Options {
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
}

/// See the module documentation.
pub struct PostgresStore {
    config: Config,
    tls: MakeTlsConnector,
    session_setup: String,
    /// For scrubbing error texts only.
    password: Option<Zeroizing<String>>,
    /// Hosts, ports, database and user: what messages may say.
    target: String,
    pool: Pool<Client>,
    /// Bound on one whole connection attempt (socket, TLS, authentication,
    /// session setup).
    connect_deadline: Duration,
    /// Connection attempts given up on whose threads still run.
    abandoned: Arc<AtomicUsize>,
}

/// Where a connecting thread leaves its result, unless the caller gave up.
struct Slot {
    result: Option<Result<Client, postgres::Error>>,
    abandoned: bool,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// Why one attempt failed.
enum Fail {
    Db(postgres::Error),
    Other(String),
}

impl From<postgres::Error> for Fail {
    fn from(e: postgres::Error) -> Fail {
        Fail::Db(e)
    }
}

impl PostgresStore {
    /// Connects once (so a wrong URL or password fails at startup) and
    /// creates the schema when missing.
    pub fn open(url: &str, opts: &Options) -> Result<PostgresStore, StoreError> {
        let mut config = Config::from_str(url).map_err(|_| {
            // The parser's message may quote a piece of the URL.
            StoreError::Config("the PostgreSQL URL does not parse (it is not shown here)".into())
        })?;
        let password = config
            .get_password()
            .map(|p| Zeroizing::new(String::from_utf8_lossy(p).into_owned()));
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(opts.connect_timeout);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(opts.statement_timeout + opts.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("p11shim-broker");
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let target = describe(&config);
        let per_host = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(opts.connect_timeout);
        let hosts = u32::try_from(config.get_hosts().len().max(1)).unwrap_or(u32::MAX);
        let connect_deadline = per_host.saturating_mul(hosts) + opts.statement_timeout;

        let mut ssl = SslConnector::builder(SslMethod::tls_client())
            .map_err(|e| StoreError::Config(format!("TLS setup: {e}")))?;
        if let Some(ca) = &opts.ca_file {
            ssl.set_ca_file(ca)
                .map_err(|e| StoreError::Config(format!("ca_file {}: {e}", ca.display())))?;
        }
        let tls = MakeTlsConnector::new(ssl.build());

        let ms = opts.statement_timeout.as_millis().max(1);
        let session_setup = format!(
            "SET synchronous_commit = on; SET statement_timeout = {ms}; SET lock_timeout = {ms}; \
             SET idle_in_transaction_session_timeout = {}; SET default_transaction_isolation = 'read committed';",
            ms * 2
        );
        let store = PostgresStore {
            config,
            tls,
            session_setup,
            password,
            target,
            pool: Pool::new(opts.pool_size, opts.connect_timeout),
            connect_deadline,
            abandoned: Arc::new(AtomicUsize::new(0)),
        };
        store.pool.run(
            || store.connect(),
            |c| store.create_schema(c),
            |_, _| false,
            |e| store.error("schema", e),
        )?;
        Ok(store)
    }

    /// A new session. The client library bounds only the socket connect,
    /// not the startup exchange after it (a server that accepts and then
    /// says nothing would hold us forever), so the attempt runs on its own
    /// thread and is abandoned at the deadline. Abandoned attempts are
    /// counted; while too many still hang, new ones fail at once.
    fn connect(&self) -> Result<Client, StoreError> {
        let limit = self.pool.size() * 2;
        if self.abandoned.load(Ordering::Acquire) >= limit {
            return Err(self.error(
                "connect",
                Fail::Other(format!("{limit} earlier connection attempts still hang")),
            ));
        }
        let slot = Arc::new((
            Mutex::new(Slot {
                result: None,
                abandoned: false,
            }),
            Condvar::new(),
        ));
        let (config, tls, setup) = (
            self.config.clone(),
            self.tls.clone(),
            self.session_setup.clone(),
        );
        let (theirs, abandoned) = (slot.clone(), self.abandoned.clone());
        std::thread::Builder::new()
            .name("pg-connect".into())
            .spawn(move || {
                let r = config.connect(tls).and_then(|mut c| {
                    c.batch_execute(&setup)?;
                    Ok(c)
                });
                let (lock, cv) = &*theirs;
                let mut s = lock.lock();
                if s.abandoned {
                    abandoned.fetch_sub(1, Ordering::AcqRel);
                } else {
                    s.result = Some(r);
                    cv.notify_one();
                }
            })
            .map_err(|e| self.error("connect", Fail::Other(format!("spawn: {e}"))))?;
        let deadline = Instant::now() + self.connect_deadline;
        let (lock, cv) = &*slot;
        let mut s = lock.lock();
        while s.result.is_none() {
            if cv.wait_until(&mut s, deadline).timed_out() && s.result.is_none() {
                s.abandoned = true;
                self.abandoned.fetch_add(1, Ordering::AcqRel);
                return Err(self.error(
                    "connect",
                    Fail::Other(format!("no answer within {:?}", self.connect_deadline)),
                ));
            }
        }
        match s.result.take() {
            Some(Ok(c)) => Ok(c),
            Some(Err(e)) => Err(self.error("connect", Fail::Db(e))),
            None => Err(self.error("connect", Fail::Other("no result".into()))),
        }
    }

    fn create_schema(&self, c: &mut Client) -> Result<(), Fail> {
        let mut tx = c.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS p11shim_schema (
                 component text PRIMARY KEY, version integer NOT NULL)",
        )?;
        tx.execute(
            "INSERT INTO p11shim_schema VALUES ('replay', $1) ON CONFLICT DO NOTHING",
            &[&SCHEMA_VERSION],
        )?;
        let v: i32 = tx
            .query_one(
                "SELECT version FROM p11shim_schema WHERE component = 'replay'",
                &[],
            )?
            .get(0);
        if v != SCHEMA_VERSION {
            return Err(Fail::Other(format!(
                "schema version {v}; this broker knows {SCHEMA_VERSION}"
            )));
        }
        tx.batch_execute(SCHEMA)?;
        tx.execute(
            "INSERT INTO p11shim_schema VALUES ('approvals', $1) ON CONFLICT DO NOTHING",
            &[&APPROVALS_SCHEMA_VERSION],
        )?;
        let v: i32 = tx
            .query_one(
                "SELECT version FROM p11shim_schema WHERE component = 'approvals'",
                &[],
            )?
            .get(0);
        if v != APPROVALS_SCHEMA_VERSION {
            return Err(Fail::Other(format!(
                "approval schema version {v}; this broker knows {APPROVALS_SCHEMA_VERSION}"
            )));
        }
        tx.batch_execute(APPROVALS_SCHEMA)?;
        tx.commit()?;
        Ok(())
    }

    fn consume_once(&self, c: &mut Client, claim: &Claim<'_>) -> Result<Outcome, Fail> {
        let nonce = claim.nonce_hash.as_ref().map(|n| &n[..]);
        // A concurrent `forget`/`tidy` between the two statements sends us
        // around again; a handful of rounds is more than any real race.
        for _ in 0..4 {
            let mut tx = c.transaction()?;
            if claim.first_use {
                let inserted = tx.query_opt(
                    FIRST_USE,
                    &[
                        &&claim.key[..],
                        &claim.role,
                        &claim.subject,
                        &nonce,
                        &claim.now,
                        &claim.expires_at,
                    ],
                )?;
                if inserted.is_some() {
                    tx.commit()?;
                    return Ok(Outcome::FirstUse);
                }
            }
            let row = tx.query_opt(
                "SELECT nonce_hash, expires_at FROM p11shim_seen WHERE key = $1 FOR UPDATE",
                &[&&claim.key[..]],
            )?;
            let live = row.as_ref().is_some_and(|r| r.get::<_, i64>(1) > claim.now);
            if !claim.first_use && !live {
                tx.rollback()?;
                return Ok(Outcome::NotAllowed);
            }
            let Some(row) = row else {
                tx.rollback()?;
                continue;
            };
            let stored: Option<Vec<u8>> = row.get(0);
            let expires_at: i64 = row.get(1);
            if expires_at <= claim.now {
                // Replaced by a claim with an earlier expiry since; retry.
                tx.rollback()?;
                continue;
            }
            if !nonce_allows(claim, stored.as_deref()) {
                tx.rollback()?;
                return Ok(Outcome::AlreadyUsed);
            }
            tx.execute(
                "UPDATE p11shim_seen SET last_seen = $2, expires_at = GREATEST(expires_at, $3)
                 WHERE key = $1",
                &[&&claim.key[..], &claim.now, &claim.expires_at],
            )?;
            tx.commit()?;
            return Ok(Outcome::Reauthenticated);
        }
        Err(Fail::Other(
            "the entry kept changing under this claim".into(),
        ))
    }

    fn run<T>(
        &self,
        what: &str,
        op: impl FnMut(&mut Client) -> Result<T, Fail>,
    ) -> Result<T, StoreError> {
        self.pool
            .run(|| self.connect(), op, dead, |e| self.error(what, e))
    }

    fn error(&self, what: &str, e: Fail) -> StoreError {
        let text = match e {
            Fail::Db(e) => match e.as_db_error() {
                Some(db) => format!("{} ({})", db.message(), db.code().code()),
                None => e.to_string(),
            },
            Fail::Other(m) => m,
        };
        let text = scrub(text, self.password.as_deref().map(String::as_str));
        StoreError::Unavailable(format!("postgres {}: {what}: {text}", self.target))
    }
}

/// Whether `e` means the connection itself is gone (worth one retry on a
/// fresh one) rather than a statement failing.
fn dead(c: &Client, e: &Fail) -> bool {
    match e {
        Fail::Db(e) => {
            c.is_closed()
                || e.is_closed()
                || match e.as_db_error() {
                    None => true,
                    // 08: connection exception; 57P: operator intervention
                    // (admin_shutdown, crash_shutdown, cannot_connect_now).
                    Some(db) => {
                        let code = db.code().code();
                        code.starts_with("08") || code.starts_with("57P")
                    }
                }
        }
        Fail::Other(_) => false,
    }
}

/// `user@host:port,host:port/db`, without the password.
fn describe(c: &Config) -> String {
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = c
                .get_ports()
                .get(i)
                .or_else(|| c.get_ports().first())
                .copied()
                .unwrap_or(5432);
            match h {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}:{port}", dir.display()),
            }
        })
        .collect();
    format!(
        "{}@{}/{}",
        c.get_user().unwrap_or(""),
        hosts.join(","),
        c.get_dbname().unwrap_or("")
    )
}

impl ReplayStore for PostgresStore {
    fn consume(&self, claim: &Claim<'_>) -> Result<Outcome, StoreError> {
        self.run("consume", |c| self.consume_once(c, claim))
    }

    fn tidy(&self, before: i64) -> Result<u64, StoreError> {
        self.run("tidy", |c| {
            Ok(c.execute("DELETE FROM p11shim_seen WHERE expires_at < $1", &[&before])?)
        })
    }

    fn forget(&self, key: &[u8; 32]) -> Result<bool, StoreError> {
        self.run("forget", |c| {
            Ok(c.execute("DELETE FROM p11shim_seen WHERE key = $1", &[&&key[..]])? > 0)
        })
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.run("ping", |c| {
            c.simple_query("SELECT 1")?;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn approvals(&self) -> Option<&dyn ApprovalStore> {
        Some(self)
    }
}

/// Reads the request `id` and its decisions; `lock` takes the row lock
/// (`FOR UPDATE`) for the rest of the transaction.
fn load(
    c: &mut impl postgres::GenericClient,
    id: &str,
    lock: bool,
) -> Result<Option<ApprovalRecord>, Fail> {
    let sql = format!(
        "SELECT {APPROVAL_COLUMNS} FROM p11shim_approvals WHERE id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    match c.query_opt(sql.as_str(), &[&id])? {
        Some(row) => Ok(Some(complete(c, &row)?)),
        None => Ok(None),
    }
}

fn complete(
    c: &mut impl postgres::GenericClient,
    row: &postgres::Row,
) -> Result<ApprovalRecord, Fail> {
    let id: String = row.get(0);
    let signoffs = c
        .query(
            "SELECT approver, approve, at FROM p11shim_approval_decisions WHERE id = $1 ORDER BY seq",
            &[&id],
        )?
        .iter()
        .map(|r| Signoff {
            approver: r.get(0),
            approve: r.get(1),
            at: r.get(2),
        })
        .collect();
    let stored = |e: StoreError| Fail::Other(e.to_string());
    Ok(ApprovalRecord {
        role: row.get(1),
        subject: row.get(2),
        key: parse_key(row.get(3)).map_err(stored)?,
        op: row.get(4),
        // Stored as the same 64 bits.
        mechanism: row.get::<_, Option<i64>>(5).map(|m| m as u64),
        data_sha256: row.get(6),
        created_at: row.get(7),
        expires_at: row.get(8),
        m: u32::try_from(row.get::<_, i32>(9)).unwrap_or(u32::MAX),
        approvers: parse_approvers(row.get(10)).map_err(stored)?,
        state: parse_state(row.get(11)).map_err(stored)?,
        consumed_at: row.get(12),
        approval_data: row.get(13),
        signoffs,
        id,
    })
}

fn vanished() -> Fail {
    Fail::Other("approval vanished inside a transaction".into())
}

impl ApprovalStore for PostgresStore {
    fn create(&self, new: &ApprovalRecord, now: i64) -> Result<(ApprovalRecord, bool), StoreError> {
        let idem = format!(
            "{}\n{}\n{}\n{}\n{:?}\n{:?}",
            new.role, new.subject, new.key.fingerprint, new.op, new.mechanism, new.data_sha256
        );
        let mechanism = new.mechanism.map(|m| m as i64);
        self.run("create an approval", |c| {
            let mut tx = c.transaction()?;
            tx.execute(OPEN_APPROVAL_LOCK, &[&idem])?;
            let open = tx.query_opt(
                "SELECT id FROM p11shim_approvals
                 WHERE role = $1 AND subject = $2 AND key_fingerprint = $3 AND op = $4
                   AND mechanism IS NOT DISTINCT FROM $5 AND data_sha256 IS NOT DISTINCT FROM $6
                   AND status IN ('pending', 'approved') AND expires_at > $7
                 ORDER BY created_at DESC LIMIT 1",
                &[
                    &new.role,
                    &new.subject,
                    &new.key.fingerprint,
                    &new.op,
                    &mechanism,
                    &new.data_sha256,
                    &now,
                ],
            )?;
            if let Some(row) = open {
                let id: String = row.get(0);
                let rec = load(&mut tx, &id, false)?.ok_or_else(vanished)?;
                tx.commit()?;
                return Ok((rec, false));
            }
            tx.execute(
                &format!(
                    "INSERT INTO p11shim_approvals ({APPROVAL_COLUMNS}, key_fingerprint)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL, $13, $14)"
                ),
                &[
                    &new.id,
                    &new.role,
                    &new.subject,
                    &key_json(&new.key),
                    &new.op,
                    &mechanism,
                    &new.data_sha256,
                    &new.created_at,
                    &new.expires_at,
                    &i32::try_from(new.m).unwrap_or(i32::MAX),
                    &approvers_json(&new.approvers),
                    &State::Pending.as_str(),
                    &new.approval_data,
                    &new.key.fingerprint,
                ],
            )?;
            tx.commit()?;
            let mut rec = new.clone();
            rec.state = State::Pending;
            rec.signoffs.clear();
            rec.consumed_at = None;
            Ok((rec, true))
        })
    }

    fn get(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
        self.run("read an approval", |c| load(c, id, false))
    }

    fn list(&self, filter: ListFilter, now: i64) -> Result<Vec<ApprovalRecord>, StoreError> {
        let cond = filter
            .status
            .map(|s| status_condition(s, "$1"))
            .unwrap_or_else(|| "$1::bigint IS NOT NULL".into());
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM p11shim_approvals WHERE {cond}
             ORDER BY created_at DESC, id LIMIT $2"
        );
        let limit = i64::from(filter.limit);
        self.run("list approvals", |c| {
            let rows = c.query(sql.as_str(), &[&now, &limit])?;
            rows.iter().map(|r| complete(c, r)).collect()
        })
    }

    fn decide(
        &self,
        id: &str,
        approver: &str,
        approve: bool,
        signature: &[u8],
        now: i64,
    ) -> Result<Decided, StoreError> {
        self.run("record a decision", |c| {
            let mut tx = c.transaction()?;
            let Some(rec) = load(&mut tx, id, true)? else {
                tx.rollback()?;
                return Ok(Decided::NotFound);
            };
            let next = match judge(&rec, approver, approve, now) {
                Ok(s) => s,
                Err(why) => {
                    tx.rollback()?;
                    return Ok(why.answer(rec));
                }
            };
            let seq = i32::try_from(rec.signoffs.len()).unwrap_or(i32::MAX);
            tx.execute(
                "INSERT INTO p11shim_approval_decisions (id, approver, approve, at, seq, signature)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&id, &approver, &approve, &now, &seq, &signature],
            )?;
            if next != rec.state {
                tx.execute(
                    "UPDATE p11shim_approvals SET status = $2 WHERE id = $1",
                    &[&id, &next.as_str()],
                )?;
            }
            let after = load(&mut tx, id, false)?.ok_or_else(vanished)?;
            tx.commit()?;
            Ok(Decided::Recorded(after))
        })
    }

    fn consume(&self, id: &str, now: i64) -> Result<Consumed, StoreError> {
        self.run("consume an approval", |c| {
            let mut tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE p11shim_approvals SET status = 'consumed', consumed_at = $2
                 WHERE id = $1 AND status = 'approved' AND consumed_at IS NULL AND expires_at > $2",
                &[&id, &now],
            )?;
            let rec = load(&mut tx, id, false)?;
            tx.commit()?;
            Ok(match (n, rec) {
                (_, None) => Consumed::NotFound,
                (1, Some(r)) => Consumed::Consumed(r),
                (_, Some(r)) => Consumed::Refused(r),
            })
        })
    }

    fn tidy_approvals(&self, before: i64) -> Result<u64, StoreError> {
        self.run("tidy approvals", |c| {
            Ok(c.execute(
                "DELETE FROM p11shim_approvals WHERE expires_at < $1",
                &[&before],
            )?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_has_no_password() {
        let c = Config::from_str("postgres://app:Pw9xSecret@db1:5433,db2/broker").unwrap();
        let d = describe(&c);
        assert_eq!(d, "app@db1:5433,db2:5432/broker");
    }

    #[test]
    fn a_bad_url_is_not_echoed() {
        let e = PostgresStore::open(
            "postgres://app:Pw9xSecret@db1:notaport/broker",
            &Options {
                ca_file: None,
                pool_size: 1,
                connect_timeout: Duration::from_millis(100),
                statement_timeout: Duration::from_millis(100),
            },
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("Pw9xSecret"), "{e}");
    }
}
