//! The key ACL at every function: the role's compiled policy, its grant
//! on each object (cached with the handle), and the denials.
//!
//! The decisions themselves are `policy`'s pure functions; this file
//! finds the policy in force (the `[acl]` section's, or the one that came
//! with the broker's latest grant), applies it to the handles and
//! templates a call names, and logs every denial.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::{ArcSwap, Guard};
use parking_lot::Mutex;
use pkcs11_sys::*;

use super::{Library, ObjectInfo};
use crate::abi::mem::Template;
use crate::config::AclConfig;
use crate::credentials::Agent;
use crate::error::{Error, Result};
use crate::policy::{Acl, Denial, Grant, Op, Policy, PolicyDoc, overridden, template_attrs};

/// A compiled policy and the epoch that tells cached grants apart.
#[derive(Debug)]
pub struct Compiled {
    pub acl: Acl,
    epoch: u64,
}

impl Compiled {
    /// Whether some key is under a quorum rule.
    #[inline]
    pub fn has_quorum(&self) -> bool {
        !self.acl.policy().quorum.is_empty()
    }
}

/// The policy in force.
#[derive(Debug)]
pub struct AclState {
    mode: Option<AclConfig>,
    compiled: ArcSwap<Compiled>,
    /// The broker grant generation `compiled` was made from.
    from_generation: AtomicU64,
    update: Mutex<()>,
    /// A policy in force had a quorum rule, at some time: sessions may hold
    /// quorum operations (one load on the data path instead of the policy's).
    quorum_seen: AtomicBool,
}

impl AclState {
    pub fn new(mode: Option<AclConfig>, broker_role: Option<&str>) -> AclState {
        let acl = match &mode {
            Some(AclConfig::Config { role, policy, .. }) => Acl::new(role, policy.clone()),
            // Until the broker's first grant, nothing is visible.
            _ => Acl::new(broker_role.unwrap_or("-"), Policy::default()),
        };
        let compiled = Compiled { acl, epoch: 1 };
        AclState {
            mode,
            quorum_seen: AtomicBool::new(compiled.has_quorum()),
            compiled: ArcSwap::from_pointee(compiled),
            from_generation: AtomicU64::new(0),
            update: Mutex::new(()),
        }
    }

    /// Whether a session may hold a quorum operation: a policy with a
    /// quorum rule was in force since the start (once seen, always: an
    /// operation held for approval outlives the policy that asked for it).
    #[inline]
    pub fn quorum_seen(&self) -> bool {
        self.quorum_seen.load(Ordering::Acquire)
    }

    /// The policy in force; `None` when no ACL is configured.
    #[inline]
    ///
    /// A guard, not a clone of the `Arc`: the hot path touches no reference
    /// count shared by every thread.
    pub fn current(&self, agent: Option<&Agent>) -> Option<Guard<Arc<Compiled>>> {
        match (&self.mode, agent) {
            (None, _) => None,
            (Some(AclConfig::Broker), Some(agent))
                if agent.published() != self.from_generation.load(Ordering::Acquire) =>
            {
                Some(Guard::from_inner(self.recompile(agent)))
            }
            _ => Some(self.compiled.load()),
        }
    }

    /// Compiles the policy of the broker's latest grant. A policy that
    /// does not validate hides everything: deny by default.
    #[cold]
    fn recompile(&self, agent: &Agent) -> Arc<Compiled> {
        let _one = self.update.lock();
        let Some((doc, subject, generation)) = agent.policy() else {
            return self.compiled.load_full();
        };
        if generation == self.from_generation.load(Ordering::Acquire) {
            return self.compiled.load_full();
        }
        let policy = match PolicyDoc::from_json(&doc)
            .map_err(|e| e.to_string())
            .and_then(|d| d.validate().map_err(|e| e.to_string()))
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(role = agent.role(), error = %e, "the broker's key ACL policy is invalid; every object is hidden");
                Policy::default()
            }
        };
        let old = self.compiled.load();
        let changed = *old.acl.rules() != policy.rules;
        let next = Arc::new(Compiled {
            acl: Acl::new(agent.role(), policy),
            epoch: if changed { old.epoch + 1 } else { old.epoch },
        });
        if changed {
            tracing::info!(role = agent.role(), subject = %subject, rules = next.acl.rules().len(), "key ACL policy from the broker in force");
        }
        if next.has_quorum() {
            self.quorum_seen.store(true, Ordering::Release);
        }
        self.compiled.store(next.clone());
        self.from_generation.store(generation, Ordering::Release);
        next
    }
}

/// What kind of handle a call names, for the return code an invisible
/// object gives.
#[derive(Debug, Clone, Copy)]
pub enum HandleKind {
    Object,
    Key,
    Wrapping,
    Unwrapping,
}

impl HandleKind {
    fn invalid(self) -> CK_RV {
        match self {
            HandleKind::Object => CKR_OBJECT_HANDLE_INVALID,
            HandleKind::Key => CKR_KEY_HANDLE_INVALID,
            HandleKind::Wrapping => CKR_WRAPPING_KEY_HANDLE_INVALID,
            HandleKind::Unwrapping => CKR_UNWRAPPING_KEY_HANDLE_INVALID,
        }
    }
}

impl Library {
    /// The ACL part of `P11shim_GetStatus`: `null` without an ACL.
    pub(super) fn acl_status(&self) -> serde_json::Value {
        let Some(c) = self.acl_now() else {
            return serde_json::Value::Null;
        };
        serde_json::json!({
            "source": match self.acl.mode { Some(AclConfig::Broker) => "broker", _ => "config" },
            "role": &*c.acl.role,
            "rules": c.acl.rules().len(),
            "epoch": c.epoch,
        })
    }

    fn acl_now(&self) -> Option<Guard<Arc<Compiled>>> {
        self.acl.current(self.credentials.as_deref())
    }

    /// The role's grant on a handle, or `None` for a handle never issued.
    fn grant_of(
        &self,
        c: &Compiled,
        o: CK_OBJECT_HANDLE,
    ) -> Option<(Arc<Grant>, Option<Arc<ObjectInfo>>)> {
        self.objects.grant(o, c.epoch, |a| c.acl.grant(a))
    }

    /// Whether `op` with `mechanism` is allowed on `o`. Returns what is
    /// known of the object, for the audit record.
    #[inline]
    pub(super) fn authorize(
        &self,
        function: &'static str,
        o: CK_OBJECT_HANDLE,
        kind: HandleKind,
        op: Option<Op>,
        mechanism: Option<CK_MECHANISM_TYPE>,
    ) -> Result<Option<Arc<ObjectInfo>>> {
        // Reading an object's attributes is not security-relevant; using
        // or changing a key is.
        if op.is_some() {
            self.audit_admit(function)?;
        }
        let Some(c) = self.acl_now() else {
            return Ok(match &self.audit {
                Some(_) => self.objects.info(o),
                None => None,
            });
        };
        // A handle never issued reaches the vendor, which refuses it.
        let Some((grant, info)) = self.grant_of(&c, o) else {
            return Ok(None);
        };
        let mech = mechanism.map(|m| m as u64);
        let decision = match op {
            Some(op) => grant.check(op, mech),
            None if grant.visible => Ok(()),
            None => Err(Denial::Invisible),
        };
        match decision {
            Ok(()) => Ok(info),
            Err(d) => Err(self.denied(function, &c.acl, d, kind.invalid(), info.as_deref())),
        }
    }

    /// Whether the object exists for the role.
    #[inline]
    pub(super) fn visible(&self, o: CK_OBJECT_HANDLE) -> bool {
        match self.acl_now() {
            None => true,
            Some(c) => self.grant_of(&c, o).is_some_and(|(g, _)| g.visible),
        }
    }

    /// Whether the role may make the object `t` describes with `op`.
    pub(super) fn authorize_new(
        &self,
        function: &'static str,
        op: Op,
        t: &Template<'_>,
        implied_class: Option<CK_OBJECT_CLASS>,
        mechanism: Option<CK_MECHANISM_TYPE>,
    ) -> Result<()> {
        self.audit_admit(function)?;
        let Some(c) = self.acl_now() else {
            return Ok(());
        };
        let attrs = template_attrs(&template_items(t), implied_class, mechanism);
        c.acl
            .may_create(op, &attrs, mechanism.map(|m| m as u64))
            .map_err(|d| self.denied(function, &c.acl, d, CKR_TEMPLATE_INCONSISTENT, None))
    }

    /// Whether the object `o` would still fall under a rule granting `op`
    /// once the template's attributes are applied (copies and attribute
    /// changes cannot move an object into another role's keys).
    pub(super) fn authorize_change(
        &self,
        function: &'static str,
        op: Op,
        o: CK_OBJECT_HANDLE,
        t: &Template<'_>,
    ) -> Result<()> {
        self.audit_admit(function)?;
        let Some(c) = self.acl_now() else {
            return Ok(());
        };
        let info = self.authorize(function, o, HandleKind::Object, Some(op), None)?;
        let current = info.map(|i| i.attrs.clone()).unwrap_or_default();
        let after = overridden(&current, &template_attrs(&template_items(t), None, None));
        c.acl
            .may_create(op, &after, None)
            .map_err(|d| self.denied(function, &c.acl, d, CKR_TEMPLATE_INCONSISTENT, None))
    }

    #[cold]
    fn denied(
        &self,
        function: &'static str,
        acl: &Acl,
        d: Denial,
        invalid: CK_RV,
        info: Option<&ObjectInfo>,
    ) -> Error {
        let rv = d.rv(invalid);
        self.audit_denial(function, rv, info, d.reason());
        let label = info
            .and_then(|i| i.attrs.label.as_deref())
            .map(String::from_utf8_lossy);
        tracing::warn!(
            function,
            role = %acl.role,
            key = label.as_deref().unwrap_or("-"),
            reason = %d.reason(),
            rv = format_args!("{rv:#x}"),
            "denied by the key ACL"
        );
        Error::Vendor(rv)
    }
}

/// The selector attributes a template sets.
fn template_items<'a>(t: &Template<'a>) -> Vec<(CK_ATTRIBUTE_TYPE, &'a [u8])> {
    [CKA_CLASS, CKA_KEY_TYPE, CKA_ID, CKA_LABEL]
        .into_iter()
        .filter_map(|ty| t.bytes_attr(ty).map(|v| (ty, v)))
        .collect()
}
