//! The one error type of the module and its one mapping to `CK_RV`.
//!
//! Every fallible path in p11shim returns [`Error`]. [`Error::rv`] is an
//! exhaustive match, so a new variant cannot be added without deciding which
//! return code an application sees. Return codes that come from a vendor
//! library travel unchanged in [`Error::Vendor`], vendor-defined codes
//! included.

use pkcs11_sys::*;

/// Vendor-defined return codes of p11shim (see `include/p11shim.h`).
pub mod vendor_rv {
    use pkcs11_sys::{CK_RV, CKR_VENDOR_DEFINED};
    /// The module's configuration file is missing or invalid.
    pub const CONFIG_INVALID: CK_RV = CKR_VENDOR_DEFINED | 0x5053_0001;
    /// A configured vendor library could not be loaded or initialized.
    pub const BACKEND_UNAVAILABLE: CK_RV = CKR_VENDOR_DEFINED | 0x5053_0002;
    /// A configured PIN source (`env:` or `file:`) could not be read.
    pub const PIN_SOURCE_UNAVAILABLE: CK_RV = CKR_VENDOR_DEFINED | 0x5053_0003;
    /// A member failed during an operation that could not be carried over
    /// to another member (its input outgrew the replay limit, or its
    /// mechanism parameter could not be kept); start the operation again.
    pub const OPERATION_LOST: CK_RV = CKR_VENDOR_DEFINED | 0x5053_0004;
    /// A token key would exist on one member of a multi-member slot only
    /// (no replication key configured, `allow_unreplicated` not set).
    pub const NOT_REPLICATED: CK_RV = CKR_VENDOR_DEFINED | 0x5053_0005;
    /// `[audit] on_failure = "fail-closed"`: the audit log cannot take the
    /// record of this security-relevant call (its queue is full or its sink
    /// is failing), so the call is refused.
    pub const AUDIT_UNAVAILABLE: CK_RV = CKR_VENDOR_DEFINED | 0x5053_0006;
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A return code produced by a vendor library, passed through unchanged.
    #[error("vendor library returned {}", rv_name(*.0))]
    Vendor(CK_RV),
    #[error("the module is not initialized")]
    NotInitialized,
    #[error("the module is already initialized")]
    AlreadyInitialized,
    #[error("bad arguments: {0}")]
    ArgumentsBad(&'static str),
    #[error("unknown slot id")]
    SlotIdInvalid,
    #[error("no token present in the slot")]
    TokenNotPresent,
    #[error("unknown session handle")]
    SessionHandleInvalid,
    #[error("unknown object handle")]
    ObjectHandleInvalid,
    #[error("unknown key handle")]
    KeyHandleInvalid,
    #[error("output buffer too small")]
    BufferTooSmall,
    #[error("the vendor library does not offer this function")]
    FunctionNotSupported,
    #[error("parallel sessions are not supported")]
    ParallelNotSupported,
    #[error("the slot has as many sessions open as it can")]
    SessionCount,
    #[error("no event")]
    NoEvent,
    #[error("out of memory")]
    HostMemory,
    #[error("internal error: {0}")]
    General(&'static str),
    #[error("configuration: {0}")]
    Config(String),
    #[error("vendor library: {0}")]
    Backend(String),
    #[error("PIN source: {0}")]
    PinSource(String),
    #[error("the operation was lost in a failover and must be started again")]
    OperationLost,
    #[error("a token key would not be replicated to every member")]
    NotReplicated,
    #[error("the audit log cannot record the call (fail-closed)")]
    AuditUnavailable,
    /// A member call did not return before the slot's deadline.
    #[error("the member did not answer before the call deadline")]
    TimedOut,
}

impl Error {
    /// The return code an application sees for this error.
    pub fn rv(&self) -> CK_RV {
        match self {
            Error::Vendor(rv) => *rv,
            Error::NotInitialized => CKR_CRYPTOKI_NOT_INITIALIZED,
            Error::AlreadyInitialized => CKR_CRYPTOKI_ALREADY_INITIALIZED,
            Error::ArgumentsBad(_) => CKR_ARGUMENTS_BAD,
            Error::SlotIdInvalid => CKR_SLOT_ID_INVALID,
            Error::TokenNotPresent => CKR_TOKEN_NOT_PRESENT,
            Error::SessionHandleInvalid => CKR_SESSION_HANDLE_INVALID,
            Error::ObjectHandleInvalid => CKR_OBJECT_HANDLE_INVALID,
            Error::KeyHandleInvalid => CKR_KEY_HANDLE_INVALID,
            Error::BufferTooSmall => CKR_BUFFER_TOO_SMALL,
            Error::FunctionNotSupported => CKR_FUNCTION_NOT_SUPPORTED,
            Error::ParallelNotSupported => CKR_SESSION_PARALLEL_NOT_SUPPORTED,
            Error::SessionCount => CKR_SESSION_COUNT,
            Error::NoEvent => CKR_NO_EVENT,
            Error::HostMemory => CKR_HOST_MEMORY,
            Error::General(_) => CKR_GENERAL_ERROR,
            Error::Config(_) => vendor_rv::CONFIG_INVALID,
            Error::Backend(_) => vendor_rv::BACKEND_UNAVAILABLE,
            Error::PinSource(_) => vendor_rv::PIN_SOURCE_UNAVAILABLE,
            Error::OperationLost => vendor_rv::OPERATION_LOST,
            Error::NotReplicated => vendor_rv::NOT_REPLICATED,
            Error::AuditUnavailable => vendor_rv::AUDIT_UNAVAILABLE,
            Error::TimedOut => CKR_DEVICE_ERROR,
        }
    }

    /// Turns a vendor return code into a result.
    #[inline]
    pub fn check(rv: CK_RV) -> Result<()> {
        if rv == CKR_OK {
            Ok(())
        } else {
            Err(Error::Vendor(rv))
        }
    }
}

/// Result of every fallible operation in the module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The spec's name of a return code (and p11shim's own), for logs and
/// audit records; unknown codes in hex.
pub fn rv_name(rv: CK_RV) -> String {
    let name = match rv {
        vendor_rv::CONFIG_INVALID => "CKR_P11SHIM_CONFIG_INVALID",
        vendor_rv::BACKEND_UNAVAILABLE => "CKR_P11SHIM_BACKEND_UNAVAILABLE",
        vendor_rv::PIN_SOURCE_UNAVAILABLE => "CKR_P11SHIM_PIN_SOURCE_UNAVAILABLE",
        vendor_rv::OPERATION_LOST => "CKR_P11SHIM_OPERATION_LOST",
        vendor_rv::NOT_REPLICATED => "CKR_P11SHIM_NOT_REPLICATED",
        vendor_rv::AUDIT_UNAVAILABLE => "CKR_P11SHIM_AUDIT_UNAVAILABLE",
        other => match p11shim_proto::names::rv_name(other as u64) {
            Some(n) => n,
            None => return format!("CKR_0x{other:08X}"),
        },
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_codes_pass_through_unchanged() {
        assert_eq!(Error::Vendor(CKR_PIN_INCORRECT).rv(), CKR_PIN_INCORRECT);
        assert_eq!(
            Error::Vendor(CKR_VENDOR_DEFINED | 42).rv(),
            CKR_VENDOR_DEFINED | 42
        );
        assert!(Error::check(CKR_OK).is_ok());
        assert_eq!(
            Error::check(CKR_DEVICE_ERROR),
            Err(Error::Vendor(CKR_DEVICE_ERROR))
        );
    }

    #[test]
    fn names_known_and_unknown_codes() {
        assert_eq!(rv_name(CKR_BUFFER_TOO_SMALL), "CKR_BUFFER_TOO_SMALL");
        assert_eq!(rv_name(0x1234_5678), "CKR_0x12345678");
        assert_eq!(
            rv_name(vendor_rv::CONFIG_INVALID),
            "CKR_P11SHIM_CONFIG_INVALID"
        );
    }
}
