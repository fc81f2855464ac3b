//! The wire protocol between the p11shim module (the asserting party) and
//! `p11shim-broker` (the relying party).
//!
//! One exchange: `POST /v1/credentials` with a JSON [`Request`] carrying the
//! evidence for one verification [`Method`]; the answer is a [`Response`]
//! (200) or a [`Problem`] (`application/problem+json`). When the request
//! names a [`ResponseKey`], the credentials travel sealed with HPKE
//! (RFC 9180, X25519 / HKDF-SHA256 / ChaCha20-Poly1305) to that ephemeral
//! key, so TLS terminators and access logs never see a PIN.

pub mod approval;
pub mod fingerprint;
pub mod names;
pub mod policy;
pub mod seal;
mod wire;

pub use wire::*;

/// The path of the one credential exchange.
pub const CREDENTIALS_PATH: &str = "/v1/credentials";
/// Protocol version carried in every request and response.
pub const VERSION: u32 = 1;
/// Largest request body the broker reads.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// base64 with the standard alphabet and padding (AWS documents, PEM bodies).
pub fn b64_std() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::STANDARD
}

/// base64url without padding (keys, nonces, ciphertexts).
pub fn b64_url() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::URL_SAFE_NO_PAD
}
