//! Quorum (m-of-n) approval of key use: the broker half.
//!
//! A module whose role's policy puts a key under quorum files a request
//! (`POST /v1/approvals`, authenticated by the approval token that came
//! sealed with its credentials); approvers read it, sign its
//! `approval_data` with their own key and post the signature; once `m`
//! distinct approvers have signed, the module consumes the request, exactly
//! once, for exactly the key, operation and data it named. The state lives
//! in the approval store ([`crate::store::approvals`]); this module checks
//! tokens, signatures and rules, and turns outcomes into the coarse kinds
//! clients see. `docs/quorum.md` describes the protocol.

pub mod token;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use p11shim_proto::approval::{
    Approval, ApprovalFields, ApprovalKey, ApprovalList, ApprovalStatus, Consume, Decision,
    NewApproval, REJECTION_PREFIX, Signoff as WireSignoff, approval_data, sha256_hex, valid_hex,
    valid_text,
};
use p11shim_proto::policy::{Attrs, Op, Policy};
use p11shim_proto::{ErrorKind, VERSION};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::broker::Broker;
use crate::clock::{rfc3339, unix};
use crate::config::Config;
use crate::methods::Denial;
use crate::store::StoreError;
use crate::store::approvals::{
    ApprovalRecord, ApprovalStore, Consumed, Decided, ListFilter, State,
};

use self::token::{TokenClaims, TokenKey};
use self::verify::ApproverKey;

/// Most requests one `GET /v1/approvals` returns (the newest).
pub const LIST_LIMIT: u32 = 500;

/// Why the approval machinery could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalsError {
    #[error("approvers.{name}.public_key: {error}")]
    Key {
        name: String,
        error: verify::KeyError,
    },
    #[error("server.approval_token_key: {0}")]
    TokenKey(String),
    #[error("roles.{role}.policy: {message}")]
    Policy { role: String, message: String },
}

/// The approvers' keys, the token key and the quorum rules of every role.
#[derive(Debug, Default)]
pub struct Approvals {
    pub keys: BTreeMap<String, ApproverKey>,
    /// `None` until [`Approvals::load`] ran: no token is minted or accepted.
    pub token_key: Option<TokenKey>,
    /// The validated policy of each role that has quorum rules.
    policies: BTreeMap<String, Policy>,
}

impl Approvals {
    /// Loads every `[approvers.<name>]` key (checked: RSA >= 2048 or
    /// Ed25519), reads `[server] approval_token_key` (or makes a random key
    /// for this process, with a warning) and keeps each role's quorum rules.
    pub fn load(cfg: &Config) -> Result<Approvals, ApprovalsError> {
        let mut keys = BTreeMap::new();
        for (name, a) in &cfg.approvers {
            let k = ApproverKey::load(&a.public_key).map_err(|error| ApprovalsError::Key {
                name: name.clone(),
                error,
            })?;
            keys.insert(name.clone(), k);
        }
        let mut policies = BTreeMap::new();
        for (name, r) in &cfg.roles {
            if let Some(doc) = r.policy.as_ref().filter(|d| !d.quorum.is_empty()) {
                let p = doc.validate().map_err(|e| ApprovalsError::Policy {
                    role: name.clone(),
                    message: e.to_string(),
                })?;
                policies.insert(name.clone(), p);
            }
        }
        let token_key = match &cfg.server.approval_token_key {
            Some(src) => {
                let v = src
                    .read()
                    .map_err(|e| ApprovalsError::TokenKey(e.to_string()))?;
                TokenKey::from_secret(&v).map_err(|e| ApprovalsError::TokenKey(e.to_string()))?
            }
            None => {
                let k = TokenKey::random().map_err(|e| ApprovalsError::TokenKey(e.to_string()))?;
                if !policies.is_empty() {
                    warn!(
                        "no [server] approval_token_key: approval tokens are signed with a random key of this process; other replicas do not accept them, and they stop working when this process restarts"
                    );
                }
                k
            }
        };
        Ok(Approvals {
            keys,
            token_key: Some(token_key),
            policies,
        })
    }

    /// Whether `role` has quorum rules (and so its grants carry a token).
    pub fn has_quorum(&self, role: &str) -> bool {
        self.policies.contains_key(role)
    }

    /// The approval token of a grant, for roles with quorum rules.
    pub fn token_for(
        &self,
        role: &str,
        subject: &str,
        expires: SystemTime,
    ) -> Result<Option<Zeroizing<String>>, Denial> {
        if !self.has_quorum(role) {
            return Ok(None);
        }
        let key = self
            .token_key
            .as_ref()
            .ok_or_else(|| Denial::unavailable("approval token key not loaded"))?;
        key.mint(&TokenClaims {
            role: role.to_owned(),
            subject: subject.to_owned(),
            exp: unix(expires),
        })
        .map(Some)
        .map_err(|e| Denial::unavailable(e.to_string()))
    }

    /// The requester a bearer token names, if it verifies at `now`.
    fn requester(&self, bearer: Option<&str>, now: i64) -> Result<TokenClaims, Denial> {
        let t =
            bearer.ok_or_else(|| Denial::denied("no approval token (Authorization: Bearer)"))?;
        let key = self
            .token_key
            .as_ref()
            .ok_or_else(|| Denial::unavailable("approval token key not loaded"))?;
        key.verify(t, now)
            .map_err(|e| Denial::denied(e.to_string()))
    }
}

/// An outcome of an approval endpoint: the document and whether it was
/// just created (`201`).
#[derive(Debug)]
pub struct Answer {
    pub approval: Approval,
    pub created: bool,
}

fn time_of(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// The wire document of a stored request at `now`.
pub fn to_wire(r: &ApprovalRecord, now: i64) -> Approval {
    let signoffs = |approve: bool| -> Vec<WireSignoff> {
        r.signoffs
            .iter()
            .filter(|s| s.approve == approve)
            .map(|s| WireSignoff {
                approver: s.approver.clone(),
                at: rfc3339(time_of(s.at)),
            })
            .collect()
    };
    Approval {
        v: VERSION,
        id: r.id.clone(),
        role: r.role.clone(),
        subject: r.subject.clone(),
        key: r.key.clone(),
        op: r.op.clone(),
        mechanism: r.mechanism,
        data_sha256: r.data_sha256.clone(),
        created_at: rfc3339(time_of(r.created_at)),
        expires_at: rfc3339(time_of(r.expires_at)),
        m: r.m,
        approvers: r.approvers.clone(),
        approvals: signoffs(true),
        rejections: signoffs(false),
        status: r.status(now),
        consumed_at: r.consumed_at.map(|t| rfc3339(time_of(t))),
        approval_data: base64::engine::general_purpose::STANDARD.encode(&r.approval_data),
        digest: sha256_hex(&r.approval_data),
    }
}

/// `apr_` and 16 random bytes in hex.
fn new_id() -> Result<String, Denial> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| Denial::unavailable(format!("random: {e}")))?;
    Ok(format!(
        "apr_{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}

/// Whether `id` has the form of a request id.
pub fn valid_id(id: &str) -> bool {
    id.strip_prefix("apr_")
        .is_some_and(|h| valid_hex(h, Some(16)))
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// The attributes a quorum rule selects on, from the key the module named.
fn attrs_of(k: &ApprovalKey) -> Attrs {
    Attrs {
        class: k.class,
        key_type: k.key_type,
        id: k.id.as_deref().map(hex_bytes),
        label: k.label.as_ref().map(|l| l.as_bytes().to_vec()),
        unique_id: k.unique_id.as_ref().map(|u| u.as_bytes().to_vec()),
    }
}

/// Field syntax of a new request.
fn check_new(n: &NewApproval) -> Result<Op, Denial> {
    if n.v != VERSION {
        return Err(Denial::bad_request(format!(
            "protocol version {} not served",
            n.v
        )));
    }
    let k = &n.key;
    if !valid_hex(&k.fingerprint, Some(32)) {
        return Err(Denial::bad_request(
            "key.fingerprint must be 64 lowercase hex digits",
        ));
    }
    if k.id
        .as_deref()
        .is_some_and(|i| i.is_empty() || !valid_hex(i, None))
    {
        return Err(Denial::bad_request("key.id must be lowercase hex"));
    }
    if k.label.as_deref().is_some_and(|l| !valid_text(l)) {
        return Err(Denial::bad_request(
            "key.label must be 1-256 printable characters",
        ));
    }
    if k.unique_id.as_deref().is_some_and(|u| !valid_text(u)) {
        return Err(Denial::bad_request(
            "key.unique_id must be 1-256 printable characters",
        ));
    }
    if n.data_sha256
        .as_deref()
        .is_some_and(|d| !valid_hex(d, Some(32)))
    {
        return Err(Denial::bad_request(
            "data_sha256 must be 64 lowercase hex digits",
        ));
    }
    Op::parse(&n.op).ok_or_else(|| Denial::bad_request(format!("unknown operation {:?}", n.op)))
}

/// Runs a store call off the async runtime.
async fn on_store<T: Send + 'static>(
    b: &Arc<Broker>,
    f: impl FnOnce(&dyn ApprovalStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Denial> {
    let store = Arc::clone(&b.store);
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || match store.approvals() {
        Some(a) => f(a),
        None => Err(StoreError::Config(format!(
            "the {} store keeps no approvals (use sqlite or postgres)",
            store.kind()
        ))),
    })
    .await
    .map_err(|e| Denial::unavailable(format!("approval store task: {e}")))?;
    b.metrics
        .store_seconds
        .observe(started.elapsed().as_secs_f64());
    out.map_err(|e| Denial::unavailable(e.to_string()))
}

fn kind(kind: ErrorKind, reason: impl Into<String>) -> Denial {
    Denial {
        kind,
        reason: reason.into(),
        retry_after: None,
    }
}

/// `POST /v1/approvals`.
pub async fn create(
    b: &Arc<Broker>,
    rid: &str,
    bearer: Option<&str>,
    n: NewApproval,
) -> Result<Answer, Denial> {
    let now_t = b.clock.now();
    let now = unix(now_t);
    let who = b.approvals.requester(bearer, now)?;
    let op = check_new(&n)?;
    let policy = b
        .approvals
        .policies
        .get(&who.role)
        .ok_or_else(|| Denial::denied("no quorum rule covers this key and operation"))?;
    let q = policy
        .quorum_for(&attrs_of(&n.key), op)
        .ok_or_else(|| Denial::denied("no quorum rule covers this key and operation"))?;
    if !valid_text(&who.subject) || !valid_text(&who.role) {
        return Err(Denial::denied(
            "the requester's name cannot appear in approval_data",
        ));
    }
    let id = new_id()?;
    let ttl = i64::try_from(q.ttl_s).unwrap_or(86_400);
    let (created_at, expires_at) = (now, now + ttl);
    let (c_text, e_text) = (rfc3339(time_of(created_at)), rfc3339(time_of(expires_at)));
    let data = approval_data(&ApprovalFields {
        id: &id,
        role: &who.role,
        subject: &who.subject,
        key: &n.key,
        op: op.name(),
        mechanism: n.mechanism,
        data_sha256: n.data_sha256.as_deref(),
        created_at: &c_text,
        expires_at: &e_text,
        m: q.m,
        approvers: &q.approvers,
    });
    let rec = ApprovalRecord {
        id,
        role: who.role.clone(),
        subject: who.subject.clone(),
        key: n.key,
        op: op.name().to_owned(),
        mechanism: n.mechanism,
        data_sha256: n.data_sha256,
        created_at,
        expires_at,
        m: q.m,
        approvers: q.approvers.clone(),
        state: State::Pending,
        consumed_at: None,
        approval_data: data,
        signoffs: Vec::new(),
    };
    let (stored, created) = on_store(b, move |s| s.create(&rec, now)).await?;
    let a = to_wire(&stored, now);
    if created {
        b.metrics.approval("requested");
        info!(request_id = rid, approval_id = %a.id, role = %a.role, subject = %a.subject, key_fingerprint = %a.key.fingerprint, op = %a.op, m = a.m, approvers = %a.approvers.join(","), digest = %a.digest, expires_at = %a.expires_at, "approval requested");
    } else {
        info!(request_id = rid, approval_id = %a.id, role = %a.role, subject = %a.subject, status = a.status.as_str(), "approval request repeated: the open request is returned");
    }
    Ok(Answer {
        approval: a,
        created,
    })
}

/// `GET /v1/approvals/{id}`.
pub async fn show(b: &Arc<Broker>, id: &str) -> Result<Approval, Denial> {
    if !valid_id(id) {
        return Err(kind(ErrorKind::NotFound, "malformed approval id"));
    }
    let now = unix(b.clock.now());
    let key = id.to_owned();
    match on_store(b, move |s| s.get(&key)).await? {
        Some(r) => Ok(to_wire(&r, now)),
        None => Err(kind(ErrorKind::NotFound, format!("no approval {id}"))),
    }
}

/// `GET /v1/approvals[?status=]`.
pub async fn list(b: &Arc<Broker>, status: Option<ApprovalStatus>) -> Result<ApprovalList, Denial> {
    let now = unix(b.clock.now());
    let filter = ListFilter {
        status,
        limit: LIST_LIMIT,
    };
    let recs = on_store(b, move |s| s.list(filter, now)).await?;
    Ok(ApprovalList {
        v: VERSION,
        approvals: recs.iter().map(|r| to_wire(r, now)).collect(),
    })
}

/// `POST /v1/approvals/{id}/approve` (`approve`) and `.../reject`.
pub async fn decide(
    b: &Arc<Broker>,
    rid: &str,
    id: &str,
    d: Decision,
    approve: bool,
) -> Result<Approval, Denial> {
    if d.v != VERSION {
        return Err(Denial::bad_request(format!(
            "protocol version {} not served",
            d.v
        )));
    }
    if !valid_id(id) {
        return Err(kind(ErrorKind::NotFound, "malformed approval id"));
    }
    if !valid_text(&d.approver) {
        return Err(Denial::bad_request("malformed approver name"));
    }
    let now = unix(b.clock.now());
    let key = id.to_owned();
    let rec = on_store(b, move |s| s.get(&key))
        .await?
        .ok_or_else(|| kind(ErrorKind::NotFound, format!("no approval {id}")))?;
    if !rec.approvers.contains(&d.approver) {
        return Err(Denial::denied(format!(
            "{:?} is not an approver of this request",
            d.approver
        )));
    }
    if rec.signoffs.iter().any(|s| s.approver == d.approver) {
        return Err(kind(
            ErrorKind::Conflict,
            format!("duplicate: {} decided on this request before", d.approver),
        ));
    }
    closed(&rec, now)?;
    let pubkey = b.approvals.keys.get(&d.approver).ok_or_else(|| {
        Denial::denied(format!(
            "no [approvers.{}] key in this broker's configuration",
            d.approver
        ))
    })?;
    let mut signed = Vec::with_capacity(rec.approval_data.len() + REJECTION_PREFIX.len());
    if !approve {
        signed.extend_from_slice(REJECTION_PREFIX.as_bytes());
    }
    signed.extend_from_slice(&rec.approval_data);
    pubkey.verify(&signed, &d.signature).map_err(|e| match e {
        verify::SignatureError::Bad => {
            Denial::denied(format!("bad signature by {} ({})", d.approver, pubkey.kind))
        }
        other => Denial::bad_request(other.to_string()),
    })?;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(
            d.signature
                .chars()
                .filter(|c| !c.is_ascii_whitespace())
                .collect::<String>(),
        )
        .unwrap_or_default();
    let (key, approver) = (id.to_owned(), d.approver.clone());
    let out = on_store(b, move |s| s.decide(&key, &approver, approve, &sig, now)).await?;
    match out {
        Decided::Recorded(r) => {
            let a = to_wire(&r, now);
            let verb = if approve { "approved" } else { "rejected" };
            info!(request_id = rid, approval_id = %a.id, approver = %d.approver, decision = verb, approvals = a.approvals.len(), rejections = a.rejections.len(), m = a.m, status = a.status.as_str(), "approval decision recorded");
            if approve && a.status == ApprovalStatus::Approved {
                b.metrics.approval("approved");
                info!(request_id = rid, approval_id = %a.id, role = %a.role, subject = %a.subject, "approval request approved: {} of {} signed", a.approvals.len(), a.approvers.len());
            }
            if !approve && a.status == ApprovalStatus::Rejected {
                b.metrics.approval("rejected");
                info!(request_id = rid, approval_id = %a.id, role = %a.role, subject = %a.subject, "approval request rejected: m can no longer be reached");
            }
            Ok(a)
        }
        Decided::NotFound => Err(kind(ErrorKind::NotFound, format!("no approval {id}"))),
        Decided::Duplicate(_) => Err(kind(
            ErrorKind::Conflict,
            format!("duplicate: {} decided on this request before", d.approver),
        )),
        Decided::Closed(r) => {
            closed(&r, now)?;
            Err(kind(ErrorKind::Conflict, "request changed state meanwhile"))
        }
    }
}

/// Refuses a decision on a request that is not pending and unexpired.
fn closed(r: &ApprovalRecord, now: i64) -> Result<(), Denial> {
    match r.status(now) {
        ApprovalStatus::Pending => Ok(()),
        ApprovalStatus::Expired => Err(kind(ErrorKind::Expired, "request expired")),
        s => Err(kind(
            ErrorKind::Conflict,
            format!("request is {} already", s.as_str()),
        )),
    }
}

/// `POST /v1/approvals/{id}/consume`.
pub async fn consume(
    b: &Arc<Broker>,
    rid: &str,
    bearer: Option<&str>,
    id: &str,
    c: Consume,
) -> Result<Approval, Denial> {
    let now = unix(b.clock.now());
    let who = b.approvals.requester(bearer, now)?;
    if c.v != VERSION {
        return Err(Denial::bad_request(format!(
            "protocol version {} not served",
            c.v
        )));
    }
    if !valid_id(id) {
        return Err(kind(ErrorKind::NotFound, "malformed approval id"));
    }
    let key = id.to_owned();
    let rec = on_store(b, move |s| s.get(&key))
        .await?
        .ok_or_else(|| kind(ErrorKind::NotFound, format!("no approval {id}")))?;
    if rec.role != who.role || rec.subject != who.subject {
        return Err(Denial::denied(format!(
            "token of {}/{} for a request of {}/{}",
            who.role, who.subject, rec.role, rec.subject
        )));
    }
    let mismatch = if c.key_fingerprint != rec.key.fingerprint {
        Some("key fingerprint")
    } else if c.op != rec.op {
        Some("operation")
    } else if c.mechanism != rec.mechanism {
        Some("mechanism")
    } else if c.data_sha256 != rec.data_sha256 {
        Some("data hash")
    } else {
        None
    };
    if let Some(what) = mismatch {
        return Err(Denial::bad_request(format!(
            "mismatch: the {what} differs from the approved request's"
        )));
    }
    let key = id.to_owned();
    match on_store(b, move |s| s.consume(&key, now)).await? {
        Consumed::Consumed(r) => {
            let a = to_wire(&r, now);
            b.metrics.approval("consumed");
            info!(request_id = rid, approval_id = %a.id, role = %a.role, subject = %a.subject, key_fingerprint = %a.key.fingerprint, op = %a.op, "approval consumed");
            Ok(a)
        }
        Consumed::NotFound => Err(kind(ErrorKind::NotFound, format!("no approval {id}"))),
        Consumed::Refused(r) => Err(match r.status(now) {
            ApprovalStatus::Pending => kind(ErrorKind::Conflict, "not approved yet"),
            ApprovalStatus::Consumed => kind(ErrorKind::AlreadyUsed, "consumed before"),
            ApprovalStatus::Rejected => Denial::denied("request was rejected"),
            ApprovalStatus::Expired => kind(ErrorKind::Expired, "request expired"),
            ApprovalStatus::Approved => {
                kind(ErrorKind::Conflict, "request changed state meanwhile")
            }
        }),
    }
}

/// Counts and logs a refusal of an approval endpoint.
pub fn refused(b: &Broker, rid: &str, endpoint: &str, d: &Denial) {
    b.metrics.approval("refused");
    warn!(request_id = rid, endpoint, outcome = d.kind.as_str(), reason = %d.reason, "approval request refused");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_attrs() {
        let id = new_id().unwrap();
        assert!(valid_id(&id), "{id}");
        assert!(!valid_id("apr_XYZ"));
        assert!(!valid_id(&id.replace("apr_", "req_")));
        let k = ApprovalKey {
            label: Some("ca-root".into()),
            id: Some("a1ff".into()),
            class: Some(3),
            fingerprint: "00".repeat(32),
            ..ApprovalKey::default()
        };
        let a = attrs_of(&k);
        assert_eq!(a.id.as_deref(), Some(&[0xa1, 0xff][..]));
        assert_eq!(a.label.as_deref(), Some(&b"ca-root"[..]));
    }

    #[test]
    fn new_request_syntax() {
        let mut n = NewApproval {
            v: 1,
            key: ApprovalKey {
                fingerprint: "ab".repeat(32),
                ..ApprovalKey::default()
            },
            op: "sign".into(),
            mechanism: Some(0x40),
            data_sha256: Some("cd".repeat(32)),
        };
        assert_eq!(check_new(&n).unwrap(), Op::Sign);
        n.op = "frobnicate".into();
        assert!(check_new(&n).is_err());
        n.op = "sign".into();
        n.data_sha256 = Some("CD".repeat(32));
        assert!(check_new(&n).is_err());
        n.data_sha256 = None;
        n.key.label = Some("a\nkey-label: b".into());
        assert!(check_new(&n).is_err());
        n.key.label = None;
        n.key.fingerprint = "ab".repeat(31);
        assert!(check_new(&n).is_err());
    }
}
