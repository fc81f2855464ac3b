//! `p11shim-broker` for the tests: in this process on a thread of its own
//! (with an injectable clock), or as the real binary in a child process.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p11shim_broker::clock::OffsetClock;
use p11shim_broker::config::Config;
use p11shim_broker::run::Running;

/// Writes a secret file with mode 0600 and returns its path.
pub fn write_secret(dir: &Path, name: &str, value: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, value).expect("write secret");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p
}

/// This machine's fingerprint over the default attributes.
pub fn fingerprint_here() -> String {
    let names: Vec<String> = p11shim_proto::fingerprint::KNOWN
        .iter()
        .map(|s| s.to_string())
        .collect();
    p11shim_proto::fingerprint::fingerprint(
        &p11shim_proto::fingerprint::collect(&names).expect("attributes"),
    )
}

/// A broker configuration: plain HTTP on loopback, SQLite in `dir`,
/// `roles` appended as written.
pub fn broker_toml(dir: &Path, roles: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"2s\"\nrequest_timeout = \"10s\"\n\n[store]\nkind = \"sqlite\"\npath = \"{}\"\n\n{roles}\n",
        dir.join("replay.db").display()
    )
}

/// A `static-fingerprint` role `name` for this machine, its PIN read from
/// `pin_file`; `extra` is appended to the role table.
pub fn fingerprint_role(name: &str, pin_file: &Path, extra: &str) -> String {
    format!(
        "[roles.{name}]\nmethods = [\"static-fingerprint\"]\npin = \"file:{}\"\nfingerprints = [\"{}\"]\n{extra}\n",
        pin_file.display(),
        fingerprint_here()
    )
}

/// The module's `[broker]` section.
pub fn module_broker(url: &str, role: &str, method: &str, extra: &str) -> String {
    format!("[broker]\nurl = \"{url}\"\nrole = \"{role}\"\nmethod = \"{method}\"\n{extra}\n")
}

/// A broker serving in this process.
#[derive(Debug)]
pub struct TestBroker {
    running: Option<Running>,
    pub clock: Arc<OffsetClock>,
    pub toml: String,
}

impl TestBroker {
    /// Starts a broker from configuration text; `listen` may name a port.
    pub fn start(toml: &str) -> TestBroker {
        let cfg = Config::parse(toml).unwrap_or_else(|e| panic!("broker config: {e}\n{toml}"));
        let clock = Arc::new(OffsetClock::default());
        let running = p11shim_broker::run::spawn(cfg, clock.clone()).expect("start the broker");
        TestBroker {
            running: Some(running),
            clock,
            toml: toml.to_owned(),
        }
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("broker running")
    }

    pub fn url(&self) -> String {
        self.running().url()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.running().addr
    }

    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        http()
            .get(format!("{}/metrics", self.url()))
            .send()
            .expect("metrics")
            .text()
            .expect("text")
    }

    /// The value of one counter line of `/metrics` (0 when absent).
    pub fn counter(&self, prefix: &str) -> u64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    /// Posts raw bytes to `/v1/credentials`; returns the status and body.
    pub fn post(&self, content_type: &str, body: impl Into<Vec<u8>>) -> (u16, serde_json::Value) {
        let r = http()
            .post(format!("{}{}", self.url(), p11shim_proto::CREDENTIALS_PATH))
            .header("content-type", content_type)
            .body(body.into())
            .send()
            .expect("post");
        let status = r.status().as_u16();
        let text = r.text().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A blocking HTTP client for the tests.
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// The `p11shim-broker` binary next to the test executable.
pub fn broker_bin() -> PathBuf {
    let p = crate::target_dir().join("p11shim-broker");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p p11shim-broker` (make test does)",
        p.display()
    );
    p
}

/// The broker binary serving `config` in a child process.
#[derive(Debug)]
pub struct BrokerProcess {
    child: Child,
    pub addr: std::net::SocketAddr,
}

impl BrokerProcess {
    pub fn start(config: &Path, log: &Path) -> BrokerProcess {
        let mut child = Command::new(broker_bin())
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("log"))
            .spawn()
            .expect("spawn p11shim-broker");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("listening ") {
                    let _ = tx.send(a.to_owned());
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(a) => break a.parse().expect("address"),
                Err(_) if Instant::now() < deadline => {
                    if let Ok(Some(st)) = child.try_wait() {
                        panic!(
                            "p11shim-broker exited with {st}: {}",
                            std::fs::read_to_string(log).unwrap_or_default()
                        );
                    }
                }
                Err(_) => panic!(
                    "p11shim-broker did not start: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                ),
            }
        };
        BrokerProcess { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `static-fingerprint` credentials exchange made as the module makes
/// it (a sealed answer to a fresh key): the credentials, opened. The
/// exchange must be granted.
pub fn sealed_exchange(
    url: &str,
    role: &str,
    request_id: &str,
    attributes: std::collections::BTreeMap<String, String>,
    nonce: [u8; 32],
) -> p11shim_proto::Credentials {
    use base64::Engine as _;
    use p11shim_proto::{FingerprintEvidence, Method, Request, Response, Secret, b64_url};
    let key = p11shim_proto::seal::KeyPair::generate();
    let req = Request {
        v: 1,
        request_id: request_id.into(),
        role: role.into(),
        method: Some(Method::StaticFingerprint),
        fingerprint: Some(FingerprintEvidence { attributes }),
        client_nonce: Some(Secret::new(b64_url().encode(nonce))),
        response_key: Some(key.response_key()),
        ..Default::default()
    };
    let r = http()
        .post(format!("{url}{}", p11shim_proto::CREDENTIALS_PATH))
        .json(&req)
        .send()
        .expect("credentials");
    assert_eq!(r.status().as_u16(), 200);
    let resp: Response = r.json().expect("response");
    let aad = p11shim_proto::seal::aad(
        &resp.request_id,
        &resp.role,
        &resp.subject,
        &resp.expires_at,
    );
    let plain = key
        .open(resp.sealed_credentials.as_ref().expect("sealed"), &aad)
        .expect("open the sealed credentials");
    serde_json::from_slice(&plain).expect("credentials")
}
