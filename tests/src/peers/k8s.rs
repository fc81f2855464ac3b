//! The Kubernetes fake (`tests/peers`, binary `k8s-fake`): OIDC discovery,
//! JWKS and TokenReview on a free loopback port, plus its control endpoints
//! to mint tokens, delete pods and rotate the signing key.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::target_dir;

/// How long the fake may take to say it listens.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// What `/_mint` puts in a token; `Default` is a valid projected token of
/// `default/default` for the fake's own issuer as audience.
#[derive(Clone, Debug)]
pub struct MintSpec {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    /// The fake makes one up when a pod name is given without it.
    pub pod_uid: Option<String>,
    pub node: Option<String>,
    /// `None`: the issuer (the apiserver's default audience).
    pub audiences: Option<Vec<String>>,
    pub lifetime_s: i64,
    pub iat_offset_s: i64,
    /// `None`: equal to `iat_offset_s`.
    pub nbf_offset_s: Option<i64>,
    /// `RS256`, `ES256`, `none` or `HS256-pubkey` (HMAC keyed with the RSA
    /// public key PEM).
    pub alg: String,
    pub kid: Option<String>,
    pub legacy: bool,
    pub warnafter: bool,
    pub jti: Option<String>,
}

impl Default for MintSpec {
    fn default() -> Self {
        MintSpec {
            namespace: "default".into(),
            service_account: "default".into(),
            pod_name: None,
            pod_uid: None,
            node: None,
            audiences: None,
            lifetime_s: 600,
            iat_offset_s: 0,
            nbf_offset_s: None,
            alg: "RS256".into(),
            kid: None,
            legacy: false,
            warnafter: false,
            jti: None,
        }
    }
}

/// Request counts of the fake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct K8sStats {
    pub discovery: u64,
    pub jwks: u64,
    pub tokenreview: u64,
}

/// A running fake; killed when dropped.
#[derive(Debug)]
pub struct K8sFake {
    child: Option<Child>,
    url: String,
    reviewer_token: String,
    http: reqwest::blocking::Client,
}

/// The `k8s-fake` binary next to the test binary.
pub fn k8s_fake_bin() -> PathBuf {
    let p = target_dir().join("k8s-fake");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p p11shim-peers` (make test does)",
        p.display()
    );
    p
}

impl K8sFake {
    /// Starts the fake; its stderr goes to `dir/k8s-fake.log`.
    pub fn start(dir: &Path) -> K8sFake {
        let reviewer_token = format!("reviewer-{}", std::process::id());
        let log = std::fs::File::create(dir.join("k8s-fake.log")).expect("k8s-fake log");
        let mut child = Command::new(k8s_fake_bin())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--reviewer-token",
                &reviewer_token,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start k8s-fake");
        let stdout = child.stdout.take().expect("k8s-fake stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        // Built before the wait, so that a panic below kills the child.
        let mut fake = K8sFake {
            child: Some(child),
            url: String::new(),
            reviewer_token,
            http: reqwest::blocking::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
        };
        let line = match rx.recv_timeout(READY_DEADLINE) {
            Ok(l) => l,
            Err(_) => panic!("k8s-fake did not say it listens within {READY_DEADLINE:?}"),
        };
        let addr = line.trim().strip_prefix("listening ").unwrap_or_else(|| {
            panic!(
                "k8s-fake said {line:?}, see {}",
                dir.join("k8s-fake.log").display()
            )
        });
        fake.url = format!("http://{addr}");
        fake
    }

    /// The fake's base URL, which is also its issuer.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bearer token its TokenReview endpoint wants.
    pub fn reviewer_token(&self) -> &str {
        &self.reviewer_token
    }

    fn post(&self, path: &str, body: &Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .unwrap_or_else(|e| panic!("k8s-fake {path}: {e}"));
        let status = r.status();
        let text = r.text().unwrap_or_default();
        assert!(status.is_success(), "k8s-fake {path}: {status} {text}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("k8s-fake answers JSON")
        }
    }

    /// Mints a token.
    pub fn mint(&self, spec: &MintSpec) -> String {
        let mut body = json!({
            "namespace": spec.namespace,
            "service_account": spec.service_account,
            "lifetime_s": spec.lifetime_s,
            "iat_offset_s": spec.iat_offset_s,
            "alg": spec.alg,
            "legacy": spec.legacy,
            "warnafter": spec.warnafter,
        });
        let optional = [
            ("pod_name", spec.pod_name.as_ref().map(|v| json!(v))),
            ("pod_uid", spec.pod_uid.as_ref().map(|v| json!(v))),
            ("node", spec.node.as_ref().map(|v| json!(v))),
            ("audiences", spec.audiences.as_ref().map(|v| json!(v))),
            ("nbf_offset_s", spec.nbf_offset_s.map(|v| json!(v))),
            ("kid", spec.kid.as_ref().map(|v| json!(v))),
            ("jti", spec.jti.as_ref().map(|v| json!(v))),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                body[k] = v;
            }
        }
        self.post("/_mint", &body)["token"]
            .as_str()
            .expect("minted token")
            .to_owned()
    }

    /// The body of a broker's `[k8s.<name>]` table for this fake:
    /// `mode` is `tokenreview` (the reviewer token written to a 0600 file
    /// in `dir`) or `oidc` (discovery from the issuer); `extra` is appended.
    pub fn broker_cluster(&self, dir: &Path, mode: &str, audience: &str, extra: &str) -> String {
        let mut t = format!(
            "issuer = \"{url}\"\naudience = \"{audience}\"\nmode = \"{mode}\"\n",
            url = self.url
        );
        if mode == "tokenreview" {
            let token = crate::peers::broker::write_secret(
                dir,
                "broker-sa-token",
                &format!("{}\n", self.reviewer_token),
            );
            t.push_str(&format!(
                "api_server = \"{}\"\ntoken = \"file:{}\"\n",
                self.url,
                token.display()
            ));
        }
        t.push_str(extra);
        t
    }

    /// Marks a pod deleted: TokenReview stops authenticating its tokens.
    pub fn delete_pod(&self, uid: &str) {
        self.post(&format!("/_pods/{uid}/delete"), &json!({}));
    }

    /// Replaces the RSA signing key; returns the new kid.
    pub fn rotate(&self) -> String {
        self.post("/_rotate", &json!({}))["kid"]
            .as_str()
            .expect("new kid")
            .to_owned()
    }

    /// The current JWKS document, as served.
    pub fn jwks(&self) -> String {
        self.http
            .get(format!("{}/openid/v1/jwks", self.url))
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.text())
            .expect("k8s-fake JWKS")
    }

    pub fn stats(&self) -> K8sStats {
        let v: Value = self
            .http
            .get(format!("{}/_stats", self.url))
            .send()
            .and_then(|r| r.json())
            .expect("k8s-fake stats");
        let n = |k: &str| v[k].as_u64().expect("count");
        K8sStats {
            discovery: n("discovery"),
            jwks: n("jwks"),
            tokenreview: n("tokenreview"),
        }
    }

    /// Kills the fake now (the apiserver goes down); its port stays closed.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for K8sFake {
    fn drop(&mut self) {
        self.stop();
    }
}
