//! The audit log at the PKCS#11 boundary: one record per security-relevant
//! call, built from typed values (a PIN, a key value or the data cannot
//! reach one), handed to the `p11shim-audit` writer thread through its
//! bounded queue.
//!
//! What is recorded: logins and logouts; every key use (one record when an
//! operation ends, from `*Init` to the single-part call or `*Final`, and one
//! for a failed `*Init`); key management (generate, create, copy, destroy,
//! set attributes, wrap, unwrap, derive); every ACL denial; member
//! failovers and recoveries; and, from the credentials thread, every
//! broker exchange. With `on_failure = "fail-closed"` these calls are
//! refused (`CKR_P11SHIM_AUDIT_UNAVAILABLE`) while the log cannot take
//! records.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use p11shim_audit::{Auditor, KeyRef, Kind, Record, Signer};
use pkcs11_sys::*;

use super::{Library, ObjectInfo, Session};
use crate::config::{AuditConfig, AuditKey};
use crate::credentials::Agent;
use crate::error::{Error, Result};
use crate::router::replay::OpKind;

/// A key operation in progress on a session, for its record at the end.
#[derive(Debug, Clone)]
pub struct AuditedOp {
    pub mechanism: CK_MECHANISM_TYPE,
    pub key: Option<Arc<KeyRef>>,
}

/// Who the records name.
#[derive(Debug, Default)]
struct Who {
    role: Option<Arc<str>>,
    subject: Option<Arc<str>>,
}

/// The audit log of an initialized module.
#[derive(Debug)]
pub struct Audit {
    pub auditor: Arc<Auditor>,
    data_hash: bool,
    who: ArcSwap<Who>,
    /// The broker grant generation `who` was taken from.
    who_generation: AtomicU64,
    /// The checkpoint key comes with the broker's credentials.
    key_from_broker: bool,
}

impl Audit {
    /// Starts the writer. The signing key file is read here, and must be
    /// readable by its owner only.
    pub fn start(cfg: &AuditConfig, role: Option<&str>) -> Result<Audit> {
        let signer = match &cfg.signing_key {
            Some(AuditKey::Ed25519File(path)) => Some(read_signing_key(path)?),
            _ => None,
        };
        let auditor = Auditor::start(cfg.writer.clone(), signer)
            .map_err(|e| Error::Config(format!("[audit]: {e}")))?;
        Ok(Audit {
            auditor: Arc::new(auditor),
            data_hash: cfg.data_hash,
            who: ArcSwap::from_pointee(Who {
                role: role.map(Arc::from),
                subject: None,
            }),
            who_generation: AtomicU64::new(0),
            key_from_broker: cfg.signing_key == Some(AuditKey::Broker),
        })
    }

    /// Queues a record, naming the role and subject in force.
    pub fn record(&self, mut r: Record, agent: Option<&Agent>) {
        if let Some(agent) = agent {
            self.refresh_who(agent);
        }
        let who = self.who.load();
        r.role = who.role.clone();
        r.subject = who.subject.clone();
        self.auditor.record(r);
    }

    /// Follows the broker's grants: the subject it verified, and the HMAC
    /// key for checkpoints when the role has one.
    #[inline]
    fn refresh_who(&self, agent: &Agent) {
        let published = agent.published();
        if published == self.who_generation.load(Ordering::Acquire) {
            return;
        }
        if let Some((_, subject, generation)) = agent.policy() {
            self.who.store(Arc::new(Who {
                role: Some(Arc::from(agent.role())),
                subject: Some(Arc::from(subject.as_str())),
            }));
            if self.key_from_broker {
                if let Some(key) = agent.audit_key() {
                    self.auditor.set_signer(Signer::hmac(key));
                }
            }
            self.who_generation.store(generation, Ordering::Release);
        }
    }

    /// The audit part of `P11shim_GetStatus`.
    pub fn status_json(&self) -> serde_json::Value {
        let st = self.auditor.stats();
        serde_json::json!({
            "chain": self.auditor.chain(),
            "healthy": st.sink_healthy,
            "written": st.written,
            "lost": st.lost,
            "queued": st.queued,
            "sink_errors": st.sink_errors,
            "checkpoints": st.checkpoints,
        })
    }

    /// Stops the writer: drains the queue, writes the final checkpoint
    /// (signed with the broker's key when one arrived since the last record).
    pub fn stop(&self, agent: Option<&Agent>) {
        if let Some(agent) = agent {
            self.refresh_who(agent);
        }
        self.auditor.stop(Duration::from_secs(2));
    }
}

fn read_signing_key(path: &std::path::Path) -> Result<Signer> {
    use std::os::unix::fs::MetadataExt;
    let bad = |m: String| Error::Config(format!("[audit] signing_key {}: {m}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:o} lets others read it; chmod 600",
            meta.mode() & 0o777
        )));
    }
    let pem =
        zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
    Signer::from_pkcs8_pem(&pem).map_err(|e| bad(e.to_string()))
}

/// The `*Init` function of an operation.
pub fn init_function(kind: OpKind) -> &'static str {
    match kind {
        OpKind::Encrypt => "C_EncryptInit",
        OpKind::Decrypt => "C_DecryptInit",
        OpKind::Digest => "C_DigestInit",
        OpKind::Sign => "C_SignInit",
        OpKind::Verify => "C_VerifyInit",
        OpKind::SignRecover => "C_SignRecoverInit",
        OpKind::VerifyRecover => "C_VerifyRecoverInit",
    }
}

/// The record of a finished key operation.
pub(super) fn op_function(kind: OpKind, single: bool) -> &'static str {
    match (kind, single) {
        (OpKind::Encrypt, true) => "C_Encrypt",
        (OpKind::Encrypt, false) => "C_EncryptFinal",
        (OpKind::Decrypt, true) => "C_Decrypt",
        (OpKind::Decrypt, false) => "C_DecryptFinal",
        (OpKind::Digest, true) => "C_Digest",
        (OpKind::Digest, false) => "C_DigestFinal",
        (OpKind::Sign, true) => "C_Sign",
        (OpKind::Sign, false) => "C_SignFinal",
        (OpKind::Verify, true) => "C_Verify",
        (OpKind::Verify, false) => "C_VerifyFinal",
        (OpKind::SignRecover, _) => "C_SignRecover",
        (OpKind::VerifyRecover, _) => "C_VerifyRecover",
    }
}

fn rv_of<T>(r: &Result<T>) -> u64 {
    match r {
        Ok(_) => CKR_OK as u64,
        Err(e) => e.rv() as u64,
    }
}

impl Library {
    /// Fail-closed: whether a security-relevant call may go on.
    #[inline]
    pub(super) fn audit_admit(&self, function: &'static str) -> Result<()> {
        match &self.audit {
            Some(a) if !a.auditor.admit() => {
                tracing::error!(
                    function,
                    "audit log unavailable (fail-closed): call refused"
                );
                Err(Error::AuditUnavailable)
            }
            _ => Ok(()),
        }
    }

    /// Queues a record, when auditing.
    #[inline]
    pub(super) fn audit(&self, r: impl FnOnce() -> Record) {
        if let Some(a) = &self.audit {
            a.record(r(), self.credentials.as_deref());
        }
    }

    /// The start of a call, for its record.
    #[inline(always)]
    pub(super) fn started(&self) -> Started {
        Started(
            self.audit
                .is_some()
                .then(|| (SystemTime::now(), Instant::now())),
        )
    }

    /// What the audit record of an object names.
    pub(super) fn key_ref(&self, o: CK_OBJECT_HANDLE) -> Option<Arc<KeyRef>> {
        self.objects.info(o).map(|i| i.key_ref.clone())
    }

    /// A key's `*Init`: remembers the operation for its record at the end,
    /// or records the failure now.
    #[inline(always)]
    pub(super) fn audit_init(
        &self,
        sess: &Session,
        kind: OpKind,
        mechanism: CK_MECHANISM_TYPE,
        key: Option<Arc<ObjectInfo>>,
        started: Started,
        r: &Result<()>,
    ) {
        if self.audit.is_some() {
            self.audit_init_record(sess, kind, mechanism, key, started, r);
        }
    }

    #[inline(never)]
    fn audit_init_record(
        &self,
        sess: &Session,
        kind: OpKind,
        mechanism: CK_MECHANISM_TYPE,
        key: Option<Arc<ObjectInfo>>,
        started: Started,
        r: &Result<()>,
    ) {
        let key = key.map(|i| i.key_ref.clone());
        match r {
            Ok(()) => {
                sess.state.lock().audit.get_or_insert_default()[kind as usize] =
                    Some(AuditedOp { mechanism, key });
            }
            Err(_) => self.audit(|| Record {
                time: started.time(),
                slot: Some(self.slots[sess.slot as usize].cfg.id),
                mechanism: Some(mechanism as u64),
                key,
                latency_us: started.micros(),
                ..Record::new(Kind::KeyUse, init_function(kind), rv_of(r))
            }),
        }
    }

    /// The end of a key operation (its single-part call or `*Final`).
    /// Digests have no key, and no record.
    #[inline(always)]
    pub(super) fn audit_end(
        &self,
        sess: &Session,
        kind: OpKind,
        single: Option<&[u8]>,
        member: Option<u32>,
        started: Started,
        r: &Result<()>,
    ) {
        if self.audit.is_some() && kind != OpKind::Digest {
            self.audit_end_record(sess, kind, single, member, started, r);
        }
    }

    #[inline(never)]
    fn audit_end_record(
        &self,
        sess: &Session,
        kind: OpKind,
        single: Option<&[u8]>,
        member: Option<u32>,
        started: Started,
        r: &Result<()>,
    ) {
        let Some(a) = &self.audit else { return };
        let Some(op) = sess
            .state
            .lock()
            .audit
            .as_mut()
            .and_then(|a| a[kind as usize].take())
        else {
            return; // digests: no key
        };
        let slot = &self.slots[sess.slot as usize];
        let data_sha256 = single.filter(|d| a.data_hash && !d.is_empty()).map(|d| {
            use sha2::{Digest, Sha256};
            Sha256::digest(d).into()
        });
        self.audit(|| Record {
            time: started.time(),
            slot: Some(slot.cfg.id),
            member: member.map(|m| slot.members[m as usize].name.clone()),
            mechanism: Some(op.mechanism as u64),
            key: op.key,
            latency_us: started.micros(),
            data_sha256,
            ..Record::new(Kind::KeyUse, op_function(kind, single.is_some()), rv_of(r))
        });
    }

    /// A call that makes, changes or uses keys in one step.
    pub(super) fn audit_call<T>(
        &self,
        (kind, function): (Kind, &'static str),
        slot: u32,
        mechanism: Option<CK_MECHANISM_TYPE>,
        key: Option<Arc<KeyRef>>,
        started: Started,
        r: &Result<T>,
    ) {
        self.audit(|| Record {
            time: started.time(),
            slot: Some(self.slots[slot as usize].cfg.id),
            mechanism: mechanism.map(|m| m as u64),
            key,
            latency_us: started.micros(),
            ..Record::new(kind, function, rv_of(r))
        });
    }

    /// A call whose record carries a detail (a login's user type).
    pub(super) fn audit_call_detail<T>(
        &self,
        kind: Kind,
        function: &'static str,
        slot: u32,
        started: Started,
        r: &Result<T>,
        detail: String,
    ) {
        self.audit(|| Record {
            time: started.time(),
            slot: Some(self.slots[slot as usize].cfg.id),
            latency_us: started.micros(),
            detail: Some(Cow::Owned(detail)),
            ..Record::new(kind, function, rv_of(r))
        });
    }

    /// An ACL denial.
    pub(super) fn audit_denial(
        &self,
        function: &'static str,
        rv: CK_RV,
        key: Option<&ObjectInfo>,
        reason: String,
    ) {
        self.audit(|| Record {
            key: key.map(|i| i.key_ref.clone()),
            detail: Some(Cow::Owned(reason)),
            ..Record::new(Kind::Denial, function, rv as u64)
        });
    }

    /// A member event: marked down, a session moved, recovered.
    pub(super) fn audit_member(
        &self,
        kind: Kind,
        event: &'static str,
        slot: u32,
        member: u32,
        rv: Option<CK_RV>,
        detail: Option<String>,
    ) {
        let s = &self.slots[slot as usize];
        self.audit(|| Record {
            slot: Some(s.cfg.id),
            member: Some(s.members[member as usize].name.clone()),
            detail: detail.map(Cow::Owned),
            ..Record::new(kind, event, rv.unwrap_or(CKR_OK) as u64)
        });
    }
}

/// When a call started, taken only when auditing.
#[derive(Debug, Clone, Copy)]
pub struct Started(Option<(SystemTime, Instant)>);

impl Started {
    fn time(self) -> SystemTime {
        self.0.map_or(SystemTime::UNIX_EPOCH, |s| s.0)
    }
    fn micros(self) -> Option<u64> {
        self.0
            .map(|s| s.1.elapsed().as_micros().min(u64::MAX as u128) as u64)
    }
}
