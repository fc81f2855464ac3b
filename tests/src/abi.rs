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
        let lib = unsafe { libloading::Library::new(path) }
            .unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
        let mut fl: CK_FUNCTION_LIST_PTR = null_mut();
        // SAFETY: C_GetFunctionList has this signature.
        let rv = unsafe {
            let f = lib
                .get::<unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV>(
                    b"C_GetFunctionList\0",
                )
                .expect("C_GetFunctionList");
            f(&mut fl)
        };
        assert_eq!(rv, CKR_OK);
        // SAFETY: the module's list lives as long as the library, which this
        // struct keeps loaded.
        Module {
            fl: unsafe { &*fl },
            lib,
        }
    }
}

/// Calls a function of a [`Module`]'s list: `call!(m, C_Login(h, ...))`.
#[macro_export]
macro_rules! call {
    ($m:expr, $f:ident($($a:expr),*)) => {
        {
            // SAFETY: arguments are valid for the call or deliberately
            // invalid in the ways the spec says a module must detect.
            unsafe { ($m.fl.$f.expect(stringify!($f)))($($a),*) }
        }
    };
}

/// The status query of p11shim's own interface (`P11SHIM_FUNCTION_LIST`).
pub type StatusFn = unsafe extern "C" fn(CK_UTF8CHAR_PTR, CK_ULONG_PTR) -> CK_RV;

/// The status function of an interface returned for "p11shim".
///
/// # Safety
/// `iface` is the interface p11shim returned for its own name.
pub unsafe fn status_fn(iface: CK_INTERFACE_PTR) -> StatusFn {
    #[repr(C)]
    struct List {
        version: CK_VERSION,
        get_status: StatusFn,
    }
    // SAFETY: per the caller, the function list has this layout (include/p11shim.h).
    unsafe { (*((*iface).pFunctionList as *const List)).get_status }
}

/// Reads p11shim's status JSON from a loaded module (the same copy the
/// process already initialized, found again with dlopen).
pub fn status_json(path: &Path) -> String {
    let m = Module::load(path);
    type Gi = unsafe extern "C" fn(
        CK_UTF8CHAR_PTR,
        CK_VERSION_PTR,
        CK_INTERFACE_PTR_PTR,
        CK_FLAGS,
    ) -> CK_RV;
    // SAFETY: the symbol has the spec's signature; the interface is p11shim's.
    unsafe {
        let gi = m
            .lib
            .get::<Gi>(b"C_GetInterface\0")
            .expect("C_GetInterface");
        let mut iface: CK_INTERFACE_PTR = null_mut();
        assert_eq!(
            gi(b"p11shim\0".as_ptr().cast_mut(), null_mut(), &mut iface, 0),
            CKR_OK
        );
        let status = status_fn(iface);
        // The document may grow between the size query and the fetch
        // (counters gain digits): the two-call convention says ask again.
        for _ in 0..8 {
            let mut len: CK_ULONG = 0;
            assert_eq!(status(null_mut(), &mut len), CKR_OK);
            let mut buf = vec![0u8; len as usize];
            match status(buf.as_mut_ptr(), &mut len) {
                CKR_OK => {
                    buf.truncate(len as usize);
                    return String::from_utf8(buf).expect("UTF-8 status");
                }
                CKR_BUFFER_TOO_SMALL => continue,
                rv => panic!("P11shim_GetStatus: {rv:#x}"),
            }
        }
        panic!("P11shim_GetStatus kept growing")
    }
}
