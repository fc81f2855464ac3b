//! `k8s-sa-token` end to end: the Kubernetes fake plays the cluster, the
//! broker (in this process, SQLite store) has a `[k8s.test]` cluster in
//! TokenReview or OIDC mode, and p11shim, configured with the pod's token
//! file, gets the PIN for real clients that name none. Then the broker's
//! refusals, each asserted by the coarse kind a client sees; the
//! per-identity rate limit reached before any cluster call; and the
//! kubelet's token rotation while a client keeps signing.
//!
//! Needs `cargo build -p p11shim-peers` (the `k8s-fake` binary).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use p11shim_proto::seal::KeyPair;
use p11shim_proto::{K8sEvidence, Method, Request, Secret, b64_url};
use p11shim_tests::peers::broker::{TestBroker, broker_toml, module_broker, write_secret};
use p11shim_tests::peers::k8s::{K8sFake, MintSpec};
use p11shim_tests::{TestEnv, USER_PIN, p11shim_lib, require, run_ok, softhsm_lib};

mod common;
use common::{
    java_signs_without_pin, openssl, openssl_cnf, openssl_verify, pkcs11_tool_sign_without_pin,
    text,
};

const TOKEN: &str = "pod";
const ROLE: &str = "pod-signer";
const CLUSTER: &str = "test";
const AUD: &str = "hsm-broker";
const NS: &str = "payments";
const SA: &str = "signer";
const UID_A: &str = "6f1c2a4e-0d7b-4c55-9a21-3e8f5b7d9c10";
const UID_B: &str = "0b8e6a31-5c2d-4f7e-8a90-1d3c5e7f9b24";
const UID_C: &str = "9d2f4b6a-8c1e-4a3d-b5f7-2e4c6a8d0f13";
const UID_D: &str = "3a5c7e9b-1d3f-4b5a-9c7e-5f1a3c5e7a92";

const GRANTED: &str = "p11shim_broker_decisions_total{method=\"k8s-sa-token\",outcome=\"granted\"}";
const REAUTH: &str =
    "p11shim_broker_decisions_total{method=\"k8s-sa-token\",outcome=\"reauthenticated\"}";
const DENIED: &str = "p11shim_broker_decisions_total{method=\"k8s-sa-token\",outcome=\"denied\"}";
const ALREADY_USED: &str =
    "p11shim_broker_decisions_total{method=\"k8s-sa-token\",outcome=\"already_used\"}";

/// A token of `payments/signer` for the broker, bound to pod `uid`.
fn pod_token(uid: &str) -> MintSpec {
    MintSpec {
        namespace: NS.into(),
        service_account: SA.into(),
        pod_name: Some(format!("signer-{}", &uid[..8])),
        pod_uid: Some(uid.into()),
        node: Some("worker-1".into()),
        audiences: Some(vec![AUD.into()]),
        ..MintSpec::default()
    }
}

/// A broker with cluster `test` over `fake` in `mode` and the role
/// `pod-signer` for `payments/signer` (plus `role_extra`); `head` is put
/// before the tables (e.g. `[limits]`).
fn start_broker(
    dir: &Path,
    fake: &K8sFake,
    mode: &str,
    head: &str,
    cluster_extra: &str,
    role_extra: &str,
) -> (TestBroker, PathBuf) {
    let pin_file = write_secret(dir, "role.pin", USER_PIN);
    let toml = broker_toml(
        dir,
        &format!(
            "{head}\n[k8s.{CLUSTER}]\n{}\n[roles.{ROLE}]\nmethods = [\"k8s-sa-token\"]\npin = \"file:{}\"\nservice_accounts = [\"{NS}/{SA}\"]\n{role_extra}\n",
            fake.broker_cluster(dir, mode, AUD, cluster_extra),
            pin_file.display()
        ),
    );
    (TestBroker::start(&toml), pin_file)
}

// --- through the module --------------------------------------------------

/// A SoftHSM2 token with an RSA key (id 01, label `rsa`), the fake, the
/// broker, the pod's token file and p11shim configured for
/// `k8s-sa-token` with a nonce file.
struct Pod {
    env: TestEnv,
    fake: K8sFake,
    broker: TestBroker,
    pubkey: PathBuf,
    token_file: PathBuf,
}

fn pod(mode: &str, cluster_extra: &str, role_extra: &str, module_extra: &str) -> Pod {
    let env = TestEnv::new();
    let pubkey = env.token_with_signing_key(TOKEN);
    let fake = K8sFake::start(env.path());
    let (broker, _) = start_broker(env.path(), &fake, mode, "", cluster_extra, role_extra);
    // What the kubelet writes into the projected volume.
    let token_file = write_secret(env.path(), "sa-token", &fake.mint(&pod_token(UID_A)));
    env.write_config(&format!(
        "[log]\nlevel = \"debug\"\nfile = \"{}\"\n\n[[slot]]\nid = 0\nlabel = \"{TOKEN}\"\npin = \"broker\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN}\"\n\n{}",
        env.path().join("p11shim.log").display(),
        softhsm_lib().display(),
        module_broker(
            &broker.url(),
            ROLE,
            "k8s-sa-token",
            &format!(
                "token_file = \"{}\"\nnonce_file = \"{}\"\nwait_ms = 15000\n{module_extra}",
                token_file.display(),
                env.path().join("nonce").display()
            )
        )
    ));
    Pod {
        env,
        fake,
        broker,
        pubkey,
        token_file,
    }
}

/// pkcs11-tool signs with the token key, logging in with no PIN.
fn pkcs11_tool_sign(env: &TestEnv, n: u32) -> PathBuf {
    let (msg, _, out) = pkcs11_tool_sign_without_pin(env, n);
    assert!(
        out.status.success(),
        "pkcs11-tool #{n}: {}\n{}",
        text(&out),
        env.log()
    );
    msg
}

fn module_signs_with_the_pods_token(mode: &str, module_extra: &str) {
    if !require("pkcs11-tool") || !require("openssl") {
        return;
    }
    let p = pod(mode, "", "", module_extra);
    // First use: the pod's identity is trusted on first use.
    let msg = pkcs11_tool_sign(&p.env, 1);
    openssl_verify(&p.env, &p.pubkey, &msg, &p.env.path().join("msg1.sig"));
    // A second process of the pod re-authenticates with the shared nonce.
    let msg = pkcs11_tool_sign(&p.env, 2);
    openssl_verify(&p.env, &p.pubkey, &msg, &p.env.path().join("msg2.sig"));
    // OpenSSL's pkcs11 engine, a key URI without pin-value.
    let cnf = openssl_cnf(&p.env);
    let sig = p.env.path().join("engine.sig");
    run_ok(
        openssl(&p.env, &cnf)
            .args([
                "dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine", "-sign",
            ])
            .arg(format!("pkcs11:token={TOKEN};object=rsa;type=private"))
            .arg("-out")
            .arg(&sig)
            .arg(&msg),
    );
    openssl_verify(&p.env, &p.pubkey, &msg, &sig);
    // Java SunPKCS11 with an empty keystore password (once, in one mode).
    if mode == "tokenreview" && require("java") && require("javac") {
        java_signs_without_pin(&p.env, 10);
    }

    let (granted, reauth) = (p.broker.counter(GRANTED), p.broker.counter(REAUTH));
    assert_eq!(granted, 1);
    assert!(reauth >= 2, "{reauth} re-authentications for 3 processes");
    assert_eq!(p.broker.counter(DENIED) + p.broker.counter(ALREADY_USED), 0);
    let stats = p.fake.stats();
    if mode == "tokenreview" {
        assert_eq!(
            stats.tokenreview,
            granted + reauth,
            "one review per request"
        );
    } else {
        assert_eq!(stats.tokenreview, 0);
        assert_eq!(stats.jwks, 1, "the key set is fetched once and cached");
    }
    let log = p.env.log();
    let subject = format!("k8s:{CLUSTER}:{NS}:{SA}:{UID_A}");
    assert!(log.contains(&subject), "the subject {subject}: {log}");
    let token = std::fs::read_to_string(&p.token_file).unwrap();
    let signature = token.trim().rsplit('.').next().unwrap();
    assert!(!log.contains(signature), "the token reached the module log");
}

#[test]
fn pkcs11_tool_and_openssl_sign_with_a_service_account_token_tokenreview() {
    module_signs_with_the_pods_token("tokenreview", "");
}

#[test]
fn pkcs11_tool_and_openssl_sign_with_a_service_account_token_oidc() {
    // The module may name the cluster; it must be the role's.
    module_signs_with_the_pods_token("oidc", &format!("cluster = \"{CLUSTER}\"\n"));
}

/// The kubelet rewrites the token file with a new token of the same pod
/// while a client signs; the credentials last 5 s, so the module
/// re-authenticates every 4 s, each time with the file's current token.
/// The first token expires after 6 s (leeway 1 s): a module that kept
/// sending it would be refused.
#[test]
fn kubelet_token_rotation_while_signing() {
    let p = pod("tokenreview", "leeway = \"1s\"\n", "ttl = \"5s\"\n", "");
    write_secret(
        p.env.path(),
        "sa-token",
        &p.fake.mint(&MintSpec {
            lifetime_s: 6,
            ..pod_token(UID_A)
        }),
    );
    p.env.apply();
    let p11 = Pkcs11::new(p11shim_lib()).expect("load p11shim");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = p11.get_slots_with_token().expect("slots")[0];
    let session = p11.open_rw_session(slot).expect("open");
    session
        .login(UserType::User, None)
        .unwrap_or_else(|e| panic!("C_Login with no PIN: {e:?}\n{}", p.env.log()));
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(vec![1]),
        ])
        .expect("find")[0];
    let started = Instant::now();
    let mut next_rotation = started + Duration::from_secs(2);
    let mut rotations = 0u32;
    let mut signed = 0u32;
    while started.elapsed() < Duration::from_secs(14) && signed < 100_000 {
        if Instant::now() >= next_rotation {
            // Written to a new file and renamed, as the kubelet's atomic
            // writer does.
            let fresh = p.fake.mint(&pod_token(UID_A));
            let tmp = write_secret(p.env.path(), "sa-token.new", &fresh);
            std::fs::rename(&tmp, &p.token_file).expect("rename");
            rotations += 1;
            next_rotation += Duration::from_secs(2);
        }
        let sig = session
            .sign(&Mechanism::Sha256RsaPkcs, key, b"payload")
            .unwrap_or_else(|e| panic!("C_Sign: {e:?}\n{}", p.env.log()));
        assert_eq!(sig.len(), 256);
        signed += 1;
    }
    assert!(rotations >= 5, "{rotations} rotations");
    let reauth = p.broker.counter(REAUTH);
    assert!(
        reauth >= 2,
        "{reauth} re-authentications in 14 s with a 5 s lifetime\n{}",
        p.env.log()
    );
    assert_eq!(p.broker.counter(GRANTED), 1);
    assert_eq!(
        p.broker.counter(DENIED) + p.broker.counter(ALREADY_USED),
        0,
        "a refused re-authentication: the module sent a stale token?\n{}",
        p.env.log()
    );
    // Every decision asked the apiserver.
    assert_eq!(p.fake.stats().tokenreview, 1 + reauth);
    // A fresh login after the first token expired uses the current grant.
    session.logout().expect("C_Logout");
    session.login(UserType::User, None).expect("C_Login again");
    drop(session);
    p11.finalize().expect("C_Finalize");
}

// --- at the broker -------------------------------------------------------

/// Requests built here, sealed to a key of ours.
struct Client {
    key: KeyPair,
    n: u32,
}

impl Client {
    fn new() -> Client {
        Client {
            key: KeyPair::generate(),
            n: 0,
        }
    }

    fn request(&mut self, token: &str, cluster: Option<&str>, nonce: u8) -> Request {
        self.n += 1;
        Request {
            v: p11shim_proto::VERSION,
            request_id: format!("k8s-{}", self.n),
            role: ROLE.into(),
            method: Some(Method::K8sSaToken),
            k8s: Some(K8sEvidence {
                cluster: cluster.map(str::to_owned),
                token: Secret::new(token),
            }),
            client_nonce: Some(Secret::new(b64_url().encode([nonce; 32]))),
            response_key: Some(self.key.response_key()),
            ..Default::default()
        }
    }

    /// Sends `r`; returns the HTTP status and the coarse kind (`granted`
    /// with the subject and the opened PIN checked, or the problem title).
    fn send(&self, b: &TestBroker, r: &Request) -> (u16, String) {
        let (status, body) = b.post("application/json", serde_json::to_vec(r).unwrap());
        if status != 200 {
            let title = body["title"].as_str().unwrap_or("?").to_owned();
            return (status, title);
        }
        let resp: p11shim_proto::Response =
            serde_json::from_value(body.clone()).expect("a response");
        let aad = p11shim_proto::seal::aad(
            &resp.request_id,
            &resp.role,
            &resp.subject,
            &resp.expires_at,
        );
        let plain = self
            .key
            .open(resp.sealed_credentials.as_ref().expect("sealed"), &aad)
            .expect("our key opens the answer");
        let creds: p11shim_proto::Credentials = serde_json::from_slice(&plain).unwrap();
        assert_eq!(creds.pin.expose(), USER_PIN);
        (status, resp.subject)
    }

    #[track_caller]
    fn expect(
        &mut self,
        b: &TestBroker,
        token: &str,
        nonce: u8,
        want: (u16, impl AsRef<str>),
        case: &str,
    ) {
        self.expect_in(b, token, None, nonce, want, case);
    }

    #[track_caller]
    fn expect_in(
        &mut self,
        b: &TestBroker,
        token: &str,
        cluster: Option<&str>,
        nonce: u8,
        want: (u16, impl AsRef<str>),
        case: &str,
    ) {
        let r = self.request(token, cluster, nonce);
        let got = self.send(b, &r);
        assert_eq!((got.0, got.1.as_str()), (want.0, want.1.as_ref()), "{case}");
    }
}

const DENY: (u16, &str) = (403, "denied");
const USED: (u16, &str) = (409, "already_used");
const LIMITS: &str = "[limits]\nper_ip = { per_minute = 6000, burst = 1000 }\nper_identity = { per_minute = 6000, burst = 1000 }\n";

fn subject(uid: &str) -> String {
    format!("k8s:{CLUSTER}:{NS}:{SA}:{uid}")
}

fn refusals_at_the_broker(mode: &str) {
    let dir = tempfile::Builder::new()
        .prefix("p11shim-k8s-")
        .tempdir()
        .unwrap();
    let mut fake = K8sFake::start(dir.path());
    let (b, _) = start_broker(dir.path(), &fake, mode, LIMITS, "", "");
    let mut c = Client::new();
    let f = &fake;
    let mint = |s: MintSpec| f.mint(&s);

    // Refused by the token checks or the cluster.
    let bad = [
        (
            "wrong audience",
            mint(MintSpec {
                audiences: Some(vec!["other-service".into()]),
                ..pod_token(UID_A)
            }),
        ),
        (
            "the apiserver's own audience",
            mint(MintSpec {
                audiences: None,
                ..pod_token(UID_A)
            }),
        ),
        (
            "expired",
            mint(MintSpec {
                iat_offset_s: -1000,
                lifetime_s: 600,
                ..pod_token(UID_A)
            }),
        ),
        (
            "alg none",
            mint(MintSpec {
                alg: "none".into(),
                ..pod_token(UID_A)
            }),
        ),
        (
            "HS256 keyed with the public key",
            mint(MintSpec {
                alg: "HS256-pubkey".into(),
                ..pod_token(UID_A)
            }),
        ),
        (
            "unknown kid",
            mint(MintSpec {
                kid: Some("no-such-key".into()),
                ..pod_token(UID_A)
            }),
        ),
        (
            "service account not allowed",
            mint(MintSpec {
                service_account: "other".into(),
                ..pod_token(UID_A)
            }),
        ),
        (
            "namespace not allowed",
            mint(MintSpec {
                namespace: "other".into(),
                ..pod_token(UID_A)
            }),
        ),
        ("not a token", "not.a.token".to_owned()),
    ];
    for (case, token) in &bad {
        c.expect(&b, token, 1, DENY, case);
    }
    let good_a = mint(pod_token(UID_A));
    c.expect_in(&b, &good_a, Some("elsewhere"), 1, DENY, "cluster mismatch");
    // No evidence at all.
    let mut r = c.request(&good_a, None, 1);
    r.k8s = None;
    assert_eq!(c.send(&b, &r), (400, "bad_request".into()));
    assert_eq!(b.counter(DENIED), bad.len() as u64 + 1);
    assert_eq!(b.counter(GRANTED), 0, "nothing was granted so far");

    // Pod A: first use, naming the cluster or not.
    c.expect_in(
        &b,
        &good_a,
        Some(CLUSTER),
        1,
        (200, subject(UID_A)),
        "pod A first use",
    );
    // Its token replayed by another party (another nonce): refused.
    c.expect(&b, &good_a, 2, USED, "pod A's token, another nonce");
    // Another token of pod A (as if stolen later): still pod A, refused.
    let good_a2 = mint(pod_token(UID_A));
    c.expect(&b, &good_a2, 2, USED, "a new token of pod A, another nonce");
    // Pod A itself re-authenticates with its nonce and its rotated token.
    c.expect(
        &b,
        &good_a2,
        1,
        (200, subject(UID_A)),
        "pod A re-authenticates",
    );
    // Pod B is another identity.
    let good_b = mint(pod_token(UID_B));
    c.expect(&b, &good_b, 2, (200, subject(UID_B)), "pod B first use");
    assert_eq!(b.counter(ALREADY_USED), 2);
    assert_eq!(b.counter(REAUTH), 1);

    // A token bound to no pod: one identity per token.
    let bare = MintSpec {
        pod_name: None,
        pod_uid: None,
        node: None,
        jti: Some("jti-1".into()),
        ..pod_token(UID_A)
    };
    let t1 = mint(bare.clone());
    c.expect(
        &b,
        &t1,
        3,
        (200, format!("k8s:{CLUSTER}:{NS}:{SA}:-")),
        "no pod",
    );
    c.expect(&b, &t1, 4, USED, "no pod, the token replayed");
    let t2 = mint(MintSpec {
        jti: Some("jti-2".into()),
        ..bare
    });
    c.expect(
        &b,
        &t2,
        4,
        (200, format!("k8s:{CLUSTER}:{NS}:{SA}:-")),
        "no pod, another token",
    );

    // A deleted pod: the apiserver refuses its token; the offline mode
    // cannot know before exp (docs/broker-k8s.md).
    let good_c = mint(pod_token(UID_C));
    fake.delete_pod(UID_C);
    if mode == "tokenreview" {
        c.expect(&b, &good_c, 5, DENY, "deleted pod");
    } else {
        c.expect(
            &b,
            &good_c,
            5,
            (200, subject(UID_C)),
            "deleted pod, offline",
        );
    }

    // The cluster goes down.
    let good_d = mint(pod_token(UID_D));
    fake.stop();
    if mode == "tokenreview" {
        c.expect(&b, &good_d, 6, (503, "unavailable"), "cluster down");
    } else {
        // The cached key set keeps verifying.
        c.expect(
            &b,
            &good_d,
            6,
            (200, subject(UID_D)),
            "cluster down, cached keys",
        );
    }
}

#[test]
fn refusals_at_the_broker_tokenreview() {
    refusals_at_the_broker("tokenreview");
}

#[test]
fn refusals_at_the_broker_oidc() {
    refusals_at_the_broker("oidc");
}

/// OIDC mode, the issuer down before its keys were ever fetched: the
/// broker cannot verify, which is `unavailable`, not `denied`.
#[test]
fn oidc_issuer_down_before_the_first_fetch_is_unavailable() {
    let dir = tempfile::Builder::new()
        .prefix("p11shim-k8s-")
        .tempdir()
        .unwrap();
    let mut fake = K8sFake::start(dir.path());
    let (b, _) = start_broker(dir.path(), &fake, "oidc", LIMITS, "", "");
    let token = fake.mint(&pod_token(UID_A));
    fake.stop();
    Client::new().expect(&b, &token, 1, (503, "unavailable"), "issuer down");
}

/// The per-identity limit is taken from the token's unverified claims,
/// before the apiserver is asked: the request over the limit costs the
/// cluster nothing, and another pod is not affected.
#[test]
fn the_identity_rate_limit_comes_before_any_cluster_call() {
    let dir = tempfile::Builder::new()
        .prefix("p11shim-k8s-")
        .tempdir()
        .unwrap();
    let fake = K8sFake::start(dir.path());
    let limits = "[limits]\nper_ip = { per_minute = 6000, burst = 1000 }\nper_identity = { per_minute = 1, burst = 2 }\n";
    let (b, _) = start_broker(dir.path(), &fake, "tokenreview", limits, "", "");
    let mut c = Client::new();
    let a = fake.mint(&pod_token(UID_A));
    c.expect(&b, &a, 1, (200, subject(UID_A)), "first");
    c.expect(&b, &a, 1, (200, subject(UID_A)), "second");
    let reviews = fake.stats().tokenreview;
    assert_eq!(reviews, 2);
    // A forged token claiming pod A is limited as pod A, unread upstream.
    let forged = {
        let mut parts: Vec<String> = a.split('.').map(str::to_owned).collect();
        parts[2] = b64_url().encode([0u8; 256]);
        parts.join(".")
    };
    c.expect(
        &b,
        &forged,
        1,
        (429, "rate_limited"),
        "forged, over the limit",
    );
    c.expect(&b, &a, 1, (429, "rate_limited"), "over the limit");
    assert_eq!(fake.stats().tokenreview, reviews, "the cluster was asked");
    let other = fake.mint(&pod_token(UID_B));
    c.expect(&b, &other, 2, (200, subject(UID_B)), "another pod");
}
