//! Kubernetes projected service-account tokens, verified by TokenReview
//! (online) or OIDC discovery + JWKS (offline).
//!
//! Every token first passes the same local checks, before any network call
//! ([`jws`]): size, compact JWS shape, `alg` RS256 or ES256 only, and the
//! still unverified claims read to refuse legacy tokens, extended
//! default-audience tokens (`warnafter`), lifetimes above the maximum, a
//! wrong issuer or audience and a token outside its validity window. Then
//! the mode decides: the signature against the cluster's keys
//! ([`oidc`]), or the apiserver's answer ([`tokenreview`]). The identity is
//! built only after that.
//!
//! A token the cluster refuses is [`K8sError::Denied`]; a cluster that
//! cannot be asked (network, 5xx, the broker's own credentials refused) is
//! [`K8sError::Unavailable`]. Reasons never hold the token.

mod http;
pub mod jws;
pub mod oidc;
pub mod tokenreview;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer};

use crate::secrets::SecretSource;
use http::{HttpClient, Url};
use jws::{Compact, shown};
use oidc::{Discovery, KeySet, KeySource};
use tokenreview::TokenReview;

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
    /// The cluster's configuration is not usable.
    #[error("cluster configuration: {0}")]
    Config(String),
}

/// How tokens of a cluster are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Ask the apiserver (sees deleted pods; needs the apiserver up).
    Tokenreview,
    /// Check the signature with the cluster's JWKS (no apiserver call per
    /// token; cannot see a deleted pod before `exp`).
    Oidc,
}

fn default_lifetime() -> Duration {
    Duration::from_secs(3600)
}

fn default_leeway() -> Duration {
    Duration::from_secs(60)
}

fn secret_source<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretSource>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| SecretSource::parse(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// One cluster in the broker's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The exact `iss` of the cluster's tokens (`--service-account-issuer`).
    pub issuer: String,
    /// The audience the pods' projected tokens are minted for. Broker
    /// specific: the apiserver's own audiences are refused.
    pub audience: String,
    pub mode: Mode,
    /// tokenreview: the apiserver's URL.
    #[serde(default)]
    pub api_server: Option<String>,
    /// PEM trust anchors for the apiserver or the issuer (then the only
    /// ones). Required for an https `api_server`; without it discovery
    /// trusts the web PKI (managed clusters' public issuers).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The broker's own service-account token (`file:`, `env:`, `cmd:`):
    /// the bearer of TokenReview calls; in oidc mode, optionally sent to
    /// the issuer's origin for discovery.
    #[serde(default, deserialize_with = "secret_source")]
    pub token: Option<SecretSource>,
    /// oidc: a pinned JWKS file instead of discovery.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The largest `exp - iat` accepted.
    #[serde(default = "default_lifetime", with = "humantime_serde")]
    pub max_token_lifetime: Duration,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
}

/// Audiences that a token minted for the apiserver itself carries: a pod's
/// default `kube-api-access` token has one of them, and must not open the
/// HSM.
const APISERVER_AUDIENCES: &[&str] = &[
    "https://kubernetes.default.svc",
    "https://kubernetes.default.svc.cluster.local",
    "https://kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes",
    "api",
];

const MAX_LEEWAY: Duration = Duration::from_secs(300);
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl ClusterConfig {
    /// Checks what the types cannot say.
    pub fn validate(&self) -> Result<(), K8sError> {
        let bad = |m: String| Err(K8sError::Config(m));
        if self.issuer.is_empty() {
            return bad("issuer is empty".into());
        }
        let aud = self.audience.trim_end_matches('/');
        if self.audience.trim().is_empty() {
            return bad("audience is empty".into());
        }
        if APISERVER_AUDIENCES
            .iter()
            .any(|a| a.eq_ignore_ascii_case(aud))
            || aud == self.issuer.trim_end_matches('/')
        {
            return bad(format!(
                "audience {:?} is one of the apiserver's own; choose a broker-specific one (e.g. \"hsm-broker\")",
                self.audience
            ));
        }
        if self.leeway > MAX_LEEWAY {
            return bad(format!("leeway above {} s", MAX_LEEWAY.as_secs()));
        }
        if self.max_token_lifetime.is_zero() || self.max_token_lifetime > MAX_LIFETIME {
            return bad("max_token_lifetime must be between 1 s and 24 h".into());
        }
        match self.mode {
            Mode::Tokenreview => {
                let Some(api) = &self.api_server else {
                    return bad("mode tokenreview needs api_server".into());
                };
                if Url::parse_checked(api)?.is_https() && self.ca_file.is_none() {
                    return bad("an https api_server needs ca_file (the cluster's CA)".into());
                }
                if self.token.is_none() {
                    return bad("mode tokenreview needs token (the broker's own)".into());
                }
                if self.jwks_file.is_some() {
                    return bad("jwks_file is for mode oidc".into());
                }
            }
            Mode::Oidc => {
                if self.api_server.is_some() {
                    return bad("api_server is for mode tokenreview".into());
                }
                if self.jwks_file.is_none() {
                    Url::parse_checked(&self.issuer)
                        .map_err(|e| K8sError::Config(format!("issuer (for discovery): {e}")))?;
                } else if self.token.is_some() {
                    return bad("token is not used with a pinned jwks_file".into());
                }
            }
        }
        Ok(())
    }
}

// One per cluster, built once: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Backend {
    Review(TokenReview),
    Keys(KeySource),
}

/// The verifier of one cluster's tokens.
#[derive(Debug)]
pub struct K8sVerifier {
    name: String,
    config: ClusterConfig,
    backend: Backend,
}

impl K8sVerifier {
    /// Validates the configuration and reads what it names (CA, pinned
    /// JWKS, the broker's token), so that a mistake shows at start.
    pub fn new(name: &str, config: &ClusterConfig) -> Result<K8sVerifier, K8sError> {
        let ctx = |e: K8sError| match e {
            K8sError::Config(m) => K8sError::Config(format!("cluster {name}: {m}")),
            other => other,
        };
        config.validate().map_err(ctx)?;
        let backend = match config.mode {
            Mode::Tokenreview => {
                let api = Url::parse_checked(config.api_server.as_deref().unwrap_or_default())
                    .map_err(ctx)?;
                let bearer = config.token.clone().map(|t| (t, api.clone()));
                let http = HttpClient::new(config.ca_file.as_deref(), bearer).map_err(ctx)?;
                http.check_bearer().map_err(ctx)?;
                Backend::Review(TokenReview::new(&api, http))
            }
            Mode::Oidc => match &config.jwks_file {
                Some(p) => {
                    let bytes = std::fs::read(p).map_err(|e| {
                        ctx(K8sError::Config(format!(
                            "jwks_file {}: {}",
                            p.display(),
                            e.kind()
                        )))
                    })?;
                    let keys = KeySet::parse(&bytes).map_err(|e| {
                        ctx(K8sError::Config(format!("jwks_file {}: {e}", p.display())))
                    })?;
                    Backend::Keys(KeySource::Pinned(keys))
                }
                None => {
                    let issuer = Url::parse_checked(&config.issuer).map_err(ctx)?;
                    let bearer = config.token.clone().map(|t| (t, issuer));
                    let http = HttpClient::new(config.ca_file.as_deref(), bearer).map_err(ctx)?;
                    http.check_bearer().map_err(ctx)?;
                    Backend::Keys(KeySource::Discovered(Box::new(
                        Discovery::new(config.issuer.clone(), http).map_err(ctx)?,
                    )))
                }
            },
        };
        Ok(K8sVerifier {
            name: name.to_owned(),
            config: config.clone(),
            backend,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Verifies a projected service-account token at time `now`.
    pub async fn verify(&self, token: &str, now: SystemTime) -> Result<K8sIdentity, K8sError> {
        let c = &self.config;
        let jws = Compact::parse(token)?;
        let claims = jws.claims()?;
        claims.check(&c.issuer, &c.audience, c.max_token_lifetime, c.leeway, now)?;
        let (pod_name, pod_uid) = match &self.backend {
            Backend::Keys(keys) => {
                keys.verify(&jws, now).await?;
                let pod = claims.pod.clone();
                (pod.as_ref().map(|p| p.name.clone()), pod.map(|p| p.uid))
            }
            Backend::Review(review) => {
                let r = review.review(token, &c.audience).await?;
                // The apiserver authenticated these very claims; they and
                // its answer must tell the same story.
                if r.namespace != claims.namespace || r.service_account != claims.service_account {
                    return Err(K8sError::Denied(format!(
                        "TokenReview user {}:{} differs from the token's claims",
                        shown(&r.namespace),
                        shown(&r.service_account)
                    )));
                }
                let claim_pod = claims.pod.as_ref();
                if let (Some(uid), Some(p)) = (&r.pod_uid, claim_pod)
                    && *uid != p.uid
                {
                    return Err(K8sError::Denied(
                        "TokenReview pod uid differs from the token's claims".into(),
                    ));
                }
                (
                    r.pod_name.or_else(|| claim_pod.map(|p| p.name.clone())),
                    r.pod_uid.or_else(|| claim_pod.map(|p| p.uid.clone())),
                )
            }
        };
        Ok(K8sIdentity {
            cluster: self.name.clone(),
            issuer: claims.iss,
            namespace: claims.namespace,
            service_account: claims.service_account,
            pod_name,
            pod_uid,
            jti: claims.jti,
            issued_at: claims.iat,
            expires_at: claims.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ClusterConfig, String> {
        toml::from_str::<ClusterConfig>(s).map_err(|e| e.to_string())
    }

    fn err(s: &str) -> String {
        let c = parse(s).unwrap();
        match K8sVerifier::new("c1", &c) {
            Err(K8sError::Config(m)) => m,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_durations() {
        let c = parse(
            r#"issuer = "https://i"
            audience = "hsm-broker"
            mode = "oidc"
            max_token_lifetime = "20m""#,
        )
        .unwrap();
        assert_eq!(c.max_token_lifetime, Duration::from_secs(1200));
        assert_eq!(c.leeway, Duration::from_secs(60));
        assert!(parse("issuer = \"x\"\naudience = \"a\"\nmode = \"oidc\"\nbogus = 1").is_err());
        assert!(parse("issuer = \"x\"\naudience = \"a\"\nmode = \"other\"").is_err());
        assert!(
            parse("issuer = \"x\"\naudience = \"a\"\nmode = \"oidc\"\ntoken = \"inline\"").is_err()
        );
    }

    #[test]
    fn refusals() {
        let base = "issuer = \"https://kubernetes.default.svc.cluster.local\"\n";
        let e = err(&format!(
            "{base}audience = \"https://kubernetes.default.svc\"\nmode = \"oidc\""
        ));
        assert!(e.contains("broker-specific"), "{e}");
        let e = err(&format!(
            "{base}audience = \"https://kubernetes.default.svc.cluster.local\"\nmode = \"oidc\""
        ));
        assert!(e.contains("broker-specific"), "{e}");
        let e = err(&format!(
            "{base}audience = \"hsm\"\nmode = \"tokenreview\"\ntoken = \"env:T\""
        ));
        assert!(e.contains("api_server"), "{e}");
        let e = err(&format!(
            "{base}audience = \"hsm\"\nmode = \"tokenreview\"\napi_server = \"https://k:6443\"\ntoken = \"env:T\""
        ));
        assert!(e.contains("ca_file"), "{e}");
        let e = err(&format!(
            "{base}audience = \"hsm\"\nmode = \"tokenreview\"\napi_server = \"http://10.0.0.1\"\ntoken = \"env:T\""
        ));
        assert!(e.contains("loopback"), "{e}");
        let e = err(&format!(
            "{base}audience = \"hsm\"\nmode = \"oidc\"\nleeway = \"10m\""
        ));
        assert!(e.contains("leeway"), "{e}");
        let e = err(&format!(
            "{base}audience = \"hsm\"\nmode = \"oidc\"\napi_server = \"https://k\""
        ));
        assert!(e.contains("tokenreview"), "{e}");
        let e = err(&format!(
            "{base}audience = \"hsm\"\nmode = \"oidc\"\njwks_file = \"/nonexistent/jwks\""
        ));
        assert!(e.starts_with("cluster c1: jwks_file"), "{e}");
        let e = err(&format!(
            "{base}audience = \"hsm\"\nmode = \"tokenreview\"\napi_server = \"http://127.0.0.1:1\"\ntoken = \"env:P11SHIM_K8S_UNSET_FOR_TEST\""
        ));
        assert!(e.contains("not set"), "{e}");
    }
}
