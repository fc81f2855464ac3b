//! What `p11shim approve` is built on: the broker's approval endpoints
//! ([`client`]), the check that what an approver signs is what they were
//! shown ([`check`]), signing with an approver's key ([`sign`]) named by a
//! file or a PKCS#11 URI ([`uri`]).

pub mod check;
pub mod client;
pub mod sign;
pub mod uri;

use p11shim_proto::ErrorKind;

/// Why an approval command failed. Messages name requests, files, tokens
/// and attributes; never a PIN, a passphrase or key material.
#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    /// A bad option value found after parsing (a URL, a missing module).
    #[error("{0}")]
    Usage(String),
    /// The broker could not be reached or answered nonsense.
    #[error("broker {0}")]
    Broker(String),
    /// The broker refused (problem+json).
    #[error("{}", client::refusal(*kind, id, request_id))]
    Refused {
        kind: ErrorKind,
        id: String,
        request_id: String,
    },
    /// The document does not sign what it shows.
    #[error("refusing {id}: {what}; the broker shows one request and asks to sign another")]
    Mismatch { id: String, what: String },
    /// The request cannot be decided by this approver now.
    #[error("{0}")]
    NotDecidable(String),
    /// A PEM key file.
    #[error("key {0}")]
    Key(String),
    /// A PKCS#11 token.
    #[error("{0}")]
    Token(String),
    /// Reading or writing a file.
    #[error("{0}")]
    File(String),
    /// The approver answered no.
    #[error("not signed: {0}")]
    Declined(String),
}

/// Seconds from now until an RFC 3339 time (negative: past).
pub fn seconds_until(rfc3339: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(rfc3339).ok()?;
    let now = std::time::SystemTime::now();
    Some(match t.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    })
}

/// `1h 04m`, `12m 30s`, `45s`, `expired`.
pub fn human_duration(secs: i64) -> String {
    if secs <= 0 {
        return "expired".into();
    }
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h:02}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(human_duration(0), "expired");
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(750), "12m 30s");
        assert_eq!(human_duration(3840), "1h 04m");
        assert_eq!(human_duration(90000), "1d 01h");
        assert!(seconds_until("2000-01-01T00:00:00Z").unwrap() < 0);
        assert!(seconds_until("2999-01-01T00:00:00Z").unwrap() > 0);
        assert_eq!(seconds_until("tomorrow"), None);
    }
}
