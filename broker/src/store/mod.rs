//! The one-time-use store: trust on first use per identity, with optional
//! nonce-bound re-authentication.
//!
//! `consume` is atomic and durable before it returns, so credentials leave
//! the broker only after the use that released them is recorded.

use std::fmt;

use p11shim_proto::Reauth;
use serde::Deserialize;

/// A use of one identity (a replay key) that the broker is about to serve.
#[derive(Clone, Debug)]
pub struct Claim<'a> {
    /// SHA-256 of the identity's length-prefixed fields.
    pub key: [u8; 32],
    pub role: &'a str,
    /// Who was verified (for the operator; never a secret).
    pub subject: &'a str,
    /// SHA-256 of the client's nonce, if it sent one.
    pub nonce_hash: Option<[u8; 32]>,
    pub reauth: Reauth,
    /// Unix seconds.
    pub now: i64,
    /// Unix seconds after which the entry no longer blocks a new first use.
    pub expires_at: i64,
    /// Whether this use may be a first use. False when the identity is past
    /// the role's first-use window: then only a nonce re-authentication of
    /// a live entry can succeed, and nothing is stored.
    pub first_use: bool,
}

/// What `consume` decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No live entry existed; one now does.
    FirstUse,
    /// A live entry existed, the role allows nonce re-authentication and the
    /// nonce matched (compared in constant time).
    Reauthenticated,
    /// A live entry existed and this use is not allowed.
    AlreadyUsed,
    /// No live entry existed and `first_use` was false; nothing was stored.
    NotAllowed,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("replay store unavailable: {0}")]
    Unavailable(String),
    #[error("replay store configuration: {0}")]
    Config(String),
}

/// A replay store backend.
pub trait ReplayStore: Send + Sync + fmt::Debug {
    /// Records `claim` atomically and durably, or reports why not.
    fn consume(&self, claim: &Claim<'_>) -> Result<Outcome, StoreError>;
    /// Deletes entries whose `expires_at` is before `before`; returns how many.
    fn tidy(&self, before: i64) -> Result<u64, StoreError>;
    /// Removes the entry for `key` (an operator allowing a fresh first use).
    fn forget(&self, key: &[u8; 32]) -> Result<bool, StoreError>;
    /// Cheap liveness check for `/healthz`.
    fn ping(&self) -> Result<(), StoreError>;
    /// `sqlite`, `postgres` or `redis`.
    fn kind(&self) -> &'static str;
}

/// `[store]` in the broker configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    Sqlite { path: std::path::PathBuf },
    Postgres { url: String },
    Redis { url: String },
}

/// Opens the configured backend.
pub fn open(cfg: &StoreConfig) -> Result<Box<dyn ReplayStore>, StoreError> {
    let _ = cfg;
    Err(StoreError::Config("no replay store backend is built".into()))
}
