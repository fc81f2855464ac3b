//! Online verification: the apiserver's TokenReview API
//! (`POST /apis/authentication.k8s.io/v1/tokenreviews`), asked as the
//! broker's own service account (bound to `system:auth-delegator`). Besides
//! the signature, the apiserver checks that the pod the token is bound to
//! still exists: the only way to notice a deleted pod before `exp`.

use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use zeroize::Zeroizing;

use super::K8sError;
use super::http::{HttpClient, Url};
use super::jws::{shown, shown_at_most, valid_namespace, valid_service_account};

const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// A TokenReview answer echoes the token; with user info it stays small.
const MAX_ANSWER: usize = 64 * 1024;

pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

#[derive(Debug)]
pub struct TokenReview {
    url: Url,
    http: HttpClient,
}

/// What the apiserver said about an authenticated token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reviewed {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

// Only the fields we read; the rest of the answer (including the echoed
// spec.token) is skipped, never stored.
#[derive(Deserialize)]
struct Answer {
    kind: Option<String>,
    #[serde(default)]
    status: Status,
}

#[derive(Deserialize, Default)]
struct Status {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: User,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize, Default)]
struct User {
    #[serde(default)]
    username: String,
    #[serde(default)]
    extra: HashMap<String, Vec<String>>,
}

fn one_extra(extra: &HashMap<String, Vec<String>>, key: &str) -> Result<Option<String>, K8sError> {
    match extra.get(key).map(Vec::as_slice) {
        None | Some([]) => Ok(None),
        Some([v]) => Ok(Some(v.clone())),
        Some(_) => Err(K8sError::Denied(format!("TokenReview gives several {key}"))),
    }
}

impl TokenReview {
    pub fn new(api_server: &Url, http: HttpClient) -> TokenReview {
        TokenReview {
            url: api_server.join(PATH),
            http,
        }
    }

    /// Asks the apiserver whether `token` is valid for `audience`.
    pub async fn review(&self, token: &str, audience: &str) -> Result<Reviewed, K8sError> {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        });
        let body = Zeroizing::new(
            serde_json::to_vec(&body)
                .map_err(|_| K8sError::Denied("token not encodable".into()))?,
        );
        let answer = self.http.post_json(&self.url, body, MAX_ANSWER).await?;
        let answer: Answer = serde_json::from_slice(&answer)
            .map_err(|_| K8sError::Unavailable("TokenReview answer is not a TokenReview".into()))?;
        if answer.kind.as_deref() != Some("TokenReview") {
            return Err(K8sError::Unavailable(
                "TokenReview answer is not a TokenReview".into(),
            ));
        }
        let st = answer.status;
        if !st.authenticated {
            let why = st
                .error
                .as_deref()
                .map(|e| shown_at_most(e, 200))
                .unwrap_or_else(|| "no reason given".into());
            return Err(K8sError::Denied(format!(
                "apiserver did not authenticate the token: {why}"
            )));
        }
        if !st.audiences.iter().any(|a| a == audience) {
            return Err(K8sError::Denied(
                "TokenReview audiences lack the broker's".into(),
            ));
        }
        let Some((ns, sa)) = st
            .user
            .username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
            .filter(|(ns, sa)| valid_namespace(ns) && valid_service_account(sa))
        else {
            return Err(K8sError::Denied(format!(
                "TokenReview user {} is not a service account",
                shown(&st.user.username)
            )));
        };
        Ok(Reviewed {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
            pod_name: one_extra(&st.user.extra, EXTRA_POD_NAME)?,
            pod_uid: one_extra(&st.user.extra, EXTRA_POD_UID)?,
        })
    }
}
