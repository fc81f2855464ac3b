//! The broker's approval endpoints (`/v1/approvals`), as an approver calls
//! them. Reads are unauthenticated; a decision is authenticated by its
//! signature, which the broker checks against the approver's registered
//! key. Refusals arrive as problem+json with a coarse kind; the exact
//! reason stays in the broker's log under the request id shown.

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use p11shim_proto::approval::{APPROVALS_PATH, Approval, ApprovalList, ApprovalStatus, Decision};
use p11shim_proto::{ErrorKind, Problem};

use super::ApproveError;

/// Largest answer read (a list of many requests).
const MAX_ANSWER: u64 = 8 * 1024 * 1024;

/// Approve or reject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Approve,
    Reject,
}

impl Verdict {
    pub fn path(self) -> &'static str {
        match self {
            Verdict::Approve => "approve",
            Verdict::Reject => "reject",
        }
    }
}

#[derive(Debug)]
pub struct BrokerClient {
    url: String,
    http: reqwest::blocking::Client,
}

impl BrokerClient {
    /// A client of the broker at `url` (`https://`, or `http://` on a
    /// loopback address only), trusting the CA certificates in `ca` when
    /// given, else the system's.
    pub fn new(url: &str, ca: Option<&Path>, timeout: Duration) -> Result<Self, ApproveError> {
        let url = url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| ApproveError::Usage(format!("broker URL {url:?}: {e}")))?;
        let loopback = match parsed.host_str() {
            Some("localhost") => true,
            Some(h) => h
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback()),
            None => false,
        };
        match parsed.scheme() {
            "https" => {}
            "http" if loopback => {}
            "http" => {
                return Err(ApproveError::Usage(format!(
                    "broker URL {url}: http:// only on a loopback address; use https://"
                )));
            }
            s => {
                return Err(ApproveError::Usage(format!(
                    "broker URL {url}: unsupported scheme {s:?}"
                )));
            }
        }
        let mut b = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("p11shim-approve/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| {
                ApproveError::Usage(format!("broker CA {}: {}", ca.display(), e.kind()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
                ApproveError::Usage(format!("broker CA {}: not PEM certificates", ca.display()))
            })?;
            if certs.is_empty() {
                return Err(ApproveError::Usage(format!(
                    "broker CA {}: no certificate",
                    ca.display()
                )));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if loopback {
            b = b.no_proxy();
        }
        let http = b
            .build()
            .map_err(|e| ApproveError::Broker(format!("client: {}", e.without_url())))?;
        Ok(BrokerClient { url, http })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET /v1/approvals[?status=]`.
    pub fn list(&self, status: Option<ApprovalStatus>) -> Result<Vec<Approval>, ApproveError> {
        let mut req = self.http.get(format!("{}{APPROVALS_PATH}", self.url));
        if let Some(s) = status {
            req = req.query(&[("status", s.as_str())]);
        }
        let list: ApprovalList = self.call(req, None)?;
        Ok(list.approvals)
    }

    /// `GET /v1/approvals/{id}`.
    pub fn get(&self, id: &str) -> Result<Approval, ApproveError> {
        let req = self.http.get(format!("{}{APPROVALS_PATH}/{id}", self.url));
        self.call(req, Some(id))
    }

    /// `POST /v1/approvals/{id}/approve` or `.../reject`.
    pub fn decide(
        &self,
        id: &str,
        verdict: Verdict,
        decision: &Decision,
    ) -> Result<Approval, ApproveError> {
        let body = serde_json::to_vec(decision)
            .map_err(|e| ApproveError::Broker(format!("encode: {e}")))?;
        let req = self
            .http
            .post(format!(
                "{}{APPROVALS_PATH}/{id}/{}",
                self.url,
                verdict.path()
            ))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.call(req, Some(id))
    }

    fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::blocking::RequestBuilder,
        id: Option<&str>,
    ) -> Result<T, ApproveError> {
        let r = req
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .map_err(|e| ApproveError::Broker(format!("{}: {}", self.url, e.without_url())))?;
        let status = r.status();
        let request_id = r
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut bytes = Vec::new();
        r.take(MAX_ANSWER + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ApproveError::Broker(format!("{}: reading the answer: {e}", self.url)))?;
        if bytes.len() as u64 > MAX_ANSWER {
            return Err(ApproveError::Broker(format!(
                "{}: answer larger than {MAX_ANSWER} bytes",
                self.url
            )));
        }
        if !status.is_success() {
            let problem: Option<Problem> = serde_json::from_slice(&bytes).ok();
            return Err(match problem {
                Some(p) => ApproveError::Refused {
                    kind: p.title,
                    id: id.unwrap_or("").to_owned(),
                    request_id: if p.request_id.is_empty() {
                        request_id
                    } else {
                        p.request_id
                    },
                },
                None => ApproveError::Broker(format!(
                    "{} answered {} without a problem document",
                    self.url,
                    status.as_u16()
                )),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            ApproveError::Broker(format!("{}: not an approval document: {e}", self.url))
        })
    }
}

/// The one-line message for a refusal of the broker.
pub fn refusal(kind: ErrorKind, id: &str, request_id: &str) -> String {
    let what = if id.is_empty() {
        "the request".to_owned()
    } else {
        id.to_owned()
    };
    let why = match kind {
        ErrorKind::Denied => format!(
            "the broker denied it (not an approver of {what}, a signature that does not verify with the approver's registered key, or a rejected request)"
        ),
        ErrorKind::Conflict => {
            format!("conflict: {what} is no longer pending, or this approver already decided on it")
        }
        ErrorKind::Expired => format!("{what} expired"),
        ErrorKind::NotFound => format!("no approval request {what}"),
        ErrorKind::AlreadyUsed => format!("{what} was already used"),
        ErrorKind::BadRequest => "the broker found the request malformed (bad_request)".to_owned(),
        ErrorKind::RateLimited => {
            "the broker is rate-limiting this address; try again later".into()
        }
        ErrorKind::Unavailable => "the broker is unavailable; try again later".into(),
    };
    if request_id.is_empty() {
        why
    } else {
        format!("{why} [{kind}, broker request id {request_id}]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_on_loopback() {
        let t = Duration::from_secs(1);
        assert!(BrokerClient::new("http://127.0.0.1:8443", None, t).is_ok());
        assert!(BrokerClient::new("http://[::1]:8443/", None, t).is_ok());
        assert!(BrokerClient::new("https://broker.example:8443", None, t).is_ok());
        assert!(BrokerClient::new("http://broker.example:8443", None, t).is_err());
        assert!(BrokerClient::new("ftp://127.0.0.1", None, t).is_err());
    }

    #[test]
    fn refusals_read_as_one_line() {
        for k in [
            ErrorKind::Denied,
            ErrorKind::Conflict,
            ErrorKind::Expired,
            ErrorKind::NotFound,
            ErrorKind::AlreadyUsed,
        ] {
            let m = refusal(k, "apr_01", "r-1");
            assert!(!m.contains('\n') && m.contains(k.as_str()), "{m}");
        }
        assert_eq!(
            refusal(ErrorKind::NotFound, "apr_01", ""),
            "no approval request apr_01"
        );
    }
}
