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
            tracing::error!(
                function,
                "internal error: a panic was caught at the C boundary"
            );
            CKR_GENERAL_ERROR
        }
    }
}

/// The return code of a failed call, logged at debug level.
#[cold]
#[inline(never)]
pub(crate) fn failed(function: &'static str, e: &Error) -> CK_RV {
    let rv = e.rv();
    crate::logging::quietly(
        || tracing::debug!(function, rv = %rv_name(rv), error = %e, "call failed"),
    );
    rv
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkcs11_sys::{CKR_ARGUMENTS_BAD, CKR_PIN_INCORRECT};

    #[test]
    fn a_panic_becomes_general_error() {
        // The default hook would print the panic; the result is what matters.
        let rv = guard("C_Test", || panic!("boom"));
        assert_eq!(rv, CKR_GENERAL_ERROR);
    }

    #[test]
    fn errors_become_their_codes() {
        assert_eq!(guard("C_Test", || Ok(())), CKR_OK);
        assert_eq!(
            guard("C_Test", || Err(Error::ArgumentsBad("x"))),
            CKR_ARGUMENTS_BAD
        );
        assert_eq!(
            guard("C_Test", || Err(Error::Vendor(CKR_PIN_INCORRECT))),
            CKR_PIN_INCORRECT
        );
    }
}
