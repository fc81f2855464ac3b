//! The approval store: quorum requests, each approver's decision, and the
//! one-time consumption, for the `sqlite` and `postgres` backends.
//!
//! Every state change is one transaction that holds the request's row
//! (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: `SELECT … FOR UPDATE`), so two
//! replicas approving at once can neither lose an approval nor count one
//! twice, and `(id, approver)` is a primary key besides. Consumption is one
//! `UPDATE … WHERE status = 'approved' AND consumed_at IS NULL AND
//! expires_at > now`: of any number of concurrent consumers exactly one
//! changes the row. Times are the broker's clock in Unix seconds, passed
//! in, never the database's.

use p11shim_proto::approval::{ApprovalKey, ApprovalStatus};

use super::StoreError;

/// The stored state of a request (`expired` is not stored: it is a
/// pending or approved request whose `expires_at` has passed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Pending,
    Approved,
    Rejected,
    Consumed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Rejected => "rejected",
            State::Consumed => "consumed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "pending" => State::Pending,
            "approved" => State::Approved,
            "rejected" => State::Rejected,
            "consumed" => State::Consumed,
            _ => return None,
        })
    }
}

/// One approver's recorded decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signoff {
    pub approver: String,
    pub approve: bool,
    /// Unix seconds.
    pub at: i64,
}

/// A request as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRecord {
    pub id: String,
    pub role: String,
    pub subject: String,
    pub key: ApprovalKey,
    pub op: String,
    pub mechanism: Option<u64>,
    pub data_sha256: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub expires_at: i64,
    pub m: u32,
    pub approvers: Vec<String>,
    pub state: State,
    pub consumed_at: Option<i64>,
    /// The canonical bytes approvers sign (`p11shim_proto::approval::approval_data`).
    pub approval_data: Vec<u8>,
    /// In the order they were recorded.
    pub signoffs: Vec<Signoff>,
}

impl ApprovalRecord {
    /// The status a client is shown at `now`.
    pub fn status(&self, now: i64) -> ApprovalStatus {
        match self.state {
            State::Pending | State::Approved if self.expires_at <= now => ApprovalStatus::Expired,
            State::Pending => ApprovalStatus::Pending,
            State::Approved => ApprovalStatus::Approved,
            State::Rejected => ApprovalStatus::Rejected,
            State::Consumed => ApprovalStatus::Consumed,
        }
    }

    pub fn approvals(&self) -> usize {
        self.signoffs.iter().filter(|s| s.approve).count()
    }

    pub fn rejections(&self) -> usize {
        self.signoffs.iter().filter(|s| !s.approve).count()
    }
}

/// What `decide` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decided {
    /// Recorded; the record as it now is.
    Recorded(ApprovalRecord),
    NotFound,
    /// Not pending (approved, rejected or consumed already) or expired;
    /// nothing recorded.
    Closed(ApprovalRecord),
    /// This approver decided on this request before; nothing recorded.
    Duplicate(ApprovalRecord),
}

/// What `consume` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Consumed {
    /// This call consumed it.
    Consumed(ApprovalRecord),
    NotFound,
    /// Not consumable (pending, rejected, expired, consumed before); the
    /// record as it is.
    Refused(ApprovalRecord),
}

/// Which requests `list` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListFilter {
    pub status: Option<ApprovalStatus>,
    /// Newest first, at most this many.
    pub limit: u32,
}

/// The approval half of the `sqlite` and `postgres` backends. See the
/// module documentation for the guarantees.
pub trait ApprovalStore: Send + Sync {
    /// Stores `new` unless an open request (pending or approved, unexpired
    /// at `now`, never consumed) of the same role, subject, key
    /// fingerprint, operation, mechanism and data hash exists: then returns
    /// that one and `false`. Atomic among replicas.
    fn create(&self, new: &ApprovalRecord, now: i64) -> Result<(ApprovalRecord, bool), StoreError>;
    fn get(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError>;
    fn list(&self, filter: ListFilter, now: i64) -> Result<Vec<ApprovalRecord>, StoreError>;
    /// Records one approver's decision on a pending, unexpired request
    /// (the caller has checked that `approver` is one of its approvers and
    /// verified `signature`); the request becomes `approved` when `m`
    /// approvals are recorded, `rejected` when more than `n - m`
    /// rejections are (so `m` can no longer be reached).
    fn decide(
        &self,
        id: &str,
        approver: &str,
        approve: bool,
        signature: &[u8],
        now: i64,
    ) -> Result<Decided, StoreError>;
    /// Consumes an approved, unexpired, never consumed request, exactly once.
    fn consume(&self, id: &str, now: i64) -> Result<Consumed, StoreError>;
    /// Deletes requests (and their decisions) that expired before `before`.
    fn tidy_approvals(&self, before: i64) -> Result<u64, StoreError>;
}

/// Why `judge` records nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unrecorded {
    Closed,
    Duplicate,
}

impl Unrecorded {
    /// The answer of `decide`, with the record as it is.
    pub(crate) fn answer(self, rec: ApprovalRecord) -> Decided {
        match self {
            Unrecorded::Closed => Decided::Closed(rec),
            Unrecorded::Duplicate => Decided::Duplicate(rec),
        }
    }
}

/// The shared rule of `decide`, run inside the backend's transaction on the
/// locked row: `Err` when nothing may be recorded, else the state after
/// recording the decision.
pub(crate) fn judge(
    rec: &ApprovalRecord,
    approver: &str,
    approve: bool,
    now: i64,
) -> Result<State, Unrecorded> {
    if rec.state != State::Pending || rec.expires_at <= now {
        return Err(Unrecorded::Closed);
    }
    if rec.signoffs.iter().any(|s| s.approver == approver) {
        return Err(Unrecorded::Duplicate);
    }
    let n = rec.approvers.len();
    let m = rec.m as usize;
    Ok(if approve && rec.approvals() + 1 >= m {
        State::Approved
    } else if !approve && rec.rejections() + 1 > n.saturating_sub(m) {
        State::Rejected
    } else {
        State::Pending
    })
}

/// The `WHERE` condition (over columns `status` and `expires_at`, with the
/// current time as the parameter `now`) of a listed status.
pub(crate) fn status_condition(s: ApprovalStatus, now: &str) -> String {
    match s {
        ApprovalStatus::Pending => format!("status = 'pending' AND expires_at > {now}"),
        ApprovalStatus::Approved => format!("status = 'approved' AND expires_at > {now}"),
        ApprovalStatus::Expired => {
            format!("status IN ('pending', 'approved') AND expires_at <= {now}")
        }
        ApprovalStatus::Rejected => "status = 'rejected'".into(),
        ApprovalStatus::Consumed => "status = 'consumed'".into(),
    }
}

/// `ApprovalKey` as stored (JSON text).
pub(crate) fn key_json(k: &ApprovalKey) -> String {
    serde_json::to_string(k).unwrap_or_default()
}

pub(crate) fn parse_key(s: &str) -> Result<ApprovalKey, StoreError> {
    serde_json::from_str(s)
        .map_err(|e| StoreError::Unavailable(format!("stored approval key does not parse: {e}")))
}

pub(crate) fn approvers_json(a: &[String]) -> String {
    serde_json::to_string(a).unwrap_or_default()
}

pub(crate) fn parse_approvers(s: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(s)
        .map_err(|e| StoreError::Unavailable(format!("stored approvers do not parse: {e}")))
}

pub(crate) fn parse_state(s: &str) -> Result<State, StoreError> {
    State::parse(s).ok_or_else(|| StoreError::Unavailable(format!("unknown stored status {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(m: u32, signoffs: &[(&str, bool)]) -> ApprovalRecord {
        ApprovalRecord {
            id: "apr_1".into(),
            role: "ca".into(),
            subject: "s".into(),
            key: ApprovalKey::default(),
            op: "sign".into(),
            mechanism: None,
            data_sha256: None,
            created_at: 0,
            expires_at: 100,
            m,
            approvers: vec!["a".into(), "b".into(), "c".into()],
            state: State::Pending,
            consumed_at: None,
            approval_data: Vec::new(),
            signoffs: signoffs
                .iter()
                .map(|(a, ok)| Signoff {
                    approver: (*a).into(),
                    approve: *ok,
                    at: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn two_of_three() {
        assert_eq!(judge(&rec(2, &[]), "a", true, 5), Ok(State::Pending));
        assert_eq!(
            judge(&rec(2, &[("a", true)]), "b", true, 5),
            Ok(State::Approved)
        );
        // One rejection: 2 of the other 2 can still approve.
        assert_eq!(judge(&rec(2, &[]), "a", false, 5), Ok(State::Pending));
        // Two rejections: only one approver is left, m = 2 is out of reach.
        assert_eq!(
            judge(&rec(2, &[("a", false)]), "b", false, 5),
            Ok(State::Rejected)
        );
        assert!(matches!(
            judge(&rec(2, &[("a", true)]), "a", true, 5),
            Err(Unrecorded::Duplicate)
        ));
        assert!(matches!(
            judge(&rec(2, &[("a", true)]), "a", false, 5),
            Err(Unrecorded::Duplicate)
        ));
        assert!(matches!(
            judge(&rec(2, &[]), "a", true, 100),
            Err(Unrecorded::Closed)
        ));
    }

    #[test]
    fn three_of_three_is_vetoed_by_one() {
        assert_eq!(judge(&rec(3, &[]), "a", false, 5), Ok(State::Rejected));
        assert_eq!(
            judge(&rec(1, &[("a", false)]), "b", false, 5),
            Ok(State::Pending)
        );
    }

    #[test]
    fn status_at() {
        let mut r = rec(2, &[]);
        assert_eq!(r.status(99), ApprovalStatus::Pending);
        assert_eq!(r.status(100), ApprovalStatus::Expired);
        r.state = State::Consumed;
        assert_eq!(r.status(100), ApprovalStatus::Consumed);
    }
}
