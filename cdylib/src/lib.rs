//! p11shim: a PKCS#11 module that applications load in place of their HSM
//! vendor's library.
//!
//! Data flows one way, and the module tree follows it:
//!
//! ```text
//! application ──C ABI──▶ abi ──▶ dispatch ──▶ policy ──▶ router ──▶ backend ──▶ vendor library
//!                  (checks, guard)  (handles,   (allow/    (HA:       (typed calls,
//!                                    slots)      deny)      members)   function list)
//! ```
//!
//! Side services that never call back up: [`credentials`] (the broker)
//! and the audit log.
//!
//! * [`abi`]: the exported `C_*` functions, the function lists and
//!   interfaces, and every access to the application's memory.
//! * [`dispatch`]: the module's state: virtual slots, p11shim's own session
//!   and object handles, and one method per PKCS#11 function.
//! * [`policy`]: the role's key ACL and its pure decisions.
//! * [`router`]: member choice, failover, replay and recovery.
//! * [`credentials`]: the PIN and policy from the broker, by attestation.
//! * [`backend`]: a loaded vendor library and safe calls into it.
//! * [`config`]: the TOML configuration, validated before anything loads.
//! * [`logging`]: diagnostics (never secrets).
//! * [`metrics`]: counters and histograms for Prometheus, in a file.
//!
//! `unsafe` code lives in `abi` and `backend` only.

pub mod abi;
pub mod backend;
pub mod config;
pub mod credentials;
#[deny(unsafe_code)]
pub mod dispatch;
pub mod error;
#[deny(unsafe_code)]
pub mod logging;
pub mod metrics;
#[deny(unsafe_code)]
pub mod policy;
#[deny(unsafe_code)]
pub mod router;

pub use error::{Error, Result};
