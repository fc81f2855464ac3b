//! Object management (PKCS#11 section 5.8): every object handle the
//! application sees is p11shim's own.

use pkcs11_sys::*;

use super::Library;
use crate::abi::mem::{Out, OutHandles, Template};
use crate::error::Result;

impl Library {
    pub fn create_object(&self, h: CK_SESSION_HANDLE, t: Template<'_>, mut out: Out<'_, CK_OBJECT_HANDLE>) -> Result<()> {
        let (s, v) = self.session(h)?;
        let mut o = CK_INVALID_HANDLE;
        v.create_object(s.vendor, t, &mut o)?;
        out.write(self.app_object(&s, v, Some(h), o));
        Ok(())
    }

    pub fn copy_object(&self, h: CK_SESSION_HANDLE, src: CK_OBJECT_HANDLE, t: Template<'_>, mut out: Out<'_, CK_OBJECT_HANDLE>) -> Result<()> {
        let (s, v) = self.session(h)?;
        let mut o = CK_INVALID_HANDLE;
        v.copy_object(s.vendor, self.vendor_object(&s, src), t, &mut o)?;
        out.write(self.app_object(&s, v, Some(h), o));
        Ok(())
    }

    pub fn destroy_object(&self, h: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.destroy_object(s.vendor, self.vendor_object(&s, o))?;
        self.objects.remove(o);
        Ok(())
    }

    pub fn get_object_size(&self, h: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE, out: Out<'_, CK_ULONG>) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.get_object_size(s.vendor, self.vendor_object(&s, o), out)
    }

    pub fn get_attribute_value(&self, h: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE, t: Template<'_>) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.get_attribute_value(s.vendor, self.vendor_object(&s, o), t)
    }

    pub fn set_attribute_value(&self, h: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE, t: Template<'_>) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.set_attribute_value(s.vendor, self.vendor_object(&s, o), t)
    }

    pub fn find_objects_init(&self, h: CK_SESSION_HANDLE, t: Template<'_>) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.find_objects_init(s.vendor, t)
    }

    /// The vendor fills the application's array with its handles, which are
    /// then replaced in place by p11shim's: no allocation on this path.
    pub fn find_objects(&self, h: CK_SESSION_HANDLE, mut out: OutHandles<'_>) -> Result<()> {
        let (s, v) = self.session(h)?;
        let mut n: CK_ULONG = 0;
        let found = out.as_mut_slice();
        v.find_objects(s.vendor, found, &mut n)?;
        let n = (n as usize).min(found.len());
        for slot in &mut found[..n] {
            *slot = self.app_object(&s, v, None, *slot);
        }
        out.set_count(n as CK_ULONG);
        Ok(())
    }

    pub fn find_objects_final(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.find_objects_final(s.vendor)
    }
}
