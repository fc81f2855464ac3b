//! Cryptographic functions (PKCS#11 sections 5.9 to 5.18, and the 3.0
//! message-based functions): the session's member does the work; key
//! handles are translated, data and output buffers go to the vendor as the
//! application passed them.

use pkcs11_sys::*;

use super::Library;
use crate::abi::mem::{Bytes, BytesMut, Mechanism, Out, OutBytes, Param, Template};
use crate::error::Result;

/// Functions that take a session and plain arguments.
macro_rules! session_calls {
    ($($name:ident($($p:ident: $t:ty),*);)*) => {
        impl Library {
            $(
                #[inline]
                pub fn $name(&self, h: CK_SESSION_HANDLE, $($p: $t),*) -> Result<()> {
                    let (s, v) = self.session(h)?;
                    v.$name(s.vendor, $($p),*)
                }
            )*
        }
    };
}

/// `*Init` functions: a session, a mechanism and a key.
macro_rules! keyed_inits {
    ($($name:ident;)*) => {
        impl Library {
            $(
                #[inline]
                pub fn $name(&self, h: CK_SESSION_HANDLE, m: Mechanism<'_>, key: CK_OBJECT_HANDLE) -> Result<()> {
                    let (s, v) = self.session(h)?;
                    v.$name(s.vendor, m, self.vendor_object(&s, key))
                }
            )*
        }
    };
}

keyed_inits! {
    encrypt_init; decrypt_init; sign_init; verify_init; sign_recover_init; verify_recover_init;
    message_encrypt_init; message_decrypt_init; message_sign_init; message_verify_init;
}

session_calls! {
    encrypt(d: Bytes<'_>, out: OutBytes<'_>);
    encrypt_update(d: Bytes<'_>, out: OutBytes<'_>);
    encrypt_final(out: OutBytes<'_>);
    decrypt(d: Bytes<'_>, out: OutBytes<'_>);
    decrypt_update(d: Bytes<'_>, out: OutBytes<'_>);
    decrypt_final(out: OutBytes<'_>);
    digest_init(m: Mechanism<'_>);
    digest(d: Bytes<'_>, out: OutBytes<'_>);
    digest_update(d: Bytes<'_>);
    digest_final(out: OutBytes<'_>);
    sign(d: Bytes<'_>, out: OutBytes<'_>);
    sign_update(d: Bytes<'_>);
    sign_final(out: OutBytes<'_>);
    sign_recover(d: Bytes<'_>, out: OutBytes<'_>);
    verify(d: Bytes<'_>, sig: Bytes<'_>);
    verify_update(d: Bytes<'_>);
    verify_final(sig: Bytes<'_>);
    verify_recover(sig: Bytes<'_>, out: OutBytes<'_>);
    digest_encrypt_update(d: Bytes<'_>, out: OutBytes<'_>);
    decrypt_digest_update(d: Bytes<'_>, out: OutBytes<'_>);
    sign_encrypt_update(d: Bytes<'_>, out: OutBytes<'_>);
    decrypt_verify_update(d: Bytes<'_>, out: OutBytes<'_>);
    seed_random(d: Bytes<'_>);
    generate_random(out: BytesMut<'_>);
    get_function_status();
    cancel_function();
    session_cancel(flags: CK_FLAGS);
    encrypt_message(p: Param<'_>, ad: Bytes<'_>, d: Bytes<'_>, out: OutBytes<'_>);
    encrypt_message_begin(p: Param<'_>, ad: Bytes<'_>);
    encrypt_message_next(p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>, flags: CK_FLAGS);
    message_encrypt_final();
    decrypt_message(p: Param<'_>, ad: Bytes<'_>, d: Bytes<'_>, out: OutBytes<'_>);
    decrypt_message_begin(p: Param<'_>, ad: Bytes<'_>);
    decrypt_message_next(p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>, flags: CK_FLAGS);
    message_decrypt_final();
    sign_message(p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>);
    sign_message_begin(p: Param<'_>);
    sign_message_next(p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>);
    message_sign_final();
    verify_message(p: Param<'_>, d: Bytes<'_>, sig: Bytes<'_>);
    verify_message_begin(p: Param<'_>);
    verify_message_next(p: Param<'_>, d: Bytes<'_>, sig: Bytes<'_>);
    message_verify_final();
}

impl Library {
    pub fn digest_key(&self, h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.digest_key(s.vendor, self.vendor_object(&s, key))
    }

    pub fn generate_key(&self, h: CK_SESSION_HANDLE, m: Mechanism<'_>, t: Template<'_>, mut out: Out<'_, CK_OBJECT_HANDLE>) -> Result<()> {
        let (s, v) = self.session(h)?;
        let mut k = CK_INVALID_HANDLE;
        v.generate_key(s.vendor, m, t, &mut k)?;
        out.write(self.app_object(&s, v, Some(h), k));
        Ok(())
    }

    pub fn generate_key_pair(
        &self,
        h: CK_SESSION_HANDLE,
        m: Mechanism<'_>,
        pub_t: Template<'_>,
        priv_t: Template<'_>,
        mut pub_out: Out<'_, CK_OBJECT_HANDLE>,
        mut priv_out: Out<'_, CK_OBJECT_HANDLE>,
    ) -> Result<()> {
        let (s, v) = self.session(h)?;
        let (mut pk, mut sk) = (CK_INVALID_HANDLE, CK_INVALID_HANDLE);
        v.generate_key_pair(s.vendor, m, pub_t, priv_t, &mut pk, &mut sk)?;
        pub_out.write(self.app_object(&s, v, Some(h), pk));
        priv_out.write(self.app_object(&s, v, Some(h), sk));
        Ok(())
    }

    pub fn wrap_key(&self, h: CK_SESSION_HANDLE, m: Mechanism<'_>, wrapping: CK_OBJECT_HANDLE, key: CK_OBJECT_HANDLE, out: OutBytes<'_>) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.wrap_key(s.vendor, m, self.vendor_object(&s, wrapping), self.vendor_object(&s, key), out)
    }

    pub fn unwrap_key(
        &self,
        h: CK_SESSION_HANDLE,
        m: Mechanism<'_>,
        unwrapping: CK_OBJECT_HANDLE,
        wrapped: Bytes<'_>,
        t: Template<'_>,
        mut out: Out<'_, CK_OBJECT_HANDLE>,
    ) -> Result<()> {
        let (s, v) = self.session(h)?;
        let mut k = CK_INVALID_HANDLE;
        v.unwrap_key(s.vendor, m, self.vendor_object(&s, unwrapping), wrapped, t, &mut k)?;
        out.write(self.app_object(&s, v, Some(h), k));
        Ok(())
    }

    pub fn derive_key(&self, h: CK_SESSION_HANDLE, m: Mechanism<'_>, base: CK_OBJECT_HANDLE, t: Template<'_>, mut out: Out<'_, CK_OBJECT_HANDLE>) -> Result<()> {
        let (s, v) = self.session(h)?;
        let mut k = CK_INVALID_HANDLE;
        // A mechanism whose parameter is itself a key handle gets the
        // member's handle in a copy of the mechanism.
        let mut other_key: CK_OBJECT_HANDLE;
        let translated;
        let m = match m.handle_param() {
            Some(app) => {
                other_key = self.vendor_object(&s, app);
                translated = m.with_handle_param(&mut other_key);
                translated.view()
            }
            None => m,
        };
        v.derive_key(s.vendor, m, self.vendor_object(&s, base), t, &mut k)?;
        out.write(self.app_object(&s, v, Some(h), k));
        Ok(())
    }
}
