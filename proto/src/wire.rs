//! Request, response and problem documents.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// A verification method: how the asserting party proves who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Instance metadata fields plus the request's source IP, checked live
    /// against EC2 `DescribeInstances` and IAM.
    AwsImdsFields,
    /// The `rsa2048` PKCS#7 signed instance identity document, then the same
    /// live checks.
    AwsIid,
    /// A projected Kubernetes service-account token with the broker's audience.
    K8sSaToken,
    /// A fingerprint of chosen machine attributes on a static allow list.
    StaticFingerprint,
}

impl Method {
    pub const ALL: [Method; 4] = [
        Method::AwsImdsFields,
        Method::AwsIid,
        Method::K8sSaToken,
        Method::StaticFingerprint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::AwsImdsFields => "aws-imds-fields",
            Method::AwsIid => "aws-iid",
            Method::K8sSaToken => "k8s-sa-token",
            Method::StaticFingerprint => "static-fingerprint",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Re-authentication policy of a role after the first use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reauth {
    /// A later request is served only when it presents the nonce bound at
    /// first use.
    #[default]
    Nonce,
    /// Every identity is served exactly once.
    Never,
}

/// `POST /v1/credentials` body.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u32,
    /// Echoed back and logged by the broker; a UUID-shaped string.
    pub request_id: String,
    pub role: String,
    pub method: Option<Method>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsEvidence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8sEvidence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<FingerprintEvidence>,
    /// base64url of at least 16 random bytes; binds re-authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_nonce: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_key: Option<ResponseKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientInfo>,
}

/// What the instance metadata service says about the instance.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AwsEvidence {
    /// `dynamic/instance-identity/rsa2048` as served (base64, newlines allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iid_rsa2048: Option<String>,
    /// base64 of the exact bytes of `dynamic/instance-identity/document`;
    /// when present it must equal the signed content byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iid_document: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_hostname: Option<String>,
    /// Empty when the instance has no public address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_hostname: Option<String>,
    /// `InstanceProfileArn` from `meta-data/iam/info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_profile_arn: Option<String>,
}

/// A projected service-account token.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sEvidence {
    /// The cluster name from the broker's configuration; optional when the
    /// role accepts one cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    pub token: Secret,
}

/// Machine attributes whose fingerprint the role lists.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FingerprintEvidence {
    /// Attribute name → value, e.g. `machine-id`, `hostname`, `addresses`.
    pub attributes: BTreeMap<String, String>,
}

/// The module's ephemeral HPKE public key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResponseKey {
    pub alg: String,
    /// base64url of the 32-byte X25519 public key.
    pub pk: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientInfo {
    #[serde(default)]
    pub version: String,
}

/// A secret string: zeroized on drop, redacted in `Debug`.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub Zeroizing<String>);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(Zeroizing::new(s.into()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

/// A successful answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub request_id: String,
    pub role: String,
    /// Who was verified, e.g. `aws:123456789012:us-east-1:i-0abc…`.
    pub subject: String,
    /// RFC 3339.
    pub issued_at: String,
    /// RFC 3339.
    pub expires_at: String,
    /// The module re-authenticates before this many seconds have passed.
    pub ttl_seconds: u64,
    pub reauth: Reauth,
    /// The role's key ACL policy, enforced by the module.
    #[serde(default)]
    pub policy: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_credentials: Option<crate::seal::Sealed>,
}

/// What the role is given.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// The PIN of the role's partition or crypto user.
    pub pin: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// The key the module signs its audit checkpoints with (HMAC-SHA256),
    /// when the role has one: the operator verifies the log with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_key: Option<Secret>,
    /// The bearer token of the module's approval requests
    /// (`crate::approval`), when the role's policy has quorum rules; valid
    /// until the grant expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_token: Option<Secret>,
}

/// A client certificate and key for HSMs that use mutual TLS.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    pub cert_pem: String,
    pub key_pem: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

/// The coarse error a client is told; the exact failed check stays in the
/// broker's log under the request id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Denied,
    AlreadyUsed,
    RateLimited,
    BadRequest,
    Unavailable,
    /// No such approval request.
    NotFound,
    /// The approval request is not in a state that allows this (pending
    /// when consumed, decided when approved again, already consumed).
    Conflict,
    /// The approval request expired.
    Expired,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::Denied => 403,
            ErrorKind::AlreadyUsed => 409,
            ErrorKind::RateLimited => 429,
            ErrorKind::BadRequest => 400,
            ErrorKind::Unavailable => 503,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Expired => 410,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Denied => "denied",
            ErrorKind::AlreadyUsed => "already_used",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Expired => "expired",
        }
    }

    /// Whether the same request may succeed if sent again later.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorKind::RateLimited | ErrorKind::Unavailable)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `application/problem+json` (RFC 9457) body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind_uri: String,
    pub title: ErrorKind,
    pub status: u16,
    #[serde(default)]
    pub request_id: String,
    /// Seconds, for `rate_limited` and `unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(kind: ErrorKind, request_id: &str) -> Problem {
        Problem {
            kind_uri: format!("urn:p11shim:broker:{}", kind.as_str()),
            title: kind,
            status: kind.status(),
            request_id: request_id.to_owned(),
            retry_after: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_round_trip() {
        for m in Method::ALL {
            assert_eq!(Method::parse(m.as_str()), Some(m));
            let j = serde_json::to_string(&m).unwrap();
            assert_eq!(j, format!("\"{}\"", m.as_str()));
        }
        assert_eq!(Method::parse("aws"), None);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = Credentials {
            pin: Secret::new("123456"),
            mtls: None,
            audit_key: Some(Secret::new("k3y-material")),
            approval_token: None,
        };
        let d = format!("{c:?}");
        assert!(!d.contains("123456") && !d.contains("k3y"), "{d}");
    }

    #[test]
    fn unknown_request_fields_are_refused() {
        let e = serde_json::from_str::<Request>(
            r#"{"v":1,"request_id":"x","role":"r","method":"aws-iid","pin":"1"}"#,
        );
        assert!(e.is_err());
    }

    #[test]
    fn problem_shape() {
        let p = Problem::new(ErrorKind::AlreadyUsed, "abc");
        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(j["title"], "already_used");
        assert_eq!(j["status"], 409);
        assert_eq!(j["type"], "urn:p11shim:broker:already_used");
    }
}
