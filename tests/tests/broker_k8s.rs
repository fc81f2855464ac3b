//! Kubernetes projected service-account tokens checked by the broker's
//! verifier against the Kubernetes fake, in both modes: TokenReview
//! (online) and OIDC discovery + JWKS (offline).
//!
//! Needs `cargo build -p p11shim-peers` (the `k8s-fake` binary).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use p11shim_broker::k8s::{ClusterConfig, K8sError, K8sIdentity, K8sVerifier, Mode};
use p11shim_broker::secrets::SecretSource;
use p11shim_tests::TempDir;
use p11shim_tests::peers::k8s::{K8sFake, MintSpec};

const AUD: &str = "hsm-broker";
const MODES: [Mode; 2] = [Mode::Tokenreview, Mode::Oidc];

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("p11shim-k8s-")
        .tempdir()
        .expect("tempdir")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The broker's own token (the TokenReview bearer), in a 0600 file.
fn token_file(dir: &Path, value: &str) -> SecretSource {
    let p = dir.join("broker-token");
    std::fs::write(&p, format!("{value}\n")).expect("write token");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    SecretSource::File(p)
}

fn config(fake: &K8sFake, dir: &Path, mode: Mode) -> ClusterConfig {
    let tokenreview = mode == Mode::Tokenreview;
    ClusterConfig {
        issuer: fake.url().to_owned(),
        audience: AUD.to_owned(),
        mode,
        api_server: tokenreview.then(|| fake.url().to_owned()),
        ca_file: None,
        token: tokenreview.then(|| token_file(dir, fake.reviewer_token())),
        jwks_file: None,
        max_token_lifetime: Duration::from_secs(3600),
        leeway: Duration::from_secs(60),
    }
}

fn verifier(fake: &K8sFake, dir: &Path, mode: Mode) -> K8sVerifier {
    K8sVerifier::new("c1", &config(fake, dir, mode)).expect("verifier")
}

fn verify_at(v: &K8sVerifier, token: &str, now: SystemTime) -> Result<K8sIdentity, K8sError> {
    runtime().block_on(v.verify(token, now))
}

fn verify(v: &K8sVerifier, token: &str) -> Result<K8sIdentity, K8sError> {
    verify_at(v, token, SystemTime::now())
}

/// The refusal's reason; anything else fails the test.
#[track_caller]
fn denied(r: Result<K8sIdentity, K8sError>) -> String {
    match r {
        Err(K8sError::Denied(reason)) => reason,
        other => panic!("expected Denied, got {other:?}"),
    }
}

#[track_caller]
fn denied_for(r: Result<K8sIdentity, K8sError>, want: &str, mode: Mode) {
    let reason = denied(r);
    assert!(
        reason.contains(want),
        "{mode:?}: reason {reason:?} does not say {want:?}"
    );
}

#[track_caller]
fn unavailable(r: Result<K8sIdentity, K8sError>) -> String {
    match r {
        Err(K8sError::Unavailable(reason)) => reason,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// A pod's token for the broker.
fn spec() -> MintSpec {
    MintSpec {
        namespace: "payments".into(),
        service_account: "signer".into(),
        pod_name: Some("signer-7d9f8b-x2x4k".into()),
        pod_uid: Some("6f1c2a4e-0d7b-4c55-9a21-3e8f5b7d9c10".into()),
        node: Some("worker-1".into()),
        audiences: Some(vec![AUD.into()]),
        jti: Some("2c1b0d6e-jti".into()),
        ..MintSpec::default()
    }
}

struct Cluster {
    dir: TempDir,
    fake: K8sFake,
}

fn cluster() -> Cluster {
    let dir = tempdir();
    let fake = K8sFake::start(dir.path());
    Cluster { dir, fake }
}

/// Each token is refused in both modes, for `want`, without the verifier
/// asking the cluster anything.
fn refused_locally(c: &Cluster, token: &str, want: &str) {
    for mode in MODES {
        let v = verifier(&c.fake, c.dir.path(), mode);
        let before = c.fake.stats();
        denied_for(verify(&v, token), want, mode);
        assert_eq!(c.fake.stats(), before, "{mode:?}: the cluster was asked");
    }
}

#[test]
fn happy_path_identity_equals_the_mint_rs256_and_es256() {
    let c = cluster();
    for alg in ["RS256", "ES256"] {
        let s = MintSpec {
            alg: alg.into(),
            ..spec()
        };
        let token = c.fake.mint(&s);
        for mode in MODES {
            let id = verify(&verifier(&c.fake, c.dir.path(), mode), &token)
                .unwrap_or_else(|e| panic!("{alg} {mode:?}: {e}"));
            assert_eq!(id.cluster, "c1");
            assert_eq!(id.issuer, c.fake.url());
            assert_eq!(id.namespace, s.namespace);
            assert_eq!(id.service_account, s.service_account);
            assert_eq!(id.pod_name, s.pod_name);
            assert_eq!(id.pod_uid, s.pod_uid);
            assert_eq!(id.jti, s.jti);
            assert_eq!(id.expires_at - id.issued_at, s.lifetime_s, "{alg} {mode:?}");
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("clock")
                .as_secs() as i64;
            assert!(
                (id.issued_at - now).abs() < 120,
                "{alg} {mode:?}: iat {}",
                id.issued_at
            );
        }
    }
    assert_eq!(
        c.fake.stats().tokenreview,
        2,
        "one review per token in tokenreview mode"
    );
}

#[test]
fn wrong_audience_is_refused() {
    let c = cluster();
    for audiences in [
        vec!["other-service".to_string()],
        vec![c.fake.url().to_string()],
    ] {
        let token = c.fake.mint(&MintSpec {
            audiences: Some(audiences),
            ..spec()
        });
        refused_locally(&c, &token, "audience");
    }
    // The pod's default token (apiserver audience) too.
    let token = c.fake.mint(&MintSpec {
        audiences: None,
        ..spec()
    });
    refused_locally(&c, &token, "audience");
}

#[test]
fn expired_token_is_refused() {
    let c = cluster();
    let token = c.fake.mint(&MintSpec {
        iat_offset_s: -1000,
        lifetime_s: 600,
        ..spec()
    });
    refused_locally(&c, &token, "expired");
    // Within the leeway it still passes.
    let token = c.fake.mint(&MintSpec {
        iat_offset_s: -630,
        lifetime_s: 600,
        ..spec()
    });
    let v = verifier(&c.fake, c.dir.path(), Mode::Oidc);
    verify(&v, &token).expect("30 s past exp is within the 60 s leeway");
}

#[test]
fn token_not_yet_valid_is_refused() {
    let c = cluster();
    let token = c.fake.mint(&MintSpec {
        nbf_offset_s: Some(600),
        ..spec()
    });
    refused_locally(&c, &token, "nbf");
}

#[test]
fn alg_none_is_refused() {
    let c = cluster();
    let token = c.fake.mint(&MintSpec {
        alg: "none".into(),
        ..spec()
    });
    refused_locally(&c, &token, "algorithm \"none\" refused");
}

#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    let c = cluster();
    let token = c.fake.mint(&MintSpec {
        alg: "HS256-pubkey".into(),
        ..spec()
    });
    refused_locally(&c, &token, "algorithm \"HS256\" refused");
}

#[test]
fn tampered_claims_fail_the_signature() {
    let c = cluster();
    let token = c.fake.mint(&spec());
    // Same signature, the payload of another namespace's token.
    let other = c.fake.mint(&MintSpec {
        namespace: "admin".into(),
        ..spec()
    });
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[1] = other.split('.').nth(1).expect("payload");
    let forged = parts.join(".");
    denied_for(
        verify(&verifier(&c.fake, c.dir.path(), Mode::Oidc), &forged),
        "bad signature",
        Mode::Oidc,
    );
    denied_for(
        verify(&verifier(&c.fake, c.dir.path(), Mode::Tokenreview), &forged),
        "did not authenticate",
        Mode::Tokenreview,
    );
}

#[test]
fn unknown_kid_refreshes_once_then_is_refused() {
    let c = cluster();
    let v = verifier(&c.fake, c.dir.path(), Mode::Oidc);
    verify(&v, &c.fake.mint(&spec())).expect("a good token fills the cache");
    assert_eq!(c.fake.stats().jwks, 1);

    let t0 = SystemTime::now() + Duration::from_secs(31);
    let stray = c.fake.mint(&MintSpec {
        kid: Some("no-such-kid".into()),
        ..spec()
    });
    denied_for(verify_at(&v, &stray, t0), "unknown key id", Mode::Oidc);
    assert_eq!(c.fake.stats().jwks, 2, "one refresh for the unknown kid");
    // Within 30 s of that refresh, another unknown kid asks nothing.
    let stray2 = c.fake.mint(&MintSpec {
        kid: Some("another-kid".into()),
        ..spec()
    });
    denied_for(
        verify_at(&v, &stray2, t0 + Duration::from_secs(29)),
        "unknown key id",
        Mode::Oidc,
    );
    assert_eq!(c.fake.stats().jwks, 2, "refreshes are rate limited");

    // The apiserver refuses it as well.
    let r = verify(&verifier(&c.fake, c.dir.path(), Mode::Tokenreview), &stray);
    denied_for(r, "did not authenticate", Mode::Tokenreview);
}

#[test]
fn rotated_key_verifies_after_a_refresh_and_the_old_one_is_dropped() {
    let c = cluster();
    let v = verifier(&c.fake, c.dir.path(), Mode::Oidc);
    let old = c.fake.mint(&spec());
    verify(&v, &old).expect("before rotation");

    // A pinned JWKS taken now does not follow the rotation.
    let jwks = c.dir.path().join("jwks.json");
    std::fs::write(&jwks, c.fake.jwks()).expect("write jwks");
    let pinned = K8sVerifier::new(
        "c1",
        &ClusterConfig {
            jwks_file: Some(jwks),
            ..config(&c.fake, c.dir.path(), Mode::Oidc)
        },
    )
    .expect("pinned verifier");
    verify(&pinned, &old).expect("pinned, before rotation");

    let kid = c.fake.rotate();
    let new = c.fake.mint(&spec());
    let served = c.fake.jwks();
    assert!(served.contains(&kid), "the JWKS serves the new kid");
    let later = SystemTime::now() + Duration::from_secs(31);
    let fetched = c.fake.stats().jwks;
    let id = verify_at(&v, &new, later).expect("the new kid is found by a refresh");
    assert_eq!(id.namespace, "payments");
    assert_eq!(c.fake.stats().jwks, fetched + 1, "one refresh");
    denied_for(verify_at(&v, &old, later), "unknown key id", Mode::Oidc);

    let before = c.fake.stats();
    denied_for(verify(&pinned, &new), "unknown key id", Mode::Oidc);
    assert_eq!(c.fake.stats(), before, "a pinned JWKS is never fetched");
    // ES256 keys were not rotated.
    verify(
        &pinned,
        &c.fake.mint(&MintSpec {
            alg: "ES256".into(),
            ..spec()
        }),
    )
    .expect("pinned ES256");
}

#[test]
fn deleted_pod_is_seen_by_tokenreview_only() {
    let c = cluster();
    let s = spec();
    let token = c.fake.mint(&s);
    let review = verifier(&c.fake, c.dir.path(), Mode::Tokenreview);
    let offline = verifier(&c.fake, c.dir.path(), Mode::Oidc);
    verify(&review, &token).expect("pod alive");
    verify(&offline, &token).expect("pod alive");

    c.fake.delete_pod(s.pod_uid.as_deref().expect("uid"));
    let reason = denied(verify(&review, &token));
    assert!(reason.contains("deleted"), "{reason}");
    // Offline mode cannot see it: the token stays good until exp. This is
    // the documented limit of the mode (docs/broker-k8s.md).
    verify(&offline, &token).expect("oidc mode does not know of the deletion");
}

#[test]
fn legacy_token_is_refused_though_the_apiserver_accepts_it() {
    let c = cluster();
    let token = c.fake.mint(&MintSpec {
        legacy: true,
        ..spec()
    });
    refused_locally(&c, &token, "legacy");

    // The apiserver (like a real one) authenticates legacy tokens for any
    // audience: the local refusal is what keeps them out.
    let answer: serde_json::Value = reqwest::blocking::Client::new()
        .post(format!(
            "{}/apis/authentication.k8s.io/v1/tokenreviews",
            c.fake.url()
        ))
        .bearer_auth(c.fake.reviewer_token())
        .json(&serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": [AUD]},
        }))
        .send()
        .and_then(|r| r.json())
        .expect("TokenReview");
    assert_eq!(answer["status"]["authenticated"], true, "{answer}");
}

#[test]
fn lifetime_above_the_maximum_is_refused() {
    let c = cluster();
    let token = c.fake.mint(&MintSpec {
        lifetime_s: 3601,
        ..spec()
    });
    refused_locally(&c, &token, "lifetime 3601 s above the maximum 3600 s");
    let token = c.fake.mint(&MintSpec {
        lifetime_s: 3600,
        ..spec()
    });
    verify(&verifier(&c.fake, c.dir.path(), Mode::Oidc), &token).expect("exactly the maximum");
}

#[test]
fn warnafter_token_is_refused() {
    let c = cluster();
    let token = c.fake.mint(&MintSpec {
        warnafter: true,
        ..spec()
    });
    refused_locally(&c, &token, "warnafter");
}

#[test]
fn token_of_another_cluster_is_refused() {
    let c = cluster();
    let other_dir = tempdir();
    let other = K8sFake::start(other_dir.path());
    let token = other.mint(&spec());
    refused_locally(&c, &token, "issuer");
}

#[test]
fn malformed_tokens_are_refused() {
    let c = cluster();
    let good = c.fake.mint(&spec());
    let parts: Vec<&str> = good.split('.').collect();
    let huge = format!("{}.{}.{}", parts[0], "A".repeat(20 * 1024), parts[2]);
    let cases = [
        (format!("{}.{}", parts[0], parts[1]), "three"),
        (format!("{good}.{}", parts[2]), "three"),
        (
            format!("{}.{}!.{}", parts[0], parts[1], parts[2]),
            "base64url",
        ),
        (
            format!("{}.{}.{}", parts[0], "e30", parts[2]),
            "without exp",
        ),
        (format!("{}.{}.", parts[0], parts[1]), "no signature"),
        (String::new(), "three"),
        (huge, "bytes"),
    ];
    for (token, want) in cases {
        refused_locally(&c, &token, want);
    }
}

#[test]
fn apiserver_down_is_unavailable_not_denied() {
    let mut c = cluster();
    let token = c.fake.mint(&spec());
    let review = verifier(&c.fake, c.dir.path(), Mode::Tokenreview);
    let cached = verifier(&c.fake, c.dir.path(), Mode::Oidc);
    verify(&cached, &token).expect("keys cached");
    let cold = verifier(&c.fake, c.dir.path(), Mode::Oidc);

    c.fake.stop();
    let reason = unavailable(verify(&review, &token));
    assert!(reason.contains("cannot connect"), "{reason}");
    unavailable(verify(&cold, &token));
    // Offline mode with its keys cached goes on without the apiserver.
    verify(&cached, &token).expect("cached JWKS");
}

#[test]
fn wrong_reviewer_token_is_unavailable_not_denied() {
    let c = cluster();
    let token = c.fake.mint(&spec());
    let mut cfg = config(&c.fake, c.dir.path(), Mode::Tokenreview);
    cfg.token = Some(token_file(c.dir.path(), "not-the-reviewer-token"));
    let v = K8sVerifier::new("c1", &cfg).expect("verifier");
    let reason = unavailable(verify(&v, &token));
    assert!(reason.contains("401"), "{reason}");
    assert!(!reason.contains("not-the-reviewer-token"), "{reason}");
}

#[test]
fn reasons_never_hold_the_token() {
    let c = cluster();
    let token = c.fake.mint(&MintSpec {
        audiences: Some(vec!["other".into()]),
        ..spec()
    });
    let deleted = c.fake.mint(&spec());
    c.fake.delete_pod(spec().pod_uid.as_deref().expect("uid"));
    for mode in MODES {
        let v = verifier(&c.fake, c.dir.path(), mode);
        for t in [&token, &deleted] {
            let r = verify(&v, t);
            let shown = format!(
                "{r:?} {}",
                r.as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            let sig = t.rsplit('.').next().expect("signature");
            assert!(!shown.contains(sig), "{mode:?}: {shown}");
            assert!(
                !shown.contains(c.fake.reviewer_token()),
                "{mode:?}: {shown}"
            );
        }
    }
}
