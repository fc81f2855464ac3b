//! Verification methods. Each turns a request's evidence into a
//! [`Verified`] identity or a [`Denial`] whose reason goes to the log only.

pub mod aws;
pub mod fingerprint;
pub mod k8s;

use std::net::IpAddr;
use std::time::Duration;

use p11shim_proto::ErrorKind;
use sha2::{Digest, Sha256};

/// A verified identity, ready for the one-time-use gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Who was verified, e.g. `aws:123456789012:us-east-1:i-0abc…`.
    pub subject: String,
    /// The one-time-use key of this identity (see [`replay_key`]).
    pub replay_key: [u8; 32],
    /// `Err(reason)` when a first use is no longer allowed (the instance
    /// is older than the role's window); re-authentication still is.
    pub first_use: Result<(), &'static str>,
}

/// Why a request is refused: the coarse kind the client sees, and the
/// exact reason for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub kind: ErrorKind,
    pub reason: String,
    /// When the client may try again (`rate_limited`).
    pub retry_after: Option<Duration>,
}

impl Denial {
    pub fn denied(reason: impl Into<String>) -> Denial {
        Denial {
            kind: ErrorKind::Denied,
            reason: reason.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(reason: impl Into<String>) -> Denial {
        Denial {
            kind: ErrorKind::BadRequest,
            reason: reason.into(),
            retry_after: None,
        }
    }
    /// Over a rate limit; the client may retry after `wait`.
    pub fn rate_limited(reason: impl Into<String>, wait: Duration) -> Denial {
        Denial {
            kind: ErrorKind::RateLimited,
            reason: reason.into(),
            retry_after: Some(wait),
        }
    }
    pub fn unavailable(reason: impl Into<String>) -> Denial {
        Denial {
            kind: ErrorKind::Unavailable,
            reason: reason.into(),
            retry_after: None,
        }
    }
}

/// What every method is given besides its evidence.
#[derive(Debug)]
pub struct Context<'a> {
    pub role_name: &'a str,
    pub role: &'a crate::config::Role,
    pub client_ip: IpAddr,
    pub now: std::time::SystemTime,
    /// The per-identity limiter, for methods that learn the identity only
    /// by verifying it (`aws-iid`).
    pub limits: &'a crate::ratelimit::Limiters,
    /// `[aws].region`: the AWS methods' region when the role names none.
    pub aws_region: Option<&'a str>,
}

/// SHA-256 over length-prefixed fields, so no two field tuples share a key.
pub fn replay_key(fields: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in fields {
        h.update((f.len() as u64).to_be_bytes());
        h.update(f);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keys_are_unambiguous() {
        assert_ne!(replay_key(&[b"ab", b"c"]), replay_key(&[b"a", b"bc"]));
        assert_eq!(replay_key(&[b"x"]), replay_key(&[b"x"]));
    }
}
