//! Quorum (m-of-n) approval at the PKCS#11 boundary (docs/quorum.md).
//!
//! A key under a quorum rule of the role's policy is used only with an
//! approved, unexpired, unused request for exactly that key, operation,
//! mechanism and data, consumed at the broker before the vendor gives the
//! result:
//!
//! * single-part `C_Sign`, `C_SignRecover`, `C_Decrypt`: the vendor's
//!   `*Init` is held back until approval, so without approval the key is
//!   not used at all; the approval covers the SHA-256 of the call's data;
//! * multi-part operations stream to the vendor (the hash of the input is
//!   kept as it goes) and `*Final` waits for approval of the whole input's
//!   hash before the result is released; a refused result is computed into
//!   a wiped buffer and thrown away, which ends the vendor's operation;
//! * `C_UnwrapKey` (the wrapped bytes' hash), `C_DeriveKey`, `C_WrapKey`
//!   and `C_DestroyObject` wait before the vendor is called.
//!
//! While a request is pending the call waits up to the rule's `wait_ms`,
//! then fails with `CKR_FUNCTION_REJECTED`; the log names the request so an
//! operator can approve it, and the same call made again after approval
//! finds the same request (filing is idempotent at the broker).

use std::sync::Arc;
use std::time::{Duration, Instant};

use p11shim_audit::{Kind, Record};
use p11shim_proto::approval::{
    Approval, ApprovalKey, ApprovalStatus, Consume, NewApproval, sha256_hex,
};
use pkcs11_sys::*;
use sha2::{Digest, Sha256};

use super::{Library, ObjectInfo, Session};
use crate::abi::mem::{Bytes, OutBytes, RawMechanism, SavedMechanism};
use crate::credentials::ApprovalError;
use crate::error::{Error, Result};
use crate::policy::{Op, Quorum};
use crate::router::bounded;
use crate::router::replay::OpKind;

/// A key operation under a quorum rule, on a session.
#[derive(Debug)]
pub struct QuorumOp {
    kind: OpKind,
    op: Op,
    wait_ms: u64,
    key: Arc<ObjectInfo>,
    mechanism: CK_MECHANISM_TYPE,
    /// The vendor's `*Init`, not made yet.
    deferred: Option<(SavedMechanism, CK_OBJECT_HANDLE, bounded::Init)>,
    /// SHA-256 of the input given so far (multi-part).
    hasher: Sha256,
    /// Approved and consumed: calls go on until the operation ends (a
    /// result that did not fit the buffer is asked for again).
    approved: bool,
}

/// What the result-releasing call may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    /// No quorum op on this session for the operation.
    Open,
    /// Approved and consumed: the call goes on, and the op is cleared when
    /// it ends.
    Approved,
}

/// How often a pending request is read again while a call waits: first
/// after `POLL_FIRST`, then at doubling intervals up to `POLL_MAX`.
const POLL_FIRST: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(1);

impl Library {
    /// The quorum rule covering `op` on this object, if any.
    pub(super) fn quorum_rule(&self, info: Option<&ObjectInfo>, op: Op) -> Option<Quorum> {
        let c = self.acl.current(self.credentials.as_deref())?;
        if !c.has_quorum() {
            return None;
        }
        let info = info?;
        c.acl.policy().quorum_for(&info.attrs, op).cloned()
    }

    /// Whether a session may hold a quorum operation: a policy with quorum
    /// rules was in force (one load; the policy is read at `*Init`).
    #[inline]
    pub(super) fn quorum_possible(&self) -> bool {
        self.acl.quorum_seen()
    }

    /// `*Init` of a key under a quorum rule: remembers the operation, and
    /// holds back the vendor's `*Init` when the mechanism can be kept.
    /// Returns `true` when the vendor call was held back.
    pub(super) fn quorum_init(
        &self,
        sess: &Session,
        (kind, op): (OpKind, Op),
        rule: &Quorum,
        key_info: Arc<ObjectInfo>,
        mech: &crate::abi::mem::Mechanism<'_>,
        (key, init): (CK_OBJECT_HANDLE, bounded::Init),
    ) -> Result<bool> {
        let mut st = sess.state.lock();
        if st.quorum.is_some() {
            return Err(Error::Vendor(CKR_OPERATION_ACTIVE));
        }
        let saved = mech.save();
        let deferred = saved.is_some();
        st.quorum = Some(Box::new(QuorumOp {
            kind,
            op,
            wait_ms: rule.wait_ms,
            key: key_info,
            mechanism: mech.kind(),
            deferred: saved.map(|s| (s, key, init)),
            hasher: Sha256::new(),
            approved: false,
        }));
        Ok(deferred)
    }

    /// Drops the quorum op of a failed `*Init` made at once.
    pub(super) fn quorum_forget(&self, sess: &Session, kind: OpKind) {
        let mut st = sess.state.lock();
        if st.quorum.as_ref().is_some_and(|q| q.kind == kind) {
            st.quorum = None;
        }
    }

    /// Makes the vendor's `*Init` held back for `kind`, if any.
    pub(super) fn quorum_start(&self, sess: &Session, kind: OpKind) -> Result<()> {
        let deferred = {
            let mut st = sess.state.lock();
            match st.quorum.as_mut() {
                Some(q) if q.kind == kind => q.deferred.take(),
                _ => None,
            }
        };
        let Some((mech, key, init)) = deferred else {
            return Ok(());
        };
        let slot = sess.slot;
        let raw = RawMechanism(mech.to_raw());
        let r = self.on_session(sess, None, |mem, mi, vh| {
            let k = self.object_on(slot, mi, key)?;
            bounded::init(mem, vh, raw.view(), k, init)
        });
        if r.is_err() {
            self.quorum_forget(sess, kind);
        } else if sess.replay {
            sess.state.lock().ops.start(kind, Some(mech), key);
        }
        r
    }

    /// `*Update` of a quorum op: the vendor's `*Init` is made, and the
    /// input goes into the hash once the vendor took it.
    pub(super) fn quorum_fed(&self, sess: &Session, kind: OpKind, input: &[u8]) {
        let mut st = sess.state.lock();
        if let Some(q) = st.quorum.as_mut().filter(|q| q.kind == kind) {
            q.hasher.update(input);
        }
    }

    /// Before the call that gives the result (a single-part call with its
    /// `data`, or `*Final`): approval, or `CKR_FUNCTION_REJECTED`.
    pub(super) fn quorum_gate(
        &self,
        sess: &Session,
        kind: OpKind,
        single: Option<&[u8]>,
        size_query: bool,
        function: &'static str,
    ) -> Result<Gate> {
        let (rule, key, op, mech, hash, deferred) = {
            let st = sess.state.lock();
            let Some(q) = st.quorum.as_ref().filter(|q| q.kind == kind) else {
                return Ok(Gate::Open);
            };
            if q.approved {
                return Ok(Gate::Approved);
            }
            let hash = match single {
                Some(d) => sha256_hex(d),
                None => hex(&q.hasher.clone().finalize()),
            };
            (
                q.wait_ms,
                q.key.clone(),
                q.op,
                q.mechanism,
                hash,
                q.deferred.is_some(),
            )
        };
        if size_query {
            // The vendor tells the size; nothing is released.
            self.quorum_start(sess, kind)?;
            return Ok(Gate::Open);
        }
        match self.approve(function, rule, &key, op, Some(mech), Some(hash)) {
            Ok(()) => {
                if let Some(q) = sess.state.lock().quorum.as_mut() {
                    q.approved = true;
                }
                self.quorum_start(sess, kind)?;
                Ok(Gate::Approved)
            }
            Err(e) => {
                if !deferred {
                    self.discard(sess, kind, single);
                }
                self.quorum_forget(sess, kind);
                Err(e)
            }
        }
    }

    /// Ends a started vendor operation whose result may not be released:
    /// the result is computed into a buffer that is wiped.
    fn discard(&self, sess: &Session, kind: OpKind, single: Option<&[u8]>) {
        let mut buf = zeroize::Zeroizing::new(vec![0u8; 16 * 1024 + single.map_or(0, <[u8]>::len)]);
        let _ = self.on_session(sess, Some(kind), |m, _, vh| {
            let mut len: CK_ULONG = 0;
            let out = OutBytes::from_local(&mut buf, &mut len);
            let v = &m.vendor;
            let r = match (kind, single) {
                (OpKind::Sign, Some(d)) => v.sign(vh, Bytes::from_slice(d), out),
                (OpKind::Sign, None) => v.sign_final(vh, out),
                (OpKind::SignRecover, Some(d)) => v.sign_recover(vh, Bytes::from_slice(d), out),
                (OpKind::Decrypt, Some(d)) => v.decrypt(vh, Bytes::from_slice(d), out),
                (OpKind::Decrypt, None) => v.decrypt_final(vh, out),
                _ => Ok(()),
            };
            // Whatever the vendor said, the operation is over for it.
            let _ = r;
            Ok(())
        });
        if sess.replay {
            sess.state.lock().ops.end(kind);
        }
    }

    /// A single call on a key (unwrap, derive, wrap, destroy): approval
    /// first, when a quorum rule covers it.
    pub(super) fn quorum_call(
        &self,
        function: &'static str,
        info: Option<&Arc<ObjectInfo>>,
        op: Op,
        mech: Option<CK_MECHANISM_TYPE>,
        data: Option<&[u8]>,
    ) -> Result<()> {
        if !self.quorum_possible() {
            return Ok(());
        }
        let Some(info) = info else {
            return Ok(()); // no ACL: no quorum rule either
        };
        let Some(rule) = self.quorum_rule(Some(info), op) else {
            return Ok(());
        };
        let hash = data.map(sha256_hex);
        self.approve(function, rule.wait_ms, info, op, mech, hash)
    }

    /// Files (or finds) the request, waits up to `wait_ms` while it is
    /// pending, and consumes it once approved.
    fn approve(
        &self,
        function: &'static str,
        wait_ms: u64,
        key: &ObjectInfo,
        op: Op,
        mech: Option<CK_MECHANISM_TYPE>,
        data_sha256: Option<String>,
    ) -> Result<()> {
        let Some(agent) = self.credentials.as_deref() else {
            tracing::error!(
                function,
                "a quorum rule applies, and no broker is configured"
            );
            return Err(Error::Vendor(CKR_FUNCTION_REJECTED));
        };
        let req = NewApproval {
            v: p11shim_proto::VERSION,
            key: approval_key(key),
            op: op.name().into(),
            mechanism: mech.map(|m| m as u64),
            data_sha256: data_sha256.clone(),
        };
        let refused = |why: String, id: Option<&str>| {
            self.audit_approval(
                "approval_refused",
                CKR_FUNCTION_REJECTED,
                key,
                mech,
                id,
                why,
            );
            Error::Vendor(CKR_FUNCTION_REJECTED)
        };
        let mut a = match agent.approval_request(&req) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(function, key = label(key), error = %e, "cannot file the approval request; call refused");
                return Err(refused(e.to_string(), None));
            }
        };
        self.audit_approval(
            "approval_request",
            CKR_OK,
            key,
            mech,
            Some(&a.id),
            format!(
                "status={} approvals={}/{}",
                a.status.as_str(),
                a.approvals.len(),
                a.m
            ),
        );
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let mut poll = POLL_FIRST;
        loop {
            match a.status {
                ApprovalStatus::Approved => break,
                ApprovalStatus::Pending if Instant::now() < deadline => {
                    std::thread::sleep(
                        poll.min(deadline.saturating_duration_since(Instant::now())),
                    );
                    poll = (poll * 2).min(POLL_MAX);
                    match agent.approval_get(&a.id) {
                        Ok(next) => a = next,
                        Err(ApprovalError::Unavailable(e)) => {
                            tracing::debug!(id = %a.id, error = %e, "approval request not read; trying again");
                        }
                        Err(e) => return Err(refused(e.to_string(), Some(&a.id))),
                    }
                }
                status => {
                    tracing::warn!(
                        function,
                        id = %a.id,
                        key = label(key),
                        status = status.as_str(),
                        approvals = a.approvals.len(),
                        needed = a.m,
                        "approval missing: call refused (approve with `p11shim approve sign {}`, then call again)",
                        a.id
                    );
                    return Err(refused(
                        format!(
                            "{}: {} of {} approvals {}",
                            status.as_str(),
                            a.approvals.len(),
                            a.m,
                            signoffs(&a)
                        ),
                        Some(&a.id),
                    ));
                }
            }
        }
        let consume = Consume {
            v: p11shim_proto::VERSION,
            key_fingerprint: req.key.fingerprint.clone(),
            op: req.op.clone(),
            mechanism: req.mechanism,
            data_sha256,
        };
        match agent.approval_consume(&a.id, &consume) {
            Ok(done) => {
                tracing::info!(function, id = %done.id, key = label(key), "approval consumed");
                self.audit_approval(
                    "approval_consumed",
                    CKR_OK,
                    key,
                    mech,
                    Some(&done.id),
                    signoffs(&done),
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(function, id = %a.id, error = %e, "approval not consumed: call refused");
                Err(refused(format!("consume: {e}"), Some(&a.id)))
            }
        }
    }

    fn audit_approval(
        &self,
        event: &'static str,
        rv: CK_RV,
        key: &ObjectInfo,
        mech: Option<CK_MECHANISM_TYPE>,
        id: Option<&str>,
        detail: String,
    ) {
        self.audit(|| Record {
            key: Some(key.key_ref.clone()),
            mechanism: mech.map(|m| m as u64),
            detail: Some(
                match id {
                    Some(id) => format!("id={id} {detail}"),
                    None => detail,
                }
                .into(),
            ),
            ..Record::new(Kind::Approval, event, rv as u64)
        });
    }
}

/// `approvers=alice@<time>,bob@<time>` (and `rejected_by=...` when some
/// approvers rejected).
fn signoffs(a: &Approval) -> String {
    let list = |v: &[p11shim_proto::approval::Signoff]| -> String {
        v.iter()
            .map(|s| format!("{}@{}", s.approver, s.at))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut out = format!("approvers={}", list(&a.approvals));
    if !a.rejections.is_empty() {
        out.push_str(&format!(" rejected_by={}", list(&a.rejections)));
    }
    out
}

fn approval_key(i: &ObjectInfo) -> ApprovalKey {
    ApprovalKey {
        label: i
            .attrs
            .label
            .as_deref()
            .map(|l| String::from_utf8_lossy(l).into_owned()),
        id: i.attrs.id.as_deref().map(hex),
        class: i.attrs.class,
        key_type: i.attrs.key_type,
        unique_id: i
            .attrs
            .unique_id
            .as_deref()
            .map(|u| String::from_utf8_lossy(u).into_owned()),
        fingerprint: hex(&i.fingerprint),
    }
}

fn label(i: &ObjectInfo) -> String {
    i.attrs
        .label
        .as_deref()
        .map_or_else(|| "-".into(), |l| String::from_utf8_lossy(l).into_owned())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
