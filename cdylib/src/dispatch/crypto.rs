//! Cryptographic functions (PKCS#11 sections 5.9 to 5.18, and the 3.0
//! message-based functions): the session's member does the work, key
//! handles are translated for it, and data and output buffers go to the
//! vendor as the application passed them.
//!
//! Each operation is recorded as it goes (`router::replay`), so that a
//! session moved to another member mid-operation carries on there.

use pkcs11_sys::*;

use super::Library;
use std::sync::Arc;

use super::resync::Remake;
use crate::abi::mem::{
    Bytes, BytesMut, Mechanism, Out, OutBytes, Param, RawMechanism, ReborrowArg, Template,
};
use crate::backend::Vendor;
use crate::error::{Error, Result};
use crate::router::replay::{OpKind, Outcome, final_outcome};

type Sh = CK_SESSION_HANDLE;
type Oh = CK_OBJECT_HANDLE;

impl Library {
    /// `*Init` with a key: translates the key for the serving member and
    /// records the operation.
    fn op_init(
        &self,
        h: Sh,
        kind: OpKind,
        m: Mechanism<'_>,
        key: Oh,
        init: impl Fn(&Vendor, Sh, Mechanism<'_>, Oh) -> Result<()>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        self.on_session(&sess, None, |mem, mi, vh| {
            let k = if key == CK_INVALID_HANDLE {
                key
            } else {
                self.object_on(slot, mi, key)?
            };
            init(&mem.vendor, vh, m, k)
        })?;
        if sess.replay {
            sess.state.lock().ops.start(kind, m.save(), key);
        }
        Ok(())
    }

    /// A call that ends an operation unless it is a size query or
    /// `CKR_BUFFER_TOO_SMALL` (single-part calls and `*Final`).
    fn op_last(
        &self,
        h: Sh,
        kind: OpKind,
        size_query: bool,
        mut call: impl FnMut(&Vendor, Sh) -> Result<()>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let r = self.on_session(&sess, Some(kind), |m, _, vh| call(&m.vendor, vh));
        if sess.replay && final_outcome(&r, size_query) == Outcome::Ended {
            sess.state.lock().ops.end(kind);
        }
        r
    }

    /// `*Update`: records the input for replay (a size query consumes
    /// none), or ends the operation on failure.
    fn op_update(
        &self,
        h: Sh,
        kind: OpKind,
        input: Bytes<'_>,
        size_query: bool,
        mut call: impl FnMut(&Vendor, Sh) -> Result<()>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let r = self.on_session(&sess, Some(kind), |m, _, vh| call(&m.vendor, vh));
        if !sess.replay {
            return r;
        }
        let limit = self.slots[sess.slot as usize].cfg.replay_limit;
        let mut st = sess.state.lock();
        match &r {
            Ok(()) if !size_query => st.ops.add_input(kind, input.as_slice(), limit),
            Ok(()) => {}
            Err(Error::Vendor(CKR_BUFFER_TOO_SMALL)) => {}
            Err(_) => st.ops.end(kind),
        }
        r
    }

    /// Dual-function updates feed two operations whose inputs p11shim does
    /// not both see: both become unreplayable.
    fn dual_update(
        &self,
        h: Sh,
        kinds: [OpKind; 2],
        mut call: impl FnMut(&Vendor, Sh) -> Result<()>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let r = self.on_session(&sess, None, |m, _, vh| call(&m.vendor, vh));
        let mut st = sess.state.lock();
        for k in kinds {
            st.ops.taint(k);
        }
        r
    }

    fn plain(&self, h: Sh, mut call: impl FnMut(&Vendor, Sh) -> Result<()>) -> Result<()> {
        let sess = self.session(h)?;
        self.on_session(&sess, None, |m, _, vh| call(&m.vendor, vh))
    }

    pub fn encrypt_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(h, OpKind::Encrypt, m, key, |v, s, m, k| {
            v.encrypt_init(s, m, k)
        })
    }
    pub fn decrypt_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(h, OpKind::Decrypt, m, key, |v, s, m, k| {
            v.decrypt_init(s, m, k)
        })
    }
    pub fn sign_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(h, OpKind::Sign, m, key, |v, s, m, k| v.sign_init(s, m, k))
    }
    pub fn verify_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(h, OpKind::Verify, m, key, |v, s, m, k| {
            v.verify_init(s, m, k)
        })
    }
    pub fn sign_recover_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(h, OpKind::SignRecover, m, key, |v, s, m, k| {
            v.sign_recover_init(s, m, k)
        })
    }
    pub fn verify_recover_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(h, OpKind::VerifyRecover, m, key, |v, s, m, k| {
            v.verify_recover_init(s, m, k)
        })
    }
    pub fn digest_init(&self, h: Sh, m: Mechanism<'_>) -> Result<()> {
        self.op_init(h, OpKind::Digest, m, CK_INVALID_HANDLE, |v, s, m, _| {
            v.digest_init(s, m)
        })
    }

    pub fn encrypt(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Encrypt, out.is_size_query(), |v, s| {
            v.encrypt(s, d, out.reborrow())
        })
    }
    pub fn encrypt_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.op_update(h, OpKind::Encrypt, d, out.is_size_query(), |v, s| {
            v.encrypt_update(s, d, out.reborrow())
        })
    }
    pub fn encrypt_final(&self, h: Sh, mut out: OutBytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Encrypt, out.is_size_query(), |v, s| {
            v.encrypt_final(s, out.reborrow())
        })
    }
    pub fn decrypt(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Decrypt, out.is_size_query(), |v, s| {
            v.decrypt(s, d, out.reborrow())
        })
    }
    pub fn decrypt_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.op_update(h, OpKind::Decrypt, d, out.is_size_query(), |v, s| {
            v.decrypt_update(s, d, out.reborrow())
        })
    }
    pub fn decrypt_final(&self, h: Sh, mut out: OutBytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Decrypt, out.is_size_query(), |v, s| {
            v.decrypt_final(s, out.reborrow())
        })
    }
    pub fn digest(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Digest, out.is_size_query(), |v, s| {
            v.digest(s, d, out.reborrow())
        })
    }
    pub fn digest_update(&self, h: Sh, d: Bytes<'_>) -> Result<()> {
        self.op_update(h, OpKind::Digest, d, false, |v, s| v.digest_update(s, d))
    }
    pub fn digest_final(&self, h: Sh, mut out: OutBytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Digest, out.is_size_query(), |v, s| {
            v.digest_final(s, out.reborrow())
        })
    }
    pub fn sign(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Sign, out.is_size_query(), |v, s| {
            v.sign(s, d, out.reborrow())
        })
    }
    pub fn sign_update(&self, h: Sh, d: Bytes<'_>) -> Result<()> {
        self.op_update(h, OpKind::Sign, d, false, |v, s| v.sign_update(s, d))
    }
    pub fn sign_final(&self, h: Sh, mut out: OutBytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Sign, out.is_size_query(), |v, s| {
            v.sign_final(s, out.reborrow())
        })
    }
    pub fn sign_recover(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::SignRecover, out.is_size_query(), |v, s| {
            v.sign_recover(s, d, out.reborrow())
        })
    }
    pub fn verify(&self, h: Sh, d: Bytes<'_>, sig: Bytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Verify, false, |v, s| v.verify(s, d, sig))
    }
    pub fn verify_update(&self, h: Sh, d: Bytes<'_>) -> Result<()> {
        self.op_update(h, OpKind::Verify, d, false, |v, s| v.verify_update(s, d))
    }
    pub fn verify_final(&self, h: Sh, sig: Bytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Verify, false, |v, s| v.verify_final(s, sig))
    }
    pub fn verify_recover(&self, h: Sh, sig: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::VerifyRecover, out.is_size_query(), |v, s| {
            v.verify_recover(s, sig, out.reborrow())
        })
    }

    pub fn digest_key(&self, h: Sh, key: Oh) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        let r = self.on_session(&sess, Some(OpKind::Digest), |m, mi, vh| {
            m.vendor.digest_key(vh, self.object_on(slot, mi, key)?)
        });
        let mut st = sess.state.lock();
        match r {
            Ok(()) => st.ops.taint(OpKind::Digest),
            Err(_) => st.ops.end(OpKind::Digest),
        }
        r
    }

    pub fn digest_encrypt_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.dual_update(h, [OpKind::Digest, OpKind::Encrypt], |v, s| {
            v.digest_encrypt_update(s, d, out.reborrow())
        })
    }
    pub fn decrypt_digest_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.dual_update(h, [OpKind::Decrypt, OpKind::Digest], |v, s| {
            v.decrypt_digest_update(s, d, out.reborrow())
        })
    }
    pub fn sign_encrypt_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.dual_update(h, [OpKind::Sign, OpKind::Encrypt], |v, s| {
            v.sign_encrypt_update(s, d, out.reborrow())
        })
    }
    pub fn decrypt_verify_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.dual_update(h, [OpKind::Decrypt, OpKind::Verify], |v, s| {
            v.decrypt_verify_update(s, d, out.reborrow())
        })
    }

    pub fn seed_random(&self, h: Sh, d: Bytes<'_>) -> Result<()> {
        self.plain(h, |v, s| v.seed_random(s, d))
    }
    pub fn generate_random(&self, h: Sh, mut out: BytesMut<'_>) -> Result<()> {
        self.plain(h, |v, s| v.generate_random(s, out.reborrow()))
    }
    pub fn get_function_status(&self, h: Sh) -> Result<()> {
        self.plain(h, |v, s| v.get_function_status(s))
    }
    pub fn cancel_function(&self, h: Sh) -> Result<()> {
        self.plain(h, |v, s| v.cancel_function(s))
    }
    pub fn session_cancel(&self, h: Sh, flags: CK_FLAGS) -> Result<()> {
        self.plain(h, |v, s| v.session_cancel(s, flags))
    }

    pub fn wrap_key(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        wrapping: Oh,
        key: Oh,
        mut out: OutBytes<'_>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        self.on_session(&sess, None, |mem, mi, vh| {
            mem.vendor.wrap_key(
                vh,
                m,
                self.object_on(slot, mi, wrapping)?,
                self.object_on(slot, mi, key)?,
                out.reborrow(),
            )
        })
    }

    /// `C_UnwrapKey`: a token key is unwrapped on every member that is up,
    /// from the same wrapped bytes under the same unwrapping key.
    pub fn unwrap_key(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        unwrapping: Oh,
        wrapped: Bytes<'_>,
        t: Template<'_>,
        mut out: Out<'_, Oh>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        let (o, made_on) = self.on_session(&sess, None, |mem, mi, vh| {
            let mut k = CK_INVALID_HANDLE;
            mem.vendor.unwrap_key(
                vh,
                m,
                self.object_on(slot, mi, unwrapping)?,
                wrapped,
                t,
                &mut k,
            )?;
            Ok((self.app_object(slot, mi, &mem.vendor, vh, Some(h), k), mi))
        })?;
        if self.slots[slot as usize].members.len() > 1 && t.bool_attr(CKA_TOKEN) == Some(true) {
            // What a member that is down needs to unwrap the key later.
            let later = match (m.save(), t.save()) {
                (Some(mech), Some(tmpl)) => {
                    let bytes = zeroize::Zeroizing::new(wrapped.as_slice().to_vec());
                    Some(Arc::new(
                        move |lib: &Library, mem: &crate::router::Member, mi: u32, cs: Sh| {
                            let raw_mech = RawMechanism(mech.to_raw());
                            let mut raw = tmpl.to_raw();
                            let mut k = CK_INVALID_HANDLE;
                            let unwrapping = lib.object_on_in(slot, mi, unwrapping, cs)?;
                            mem.vendor
                                .unwrap_key(
                                    cs,
                                    raw_mech.view(),
                                    unwrapping,
                                    Bytes::from_slice(&bytes),
                                    Template::from_slice(&mut raw),
                                    &mut k,
                                )
                                .map(|_| k)
                        },
                    ) as Remake)
                }
                _ => None,
            };
            self.replicate(
                &sess,
                made_on,
                o,
                "C_UnwrapKey",
                |mem, mi, cs| {
                    let mut k = CK_INVALID_HANDLE;
                    mem.vendor
                        .unwrap_key(
                            cs,
                            m,
                            self.object_on_in(slot, mi, unwrapping, cs)?,
                            wrapped,
                            t,
                            &mut k,
                        )
                        .map(|_| k)
                },
                later,
            );
        }
        out.write(o);
        Ok(())
    }

    /// `C_DeriveKey`: a token key is derived on every member that is up,
    /// from the same base key and parameters.
    pub fn derive_key(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        base: Oh,
        t: Template<'_>,
        mut out: Out<'_, Oh>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        // `cs` is p11shim's own session on the member when replicating.
        let derive = |mem: &crate::router::Member, mi: u32, vh: Sh, cs: Option<Sh>| -> Result<Oh> {
            let on = |h| match cs {
                Some(cs) => self.object_on_in(slot, mi, h, cs),
                None => self.object_on(slot, mi, h),
            };
            let mut k = CK_INVALID_HANDLE;
            // A mechanism whose parameter is itself a key handle gets the
            // member's handle in a copy of the mechanism.
            let mut other_key: Oh;
            let translated;
            let m = match m.handle_param() {
                Some(app) => {
                    other_key = on(app)?;
                    translated = m.with_handle_param(&mut other_key);
                    translated.view()
                }
                None => m,
            };
            mem.vendor.derive_key(vh, m, on(base)?, t, &mut k)?;
            Ok(k)
        };
        let (o, made_on) = self.on_session(&sess, None, |mem, mi, vh| {
            let k = derive(mem, mi, vh, None)?;
            Ok((self.app_object(slot, mi, &mem.vendor, vh, Some(h), k), mi))
        })?;
        if self.slots[slot as usize].members.len() > 1 && t.bool_attr(CKA_TOKEN) == Some(true) {
            // Derivation parameters with pointers (ECDH's public data) are
            // not kept: a member that is down misses the key (logged).
            let later = match (m.handle_param(), m.save(), t.save()) {
                (None, Some(mech), Some(tmpl)) => Some(Arc::new(
                    move |lib: &Library, mem: &crate::router::Member, mi: u32, cs: Sh| {
                        let raw_mech = RawMechanism(mech.to_raw());
                        let mut raw = tmpl.to_raw();
                        let mut k = CK_INVALID_HANDLE;
                        let base = lib.object_on_in(slot, mi, base, cs)?;
                        mem.vendor
                            .derive_key(
                                cs,
                                raw_mech.view(),
                                base,
                                Template::from_slice(&mut raw),
                                &mut k,
                            )
                            .map(|_| k)
                    },
                ) as Remake),
                _ => None,
            };
            self.replicate(
                &sess,
                made_on,
                o,
                "C_DeriveKey",
                |mem, mi, cs| derive(mem, mi, cs, Some(cs)),
                later,
            );
        }
        out.write(o);
        Ok(())
    }
}

/// Message-based functions (3.0): forwarded; a session moved to another
/// member mid-message loses the message operation.
macro_rules! message_calls {
    ($($name:ident($($p:ident: $t:ty),*);)*) => {
        impl Library {
            $(
                pub fn $name(&self, h: Sh, $(mut $p: $t),*) -> Result<()> {
                    self.plain(h, |v, s| v.$name(s, $($p.reborrow_arg()),*))
                }
            )*
        }
    };
}

message_calls! {
    encrypt_message(p: Param<'_>, ad: Bytes<'_>, d: Bytes<'_>, out: OutBytes<'_>);
    encrypt_message_begin(p: Param<'_>, ad: Bytes<'_>);
    encrypt_message_next(p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>, flags: CK_FLAGS);
    decrypt_message(p: Param<'_>, ad: Bytes<'_>, d: Bytes<'_>, out: OutBytes<'_>);
    decrypt_message_begin(p: Param<'_>, ad: Bytes<'_>);
    decrypt_message_next(p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>, flags: CK_FLAGS);
    sign_message(p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>);
    sign_message_begin(p: Param<'_>);
    sign_message_next(p: Param<'_>, d: Bytes<'_>, out: OutBytes<'_>);
    verify_message(p: Param<'_>, d: Bytes<'_>, sig: Bytes<'_>);
    verify_message_begin(p: Param<'_>);
    verify_message_next(p: Param<'_>, d: Bytes<'_>, sig: Bytes<'_>);
}

impl Library {
    pub fn message_encrypt_final(&self, h: Sh) -> Result<()> {
        self.plain(h, |v, s| v.message_encrypt_final(s))
    }
    pub fn message_decrypt_final(&self, h: Sh) -> Result<()> {
        self.plain(h, |v, s| v.message_decrypt_final(s))
    }
    pub fn message_sign_final(&self, h: Sh) -> Result<()> {
        self.plain(h, |v, s| v.message_sign_final(s))
    }
    pub fn message_verify_final(&self, h: Sh) -> Result<()> {
        self.plain(h, |v, s| v.message_verify_final(s))
    }
    pub fn message_encrypt_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        let sess = self.session(h)?;
        self.on_session(&sess, None, |mem, mi, vh| {
            mem.vendor
                .message_encrypt_init(vh, m, self.object_on(sess.slot, mi, key)?)
        })
    }
    pub fn message_decrypt_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        let sess = self.session(h)?;
        self.on_session(&sess, None, |mem, mi, vh| {
            mem.vendor
                .message_decrypt_init(vh, m, self.object_on(sess.slot, mi, key)?)
        })
    }
    pub fn message_sign_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        let sess = self.session(h)?;
        self.on_session(&sess, None, |mem, mi, vh| {
            mem.vendor
                .message_sign_init(vh, m, self.object_on(sess.slot, mi, key)?)
        })
    }
    pub fn message_verify_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        let sess = self.session(h)?;
        self.on_session(&sess, None, |mem, mi, vh| {
            mem.vendor
                .message_verify_init(vh, m, self.object_on(sess.slot, mi, key)?)
        })
    }
}
