//! The C boundary: the function lists and interfaces of the module.
//!
//! `exports` defines every `C_*` function (exported by name too, so that a
//! program linked with `-lp11shim` works without dlopen); `mem` is the only
//! code that touches the application's memory; `guard` turns panics and
//! errors into return codes.

pub mod exports;
pub mod guard;
pub mod library;
pub mod mem;

use pkcs11_sys::*;

/// The 2.40 function list returned by `C_GetFunctionList`.
pub static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION {
        major: 2,
        minor: 40,
    },
    C_Initialize: Some(exports::C_Initialize),
    C_Finalize: Some(exports::C_Finalize),
    C_GetInfo: Some(exports::get_info_v2),
    C_GetFunctionList: Some(exports::C_GetFunctionList),
    C_GetSlotList: Some(exports::C_GetSlotList),
    C_GetSlotInfo: Some(exports::C_GetSlotInfo),
    C_GetTokenInfo: Some(exports::C_GetTokenInfo),
    C_GetMechanismList: Some(exports::C_GetMechanismList),
    C_GetMechanismInfo: Some(exports::C_GetMechanismInfo),
    C_InitToken: Some(exports::C_InitToken),
    C_InitPIN: Some(exports::C_InitPIN),
    C_SetPIN: Some(exports::C_SetPIN),
    C_OpenSession: Some(exports::C_OpenSession),
    C_CloseSession: Some(exports::C_CloseSession),
    C_CloseAllSessions: Some(exports::C_CloseAllSessions),
    C_GetSessionInfo: Some(exports::C_GetSessionInfo),
    C_GetOperationState: Some(exports::C_GetOperationState),
    C_SetOperationState: Some(exports::C_SetOperationState),
    C_Login: Some(exports::C_Login),
    C_Logout: Some(exports::C_Logout),
    C_CreateObject: Some(exports::C_CreateObject),
    C_CopyObject: Some(exports::C_CopyObject),
    C_DestroyObject: Some(exports::C_DestroyObject),
    C_GetObjectSize: Some(exports::C_GetObjectSize),
    C_GetAttributeValue: Some(exports::C_GetAttributeValue),
    C_SetAttributeValue: Some(exports::C_SetAttributeValue),
    C_FindObjectsInit: Some(exports::C_FindObjectsInit),
    C_FindObjects: Some(exports::C_FindObjects),
    C_FindObjectsFinal: Some(exports::C_FindObjectsFinal),
    C_EncryptInit: Some(exports::C_EncryptInit),
    C_Encrypt: Some(exports::C_Encrypt),
    C_EncryptUpdate: Some(exports::C_EncryptUpdate),
    C_EncryptFinal: Some(exports::C_EncryptFinal),
    C_DecryptInit: Some(exports::C_DecryptInit),
    C_Decrypt: Some(exports::C_Decrypt),
    C_DecryptUpdate: Some(exports::C_DecryptUpdate),
    C_DecryptFinal: Some(exports::C_DecryptFinal),
    C_DigestInit: Some(exports::C_DigestInit),
    C_Digest: Some(exports::C_Digest),
    C_DigestUpdate: Some(exports::C_DigestUpdate),
    C_DigestKey: Some(exports::C_DigestKey),
    C_DigestFinal: Some(exports::C_DigestFinal),
    C_SignInit: Some(exports::C_SignInit),
    C_Sign: Some(exports::C_Sign),
    C_SignUpdate: Some(exports::C_SignUpdate),
    C_SignFinal: Some(exports::C_SignFinal),
    C_SignRecoverInit: Some(exports::C_SignRecoverInit),
    C_SignRecover: Some(exports::C_SignRecover),
    C_VerifyInit: Some(exports::C_VerifyInit),
    C_Verify: Some(exports::C_Verify),
    C_VerifyUpdate: Some(exports::C_VerifyUpdate),
    C_VerifyFinal: Some(exports::C_VerifyFinal),
    C_VerifyRecoverInit: Some(exports::C_VerifyRecoverInit),
    C_VerifyRecover: Some(exports::C_VerifyRecover),
    C_DigestEncryptUpdate: Some(exports::C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(exports::C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(exports::C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(exports::C_DecryptVerifyUpdate),
    C_GenerateKey: Some(exports::C_GenerateKey),
    C_GenerateKeyPair: Some(exports::C_GenerateKeyPair),
    C_WrapKey: Some(exports::C_WrapKey),
    C_UnwrapKey: Some(exports::C_UnwrapKey),
    C_DeriveKey: Some(exports::C_DeriveKey),
    C_SeedRandom: Some(exports::C_SeedRandom),
    C_GenerateRandom: Some(exports::C_GenerateRandom),
    C_GetFunctionStatus: Some(exports::C_GetFunctionStatus),
    C_CancelFunction: Some(exports::C_CancelFunction),
    C_WaitForSlotEvent: Some(exports::C_WaitForSlotEvent),
};

/// The 3.0 function list offered by `C_GetInterface`.
pub static FUNCTION_LIST_3_0: CK_FUNCTION_LIST_3_0 = CK_FUNCTION_LIST_3_0 {
    version: CK_VERSION { major: 3, minor: 0 },
    C_Initialize: Some(exports::C_Initialize),
    C_Finalize: Some(exports::C_Finalize),
    C_GetInfo: Some(exports::C_GetInfo),
    C_GetFunctionList: Some(exports::C_GetFunctionList),
    C_GetSlotList: Some(exports::C_GetSlotList),
    C_GetSlotInfo: Some(exports::C_GetSlotInfo),
    C_GetTokenInfo: Some(exports::C_GetTokenInfo),
    C_GetMechanismList: Some(exports::C_GetMechanismList),
    C_GetMechanismInfo: Some(exports::C_GetMechanismInfo),
    C_InitToken: Some(exports::C_InitToken),
    C_InitPIN: Some(exports::C_InitPIN),
    C_SetPIN: Some(exports::C_SetPIN),
    C_OpenSession: Some(exports::C_OpenSession),
    C_CloseSession: Some(exports::C_CloseSession),
    C_CloseAllSessions: Some(exports::C_CloseAllSessions),
    C_GetSessionInfo: Some(exports::C_GetSessionInfo),
    C_GetOperationState: Some(exports::C_GetOperationState),
    C_SetOperationState: Some(exports::C_SetOperationState),
    C_Login: Some(exports::C_Login),
    C_Logout: Some(exports::C_Logout),
    C_CreateObject: Some(exports::C_CreateObject),
    C_CopyObject: Some(exports::C_CopyObject),
    C_DestroyObject: Some(exports::C_DestroyObject),
    C_GetObjectSize: Some(exports::C_GetObjectSize),
    C_GetAttributeValue: Some(exports::C_GetAttributeValue),
    C_SetAttributeValue: Some(exports::C_SetAttributeValue),
    C_FindObjectsInit: Some(exports::C_FindObjectsInit),
    C_FindObjects: Some(exports::C_FindObjects),
    C_FindObjectsFinal: Some(exports::C_FindObjectsFinal),
    C_EncryptInit: Some(exports::C_EncryptInit),
    C_Encrypt: Some(exports::C_Encrypt),
    C_EncryptUpdate: Some(exports::C_EncryptUpdate),
    C_EncryptFinal: Some(exports::C_EncryptFinal),
    C_DecryptInit: Some(exports::C_DecryptInit),
    C_Decrypt: Some(exports::C_Decrypt),
    C_DecryptUpdate: Some(exports::C_DecryptUpdate),
    C_DecryptFinal: Some(exports::C_DecryptFinal),
    C_DigestInit: Some(exports::C_DigestInit),
    C_Digest: Some(exports::C_Digest),
    C_DigestUpdate: Some(exports::C_DigestUpdate),
    C_DigestKey: Some(exports::C_DigestKey),
    C_DigestFinal: Some(exports::C_DigestFinal),
    C_SignInit: Some(exports::C_SignInit),
    C_Sign: Some(exports::C_Sign),
    C_SignUpdate: Some(exports::C_SignUpdate),
    C_SignFinal: Some(exports::C_SignFinal),
    C_SignRecoverInit: Some(exports::C_SignRecoverInit),
    C_SignRecover: Some(exports::C_SignRecover),
    C_VerifyInit: Some(exports::C_VerifyInit),
    C_Verify: Some(exports::C_Verify),
    C_VerifyUpdate: Some(exports::C_VerifyUpdate),
    C_VerifyFinal: Some(exports::C_VerifyFinal),
    C_VerifyRecoverInit: Some(exports::C_VerifyRecoverInit),
    C_VerifyRecover: Some(exports::C_VerifyRecover),
    C_DigestEncryptUpdate: Some(exports::C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(exports::C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(exports::C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(exports::C_DecryptVerifyUpdate),
    C_GenerateKey: Some(exports::C_GenerateKey),
    C_GenerateKeyPair: Some(exports::C_GenerateKeyPair),
    C_WrapKey: Some(exports::C_WrapKey),
    C_UnwrapKey: Some(exports::C_UnwrapKey),
    C_DeriveKey: Some(exports::C_DeriveKey),
    C_SeedRandom: Some(exports::C_SeedRandom),
    C_GenerateRandom: Some(exports::C_GenerateRandom),
    C_GetFunctionStatus: Some(exports::C_GetFunctionStatus),
    C_CancelFunction: Some(exports::C_CancelFunction),
    C_WaitForSlotEvent: Some(exports::C_WaitForSlotEvent),
    C_GetInterfaceList: Some(exports::C_GetInterfaceList),
    C_GetInterface: Some(exports::C_GetInterface),
    C_LoginUser: Some(exports::C_LoginUser),
    C_SessionCancel: Some(exports::C_SessionCancel),
    C_MessageEncryptInit: Some(exports::C_MessageEncryptInit),
    C_EncryptMessage: Some(exports::C_EncryptMessage),
    C_EncryptMessageBegin: Some(exports::C_EncryptMessageBegin),
    C_EncryptMessageNext: Some(exports::C_EncryptMessageNext),
    C_MessageEncryptFinal: Some(exports::C_MessageEncryptFinal),
    C_MessageDecryptInit: Some(exports::C_MessageDecryptInit),
    C_DecryptMessage: Some(exports::C_DecryptMessage),
    C_DecryptMessageBegin: Some(exports::C_DecryptMessageBegin),
    C_DecryptMessageNext: Some(exports::C_DecryptMessageNext),
    C_MessageDecryptFinal: Some(exports::C_MessageDecryptFinal),
    C_MessageSignInit: Some(exports::C_MessageSignInit),
    C_SignMessage: Some(exports::C_SignMessage),
    C_SignMessageBegin: Some(exports::C_SignMessageBegin),
    C_SignMessageNext: Some(exports::C_SignMessageNext),
    C_MessageSignFinal: Some(exports::C_MessageSignFinal),
    C_MessageVerifyInit: Some(exports::C_MessageVerifyInit),
    C_VerifyMessage: Some(exports::C_VerifyMessage),
    C_VerifyMessageBegin: Some(exports::C_VerifyMessageBegin),
    C_VerifyMessageNext: Some(exports::C_VerifyMessageNext),
    C_MessageVerifyFinal: Some(exports::C_MessageVerifyFinal),
};

/// The standard interface name, NUL-terminated.
pub const INTERFACE_NAME: &[u8] = b"PKCS 11\0";

/// A `CK_INTERFACE` that may live in a `static`.
#[derive(Debug, Clone, Copy)]
pub struct Interface(pub CK_INTERFACE);

// SAFETY: the pointers in it point to immutable statics.
unsafe impl Sync for Interface {}

/// The name of p11shim's own interface, NUL-terminated.
pub const P11SHIM_INTERFACE_NAME: &[u8] = b"p11shim\0";

/// p11shim's own interface (`P11SHIM_FUNCTION_LIST` in `include/p11shim.h`).
#[repr(C)]
#[derive(Debug)]
pub struct P11shimFunctionList {
    pub version: CK_VERSION,
    /// Writes the status of every virtual slot and member as JSON (UTF-8,
    /// not NUL-terminated), with the two-call buffer convention.
    pub get_status: unsafe extern "C" fn(CK_UTF8CHAR_PTR, CK_ULONG_PTR) -> CK_RV,
}

/// The function list of p11shim's own interface.
pub static P11SHIM_FUNCTION_LIST: P11shimFunctionList = P11shimFunctionList {
    version: CK_VERSION { major: 1, minor: 0 },
    get_status: exports::p11shim_get_status,
};

/// The interfaces of `C_GetInterfaceList`, the default one first.
pub static INTERFACES: [Interface; 3] = [
    Interface(CK_INTERFACE {
        pInterfaceName: INTERFACE_NAME.as_ptr().cast_mut(),
        pFunctionList: (&raw const FUNCTION_LIST_3_0).cast_mut().cast(),
        flags: 0,
    }),
    Interface(CK_INTERFACE {
        pInterfaceName: INTERFACE_NAME.as_ptr().cast_mut(),
        pFunctionList: (&raw const FUNCTION_LIST).cast_mut().cast(),
        flags: 0,
    }),
    Interface(CK_INTERFACE {
        pInterfaceName: P11SHIM_INTERFACE_NAME.as_ptr().cast_mut(),
        pFunctionList: (&raw const P11SHIM_FUNCTION_LIST).cast_mut().cast(),
        flags: 0,
    }),
];

/// Registers a handler run in the child after `fork()`. The handler must be
/// async-signal-safe; p11shim's only bumps a counter. It is unregistered
/// by the C library when this module is unloaded.
/// Registers a handler run by `exit()` (the module is never unmapped: it is
/// linked with `-z nodelete`).
pub fn on_exit(handler: extern "C" fn()) -> Result<(), i32> {
    // SAFETY: atexit only stores the function pointer.
    let rc = unsafe { libc::atexit(handler) };
    if rc == 0 { Ok(()) } else { Err(rc) }
}

pub fn on_fork_in_child(handler: extern "C" fn()) -> Result<(), i32> {
    // SAFETY: pthread_atfork only stores the function pointer.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(handler)) };
    if rc == 0 { Ok(()) } else { Err(rc) }
}
