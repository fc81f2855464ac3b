//! The one guard every exported function runs through: a panic is caught
//! and becomes `CKR_GENERAL_ERROR`, an error becomes its `CK_RV`.

use std::panic::{AssertUnwindSafe, catch_unwind};

use pkcs11_sys::{CK_RV, CKR_GENERAL_ERROR, CKR_OK};

use crate::error::{Error, Result, rv_name};

/// Runs the body of a PKCS#11 function.
#[inline(always)]
pub fn guard(function: &'static str, body: impl FnOnce() -> Result<()>) -> CK_RV {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            tracing::trace!(function, "CKR_OK");
            CKR_OK
        }
        Ok(Err(e)) => failed(function, &e),
        Err(_) => {
            tracing::error!(function, "internal error: a panic was caught at the C boundary");
            CKR_GENERAL_ERROR
        }
    }
}

#[cold]
#[inline(never)]
fn failed(function: &'static str, e: &Error) -> CK_RV {
    let rv = e.rv();
    tracing::debug!(function, rv = %rv_name(rv), error = %e, "call failed");
    rv
}
