//! The vendor library: loading it, and calling its functions safely.
//!
//! A vendor library is opened with `RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND`:
//! `RTLD_LOCAL` keeps its symbols out of the global scope, so they never
//! interpose ours, and `RTLD_DEEPBIND` makes it resolve its own `C_*`
//! references to itself first. Without it, when p11shim sits in the global
//! scope (a program linked with `-lp11shim`, or a dlopen with
//! `RTLD_GLOBAL`), the vendor's function list would point back at p11shim.
//! Its function list is taken
//! from `C_GetInterface` when it offers one, else from `C_GetFunctionList`,
//! and a function it lacks is `CKR_FUNCTION_NOT_SUPPORTED`, never a NULL
//! call. This file and `abi/` are the only places with `unsafe` code.

use std::path::{Path, PathBuf};

use pkcs11_sys::*;

use crate::abi::mem::{
    Bytes, BytesMut, Label, Mechanism, Out, OutBytes, OutList, Param, Pin, Template,
};
use crate::error::{Error, Result};

/// A loaded vendor library and its function list.
pub struct Vendor {
    path: PathBuf,
    fl: CK_FUNCTION_LIST_3_0,
    /// The interface version the vendor offered.
    version: CK_VERSION,
    // Kept last: the library is unloaded after everything that points into it.
    _lib: Option<libloading::os::unix::Library>,
}

impl std::fmt::Debug for Vendor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Vendor({}, v{}.{})",
            self.path.display(),
            self.version.major,
            self.version.minor
        )
    }
}

// SAFETY: a PKCS#11 library initialized with CKF_OS_LOCKING_OK may be called
// from any thread; the function list is immutable once copied.
unsafe impl Send for Vendor {}
// SAFETY: as above.
unsafe impl Sync for Vendor {}

type GetInterfaceFn =
    unsafe extern "C" fn(CK_UTF8CHAR_PTR, CK_VERSION_PTR, CK_INTERFACE_PTR_PTR, CK_FLAGS) -> CK_RV;
type GetFunctionListFn = unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV;

impl Vendor {
    /// Loads a vendor library and takes its function list. `own` is this
    /// module's `C_Initialize`, to refuse a configuration that points a
    /// member at p11shim itself.
    pub fn load(path: &Path, own: CK_C_Initialize) -> Result<Vendor> {
        let flags = libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_DEEPBIND;
        // SAFETY: loading a PKCS#11 library runs its initializers; that is the
        // documented way to use one. The path was validated as absolute.
        let lib = unsafe { libloading::os::unix::Library::open(Some(path), flags) }
            .map_err(|e| Error::Backend(format!("cannot load {}: {e}", path.display())))?;

        let mut fl: CK_FUNCTION_LIST_3_0 = Default::default();
        // SAFETY: the symbol, if present, has the C_GetInterface signature of the spec.
        let get_interface = unsafe { lib.get::<GetInterfaceFn>(b"C_GetInterface\0") }.ok();
        let mut version = CK_VERSION { major: 0, minor: 0 };
        let mut found = false;
        if let Some(gi) = get_interface {
            let mut iface: CK_INTERFACE_PTR = std::ptr::null_mut();
            let name = c"PKCS 11".as_ptr().cast_mut().cast();
            // SAFETY: valid name, NULL version (the default), writable out pointer.
            let rv = unsafe { gi(name, std::ptr::null_mut(), &mut iface, 0) };
            if rv == CKR_OK && !iface.is_null() {
                // SAFETY: the vendor returned a valid interface.
                let list = unsafe { (*iface).pFunctionList } as *const CK_VERSION;
                if !list.is_null() {
                    // SAFETY: every function list starts with its version.
                    version = unsafe { list.read_unaligned() };
                    // SAFETY: see copy_list.
                    unsafe { copy_list(&mut fl, list.cast(), version) };
                    found = true;
                }
            }
        }
        if !found {
            // SAFETY: the symbol has the C_GetFunctionList signature of the spec.
            let gfl =
                unsafe { lib.get::<GetFunctionListFn>(b"C_GetFunctionList\0") }.map_err(|_| {
                    Error::Backend(format!(
                        "{} is not a PKCS#11 library (no C_GetFunctionList)",
                        path.display()
                    ))
                })?;
            let mut list: CK_FUNCTION_LIST_PTR = std::ptr::null_mut();
            // SAFETY: writable out pointer.
            let rv = unsafe { gfl(&mut list) };
            if rv != CKR_OK || list.is_null() {
                return Err(Error::Backend(format!(
                    "{}: C_GetFunctionList returned {}",
                    path.display(),
                    crate::error::rv_name(rv)
                )));
            }
            // SAFETY: a valid 2.x function list starts with its version.
            version = unsafe { (*list).version };
            // SAFETY: see copy_list; a 2.x list is copied as such.
            unsafe {
                copy_list(
                    &mut fl,
                    list.cast(),
                    CK_VERSION {
                        major: 2,
                        minor: 40,
                    },
                )
            };
        }
        if fl.C_Initialize.is_none() {
            return Err(Error::Backend(format!(
                "{} has no C_Initialize",
                path.display()
            )));
        }
        if fl.C_Initialize.map(|f| f as usize) == own.map(|f| f as usize) {
            return Err(Error::Backend(format!(
                "{} is p11shim itself; a member must be a vendor library",
                path.display()
            )));
        }
        Ok(Vendor {
            path: path.to_path_buf(),
            fl,
            version,
            _lib: Some(lib),
        })
    }

    /// A vendor with no functions, for unit tests of the routing logic.
    #[cfg(test)]
    pub fn for_tests() -> Vendor {
        Vendor {
            path: "/test".into(),
            fl: Default::default(),
            version: CK_VERSION {
                major: 2,
                minor: 40,
            },
            _lib: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The vendor's function list (the 2.40 part, and the 3.0 one when
    /// offered).
    pub fn functions(&self) -> &CK_FUNCTION_LIST_3_0 {
        &self.fl
    }

    /// The interface version the vendor offered.
    pub fn version(&self) -> CK_VERSION {
        self.version
    }

    /// Initializes the vendor for multi-threaded use with its own OS locking.
    /// Returns `false` when the vendor was already initialized by someone
    /// else in this process (then it must not be finalized by us).
    pub fn initialize(&self) -> Result<bool> {
        let f = self.fl.C_Initialize.ok_or(Error::FunctionNotSupported)?;
        let mut args = CK_C_INITIALIZE_ARGS {
            flags: CKF_OS_LOCKING_OK,
            ..Default::default()
        };
        // SAFETY: args is a valid, fully initialized structure living across the call.
        let rv = unsafe { f((&mut args as *mut CK_C_INITIALIZE_ARGS).cast()) };
        match rv {
            CKR_OK => Ok(true),
            CKR_CRYPTOKI_ALREADY_INITIALIZED => Ok(false),
            other => Err(Error::Vendor(other)),
        }
    }

    /// Initializes again in a forked child: a vendor that does not notice
    /// the fork is finalized first.
    pub fn initialize_after_fork(&self) -> Result<bool> {
        match self.initialize()? {
            true => Ok(true),
            false => {
                self.finalize();
                self.initialize()
            }
        }
    }

    pub fn finalize(&self) {
        if let Some(f) = self.fl.C_Finalize {
            // SAFETY: NULL is the only valid argument of C_Finalize.
            let rv = unsafe { f(std::ptr::null_mut()) };
            if rv != CKR_OK {
                tracing::warn!(library = %self.path.display(), rv = %crate::error::rv_name(rv), "vendor C_Finalize failed");
            }
        }
    }

    /// Whether the vendor offers a function (3.0 functions on a 2.x vendor do not).
    pub fn has_login_user(&self) -> bool {
        self.fl.C_LoginUser.is_some()
    }
}

/// Copies a vendor function list into a 3.0-shaped one; the 3.0 entries
/// stay `None` for a 2.x vendor.
///
/// # Safety
/// `src` points to a valid function list of the given version.
unsafe fn copy_list(dst: &mut CK_FUNCTION_LIST_3_0, src: *const u8, version: CK_VERSION) {
    let n = if version.major >= 3 {
        std::mem::size_of::<CK_FUNCTION_LIST_3_0>()
    } else {
        std::mem::size_of::<CK_FUNCTION_LIST>()
    };
    // SAFETY: the 3.0 list extends the 2.x list field for field, every field
    // is a version or a nullable function pointer, and `src` holds `n` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(src, (dst as *mut CK_FUNCTION_LIST_3_0).cast::<u8>(), n)
    };
}

type Sh = CK_SESSION_HANDLE;
type Oh = CK_OBJECT_HANDLE;

/// Declares a typed forwarding method for each vendor function: the
/// arguments are views checked at the C boundary, and a missing entry in the
/// vendor's function list is `CKR_FUNCTION_NOT_SUPPORTED`.
macro_rules! forward {
    ($( $name:ident => $f:ident ( $($p:ident : $t:ty),* ) => ( $($a:expr),* ); )*) => {
        impl Vendor {
            $(
                #[inline(always)]
                #[allow(unused_mut)]
                pub fn $name(&self, $(mut $p: $t),*) -> Result<()> {
                    let f = self.fl.$f.ok_or(Error::FunctionNotSupported)?;
                    // SAFETY: every pointer comes from a view checked at the C
                    // boundary or from the module's own memory, valid for the
                    // call; `f` is the vendor's own entry point.
                    Error::check(unsafe { f($($a),*) })
                }
            )*
        }
    };
}

forward! {
    get_info => C_GetInfo(out: &mut CK_INFO) => (out);
    get_slot_list => C_GetSlotList(present: CK_BBOOL, out: OutList<'_, CK_SLOT_ID>) => (present, out.raw().0, out.raw().1);
    get_slot_info => C_GetSlotInfo(slot: CK_SLOT_ID, out: &mut CK_SLOT_INFO) => (slot, out);
    get_token_info => C_GetTokenInfo(slot: CK_SLOT_ID, out: &mut CK_TOKEN_INFO) => (slot, out);
    get_mechanism_list => C_GetMechanismList(slot: CK_SLOT_ID, out: OutList<'_, CK_MECHANISM_TYPE>) => (slot, out.raw().0, out.raw().1);
    get_mechanism_info => C_GetMechanismInfo(slot: CK_SLOT_ID, ty: CK_MECHANISM_TYPE, out: Out<'_, CK_MECHANISM_INFO>) => (slot, ty, out.raw());
    init_token => C_InitToken(slot: CK_SLOT_ID, pin: Pin<'_>, label: Label<'_>) => (slot, pin.raw().0, pin.raw().1, label.raw());
    init_pin => C_InitPIN(s: Sh, pin: Pin<'_>) => (s, pin.raw().0, pin.raw().1);
    set_pin => C_SetPIN(s: Sh, old: Pin<'_>, new: Pin<'_>) => (s, old.raw().0, old.raw().1, new.raw().0, new.raw().1);
    open_session => C_OpenSession(slot: CK_SLOT_ID, flags: CK_FLAGS, out: &mut Sh) => (slot, flags, std::ptr::null_mut(), None, out);
    close_session => C_CloseSession(s: Sh) => (s);
    close_all_sessions => C_CloseAllSessions(slot: CK_SLOT_ID) => (slot);
    get_session_info => C_GetSessionInfo(s: Sh, out: &mut CK_SESSION_INFO) => (s, out);
    get_operation_state => C_GetOperationState(s: Sh, out: OutBytes<'_>) => (s, out.raw().0, out.raw().1);
    set_operation_state => C_SetOperationState(s: Sh, state: Bytes<'_>, enc: Oh, auth: Oh) => (s, state.raw().0, state.raw().1, enc, auth);
    login => C_Login(s: Sh, user: CK_USER_TYPE, pin: Pin<'_>) => (s, user, pin.raw().0, pin.raw().1);
    login_user => C_LoginUser(s: Sh, user: CK_USER_TYPE, pin: Pin<'_>, name: Bytes<'_>) => (s, user, pin.raw().0, pin.raw().1, name.raw().0, name.raw().1);
    logout => C_Logout(s: Sh) => (s);
    create_object => C_CreateObject(s: Sh, t: Template<'_>, out: &mut Oh) => (s, t.raw().0, t.raw().1, out);
    copy_object => C_CopyObject(s: Sh, o: Oh, t: Template<'_>, out: &mut Oh) => (s, o, t.raw().0, t.raw().1, out);
    destroy_object => C_DestroyObject(s: Sh, o: Oh) => (s, o);
    get_object_size => C_GetObjectSize(s: Sh, o: Oh, out: Out<'_, CK_ULONG>) => (s, o, out.raw());
    get_attribute_value => C_GetAttributeValue(s: Sh, o: Oh, t: Template<'_>) => (s, o, t.raw().0, t.raw().1);
    set_attribute_value => C_SetAttributeValue(s: Sh, o: Oh, t: Template<'_>) => (s, o, t.raw().0, t.raw().1);
    find_objects_init => C_FindObjectsInit(s: Sh, t: Template<'_>) => (s, t.raw().0, t.raw().1);
    find_objects => C_FindObjects(s: Sh, out: &mut [Oh], count: &mut CK_ULONG) => (s, out.as_mut_ptr(), out.len() as CK_ULONG, count);
    find_objects_final => C_FindObjectsFinal(s: Sh) => (s);
    encrypt_init => C_EncryptInit(s: Sh, m: Mechanism<'_>, k: Oh) => (s, m.raw(), k);
    encrypt => C_Encrypt(s: Sh, d: Bytes<'_>, out: OutBytes<'_>) => (s, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    encrypt_update => C_EncryptUpdate(s: Sh, d: Bytes<'_>, out: OutBytes<'_>) => (s, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    encrypt_final => C_EncryptFinal(s: Sh, out: OutBytes<'_>) => (s, out.raw().0, out.raw().1);
    decrypt_init => C_DecryptInit(s: Sh, m: Mechanism<'_>, k: Oh) => (s, m.raw(), k);
    decrypt => C_Decrypt(s: Sh, d: Bytes<'_>, out: OutBytes<'_>) => (s, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    decrypt_update => C_DecryptUpdate(s: Sh, d: Bytes<'_>, out: OutBytes<'_>) => (s, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    decrypt_final => C_DecryptFinal(s: Sh, out: OutBytes<'_>) => (s, out.raw().0, out.raw().1);
    digest_init => C_DigestInit(s: Sh, m: Mechanism<'_>) => (s, m.raw());
    digest => C_Digest(s: Sh, d: Bytes<'_>, out: OutBytes<'_>) => (s, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    digest_update => C_DigestUpdate(s: Sh, d: Bytes<'_>) => (s, d.raw().0, d.raw().1);
    digest_key => C_DigestKey(s: Sh, k: Oh) => (s, k);
    digest_final => C_DigestFinal(s: Sh, out: OutBytes<'_>) => (s, out.raw().0, out.raw().1);
    sign_init => C_SignInit(s: Sh, m: Mechanism<'_>, k: Oh) => (s, m.raw(), k);
    sign => C_Sign(s: Sh, d: Bytes<'_>, out: OutBytes<'_>) => (s, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    sign_update => C_SignUpdate(s: Sh, d: Bytes<'_>) => (s, d.raw().0, d.raw().1);
    sign_final => C_SignFinal(s: Sh, out: OutBytes<'_>) => (s, out.raw().0, out.raw().1);
    sign_recover_init => C_SignRecoverInit(s: Sh, m: Mechanism<'_>, k: Oh) => (s, m.raw(), k);
    sign_recover => C_SignRecover(s: Sh, d: Bytes<'_>, out: OutBytes<'_>) => (s, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    verify_init => C_VerifyInit(s: Sh, m: Mechanism<'_>, k: Oh) => (s, m.raw(), k);
    verify => C_Verify(s: Sh, d: Bytes<'_>, sig: Bytes<'_>) => (s, d.raw().0, d.raw().1, sig.raw().0, sig.raw().1);
    verify_update => C_VerifyUpdate(s: Sh, d: Bytes<'_>) => (s, d.raw().0, d.raw().1);
    verify_final => C_VerifyFinal(s: Sh, sig: Bytes<'_>) => (s, sig.raw().0, sig.raw().1);
    verify_recover_init => C_VerifyRecoverInit(s: Sh, m: Mechanism<'_>, k: Oh) => (s, m.raw(), k);
    verify_recover => C_VerifyRecover(s: Sh, sig: Bytes<'_>, out: OutBytes<'_>) => (s, sig.raw().0, sig.raw().1, out.raw().0, out.raw().1);
    digest_encrypt_update => C_DigestEncryptUpdate(s: Sh, d: Bytes<'_>, out: OutBytes<'_>) => (s, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    decrypt_digest_update => C_DecryptDigestUpdate(s: Sh, d: Bytes<'_>, out: OutBytes<'_>) => (s, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    sign_encrypt_update => C_SignEncryptUpdate(s: Sh, d: Bytes<'_>, out: OutBytes<'_>) => (s, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    decrypt_verify_update => C_DecryptVerifyUpdate(s: Sh, d: Bytes<'_>, out: OutBytes<'_>) => (s, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    generate_key => C_GenerateKey(s: Sh, m: Mechanism<'_>, t: Template<'_>, out: &mut Oh) => (s, m.raw(), t.raw().0, t.raw().1, out);
    generate_key_pair => C_GenerateKeyPair(s: Sh, m: Mechanism<'_>, pub_t: Template<'_>, priv_t: Template<'_>, pub_out: &mut Oh, priv_out: &mut Oh)
        => (s, m.raw(), pub_t.raw().0, pub_t.raw().1, priv_t.raw().0, priv_t.raw().1, pub_out, priv_out);
    wrap_key => C_WrapKey(s: Sh, m: Mechanism<'_>, wrapping: Oh, key: Oh, out: OutBytes<'_>) => (s, m.raw(), wrapping, key, out.raw().0, out.raw().1);
    unwrap_key => C_UnwrapKey(s: Sh, m: Mechanism<'_>, unwrapping: Oh, wrapped: Bytes<'_>, t: Template<'_>, out: &mut Oh)
        => (s, m.raw(), unwrapping, wrapped.raw().0, wrapped.raw().1, t.raw().0, t.raw().1, out);
    derive_key => C_DeriveKey(s: Sh, m: Mechanism<'_>, base: Oh, t: Template<'_>, out: &mut Oh) => (s, m.raw(), base, t.raw().0, t.raw().1, out);
    seed_random => C_SeedRandom(s: Sh, d: Bytes<'_>) => (s, d.raw().0, d.raw().1);
    generate_random => C_GenerateRandom(s: Sh, out: BytesMut<'_>) => (s, out.raw().0, out.raw().1);
    get_function_status => C_GetFunctionStatus(s: Sh) => (s);
    cancel_function => C_CancelFunction(s: Sh) => (s);
    wait_for_slot_event => C_WaitForSlotEvent(flags: CK_FLAGS, slot: &mut CK_SLOT_ID) => (flags, slot, std::ptr::null_mut());
    session_cancel => C_SessionCancel(s: Sh, flags: CK_FLAGS) => (s, flags);
    message_encrypt_init => C_MessageEncryptInit(s: Sh, m: Mechanism<'_>, k: Oh) => (s, m.raw(), k);
    encrypt_message => C_EncryptMessage(s: Sh, p: Param<'_>, ad: Bytes<'_>, d: Bytes<'_>, out: OutBytes<'_>)
        => (s, p.raw().0, p.raw().1, ad.raw().0, ad.raw().1, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    encrypt_message_begin => C_EncryptMessageBegin(s: Sh, p: Param<'_>, ad: Bytes<'_>) => (s, p.raw().0, p.raw().1, ad.raw().0, ad.raw().1);
    encrypt_message_next => C_EncryptMessageNext(s: Sh, p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>, flags: CK_FLAGS)
        => (s, p.raw().0, p.raw().1, d.raw().0, d.raw().1, out.raw().0, out.raw().1, flags);
    message_encrypt_final => C_MessageEncryptFinal(s: Sh) => (s);
    message_decrypt_init => C_MessageDecryptInit(s: Sh, m: Mechanism<'_>, k: Oh) => (s, m.raw(), k);
    decrypt_message => C_DecryptMessage(s: Sh, p: Param<'_>, ad: Bytes<'_>, d: Bytes<'_>, out: OutBytes<'_>)
        => (s, p.raw().0, p.raw().1, ad.raw().0, ad.raw().1, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    decrypt_message_begin => C_DecryptMessageBegin(s: Sh, p: Param<'_>, ad: Bytes<'_>) => (s, p.raw().0, p.raw().1, ad.raw().0, ad.raw().1);
    decrypt_message_next => C_DecryptMessageNext(s: Sh, p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>, flags: CK_FLAGS)
        => (s, p.raw().0, p.raw().1, d.raw().0, d.raw().1, out.raw().0, out.raw().1, flags);
    message_decrypt_final => C_MessageDecryptFinal(s: Sh) => (s);
    message_sign_init => C_MessageSignInit(s: Sh, m: Mechanism<'_>, k: Oh) => (s, m.raw(), k);
    sign_message => C_SignMessage(s: Sh, p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>) => (s, p.raw().0, p.raw().1, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    sign_message_begin => C_SignMessageBegin(s: Sh, p: Param<'_>) => (s, p.raw().0, p.raw().1);
    sign_message_next => C_SignMessageNext(s: Sh, p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>) => (s, p.raw().0, p.raw().1, d.raw().0, d.raw().1, out.raw().0, out.raw().1);
    message_sign_final => C_MessageSignFinal(s: Sh) => (s);
    message_verify_init => C_MessageVerifyInit(s: Sh, m: Mechanism<'_>, k: Oh) => (s, m.raw(), k);
    verify_message => C_VerifyMessage(s: Sh, p: Param<'_>, d: Bytes<'_>, sig: Bytes<'_>) => (s, p.raw().0, p.raw().1, d.raw().0, d.raw().1, sig.raw().0, sig.raw().1);
    verify_message_begin => C_VerifyMessageBegin(s: Sh, p: Param<'_>) => (s, p.raw().0, p.raw().1);
    verify_message_next => C_VerifyMessageNext(s: Sh, p: Param<'_>, d: Bytes<'_>, sig: Bytes<'_>) => (s, p.raw().0, p.raw().1, d.raw().0, d.raw().1, sig.raw().0, sig.raw().1);
    message_verify_final => C_MessageVerifyFinal(s: Sh) => (s);
}

impl Vendor {
    /// Reads one `CK_BBOOL` attribute of an object; `None` when the vendor
    /// cannot say.
    pub fn bool_attribute(&self, s: Sh, o: Oh, ty: CK_ATTRIBUTE_TYPE) -> Option<bool> {
        let mut value: CK_BBOOL = CK_FALSE;
        let mut attr = [CK_ATTRIBUTE {
            type_: ty,
            pValue: (&mut value as *mut CK_BBOOL).cast(),
            ulValueLen: std::mem::size_of::<CK_BBOOL>() as CK_ULONG,
        }];
        self.get_attribute_value(s, o, Template::from_slice(&mut attr))
            .ok()?;
        Some(value != CK_FALSE)
    }
}
