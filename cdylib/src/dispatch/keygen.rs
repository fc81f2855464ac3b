//! Key generation (PKCS#11 section 5.14), and token keys generated on a
//! multi-member slot put on every member.
//!
//! A key generated on one member exists only there. When the slot names a
//! `replication_key` (a secret key present on every member, marked
//! `CKA_TRUSTED` by the security officer), the new key is generated
//! sensitive, extractable and `CKA_WRAP_WITH_TRUSTED` (so only a trusted key
//! can ever wrap it), wrapped under the replication key with
//! `CKM_AES_KEY_WRAP_PAD`, and unwrapped on every other member with the same
//! attributes, `CKA_ID` and `CKA_LABEL`; the public key of a pair is created
//! on each member from its public attributes. When the application asked
//! for a non-extractable key, every copy is then made non-extractable
//! (`CKA_EXTRACTABLE` may go from true to false, never back). Attributes
//! report what is true: such a key shows `CKA_EXTRACTABLE` false, and
//! `CKA_NEVER_EXTRACTABLE` and (on the copies) `CKA_LOCAL` false, since it
//! was extractable under a trusted key once.

use pkcs11_sys::*;
use zeroize::Zeroizing;

use std::sync::Arc;

use super::resync::Remake;
use super::{Library, Session};
use crate::abi::mem::{Bytes, Mechanism, Out, OutBytes, RawMechanism, SavedTemplate, Template};
use crate::backend::Vendor;
use crate::error::{Error, Result};
use crate::policy::Op;
use crate::router::Member;
use p11shim_audit::Kind;

type Sh = CK_SESSION_HANDLE;
type Oh = CK_OBJECT_HANDLE;

/// Attributes copied from a generated secret or private key to its copies.
const KEY_ATTRS: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_ID,
    CKA_LABEL,
    CKA_PRIVATE,
    CKA_SENSITIVE,
    CKA_SIGN,
    CKA_SIGN_RECOVER,
    CKA_VERIFY,
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_WRAP,
    CKA_UNWRAP,
    CKA_DERIVE,
    CKA_MODIFIABLE,
    CKA_WRAP_WITH_TRUSTED,
    CKA_ALWAYS_AUTHENTICATE,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_SUBJECT,
];

/// Attributes copied from a generated public key to its copies.
const PUBLIC_ATTRS: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_ID,
    CKA_LABEL,
    CKA_PRIVATE,
    CKA_VERIFY,
    CKA_VERIFY_RECOVER,
    CKA_ENCRYPT,
    CKA_WRAP,
    CKA_DERIVE,
    CKA_MODIFIABLE,
    CKA_MODULUS,
    CKA_PUBLIC_EXPONENT,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_SUBJECT,
];

const TRUE: [u8; 1] = [CK_TRUE];
const FALSE: [u8; 1] = [CK_FALSE];

/// Reads the attributes an object has among `types` (two calls: lengths,
/// then values).
fn read_attributes(
    v: &Vendor,
    s: Sh,
    o: Oh,
    types: &[CK_ATTRIBUTE_TYPE],
) -> Result<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>> {
    let mut attrs: Vec<CK_ATTRIBUTE> = types
        .iter()
        .map(|t| CK_ATTRIBUTE {
            type_: *t,
            pValue: std::ptr::null_mut(),
            ulValueLen: 0,
        })
        .collect();
    match v.get_attribute_value(s, o, Template::from_slice(&mut attrs)) {
        Ok(()) | Err(Error::Vendor(CKR_ATTRIBUTE_TYPE_INVALID | CKR_ATTRIBUTE_SENSITIVE)) => {}
        Err(e) => return Err(e),
    }
    attrs.retain(|a| a.ulValueLen != CK_UNAVAILABLE_INFORMATION);
    let mut values: Vec<Vec<u8>> = attrs
        .iter()
        .map(|a| vec![0u8; a.ulValueLen as usize])
        .collect();
    for (a, buf) in attrs.iter_mut().zip(values.iter_mut()) {
        a.pValue = buf.as_mut_ptr().cast();
    }
    v.get_attribute_value(s, o, Template::from_slice(&mut attrs))?;
    Ok(attrs.iter().map(|a| a.type_).zip(values).collect())
}

/// The member's handle of the secret key labelled `label`.
fn find_key(v: &Vendor, s: Sh, label: &str) -> Result<Oh> {
    let t = SavedTemplate::from_values(vec![
        (CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec()),
        (CKA_LABEL, label.as_bytes().to_vec()),
    ]);
    let mut raw = t.to_raw();
    v.find_objects_init(s, Template::from_slice(&mut raw))?;
    let mut found = [CK_INVALID_HANDLE; 2];
    let mut n: CK_ULONG = 0;
    let r = v.find_objects(s, &mut found, &mut n);
    let _ = v.find_objects_final(s);
    r?;
    match n {
        1 => Ok(found[0]),
        _ => {
            tracing::error!(
                label,
                found = n,
                "the replication key must exist exactly once on every member"
            );
            Err(Error::NotReplicated)
        }
    }
}

fn wrap_mechanism() -> RawMechanism {
    RawMechanism(CK_MECHANISM {
        mechanism: CKM_AES_KEY_WRAP_PAD,
        pParameter: std::ptr::null_mut(),
        ulParameterLen: 0,
    })
}

/// A generated key on its source member, and what its copies need.
struct Generated<'a> {
    member: &'a Member,
    /// The key's handle on the source member.
    vendor: Oh,
    /// p11shim's handle.
    handle: Oh,
}

impl Library {
    /// Whether these templates make token keys that must reach every member.
    fn multi_member_token(&self, sess: &Session, templates: &[Template<'_>]) -> bool {
        self.slots[sess.slot as usize].members.len() > 1
            && templates
                .iter()
                .any(|t| t.bool_attr(CKA_TOKEN) == Some(true))
    }

    /// How token keys are generated on this slot: `None` to generate them
    /// on one member only (`allow_unreplicated`), the replication key's
    /// label otherwise; an error when neither is configured.
    fn replication(&self, sess: &Session) -> Result<Option<String>> {
        let slot = &self.slots[sess.slot as usize];
        match (&slot.cfg.replication_key, slot.cfg.allow_unreplicated) {
            (Some(label), _) => Ok(Some(label.clone())),
            (None, true) => {
                tracing::warn!(
                    slot = slot.cfg.id,
                    "token key generated on one member only (allow_unreplicated)"
                );
                Ok(None)
            }
            (None, false) => {
                tracing::warn!(
                    slot = slot.cfg.id,
                    "no replication_key: a token key generated on one member would not reach the others; refused"
                );
                Err(Error::NotReplicated)
            }
        }
    }

    /// The template a replicated key is generated with: sensitive unless
    /// the application said otherwise, extractable only under a trusted key.
    fn generation_template(t: &Template<'_>) -> Result<SavedTemplate> {
        let saved = t.save().ok_or(Error::NotReplicated)?;
        let saved = saved
            .with(CKA_EXTRACTABLE, TRUE.to_vec())
            .with(CKA_WRAP_WITH_TRUSTED, TRUE.to_vec());
        Ok(if t.bool_attr(CKA_SENSITIVE).is_none() {
            saved.with(CKA_SENSITIVE, TRUE.to_vec())
        } else {
            saved
        })
    }

    pub fn generate_key(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        t: Template<'_>,
        out: Out<'_, Oh>,
    ) -> Result<()> {
        self.as_op(h, crate::metrics::Op::Generate, false, || {
            self.generate_key_op(h, m, t, out)
        })
    }

    fn generate_key_op(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        t: Template<'_>,
        mut out: Out<'_, Oh>,
    ) -> Result<()> {
        let slot = self.session(h)?.slot;
        let (f, mech) = ("C_GenerateKey", Some(m.kind()));
        self.authorize_new(f, Op::Generate, &t, Some(CKO_SECRET_KEY), mech)?;
        let started = self.started();
        let r = self.generate_key_made(h, m, t);
        let made = r.as_ref().ok().and_then(|o| self.key_ref(*o));
        self.audit_call((Kind::KeyManagement, f), slot, mech, made, started, &r);
        out.write(r?);
        Ok(())
    }

    fn generate_key_made(&self, h: Sh, m: Mechanism<'_>, t: Template<'_>) -> Result<Oh> {
        let sess = self.session(h)?;
        let label = if self.multi_member_token(&sess, &[t]) {
            self.replication(&sess)?
        } else {
            None
        };
        let Some(label) = label else {
            let o = self.on_session(&sess, None, |mem, mi, vh| {
                let mut k = CK_INVALID_HANDLE;
                mem.vendor.generate_key(vh, m, t, &mut k)?;
                Ok(self.app_object(sess.slot, mi, &mem.vendor, vh, Some(h), k))
            })?;
            return Ok(o);
        };
        let gen_t = Self::generation_template(&t)?;
        let (o, mi, v) = self.on_session(&sess, None, |mem, mi, vh| {
            let mut raw = gen_t.to_raw();
            let mut k = CK_INVALID_HANDLE;
            mem.vendor
                .generate_key(vh, m, Template::from_slice(&mut raw), &mut k)?;
            Ok((
                self.app_object(sess.slot, mi, &mem.vendor, vh, Some(h), k),
                mi,
                k,
            ))
        })?;
        let member = &self.slots[sess.slot as usize].members[mi as usize];
        let key = Generated {
            member,
            vendor: v,
            handle: o,
        };
        self.spread(&sess, mi, &key, None, &label, t.bool_attr(CKA_EXTRACTABLE))?;
        Ok(o)
    }

    pub fn generate_key_pair(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        pub_t: Template<'_>,
        priv_t: Template<'_>,
        pub_out: Out<'_, Oh>,
        priv_out: Out<'_, Oh>,
    ) -> Result<()> {
        self.as_op(h, crate::metrics::Op::Generate, false, || {
            self.generate_key_pair_op(h, m, pub_t, priv_t, pub_out, priv_out)
        })
    }

    fn generate_key_pair_op(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        pub_t: Template<'_>,
        priv_t: Template<'_>,
        mut pub_out: Out<'_, Oh>,
        mut priv_out: Out<'_, Oh>,
    ) -> Result<()> {
        let slot = self.session(h)?.slot;
        let (f, mech) = ("C_GenerateKeyPair", Some(m.kind()));
        self.authorize_new(f, Op::Generate, &pub_t, Some(CKO_PUBLIC_KEY), mech)?;
        self.authorize_new(f, Op::Generate, &priv_t, Some(CKO_PRIVATE_KEY), mech)?;
        let started = self.started();
        let r = self.generate_key_pair_made(h, m, pub_t, priv_t);
        let made = r.as_ref().ok().and_then(|(_, sk)| self.key_ref(*sk));
        self.audit_call((Kind::KeyManagement, f), slot, mech, made, started, &r);
        let (pk, sk) = r?;
        pub_out.write(pk);
        priv_out.write(sk);
        Ok(())
    }

    fn generate_key_pair_made(
        &self,
        h: Sh,
        m: Mechanism<'_>,
        pub_t: Template<'_>,
        priv_t: Template<'_>,
    ) -> Result<(Oh, Oh)> {
        let sess = self.session(h)?;
        let label = if self.multi_member_token(&sess, &[priv_t]) {
            self.replication(&sess)?
        } else {
            None
        };
        let gen_t = match &label {
            Some(_) => Some(Self::generation_template(&priv_t)?),
            None => None,
        };
        let (pk, sk, mi, pv, sv) = self.on_session(&sess, None, |mem, mi, vh| {
            let (mut pk, mut sk) = (CK_INVALID_HANDLE, CK_INVALID_HANDLE);
            let mut raw = gen_t.as_ref().map(SavedTemplate::to_raw);
            let priv_template = raw.as_mut().map_or(priv_t, |r| Template::from_slice(r));
            mem.vendor
                .generate_key_pair(vh, m, pub_t, priv_template, &mut pk, &mut sk)?;
            Ok((
                self.app_object(sess.slot, mi, &mem.vendor, vh, Some(h), pk),
                self.app_object(sess.slot, mi, &mem.vendor, vh, Some(h), sk),
                mi,
                pk,
                sk,
            ))
        })?;
        if let Some(label) = label {
            let member = &self.slots[sess.slot as usize].members[mi as usize];
            let key = Generated {
                member,
                vendor: sv,
                handle: sk,
            };
            let public = Generated {
                member,
                vendor: pv,
                handle: pk,
            };
            self.spread(
                &sess,
                mi,
                &key,
                Some(&public),
                &label,
                priv_t.bool_attr(CKA_EXTRACTABLE),
            )?;
        }
        Ok((pk, sk))
    }

    /// Puts a generated key (and its public key) on every other member that
    /// is up; when the source cannot give it away, the key is destroyed and
    /// the generation fails with `CKR_P11SHIM_NOT_REPLICATED`.
    fn spread(
        &self,
        sess: &Session,
        made_on: u32,
        key: &Generated<'_>,
        public: Option<&Generated<'_>>,
        label: &str,
        extractable: Option<bool>,
    ) -> Result<()> {
        let src = key.member;
        let prepared = src.with_control(|cs| {
            let attrs = read_attributes(&src.vendor, cs, key.vendor, KEY_ATTRS)?;
            let public_attrs = match public {
                Some(p) => Some(read_attributes(&src.vendor, cs, p.vendor, PUBLIC_ATTRS)?),
                None => None,
            };
            let rk = find_key(&src.vendor, cs, label)?;
            let mech = wrap_mechanism();
            let mut len: CK_ULONG = 0;
            src.vendor
                .wrap_key(cs, mech.view(), rk, key.vendor, OutBytes::new_len(&mut len))?;
            let mut wrapped = Zeroizing::new(vec![0u8; len as usize]);
            src.vendor.wrap_key(
                cs,
                mech.view(),
                rk,
                key.vendor,
                OutBytes::from_local(&mut wrapped, &mut len),
            )?;
            wrapped.truncate(len as usize);
            Ok((attrs, public_attrs, wrapped))
        });
        let (attrs, public_attrs, wrapped) = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(member = %src.name, label, error = %e,
                    "the new key cannot be wrapped under the replication key (is it marked CKA_TRUSTED on every member?); key destroyed");
                let _ = src.with_control(|cs| {
                    let _ = src.vendor.destroy_object(cs, key.vendor);
                    if let Some(p) = public {
                        let _ = src.vendor.destroy_object(cs, p.vendor);
                    }
                    Ok(())
                });
                self.objects.forget(&[key.handle]);
                if let Some(p) = public {
                    self.objects.forget(&[p.handle]);
                }
                return Err(Error::NotReplicated);
            }
        };
        let final_extractable = extractable.unwrap_or(true);
        let unwrap_t = SavedTemplate::from_values(attrs)
            .with(CKA_TOKEN, TRUE.to_vec())
            .with(
                CKA_EXTRACTABLE,
                if final_extractable {
                    TRUE.to_vec()
                } else {
                    FALSE.to_vec()
                },
            );
        let slot = sess.slot;
        // The wrapped key is kept (wiped when dropped) until every member
        // that is down has received it.
        let rk_label = label.to_owned();
        let unwrap: Remake = Arc::new(move |_, m, _, cs| {
            let rk = find_key(&m.vendor, cs, &rk_label)?;
            let mech = wrap_mechanism();
            let mut raw = unwrap_t.to_raw();
            let mut k = CK_INVALID_HANDLE;
            m.vendor.unwrap_key(
                cs,
                mech.view(),
                rk,
                Bytes::from_slice(&wrapped),
                Template::from_slice(&mut raw),
                &mut k,
            )?;
            Ok(k)
        });
        self.replicate(
            sess,
            made_on,
            key.handle,
            "generated key",
            |m, mi, cs| unwrap(self, m, mi, cs),
            Some(unwrap.clone()),
        );
        if let (Some(p), Some(pa)) = (public, public_attrs) {
            let create_t = SavedTemplate::from_values(pa).with(CKA_TOKEN, TRUE.to_vec());
            let create: Remake = Arc::new(move |_, m, _, cs| {
                let mut raw = create_t.to_raw();
                let mut k = CK_INVALID_HANDLE;
                m.vendor
                    .create_object(cs, Template::from_slice(&mut raw), &mut k)?;
                Ok(k)
            });
            self.replicate(
                sess,
                made_on,
                p.handle,
                "generated public key",
                |m, mi, cs| create(self, m, mi, cs),
                Some(create.clone()),
            );
        }
        if !final_extractable {
            let mut no = [CK_ATTRIBUTE {
                type_: CKA_EXTRACTABLE,
                pValue: FALSE.as_ptr().cast_mut().cast(),
                ulValueLen: 1,
            }];
            src.with_control(|cs| {
                src.vendor
                    .set_attribute_value(cs, key.vendor, Template::from_slice(&mut no))
            })?;
        }
        tracing::info!(slot, label, "generated key put on every member up");
        Ok(())
    }
}
