//! The module's side of quorum approval (`p11shim_proto::approval`):
//! filing a request for one key use at the broker, reading it back, and
//! consuming it once approved. Calls run on the application's thread (the
//! call being approved waits for them) with the broker client of the
//! credentials thread and the approval token of the latest grant.

use std::time::Duration;

use p11shim_proto::approval::{APPROVALS_PATH, Approval, Consume, NewApproval};
use p11shim_proto::{ErrorKind, Problem};

use super::{Agent, MAX_ANSWER, evidence::without_url};

/// Why an approval call did not give an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    /// No answer: no grant or token yet, the broker unreachable, or an
    /// answer that is not an approval document.
    #[error("approval service unavailable: {0}")]
    Unavailable(String),
    /// The broker refused, with its problem kind.
    #[error("the broker refused: {0}")]
    Refused(ErrorKind),
}

impl Agent {
    /// `POST /v1/approvals` (idempotent at the broker).
    pub fn approval_request(&self, req: &NewApproval) -> Result<Approval, ApprovalError> {
        let body =
            serde_json::to_vec(req).map_err(|e| ApprovalError::Unavailable(e.to_string()))?;
        self.approval_call(APPROVALS_PATH.to_string(), Some(body))
    }

    /// `GET /v1/approvals/{id}`.
    pub fn approval_get(&self, id: &str) -> Result<Approval, ApprovalError> {
        self.approval_call(format!("{APPROVALS_PATH}/{id}"), None)
    }

    /// `POST /v1/approvals/{id}/consume`.
    pub fn approval_consume(&self, id: &str, c: &Consume) -> Result<Approval, ApprovalError> {
        let body = serde_json::to_vec(c).map_err(|e| ApprovalError::Unavailable(e.to_string()))?;
        self.approval_call(format!("{APPROVALS_PATH}/{id}/consume"), Some(body))
    }

    fn approval_call(
        &self,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<Approval, ApprovalError> {
        let http = self.shared.http.get().ok_or_else(|| {
            ApprovalError::Unavailable("the broker client is not set up yet".into())
        })?;
        let token = {
            let st = self.shared.state.lock();
            st.grant.as_ref().and_then(|g| g.approval_token.clone())
        }
        .ok_or_else(|| {
            ApprovalError::Unavailable(
                "no approval token: no grant yet, or the role's policy has no quorum rules".into(),
            )
        })?;
        let url = format!("{}{path}", self.shared.cfg.url);
        let timeout = Duration::from_millis(self.shared.cfg.request_timeout_ms);
        let req = match body {
            Some(b) => http
                .post(url)
                .header("content-type", "application/json")
                .body(b),
            None => http.get(url),
        };
        let resp = req
            .bearer_auth(token.as_str())
            .timeout(timeout)
            .send()
            .map_err(|e| ApprovalError::Unavailable(without_url(&e)))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .map_err(|e| ApprovalError::Unavailable(without_url(&e)))?;
        if bytes.len() > MAX_ANSWER {
            return Err(ApprovalError::Unavailable("answer too large".into()));
        }
        if !status.is_success() {
            return Err(match serde_json::from_slice::<Problem>(&bytes) {
                Ok(p) => ApprovalError::Refused(p.title),
                Err(_) => {
                    ApprovalError::Unavailable(format!("HTTP {status} without a problem document"))
                }
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ApprovalError::Unavailable(format!("not an approval document: {e}")))
    }
}
