//! The default replay store: one SQLite file next to the broker.
//!
//! The file is opened in WAL mode with `synchronous=FULL`, so a commit has
//! reached the disk (the WAL is fsynced) before `consume` returns. Every
//! decision runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's
//! write lock up front: the first-use upsert and the nonce compare-and-update
//! are atomic among this process's threads and among processes on the same
//! host (the busy timeout makes the loser wait instead of failing).
//!
//! One broker process only. SQLite's locks are POSIX advisory locks plus a
//! shared-memory index (`-shm`) mapped by every process; on a network file
//! system neither is shared reliably between hosts, so two brokers on two
//! machines could both see "first use". `open` refuses NFS, SMB/CIFS and
//! similar mounts it can recognize; several replicas need PostgreSQL.
//!
//! The same file holds the approval tables (schema version 2; a version 1
//! file gains them in place): every approval write runs in a `BEGIN
//! IMMEDIATE` transaction too (see [`super::approvals`]).

use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::approvals::{
    ApprovalRecord, ApprovalStore, Consumed, Decided, ListFilter, Signoff, State, approvers_json,
    judge, key_json, parse_approvers, parse_key, parse_state, status_condition,
};
use super::{Claim, Outcome, ReplayStore, StoreError, nonce_allows};

/// The schema this code writes, kept in `PRAGMA user_version`: 1, the
/// replay table; 2, the approval tables added.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE seen (
    key        BLOB PRIMARY KEY CHECK (length(key) = 32),
    role       TEXT NOT NULL,
    subject    TEXT NOT NULL,
    nonce_hash BLOB CHECK (nonce_hash IS NULL OR length(nonce_hash) = 32),
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX seen_expires_at ON seen (expires_at);
";

/// Version 2: quorum approval requests and their decisions.
const APPROVALS_SCHEMA: &str = "
CREATE TABLE approvals (
    id              TEXT PRIMARY KEY,
    role            TEXT NOT NULL,
    subject         TEXT NOT NULL,
    key_json        TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    op              TEXT NOT NULL,
    mechanism       INTEGER,
    data_sha256     TEXT,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    m               INTEGER NOT NULL,
    approvers_json  TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'consumed')),
    consumed_at     INTEGER,
    approval_data   BLOB NOT NULL
);
CREATE INDEX approvals_open ON approvals (role, subject, key_fingerprint, op);
CREATE INDEX approvals_expires_at ON approvals (expires_at);
CREATE TABLE approval_decisions (
    id        TEXT NOT NULL REFERENCES approvals (id) ON DELETE CASCADE,
    approver  TEXT NOT NULL,
    approve   INTEGER NOT NULL,
    at        INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (id, approver)
);
";

const APPROVAL_COLUMNS: &str = "id, role, subject, key_json, op, mechanism, data_sha256, \
     created_at, expires_at, m, approvers_json, status, consumed_at, approval_data";

/// File systems on which SQLite's locking does not hold between hosts.
const NETWORK_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ncpfs",
    "9p",
    "afs",
    "ceph",
    "glusterfs",
    "fuse.sshfs",
    "lustre",
    "gpfs",
];

/// See the module documentation.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn unavailable(path: &Path, what: &str, e: impl fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("sqlite {}: {what}: {e}", path.display()))
}

impl SqliteStore {
    /// Opens (creating when missing) the store at `path`.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<SqliteStore, StoreError> {
        if !path.is_absolute() {
            return Err(StoreError::Config(format!(
                "sqlite path {} must be absolute",
                path.display()
            )));
        }
        let parent = path.parent().unwrap_or(Path::new("/"));
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| unavailable(path, "create the directory", e))?;
        if let Some(fs) = network_fs(parent) {
            return Err(StoreError::Config(format!(
                "sqlite {} is on a {fs} mount; SQLite's locking does not hold across hosts (use postgres)",
                path.display()
            )));
        }
        // Create the file ourselves so that it is 0600 from the start.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| unavailable(path, "open", e))?;
        let mode = file
            .metadata()
            .map_err(|e| unavailable(path, "stat", e))?
            .permissions()
            .mode();
        if mode & 0o022 != 0 {
            // Whoever can write the file can delete entries and reopen replay.
            return Err(StoreError::Config(format!(
                "sqlite {} has mode {:04o}: others may write it (chmod 600)",
                path.display(),
                mode & 0o777
            )));
        }
        drop(file);

        let conn = Connection::open(path).map_err(|e| unavailable(path, "open", e))?;
        conn.busy_timeout(busy_timeout)
            .map_err(|e| unavailable(path, "busy_timeout", e))?;
        let journal: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| unavailable(path, "journal_mode", e))?;
        if !journal.eq_ignore_ascii_case("wal") {
            return Err(unavailable(
                path,
                "journal_mode",
                format!("got {journal}, need wal"),
            ));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(|e| unavailable(path, "pragmas", e))?;
        let mut store = SqliteStore {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let conn = self.conn.get_mut();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| unavailable(&path, "schema", e))?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| unavailable(&path, "schema", e))?;
        match version {
            0 | 1 => {
                if version == 0 {
                    tx.execute_batch(SCHEMA)
                        .map_err(|e| unavailable(&path, "create the schema", e))?;
                }
                tx.execute_batch(APPROVALS_SCHEMA)
                    .map_err(|e| unavailable(&path, "create the approval tables", e))?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(|e| unavailable(&path, "schema", e))?;
            }
            SCHEMA_VERSION => {}
            v => {
                return Err(StoreError::Config(format!(
                    "sqlite {} has schema version {v}; this broker knows {SCHEMA_VERSION}",
                    path.display()
                )));
            }
        }
        tx.commit().map_err(|e| unavailable(&path, "schema", e))
    }

    fn err(&self, what: &str, e: rusqlite::Error) -> StoreError {
        unavailable(&self.path, what, e)
    }
}

impl ReplayStore for SqliteStore {
    fn consume(&self, claim: &Claim<'_>) -> Result<Outcome, StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err("begin", e))?;
        // First use, or replacing an expired entry.
        let inserted = if !claim.first_use {
            0
        } else {
            tx.execute(
                "INSERT INTO seen (key, role, subject, nonce_hash, first_seen, last_seen, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)
                 ON CONFLICT (key) DO UPDATE SET
                     role = excluded.role, subject = excluded.subject,
                     nonce_hash = excluded.nonce_hash, first_seen = excluded.first_seen,
                     last_seen = excluded.last_seen, expires_at = excluded.expires_at
                 WHERE seen.expires_at <= excluded.first_seen",
                params![
                    &claim.key[..],
                    claim.role,
                    claim.subject,
                    claim.nonce_hash.as_ref().map(|n| &n[..]),
                    claim.now,
                    claim.expires_at
                ],
            )
            .map_err(|e| self.err("insert", e))?
        };
        let outcome = if inserted == 1 {
            Outcome::FirstUse
        } else {
            // A live entry: the write lock is ours, so it cannot change
            // between this read and the update.
            let stored: Option<Option<Vec<u8>>> = tx
                .query_row(
                    "SELECT nonce_hash FROM seen WHERE key = ?1 AND expires_at > ?2",
                    params![&claim.key[..], claim.now],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.err("select", e))?;
            let stored = match stored {
                Some(s) => s,
                None if !claim.first_use => return Ok(Outcome::NotAllowed),
                None => {
                    return Err(StoreError::Unavailable(
                        "sqlite: entry vanished inside a transaction".into(),
                    ));
                }
            };
            if nonce_allows(claim, stored.as_deref()) {
                tx.execute(
                    "UPDATE seen SET last_seen = ?2, expires_at = max(expires_at, ?3) WHERE key = ?1",
                    params![&claim.key[..], claim.now, claim.expires_at],
                )
                .map_err(|e| self.err("update", e))?;
                Outcome::Reauthenticated
            } else {
                Outcome::AlreadyUsed
            }
        };
        tx.commit().map_err(|e| self.err("commit", e))?;
        Ok(outcome)
    }

    fn tidy(&self, before: i64) -> Result<u64, StoreError> {
        let conn = self.conn.lock();
        let n = conn
            .execute("DELETE FROM seen WHERE expires_at < ?1", [before])
            .map_err(|e| self.err("tidy", e))?;
        Ok(n as u64)
    }

    fn forget(&self, key: &[u8; 32]) -> Result<bool, StoreError> {
        let conn = self.conn.lock();
        let n = conn
            .execute("DELETE FROM seen WHERE key = ?1", [&key[..]])
            .map_err(|e| self.err("forget", e))?;
        Ok(n > 0)
    }

    fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn.lock();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err("ping", e))?;
        if v != SCHEMA_VERSION {
            return Err(StoreError::Unavailable(format!(
                "sqlite {}: schema version changed to {v}",
                self.path.display()
            )));
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn approvals(&self) -> Option<&dyn ApprovalStore> {
        Some(self)
    }
}

/// A request's row (columns in [`APPROVAL_COLUMNS`] order), without its
/// decisions.
fn approval_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawApproval> {
    Ok(RawApproval {
        id: r.get(0)?,
        role: r.get(1)?,
        subject: r.get(2)?,
        key_json: r.get(3)?,
        op: r.get(4)?,
        mechanism: r.get(5)?,
        data_sha256: r.get(6)?,
        created_at: r.get(7)?,
        expires_at: r.get(8)?,
        m: r.get(9)?,
        approvers_json: r.get(10)?,
        status: r.get(11)?,
        consumed_at: r.get(12)?,
        approval_data: r.get(13)?,
    })
}

struct RawApproval {
    id: String,
    role: String,
    subject: String,
    key_json: String,
    op: String,
    mechanism: Option<i64>,
    data_sha256: Option<String>,
    created_at: i64,
    expires_at: i64,
    m: i64,
    approvers_json: String,
    status: String,
    consumed_at: Option<i64>,
    approval_data: Vec<u8>,
}

impl SqliteStore {
    /// The request `id` with its decisions, read on `conn` (inside the
    /// caller's transaction when it has one).
    fn load(&self, conn: &Connection, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
        let raw = conn
            .query_row(
                &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?1"),
                [id],
                approval_row,
            )
            .optional()
            .map_err(|e| self.err("read an approval", e))?;
        raw.map(|r| self.complete(conn, r)).transpose()
    }

    fn complete(&self, conn: &Connection, r: RawApproval) -> Result<ApprovalRecord, StoreError> {
        let mut stmt = conn
            .prepare_cached(
                "SELECT approver, approve, at FROM approval_decisions WHERE id = ?1 ORDER BY seq",
            )
            .map_err(|e| self.err("read decisions", e))?;
        let signoffs = stmt
            .query_map([&r.id], |row| {
                Ok(Signoff {
                    approver: row.get(0)?,
                    approve: row.get::<_, i64>(1)? != 0,
                    at: row.get(2)?,
                })
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("read decisions", e))?;
        Ok(ApprovalRecord {
            key: parse_key(&r.key_json)?,
            approvers: parse_approvers(&r.approvers_json)?,
            state: parse_state(&r.status)?,
            id: r.id,
            role: r.role,
            subject: r.subject,
            op: r.op,
            // Stored as the same 64 bits.
            mechanism: r.mechanism.map(|m| m as u64),
            data_sha256: r.data_sha256,
            created_at: r.created_at,
            expires_at: r.expires_at,
            m: u32::try_from(r.m).unwrap_or(u32::MAX),
            consumed_at: r.consumed_at,
            approval_data: r.approval_data,
            signoffs,
        })
    }
}

impl ApprovalStore for SqliteStore {
    fn create(&self, new: &ApprovalRecord, now: i64) -> Result<(ApprovalRecord, bool), StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err("begin", e))?;
        let open: Option<String> = tx
            .query_row(
                "SELECT id FROM approvals
                 WHERE role = ?1 AND subject = ?2 AND key_fingerprint = ?3 AND op = ?4
                   AND mechanism IS ?5 AND data_sha256 IS ?6
                   AND status IN ('pending', 'approved') AND expires_at > ?7
                 ORDER BY created_at DESC LIMIT 1",
                params![
                    new.role,
                    new.subject,
                    new.key.fingerprint,
                    new.op,
                    new.mechanism.map(|m| m as i64),
                    new.data_sha256,
                    now
                ],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err("find an open approval", e))?;
        if let Some(id) = open {
            let rec = self.load(&tx, &id)?.ok_or_else(|| {
                StoreError::Unavailable("sqlite: approval vanished inside a transaction".into())
            })?;
            tx.commit().map_err(|e| self.err("commit", e))?;
            return Ok((rec, false));
        }
        tx.execute(
            &format!(
                "INSERT INTO approvals ({APPROVAL_COLUMNS}, key_fingerprint)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, NULL, ?13, ?14)"
            ),
            params![
                new.id,
                new.role,
                new.subject,
                key_json(&new.key),
                new.op,
                new.mechanism.map(|m| m as i64),
                new.data_sha256,
                new.created_at,
                new.expires_at,
                i64::from(new.m),
                approvers_json(&new.approvers),
                State::Pending.as_str(),
                new.approval_data,
                new.key.fingerprint,
            ],
        )
        .map_err(|e| self.err("insert an approval", e))?;
        tx.commit().map_err(|e| self.err("commit", e))?;
        let mut rec = new.clone();
        rec.state = State::Pending;
        rec.signoffs.clear();
        rec.consumed_at = None;
        Ok((rec, true))
    }

    fn get(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
        let conn = self.conn.lock();
        self.load(&conn, id)
    }

    fn list(&self, filter: ListFilter, now: i64) -> Result<Vec<ApprovalRecord>, StoreError> {
        let conn = self.conn.lock();
        let cond = filter
            .status
            .map(|s| status_condition(s, "?1"))
            .unwrap_or_else(|| "?1 = ?1".into());
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE {cond}
                 ORDER BY created_at DESC, id LIMIT ?2"
            ))
            .map_err(|e| self.err("list approvals", e))?;
        let raws = stmt
            .query_map(params![now, i64::from(filter.limit)], approval_row)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("list approvals", e))?;
        raws.into_iter().map(|r| self.complete(&conn, r)).collect()
    }

    fn decide(
        &self,
        id: &str,
        approver: &str,
        approve: bool,
        signature: &[u8],
        now: i64,
    ) -> Result<Decided, StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err("begin", e))?;
        let Some(rec) = self.load(&tx, id)? else {
            return Ok(Decided::NotFound);
        };
        let next = match judge(&rec, approver, approve, now) {
            Ok(s) => s,
            Err(why) => return Ok(why.answer(rec)),
        };
        tx.execute(
            "INSERT INTO approval_decisions (id, approver, approve, at, seq, signature)
             VALUES (?1, ?2, ?3, ?4, (SELECT count(*) FROM approval_decisions WHERE id = ?1), ?5)",
            params![id, approver, i64::from(approve), now, signature],
        )
        .map_err(|e| self.err("record a decision", e))?;
        if next != rec.state {
            tx.execute(
                "UPDATE approvals SET status = ?2 WHERE id = ?1",
                params![id, next.as_str()],
            )
            .map_err(|e| self.err("update an approval", e))?;
        }
        let after = self.load(&tx, id)?.ok_or_else(|| {
            StoreError::Unavailable("sqlite: approval vanished inside a transaction".into())
        })?;
        tx.commit().map_err(|e| self.err("commit", e))?;
        Ok(Decided::Recorded(after))
    }

    fn consume(&self, id: &str, now: i64) -> Result<Consumed, StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err("begin", e))?;
        let n = tx
            .execute(
                "UPDATE approvals SET status = 'consumed', consumed_at = ?2
                 WHERE id = ?1 AND status = 'approved' AND consumed_at IS NULL AND expires_at > ?2",
                params![id, now],
            )
            .map_err(|e| self.err("consume an approval", e))?;
        let rec = self.load(&tx, id)?;
        tx.commit().map_err(|e| self.err("commit", e))?;
        Ok(match (n, rec) {
            (_, None) => Consumed::NotFound,
            (1, Some(r)) => Consumed::Consumed(r),
            (_, Some(r)) => Consumed::Refused(r),
        })
    }

    fn tidy_approvals(&self, before: i64) -> Result<u64, StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err("begin", e))?;
        tx.execute(
            "DELETE FROM approval_decisions WHERE id IN (SELECT id FROM approvals WHERE expires_at < ?1)",
            [before],
        )
        .map_err(|e| self.err("tidy approvals", e))?;
        let n = tx
            .execute("DELETE FROM approvals WHERE expires_at < ?1", [before])
            .map_err(|e| self.err("tidy approvals", e))?;
        tx.commit().map_err(|e| self.err("commit", e))?;
        Ok(n as u64)
    }
}

/// The type of a network file system holding `dir`, if it is one, from the
/// longest matching mount point in `/proc/self/mountinfo`.
fn network_fs(dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        // `id parent major:minor root mount-point options [tags…] - fstype source …`
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        let (Some(mount), Some(fstype)) = (left.split(' ').nth(4), right.split(' ').next()) else {
            continue;
        };
        let mount = PathBuf::from(unescape_mount(mount));
        if dir.starts_with(&mount) {
            let len = mount.as_os_str().len();
            if best.as_ref().is_none_or(|(l, _)| len >= *l) {
                best = Some((len, fstype.to_owned()));
            }
        }
    }
    best.map(|(_, fs)| fs)
        .filter(|fs| NETWORK_FS.contains(&fs.as_str()))
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_escapes() {
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
        assert_eq!(unescape_mount("/end\\04"), "/end\\04");
    }

    #[test]
    fn local_tmp_is_not_network() {
        assert_eq!(network_fs(&std::env::temp_dir()), None);
    }

    #[test]
    fn refuses_a_file_others_may_write() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("seen.db");
        std::fs::write(&p, b"").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = SqliteStore::open(&p, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, StoreError::Config(_)), "{e}");
    }

    #[test]
    fn creates_file_0600_and_parent_0700() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/seen.db");
        SqliteStore::open(&p, Duration::from_secs(1)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
    }
}
