//! `k8s-sa-token`: a pod's projected service-account token, verified by the
//! role's cluster ([`crate::k8s::K8sVerifier`], TokenReview or OIDC), then
//! its `(namespace, service account)` looked up in the role's
//! `service_accounts`.
//!
//! The one-time-use identity is the pod when the token names one (trust on
//! first use per pod; the kubelet's rotated tokens of that pod then
//! re-authenticate with the module's nonce), else the token itself (`jti`,
//! or `sub` and `iat` for clusters that do not set `jti`). Token freshness
//! is the verifier's: `exp`, `nbf`, `iat` and the lifetime bound.

use std::collections::BTreeMap;

use p11shim_proto::K8sEvidence;
use sha2::{Digest, Sha256};

use super::{Context, Denial, Verified, replay_key};
use crate::config::{Config, ServiceAccountPattern};
use crate::k8s::jws::Compact;
use crate::k8s::{K8sError, K8sIdentity, K8sVerifier};

/// The verifiers of every `[k8s.<name>]` cluster, by name.
pub type Clusters = BTreeMap<String, K8sVerifier>;

/// Builds one verifier per configured cluster; reads what each names (CA,
/// pinned JWKS, the broker's own token), so a mistake stops the start.
pub fn clusters(cfg: &Config) -> Result<Clusters, K8sError> {
    cfg.k8s
        .iter()
        .map(|(name, c)| Ok((name.clone(), K8sVerifier::new(name, c)?)))
        .collect()
}

/// A Kubernetes object UID as the apiserver writes it (a UUID); anything
/// else is not put in a subject.
fn uid_shaped(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The identity a request claims, for the per-identity rate limit: read
/// from the token's claims without verifying anything and without a
/// network call. `None` when the token does not even parse (it is then
/// refused locally, at no cost upstream).
pub fn claimed_identity(ev: Option<&K8sEvidence>) -> Option<String> {
    let jws = Compact::parse(ev?.token.expose()).ok()?;
    let c = jws.claims().ok()?;
    // Namespace and service account passed their DNS-name checks; a pod
    // UID of another shape is hashed so that a log line stays bounded.
    let pod = match c.pod.as_ref().map(|p| p.uid.as_str()) {
        Some(uid) if uid_shaped(uid) => uid.to_owned(),
        Some(uid) => Sha256::digest(uid.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        None => "-".into(),
    };
    Some(format!("k8s:{}:{}:{pod}", c.namespace, c.service_account))
}

/// The cluster this request is verified against: the role's, which the
/// request may name but not change.
fn cluster_of<'a>(cfg: &'a Config, ctx: &Context<'a>, ev: &K8sEvidence) -> Result<&'a str, Denial> {
    let Some(cluster) = cfg.k8s_cluster_of(ctx.role) else {
        // Validation makes this unreachable; refuse rather than guess.
        return Err(Denial::unavailable(format!(
            "role {} names no Kubernetes cluster",
            ctx.role_name
        )));
    };
    match &ev.cluster {
        Some(asked) if asked != cluster => Err(Denial::denied(format!(
            "cluster {} is not the role's ({cluster})",
            crate::k8s::jws::shown(asked)
        ))),
        _ => Ok(cluster),
    }
}

pub async fn verify(
    ctx: &Context<'_>,
    cfg: &Config,
    clusters: &Clusters,
    ev: Option<&K8sEvidence>,
) -> Result<Verified, Denial> {
    let ev = ev.ok_or_else(|| Denial::bad_request("k8s evidence missing"))?;
    let cluster = cluster_of(cfg, ctx, ev)?;
    let verifier = clusters.get(cluster).ok_or_else(|| {
        Denial::unavailable(format!("no verifier for cluster {cluster} (not started)"))
    })?;
    let id = verifier
        .verify(ev.token.expose(), ctx.now)
        .await
        .map_err(|e| match e {
            K8sError::Denied(r) => Denial::denied(format!("cluster {cluster}: {r}")),
            K8sError::Unavailable(r) => Denial::unavailable(format!("cluster {cluster}: {r}")),
            K8sError::Config(r) => Denial::unavailable(format!("cluster {cluster}: {r}")),
        })?;
    admit(ctx, &id)
}

/// The role's rules on a verified identity, and its one-time-use key.
fn admit(ctx: &Context<'_>, id: &K8sIdentity) -> Result<Verified, Denial> {
    let allowed = ctx
        .role
        .service_accounts
        .iter()
        .filter_map(|p| ServiceAccountPattern::parse(p))
        .any(|p| p.matches(&id.namespace, &id.service_account));
    if !allowed {
        return Err(Denial::denied(format!(
            "service account {}/{} not in the role",
            id.namespace, id.service_account
        )));
    }
    if let Some(uid) = &id.pod_uid
        && !uid_shaped(uid)
    {
        return Err(Denial::denied("pod uid is not a Kubernetes UID"));
    }
    let subject = format!(
        "k8s:{}:{}:{}:{}",
        id.cluster,
        id.namespace,
        id.service_account,
        id.pod_uid.as_deref().unwrap_or("-")
    );
    let (role, iss) = (ctx.role_name.as_bytes(), id.issuer.as_bytes());
    let key = match (&id.pod_uid, &id.jti) {
        (Some(uid), _) => replay_key(&[b"v1", b"k8s", role, iss, b"pod", uid.as_bytes()]),
        (None, Some(jti)) => replay_key(&[b"v1", b"k8s", role, iss, b"jti", jti.as_bytes()]),
        (None, None) => {
            let sub = format!(
                "system:serviceaccount:{}:{}",
                id.namespace, id.service_account
            );
            replay_key(&[
                b"v1",
                b"k8s",
                role,
                iss,
                b"sub-iat",
                sub.as_bytes(),
                &id.issued_at.to_be_bytes(),
            ])
        }
    };
    Ok(Verified {
        subject,
        replay_key: key,
        first_use: Ok(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::SystemTime;

    const CFG: &str = r#"
[server]
listen = "127.0.0.1:0"
[k8s.c1]
issuer = "https://issuer.example"
audience = "hsm-broker"
mode = "oidc"
[roles.r]
methods = ["k8s-sa-token"]
pin = "env:P"
service_accounts = ["payments/signer", "batch/*"]
"#;

    fn identity(ns: &str, sa: &str, pod: Option<&str>, jti: Option<&str>) -> K8sIdentity {
        K8sIdentity {
            cluster: "c1".into(),
            issuer: "https://issuer.example".into(),
            namespace: ns.into(),
            service_account: sa.into(),
            pod_name: pod.map(|_| "p".into()),
            pod_uid: pod.map(str::to_owned),
            jti: jti.map(str::to_owned),
            issued_at: 1_700_000_000,
            expires_at: 1_700_000_600,
        }
    }

    fn with_role<T>(f: impl FnOnce(&Context<'_>) -> T) -> T {
        let cfg = Config::parse(CFG).unwrap();
        let limits = crate::ratelimit::Limiters::new(&cfg.limits);
        let ctx = Context {
            role_name: "r",
            role: &cfg.roles["r"],
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            now: SystemTime::now(),
            limits: &limits,
            aws_region: None,
        };
        f(&ctx)
    }

    #[test]
    fn allow_list_exact_and_namespace_wildcard() {
        with_role(|ctx| {
            let v = admit(ctx, &identity("payments", "signer", Some("u-1"), None)).unwrap();
            assert_eq!(v.subject, "k8s:c1:payments:signer:u-1");
            admit(ctx, &identity("batch", "anything", None, Some("j"))).unwrap();
            for (ns, sa) in [("payments", "other"), ("other", "signer"), ("batch-2", "x")] {
                let d = admit(ctx, &identity(ns, sa, None, Some("j"))).unwrap_err();
                assert_eq!(d.kind, p11shim_proto::ErrorKind::Denied, "{ns}/{sa}");
            }
        });
    }

    #[test]
    fn replay_key_is_the_pod_else_the_token() {
        with_role(|ctx| {
            let k = |id: K8sIdentity| admit(ctx, &id).unwrap().replay_key;
            // Two tokens of one pod: one identity (rotation re-authenticates).
            assert_eq!(
                k(identity("payments", "signer", Some("u-1"), Some("j1"))),
                k(identity("payments", "signer", Some("u-1"), Some("j2")))
            );
            assert_ne!(
                k(identity("payments", "signer", Some("u-1"), None)),
                k(identity("payments", "signer", Some("u-2"), None))
            );
            // No pod: one identity per token.
            assert_ne!(
                k(identity("payments", "signer", None, Some("j1"))),
                k(identity("payments", "signer", None, Some("j2")))
            );
            let mut later = identity("payments", "signer", None, None);
            later.issued_at += 1;
            assert_ne!(k(identity("payments", "signer", None, None)), k(later));
            let d = admit(ctx, &identity("payments", "signer", Some("a:b"), None)).unwrap_err();
            assert_eq!(d.kind, p11shim_proto::ErrorKind::Denied);
        });
    }

    #[test]
    fn a_request_may_name_the_roles_cluster_only() {
        let cfg = Config::parse(CFG).unwrap();
        with_role(|ctx| {
            let ev = |c: Option<&str>| K8sEvidence {
                cluster: c.map(str::to_owned),
                token: p11shim_proto::Secret::new("t"),
            };
            assert_eq!(cluster_of(&cfg, ctx, &ev(None)).unwrap(), "c1");
            assert_eq!(cluster_of(&cfg, ctx, &ev(Some("c1"))).unwrap(), "c1");
            let d = cluster_of(&cfg, ctx, &ev(Some("c2"))).unwrap_err();
            assert_eq!(d.kind, p11shim_proto::ErrorKind::Denied);
        });
    }

    #[test]
    fn claimed_identity_reads_claims_unverified() {
        use base64::Engine as _;
        let enc = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let payload = serde_json::json!({
            "iss": "i", "sub": "system:serviceaccount:payments:signer", "aud": "a",
            "exp": 2, "iat": 1,
            "kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "signer"},
                              "pod": {"name": "p", "uid": "u-1"}}
        });
        let token = format!(
            "{}.{}.c2ln",
            enc(serde_json::json!({"alg": "RS256"})),
            enc(payload)
        );
        let ev = K8sEvidence {
            cluster: None,
            token: p11shim_proto::Secret::new(token),
        };
        assert_eq!(
            claimed_identity(Some(&ev)).as_deref(),
            Some("k8s:payments:signer:u-1")
        );
        let junk = K8sEvidence {
            cluster: None,
            token: p11shim_proto::Secret::new("not.a.token"),
        };
        assert_eq!(claimed_identity(Some(&junk)), None);
        assert_eq!(claimed_identity(None), None);
    }
}
