//! Quorum (m-of-n) approval of key use: the requests the module files at
//! the broker, the approvals approvers sign, and the one-time consumption.
//!
//! ```text
//! module (application's C_Sign)        broker                      approvers
//!   POST /v1/approvals  ─────────────▶ request (pending), id ◀──── GET /v1/approvals?status=pending
//!                                      approval_data, digest        sign approval_data (RSA / Ed25519)
//!                                                         ◀──────── POST /v1/approvals/{id}/approve
//!   GET /v1/approvals/{id} (poll) ───▶ approved when m distinct
//!   POST /v1/approvals/{id}/consume ─▶ consumed, exactly once
//!   the vendor's C_Sign runs
//! ```
//!
//! What approvers sign is [`approval_data`]: a fixed, line-oriented text
//! naming the request, the requester, the key, the operation, the mechanism
//! and the SHA-256 of the data (so an approval covers exactly one
//! signature). Its SHA-256 is the `digest` shown to humans. The module's
//! calls carry `Authorization: Bearer <approval token>`, the token that
//! came sealed with its credentials.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Collection of approval requests.
pub const APPROVALS_PATH: &str = "/v1/approvals";
/// First line of [`approval_data`]; names the format.
pub const APPROVAL_DATA_V1: &str = "p11shim-approval-v1";
/// First line of what an approver signs to reject a request, followed by
/// the request's `approval_data`.
pub const REJECTION_PREFIX: &str = "p11shim-rejection-v1\n";

/// The key an operation uses, as the module knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `CKA_ID`, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `CKA_CLASS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<u64>,
    /// `CKA_KEY_TYPE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<u64>,
    /// `CKA_UNIQUE_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_id: Option<String>,
    /// The module's key fingerprint (hex SHA-256; see docs/audit.md).
    pub fingerprint: String,
}

/// `POST /v1/approvals`: the module asks for approval of one operation.
/// Idempotent: an open request (pending or approved, not consumed, not
/// expired) of the same requester for the same key, operation, mechanism
/// and data is returned instead of a new one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApproval {
    pub v: u32,
    pub key: ApprovalKey,
    /// A policy operation name (`sign`, `decrypt`, `unwrap`, ...).
    pub op: String,
    /// `CKM_*` value; `None` for operations without one (`destroy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<u64>,
    /// SHA-256 (hex) of the operation's whole input, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_sha256: Option<String>,
}

/// `POST /v1/approvals/{id}/consume`: the module uses an approved request,
/// restating what it is about to do; the broker consumes it only if that
/// matches, it is approved and unexpired, and it was never consumed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consume {
    pub v: u32,
    pub key_fingerprint: String,
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_sha256: Option<String>,
}

/// `POST /v1/approvals/{id}/approve` and `.../reject`: one approver's
/// decision. `signature` (base64) is over `approval_data` to approve, over
/// [`REJECTION_PREFIX`] + `approval_data` to reject: RSA PKCS#1 v1.5 or
/// PSS with SHA-256 for RSA keys (`openssl dgst -sha256 -sign`,
/// `pkcs11-tool -m SHA256-RSA-PKCS`), pure Ed25519 for Ed25519 keys
/// (`openssl pkeyutl -sign -rawin`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    pub v: u32,
    pub approver: String,
    pub signature: String,
}

/// State of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Rejected,
    Expired,
    Consumed,
}

impl ApprovalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Rejected => "rejected",
            ApprovalStatus::Expired => "expired",
            ApprovalStatus::Consumed => "consumed",
        }
    }
}

/// One approver's approval or rejection, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signoff {
    pub approver: String,
    /// RFC 3339.
    pub at: String,
}

/// A request, as every endpoint returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub v: u32,
    pub id: String,
    pub role: String,
    pub subject: String,
    pub key: ApprovalKey,
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_sha256: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; the request can be approved and consumed until then.
    pub expires_at: String,
    /// Approvals needed.
    pub m: u32,
    /// Who may approve.
    pub approvers: Vec<String>,
    pub approvals: Vec<Signoff>,
    pub rejections: Vec<Signoff>,
    pub status: ApprovalStatus,
    /// RFC 3339, once consumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_at: Option<String>,
    /// base64 of [`approval_data`]: the exact bytes approvers sign.
    pub approval_data: String,
    /// Hex SHA-256 of `approval_data`.
    pub digest: String,
}

/// `GET /v1/approvals[?status=...]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalList {
    pub v: u32,
    pub approvals: Vec<Approval>,
}

/// The fields [`approval_data`] covers.
#[derive(Clone, Debug)]
pub struct ApprovalFields<'a> {
    pub id: &'a str,
    pub role: &'a str,
    pub subject: &'a str,
    pub key: &'a ApprovalKey,
    pub op: &'a str,
    pub mechanism: Option<u64>,
    pub data_sha256: Option<&'a str>,
    pub created_at: &'a str,
    pub expires_at: &'a str,
    pub m: u32,
    pub approvers: &'a [String],
}

/// The canonical bytes approvers sign: one `name: value` line per field in
/// a fixed order, `-` for an absent value, LF line ends, no trailing
/// space. Values are restricted (see [`valid_text`]) so that no value can
/// contain a line break or forge another field.
pub fn approval_data(f: &ApprovalFields<'_>) -> Vec<u8> {
    let opt = |v: Option<&str>| v.unwrap_or("-").to_string();
    let mech = match f.mechanism {
        Some(m) => match crate::names::mechanism_name(m) {
            Some(n) => format!("{n} ({m:#x})"),
            None => format!("{m:#x}"),
        },
        None => "-".into(),
    };
    let lines = [
        APPROVAL_DATA_V1.to_string(),
        format!("id: {}", f.id),
        format!("role: {}", f.role),
        format!("requester: {}", f.subject),
        format!("key-fingerprint: {}", f.key.fingerprint),
        format!("key-label: {}", opt(f.key.label.as_deref())),
        format!("key-id: {}", opt(f.key.id.as_deref())),
        format!("operation: {}", f.op),
        format!("mechanism: {mech}"),
        format!("data-sha256: {}", opt(f.data_sha256)),
        format!("approvals-needed: {} of {}", f.m, f.approvers.join(", ")),
        format!("created-at: {}", f.created_at),
        format!("expires-at: {}", f.expires_at),
    ];
    let mut out = lines.join("\n").into_bytes();
    out.push(b'\n');
    out
}

/// Hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether a value may appear in `approval_data`: 1 to 256 printable
/// characters, no line break (labels, subjects, names).
pub fn valid_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control)
}

/// Whether a string is lowercase hex of `len` bytes (`None`: any even length
/// up to 128 bytes).
pub fn valid_hex(s: &str, len: Option<usize>) -> bool {
    let ok_len = match len {
        Some(n) => s.len() == 2 * n,
        None => s.len() % 2 == 0 && s.len() <= 256,
    };
    ok_len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approval_data_is_fixed_text() {
        let key = ApprovalKey {
            label: Some("ca-root".into()),
            id: Some("a1".into()),
            fingerprint: "ab".repeat(32),
            ..ApprovalKey::default()
        };
        let approvers = ["alice".to_string(), "bob".into(), "carol".into()];
        let f = ApprovalFields {
            id: "apr_0123",
            role: "ca",
            subject: "fingerprint:00ff",
            key: &key,
            op: "sign",
            mechanism: Some(0x40),
            data_sha256: Some(&"cd".repeat(32)),
            created_at: "2026-11-25T01:00:00Z",
            expires_at: "2026-11-25T02:00:00Z",
            m: 2,
            approvers: &approvers,
        };
        let text = String::from_utf8(approval_data(&f)).unwrap();
        assert_eq!(
            text,
            format!(
                "p11shim-approval-v1\nid: apr_0123\nrole: ca\nrequester: fingerprint:00ff\nkey-fingerprint: {}\nkey-label: ca-root\nkey-id: a1\noperation: sign\nmechanism: CKM_SHA256_RSA_PKCS (0x40)\ndata-sha256: {}\napprovals-needed: 2 of alice, bob, carol\ncreated-at: 2026-11-25T01:00:00Z\nexpires-at: 2026-11-25T02:00:00Z\n",
                "ab".repeat(32),
                "cd".repeat(32)
            )
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn text_and_hex_checks() {
        assert!(valid_text("ca-root key"));
        assert!(!valid_text("a\nkey-label: x"));
        assert!(!valid_text(""));
        assert!(valid_hex(&"0a".repeat(32), Some(32)));
        assert!(!valid_hex(&"0A".repeat(32), Some(32)));
        assert!(!valid_hex("abc", None));
    }

    #[test]
    fn status_names() {
        let s: ApprovalStatus = serde_json::from_str("\"consumed\"").unwrap();
        assert_eq!(s, ApprovalStatus::Consumed);
        assert_eq!(
            serde_json::to_string(&ApprovalStatus::Pending).unwrap(),
            "\"pending\""
        );
    }
}
