//! `p11shim-bench --broker`: what credentials by attestation cost.
//!
//! 1. **Verified requests per second.** The `p11shim-broker` binary (the
//!    release build next to this program, or `P11SHIM_BROKER_BIN`) serves
//!    plain HTTP on loopback with an SQLite store, then with a throwaway
//!    PostgreSQL cluster (`fsync=on`). One `static-fingerprint` role lists
//!    64 fingerprints per client thread; each thread makes the first use of
//!    its identities once, then re-authenticates them in turn with their
//!    nonces, so every measured request is a full decision: JSON, the
//!    fingerprint, the one-time-use gate (a committed store write), the PIN
//!    read from its 0600 file, the answer sealed with HPKE to a fresh
//!    client key. The client opens every answer and compares the PIN. The
//!    broker's own counters must then show exactly the requests sent.
//! 2. **`C_Initialize` to first signature.** A fresh process per run
//!    (`--broker-worker`): SoftHSM2 directly with the application's PIN;
//!    p11shim with the application's PIN; p11shim with `pin = "broker"`
//!    and a warm broker on loopback over HTTP and over HTTPS (a test CA
//!    made with the openssl CLI), the nonce in a file so that each process
//!    re-authenticates. The runs of the targets are interleaved.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use base64::Engine as _;
use p11shim_proto::seal::KeyPair;
use p11shim_proto::{Credentials, FingerprintEvidence, Method, Request, Response, Secret, b64_url};

use crate::broker_worker::Login;
use crate::env::{BenchEnv, Target, exe, result_field, run_checked, softhsm_lib};
use crate::p11::die;
use crate::stats::Histogram;
use crate::worker::TOKEN_LABEL;
use p11shim_servers::Postgres;

/// The role the load clients use, and the module's role.
const LOAD_ROLE: &str = "load";
const MODULE_ROLE: &str = "module";
/// The PIN the broker grants; also the token's user PIN, so the module
/// can log in with it.
const PIN: &str = crate::worker::USER_PIN;
/// Identities per client thread, re-authenticated in turn.
const PER_THREAD: usize = 64;
/// Requests one thread makes in one measurement, at most.
const MAX_REQUESTS: u64 = 1_000_000;
/// How long the broker may take to start.
const STARTUP: Duration = Duration::from_secs(30);

/// The replay store behind the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Sqlite,
    Postgres,
}

impl Store {
    pub fn parse(s: &str) -> Option<Store> {
        match s {
            "sqlite" => Some(Store::Sqlite),
            "postgres" => Some(Store::Postgres),
            _ => None,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Store::Sqlite => "SQLite",
            Store::Postgres => "PostgreSQL",
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BrokerOpts {
    pub stores: Vec<Store>,
    pub threads: Vec<usize>,
    /// Measured time per round.
    pub secs: Duration,
    pub warmup: Duration,
    pub rounds: usize,
    /// Application starts per target.
    pub runs: usize,
    pub keep: bool,
}

impl BrokerOpts {
    pub fn new(quick: bool) -> BrokerOpts {
        BrokerOpts {
            stores: vec![Store::Sqlite, Store::Postgres],
            threads: vec![1, 8],
            secs: Duration::from_millis(if quick { 1000 } else { 3000 }),
            warmup: Duration::from_millis(if quick { 200 } else { 500 }),
            rounds: if quick { 1 } else { 3 },
            runs: if quick { 30 } else { 100 },
            keep: false,
        }
    }
}

/// The `p11shim-broker` binary: `P11SHIM_BROKER_BIN`, else next to this
/// program.
fn broker_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("P11SHIM_BROKER_BIN") {
        return PathBuf::from(p);
    }
    let p = exe()
        .parent()
        .map(|d| d.join("p11shim-broker"))
        .unwrap_or_default();
    if !p.exists() {
        die(format_args!(
            "{} is missing: run `cargo build --release -p p11shim-broker` (make bench-broker does)",
            p.display()
        ));
    }
    p
}

/// Writes a file with mode 0600 (the broker refuses secrets others can read).
fn write_secret(path: &Path, value: &str) {
    std::fs::write(path, value)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)))
        .unwrap_or_else(|e| die(format_args!("cannot write {}: {e}", path.display())));
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text)
        .unwrap_or_else(|e| die(format_args!("cannot write {}: {e}", path.display())));
}

/// Synthetic machine attributes of load identity `i`.
fn identity(i: usize) -> BTreeMap<String, String> {
    [
        ("machine-id", format!("{i:032x}")),
        ("hostname", format!("bench-{i}")),
        ("addresses", format!("198.51.100.{}", i % 250 + 1)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// This machine's fingerprint over the module's default attributes.
fn machine_fingerprint() -> String {
    let names: Vec<String> = p11shim_proto::fingerprint::KNOWN
        .iter()
        .map(|s| s.to_string())
        .collect();
    let attrs = p11shim_proto::fingerprint::collect(&names)
        .unwrap_or_else(|e| die(format_args!("machine attributes: {e}")));
    p11shim_proto::fingerprint::fingerprint(&attrs)
}

/// A broker configuration: `store` and optional TLS, the load role with
/// `identities` synthetic fingerprints, the module's role with this
/// machine's. Rate limits are raised out of the way: the benchmark is one
/// source address re-authenticating the same identities many times a
/// second, which the default limits rightly refuse.
fn broker_config(
    store: &str,
    tls: Option<(&Path, &Path)>,
    pin_file: &Path,
    identities: usize,
) -> String {
    let tls = tls
        .map(|(c, k)| {
            format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                c.display(),
                k.display()
            )
        })
        .unwrap_or_default();
    let fps: Vec<String> = (0..identities)
        .map(|i| {
            format!(
                "  \"{}\",",
                p11shim_proto::fingerprint::fingerprint(&identity(i))
            )
        })
        .collect();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{tls}\n{store}\n\
         [limits]\nper_ip = {{ per_minute = 1000000000, burst = 1000000 }}\n\
         per_identity = {{ per_minute = 1000000000, burst = 1000000 }}\n\n\
         [roles.{LOAD_ROLE}]\nmethods = [\"static-fingerprint\"]\npin = \"file:{pin}\"\n\
         fingerprint_bind_address = false\nfingerprints = [\n{fps}\n]\n\n\
         [roles.{MODULE_ROLE}]\nmethods = [\"static-fingerprint\"]\npin = \"file:{pin}\"\n\
         fingerprints = [\"{machine}\"]\n",
        pin = pin_file.display(),
        fps = fps.join("\n"),
        machine = machine_fingerprint(),
    )
}

/// The broker binary serving one configuration.
struct BrokerProcess {
    child: Child,
    addr: SocketAddr,
    /// The CA its HTTPS certificate chains to; `None`: plain HTTP.
    ca: Option<PathBuf>,
    log: PathBuf,
}

impl BrokerProcess {
    fn start(config: &Path, log: &Path, ca: Option<&Path>) -> BrokerProcess {
        let stderr = std::fs::File::create(log)
            .unwrap_or_else(|e| die(format_args!("cannot create {}: {e}", log.display())));
        let mut child = Command::new(broker_bin())
            .args(["serve", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| die(format_args!("cannot start p11shim-broker: {e}")));
        let Some(out) = child.stdout.take() else {
            die("p11shim-broker: no stdout");
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("listening ") {
                    let _ = tx.send(a.to_owned());
                }
            }
        });
        let deadline = Instant::now() + STARTUP;
        let tail = |log: &Path| std::fs::read_to_string(log).unwrap_or_default();
        let addr = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(a) => match a.parse() {
                    Ok(a) => break a,
                    Err(_) => die(format_args!("p11shim-broker printed {a:?}")),
                },
                Err(_) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        die(format_args!("p11shim-broker exited ({st}):\n{}", tail(log)));
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        die(format_args!("p11shim-broker did not start:\n{}", tail(log)));
                    }
                }
            }
        };
        BrokerProcess {
            child,
            addr,
            ca: ca.map(Path::to_path_buf),
            log: log.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A decision counter of `/metrics`.
    fn decisions(&self, outcome: &str) -> u64 {
        let text = http_client(self.ca.as_deref())
            .get(format!("{}/metrics", self.url()))
            .send()
            .and_then(|r| r.text())
            .unwrap_or_else(|e| die(format_args!("broker /metrics: {e}")));
        let prefix = format!(
            "p11shim_broker_decisions_total{{method=\"static-fingerprint\",outcome=\"{outcome}\"}}"
        );
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client for the broker; trusting only `ca` when given.
fn http_client(ca: Option<&Path>) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca)
            .unwrap_or_else(|e| die(format_args!("cannot read {}: {e}", ca.display())));
        let cert = reqwest::Certificate::from_pem(&pem)
            .unwrap_or_else(|e| die(format_args!("{}: {e}", ca.display())));
        b = b.tls_built_in_root_certs(false).add_root_certificate(cert);
    }
    b.build()
        .unwrap_or_else(|e| die(format_args!("HTTP client: {e}")))
}

/// One load client: its connection and its identities with their nonces.
struct Client {
    http: reqwest::blocking::Client,
    url: String,
    identities: Vec<(BTreeMap<String, String>, String)>,
    next: usize,
    serial: u64,
    thread: usize,
}

impl Client {
    fn new(url: &str, thread: usize) -> Client {
        let identities = (thread * PER_THREAD..(thread + 1) * PER_THREAD)
            .map(|i| {
                let mut raw = [0u8; 32];
                raw[..8].copy_from_slice(&(i as u64).to_be_bytes());
                raw[8..16].copy_from_slice(&std::process::id().to_be_bytes().repeat(2));
                (identity(i), b64_url().encode(raw))
            })
            .collect();
        Client {
            http: http_client(None),
            url: format!("{url}{}", p11shim_proto::CREDENTIALS_PATH),
            identities,
            next: 0,
            serial: 0,
            thread,
        }
    }

    /// One exchange for the next identity, checked through to the PIN.
    fn exchange(&mut self) {
        let (attrs, nonce) = &self.identities[self.next];
        self.next = (self.next + 1) % self.identities.len();
        self.serial += 1;
        let key = KeyPair::generate();
        let request = Request {
            v: p11shim_proto::VERSION,
            request_id: format!("bench-{}-{}", self.thread, self.serial),
            role: LOAD_ROLE.into(),
            method: Some(Method::StaticFingerprint),
            fingerprint: Some(FingerprintEvidence {
                attributes: attrs.clone(),
            }),
            client_nonce: Some(Secret::new(nonce.as_str())),
            response_key: Some(key.response_key()),
            ..Default::default()
        };
        let body = serde_json::to_vec(&request)
            .unwrap_or_else(|e| die(format_args!("encode a request: {e}")));
        let r = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap_or_else(|e| die(format_args!("POST {}: {e}", self.url)));
        let status = r.status().as_u16();
        let bytes = r
            .bytes()
            .unwrap_or_else(|e| die(format_args!("broker answer: {e}")));
        if status != 200 {
            die(format_args!(
                "the broker answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        let resp: Response = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| die(format_args!("broker answer: {e}")));
        if resp.request_id != request.request_id {
            die("the broker answered another request");
        }
        let Some(sealed) = resp.sealed_credentials.as_ref() else {
            die("the broker's answer carries no sealed credentials");
        };
        let aad = p11shim_proto::seal::aad(
            &resp.request_id,
            &resp.role,
            &resp.subject,
            &resp.expires_at,
        );
        let plain = key
            .open(sealed, &aad)
            .unwrap_or_else(|e| die(format_args!("sealed credentials: {e}")));
        let creds: Credentials = serde_json::from_slice(&plain)
            .unwrap_or_else(|_| die("sealed credentials: not a credentials document"));
        if creds.pin.expose() != PIN {
            die("the broker granted another PIN");
        }
    }
}

/// One load measurement: requests/s, latencies, requests made.
struct Load {
    rate: f64,
    hist: Histogram,
    requests: u64,
}

/// `threads` clients re-authenticate for `warmup`, then for `measure`.
fn load(url: &str, threads: usize, warmup: Duration, measure: Duration) -> Load {
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (url, start) = (url.to_owned(), Arc::clone(&start));
            std::thread::spawn(move || {
                let mut c = Client::new(&url, t);
                start.wait();
                let t0 = Instant::now();
                let (warm_end, end) = (t0 + warmup, t0 + warmup + measure);
                let mut made = 0u64;
                while Instant::now() < warm_end && made < MAX_REQUESTS {
                    c.exchange();
                    made += 1;
                }
                let mut hist = Histogram::new();
                let mut n = 0u64;
                let begin = Instant::now();
                let mut last = begin;
                while last < end && n < MAX_REQUESTS {
                    c.exchange();
                    let now = Instant::now();
                    hist.record(now.duration_since(last).as_nanos() as u64);
                    last = now;
                    n += 1;
                }
                (hist, n, last.duration_since(begin), made + n)
            })
        })
        .collect();
    start.wait();
    let mut hist = Histogram::new();
    let (mut rate, mut requests) = (0.0, 0);
    for h in handles {
        let (th, n, took, made) = h.join().unwrap_or_else(|_| die("a load thread panicked"));
        hist.merge(&th);
        rate += n as f64 / took.as_secs_f64().max(1e-9);
        requests += made;
    }
    Load {
        rate,
        hist,
        requests,
    }
}

/// The first use of every identity of `threads` clients (not measured).
fn first_uses(url: &str, threads: usize) {
    for t in 0..threads {
        let mut c = Client::new(url, t);
        for _ in 0..PER_THREAD {
            c.exchange();
        }
    }
}

/// A row of the requests table.
struct LoadRow {
    store: Store,
    threads: usize,
    rates: Vec<f64>,
    hist: Histogram,
    requests: u64,
}

fn measure_store(store: Store, opts: &BrokerOpts, dir: &Path) -> Vec<LoadRow> {
    let max_threads = opts.threads.iter().copied().max().unwrap_or(1);
    let pin_file = dir.join(format!("{}-role.pin", store.title()));
    write_secret(&pin_file, PIN);
    let _pg;
    let store_toml = match store {
        Store::Sqlite => format!(
            "[store]\nkind = \"sqlite\"\npath = \"{}\"\n",
            dir.join("replay.db").display()
        ),
        Store::Postgres => {
            eprintln!("Starting a throwaway PostgreSQL cluster...");
            let pg = Postgres::start()
                .unwrap_or_else(|| die("PostgreSQL is not installed (apt-get install postgresql)"));
            eprintln!("  {}", pg.version());
            let url_file = dir.join("pg-url");
            write_secret(&url_file, &pg.url());
            _pg = pg;
            format!(
                "[store]\nkind = \"postgres\"\nurl = \"file:{}\"\npool_size = 16\n",
                url_file.display()
            )
        }
    };
    let config = dir.join(format!("broker-{}.toml", store.title()));
    write(
        &config,
        &broker_config(&store_toml, None, &pin_file, max_threads * PER_THREAD),
    );
    let broker = BrokerProcess::start(
        &config,
        &dir.join(format!("broker-{}.log", store.title())),
        None,
    );
    eprintln!(
        "{}: first use of {} identities...",
        store.title(),
        max_threads * PER_THREAD
    );
    first_uses(&broker.url(), max_threads);
    let mut rows = Vec::new();
    let mut sent = 0u64;
    for &threads in &opts.threads {
        let mut row = LoadRow {
            store,
            threads,
            rates: Vec::new(),
            hist: Histogram::new(),
            requests: 0,
        };
        for round in 0..opts.rounds {
            let l = load(&broker.url(), threads, opts.warmup, opts.secs);
            eprintln!(
                "  {} thread(s), round {}: {:.0} requests/s",
                threads,
                round + 1,
                l.rate
            );
            row.rates.push(l.rate);
            row.hist.merge(&l.hist);
            row.requests += l.requests;
            sent += l.requests;
        }
        rows.push(row);
    }
    // Every request was a decision with its store write: the broker's own
    // counts must agree with the client's.
    let granted = broker.decisions("granted");
    let reauth = broker.decisions("reauthenticated");
    if granted != (max_threads * PER_THREAD) as u64 || reauth != sent {
        die(format_args!(
            "the broker counted {granted} first uses and {reauth} re-authentications; the clients made {} and {sent} (log: {})",
            max_threads * PER_THREAD,
            broker.log.display()
        ));
    }
    rows
}

/// A test CA and a server certificate for 127.0.0.1, made with openssl.
fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert, key, csr) = (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("server.csr"),
    );
    let ext = dir.join("server.ext");
    write(
        &ext,
        "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n\
         extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1, DNS:localhost\n",
    );
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut c = Command::new("openssl");
    c.args(["req", "-x509"])
        .args(ec)
        .args(["-days", "2", "-subj", "/CN=p11shim bench CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign"])
        .arg("-keyout")
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca);
    crate::env::run(c, "openssl (the test CA)", false);
    let mut c = Command::new("openssl");
    c.args(["req", "-new"])
        .args(ec)
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr);
    crate::env::run(c, "openssl (server key)", false);
    let mut c = Command::new("openssl");
    c.args(["x509", "-req", "-days", "2", "-set_serial", "2", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert);
    crate::env::run(c, "openssl (server certificate)", false);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| die(format_args!("chmod {}: {e}", key.display())));
    (ca, cert, key)
}

/// One way of starting an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Direct,
    ShimPin,
    ShimBrokerHttp,
    ShimBrokerHttps,
}

impl Start {
    const ALL: [Start; 4] = [
        Start::Direct,
        Start::ShimPin,
        Start::ShimBrokerHttp,
        Start::ShimBrokerHttps,
    ];

    fn title(self) -> &'static str {
        match self {
            Start::Direct => "SoftHSM2 directly, PIN from the application",
            Start::ShimPin => "p11shim, PIN from the application",
            Start::ShimBrokerHttp => "p11shim, PIN from the broker (HTTP, loopback)",
            Start::ShimBrokerHttps => "p11shim, PIN from the broker (HTTPS, loopback)",
        }
    }
}

/// The steps of one application start, in nanoseconds.
#[derive(Debug, Default, Clone)]
struct Steps {
    init: Vec<u64>,
    login: Vec<u64>,
    sign: Vec<u64>,
    total: Vec<u64>,
}

/// Nearest-rank quantile of unsorted samples.
fn quantile(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn ms(ns: u64) -> String {
    let v = ns as f64 / 1e6;
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A module configuration of one slot over the bench token, with the
/// broker's section when `broker` is given.
fn module_config(dir: &Path, name: &str, broker: Option<(&str, Option<&Path>)>) -> PathBuf {
    let mut t = format!(
        "[log]\nlevel = \"warn\"\nfile = \"{}\"\n\n[[slot]]\nid = 0\nlabel = \"{TOKEN_LABEL}\"\n{}\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN_LABEL}\"\n",
        dir.join(format!("{name}.log")).display(),
        if broker.is_some() {
            "pin = \"broker\"\n"
        } else {
            ""
        },
        softhsm_lib().display()
    );
    if let Some((url, ca)) = broker {
        t.push_str(&format!(
            "\n[broker]\nurl = \"{url}\"\nrole = \"{MODULE_ROLE}\"\nmethod = \"static-fingerprint\"\nnonce_file = \"{}\"\n",
            dir.join(format!("{name}.nonce")).display()
        ));
        if let Some(ca) = ca {
            t.push_str(&format!("ca = \"{}\"\n", ca.display()));
        }
    }
    let p = dir.join(format!("{name}.toml"));
    write(&p, &t);
    p
}

fn start_once(env: &BenchEnv, start: Start, configs: &BTreeMap<&'static str, PathBuf>) -> Steps {
    let (target, login, config) = match start {
        Start::Direct => (Target::Direct, Login::Pin, None),
        Start::ShimPin => (Target::Shim, Login::Pin, configs.get("pin")),
        Start::ShimBrokerHttp => (Target::Shim, Login::Protected, configs.get("http")),
        Start::ShimBrokerHttps => (Target::Shim, Login::Protected, configs.get("https")),
    };
    let mut cmd = Command::new(exe());
    cmd.arg("--broker-worker")
        .arg("--lib")
        .arg(BenchEnv::lib(target))
        .args(["--login", login.name()]);
    env.apply(&mut cmd, target);
    if let Some(c) = config {
        cmd.env("P11SHIM_CONFIG", c);
    }
    let out = run_checked(cmd, start.title());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| -> u64 {
        result_field(&stdout, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| die(format_args!("{}: no {k} in {stdout:?}", start.title())))
    };
    Steps {
        init: vec![field("init")],
        login: vec![field("login")],
        sign: vec![field("sign")],
        total: vec![field("total")],
    }
}

fn measure_starts(env: &BenchEnv, opts: &BrokerOpts, dir: &Path) -> Vec<(Start, Steps)> {
    let pin_file = dir.join("module-role.pin");
    write_secret(&pin_file, PIN);
    let (ca, cert, key) = test_pki(dir);
    let mk = |name: &str, tls: Option<(&Path, &Path)>| {
        let store = format!(
            "[store]\nkind = \"sqlite\"\npath = \"{}\"\n",
            dir.join(format!("{name}.db")).display()
        );
        let config = dir.join(format!("broker-{name}.toml"));
        write(&config, &broker_config(&store, tls, &pin_file, 1));
        BrokerProcess::start(
            &config,
            &dir.join(format!("broker-{name}.log")),
            tls.map(|_| ca.as_path()),
        )
    };
    let http = mk("starts-http", None);
    let https = mk("starts-https", Some((&cert, &key)));
    let mut configs = BTreeMap::new();
    configs.insert("pin", module_config(dir, "shim-pin", None));
    configs.insert(
        "http",
        module_config(dir, "shim-http", Some((&http.url(), None))),
    );
    configs.insert(
        "https",
        module_config(dir, "shim-https", Some((&https.url(), Some(&ca)))),
    );
    eprintln!(
        "Application starts: {} per target, interleaved, after 3 unmeasured ones (the first makes the broker's first use)...",
        opts.runs
    );
    for _ in 0..3 {
        for s in Start::ALL {
            start_once(env, s, &configs);
        }
    }
    let mut all: Vec<(Start, Steps)> = Start::ALL.iter().map(|s| (*s, Steps::default())).collect();
    for run in 0..opts.runs {
        // Rotate which target goes first.
        for k in 0..Start::ALL.len() {
            let i = (run + k) % Start::ALL.len();
            let s = start_once(env, all[i].0, &configs);
            let acc = &mut all[i].1;
            acc.init.extend(s.init);
            acc.login.extend(s.login);
            acc.sign.extend(s.sign);
            acc.total.extend(s.total);
        }
    }
    // Each start was one decision: the first a first use, the others
    // re-authentications.
    let want = (opts.runs + 3) as u64;
    for b in [&http, &https] {
        let granted = b.decisions("granted");
        let reauth = b.decisions("reauthenticated");
        if granted != 1 || reauth + granted != want {
            die(format_args!(
                "the broker at {} counted {granted} first uses and {reauth} re-authentications for {want} application starts",
                b.url()
            ));
        }
    }
    all
}

pub fn run(opts: &BrokerOpts, markdown: bool) {
    let env = BenchEnv::create();
    let dir = env.path().join("broker");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| die(format_args!("cannot create {}: {e}", dir.display())));
    let mut rows = Vec::new();
    for &store in &opts.stores {
        rows.extend(measure_store(store, opts, &dir));
    }
    let starts = if opts.runs > 0 {
        measure_starts(&env, opts, &dir)
    } else {
        Vec::new()
    };
    println!();
    print_load(&rows, opts, markdown);
    if !starts.is_empty() {
        println!();
        print_starts(&starts, opts, markdown);
    }
    if opts.keep {
        let kept = env.path().to_path_buf();
        std::mem::forget(env);
        eprintln!("kept {}", kept.display());
    }
}

fn table(markdown: bool, header: &[&str], align_right: &[bool], rows: &[Vec<String>]) {
    if markdown {
        println!("| {} |", header.join(" | "));
        let seps: Vec<&str> = align_right
            .iter()
            .map(|r| if *r { "--:" } else { "---" })
            .collect();
        println!("|{}|", seps.join("|"));
        for r in rows {
            println!("| {} |", r.join(" | "));
        }
        return;
    }
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if align_right[i] {
                    format!("{c:>width$}", width = w[i])
                } else {
                    format!("{c:<width$}", width = w[i])
                }
            })
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_load(rows: &[LoadRow], opts: &BrokerOpts, markdown: bool) {
    println!(
        "Verified requests (nonce re-authentication, sealed answers), {} round(s) of {:.1} s:",
        opts.rounds,
        opts.secs.as_secs_f64()
    );
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut rates = r.rates.clone();
            rates.sort_by(f64::total_cmp);
            let median = rates[rates.len() / 2];
            let range = if rates.len() > 1 {
                format!("{:.0}–{:.0}", rates[0], rates[rates.len() - 1])
            } else {
                "-".into()
            };
            vec![
                r.store.title().to_owned(),
                r.threads.to_string(),
                format!("{median:.0}"),
                range,
                ms(r.hist.quantile(0.5)),
                ms(r.hist.quantile(0.99)),
                r.requests.to_string(),
            ]
        })
        .collect();
    table(
        markdown,
        &[
            "Store",
            "Client threads",
            "requests/s",
            "range",
            "p50 ms",
            "p99 ms",
            "requests checked",
        ],
        &[false, true, true, true, true, true, true],
        &body,
    );
}

fn print_starts(starts: &[(Start, Steps)], opts: &BrokerOpts, markdown: bool) {
    println!(
        "C_Initialize to first signature (ECDSA P-256), {} fresh processes per target:",
        opts.runs
    );
    let body: Vec<Vec<String>> = starts
        .iter()
        .map(|(s, st)| {
            vec![
                s.title().to_owned(),
                ms(quantile(&st.total, 0.5)),
                ms(quantile(&st.total, 0.99)),
                ms(quantile(&st.total, 1.0)),
                ms(quantile(&st.init, 0.5)),
                ms(quantile(&st.login, 0.5)),
                ms(quantile(&st.login, 0.99)),
                ms(quantile(&st.sign, 0.5)),
            ]
        })
        .collect();
    table(
        markdown,
        &[
            "Application start",
            "p50 ms",
            "p99 ms",
            "max ms",
            "C_Initialize p50",
            "C_Login p50",
            "C_Login p99",
            "first sign p50",
        ],
        &[false, true, true, true, true, true, true, true],
        &body,
    );
    let p99 = |want: Start| {
        starts
            .iter()
            .find(|(s, _)| *s == want)
            .map(|(_, st)| quantile(&st.total, 0.99))
            .unwrap_or(0)
    };
    let worst = p99(Start::ShimBrokerHttp).max(p99(Start::ShimBrokerHttps));
    println!();
    println!(
        "Target: C_Initialize to first signature under 50 ms at p99 with a warm broker: {} (p99 {} ms over HTTP, {} ms over HTTPS)",
        if worst < 50_000_000 { "MET" } else { "NOT MET" },
        ms(p99(Start::ShimBrokerHttp)),
        ms(p99(Start::ShimBrokerHttps)),
    );
}
