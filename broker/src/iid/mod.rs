//! The `rsa2048` signed instance identity document: a PKCS#7 SignedData
//! (SHA-256, RSA-2048) verified against pinned per-region AWS certificates.

use std::net::IpAddr;
use std::time::SystemTime;

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
    #[error("identity document: {0}")]
    Invalid(String),
}
