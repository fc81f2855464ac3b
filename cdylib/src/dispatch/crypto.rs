//! Cryptographic functions (PKCS#11 sections 5.9 to 5.18, and the 3.0
//! message-based functions): the session's member does the work, key
//! handles are translated for it, and data and output buffers go to the
//! vendor as the application passed them.
//!
//! Each operation is recorded as it goes (`router::replay`), so that a
//! session moved to another member mid-operation carries on there.

use pkcs11_sys::*;

use super::Library;
use super::acl::HandleKind;
use std::sync::Arc;

use super::resync::Remake;
use crate::abi::mem::{
    Bytes, BytesMut, Mechanism, Out, OutBytes, Param, RawMechanism, ReborrowArg, Template,
};
use crate::backend::Vendor;
use crate::error::{Error, Result};
use crate::policy::Op;
use crate::router::replay::{OpKind, Outcome, final_outcome};
use crate::router::{Member, bounded};
use p11shim_audit::Kind;

type Sh = CK_SESSION_HANDLE;
type Oh = CK_OBJECT_HANDLE;

/// The `*Init` function of an operation and what the ACL calls it.
fn init_of(kind: OpKind) -> (&'static str, Op) {
    let op = match kind {
        OpKind::Encrypt => Op::Encrypt,
        OpKind::Decrypt => Op::Decrypt,
        OpKind::Digest => Op::Digest,
        OpKind::Sign | OpKind::SignRecover => Op::Sign,
        OpKind::Verify | OpKind::VerifyRecover => Op::Verify,
    };
    (super::audit::init_function(kind), op)
}

impl Library {
    /// `*Init` with a key: translates the key for the serving member and
    /// records the operation.
    #[inline(always)]
    fn op_init(
        &self,
        h: Sh,
        kind: OpKind,
        m: Mechanism<'_>,
        key: Oh,
        init: bounded::Init,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        let started = self.started();
        let start = self.op_clock();
        let (function, op) = init_of(kind);
        let info = if key == CK_INVALID_HANDLE {
            None // C_DigestInit
        } else {
            self.authorize(function, key, HandleKind::Key, Some(op), Some(m.kind()))?
        };
        // A key under a quorum rule: the vendor's *Init waits for approval
        // when the mechanism can be kept until then.
        let mut quorum = false;
        if matches!(kind, OpKind::Sign | OpKind::SignRecover | OpKind::Decrypt)
            && self.quorum_possible()
        {
            if let (Some(rule), Some(ki)) = (self.quorum_rule(info.as_deref(), op), &info) {
                let vendor = (key, init);
                if self.quorum_init(&sess, (kind, op), &rule, ki.clone(), &m, vendor)? {
                    self.audit_init(&sess, kind, m.kind(), info, started, &Ok(()));
                    return Ok(());
                }
                quorum = true;
            }
        }
        let r = self.on_session(&sess, None, |mem, mi, vh| {
            let k = if key == CK_INVALID_HANDLE {
                key
            } else {
                self.object_on(slot, mi, key)?
            };
            bounded::init(mem, vh, m, k, init)
        });
        if key != CK_INVALID_HANDLE {
            self.audit_init(&sess, kind, m.kind(), info, started, &r);
        }
        if r.is_err() {
            self.op_done(slot, kind.into(), false, start);
            if quorum {
                self.quorum_forget(&sess, kind);
            }
        }
        r?;
        if sess.replay {
            sess.state.lock().ops.start(kind, m.save(), key);
        }
        Ok(())
    }

    /// A call that ends an operation unless it is a size query or
    /// `CKR_BUFFER_TOO_SMALL` (single-part calls and `*Final`).
    /// `single`: the single-part call (its `data` may be hashed into the
    /// audit record), else `*Final`.
    #[inline(always)]
    fn op_last(
        &self,
        h: Sh,
        kind: OpKind,
        single: bool,
        data: &[u8],
        size_query: bool,
        mut call: impl FnMut(&Member, Sh) -> Result<()>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let started = self.started();
        let start = self.op_clock();
        let quorum = matches!(kind, OpKind::Sign | OpKind::SignRecover | OpKind::Decrypt)
            && self.quorum_possible();
        if quorum {
            let function = super::audit::op_function(kind, single);
            let input = single.then_some(data);
            if let Err(e) = self.quorum_gate(&sess, kind, input, size_query, function) {
                self.op_done(sess.slot, kind.into(), false, start);
                return Err(e);
            }
        }
        let mut served = None;
        let r = self.on_session(&sess, Some(kind), |m, mi, vh| {
            served = Some(mi);
            call(m, vh)
        });
        if final_outcome(&r, size_query) == Outcome::Ended {
            if quorum {
                self.quorum_forget(&sess, kind);
            }
            self.op_done(sess.slot, kind.into(), r.is_ok(), start);
            if sess.replay {
                sess.state.lock().ops.end(kind);
            }
            let single = single.then_some(data);
            self.audit_end(&sess, kind, single, served, started, &r);
        }
        r
    }

    /// `*Update`: records the input for replay (a size query consumes
    /// none), or ends the operation on failure.
    #[inline(always)]
    fn op_update(
        &self,
        h: Sh,
        kind: OpKind,
        input: Bytes<'_>,
        size_query: bool,
        mut call: impl FnMut(&Member, Sh) -> Result<()>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let start = self.op_clock();
        // A quorum op streams to the vendor; its input is hashed for the
        // approval of the result.
        let quorum = matches!(kind, OpKind::Sign | OpKind::SignRecover | OpKind::Decrypt)
            && self.quorum_possible();
        if quorum {
            self.quorum_start(&sess, kind)?;
        }
        let r = self.on_session(&sess, Some(kind), |m, _, vh| call(m, vh));
        if r.as_ref()
            .is_err_and(|e| !matches!(e, Error::Vendor(CKR_BUFFER_TOO_SMALL)))
        {
            self.op_done(sess.slot, kind.into(), false, start);
            if quorum {
                self.quorum_forget(&sess, kind);
            }
        }
        if quorum && r.is_ok() && !size_query {
            self.quorum_fed(&sess, kind, input.as_slice());
        }
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
        mut call: impl FnMut(&Member, Sh) -> Result<()>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let r = self.on_session(&sess, None, |m, _, vh| call(m, vh));
        let mut st = sess.state.lock();
        for k in kinds {
            st.ops.taint(k);
        }
        r
    }

    fn plain(&self, h: Sh, mut call: impl FnMut(&Member, Sh) -> Result<()>) -> Result<()> {
        let sess = self.session(h)?;
        self.on_session(&sess, None, |m, _, vh| call(m, vh))
    }

    pub fn encrypt_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(h, OpKind::Encrypt, m, key, Vendor::encrypt_init)
    }
    pub fn decrypt_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(h, OpKind::Decrypt, m, key, Vendor::decrypt_init)
    }
    pub fn sign_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(h, OpKind::Sign, m, key, Vendor::sign_init)
    }
    pub fn verify_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(h, OpKind::Verify, m, key, Vendor::verify_init)
    }
    pub fn sign_recover_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(h, OpKind::SignRecover, m, key, Vendor::sign_recover_init)
    }
    pub fn verify_recover_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        self.op_init(
            h,
            OpKind::VerifyRecover,
            m,
            key,
            Vendor::verify_recover_init,
        )
    }
    pub fn digest_init(&self, h: Sh, m: Mechanism<'_>) -> Result<()> {
        self.op_init(h, OpKind::Digest, m, CK_INVALID_HANDLE, |v, s, m, _| {
            v.digest_init(s, m)
        })
    }

    pub fn encrypt(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_last(h, OpKind::Encrypt, true, d.as_slice(), q, |m, s| {
            bounded::in_out(m, s, d, &mut out, Vendor::encrypt)
        })
    }
    pub fn encrypt_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_update(h, OpKind::Encrypt, d, q, |m, s| {
            bounded::in_out(m, s, d, &mut out, Vendor::encrypt_update)
        })
    }
    pub fn encrypt_final(&self, h: Sh, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_last(h, OpKind::Encrypt, false, &[], q, |m, s| {
            bounded::out_only(m, s, &mut out, Vendor::encrypt_final)
        })
    }
    pub fn decrypt(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_last(h, OpKind::Decrypt, true, d.as_slice(), q, |m, s| {
            bounded::in_out(m, s, d, &mut out, Vendor::decrypt)
        })
    }
    pub fn decrypt_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_update(h, OpKind::Decrypt, d, q, |m, s| {
            bounded::in_out(m, s, d, &mut out, Vendor::decrypt_update)
        })
    }
    pub fn decrypt_final(&self, h: Sh, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_last(h, OpKind::Decrypt, false, &[], q, |m, s| {
            bounded::out_only(m, s, &mut out, Vendor::decrypt_final)
        })
    }
    pub fn digest(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_last(h, OpKind::Digest, true, d.as_slice(), q, |m, s| {
            bounded::in_out(m, s, d, &mut out, Vendor::digest)
        })
    }
    pub fn digest_update(&self, h: Sh, d: Bytes<'_>) -> Result<()> {
        self.op_update(h, OpKind::Digest, d, false, |m, s| {
            bounded::in_only(m, s, d, Vendor::digest_update)
        })
    }
    pub fn digest_final(&self, h: Sh, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_last(h, OpKind::Digest, false, &[], q, |m, s| {
            bounded::out_only(m, s, &mut out, Vendor::digest_final)
        })
    }
    pub fn sign(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_last(h, OpKind::Sign, true, d.as_slice(), q, |m, s| {
            bounded::in_out(m, s, d, &mut out, Vendor::sign)
        })
    }
    pub fn sign_update(&self, h: Sh, d: Bytes<'_>) -> Result<()> {
        self.op_update(h, OpKind::Sign, d, false, |m, s| {
            bounded::in_only(m, s, d, Vendor::sign_update)
        })
    }
    pub fn sign_final(&self, h: Sh, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_last(h, OpKind::Sign, false, &[], q, |m, s| {
            bounded::out_only(m, s, &mut out, Vendor::sign_final)
        })
    }
    pub fn sign_recover(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_last(h, OpKind::SignRecover, true, d.as_slice(), q, |m, s| {
            bounded::in_out(m, s, d, &mut out, Vendor::sign_recover)
        })
    }
    pub fn verify(&self, h: Sh, d: Bytes<'_>, sig: Bytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Verify, true, d.as_slice(), false, |m, s| {
            bounded::in_in(m, s, d, sig, Vendor::verify)
        })
    }
    pub fn verify_update(&self, h: Sh, d: Bytes<'_>) -> Result<()> {
        self.op_update(h, OpKind::Verify, d, false, |m, s| {
            bounded::in_only(m, s, d, Vendor::verify_update)
        })
    }
    pub fn verify_final(&self, h: Sh, sig: Bytes<'_>) -> Result<()> {
        self.op_last(h, OpKind::Verify, false, &[], false, |m, s| {
            bounded::in_only(m, s, sig, Vendor::verify_final)
        })
    }
    pub fn verify_recover(&self, h: Sh, sig: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        let q = out.is_size_query();
        self.op_last(h, OpKind::VerifyRecover, true, &[], q, |m, s| {
            bounded::in_out(m, s, sig, &mut out, Vendor::verify_recover)
        })
    }

    pub fn digest_key(&self, h: Sh, key: Oh) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        let f = "C_DigestKey";
        let started = self.started();
        let info = self.authorize(f, key, HandleKind::Key, Some(Op::Digest), None)?;
        let r = self.on_session(&sess, Some(OpKind::Digest), |m, mi, vh| {
            m.vendor.digest_key(vh, self.object_on(slot, mi, key)?)
        });
        let key = info.map(|i| i.key_ref.clone());
        self.audit_call((Kind::KeyUse, f), slot, None, key, started, &r);
        let mut st = sess.state.lock();
        match r {
            Ok(()) => st.ops.taint(OpKind::Digest),
            Err(_) => st.ops.end(OpKind::Digest),
        }
        r
    }

    pub fn digest_encrypt_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.dual_update(h, [OpKind::Digest, OpKind::Encrypt], |v, s| {
            v.vendor.digest_encrypt_update(s, d, out.reborrow())
        })
    }
    pub fn decrypt_digest_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.dual_update(h, [OpKind::Decrypt, OpKind::Digest], |v, s| {
            v.vendor.decrypt_digest_update(s, d, out.reborrow())
        })
    }
    pub fn sign_encrypt_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.dual_update(h, [OpKind::Sign, OpKind::Encrypt], |v, s| {
            v.vendor.sign_encrypt_update(s, d, out.reborrow())
        })
    }
    pub fn decrypt_verify_update(&self, h: Sh, d: Bytes<'_>, mut out: OutBytes<'_>) -> Result<()> {
        self.dual_update(h, [OpKind::Decrypt, OpKind::Verify], |v, s| {
            v.vendor.decrypt_verify_update(s, d, out.reborrow())
        })
    }

    pub fn seed_random(&self, h: Sh, d: Bytes<'_>) -> Result<()> {
        self.plain(h, |v, s| v.vendor.seed_random(s, d))
    }
    pub fn generate_random(&self, h: Sh, mut out: BytesMut<'_>) -> Result<()> {
        self.plain(h, |m, s| bounded::random(m, s, &mut out))
    }
    pub fn get_function_status(&self, h: Sh) -> Result<()> {
        self.plain(h, |v, s| v.vendor.get_function_status(s))
    }
    pub fn cancel_function(&self, h: Sh) -> Result<()> {
        self.plain(h, |v, s| v.vendor.cancel_function(s))
    }
    pub fn session_cancel(&self, h: Sh, flags: CK_FLAGS) -> Result<()> {
        self.plain(h, |v, s| v.vendor.session_cancel(s, flags))
    }

    pub fn wrap_key(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        wrapping: Oh,
        key: Oh,
        out: OutBytes<'_>,
    ) -> Result<()> {
        let q = out.is_size_query();
        self.as_op(h, crate::metrics::Op::Wrap, q, || {
            self.wrap_key_op(h, m, wrapping, key, out)
        })
    }

    fn wrap_key_op(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        wrapping: Oh,
        key: Oh,
        mut out: OutBytes<'_>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        let mech = Some(m.kind());
        let f = "C_WrapKey";
        let started = self.started();
        let info = self.authorize(f, wrapping, HandleKind::Wrapping, Some(Op::Wrap), mech)?;
        self.authorize(f, key, HandleKind::Key, None, None)?;
        if !out.is_size_query() {
            self.quorum_call(f, info.as_ref(), Op::Wrap, mech, None)?;
        }
        let size_query = out.is_size_query();
        let r = self.on_session(&sess, None, |mem, mi, vh| {
            mem.vendor.wrap_key(
                vh,
                m,
                self.object_on(slot, mi, wrapping)?,
                self.object_on(slot, mi, key)?,
                out.reborrow(),
            )
        });
        if !size_query && !matches!(r, Err(Error::Vendor(CKR_BUFFER_TOO_SMALL))) {
            let wrapping = info.map(|i| i.key_ref.clone());
            self.audit_call((Kind::KeyUse, f), slot, mech, wrapping, started, &r);
        }
        r
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
        out: Out<'_, Oh>,
    ) -> Result<()> {
        self.as_op(h, crate::metrics::Op::Unwrap, false, || {
            self.unwrap_key_op(h, m, unwrapping, wrapped, t, out)
        })
    }

    fn unwrap_key_op(
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
        let mech = Some(m.kind());
        let f = "C_UnwrapKey";
        let started = self.started();
        let kind = HandleKind::Unwrapping;
        let info = self.authorize(f, unwrapping, kind, Some(Op::Unwrap), mech)?;
        self.authorize_new(f, Op::Unwrap, &t, None, mech)?;
        let data = Some(wrapped.as_slice());
        self.quorum_call(f, info.as_ref(), Op::Unwrap, mech, data)?;
        let r = self.on_session(&sess, None, |mem, mi, vh| {
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
        });
        let key = info.map(|i| i.key_ref.clone());
        self.audit_call((Kind::KeyUse, f), slot, mech, key, started, &r);
        let (o, made_on) = r?;
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
        out: Out<'_, Oh>,
    ) -> Result<()> {
        self.as_op(h, crate::metrics::Op::Derive, false, || {
            self.derive_key_op(h, m, base, t, out)
        })
    }

    fn derive_key_op(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        base: Oh,
        t: Template<'_>,
        mut out: Out<'_, Oh>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        let mech = Some(m.kind());
        let f = "C_DeriveKey";
        let started = self.started();
        let info = self.authorize(f, base, HandleKind::Key, Some(Op::Derive), mech)?;
        if let Some(other) = m.handle_param() {
            self.authorize(f, other, HandleKind::Key, Some(Op::Derive), mech)?;
        }
        self.authorize_new(f, Op::Derive, &t, None, mech)?;
        self.quorum_call(f, info.as_ref(), Op::Derive, mech, None)?;
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
        let r = self.on_session(&sess, None, |mem, mi, vh| {
            let k = derive(mem, mi, vh, None)?;
            Ok((self.app_object(slot, mi, &mem.vendor, vh, Some(h), k), mi))
        });
        let key = info.map(|i| i.key_ref.clone());
        self.audit_call((Kind::KeyUse, f), slot, mech, key, started, &r);
        let (o, made_on) = r?;
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
                    self.plain(h, |v, s| v.vendor.$name(s, $($p.reborrow_arg()),*))
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
        self.plain(h, |v, s| v.vendor.message_encrypt_final(s))
    }
    pub fn message_decrypt_final(&self, h: Sh) -> Result<()> {
        self.plain(h, |v, s| v.vendor.message_decrypt_final(s))
    }
    pub fn message_sign_final(&self, h: Sh) -> Result<()> {
        self.plain(h, |v, s| v.vendor.message_sign_final(s))
    }
    pub fn message_verify_final(&self, h: Sh) -> Result<()> {
        self.plain(h, |v, s| v.vendor.message_verify_final(s))
    }
    pub fn message_encrypt_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        let f = ("C_MessageEncryptInit", Op::Encrypt);
        self.message_init(h, m, key, f, Vendor::message_encrypt_init)
    }
    pub fn message_decrypt_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        let f = ("C_MessageDecryptInit", Op::Decrypt);
        self.message_init(h, m, key, f, Vendor::message_decrypt_init)
    }
    pub fn message_sign_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        let f = ("C_MessageSignInit", Op::Sign);
        self.message_init(h, m, key, f, Vendor::message_sign_init)
    }
    pub fn message_verify_init(&self, h: Sh, m: Mechanism<'_>, key: Oh) -> Result<()> {
        let f = ("C_MessageVerifyInit", Op::Verify);
        self.message_init(h, m, key, f, Vendor::message_verify_init)
    }

    /// `C_Message*Init`: checked and recorded like a key's `*Init`; the
    /// messages that follow are not recorded one by one.
    fn message_init(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        key: Oh,
        (function, op): (&'static str, Op),
        init: fn(&Vendor, Sh, Mechanism<'_>, Oh) -> Result<()>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let started = self.started();
        let mech = Some(m.kind());
        let info = self.authorize(function, key, HandleKind::Key, Some(op), mech)?;
        let r = self.on_session(&sess, None, |mem, mi, vh| {
            init(&mem.vendor, vh, m, self.object_on(sess.slot, mi, key)?)
        });
        let key = info.map(|i| i.key_ref.clone());
        self.audit_call((Kind::KeyUse, function), sess.slot, mech, key, started, &r);
        r
    }
}
