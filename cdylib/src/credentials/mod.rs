//! Credentials by attestation: a thread of its own asks `p11shim-broker`
//! for the role's credentials, presenting what the platform says about this
//! machine, and keeps them fresh.
//!
//! `C_Initialize` starts the thread and returns; the first call that needs
//! the PIN ([`Agent::pin`]) waits for it, at most `wait_ms`. Before the
//! credentials expire the thread re-authenticates with the nonce bound at
//! first use; a member refusing the PIN asks for an early refresh
//! ([`Agent::refresh`]), which is how a PIN rotated at the broker is picked
//! up. The HTTP client lives and dies on that thread, never inside a host
//! application's own async runtime. Secrets are held in zeroizing memory
//! and never logged.

mod approvals;
pub mod evidence;

pub use approvals::ApprovalError;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use p11shim_proto::seal::{self, KeyPair};
use p11shim_proto::{
    ClientInfo, Credentials, ErrorKind, Method, Problem, Reauth, Request, Response, Secret, b64_url,
};
use parking_lot::{Condvar, Mutex};
use zeroize::Zeroizing;

use crate::config::{BrokerConfig, BrokerMethod};
use crate::error::{Error, Result};
use evidence::{Evidence, gather, imds_client, without_url};

/// Longest pause between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First pause after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Pause after a refusal that asking again will not change (`denied`,
/// `already_used`): an operator has to act first.
const REFUSED_PAUSE: Duration = Duration::from_secs(60);
/// Largest broker answer read.
const MAX_ANSWER: usize = 256 * 1024;

/// Credentials the broker granted.
pub struct Grant {
    /// The role's PIN (wiped when dropped; never in `Debug`).
    pub pin: Zeroizing<Vec<u8>>,
    /// The audit checkpoint key, when the role has one (never in `Debug`).
    pub audit_key: Option<Zeroizing<Vec<u8>>>,
    /// The bearer token of approval requests, when the role has quorum
    /// rules (never in `Debug`).
    pub approval_token: Option<Zeroizing<String>>,
    /// Who the broker verified.
    pub subject: String,
    /// The role's key ACL policy.
    pub policy: serde_json::Value,
    /// Re-authenticate before this has passed.
    pub ttl: Duration,
    /// When the request was sent.
    pub obtained: Instant,
    /// The expiry the broker stated (RFC 3339).
    pub expires_at: String,
    /// How the broker lets this machine come back.
    pub reauth: Reauth,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("subject", &self.subject)
            .field("ttl", &self.ttl)
            .field("expires_at", &self.expires_at)
            .field("reauth", &self.reauth)
            .finish_non_exhaustive()
    }
}

/// One exchange with the broker, exactly as the agent's thread makes it
/// (same evidence, nonce source, sealing and checks), for a tool that wants
/// one answer without a thread (`p11shim attest`, `p11shim provision`).
pub fn exchange_once(cfg: &BrokerConfig) -> Result<Grant> {
    let nonce = load_nonce(cfg.nonce_file.as_deref())?;
    let timeout = Duration::from_millis(cfg.request_timeout_ms);
    let http = broker_client(cfg, timeout).map_err(|f| Error::PinSource(f.message))?;
    let imds = imds_client(timeout).map_err(|e| Error::PinSource(e.0))?;
    exchange(cfg, &http, &imds, &nonce).map_err(|f| Error::PinSource(f.message))
}

impl Grant {
    fn expired(&self, now: Instant) -> bool {
        now >= self.obtained + self.ttl
    }
    /// When to re-authenticate: at 80 % of the lifetime.
    fn refresh_at(&self) -> Instant {
        self.obtained + self.ttl.mul_f64(0.8).max(Duration::from_secs(1))
    }
}

#[derive(Default)]
struct State {
    grant: Option<Grant>,
    /// Bumped at every grant, so waiters see a new one.
    generation: u64,
    last_error: Option<String>,
    /// The last refusal was one asking again does not change.
    refused: Option<ErrorKind>,
    attempts: u64,
    grants: u64,
    refresh: bool,
    stop: bool,
    /// The thread has returned.
    exited: bool,
    /// An exchange is in flight.
    exchanging: bool,
}

struct Shared {
    cfg: BrokerConfig,
    state: Mutex<State>,
    /// Signalled when the state changes (waiters) or work is asked for
    /// (the thread).
    changed: Condvar,
    /// `State::generation`, readable without the lock.
    published: AtomicU64,
    /// Every exchange is recorded in the audit log.
    audit: Option<Arc<p11shim_audit::Auditor>>,
    /// The broker client, once the thread made it (approval requests use it).
    http: std::sync::OnceLock<reqwest::blocking::Client>,
}

/// The credential agent of an initialized module.
pub struct Agent {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The process that started the thread: a forked child has no such
    /// thread and must not wait for it.
    pid: u32,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("role", &self.shared.cfg.role)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Starts fetching; returns at once.
    pub fn start(
        cfg: BrokerConfig,
        audit: Option<Arc<p11shim_audit::Auditor>>,
    ) -> Result<Arc<Agent>> {
        let nonce = load_nonce(cfg.nonce_file.as_deref())?;
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            published: AtomicU64::new(0),
            audit,
            http: std::sync::OnceLock::new(),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("p11shim-credentials".into())
            .spawn(move || {
                run(&s, &nonce);
                s.state.lock().exited = true;
                s.changed.notify_all();
            })
            .map_err(|e| Error::PinSource(format!("cannot start the credentials thread: {e}")))?;
        Ok(Arc::new(Agent {
            shared,
            thread: Mutex::new(Some(thread)),
            pid: std::process::id(),
        }))
    }

    /// The role's PIN, waiting at most `wait_ms` for the first grant.
    pub fn pin(&self) -> Result<Zeroizing<Vec<u8>>> {
        let cfg = &self.shared.cfg;
        let deadline = Instant::now() + Duration::from_millis(cfg.wait_ms);
        let mut st = self.shared.state.lock();
        loop {
            let now = Instant::now();
            if let Some(g) = st.grant.as_ref().filter(|g| !g.expired(now)) {
                return Ok(g.pin.clone());
            }
            if let Some(kind) = st.refused {
                return Err(unavailable(cfg, &st, Some(kind)));
            }
            if now >= deadline || st.stop {
                return Err(unavailable(cfg, &st, None));
            }
            self.shared.changed.wait_until(&mut st, deadline);
        }
    }

    /// The grant generation; changes whenever new credentials arrive.
    pub fn generation(&self) -> u64 {
        self.shared.state.lock().generation
    }

    /// Asks for new credentials now (a member refused the PIN) and waits,
    /// at most `wait_ms`, for a grant obtained by an exchange that started
    /// after this call. Returns whether one arrived.
    pub fn refresh(&self) -> bool {
        let deadline = Instant::now() + Duration::from_millis(self.shared.cfg.wait_ms);
        let mut st = self.shared.state.lock();
        // An exchange in flight may have read the old PIN: wait for one
        // more after it.
        let target = st.generation + if st.exchanging { 2 } else { 1 };
        st.refresh = true;
        st.refused = None;
        self.shared.changed.notify_all();
        while st.generation < target && !st.stop && Instant::now() < deadline {
            let attempts = st.attempts;
            self.shared.changed.wait_until(&mut st, deadline);
            if st.generation < target && st.attempts > attempts && st.refused.is_some() {
                break;
            }
            if st.generation + 1 == target && !st.exchanging && !st.refresh {
                // The in-flight exchange ended; ask for the one after it.
                st.refresh = true;
                self.shared.changed.notify_all();
            }
        }
        st.generation >= target
    }

    /// [`Agent::generation`] without taking the state lock: cheap enough
    /// for every call that checks whether the policy changed.
    #[inline]
    pub fn published(&self) -> u64 {
        self.shared.published.load(Ordering::Acquire)
    }

    /// The audit checkpoint key of the latest grant, when the role has one.
    pub fn audit_key(&self) -> Option<Zeroizing<Vec<u8>>> {
        let st = self.shared.state.lock();
        st.grant.as_ref().and_then(|g| g.audit_key.clone())
    }

    /// The role asked for.
    pub fn role(&self) -> &str {
        &self.shared.cfg.role
    }

    /// The key ACL policy that came with the credentials, the subject the
    /// broker verified, and the grant's generation.
    pub fn policy(&self) -> Option<(serde_json::Value, String, u64)> {
        let st = self.shared.state.lock();
        st.grant
            .as_ref()
            .map(|g| (g.policy.clone(), g.subject.clone(), st.generation))
    }

    /// State for `P11shim_GetStatus`.
    pub fn status_json(&self) -> serde_json::Value {
        let cfg = &self.shared.cfg;
        let st = self.shared.state.lock();
        let now = Instant::now();
        let (state, subject, expires_in) = match &st.grant {
            Some(g) if !g.expired(now) => (
                "ready",
                Some(g.subject.clone()),
                Some(
                    (g.obtained + g.ttl)
                        .saturating_duration_since(now)
                        .as_secs(),
                ),
            ),
            Some(g) => ("expired", Some(g.subject.clone()), Some(0)),
            None if st.refused.is_some() => ("refused", None, None),
            None => ("pending", None, None),
        };
        serde_json::json!({
            "role": cfg.role,
            "method": cfg.method.as_str(),
            "broker": cfg.url,
            "state": state,
            "subject": subject,
            "expires_in_s": expires_in,
            "grants": st.grants,
            "attempts": st.attempts,
            "last_error": st.last_error,
        })
    }

    /// Stops the thread and forgets the credentials. A thread inside an
    /// exchange is not waited for past a short grace: it ends by itself at
    /// its request timeout, touching nothing but its own state.
    pub fn stop(&self) {
        let Some(t) = self.thread.lock().take() else {
            return;
        };
        if std::process::id() != self.pid {
            std::mem::forget(t);
            return;
        }
        let grace = Instant::now() + Duration::from_millis(500);
        let exited = {
            let mut st = self.shared.state.lock();
            st.stop = true;
            st.grant = None;
            self.shared.changed.notify_all();
            while !st.exited && Instant::now() < grace {
                self.shared.changed.wait_until(&mut st, grace);
            }
            st.exited
        };
        if exited {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn unavailable(cfg: &BrokerConfig, st: &State, refused: Option<ErrorKind>) -> Error {
    let why = match (refused, &st.last_error) {
        (Some(k), _) => format!("the broker refused: {k}"),
        (None, Some(e)) => e.clone(),
        (None, None) => format!("no answer within {} ms", cfg.wait_ms),
    };
    tracing::error!(role = %cfg.role, broker = %cfg.url, reason = %why, "credentials unavailable");
    Error::PinSource(format!("broker credentials for role {}: {why}", cfg.role))
}

/// The re-authentication nonce: from `nonce_file` (made once, mode 0600,
/// shared by every process on the machine), else fresh for this process.
fn load_nonce(path: Option<&Path>) -> Result<Zeroizing<String>> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

    let fresh = || -> Result<Zeroizing<String>> {
        let mut raw = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut raw[..]).map_err(|e| Error::PinSource(format!("random: {e}")))?;
        Ok(Zeroizing::new(b64_url().encode(&raw[..])))
    };
    let Some(path) = path else {
        return fresh();
    };
    let err = |what: &str, e: std::io::Error| {
        Error::PinSource(format!(
            "nonce file {}: {what}: {}",
            path.display(),
            e.kind()
        ))
    };
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => {
                let n = fresh()?;
                f.write_all(n.as_bytes()).map_err(|e| err("write", e))?;
                f.sync_all().map_err(|e| err("sync", e))?;
                return Ok(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let mut f = std::fs::File::open(path).map_err(|e| err("open", e))?;
                let meta = f.metadata().map_err(|e| err("stat", e))?;
                if meta.mode() & 0o077 != 0 {
                    return Err(Error::PinSource(format!(
                        "nonce file {}: readable by others; chmod 600",
                        path.display()
                    )));
                }
                let mut s = Zeroizing::new(String::new());
                f.read_to_string(&mut s).map_err(|e| err("read", e))?;
                let t = s.trim();
                if t.len() >= 22 {
                    return Ok(Zeroizing::new(t.to_owned()));
                }
                // Another process is writing it: read again.
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(err("create", e)),
        }
    }
    Err(Error::PinSource(format!(
        "nonce file {}: empty or too short",
        path.display()
    )))
}

/// A failed exchange.
struct Failure {
    message: String,
    refused: Option<ErrorKind>,
    retry_after: Option<Duration>,
}

impl Failure {
    fn local(message: String) -> Failure {
        Failure {
            message,
            refused: None,
            retry_after: None,
        }
    }
}

fn run(shared: &Shared, nonce: &Zeroizing<String>) {
    let cfg = &shared.cfg;
    let timeout = Duration::from_millis(cfg.request_timeout_ms);
    let clients = broker_client(cfg, timeout).and_then(|b| {
        imds_client(timeout)
            .map(|i| (b, i))
            .map_err(|e| Failure::local(e.0))
    });
    let (http, imds) = match clients {
        Ok(c) => {
            let _ = shared.http.set(c.0.clone());
            c
        }
        Err(f) => {
            let mut st = shared.state.lock();
            tracing::error!(role = %cfg.role, error = %f.message, "cannot set up the broker client");
            st.last_error = Some(f.message);
            st.refused = Some(ErrorKind::BadRequest);
            shared.changed.notify_all();
            return;
        }
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        {
            let mut st = shared.state.lock();
            if st.stop {
                break;
            }
            st.exchanging = true;
            st.refresh = false;
        }
        let started = (std::time::SystemTime::now(), Instant::now());
        let outcome = exchange(cfg, &http, &imds, nonce);
        if let Some(a) = &shared.audit {
            a.record(exchange_record(cfg, &outcome, started));
        }
        let mut st = shared.state.lock();
        st.attempts += 1;
        st.exchanging = false;
        let next = match outcome {
            Ok(g) => {
                tracing::info!(role = %cfg.role, subject = %g.subject, ttl_s = g.ttl.as_secs(), "credentials obtained from the broker");
                let next = g.refresh_at();
                st.grant = Some(g);
                st.generation += 1;
                shared.published.store(st.generation, Ordering::Release);
                st.grants += 1;
                st.last_error = None;
                st.refused = None;
                backoff = FIRST_BACKOFF;
                next
            }
            Err(f) => {
                match f.refused {
                    Some(ErrorKind::AlreadyUsed) => tracing::error!(
                        role = %cfg.role,
                        "ALARM: the broker says this machine's identity was already used; another party may hold its evidence"
                    ),
                    _ => {
                        tracing::warn!(role = %cfg.role, error = %f.message, "no credentials from the broker")
                    }
                }
                let pause = match f.refused {
                    Some(_) => REFUSED_PAUSE,
                    None => f.retry_after.unwrap_or(backoff).max(backoff),
                };
                backoff = (backoff * 2).min(MAX_BACKOFF);
                st.last_error = Some(f.message);
                st.refused = f.refused;
                // A grant still valid keeps serving while the refresh retries.
                Instant::now() + pause
            }
        };
        shared.changed.notify_all();
        while !st.stop && !st.refresh && Instant::now() < next {
            shared.changed.wait_until(&mut st, next);
        }
    }
}

/// The audit record of one exchange: method, role, subject and outcome;
/// never the credentials.
fn exchange_record(
    cfg: &BrokerConfig,
    outcome: &std::result::Result<Grant, Failure>,
    started: (std::time::SystemTime, Instant),
) -> p11shim_audit::Record {
    use p11shim_audit::{Kind, Record};
    let method = method(cfg.method).as_str();
    let (result, subject, detail) = match outcome {
        Ok(g) => (
            0,
            Some(std::sync::Arc::from(g.subject.as_str())),
            format!("method={method} ttl_s={}", g.ttl.as_secs()),
        ),
        Err(f) => (
            crate::error::vendor_rv::PIN_SOURCE_UNAVAILABLE as u64,
            None,
            format!(
                "method={method} refused={}",
                f.refused.map_or("no", |k| k.as_str())
            ),
        ),
    };
    Record {
        time: started.0,
        role: Some(std::sync::Arc::from(cfg.role.as_str())),
        subject,
        latency_us: Some(started.1.elapsed().as_micros() as u64),
        detail: Some(detail.into()),
        ..Record::new(Kind::Credentials, "credentials", result)
    }
}

fn broker_client(
    cfg: &BrokerConfig,
    timeout: Duration,
) -> std::result::Result<reqwest::blocking::Client, Failure> {
    let mut b = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(3)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("p11shim/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &cfg.ca {
        let pem = std::fs::read(ca)
            .map_err(|e| Failure::local(format!("broker CA {}: {}", ca.display(), e.kind())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
            Failure::local(format!("broker CA {}: not PEM certificates", ca.display()))
        })?;
        if certs.is_empty() {
            return Err(Failure::local(format!(
                "broker CA {}: no certificate",
                ca.display()
            )));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
        b = b.https_only(true);
    }
    if cfg.url.starts_with("http://") {
        b = b.no_proxy();
    }
    b.build()
        .map_err(|e| Failure::local(format!("broker client: {}", without_url(&e))))
}

fn request_id() -> String {
    let mut r = [0u8; 16];
    let _ = getrandom::fill(&mut r);
    r[6] = (r[6] & 0x0f) | 0x40;
    r[8] = (r[8] & 0x3f) | 0x80;
    let h: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn method(m: BrokerMethod) -> Method {
    match m {
        BrokerMethod::AwsImdsFields => Method::AwsImdsFields,
        BrokerMethod::AwsIid => Method::AwsIid,
        BrokerMethod::K8sSaToken => Method::K8sSaToken,
        BrokerMethod::StaticFingerprint => Method::StaticFingerprint,
    }
}

/// One request to the broker.
fn exchange(
    cfg: &BrokerConfig,
    http: &reqwest::blocking::Client,
    imds: &reqwest::blocking::Client,
    nonce: &Zeroizing<String>,
) -> std::result::Result<Grant, Failure> {
    let evidence = gather(cfg, imds).map_err(|e| Failure::local(e.0))?;
    let key = KeyPair::generate();
    let mut req = Request {
        v: p11shim_proto::VERSION,
        request_id: request_id(),
        role: cfg.role.clone(),
        method: Some(method(cfg.method)),
        client_nonce: Some(Secret::new(nonce.as_str())),
        response_key: Some(key.response_key()),
        client: Some(ClientInfo {
            version: env!("CARGO_PKG_VERSION").into(),
        }),
        ..Default::default()
    };
    match evidence {
        Evidence::Aws(a) => req.aws = Some(a),
        Evidence::K8s(k) => req.k8s = Some(k),
        Evidence::Fingerprint(f) => req.fingerprint = Some(f),
    }
    let body = Zeroizing::new(
        serde_json::to_vec(&req).map_err(|e| Failure::local(format!("encode: {e}")))?,
    );
    let sent = Instant::now();
    let r = http
        .post(format!("{}{}", cfg.url, p11shim_proto::CREDENTIALS_PATH))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_vec())
        .send()
        .map_err(|e| Failure::local(format!("broker {}: {}", cfg.url, without_url(&e))))?;
    let status = r.status();
    let broker_rid = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = r
        .bytes()
        .map_err(|e| Failure::local(format!("broker answer: {}", without_url(&e))))?;
    if bytes.len() > MAX_ANSWER {
        return Err(Failure::local("broker answer too large".into()));
    }
    if !status.is_success() {
        let problem: Option<Problem> = serde_json::from_slice(&bytes).ok();
        let kind = problem.as_ref().map(|p| p.title);
        return Err(Failure {
            message: format!(
                "broker answered {} {} (broker request id {broker_rid})",
                status.as_u16(),
                kind.map(|k| k.as_str())
                    .unwrap_or("without a problem document")
            ),
            refused: kind.filter(|k| !k.retryable()),
            retry_after: problem.and_then(|p| p.retry_after).map(Duration::from_secs),
        });
    }
    let resp: Response = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::local(format!("broker answer: {e}")))?;
    if resp.request_id != req.request_id || resp.role != req.role {
        return Err(Failure::local(
            "broker answer is for another request".into(),
        ));
    }
    let sealed = resp
        .sealed_credentials
        .as_ref()
        .ok_or_else(|| Failure::local("broker answer carries no sealed credentials".into()))?;
    let aad = seal::aad(
        &resp.request_id,
        &resp.role,
        &resp.subject,
        &resp.expires_at,
    );
    let plain = key
        .open(sealed, &aad)
        .map_err(|e| Failure::local(format!("sealed credentials: {e}")))?;
    let creds: Credentials = serde_json::from_slice(&plain)
        .map_err(|_| Failure::local("sealed credentials: not a credentials document".into()))?;
    if creds.pin.expose().is_empty() {
        return Err(Failure::local("the broker granted an empty PIN".into()));
    }
    Ok(Grant {
        pin: Zeroizing::new(creds.pin.expose().as_bytes().to_vec()),
        audit_key: creds
            .audit_key
            .as_ref()
            .map(|k| Zeroizing::new(k.expose().as_bytes().to_vec())),
        approval_token: creds
            .approval_token
            .as_ref()
            .map(|k| Zeroizing::new(k.expose().to_string())),
        subject: resp.subject,
        policy: resp.policy,
        ttl: Duration::from_secs(resp.ttl_seconds.max(1)),
        obtained: sent,
        expires_at: resp.expires_at,
        reauth: resp.reauth,
    })
}
