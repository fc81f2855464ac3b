//! Direct calls into the module under test, for what the `cryptoki` crate
//! does not offer or hides: `C_CloseAllSessions`, the operation state and
//! dual-function calls, session flags, `C_GetObjectSize`, and the exact
//! return codes and lengths of `C_GetAttributeValue`, `C_Sign` and
//! `C_FindObjects` with the buffers a test chooses.
//!
//! The function list comes from the same library file the scenario's
//! [`cryptoki::context::Pkcs11`] loaded, so both reach one initialized
//! module; every handle passed here is one that `cryptoki` returned.

use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::OnceLock;

use cryptoki::context::Function;
use cryptoki::error::{Result, Rv};
use pkcs11_sys::*;

/// The module's function list, loaded once per process.
#[derive(Debug)]
pub struct Raw {
    path: PathBuf,
    list: CK_FUNCTION_LIST,
    _lib: libloading::Library,
}

static RAW: OnceLock<Raw> = OnceLock::new();

/// Loads `module`'s function list for [`raw`]; a process tests one module.
pub fn load(module: &Path) -> &'static Raw {
    let raw = RAW.get_or_init(|| {
        // SAFETY: loading a PKCS#11 module runs no code of ours; its
        // initializers are those any application of it runs.
        let lib = unsafe { libloading::Library::new(module) }
            .unwrap_or_else(|e| panic!("load {}: {e}", module.display()));
        // SAFETY: C_GetFunctionList has this signature in every PKCS#11 module.
        let get: libloading::Symbol<unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV> =
            unsafe { lib.get(b"C_GetFunctionList\0") }.expect("C_GetFunctionList");
        let mut list: CK_FUNCTION_LIST_PTR = ptr::null_mut();
        // SAFETY: the out pointer is valid; the list returned stays valid
        // while the library is loaded, and is copied at once.
        let rv = unsafe { get(&mut list) };
        assert!(
            rv == CKR_OK && !list.is_null(),
            "C_GetFunctionList: {rv:#x}"
        );
        // SAFETY: non-NULL and valid, as just checked.
        let list = unsafe { *list };
        Raw {
            path: module.to_path_buf(),
            list,
            _lib: lib,
        }
    });
    assert_eq!(raw.path, module, "one module per process");
    raw
}

/// The function list loaded by [`load`].
pub fn raw() -> &'static Raw {
    RAW.get()
        .expect("the scenario runner loads the module before a scenario runs")
}

/// A function of the list, by name; calling it is the caller's `unsafe`.
macro_rules! f {
    ($self:ident . $name:ident) => {
        $self.list.$name.expect(stringify!($name))
    };
}

fn result(rv: CK_RV, function: Function) -> Result<()> {
    Rv::from(rv).into_result(function)
}

/// A template of attribute types and values, as the C API takes it.
fn template(attrs: &mut [(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Vec<CK_ATTRIBUTE> {
    attrs
        .iter_mut()
        .map(|(t, v)| CK_ATTRIBUTE {
            type_: *t,
            pValue: v.as_mut_ptr().cast(),
            ulValueLen: v.len() as CK_ULONG,
        })
        .collect()
}

/// One attribute as `C_GetAttributeValue` left it: the length it reported
/// (`CK_UNAVAILABLE_INFORMATION` included) and the bytes it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrOut {
    pub len: CK_ULONG,
    pub value: Vec<u8>,
}

impl AttrOut {
    /// `len N value HEX`, or `unavailable`.
    pub fn show(&self) -> String {
        if self.len == CK_UNAVAILABLE_INFORMATION {
            "unavailable".into()
        } else {
            format!("len {} value {}", self.len, super::hex(&self.value))
        }
    }
}

/// The dual-function calls (PKCS#11 5.13).
#[derive(Debug, Clone, Copy)]
pub enum Dual {
    DigestEncrypt,
    DecryptDigest,
    SignEncrypt,
    DecryptVerify,
}

impl Raw {
    pub fn close_all_sessions(&self, slot: CK_SLOT_ID) -> Result<()> {
        // SAFETY: plain arguments.
        result(
            unsafe { f!(self.C_CloseAllSessions)(slot) },
            Function::CloseAllSessions,
        )
    }

    /// `C_OpenSession` with the flags given, no callback.
    pub fn open_session(&self, slot: CK_SLOT_ID, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE> {
        let mut h = CK_INVALID_HANDLE;
        // SAFETY: the out pointer is valid for the call.
        let rv = unsafe { f!(self.C_OpenSession)(slot, flags, ptr::null_mut(), None, &mut h) };
        result(rv, Function::OpenSession).map(|()| h)
    }

    pub fn close_session(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        // SAFETY: plain arguments.
        result(
            unsafe { f!(self.C_CloseSession)(h) },
            Function::CloseSession,
        )
    }

    /// `C_GetOperationState`: the length query, then the state.
    pub fn get_operation_state(&self, h: CK_SESSION_HANDLE) -> Result<Vec<u8>> {
        let mut len: CK_ULONG = 0;
        // SAFETY: a NULL buffer asks for the length; the length pointer is valid.
        let rv = unsafe { f!(self.C_GetOperationState)(h, ptr::null_mut(), &mut len) };
        result(rv, Function::GetOperationState)?;
        let mut state = vec![0u8; len as usize];
        // SAFETY: the buffer holds `len` bytes.
        let rv = unsafe { f!(self.C_GetOperationState)(h, state.as_mut_ptr(), &mut len) };
        result(rv, Function::GetOperationState)?;
        state.truncate(len as usize);
        Ok(state)
    }

    pub fn set_operation_state(
        &self,
        h: CK_SESSION_HANDLE,
        state: &[u8],
        enc: CK_OBJECT_HANDLE,
        auth: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        let mut state = state.to_vec();
        // SAFETY: the buffer holds the length given.
        let rv = unsafe {
            f!(self.C_SetOperationState)(h, state.as_mut_ptr(), state.len() as CK_ULONG, enc, auth)
        };
        result(rv, Function::SetOperationState)
    }

    /// A dual-function update with a 1 KiB output buffer.
    pub fn dual(&self, which: Dual, h: CK_SESSION_HANDLE, data: &[u8]) -> Result<Vec<u8>> {
        let (func, function) = match which {
            Dual::DigestEncrypt => (
                f!(self.C_DigestEncryptUpdate),
                Function::DigestEncryptUpdate,
            ),
            Dual::DecryptDigest => (
                f!(self.C_DecryptDigestUpdate),
                Function::DecryptDigestUpdate,
            ),
            Dual::SignEncrypt => (f!(self.C_SignEncryptUpdate), Function::SignEncryptUpdate),
            Dual::DecryptVerify => (
                f!(self.C_DecryptVerifyUpdate),
                Function::DecryptVerifyUpdate,
            ),
        };
        let mut input = data.to_vec();
        let mut out = vec![0u8; 1024];
        let mut len = out.len() as CK_ULONG;
        // SAFETY: both buffers hold the lengths given.
        let rv = unsafe {
            func(
                h,
                input.as_mut_ptr(),
                input.len() as CK_ULONG,
                out.as_mut_ptr(),
                &mut len,
            )
        };
        result(rv, function)?;
        out.truncate(len as usize);
        Ok(out)
    }

    /// `C_GetAttributeValue` with one buffer of the given capacity per
    /// attribute (`None`: a NULL buffer, the length query). Returns the
    /// call's result and every attribute as the module left it.
    pub fn get_attributes(
        &self,
        h: CK_SESSION_HANDLE,
        o: CK_OBJECT_HANDLE,
        query: &[(CK_ATTRIBUTE_TYPE, Option<usize>)],
    ) -> (Result<()>, Vec<AttrOut>) {
        let mut bufs: Vec<Option<Vec<u8>>> = query
            .iter()
            .map(|(_, cap)| cap.map(|n| vec![0u8; n]))
            .collect();
        let mut t: Vec<CK_ATTRIBUTE> = query
            .iter()
            .zip(bufs.iter_mut())
            .map(|((ty, _), buf)| match buf {
                Some(b) => CK_ATTRIBUTE {
                    type_: *ty,
                    pValue: b.as_mut_ptr().cast(),
                    ulValueLen: b.len() as CK_ULONG,
                },
                None => CK_ATTRIBUTE {
                    type_: *ty,
                    pValue: ptr::null_mut(),
                    ulValueLen: 0,
                },
            })
            .collect();
        // SAFETY: every non-NULL pValue points to a buffer of ulValueLen bytes.
        let rv = unsafe { f!(self.C_GetAttributeValue)(h, o, t.as_mut_ptr(), t.len() as CK_ULONG) };
        let out = t
            .iter()
            .zip(bufs)
            .map(|(a, buf)| {
                let value = match buf {
                    Some(mut b) if a.ulValueLen != CK_UNAVAILABLE_INFORMATION => {
                        b.truncate(a.ulValueLen as usize);
                        b
                    }
                    _ => Vec::new(),
                };
                AttrOut {
                    len: a.ulValueLen,
                    value,
                }
            })
            .collect();
        (result(rv, Function::GetAttributeValue), out)
    }

    /// One attribute's value: the length query, then the value.
    pub fn attribute(
        &self,
        h: CK_SESSION_HANDLE,
        o: CK_OBJECT_HANDLE,
        ty: CK_ATTRIBUTE_TYPE,
    ) -> Result<Vec<u8>> {
        let (r, out) = self.get_attributes(h, o, &[(ty, None)]);
        r?;
        let (r, mut out) = self.get_attributes(h, o, &[(ty, Some(out[0].len as usize))]);
        r?;
        Ok(out.remove(0).value)
    }

    /// `C_Sign` of an initialized operation into a buffer of the given
    /// capacity (`None`: the length query). Returns the call's result, the
    /// length the module reported and the bytes it wrote.
    pub fn sign(
        &self,
        h: CK_SESSION_HANDLE,
        data: &[u8],
        capacity: Option<usize>,
    ) -> (Result<()>, CK_ULONG, Vec<u8>) {
        let mut input = data.to_vec();
        let mut out = vec![0u8; capacity.unwrap_or(0)];
        let mut len = out.len() as CK_ULONG;
        let p = if capacity.is_some() {
            out.as_mut_ptr()
        } else {
            ptr::null_mut()
        };
        // SAFETY: the input holds its length; a non-NULL output holds `len` bytes.
        let rv =
            unsafe { f!(self.C_Sign)(h, input.as_mut_ptr(), input.len() as CK_ULONG, p, &mut len) };
        let written = if rv == CKR_OK {
            out[..(len as usize).min(out.len())].to_vec()
        } else {
            Vec::new()
        };
        (result(rv, Function::Sign), len, written)
    }

    pub fn find_init(
        &self,
        h: CK_SESSION_HANDLE,
        attrs: &[(CK_ATTRIBUTE_TYPE, &[u8])],
    ) -> Result<()> {
        let mut owned: Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> =
            attrs.iter().map(|(t, v)| (*t, v.to_vec())).collect();
        let mut t = template(&mut owned);
        // SAFETY: the template points into `owned`, alive for the call.
        let rv = unsafe { f!(self.C_FindObjectsInit)(h, t.as_mut_ptr(), t.len() as CK_ULONG) };
        result(rv, Function::FindObjectsInit)
    }

    /// One `C_FindObjects` call of at most `max` handles (a NULL array
    /// when `max` is 0).
    pub fn find(&self, h: CK_SESSION_HANDLE, max: usize) -> Result<Vec<CK_OBJECT_HANDLE>> {
        let mut found = vec![CK_INVALID_HANDLE; max];
        let mut n: CK_ULONG = 0;
        let p = if max == 0 {
            ptr::null_mut()
        } else {
            found.as_mut_ptr()
        };
        // SAFETY: the array is NULL or holds `max` handles.
        let rv = unsafe { f!(self.C_FindObjects)(h, p, max as CK_ULONG, &mut n) };
        result(rv, Function::FindObjects)?;
        found.truncate(n as usize);
        Ok(found)
    }

    pub fn find_final(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        // SAFETY: plain arguments.
        result(
            unsafe { f!(self.C_FindObjectsFinal)(h) },
            Function::FindObjectsFinal,
        )
    }

    pub fn object_size(&self, h: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE) -> Result<CK_ULONG> {
        let mut size: CK_ULONG = 0;
        // SAFETY: the out pointer is valid.
        let rv = unsafe { f!(self.C_GetObjectSize)(h, o, &mut size) };
        result(rv, Function::GetObjectSize).map(|()| size)
    }
}
