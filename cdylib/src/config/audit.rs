//! `[audit]`: the tamper-evident audit log (docs/audit.md).
//!
//! ```toml
//! [audit]
//! file = "/var/log/p11shim/audit.jsonl"
//! fsync = "interval"              # "always", "interval" (fsync_interval_ms), "never"
//! syslog = true                   # also to /dev/log (journald)
//! on_failure = "fail-closed"      # or "fail-open"
//! signing_key = "file:/etc/p11shim/audit-ed25519.pem"   # or "broker"
//! ```

use std::path::PathBuf;

use p11shim_audit::{Facility, FileSink, Fsync, OnFailure, SyslogSink};
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Ctx};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    file: Option<Spanned<String>>,
    rotate_bytes: Option<Spanned<u64>>,
    keep: Option<Spanned<u32>>,
    fsync: Option<Spanned<String>>,
    fsync_interval_ms: Option<Spanned<u64>>,
    #[serde(default)]
    syslog: bool,
    syslog_facility: Option<Spanned<String>>,
    syslog_ident: Option<Spanned<String>>,
    syslog_socket: Option<Spanned<String>>,
    on_failure: Option<Spanned<String>>,
    queue: Option<Spanned<u64>>,
    checkpoint_records: Option<Spanned<u64>>,
    checkpoint_interval_ms: Option<Spanned<u64>>,
    signing_key: Option<Spanned<String>>,
    #[serde(default)]
    data_hash: bool,
}

/// Who signs the checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditKey {
    /// An Ed25519 private key, PKCS#8 PEM (`openssl genpkey -algorithm
    /// ed25519`), in a file only its owner can read.
    Ed25519File(PathBuf),
    /// The HMAC key that comes with the broker's credentials.
    Broker,
}

/// The validated `[audit]` section.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub writer: p11shim_audit::Config,
    pub signing_key: Option<AuditKey>,
    /// Records carry the SHA-256 of the data of single-part calls.
    pub data_hash: bool,
}

pub(super) fn validate(
    ctx: &Ctx<'_>,
    raw: &Spanned<RawAudit>,
    has_broker: bool,
) -> Result<AuditConfig, ConfigError> {
    let span = raw.span();
    let raw = raw.get_ref();
    let abs = |v: &Spanned<String>, key: &str| -> Result<PathBuf, ConfigError> {
        let p = PathBuf::from(v.get_ref());
        if p.is_absolute() {
            Ok(p)
        } else {
            Err(ctx.err(Some(&v.span()), key, "must be an absolute path"))
        }
    };
    let fsync = match raw.fsync.as_ref().map(|f| (f, f.get_ref().as_str())) {
        None | Some((_, "interval")) => {
            let ms = raw.fsync_interval_ms.as_ref();
            match ms.map(|m| *m.get_ref()).unwrap_or(1000) {
                0 => {
                    return Err(ctx.err(
                        ms.map(|m| m.span()).as_ref(),
                        "audit.fsync_interval_ms",
                        "at least 1 (use fsync = \"always\" to sync every batch)",
                    ));
                }
                n => Fsync::IntervalMs(n),
            }
        }
        Some((_, "always")) => Fsync::Always,
        Some((_, "never")) => Fsync::Never,
        Some((f, other)) => {
            return Err(ctx.err(
                Some(&f.span()),
                "audit.fsync",
                format!(
                    "unknown policy {other:?} (expected \"always\", \"interval\" or \"never\")"
                ),
            ));
        }
    };
    let file = match &raw.file {
        Some(f) => Some(FileSink {
            path: abs(f, "audit.file")?,
            rotate_bytes: match &raw.rotate_bytes {
                Some(r) if *r.get_ref() < 4096 => {
                    return Err(ctx.err(Some(&r.span()), "audit.rotate_bytes", "at least 4096"));
                }
                r => r.as_ref().map(|r| *r.get_ref()),
            },
            keep: raw.keep.as_ref().map_or(5, |k| *k.get_ref()),
            fsync,
        }),
        None => {
            for (v, key) in [
                (
                    raw.rotate_bytes.as_ref().map(|v| v.span()),
                    "audit.rotate_bytes",
                ),
                (raw.keep.as_ref().map(|v| v.span()), "audit.keep"),
                (raw.fsync.as_ref().map(|v| v.span()), "audit.fsync"),
            ] {
                if let Some(s) = v {
                    return Err(ctx.err(Some(&s), key, "applies to audit.file, which is not set"));
                }
            }
            None
        }
    };
    let syslog = if raw.syslog {
        let mut s = SyslogSink::default();
        if let Some(f) = &raw.syslog_facility {
            s.facility = facility(f.get_ref()).ok_or_else(|| {
                ctx.err(
                    Some(&f.span()),
                    "audit.syslog_facility",
                    "one of auth, authpriv, daemon, user, local0 ... local7",
                )
            })?;
        }
        if let Some(i) = &raw.syslog_ident {
            let ok = !i.get_ref().is_empty()
                && i.get_ref().len() <= 48
                && i.get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'[' && b != b':');
            if !ok {
                return Err(ctx.err(
                    Some(&i.span()),
                    "audit.syslog_ident",
                    "1 to 48 printable ASCII characters, no '[' or ':'",
                ));
            }
            s.ident = i.get_ref().clone();
        }
        if let Some(p) = &raw.syslog_socket {
            s.socket = abs(p, "audit.syslog_socket")?;
        }
        Some(s)
    } else {
        None
    };
    if file.is_none() && syslog.is_none() {
        return Err(ctx.err(
            Some(&span),
            "audit",
            "no sink: set file, or syslog = true (records never go to stdout)",
        ));
    }
    let on_failure = match raw.on_failure.as_ref().map(|f| (f, f.get_ref().as_str())) {
        None | Some((_, "fail-closed")) => OnFailure::FailClosed,
        Some((_, "fail-open")) => OnFailure::FailOpen,
        Some((f, other)) => {
            return Err(ctx.err(
                Some(&f.span()),
                "audit.on_failure",
                format!("unknown policy {other:?} (expected \"fail-closed\" or \"fail-open\")"),
            ));
        }
    };
    let bounded = |v: &Option<Spanned<u64>>, key: &str, min: u64, max: u64, default: u64| match v {
        None => Ok(default),
        Some(n) if (min..=max).contains(n.get_ref()) => Ok(*n.get_ref()),
        Some(n) => Err(ctx.err(Some(&n.span()), key, format!("between {min} and {max}"))),
    };
    // 8192 records (about 1.7 MiB, allocated at start) absorb 80 ms of
    // writer stall at 100,000 records/s.
    let queue = bounded(&raw.queue, "audit.queue", 16, 1 << 20, 8192)?;
    let checkpoint_records = bounded(
        &raw.checkpoint_records,
        "audit.checkpoint_records",
        1,
        1 << 32,
        1000,
    )?;
    let checkpoint_interval_ms = bounded(
        &raw.checkpoint_interval_ms,
        "audit.checkpoint_interval_ms",
        100,
        86_400_000,
        10_000,
    )?;
    let signing_key = match &raw.signing_key {
        None => None,
        Some(k) if k.get_ref() == "broker" => {
            if !has_broker {
                return Err(ctx.err(
                    Some(&k.span()),
                    "audit.signing_key",
                    "\"broker\" needs a [broker] section",
                ));
            }
            Some(AuditKey::Broker)
        }
        Some(k) => match k.get_ref().strip_prefix("file:") {
            Some(p) if PathBuf::from(p).is_absolute() => Some(AuditKey::Ed25519File(p.into())),
            _ => {
                return Err(ctx.err(
                    Some(&k.span()),
                    "audit.signing_key",
                    "expected \"file:/absolute/path.pem\" (an Ed25519 PKCS#8 key) or \"broker\"",
                ));
            }
        },
    };
    Ok(AuditConfig {
        writer: p11shim_audit::Config {
            file,
            syslog,
            queue: queue as usize,
            on_failure,
            checkpoint_records,
            checkpoint_interval_ms,
        },
        signing_key,
        data_hash: raw.data_hash,
    })
}

fn facility(s: &str) -> Option<Facility> {
    Some(match s.to_ascii_lowercase().as_str() {
        "auth" => Facility::Auth,
        "authpriv" => Facility::AuthPriv,
        "daemon" => Facility::Daemon,
        "user" => Facility::User,
        "local0" => Facility::Local0,
        "local1" => Facility::Local1,
        "local2" => Facility::Local2,
        "local3" => Facility::Local3,
        "local4" => Facility::Local4,
        "local5" => Facility::Local5,
        "local6" => Facility::Local6,
        "local7" => Facility::Local7,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;
    use std::path::Path;

    const SLOT: &str = "[[slot]]\nid = 0\nlabel = \"s\"\n[[slot.member]]\nlibrary = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken = \"a\"\n";

    fn audit(extra: &str) -> Result<AuditConfig, String> {
        parse(
            Path::new("p11shim.toml"),
            &format!("{SLOT}[audit]\n{extra}"),
        )
        .map(|c| c.audit.expect("[audit]"))
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_values() {
        let a = audit("file = \"/var/log/a.jsonl\"\n").unwrap();
        let f = a.writer.file.as_ref().unwrap();
        assert_eq!(f.fsync, Fsync::IntervalMs(1000));
        assert_eq!(a.writer.on_failure, OnFailure::FailClosed);
        assert_eq!(a.writer.queue, 8192);
        assert!(a.writer.syslog.is_none() && a.signing_key.is_none() && !a.data_hash);
        let a = audit(
            "file = \"/a\"\nfsync = \"always\"\nrotate_bytes = 1048576\nkeep = 3\nsyslog = true\nsyslog_facility = \"local3\"\non_failure = \"fail-open\"\nsigning_key = \"file:/etc/k.pem\"\ndata_hash = true\n",
        )
        .unwrap();
        let f = a.writer.file.as_ref().unwrap();
        assert_eq!(
            (f.fsync, f.rotate_bytes, f.keep),
            (Fsync::Always, Some(1 << 20), 3)
        );
        assert_eq!(a.writer.syslog.as_ref().unwrap().facility, Facility::Local3);
        assert_eq!(a.writer.on_failure, OnFailure::FailOpen);
        assert_eq!(
            a.signing_key,
            Some(AuditKey::Ed25519File("/etc/k.pem".into()))
        );
        assert!(a.data_hash);
    }

    #[test]
    fn errors_name_the_key() {
        let e = audit("").unwrap_err();
        assert!(e.contains("key `audit`: no sink"), "{e}");
        let e = audit("file = \"rel.jsonl\"\n").unwrap_err();
        assert!(
            e.contains("key `audit.file`: must be an absolute path"),
            "{e}"
        );
        let e = audit("file = \"/a\"\nfsync = \"sometimes\"\n").unwrap_err();
        assert!(e.contains("key `audit.fsync`"), "{e}");
        let e = audit("syslog = true\nfsync = \"always\"\n").unwrap_err();
        assert!(e.contains("applies to audit.file"), "{e}");
        let e = audit("file = \"/a\"\non_failure = \"ignore\"\n").unwrap_err();
        assert!(e.contains("key `audit.on_failure`"), "{e}");
        let e = audit("file = \"/a\"\nsigning_key = \"broker\"\n").unwrap_err();
        assert!(e.contains("needs a [broker] section"), "{e}");
        let e = audit("file = \"/a\"\nsigning_key = \"/etc/k.pem\"\n").unwrap_err();
        assert!(e.contains("key `audit.signing_key`"), "{e}");
        let e = audit("file = \"/a\"\nqueue = 1\n").unwrap_err();
        assert!(e.contains("key `audit.queue`: between 16"), "{e}");
        let e = audit("syslog = true\nsyslog_facility = \"kern\"\n").unwrap_err();
        assert!(e.contains("audit.syslog_facility"), "{e}");
    }
}
