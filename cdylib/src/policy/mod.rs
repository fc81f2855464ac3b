//! Policy: the role's key ACL, compiled once, and pure allow/deny
//! decisions over an object's attributes.
//!
//! The rules come from the broker's grant or from the `[acl]` section
//! (`p11shim_proto::policy` holds the document and its validation). For an
//! object, [`Acl::grant`] folds every rule that selects it into one
//! [`Grant`]; dispatch caches that with the object's handle, so a key's
//! `*Init` costs one lookup and [`Grant::check`]. New objects (created,
//! generated, unwrapped, derived, copied, renamed) are checked against the
//! rules by their template with [`Acl::may_create`].
//!
//! Nothing here calls a vendor or takes a lock.

use std::sync::Arc;

use pkcs11_sys::*;

pub use p11shim_proto::policy::{Attrs, Op, OpSet, Policy, PolicyDoc, Quorum, Rule};

/// `a` with the selector attributes a template sets replaced: the object a
/// copy or an attribute change would leave.
pub fn overridden(a: &Attrs, t: &Attrs) -> Attrs {
    Attrs {
        class: t.class.or(a.class),
        key_type: t.key_type.or(a.key_type),
        id: t.id.clone().or_else(|| a.id.clone()),
        label: t.label.clone().or_else(|| a.label.clone()),
        unique_id: a.unique_id.clone(),
    }
}

fn from_template(items: &[(CK_ATTRIBUTE_TYPE, &[u8])]) -> Attrs {
    let ulong = |v: &[u8]| -> Option<u64> {
        let b: [u8; std::mem::size_of::<CK_ULONG>()] = v.try_into().ok()?;
        Some(CK_ULONG::from_ne_bytes(b) as u64)
    };
    let mut a = Attrs::default();
    for (t, v) in items {
        match *t {
            CKA_CLASS => a.class = ulong(v),
            CKA_KEY_TYPE => a.key_type = ulong(v),
            CKA_ID => a.id = Some(v.to_vec()),
            CKA_LABEL => a.label = Some(v.to_vec()),
            _ => {}
        }
    }
    a
}

/// What a role may do with one object: every selecting rule folded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// Some rule selects the object: it exists for the role.
    pub visible: bool,
    pub ops: OpSet,
    /// Operations granted only with the mechanisms listed for them.
    restricted: OpSet,
    mechanisms: Vec<(Op, Arc<[u64]>)>,
}

/// Why a decision denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No rule selects the object: it does not exist for the role.
    Invisible,
    /// The object is visible, but no rule grants the operation.
    Operation(Op),
    /// The operation is granted, but not with this mechanism.
    Mechanism(Op, u64),
    /// The object a call would create falls outside every rule granting
    /// the operation.
    Template(Op),
}

impl Denial {
    /// The return code the application gets. An invisible object behaves
    /// as an invalid handle, which the caller knows the kind of.
    pub fn rv(self, invisible: CK_RV) -> CK_RV {
        match self {
            Denial::Invisible => invisible,
            Denial::Operation(_) => CKR_KEY_FUNCTION_NOT_PERMITTED,
            Denial::Mechanism(..) => CKR_MECHANISM_INVALID,
            Denial::Template(_) => CKR_TEMPLATE_INCONSISTENT,
        }
    }

    /// A short reason for logs and audit records.
    pub fn reason(self) -> String {
        match self {
            Denial::Invisible => "no rule selects the object".into(),
            Denial::Operation(op) => format!("no rule grants {}", op.name()),
            Denial::Mechanism(op, m) => {
                format!("{} is granted, but not with {}", op.name(), mech_name(m))
            }
            Denial::Template(op) => {
                format!("the new object matches no rule granting {}", op.name())
            }
        }
    }
}

fn mech_name(m: u64) -> String {
    p11shim_proto::names::mechanism_name(m)
        .map(str::to_string)
        .unwrap_or_else(|| format!("mechanism {m:#x}"))
}

impl Grant {
    /// Whether `op` with `mechanism` is allowed on the object.
    #[inline]
    pub fn check(&self, op: Op, mechanism: Option<u64>) -> Result<(), Denial> {
        if !self.visible {
            return Err(Denial::Invisible);
        }
        if !self.ops.contains(op) {
            return Err(Denial::Operation(op));
        }
        if self.restricted.contains(op) {
            let m = mechanism.unwrap_or(u64::MAX);
            let allowed = self
                .mechanisms
                .iter()
                .find(|(o, _)| *o == op)
                .is_some_and(|(_, list)| list.binary_search(&m).is_ok());
            if !allowed {
                return Err(Denial::Mechanism(op, m));
            }
        }
        Ok(())
    }

    /// Everything allowed: no ACL is configured.
    pub fn all() -> Grant {
        Grant {
            visible: true,
            ops: OpSet(u16::MAX),
            ..Grant::default()
        }
    }
}

/// One rule's verdict, for explanations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleVerdict {
    pub index: usize,
    /// `None` when the rule selects the object; else the first selector
    /// that does not match.
    pub mismatch: Option<&'static str>,
    pub grants_op: bool,
    pub mechanism_ok: bool,
}

/// A compiled policy for one role.
#[derive(Debug)]
pub struct Acl {
    pub role: Arc<str>,
    policy: Policy,
}

impl Acl {
    pub fn new(role: &str, policy: Policy) -> Acl {
        Acl {
            role: role.into(),
            policy,
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.policy.rules
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The grant for an object with these attributes.
    pub fn grant(&self, a: &Attrs) -> Grant {
        let mut g = Grant::default();
        let mut any_unrestricted = OpSet::default();
        let mut lists: Vec<(Op, Vec<u64>)> = Vec::new();
        for r in self.policy.rules.iter().filter(|r| r.mismatch(a).is_none()) {
            g.visible = true;
            for op in r.ops.iter() {
                g.ops.insert(op);
                match &r.mechanisms {
                    None => any_unrestricted.insert(op),
                    Some(ms) => match lists.iter_mut().find(|(o, _)| *o == op) {
                        Some((_, l)) => l.extend_from_slice(ms),
                        None => lists.push((op, ms.clone())),
                    },
                }
            }
        }
        for (op, mut l) in lists {
            if any_unrestricted.contains(op) {
                continue;
            }
            l.sort_unstable();
            l.dedup();
            g.restricted.insert(op);
            g.mechanisms.push((op, l.into()));
        }
        g
    }

    /// Whether the role may make an object described by `template` with
    /// `op` (generate, create, unwrap, derive, copy, set-attributes), and
    /// with `mechanism` where the call has one.
    pub fn may_create(
        &self,
        op: Op,
        template: &Attrs,
        mechanism: Option<u64>,
    ) -> Result<(), Denial> {
        match self.grant(template).check(op, mechanism) {
            Ok(()) => Ok(()),
            Err(Denial::Mechanism(..)) if mechanism.is_some() => {
                Err(Denial::Mechanism(op, mechanism.unwrap_or_default()))
            }
            Err(_) => Err(Denial::Template(op)),
        }
    }

    /// Every rule's verdict on an object and an operation, in order.
    pub fn explain(&self, a: &Attrs, op: Op, mechanism: Option<u64>) -> Vec<RuleVerdict> {
        self.policy
            .rules
            .iter()
            .map(|r| RuleVerdict {
                index: r.index,
                mismatch: r.mismatch(a),
                grants_op: r.ops.contains(op),
                mechanism_ok: match (&r.mechanisms, mechanism) {
                    (None, _) => true,
                    (Some(l), Some(m)) => l.binary_search(&m).is_ok(),
                    (Some(_), None) => false,
                },
            })
            .collect()
    }
}

/// The attributes an object made from a template would have: the
/// template's, with the class and key type a generation mechanism implies
/// where the template leaves them out.
pub fn template_attrs(
    items: &[(CK_ATTRIBUTE_TYPE, &[u8])],
    implied_class: Option<CK_OBJECT_CLASS>,
    mechanism: Option<CK_MECHANISM_TYPE>,
) -> Attrs {
    let mut a = from_template(items);
    if a.class.is_none() {
        a.class = implied_class.map(|c| c as u64);
    }
    if a.key_type.is_none() {
        a.key_type = mechanism.and_then(generated_key_type).map(|k| k as u64);
    }
    a
}

/// The key type a generation mechanism makes.
fn generated_key_type(m: CK_MECHANISM_TYPE) -> Option<CK_KEY_TYPE> {
    Some(match m {
        CKM_RSA_PKCS_KEY_PAIR_GEN | CKM_RSA_X9_31_KEY_PAIR_GEN => CKK_RSA,
        CKM_EC_KEY_PAIR_GEN => CKK_EC,
        CKM_EC_EDWARDS_KEY_PAIR_GEN => CKK_EC_EDWARDS,
        CKM_EC_MONTGOMERY_KEY_PAIR_GEN => CKK_EC_MONTGOMERY,
        CKM_DSA_KEY_PAIR_GEN => CKK_DSA,
        CKM_DH_PKCS_KEY_PAIR_GEN => CKK_DH,
        CKM_AES_KEY_GEN => CKK_AES,
        CKM_DES3_KEY_GEN => CKK_DES3,
        CKM_DES2_KEY_GEN => CKK_DES2,
        CKM_GENERIC_SECRET_KEY_GEN => CKK_GENERIC_SECRET,
        CKM_CHACHA20_KEY_GEN => CKK_CHACHA20,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(toml_text: &str) -> Acl {
        let doc: PolicyDoc = toml::from_str(toml_text).unwrap();
        Acl::new("web", doc.validate().unwrap())
    }

    fn key(label: &str, class: CK_OBJECT_CLASS, kt: CK_KEY_TYPE) -> Attrs {
        Attrs {
            class: Some(class as u64),
            key_type: Some(kt as u64),
            id: Some(vec![1, 2]),
            label: Some(label.as_bytes().to_vec()),
            unique_id: None,
        }
    }

    const WEB: &str = r#"keys = [
        { label = "tls-*", class = "private-key", ops = ["sign"], mechanisms = ["RSA_PKCS_PSS", "SHA256_RSA_PKCS_PSS"] },
        { label = "tls-*", class = "private-key", ops = ["sign"], mechanisms = ["ECDSA"] },
        { label = "tls-*", class = "certificate" },
        { id = "0102", class = "secret-key", ops = ["encrypt", "decrypt", "generate"] },
        { label = "scratch-*", ops = ["create", "destroy", "set-attributes", "copy"] },
    ]"#;

    #[test]
    fn an_object_no_rule_selects_is_invisible() {
        let a = acl(WEB);
        let g = a.grant(&key("db-key", CKO_PRIVATE_KEY, CKK_RSA));
        assert!(!g.visible);
        assert_eq!(
            g.check(Op::Sign, Some(CKM_RSA_PKCS_PSS as u64)),
            Err(Denial::Invisible)
        );
        assert_eq!(
            Denial::Invisible.rv(CKR_KEY_HANDLE_INVALID),
            CKR_KEY_HANDLE_INVALID
        );
    }

    #[test]
    fn operations_and_mechanisms() {
        let a = acl(WEB);
        let g = a.grant(&key("tls-web", CKO_PRIVATE_KEY, CKK_RSA));
        assert!(g.visible);
        assert_eq!(g.check(Op::Sign, Some(CKM_RSA_PKCS_PSS as u64)), Ok(()));
        // Lists of two rules granting the same operation are merged.
        assert_eq!(g.check(Op::Sign, Some(CKM_ECDSA as u64)), Ok(()));
        let d = g.check(Op::Sign, Some(CKM_RSA_PKCS as u64)).unwrap_err();
        assert_eq!(d, Denial::Mechanism(Op::Sign, CKM_RSA_PKCS as u64));
        assert_eq!(d.rv(0), CKR_MECHANISM_INVALID);
        assert_eq!(d.reason(), "sign is granted, but not with CKM_RSA_PKCS");
        let d = g.check(Op::Decrypt, Some(CKM_RSA_PKCS as u64)).unwrap_err();
        assert_eq!(d, Denial::Operation(Op::Decrypt));
        assert_eq!(d.rv(0), CKR_KEY_FUNCTION_NOT_PERMITTED);
        // The certificate of the same label: visible, no operation.
        let c = a.grant(&key("tls-web", CKO_CERTIFICATE, 0));
        assert!(c.visible);
        assert_eq!(
            c.check(Op::Destroy, None),
            Err(Denial::Operation(Op::Destroy))
        );
    }

    #[test]
    fn an_unrestricted_rule_lifts_a_mechanism_list() {
        let a = acl(r#"keys = [
            { label = "k", ops = ["sign"], mechanisms = ["ECDSA"] },
            { label = "k", ops = ["sign"] },
        ]"#);
        let g = a.grant(&key("k", CKO_PRIVATE_KEY, CKK_EC));
        assert_eq!(g.check(Op::Sign, Some(CKM_RSA_PKCS as u64)), Ok(()));
    }

    #[test]
    fn every_selector_must_match() {
        let a = acl(WEB);
        let mut k = key("x", CKO_SECRET_KEY, CKK_AES);
        assert!(a.grant(&k).ops.contains(Op::Encrypt));
        k.id = Some(vec![1, 3]);
        assert!(!a.grant(&k).visible);
        k.id = None;
        assert!(!a.grant(&k).visible);
        let mut t = key("tls-web", CKO_PRIVATE_KEY, CKK_RSA);
        t.label = None;
        assert!(!a.grant(&t).visible, "a label glob needs a label");
        let e = a.explain(&t, Op::Sign, Some(CKM_RSA_PKCS as u64));
        assert_eq!(e[0].mismatch, Some("label"));
        assert_eq!(e[3].mismatch, Some("class"));
        assert!(e[0].grants_op && !e[0].mechanism_ok);
    }

    #[test]
    fn new_objects_must_fall_under_a_rule_granting_the_operation() {
        let a = acl(WEB);
        // Generating an AES key with the allowed CKA_ID: class and key type
        // come from the mechanism.
        let t = template_attrs(
            &[(CKA_ID, &[1, 2][..])],
            Some(CKO_SECRET_KEY),
            Some(CKM_AES_KEY_GEN),
        );
        assert_eq!(t.key_type, Some(CKK_AES as u64));
        assert_eq!(
            a.may_create(Op::Generate, &t, Some(CKM_AES_KEY_GEN as u64)),
            Ok(())
        );
        // Another CKA_ID, or no CKA_ID at all.
        let t = template_attrs(&[(CKA_ID, &[9][..])], Some(CKO_SECRET_KEY), None);
        assert_eq!(
            a.may_create(Op::Generate, &t, None),
            Err(Denial::Template(Op::Generate))
        );
        let t = template_attrs(&[], Some(CKO_SECRET_KEY), None);
        assert_eq!(
            Denial::Template(Op::Create).rv(0),
            CKR_TEMPLATE_INCONSISTENT
        );
        assert!(a.may_create(Op::Generate, &t, None).is_err());
        // Create under scratch-*, but not under tls-*.
        let class = (CKO_DATA as CK_ULONG).to_ne_bytes();
        let t = template_attrs(
            &[(CKA_CLASS, &class[..]), (CKA_LABEL, b"scratch-1")],
            None,
            None,
        );
        assert_eq!(a.may_create(Op::Create, &t, None), Ok(()));
        let t = template_attrs(
            &[(CKA_CLASS, &class[..]), (CKA_LABEL, b"tls-1")],
            None,
            None,
        );
        assert_eq!(
            a.may_create(Op::Create, &t, None),
            Err(Denial::Template(Op::Create))
        );
    }

    #[test]
    fn renaming_out_of_a_rule_is_a_template_denial() {
        let a = acl(WEB);
        let cur = key("scratch-1", CKO_DATA, 0);
        let to = Attrs {
            label: Some(b"tls-stolen".to_vec()),
            ..Attrs::default()
        };
        assert_eq!(
            a.may_create(Op::SetAttributes, &overridden(&cur, &to), None),
            Err(Denial::Template(Op::SetAttributes))
        );
        let to = Attrs {
            label: Some(b"scratch-2".to_vec()),
            ..Attrs::default()
        };
        assert_eq!(
            a.may_create(Op::SetAttributes, &overridden(&cur, &to), None),
            Ok(())
        );
    }

    #[test]
    fn the_empty_policy_denies_everything() {
        let a = Acl::new("none", Policy::default());
        assert!(!a.grant(&key("tls-web", CKO_PRIVATE_KEY, CKK_RSA)).visible);
        assert!(a.may_create(Op::Create, &Attrs::default(), None).is_err());
        assert_eq!(Grant::all().check(Op::Destroy, None), Ok(()));
    }
}
