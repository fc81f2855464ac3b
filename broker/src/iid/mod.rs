//! The `rsa2048` signed instance identity document: a PKCS#7 SignedData
//! (SHA-256, RSA-2048) verified against pinned per-region AWS certificates.
//!
//! [`certs`] holds the pins (AWS's table, or a test directory in builds
//! with `test-overrides`); [`verify`] checks a document against them.

use std::net::IpAddr;
use std::time::SystemTime;

pub mod certs;
pub mod verify;

pub use certs::{AWS_RSA2048_REGIONS, CertPins, PinnedCert};
pub use verify::{MAX_PKCS7_BASE64, verify_rsa2048};

/// The identity taken from the verified content only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityDocument {
    pub account_id: String,
    pub region: String,
    pub availability_zone: String,
    pub instance_id: String,
    pub instance_type: String,
    pub image_id: String,
    pub pending_time: SystemTime,
    pub private_ip: Option<IpAddr>,
    /// The exact signed bytes.
    pub raw: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IidError {
    /// The document or its signature is refused; the reason is short and
    /// safe to log (it names at most the region and the instance id).
    #[error("identity document: {0}")]
    Invalid(String),
    /// The pinned certificates could not be loaded.
    #[error("identity document certificates: {0}")]
    Pins(String),
}
