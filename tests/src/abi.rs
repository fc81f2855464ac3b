//! A PKCS#11 module loaded with dlopen, called through its raw function
//! list: for tests of the C ABI itself (bad pointers, return codes) where a
//! wrapper library would get in the way.

use std::path::Path;
use std::ptr::null_mut;

use pkcs11_sys::*;

/// A loaded module and its 2.40 function list.
#[derive(Debug)]
pub struct Module {
    pub fl: &'static CK_FUNCTION_LIST,
    pub lib: libloading::Library,
}

impl Module {
    pub fn load(path: &Path) -> Module {
        // SAFETY: loading a PKCS#11 module.
        let lib = unsafe { libloading::Library::new(path) }.unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
        let mut fl: CK_FUNCTION_LIST_PTR = null_mut();
        // SAFETY: C_GetFunctionList has this signature.
        let rv = unsafe {
            let f = lib.get::<unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV>(b"C_GetFunctionList\0").expect("C_GetFunctionList");
            f(&mut fl)
        };
        assert_eq!(rv, CKR_OK);
        // SAFETY: the module's list lives as long as the library, which this
        // struct keeps loaded.
        Module { fl: unsafe { &*fl }, lib }
    }
}

/// Calls a function of a [`Module`]'s list: `call!(m, C_Login(h, ...))`.
#[macro_export]
macro_rules! call {
    ($m:expr, $f:ident($($a:expr),*)) => {
        // SAFETY: arguments are valid for the call or deliberately invalid
        // in the ways the spec says a module must detect.
        unsafe { ($m.fl.$f.expect(stringify!($f)))($($a),*) }
    };
}
