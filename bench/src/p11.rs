//! Raw PKCS#11 access for the workers: a module loaded with `libloading`,
//! its function list resolved once into plain function pointers (no wrapper
//! between the benchmark and the module), and a check of every return code
//! that ends the process loudly on anything but `CKR_OK`.

use std::ffi::c_void;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::OnceLock;

use pkcs11_sys::*;

/// The function type inside the `Option` of a `CK_C_*` alias.
pub trait Unopt {
    type F;
}
impl<T> Unopt for Option<T> {
    type F = T;
}

macro_rules! functions {
    ($($field:ident: $ty:ident = $name:ident;)*) => {
        /// The functions of a module that the benchmark calls, resolved once
        /// when it is loaded.
        #[derive(Clone, Copy)]
        pub struct Fns {
            $(pub $field: <$ty as Unopt>::F,)*
        }

        impl Fns {
            fn resolve(fl: &CK_FUNCTION_LIST) -> Result<Fns, &'static str> {
                Ok(Fns {
                    $($field: fl.$name.ok_or(concat!(stringify!($name), " is missing from the function list"))?,)*
                })
            }
        }
    };
}

functions! {
    initialize: CK_C_Initialize = C_Initialize;
    finalize: CK_C_Finalize = C_Finalize;
    get_slot_list: CK_C_GetSlotList = C_GetSlotList;
    get_slot_info: CK_C_GetSlotInfo = C_GetSlotInfo;
    get_token_info: CK_C_GetTokenInfo = C_GetTokenInfo;
    open_session: CK_C_OpenSession = C_OpenSession;
    close_session: CK_C_CloseSession = C_CloseSession;
    login: CK_C_Login = C_Login;
    logout: CK_C_Logout = C_Logout;
    create_object: CK_C_CreateObject = C_CreateObject;
    get_attribute_value: CK_C_GetAttributeValue = C_GetAttributeValue;
    find_objects_init: CK_C_FindObjectsInit = C_FindObjectsInit;
    find_objects: CK_C_FindObjects = C_FindObjects;
    find_objects_final: CK_C_FindObjectsFinal = C_FindObjectsFinal;
    encrypt_init: CK_C_EncryptInit = C_EncryptInit;
    encrypt: CK_C_Encrypt = C_Encrypt;
    digest_init: CK_C_DigestInit = C_DigestInit;
    digest: CK_C_Digest = C_Digest;
    sign_init: CK_C_SignInit = C_SignInit;
    sign: CK_C_Sign = C_Sign;
    generate_key: CK_C_GenerateKey = C_GenerateKey;
    generate_key_pair: CK_C_GenerateKeyPair = C_GenerateKeyPair;
}

impl std::fmt::Debug for Fns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fns")
    }
}

/// Who is speaking in error messages ("shim worker", ...).
static WHO: OnceLock<String> = OnceLock::new();

pub fn set_who(who: String) {
    let _ = WHO.set(who);
}

/// A temporary directory to remove when the run is aborted.
static CLEANUP: OnceLock<PathBuf> = OnceLock::new();

/// Has [`die`] remove `dir` (the parent's temporary directory).
pub fn remove_on_abort(dir: &Path) {
    let _ = CLEANUP.set(dir.to_path_buf());
}

/// Ends the process with a message: a benchmark that goes on after an
/// error measures the error.
#[cold]
#[inline(never)]
pub fn die(msg: impl Display) -> ! {
    if let Some(dir) = CLEANUP.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
    match WHO.get() {
        Some(who) => eprintln!("p11shim-bench: {who}: {msg}; run aborted"),
        None => eprintln!("p11shim-bench: {msg}; run aborted"),
    }
    std::process::exit(3)
}

#[cold]
#[inline(never)]
fn failed(rv: CK_RV, what: &str) -> ! {
    die(format_args!("{what} returned {} (0x{rv:08x})", rv_name(rv)))
}

/// Checks a return code; anything but `CKR_OK` ends the run.
#[inline(always)]
pub fn check(rv: CK_RV, what: &str) {
    if rv != CKR_OK {
        failed(rv, what)
    }
}

/// Names of the return codes a benchmark run might plausibly meet.
pub fn rv_name(rv: CK_RV) -> &'static str {
    match rv {
        CKR_OK => "CKR_OK",
        CKR_HOST_MEMORY => "CKR_HOST_MEMORY",
        CKR_SLOT_ID_INVALID => "CKR_SLOT_ID_INVALID",
        CKR_GENERAL_ERROR => "CKR_GENERAL_ERROR",
        CKR_FUNCTION_FAILED => "CKR_FUNCTION_FAILED",
        CKR_ARGUMENTS_BAD => "CKR_ARGUMENTS_BAD",
        CKR_ATTRIBUTE_TYPE_INVALID => "CKR_ATTRIBUTE_TYPE_INVALID",
        CKR_ATTRIBUTE_VALUE_INVALID => "CKR_ATTRIBUTE_VALUE_INVALID",
        CKR_DATA_LEN_RANGE => "CKR_DATA_LEN_RANGE",
        CKR_DEVICE_ERROR => "CKR_DEVICE_ERROR",
        CKR_FUNCTION_NOT_SUPPORTED => "CKR_FUNCTION_NOT_SUPPORTED",
        CKR_KEY_HANDLE_INVALID => "CKR_KEY_HANDLE_INVALID",
        CKR_KEY_TYPE_INCONSISTENT => "CKR_KEY_TYPE_INCONSISTENT",
        CKR_MECHANISM_INVALID => "CKR_MECHANISM_INVALID",
        CKR_MECHANISM_PARAM_INVALID => "CKR_MECHANISM_PARAM_INVALID",
        CKR_OBJECT_HANDLE_INVALID => "CKR_OBJECT_HANDLE_INVALID",
        CKR_OPERATION_ACTIVE => "CKR_OPERATION_ACTIVE",
        CKR_OPERATION_NOT_INITIALIZED => "CKR_OPERATION_NOT_INITIALIZED",
        CKR_PIN_INCORRECT => "CKR_PIN_INCORRECT",
        CKR_SESSION_COUNT => "CKR_SESSION_COUNT",
        CKR_SESSION_HANDLE_INVALID => "CKR_SESSION_HANDLE_INVALID",
        CKR_SESSION_READ_ONLY => "CKR_SESSION_READ_ONLY",
        CKR_TEMPLATE_INCOMPLETE => "CKR_TEMPLATE_INCOMPLETE",
        CKR_TEMPLATE_INCONSISTENT => "CKR_TEMPLATE_INCONSISTENT",
        CKR_TOKEN_NOT_PRESENT => "CKR_TOKEN_NOT_PRESENT",
        CKR_TOKEN_NOT_RECOGNIZED => "CKR_TOKEN_NOT_RECOGNIZED",
        CKR_USER_ALREADY_LOGGED_IN => "CKR_USER_ALREADY_LOGGED_IN",
        CKR_USER_NOT_LOGGED_IN => "CKR_USER_NOT_LOGGED_IN",
        CKR_BUFFER_TOO_SMALL => "CKR_BUFFER_TOO_SMALL",
        CKR_CRYPTOKI_NOT_INITIALIZED => "CKR_CRYPTOKI_NOT_INITIALIZED",
        CKR_CRYPTOKI_ALREADY_INITIALIZED => "CKR_CRYPTOKI_ALREADY_INITIALIZED",
        rv if rv >= CKR_VENDOR_DEFINED => "a vendor-defined return code",
        _ => "an unexpected return code",
    }
}

/// A blank-padded PKCS#11 string, trimmed.
pub fn unpad(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

/// An attribute pointing at a plain value.
pub fn attr<T>(ty: CK_ATTRIBUTE_TYPE, v: &T) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_: ty,
        pValue: (v as *const T).cast_mut().cast(),
        ulValueLen: std::mem::size_of::<T>() as CK_ULONG,
    }
}

/// An attribute pointing at bytes.
pub fn attr_bytes(ty: CK_ATTRIBUTE_TYPE, v: &[u8]) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_: ty,
        pValue: v.as_ptr().cast_mut().cast(),
        ulValueLen: v.len() as CK_ULONG,
    }
}

/// A loaded module: its function pointers. The library stays loaded until
/// the process exits.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    pub f: Fns,
}

/// A slot with a token, as the module reports it.
#[derive(Debug, Clone)]
pub struct SlotToken {
    pub id: CK_SLOT_ID,
    pub label: String,
    pub manufacturer: String,
    pub model: String,
}

impl Module {
    pub fn load(path: &Path) -> Module {
        // SAFETY: loading a PKCS#11 library runs its initializers, which is
        // how such a library is meant to be used.
        let lib = unsafe { libloading::Library::new(path) }
            .unwrap_or_else(|e| die(format_args!("cannot load {}: {e}", path.display())));
        type GetFunctionList = unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV;
        // SAFETY: C_GetFunctionList has this signature in every PKCS#11 library.
        let gfl =
            unsafe { lib.get::<GetFunctionList>(b"C_GetFunctionList\0") }.unwrap_or_else(|e| {
                die(format_args!(
                    "{}: no C_GetFunctionList: {e}",
                    path.display()
                ))
            });
        let mut list: CK_FUNCTION_LIST_PTR = ptr::null_mut();
        // SAFETY: a writable out pointer.
        check(unsafe { gfl(&mut list) }, "C_GetFunctionList");
        if list.is_null() {
            die(format_args!(
                "{}: C_GetFunctionList gave NULL",
                path.display()
            ));
        }
        // SAFETY: the module returned a valid function list that lives as
        // long as the library stays loaded (forever, below).
        let f = Fns::resolve(unsafe { &*list })
            .unwrap_or_else(|e| die(format_args!("{}: {e}", path.display())));
        // Never unloaded: the function pointers stay valid for the process.
        std::mem::forget(lib);
        Module { f }
    }

    /// `C_Initialize` for multi-threaded use with OS locking, as p11shim
    /// itself initializes the vendor library.
    pub fn initialize(&self) {
        let mut args = CK_C_INITIALIZE_ARGS {
            flags: CKF_OS_LOCKING_OK,
            ..Default::default()
        };
        // SAFETY: a valid, fully initialized structure living across the call.
        check(
            unsafe {
                (self.f.initialize)((&mut args as *mut CK_C_INITIALIZE_ARGS).cast::<c_void>())
            },
            "C_Initialize",
        );
    }

    pub fn finalize(&self) {
        // SAFETY: pReserved must be NULL.
        check(unsafe { (self.f.finalize)(ptr::null_mut()) }, "C_Finalize");
    }

    fn slot_ids(&self, token_present: CK_BBOOL) -> Vec<CK_SLOT_ID> {
        let mut n: CK_ULONG = 0;
        // SAFETY: the size query of the two-call convention.
        check(
            unsafe { (self.f.get_slot_list)(token_present, ptr::null_mut(), &mut n) },
            "C_GetSlotList",
        );
        let mut ids = vec![0 as CK_SLOT_ID; n as usize];
        // SAFETY: `ids` holds `n` slot ids.
        check(
            unsafe { (self.f.get_slot_list)(token_present, ids.as_mut_ptr(), &mut n) },
            "C_GetSlotList",
        );
        ids.truncate(n as usize);
        ids
    }

    /// Every slot, with or without a token: (id, description, manufacturer).
    pub fn slots(&self) -> Vec<(CK_SLOT_ID, String, String)> {
        self.slot_ids(CK_FALSE)
            .into_iter()
            .map(|id| {
                let mut si = CK_SLOT_INFO::default();
                // SAFETY: a writable CK_SLOT_INFO.
                check(
                    unsafe { (self.f.get_slot_info)(id, &mut si) },
                    "C_GetSlotInfo",
                );
                (id, unpad(&si.slotDescription), unpad(&si.manufacturerID))
            })
            .collect()
    }

    /// Every slot with a token.
    pub fn tokens(&self) -> Vec<SlotToken> {
        self.slot_ids(CK_TRUE)
            .into_iter()
            .map(|id| {
                let mut ti = CK_TOKEN_INFO::default();
                // SAFETY: a writable CK_TOKEN_INFO.
                check(
                    unsafe { (self.f.get_token_info)(id, &mut ti) },
                    "C_GetTokenInfo",
                );
                SlotToken {
                    id,
                    label: unpad(&ti.label),
                    manufacturer: unpad(&ti.manufacturerID),
                    model: unpad(&ti.model),
                }
            })
            .collect()
    }

    /// The slot of the token labelled `label`; exactly one must exist.
    pub fn find_slot(&self, label: &str) -> CK_SLOT_ID {
        let all = self.tokens();
        let hits: Vec<_> = all.iter().filter(|t| t.label == label).collect();
        match hits.as_slice() {
            [one] => one.id,
            _ => die(format_args!(
                "expected one token labelled {label:?}, found {} among {} slots",
                hits.len(),
                all.len()
            )),
        }
    }

    pub fn open_session(&self, slot: CK_SLOT_ID, flags: CK_FLAGS) -> CK_SESSION_HANDLE {
        let mut h: CK_SESSION_HANDLE = 0;
        // SAFETY: no application pointer nor callback; a writable handle.
        check(
            unsafe { (self.f.open_session)(slot, flags, ptr::null_mut(), None, &mut h) },
            "C_OpenSession",
        );
        h
    }

    pub fn close_session(&self, h: CK_SESSION_HANDLE) {
        // SAFETY: no pointers.
        check(unsafe { (self.f.close_session)(h) }, "C_CloseSession");
    }

    pub fn login_user(&self, h: CK_SESSION_HANDLE, pin: &str) {
        // SAFETY: the PIN bytes are valid for the call; the module only reads them.
        check(
            unsafe { (self.f.login)(h, CKU_USER, pin.as_ptr().cast_mut(), pin.len() as CK_ULONG) },
            "C_Login",
        );
    }

    pub fn logout(&self, h: CK_SESSION_HANDLE) {
        // SAFETY: no pointers.
        check(unsafe { (self.f.logout)(h) }, "C_Logout");
    }

    /// The one object of a class with a label; none or several end the run.
    pub fn find_one(
        &self,
        h: CK_SESSION_HANDLE,
        class: CK_OBJECT_CLASS,
        label: &str,
    ) -> CK_OBJECT_HANDLE {
        let mut t = [
            attr(CKA_CLASS, &class),
            attr_bytes(CKA_LABEL, label.as_bytes()),
        ];
        // SAFETY: the template points to live values for the call.
        check(
            unsafe { (self.f.find_objects_init)(h, t.as_mut_ptr(), t.len() as CK_ULONG) },
            "C_FindObjectsInit",
        );
        let mut found = [CK_INVALID_HANDLE; 4];
        let mut n: CK_ULONG = 0;
        // SAFETY: `found` holds 4 handles.
        check(
            unsafe {
                (self.f.find_objects)(h, found.as_mut_ptr(), found.len() as CK_ULONG, &mut n)
            },
            "C_FindObjects",
        );
        // SAFETY: no pointers.
        check(
            unsafe { (self.f.find_objects_final)(h) },
            "C_FindObjectsFinal",
        );
        if n != 1 {
            die(format_args!(
                "expected one object of class {class} labelled {label:?}, found {n}"
            ));
        }
        found[0]
    }
}
