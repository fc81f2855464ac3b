//! Every read and write of the application's memory.
//!
//! The C boundary turns raw pointers into these views once, checking what
//! the spec requires (a NULL pointer where one is forbidden is
//! `CKR_ARGUMENTS_BAD`; `(NULL, 0)` is an empty buffer; a NULL output buffer
//! is the size query of the two-call convention). The rest of the module
//! works with the views, and the vendor wrapper hands their pointers on to
//! the vendor library unchanged.

use std::ffi::{CStr, c_char, c_void};
use std::fmt;
use std::marker::PhantomData;

use pkcs11_sys::*;

use crate::error::{Error, Result};

/// An input byte buffer of the application (data, a PIN, a seed...).
#[derive(Clone, Copy)]
pub struct Bytes<'a> {
    ptr: CK_BYTE_PTR,
    len: CK_ULONG,
    _life: PhantomData<&'a [u8]>,
}

impl fmt::Debug for Bytes<'_> {
    // Contents are never printed: they may be a PIN or data to be signed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.len)
    }
}

impl<'a> Bytes<'a> {
    /// # Safety
    /// `ptr` is NULL or points to `len` readable bytes that stay valid for `'a`.
    #[inline]
    pub unsafe fn new(ptr: CK_BYTE_PTR, len: CK_ULONG) -> Result<Self> {
        if ptr.is_null() && len != 0 {
            return Err(Error::ArgumentsBad("NULL buffer with a non-zero length"));
        }
        Ok(Bytes {
            ptr,
            len,
            _life: PhantomData,
        })
    }

    /// A view of memory owned by the module.
    pub fn from_slice(s: &'a [u8]) -> Self {
        Bytes {
            ptr: s.as_ptr().cast_mut(),
            len: s.len() as CK_ULONG,
            _life: PhantomData,
        }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the application passed NULL.
    #[inline]
    pub fn is_null(&self) -> bool {
        self.ptr.is_null()
    }

    pub fn as_slice(&self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: `new` was given a pointer to `len` readable bytes valid for 'a,
        // or `from_slice` a live slice.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len as usize) }
    }

    #[inline]
    pub(crate) fn raw(&self) -> (CK_BYTE_PTR, CK_ULONG) {
        (self.ptr, self.len)
    }
}

/// An output buffer of fixed size (`C_GenerateRandom`), written by the vendor.
#[derive(Debug)]
pub struct BytesMut<'a> {
    ptr: CK_BYTE_PTR,
    len: CK_ULONG,
    _life: PhantomData<&'a mut [u8]>,
}

impl<'a> BytesMut<'a> {
    /// # Safety
    /// `ptr` is NULL or points to `len` writable bytes valid for the call.
    #[inline]
    pub unsafe fn new(ptr: CK_BYTE_PTR, len: CK_ULONG) -> Result<Self> {
        if ptr.is_null() && len != 0 {
            return Err(Error::ArgumentsBad("NULL buffer with a non-zero length"));
        }
        Ok(BytesMut {
            ptr,
            len,
            _life: PhantomData,
        })
    }

    #[inline]
    pub(crate) fn raw(&mut self) -> (CK_BYTE_PTR, CK_ULONG) {
        (self.ptr, self.len)
    }

    /// A buffer owned by the module.
    pub fn from_local(buf: &'a mut [u8]) -> Self {
        BytesMut {
            ptr: buf.as_mut_ptr(),
            len: buf.len() as CK_ULONG,
            _life: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies bytes into the buffer (at most its length).
    pub fn fill(&mut self, data: &[u8]) {
        let n = data.len().min(self.len as usize);
        if n > 0 {
            // SAFETY: `ptr` holds `len` writable bytes (non-NULL when len > 0).
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr, n) };
        }
    }

    /// The same buffer, for one more call (a retry on another member).
    #[inline]
    pub fn reborrow(&mut self) -> BytesMut<'_> {
        BytesMut {
            ptr: self.ptr,
            len: self.len,
            _life: PhantomData,
        }
    }
}

/// A PIN given by the application or read from a configured source.
pub type Pin<'a> = Bytes<'a>;

/// An opaque parameter block (message-based functions), passed on unchanged.
#[derive(Debug, Clone, Copy)]
pub struct Param<'a> {
    ptr: CK_VOID_PTR,
    len: CK_ULONG,
    _life: PhantomData<&'a mut [u8]>,
}

impl Param<'_> {
    /// # Safety
    /// `ptr` is NULL or points to `len` bytes valid for the call.
    #[inline]
    pub unsafe fn new(ptr: CK_VOID_PTR, len: CK_ULONG) -> Result<Self> {
        if ptr.is_null() && len != 0 {
            return Err(Error::ArgumentsBad("NULL parameter with a non-zero length"));
        }
        Ok(Param {
            ptr,
            len,
            _life: PhantomData,
        })
    }

    #[inline]
    pub(crate) fn raw(&self) -> (CK_VOID_PTR, CK_ULONG) {
        (self.ptr, self.len)
    }
}

/// An output byte buffer with its length: the two-call convention.
#[derive(Debug)]
pub struct OutBytes<'a> {
    ptr: CK_BYTE_PTR,
    len: CK_ULONG_PTR,
    /// The room the application gave, read when the view was made.
    room: usize,
    _life: PhantomData<&'a mut [u8]>,
}

impl<'a> OutBytes<'a> {
    /// # Safety
    /// `len` is NULL or points to a writable `CK_ULONG`; `ptr` is NULL or
    /// points to `*len` writable bytes; both stay valid for the call.
    #[inline]
    pub unsafe fn new(ptr: CK_BYTE_PTR, len: CK_ULONG_PTR) -> Result<Self> {
        if len.is_null() {
            return Err(Error::ArgumentsBad("NULL output length"));
        }
        let room = if ptr.is_null() {
            0
        } else {
            // SAFETY: `len` is non-NULL and readable for the call.
            (unsafe { len.read_unaligned() }) as usize
        };
        Ok(OutBytes {
            ptr,
            len,
            room,
            _life: PhantomData,
        })
    }

    /// A size query over the module's own length.
    pub fn new_len(len: &'a mut CK_ULONG) -> Self {
        OutBytes {
            ptr: std::ptr::null_mut(),
            len,
            room: 0,
            _life: PhantomData,
        }
    }

    /// An output over the module's own buffer.
    pub fn from_local(buf: &'a mut [u8], len: &'a mut CK_ULONG) -> Self {
        *len = buf.len() as CK_ULONG;
        OutBytes {
            ptr: buf.as_mut_ptr(),
            len,
            room: buf.len(),
            _life: PhantomData,
        }
    }

    /// The room the application gave (0 for a size query).
    pub fn capacity(&self) -> usize {
        self.room
    }

    /// Sets the length the application reads back.
    pub fn set_len(&mut self, n: CK_ULONG) {
        if !self.len.is_null() {
            // SAFETY: `len` is non-NULL and writable for the call.
            unsafe { self.len.write_unaligned(n) };
        }
    }

    /// Copies a result into the application's buffer (at most its room).
    pub fn fill(&mut self, data: &[u8]) {
        let n = data.len().min(self.room);
        if n > 0 {
            // SAFETY: the application gave `room` writable bytes at `ptr`
            // (non-NULL when room > 0), and n does not exceed it.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr, n) };
        }
    }

    /// The same output, for one more call (a retry on another member).
    #[inline]
    pub fn reborrow(&mut self) -> OutBytes<'_> {
        OutBytes {
            ptr: self.ptr,
            len: self.len,
            room: self.room,
            _life: PhantomData,
        }
    }

    /// Whether the application only asks for the size (NULL buffer).
    #[inline]
    pub fn is_size_query(&self) -> bool {
        self.ptr.is_null()
    }

    /// An output whose length pointer may be NULL (`C_SignMessageNext` on a
    /// non-final part).
    ///
    /// # Safety
    /// As for [`OutBytes::new`], `len` may also be NULL.
    #[inline]
    pub unsafe fn new_optional(ptr: CK_BYTE_PTR, len: CK_ULONG_PTR) -> Self {
        let room = if ptr.is_null() || len.is_null() {
            0
        } else {
            // SAFETY: a non-NULL `len` is readable for the call.
            (unsafe { len.read_unaligned() }) as usize
        };
        OutBytes {
            ptr,
            len,
            room,
            _life: PhantomData,
        }
    }

    #[inline]
    pub(crate) fn raw(&mut self) -> (CK_BYTE_PTR, CK_ULONG_PTR) {
        (self.ptr, self.len)
    }
}

/// A single output value (a handle, an info structure).
#[derive(Debug)]
pub struct Out<'a, T> {
    ptr: *mut T,
    _life: PhantomData<&'a mut T>,
}

impl<'a, T> Out<'a, T> {
    /// # Safety
    /// `ptr` is NULL or points to a writable `T` valid for the call.
    #[inline]
    pub unsafe fn new(ptr: *mut T) -> Result<Self> {
        if ptr.is_null() {
            return Err(Error::ArgumentsBad("NULL output pointer"));
        }
        Ok(Out {
            ptr,
            _life: PhantomData,
        })
    }

    #[inline]
    pub fn write(&mut self, value: T) {
        // SAFETY: `new` checked non-NULL; the caller promised it is writable.
        unsafe { self.ptr.write_unaligned(value) }
    }

    #[inline]
    pub(crate) fn raw(&mut self) -> *mut T {
        self.ptr
    }

    /// An output into the module's own memory.
    pub fn from_local(value: &'a mut T) -> Self {
        Out {
            ptr: value,
            _life: PhantomData,
        }
    }

    /// The same output, for one more call (a retry on another member).
    #[inline]
    pub fn reborrow(&mut self) -> Out<'_, T> {
        Out {
            ptr: self.ptr,
            _life: PhantomData,
        }
    }
}

/// An output array with its count: the two-call convention
/// (slot lists, mechanism lists, interface lists).
#[derive(Debug)]
pub struct OutList<'a, T> {
    ptr: *mut T,
    count: CK_ULONG_PTR,
    _life: PhantomData<&'a mut [T]>,
}

impl<'a, T: Copy> OutList<'a, T> {
    /// # Safety
    /// `count` is NULL or writable; `ptr` is NULL or points to `*count`
    /// writable elements.
    #[inline]
    pub unsafe fn new(ptr: *mut T, count: CK_ULONG_PTR) -> Result<Self> {
        if count.is_null() {
            return Err(Error::ArgumentsBad("NULL count pointer"));
        }
        Ok(OutList {
            ptr,
            count,
            _life: PhantomData,
        })
    }

    /// Writes `items`, or only their number when the application asked for
    /// the size (NULL array), or `CKR_BUFFER_TOO_SMALL` with the needed count.
    pub fn write(&mut self, items: &[T]) -> Result<()> {
        // SAFETY: `count` was checked non-NULL and is writable for the call.
        let room = unsafe { self.count.read_unaligned() } as usize;
        // SAFETY: as above.
        unsafe { self.count.write_unaligned(items.len() as CK_ULONG) };
        if self.ptr.is_null() {
            return Ok(());
        }
        if room < items.len() {
            return Err(Error::BufferTooSmall);
        }
        for (i, item) in items.iter().enumerate() {
            // SAFETY: the application promised `room` writable elements, and i < room.
            unsafe { self.ptr.add(i).write_unaligned(*item) };
        }
        Ok(())
    }

    /// The same output, for one more call (a retry on another member).
    #[inline]
    pub fn reborrow(&mut self) -> OutList<'_, T> {
        OutList {
            ptr: self.ptr,
            count: self.count,
            _life: PhantomData,
        }
    }

    /// A list over the module's own memory: `buf` of `None` asks for the size.
    pub fn from_local(buf: Option<&'a mut [T]>, count: &'a mut CK_ULONG) -> Self {
        let ptr = match buf {
            Some(b) => {
                *count = b.len() as CK_ULONG;
                b.as_mut_ptr()
            }
            None => std::ptr::null_mut(),
        };
        OutList {
            ptr,
            count,
            _life: PhantomData,
        }
    }

    #[inline]
    pub(crate) fn raw(&mut self) -> (*mut T, CK_ULONG_PTR) {
        (self.ptr, self.count)
    }
}

/// The output of `C_FindObjects`: room for `max` handles, and the count found.
#[derive(Debug)]
pub struct OutHandles<'a> {
    ptr: CK_OBJECT_HANDLE_PTR,
    max: CK_ULONG,
    count: CK_ULONG_PTR,
    _life: PhantomData<&'a mut [CK_OBJECT_HANDLE]>,
}

impl OutHandles<'_> {
    /// # Safety
    /// `ptr` points to `max` writable handles, and `count` is writable.
    pub unsafe fn new(
        ptr: CK_OBJECT_HANDLE_PTR,
        max: CK_ULONG,
        count: CK_ULONG_PTR,
    ) -> Result<Self> {
        // A NULL array is refused even with `max == 0`, as vendors do.
        if count.is_null() || ptr.is_null() {
            return Err(Error::ArgumentsBad("NULL handle array or count"));
        }
        Ok(OutHandles {
            ptr,
            max,
            count,
            _life: PhantomData,
        })
    }

    /// The application's array, to be filled with at most `max` handles.
    pub fn as_mut_slice(&mut self) -> &mut [CK_OBJECT_HANDLE] {
        if self.ptr.is_null() || self.max == 0 {
            return &mut [];
        }
        // SAFETY: the application promised `max` writable handles at `ptr`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.max as usize) }
    }

    /// Sets the number of handles found.
    pub fn set_count(&mut self, n: CK_ULONG) {
        // SAFETY: `count` was checked non-NULL.
        unsafe { self.count.write_unaligned(n.min(self.max)) };
    }
}

/// An attribute template (read by the vendor, or filled by
/// `C_GetAttributeValue`).
#[derive(Debug, Clone, Copy)]
pub struct Template<'a> {
    ptr: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
    _life: PhantomData<&'a mut [CK_ATTRIBUTE]>,
}

impl<'a> Template<'a> {
    /// # Safety
    /// `ptr` is NULL or points to `count` attributes valid for the call,
    /// whose value pointers are NULL or valid for their lengths.
    #[inline]
    pub unsafe fn new(ptr: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> Result<Self> {
        if ptr.is_null() && count != 0 {
            return Err(Error::ArgumentsBad("NULL template with a non-zero count"));
        }
        Ok(Template {
            ptr,
            count,
            _life: PhantomData,
        })
    }

    /// A template owned by the module.
    pub fn from_slice(attrs: &'a mut [CK_ATTRIBUTE]) -> Self {
        Template {
            ptr: attrs.as_mut_ptr(),
            count: attrs.len() as CK_ULONG,
            _life: PhantomData,
        }
    }

    pub fn attrs(&self) -> &'a [CK_ATTRIBUTE] {
        if self.ptr.is_null() || self.count == 0 {
            return &[];
        }
        // SAFETY: `new` was given `count` valid attributes (or `from_slice` a live slice).
        unsafe { std::slice::from_raw_parts(self.ptr, self.count as usize) }
    }

    /// The value of a `CK_BBOOL` attribute, if the template has it.
    pub fn bool_attr(&self, ty: CK_ATTRIBUTE_TYPE) -> Option<bool> {
        let a = self.attrs().iter().find(|a| a.type_ == ty)?;
        if a.pValue.is_null() || a.ulValueLen as usize != std::mem::size_of::<CK_BBOOL>() {
            return None;
        }
        // SAFETY: pValue points to ulValueLen (= 1) readable bytes.
        Some(unsafe { (a.pValue as *const CK_BBOOL).read() } != CK_FALSE)
    }

    /// The bytes of an attribute's value, if the template has it.
    pub fn bytes_attr(&self, ty: CK_ATTRIBUTE_TYPE) -> Option<&'a [u8]> {
        let a = self.attrs().iter().find(|a| a.type_ == ty)?;
        if a.pValue.is_null() || a.ulValueLen == CK_UNAVAILABLE_INFORMATION {
            return None;
        }
        // SAFETY: pValue points to ulValueLen readable bytes.
        Some(unsafe { std::slice::from_raw_parts(a.pValue as *const u8, a.ulValueLen as usize) })
    }

    #[inline]
    pub(crate) fn raw(&self) -> (CK_ATTRIBUTE_PTR, CK_ULONG) {
        (self.ptr, self.count)
    }
}

/// A deep copy of an attribute template (for replaying a search on another
/// member). Nested attribute arrays are not copied.
#[derive(Debug, Clone)]
pub struct SavedTemplate {
    attrs: Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>,
}

impl Drop for SavedTemplate {
    // A kept template may hold key material (`CKA_VALUE` of an imported
    // key): wiped when dropped.
    fn drop(&mut self) {
        for (_, v) in &mut self.attrs {
            zeroize::Zeroize::zeroize(v);
        }
    }
}

impl SavedTemplate {
    /// Builds a template from owned values.
    pub fn from_values(attrs: Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>) -> Self {
        SavedTemplate { attrs }
    }

    /// The template with one attribute set (replaced or added).
    pub fn with(mut self, ty: CK_ATTRIBUTE_TYPE, value: Vec<u8>) -> Self {
        match self.attrs.iter_mut().find(|(t, _)| *t == ty) {
            Some((_, v)) => *v = value,
            None => self.attrs.push((ty, value)),
        }
        self
    }

    /// The template without one attribute.
    pub fn without(mut self, ty: CK_ATTRIBUTE_TYPE) -> Self {
        self.attrs.retain(|(t, _)| *t != ty);
        self
    }

    /// The attributes as `CK_ATTRIBUTE`s, valid while `self` lives.
    pub fn to_raw(&self) -> Vec<CK_ATTRIBUTE> {
        self.attrs
            .iter()
            .map(|(t, v)| CK_ATTRIBUTE {
                type_: *t,
                pValue: if v.is_empty() {
                    std::ptr::null_mut()
                } else {
                    v.as_ptr().cast_mut().cast()
                },
                ulValueLen: v.len() as CK_ULONG,
            })
            .collect()
    }
}

impl Template<'_> {
    /// A deep copy of the attribute values, or `None` when the template
    /// holds nested arrays or values that cannot be read.
    pub fn save(&self) -> Option<SavedTemplate> {
        let mut attrs = Vec::with_capacity(self.attrs().len());
        for a in self.attrs() {
            if a.type_ & CKF_ARRAY_ATTRIBUTE != 0 || a.ulValueLen == CK_UNAVAILABLE_INFORMATION {
                return None;
            }
            if a.pValue.is_null() && a.ulValueLen != 0 {
                return None;
            }
            // SAFETY: pValue points to ulValueLen readable bytes (or is NULL with 0).
            attrs.push((a.type_, unsafe {
                copy_bytes(a.pValue as *const u8, a.ulValueLen)
            }));
        }
        Some(SavedTemplate { attrs })
    }
}

/// A mechanism given by the application.
#[derive(Debug, Clone, Copy)]
pub struct Mechanism<'a> {
    ptr: CK_MECHANISM_PTR,
    _life: PhantomData<&'a CK_MECHANISM>,
}

impl Mechanism<'_> {
    /// # Safety
    /// `ptr` is NULL or points to a valid `CK_MECHANISM` for the call.
    #[inline]
    pub unsafe fn new(ptr: CK_MECHANISM_PTR) -> Result<Self> {
        if ptr.is_null() {
            return Err(Error::ArgumentsBad("NULL mechanism"));
        }
        Ok(Mechanism {
            ptr,
            _life: PhantomData,
        })
    }

    /// The mechanism type.
    #[inline]
    pub fn kind(&self) -> CK_MECHANISM_TYPE {
        // SAFETY: checked non-NULL in `new`, valid for the call.
        unsafe { (*self.ptr).mechanism }
    }

    #[inline]
    pub(crate) fn raw(&self) -> CK_MECHANISM_PTR {
        self.ptr
    }

    /// The key handle given as the parameter of mechanisms whose parameter
    /// is one (`CKM_CONCATENATE_BASE_AND_KEY`).
    pub fn handle_param(&self) -> Option<CK_OBJECT_HANDLE> {
        // SAFETY: checked non-NULL in `new`, valid for the call.
        let m = unsafe { &*self.ptr };
        if m.mechanism != CKM_CONCATENATE_BASE_AND_KEY
            || m.pParameter.is_null()
            || m.ulParameterLen as usize != std::mem::size_of::<CK_OBJECT_HANDLE>()
        {
            return None;
        }
        // SAFETY: pParameter points to ulParameterLen bytes, the size of a handle.
        Some(unsafe { (m.pParameter as *const CK_OBJECT_HANDLE).read_unaligned() })
    }

    /// A copy of the mechanism whose parameter is `handle`.
    pub fn with_handle_param<'b>(&self, handle: &'b mut CK_OBJECT_HANDLE) -> OwnedMechanism<'b> {
        OwnedMechanism {
            m: CK_MECHANISM {
                mechanism: self.kind(),
                pParameter: (handle as *mut CK_OBJECT_HANDLE).cast(),
                ulParameterLen: std::mem::size_of::<CK_OBJECT_HANDLE>() as CK_ULONG,
            },
            _life: PhantomData,
        }
    }
}

/// A deep copy of an application's mechanism, kept after the call that
/// passed it so that an operation can be started again on another member.
/// Parameters are copied when their layout is known: none, flat structures
/// and byte strings of the mechanisms listed in [`flat_param`], and the
/// pointer-bearing `CK_GCM_PARAMS` and `CK_RSA_PKCS_OAEP_PARAMS`, whose
/// buffers are copied too.
#[derive(Debug)]
pub struct SavedMechanism {
    kind: CK_MECHANISM_TYPE,
    param: SavedParam,
}

#[derive(Debug)]
enum SavedParam {
    None,
    Flat(Box<[u8]>),
    Gcm(Box<(CK_GCM_PARAMS, Vec<u8>, Vec<u8>)>),
    Oaep(Box<(CK_RSA_PKCS_OAEP_PARAMS, Vec<u8>)>),
}

// SAFETY: the raw pointers in the boxed parameter structures point into the
// heap buffers of the vectors boxed with them, which never change after
// construction.
unsafe impl Send for SavedParam {}
// SAFETY: as above; the value is never mutated after construction.
unsafe impl Sync for SavedParam {}

/// Mechanisms whose parameter, if any, holds no pointer.
pub fn flat_param(kind: CK_MECHANISM_TYPE) -> bool {
    matches!(
        kind,
        CKM_RSA_PKCS_PSS
            | CKM_SHA1_RSA_PKCS_PSS
            | CKM_SHA224_RSA_PKCS_PSS
            | CKM_SHA256_RSA_PKCS_PSS
            | CKM_SHA384_RSA_PKCS_PSS
            | CKM_SHA512_RSA_PKCS_PSS
            | CKM_AES_CBC
            | CKM_AES_CBC_PAD
            | CKM_AES_CTR
            | CKM_AES_CFB8
            | CKM_AES_CFB128
            | CKM_AES_OFB
            | CKM_AES_CMAC_GENERAL
            | CKM_AES_KEY_WRAP
            | CKM_AES_KEY_WRAP_PAD
            | CKM_DES3_CBC
            | CKM_DES3_CBC_PAD
            | CKM_SHA_1_HMAC_GENERAL
            | CKM_SHA224_HMAC_GENERAL
            | CKM_SHA256_HMAC_GENERAL
            | CKM_SHA384_HMAC_GENERAL
            | CKM_SHA512_HMAC_GENERAL
    )
}

/// Copies `len` bytes at `ptr` (NULL or empty gives an empty vector).
///
/// # Safety
/// `ptr` is NULL or points to `len` readable bytes.
unsafe fn copy_bytes(ptr: *const u8, len: CK_ULONG) -> Vec<u8> {
    if ptr.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: per the caller's promise.
    unsafe { std::slice::from_raw_parts(ptr, len as usize) }.to_vec()
}

impl Mechanism<'_> {
    /// A deep copy, or `None` when the parameter's layout is unknown.
    pub fn save(&self) -> Option<SavedMechanism> {
        // SAFETY: checked non-NULL in `new`, valid for the call.
        let m = unsafe { &*self.ptr };
        let kind = m.mechanism;
        let param = if m.pParameter.is_null() || m.ulParameterLen == 0 {
            SavedParam::None
        } else if kind == CKM_AES_GCM
            && m.ulParameterLen as usize == std::mem::size_of::<CK_GCM_PARAMS>()
        {
            // SAFETY: the parameter of CKM_AES_GCM is a CK_GCM_PARAMS whose
            // pointers are valid for their lengths for the call.
            unsafe {
                let p = (m.pParameter as *const CK_GCM_PARAMS).read_unaligned();
                let iv = copy_bytes(p.pIv, p.ulIvLen);
                let aad = copy_bytes(p.pAAD, p.ulAADLen);
                let params = CK_GCM_PARAMS {
                    pIv: if iv.is_empty() {
                        std::ptr::null_mut()
                    } else {
                        iv.as_ptr().cast_mut()
                    },
                    pAAD: if aad.is_empty() {
                        std::ptr::null_mut()
                    } else {
                        aad.as_ptr().cast_mut()
                    },
                    ..p
                };
                SavedParam::Gcm(Box::new((params, iv, aad)))
            }
        } else if kind == CKM_RSA_PKCS_OAEP
            && m.ulParameterLen as usize == std::mem::size_of::<CK_RSA_PKCS_OAEP_PARAMS>()
        {
            // SAFETY: the parameter of CKM_RSA_PKCS_OAEP is a
            // CK_RSA_PKCS_OAEP_PARAMS valid for the call.
            unsafe {
                let p = (m.pParameter as *const CK_RSA_PKCS_OAEP_PARAMS).read_unaligned();
                let source = copy_bytes(p.pSourceData as *const u8, p.ulSourceDataLen);
                let params = CK_RSA_PKCS_OAEP_PARAMS {
                    pSourceData: if source.is_empty() {
                        std::ptr::null_mut()
                    } else {
                        source.as_ptr().cast_mut().cast()
                    },
                    ..p
                };
                SavedParam::Oaep(Box::new((params, source)))
            }
        } else if flat_param(kind) {
            // SAFETY: pParameter points to ulParameterLen readable bytes.
            SavedParam::Flat(
                unsafe { copy_bytes(m.pParameter as *const u8, m.ulParameterLen) }
                    .into_boxed_slice(),
            )
        } else {
            return None;
        };
        Some(SavedMechanism { kind, param })
    }
}

impl SavedMechanism {
    pub fn kind(&self) -> CK_MECHANISM_TYPE {
        self.kind
    }

    /// The mechanism as a `CK_MECHANISM`, valid while `self` lives.
    pub fn to_raw(&self) -> CK_MECHANISM {
        let (ptr, len): (CK_VOID_PTR, usize) = match &self.param {
            SavedParam::None => (std::ptr::null_mut(), 0),
            SavedParam::Flat(v) => (v.as_ptr().cast_mut().cast(), v.len()),
            SavedParam::Gcm(b) => (
                (&b.0 as *const CK_GCM_PARAMS).cast_mut().cast(),
                std::mem::size_of::<CK_GCM_PARAMS>(),
            ),
            SavedParam::Oaep(b) => (
                (&b.0 as *const CK_RSA_PKCS_OAEP_PARAMS).cast_mut().cast(),
                std::mem::size_of::<CK_RSA_PKCS_OAEP_PARAMS>(),
            ),
        };
        CK_MECHANISM {
            mechanism: self.kind,
            pParameter: ptr,
            ulParameterLen: len as CK_ULONG,
        }
    }
}

/// A `CK_MECHANISM` built by the module, viewed as an application's.
#[derive(Debug)]
pub struct RawMechanism(pub CK_MECHANISM);

impl RawMechanism {
    pub fn view(&self) -> Mechanism<'_> {
        Mechanism {
            ptr: (&self.0 as *const CK_MECHANISM).cast_mut(),
            _life: PhantomData,
        }
    }
}

/// A mechanism built by the module (a translated copy of the application's).
#[derive(Debug)]
pub struct OwnedMechanism<'b> {
    m: CK_MECHANISM,
    _life: PhantomData<&'b mut CK_OBJECT_HANDLE>,
}

impl OwnedMechanism<'_> {
    pub fn view(&self) -> Mechanism<'_> {
        Mechanism {
            ptr: (&self.m as *const CK_MECHANISM).cast_mut(),
            _life: PhantomData,
        }
    }
}

/// What the application passed to `C_Initialize`.
#[derive(Debug, Default)]
pub struct InitArgs {
    /// The configuration path given in `pReserved`, if any.
    pub reserved: Option<String>,
    /// `CKF_LIBRARY_CANT_CREATE_OS_THREADS`: p11shim must start no thread.
    pub no_threads: bool,
}

/// Reads and checks `CK_C_INITIALIZE_ARGS`.
///
/// # Safety
/// `ptr` is NULL or points to a valid `CK_C_INITIALIZE_ARGS`.
pub unsafe fn init_args(ptr: CK_VOID_PTR) -> Result<InitArgs> {
    if ptr.is_null() {
        return Ok(InitArgs::default());
    }
    // SAFETY: the caller promised a valid structure.
    let a = unsafe { (ptr as *const CK_C_INITIALIZE_ARGS).read_unaligned() };
    let given = [
        a.CreateMutex.is_some(),
        a.DestroyMutex.is_some(),
        a.LockMutex.is_some(),
        a.UnlockMutex.is_some(),
    ];
    if given.contains(&true) && given.contains(&false) {
        return Err(Error::ArgumentsBad(
            "either all four mutex functions or none",
        ));
    }
    // p11shim locks with native OS primitives: application-supplied mutex
    // functions are accepted and not needed.
    Ok(InitArgs {
        // SAFETY: pReserved is NULL or, by p11-kit's convention, a C string.
        reserved: unsafe { c_str(a.pReserved) },
        no_threads: a.flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS != 0,
    })
}

/// The 32-byte label of `C_InitToken`.
#[derive(Debug, Clone, Copy)]
pub struct Label<'a> {
    ptr: CK_UTF8CHAR_PTR,
    _life: PhantomData<&'a [CK_UTF8CHAR; 32]>,
}

impl Label<'_> {
    /// # Safety
    /// `ptr` is NULL or points to 32 readable bytes valid for the call.
    pub unsafe fn new(ptr: CK_UTF8CHAR_PTR) -> Result<Self> {
        if ptr.is_null() {
            return Err(Error::ArgumentsBad("NULL label"));
        }
        Ok(Label {
            ptr,
            _life: PhantomData,
        })
    }

    #[inline]
    pub(crate) fn raw(&self) -> CK_UTF8CHAR_PTR {
        self.ptr
    }
}

/// Reads the optional configuration path passed in `pReserved`.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string.
pub unsafe fn c_str(ptr: *const c_void) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: the caller promised a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(ptr as *const c_char) };
    s.to_str().ok().map(str::to_owned)
}

/// A blank-padded fixed-size field of an info structure.
pub fn padded<const N: usize>(s: &str) -> [CK_UTF8CHAR; N] {
    let mut out = [b' '; N];
    // Truncate on a character boundary.
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

/// A blank-padded field as a trimmed string.
pub fn unpadded(field: &[CK_UTF8CHAR]) -> String {
    String::from_utf8_lossy(field)
        .trim_end_matches([' ', '\0'])
        .to_owned()
}

/// Passing a view to one more vendor call: `Copy` views are copied, output
/// views re-borrowed.
pub trait ReborrowArg {
    type Out<'b>
    where
        Self: 'b;
    fn reborrow_arg(&mut self) -> Self::Out<'_>;
}

impl<'a> ReborrowArg for Bytes<'a> {
    type Out<'b>
        = Bytes<'a>
    where
        Self: 'b;
    #[inline]
    fn reborrow_arg(&mut self) -> Bytes<'a> {
        *self
    }
}

impl<'a> ReborrowArg for Param<'a> {
    type Out<'b>
        = Param<'a>
    where
        Self: 'b;
    #[inline]
    fn reborrow_arg(&mut self) -> Param<'a> {
        *self
    }
}

impl ReborrowArg for CK_ULONG {
    type Out<'b> = CK_ULONG;
    #[inline]
    fn reborrow_arg(&mut self) -> CK_ULONG {
        *self
    }
}

impl ReborrowArg for OutBytes<'_> {
    type Out<'b>
        = OutBytes<'b>
    where
        Self: 'b;
    #[inline]
    fn reborrow_arg(&mut self) -> OutBytes<'_> {
        self.reborrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_round_trips_and_truncates_on_char_boundary() {
        let f: [u8; 8] = padded("abc");
        assert_eq!(&f, b"abc     ");
        assert_eq!(unpadded(&f), "abc");
        let f: [u8; 4] = padded("abcé");
        assert_eq!(&f, b"abc ");
    }

    #[test]
    fn out_list_follows_the_two_call_convention() {
        let items = [1 as CK_ULONG, 2, 3];
        let mut count: CK_ULONG = 0;
        // SAFETY: count is a live local.
        let mut l = unsafe { OutList::<CK_ULONG>::new(std::ptr::null_mut(), &mut count) }.unwrap();
        l.write(&items).unwrap();
        assert_eq!(count, 3);
        let mut buf = [0 as CK_ULONG; 2];
        count = 2;
        // SAFETY: buf has room for `count` elements.
        let mut l = unsafe { OutList::new(buf.as_mut_ptr(), &mut count) }.unwrap();
        assert_eq!(l.write(&items), Err(Error::BufferTooSmall));
        assert_eq!(count, 3);
        let mut buf = [0 as CK_ULONG; 3];
        // SAFETY: as above.
        let mut l = unsafe { OutList::new(buf.as_mut_ptr(), &mut count) }.unwrap();
        l.write(&items).unwrap();
        assert_eq!(buf, items);
    }

    #[test]
    fn null_pointers_are_refused_where_the_spec_forbids_them() {
        // SAFETY: NULL pointers are never dereferenced by the constructors.
        unsafe {
            assert!(Bytes::new(std::ptr::null_mut(), 1).is_err());
            assert!(
                Bytes::new(std::ptr::null_mut(), 0)
                    .unwrap()
                    .as_slice()
                    .is_empty()
            );
            assert!(OutBytes::new(std::ptr::null_mut(), std::ptr::null_mut()).is_err());
            assert!(Out::<CK_ULONG>::new(std::ptr::null_mut()).is_err());
            assert!(Mechanism::new(std::ptr::null_mut()).is_err());
            assert!(Template::new(std::ptr::null_mut(), 2).is_err());
        }
    }
}
