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

use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{Claim, Outcome, ReplayStore, StoreError, nonce_allows};

/// The schema this code writes, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

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
        conn.execute_batch("PRAGMA synchronous = FULL;")
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
            0 => {
                tx.execute_batch(SCHEMA)
                    .map_err(|e| unavailable(&path, "create the schema", e))?;
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
