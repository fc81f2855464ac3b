//! p11shim's tamper-evident audit log.
//!
//! One JSON line per security-relevant event ([`Record`]), written by a
//! background thread ([`Auditor`]) so that the caller's cost is a push onto
//! a bounded lock-free queue. The lines of one process form a hash chain
//! (each carries the SHA-256 of the one before); checkpoints, signed with
//! Ed25519 or HMAC-SHA256 ([`Signer`]), seal the chain periodically and at
//! [`Auditor::stop`]. [`verify`] reports the first broken link of one or
//! more files. `docs/audit.md` describes the format and its guarantees.
//!
//! Audit is a side service: it never calls back into the module.

#![deny(unsafe_code)]

mod auditor;
mod human;
pub mod names;
mod record;
mod sign;
mod sink;
mod verify;

use std::path::PathBuf;

pub use auditor::{Auditor, Stats};
pub use human::render_human;
pub use record::{KeyRef, Kind, Record};
pub use sign::{ALG_ED25519, ALG_HMAC, Signer, VerifyKey};
pub use verify::{Broken, ChainReport, Report, verify};

/// Re-exported so that callers name the same key types.
pub use ed25519_dalek;
pub use zeroize::Zeroizing;

/// What the auditor does when a record cannot be written (the queue is
/// full or a sink is failing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// [`Auditor::admit`] says no: the module denies security-relevant calls.
    FailClosed,
    /// Calls go on; records that find the queue full are counted as lost,
    /// and a `lost` record enters the chain once writing works again.
    FailOpen,
}

/// When the audit file is flushed to stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// fdatasync after every batch, before the batch counts as written.
    Always,
    /// fdatasync at most this often, when something was written.
    IntervalMs(u64),
    /// Left to the kernel.
    Never,
}

/// The audit file sink.
#[derive(Clone, Debug)]
pub struct FileSink {
    /// The file, opened with `O_APPEND` (created with mode 0600). Several
    /// processes may share it: each writes its own chain.
    pub path: PathBuf,
    /// Rotate when a write would take the file past this size.
    pub rotate_bytes: Option<u64>,
    /// Rotated files kept: `path.1` (newest) ... `path.keep`. With 0, the
    /// full file is removed instead.
    pub keep: u32,
    /// When the file is synced.
    pub fsync: Fsync,
}

impl FileSink {
    /// `path`, no rotation (keep 5 when rotation is turned on), fsync once
    /// a second.
    pub fn new(path: PathBuf) -> FileSink {
        FileSink {
            path,
            rotate_bytes: None,
            keep: 5,
            fsync: Fsync::IntervalMs(1000),
        }
    }
}

/// Syslog facilities a record may be logged under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Facility {
    Auth,
    AuthPriv,
    Daemon,
    Local0,
    Local1,
    Local2,
    Local3,
    Local4,
    Local5,
    Local6,
    Local7,
    User,
}

impl Facility {
    /// The facility's number (RFC 5424, section 6.2.1).
    pub fn code(self) -> u8 {
        match self {
            Facility::User => 1,
            Facility::Daemon => 3,
            Facility::Auth => 4,
            Facility::AuthPriv => 10,
            Facility::Local0 => 16,
            Facility::Local1 => 17,
            Facility::Local2 => 18,
            Facility::Local3 => 19,
            Facility::Local4 => 20,
            Facility::Local5 => 21,
            Facility::Local6 => 22,
            Facility::Local7 => 23,
        }
    }
}

/// The syslog sink: one datagram per record to the local syslog socket,
/// which journald (or rsyslog) reads.
#[derive(Clone, Debug)]
pub struct SyslogSink {
    /// The tag of every message (`ident[pid]: `).
    pub ident: String,
    pub facility: Facility,
    /// The datagram socket, `/dev/log` by default.
    pub socket: PathBuf,
}

impl Default for SyslogSink {
    fn default() -> Self {
        SyslogSink {
            ident: "p11shim".into(),
            facility: Facility::AuthPriv,
            socket: PathBuf::from("/dev/log"),
        }
    }
}

/// How an [`Auditor`] writes.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: Option<FileSink>,
    pub syslog: Option<SyslogSink>,
    /// Records the queue holds (rounded to at least 16).
    pub queue: usize,
    pub on_failure: OnFailure,
    /// A checkpoint after this many records...
    pub checkpoint_records: u64,
    /// ...or this long after the last one, when records were written since.
    pub checkpoint_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            file: None,
            syslog: None,
            queue: 65_536,
            on_failure: OnFailure::FailClosed,
            checkpoint_records: 1000,
            checkpoint_interval_ms: 10_000,
        }
    }
}

/// What can go wrong starting an auditor or verifying a log. Key material
/// never appears in a message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("audit file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit key: {0}")]
    Key(String),
    #[error("audit configuration: {0}")]
    Config(String),
    #[error("cannot start the audit writer thread: {0}")]
    Thread(#[source] std::io::Error),
}
