//! Kubernetes projected service-account tokens, verified by TokenReview
//! (online) or OIDC discovery + JWKS (offline).

/// What a verified token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K8sIdentity {
    pub cluster: String,
    pub issuer: String,
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub jti: Option<String>,
    /// Unix seconds.
    pub issued_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The token is not acceptable; the reason goes to the log only.
    #[error("token refused: {0}")]
    Denied(String),
    /// The cluster could not be asked.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
}
