//! The AWS methods end to end: moto plays EC2 and IAM, our IMDSv2
//! emulator serves the moto instance's metadata and identity document
//! (signed by a test CA that the broker pins through `iid_cert_dir`), and
//! the broker runs in this process.
//!
//! The broker checks that a request comes from one of the instance's
//! addresses; requests from this machine come from 127.0.0.1, which no
//! moto instance has. So every request goes through a small loopback
//! proxy that adds `X-Forwarded-For: <the instance's private address>`,
//! and the broker trusts 127.0.0.1/32 as a proxy: the forwarded-address
//! path is exercised with it, and refused when the proxy is not trusted or
//! forwards another address.
//!
//! The broker's log is captured in this process, so each refusal is
//! checked for its coarse kind on the wire and for its exact reason in the
//! log line of its request id.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use p11shim_broker::aws::Instance;
use p11shim_proto::seal::KeyPair;
use p11shim_proto::{
    AwsEvidence, Credentials, Method, Request, Response, Secret, b64_std, b64_url,
};
use p11shim_tests::peers::broker::{TestBroker, http, module_broker, write_secret};
use p11shim_tests::peers::imds::{Imds, ImdsInstance};
use p11shim_tests::peers::moto::{ACCOUNT, Moto, REGION, require_moto};
use p11shim_tests::{TestEnv, USER_PIN, require, run_ok};

mod common;
use common::{
    java_signs_without_pin, openssl, openssl_cnf, openssl_verify, pkcs11_tool_sign_without_pin,
    text,
};

const TOKEN: &str = "aws";
const ROLE: &str = "signer";
/// The IAM role whose instance profiles are the role's members.
const IAM_ROLE: &str = "hsm-client";

// ---------------------------------------------------------------------
// The broker's log, captured in this process (each test is a process).

#[derive(Clone)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_buffer() -> &'static LogBuf {
    static LOG: OnceLock<LogBuf> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = LogBuf(Arc::new(Mutex::new(Vec::new())));
        let w = buf.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || w.clone())
            .try_init()
            .expect("the test's log subscriber");
        buf
    })
}

fn broker_log() -> String {
    String::from_utf8_lossy(&log_buffer().0.lock().expect("log buffer")).into_owned()
}

/// The broker's log line about the request `rid`.
fn log_line(rid: &str) -> String {
    let needle = format!("client_request_id={rid}");
    broker_log()
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no log line for {rid}:\n{}", broker_log()))
        .to_owned()
}

// ---------------------------------------------------------------------
// A loopback proxy adding `X-Forwarded-For`, one request per connection.

struct XffProxy {
    addr: SocketAddr,
    forwarded: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl XffProxy {
    fn start(upstream: SocketAddr, forwarded: &str) -> XffProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address");
        let forwarded = Arc::new(Mutex::new(forwarded.to_owned()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (Arc::clone(&forwarded), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let xff = f.lock().expect("xff").clone();
                        std::thread::spawn(move || {
                            let _ = relay(client, upstream, &xff);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        XffProxy {
            addr,
            forwarded,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address later requests are forwarded for.
    fn forward_for(&self, ip: &str) {
        *self.forwarded.lock().expect("xff") = ip.to_owned();
    }
}

impl Drop for XffProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request (headers and a Content-Length body), sends it
/// upstream with `X-Forwarded-For` appended and `Connection: close`, and
/// copies the answer back.
fn relay(mut client: TcpStream, upstream: SocketAddr, xff: &str) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
    let mut out = format!("{}\r\n", lines.next().unwrap_or_default());
    let mut length = 0usize;
    for l in lines {
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("connection:") {
            continue;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "x-forwarded-for: {xff}\r\nconnection: close\r\n\r\n"
    ));
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let mut up = TcpStream::connect(upstream)?;
    up.set_read_timeout(Some(Duration::from_secs(30)))?;
    up.write_all(out.as_bytes())?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    client.write_all(&answer)
}

// ---------------------------------------------------------------------
// moto, the emulator, the broker.

/// moto with the role's IAM role and its profile, and a second profile
/// holding another role (not a member).
struct Aws {
    moto: Moto,
    profile: String,
    other_profile: String,
}

impl Aws {
    fn seed(moto: Moto) -> Aws {
        let profile = moto.create_role_with_profile(IAM_ROLE, "hsm-client-profile");
        let other_profile = moto.create_role_with_profile("web", "web-profile");
        Aws {
            moto,
            profile,
            other_profile,
        }
    }

    /// A running instance with the named profile, as EC2 describes it.
    fn launch(&self, profile: &str) -> Instance {
        let (_, id) = self.moto.run_instance(Some(profile));
        self.describe(&id)
    }

    fn describe(&self, id: &str) -> Instance {
        self.moto
            .block_on(self.moto.client().describe_instance(REGION, id))
            .unwrap_or_else(|e| panic!("describe {id}: {e}"))
            .unwrap_or_else(|| panic!("moto does not know {id}"))
    }
}

/// The emulator's view of a moto instance: pendingTime = LaunchTime.
fn imds_instance(i: &Instance) -> ImdsInstance {
    ImdsInstance {
        instance_id: i.instance_id.clone(),
        reservation_id: i.reservation_id.clone(),
        instance_type: i.instance_type.clone(),
        local_hostname: i.private_dns.clone(),
        public_hostname: i.public_dns.clone(),
        local_ipv4: private_ip(i),
        public_ipv4: i.public_ip.map(|a| a.to_string()).unwrap_or_default(),
        ami_id: i.image_id.clone(),
        region: REGION.into(),
        availability_zone: format!("{REGION}a"),
        account_id: i.owner_id.clone(),
        pending_time: humantime::format_rfc3339_seconds(i.launch_time).to_string(),
        instance_profile_arn: i.profile_arn.clone().unwrap_or_default(),
        instance_profile_id: "AIPAEXAMPLEPROFILE01".into(),
    }
}

fn private_ip(i: &Instance) -> String {
    i.private_ip
        .map(|a| a.to_string())
        .unwrap_or_else(|| panic!("{} has no private address", i.instance_id))
}

static EMULATORS: AtomicU32 = AtomicU32::new(0);

/// An emulator for `i` signing with the CA in `ca`.
fn emulator(i: &Instance, dir: &Path, ca: &Path) -> Imds {
    let n = EMULATORS.fetch_add(1, Ordering::Relaxed);
    Imds::start_with_ca(&imds_instance(i), &dir.join(format!("emu-{n}")), ca)
}

/// The broker's configuration: plain HTTP on loopback, `[aws]` at moto
/// with `secret` as its secret key, the emulator's CA pinned, one role
/// of both AWS methods whose members are the profiles of `hsm-client`.
fn broker_config(dir: &Path, moto: &Moto, key: (&str, &str), ca: &Path, trusted: bool) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let ak = write_secret(dir, &format!("aws-ak-{n}"), key.0);
    let sk = write_secret(dir, &format!("aws-sk-{n}"), key.1);
    let pin = write_secret(dir, &format!("role-{n}.pin"), USER_PIN);
    let proxies = if trusted { "\"127.0.0.1/32\"" } else { "" };
    format!(
        r#"[server]
listen = "127.0.0.1:0"
header_timeout = "2s"
request_timeout = "20s"
trusted_proxies = [{proxies}]

[store]
kind = "sqlite"
path = "{db}"

[limits]
per_ip = {{ per_minute = 600, burst = 200 }}
per_identity = {{ per_minute = 600, burst = 100 }}

[aws]
region = "{REGION}"
endpoint = "{url}"
access_key_id = "file:{ak}"
secret_access_key = "file:{sk}"
retries = 0
iid_cert_dir = "{ca}"

[roles.{ROLE}]
methods = ["aws-iid", "aws-imds-fields"]
pin = "file:{pin}"
account_ids = ["{ACCOUNT}"]
iam_role_name = "{IAM_ROLE}"
max_instance_age = "10m"
clock_skew = "60s"
"#,
        db = dir.join(format!("replay-{n}.db")).display(),
        url = moto.url(),
        ak = ak.display(),
        sk = sk.display(),
        ca = ca.display(),
        pin = pin.display(),
    )
}

// ---------------------------------------------------------------------
// Requests built from the emulator's values.

/// `aws-iid` evidence as the module gathers it.
fn iid_evidence(emu: &Imds) -> AwsEvidence {
    let document = emu.fetch("dynamic/instance-identity/document");
    AwsEvidence {
        iid_rsa2048: Some(emu.fetch("dynamic/instance-identity/rsa2048")),
        iid_document: Some(b64_std().encode(document.as_bytes())),
        instance_profile_arn: Some(profile_arn(emu)),
        ..Default::default()
    }
}

fn profile_arn(emu: &Imds) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&emu.fetch("meta-data/iam/info")).expect("iam/info");
    info["InstanceProfileArn"]
        .as_str()
        .expect("InstanceProfileArn")
        .to_owned()
}

/// `aws-imds-fields` evidence as the module gathers it.
fn fields_evidence(emu: &Imds) -> AwsEvidence {
    let token = emu.token();
    let get = |p: &str| {
        let (status, body) = emu.get(&format!("meta-data/{p}"), Some(&token));
        match status {
            200 => body,
            404 => String::new(),
            s => panic!("meta-data/{p}: HTTP {s}"),
        }
    };
    AwsEvidence {
        instance_id: Some(get("instance-id")),
        reservation_id: Some(get("reservation-id")),
        instance_type: Some(get("instance-type")),
        local_hostname: Some(get("local-hostname")),
        public_hostname: Some(get("public-hostname")),
        instance_profile_arn: Some(profile_arn(emu)),
        ..Default::default()
    }
}

fn new_nonce() -> Secret {
    let mut raw = [0u8; 32];
    openssl::rand::rand_bytes(&mut raw).expect("random");
    Secret::new(b64_url().encode(raw))
}

/// What the broker answered one request.
#[derive(Debug)]
enum Answer {
    Granted { subject: String, pin: String },
    Refused { kind: String, log: String },
}

/// Sends one sealed request through `proxy` and reads the answer; a
/// refusal carries the broker's log line of the request.
fn ask(proxy: &XffProxy, method: Method, ev: AwsEvidence, nonce: &Secret) -> Answer {
    static N: AtomicU32 = AtomicU32::new(0);
    let rid = format!(
        "aws-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let keys = KeyPair::generate();
    let req = Request {
        v: p11shim_proto::VERSION,
        request_id: rid.clone(),
        role: ROLE.into(),
        method: Some(method),
        aws: Some(ev),
        client_nonce: Some(nonce.clone()),
        response_key: Some(keys.response_key()),
        ..Default::default()
    };
    let r = http()
        .post(format!(
            "{}{}",
            proxy.url(),
            p11shim_proto::CREDENTIALS_PATH
        ))
        .json(&req)
        .send()
        .expect("post through the proxy");
    let status = r.status().as_u16();
    let body = r.text().expect("answer");
    if status == 200 {
        let resp: Response = serde_json::from_str(&body).expect("a response");
        let sealed = resp
            .sealed_credentials
            .as_ref()
            .expect("sealed credentials");
        let aad = p11shim_proto::seal::aad(&rid, ROLE, &resp.subject, &resp.expires_at);
        let plain = keys.open(sealed, &aad).expect("open the credentials");
        let creds: Credentials = serde_json::from_slice(&plain).expect("credentials");
        return Answer::Granted {
            subject: resp.subject,
            pin: creds.pin.expose().to_owned(),
        };
    }
    let problem: serde_json::Value = serde_json::from_str(&body).expect("a problem document");
    Answer::Refused {
        kind: problem["title"].as_str().unwrap_or_default().to_owned(),
        log: log_line(&rid),
    }
}

#[track_caller]
fn granted(a: Answer, instance: &Instance) {
    match a {
        Answer::Granted { subject, pin } => {
            assert_eq!(
                subject,
                format!("aws:{ACCOUNT}:{REGION}:{}", instance.instance_id)
            );
            assert_eq!(pin, USER_PIN);
        }
        Answer::Refused { kind, log } => panic!("refused ({kind}): {log}"),
    }
}

/// Asserts a refusal of `kind` whose logged reason contains `reason`.
#[track_caller]
fn refused(a: Answer, kind: &str, reason: &str) {
    match a {
        Answer::Refused { kind: k, log } => {
            assert_eq!(k, kind, "{log}");
            assert!(log.contains(reason), "'{reason}' not in: {log}");
        }
        Answer::Granted { subject, .. } => panic!("granted {subject}, wanted {kind}: {reason}"),
    }
}

fn start_moto() -> Option<Moto> {
    require_moto().then(Moto::start)
}

// ---------------------------------------------------------------------
// The module, end to end.

/// A token with an RSA key (id 01, label `rsa`); returns its public key
/// (DER) for verification.
fn module_config(env: &TestEnv, url: &str, method: &str, imds: &str) {
    let extra = format!(
        "imds_endpoint = \"{imds}\"\nnonce_file = \"{}\"\nwait_ms = 20000\n",
        env.path().join("nonce").display()
    );
    env.write_config(&format!(
        "[log]\nlevel = \"debug\"\nfile = \"{}\"\n\n[[slot]]\nid = 0\nlabel = \"{TOKEN}\"\npin = \"broker\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN}\"\n\n{}",
        env.path().join("p11shim.log").display(),
        p11shim_tests::softhsm_lib().display(),
        module_broker(url, ROLE, method, &extra)
    ));
}

fn pkcs11_tool_sign(env: &TestEnv, n: u32) -> (PathBuf, PathBuf, std::process::Output) {
    pkcs11_tool_sign_without_pin(env, n)
}

fn decisions(broker: &TestBroker, method: &str, outcome: &str) -> u64 {
    broker.counter(&format!(
        "p11shim_broker_decisions_total{{method=\"{method}\",outcome=\"{outcome}\"}}"
    ))
}

#[test]
fn the_module_signs_with_aws_iid_and_aws_imds_fields_and_no_pin() {
    if !require("pkcs11-tool") || !require("openssl") || !require("java") || !require("javac") {
        return;
    }
    let Some(moto) = start_moto() else { return };
    let _log = log_buffer();
    let aws = Aws::seed(moto);
    let inst = aws.launch("hsm-client-profile");
    let env = TestEnv::new();
    let pubkey = env.token_with_signing_key(TOKEN);
    let ca = env.path().join("imds-ca");
    let emu = emulator(&inst, env.path(), &ca);
    let broker = TestBroker::start(&broker_config(
        env.path(),
        &aws.moto,
        ("testing", "testing"),
        &ca,
        true,
    ));
    let proxy = XffProxy::start(broker.addr(), &private_ip(&inst));

    // aws-iid: pkcs11-tool, then OpenSSL's engine in a second process
    // (re-authentication with the shared nonce).
    module_config(&env, &proxy.url(), "aws-iid", emu.url());
    let (msg, sig, out) = pkcs11_tool_sign(&env, 1);
    assert!(out.status.success(), "{}\n{}", text(&out), env.log());
    openssl_verify(&env, &pubkey, &msg, &sig);
    let cnf = openssl_cnf(&env);
    let engine_sig = env.path().join("engine.sig");
    run_ok(
        openssl(&env, &cnf)
            .args([
                "dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine", "-sign",
            ])
            .arg(format!("pkcs11:token={TOKEN};object=rsa;type=private"))
            .arg("-out")
            .arg(&engine_sig)
            .arg(&msg),
    );
    openssl_verify(&env, &pubkey, &msg, &engine_sig);
    // Java SunPKCS11, an empty keystore password: a third process.
    java_signs_without_pin(&env, 10);
    assert_eq!(decisions(&broker, "aws-iid", "granted"), 1);
    assert!(decisions(&broker, "aws-iid", "reauthenticated") >= 1);

    // aws-imds-fields: its own one-time-use key, a first use of its own.
    module_config(&env, &proxy.url(), "aws-imds-fields", emu.url());
    let (msg, sig, out) = pkcs11_tool_sign(&env, 2);
    assert!(out.status.success(), "{}\n{}", text(&out), env.log());
    openssl_verify(&env, &pubkey, &msg, &sig);
    assert_eq!(decisions(&broker, "aws-imds-fields", "granted"), 1);

    let subject = format!("subject=aws:{ACCOUNT}:{REGION}:{}", inst.instance_id);
    let log = broker_log();
    assert!(log.contains("TEST OVERRIDE"), "{log}");
    assert!(
        log.lines()
            .filter(|l| l.contains("credentials issued") && l.contains(&subject))
            .count()
            >= 3,
        "{log}"
    );
    // The PIN never reaches either log.
    assert!(!log.contains(&format!("\"{USER_PIN}\"")), "{log}");
    assert!(!env.log().contains(&format!("\"{USER_PIN}\"")));
}

#[test]
fn live_checks_refuse_the_wrong_source_state_profile_and_fields() {
    let Some(moto) = start_moto() else { return };
    let _log = log_buffer();
    let aws = Aws::seed(moto);
    let inst = aws.launch("hsm-client-profile");
    let outsider = aws.launch("web-profile");
    let env = TestEnv::new();
    let ca = env.path().join("imds-ca");
    let emu = emulator(&inst, env.path(), &ca);
    let emu_outsider = emulator(&outsider, env.path(), &ca);
    let broker = TestBroker::start(&broker_config(
        env.path(),
        &aws.moto,
        ("testing", "testing"),
        &ca,
        true,
    ));
    let proxy = XffProxy::start(broker.addr(), &private_ip(&inst));
    let nonce = new_nonce();

    // The forwarded address is the instance's: both methods grant.
    granted(
        ask(&proxy, Method::AwsIid, iid_evidence(&emu), &nonce),
        &inst,
    );
    granted(
        ask(&proxy, Method::AwsImdsFields, fields_evidence(&emu), &nonce),
        &inst,
    );

    // A trusted proxy forwarding another address.
    proxy.forward_for("10.99.99.99");
    for (m, ev) in [
        (Method::AwsIid, iid_evidence(&emu)),
        (Method::AwsImdsFields, fields_evidence(&emu)),
    ] {
        refused(
            ask(&proxy, m, ev, &nonce),
            "denied",
            "source 10.99.99.99 is not among its addresses",
        );
    }
    proxy.forward_for(&private_ip(&inst));

    // A proxy the broker does not trust: its X-Forwarded-For is ignored,
    // the source is the proxy's own 127.0.0.1.
    let untrusting = TestBroker::start(&broker_config(
        env.path(),
        &aws.moto,
        ("testing", "testing"),
        &ca,
        false,
    ));
    let untrusted = XffProxy::start(untrusting.addr(), &private_ip(&inst));
    refused(
        ask(&untrusted, Method::AwsIid, iid_evidence(&emu), &nonce),
        "denied",
        "source 127.0.0.1 is not among its addresses",
    );

    // A profile that does not hold the role's IAM role, from the right
    // address; and evidence naming another profile than EC2's.
    let outsider_proxy = XffProxy::start(broker.addr(), &private_ip(&outsider));
    let not_member = format!("profile {} is not in the role", aws.other_profile);
    refused(
        ask(
            &outsider_proxy,
            Method::AwsIid,
            iid_evidence(&emu_outsider),
            &nonce,
        ),
        "denied",
        &not_member,
    );
    refused(
        ask(
            &outsider_proxy,
            Method::AwsImdsFields,
            fields_evidence(&emu_outsider),
            &nonce,
        ),
        "denied",
        &not_member,
    );
    let mut claims_member = fields_evidence(&emu_outsider);
    claims_member.instance_profile_arn = Some(aws.profile.clone());
    refused(
        ask(
            &outsider_proxy,
            Method::AwsImdsFields,
            claims_member,
            &nonce,
        ),
        "denied",
        "is not EC2's",
    );

    // Fields that differ from EC2's.
    emu.control("set instance-type m5.large");
    refused(
        ask(&proxy, Method::AwsImdsFields, fields_evidence(&emu), &nonce),
        "denied",
        &format!("type m5.large is not EC2's {}", inst.instance_type),
    );
    emu.control("reset");
    emu.control("set local-hostname ip-10-1-2-3.ec2.internal");
    refused(
        ask(&proxy, Method::AwsImdsFields, fields_evidence(&emu), &nonce),
        "denied",
        "local hostname ip-10-1-2-3.ec2.internal is not EC2's",
    );
    emu.control("reset");
    emu.control("set reservation-id r-0123456789abcdef0");
    refused(
        ask(&proxy, Method::AwsImdsFields, fields_evidence(&emu), &nonce),
        "denied",
        "reservation r-0123456789abcdef0 is not EC2's",
    );
    emu.control("reset");

    // An instance EC2 does not know.
    let mut unknown = fields_evidence(&emu);
    unknown.instance_id = Some("i-0fedcba9876543210".into());
    refused(
        ask(&proxy, Method::AwsImdsFields, unknown, &nonce),
        "denied",
        "unknown instance i-0fedcba9876543210",
    );
    let mut malformed = fields_evidence(&emu);
    malformed.instance_id = Some("i-123&Action=RunInstances".into());
    refused(
        ask(&proxy, Method::AwsImdsFields, malformed, &nonce),
        "bad_request",
        "aws.instance_id is malformed",
    );

    // Stopped, then terminated: no longer running.
    let (iid_ev, fields_ev) = (iid_evidence(&emu), fields_evidence(&emu));
    aws.moto.stop_instance(&inst.instance_id);
    let stopped = format!("instance {} is stopped, not running", inst.instance_id);
    refused(
        ask(&proxy, Method::AwsIid, iid_ev.clone(), &nonce),
        "denied",
        &stopped,
    );
    refused(
        ask(&proxy, Method::AwsImdsFields, fields_ev.clone(), &nonce),
        "denied",
        &stopped,
    );
    aws.moto.terminate_instance(&inst.instance_id);
    let terminated = format!("instance {} is terminated, not running", inst.instance_id);
    refused(
        ask(&proxy, Method::AwsIid, iid_ev, &nonce),
        "denied",
        &terminated,
    );
    refused(
        ask(&proxy, Method::AwsImdsFields, fields_ev, &nonce),
        "denied",
        &terminated,
    );

    assert!(decisions(&broker, "aws-iid", "denied") >= 4);
    assert!(decisions(&broker, "aws-imds-fields", "denied") >= 8);
    assert_eq!(decisions(&broker, "aws-imds-fields", "bad_request"), 1);
}

#[test]
fn identity_documents_replay_and_the_age_window() {
    let Some(moto) = start_moto() else { return };
    let _log = log_buffer();
    let aws = Aws::seed(moto);
    let early = aws.launch("hsm-client-profile");
    let late = aws.launch("hsm-client-profile");
    let env = TestEnv::new();
    let ca = env.path().join("imds-ca");
    let emu = emulator(&early, env.path(), &ca);
    let emu_late = emulator(&late, env.path(), &ca);
    let broker = TestBroker::start(&broker_config(
        env.path(),
        &aws.moto,
        ("testing", "testing"),
        &ca,
        true,
    ));
    let proxy = XffProxy::start(broker.addr(), &private_ip(&early));
    let nonce = new_nonce();

    // Signed by another key than the pinned one.
    let forger = emulator(&early, env.path(), &env.path().join("forger-ca"));
    refused(
        ask(&proxy, Method::AwsIid, iid_evidence(&forger), &nonce),
        "denied",
        "does not verify with the region's pinned key",
    );
    drop(forger);

    // The plain document differs from the signed content: another
    // instance's signature beside this one's document; and CRLF line ends.
    let own = iid_evidence(&emu);
    let mut mixed = own.clone();
    mixed.iid_rsa2048 = iid_evidence(&emu_late).iid_rsa2048;
    refused(
        ask(&proxy, Method::AwsIid, mixed, &nonce),
        "denied",
        "document differs from the signed content",
    );
    emu.control("crlf");
    refused(
        ask(&proxy, Method::AwsIid, iid_evidence(&emu), &nonce),
        "denied",
        "document differs from the signed content",
    );
    emu.control("reset");

    // Substitution: the emulator serves another (real) instance's document
    // and signature; signed and consistent, but presented from this
    // instance's address.
    let other = env.path().join("late.json");
    imds_instance(&late).write(&other);
    emu.control(&format!("substitute {}", other.display()));
    refused(
        ask(&proxy, Method::AwsIid, iid_evidence(&emu), &nonce),
        "denied",
        &format!("instance {}: source", late.instance_id),
    );
    emu.control("reset");

    // First use, re-authentication with the nonce, replay without it.
    granted(ask(&proxy, Method::AwsIid, own.clone(), &nonce), &early);
    granted(ask(&proxy, Method::AwsIid, own.clone(), &nonce), &early);
    refused(
        ask(&proxy, Method::AwsIid, own.clone(), &new_nonce()),
        "already_used",
        &format!("aws:{ACCOUNT}:{REGION}:{} already used", early.instance_id),
    );
    assert_eq!(decisions(&broker, "aws-iid", "granted"), 1);
    assert_eq!(decisions(&broker, "aws-iid", "reauthenticated"), 1);

    // Twenty minutes later (max_instance_age 10m + skew 60s): the early
    // instance still re-authenticates with its nonce, the late one never
    // made its first use and is refused one, by either method.
    broker.clock.advance(Duration::from_secs(20 * 60));
    granted(ask(&proxy, Method::AwsIid, own, &nonce), &early);
    let late_proxy = XffProxy::start(broker.addr(), &private_ip(&late));
    let too_old = "first use refused: instance older than max_instance_age";
    refused(
        ask(
            &late_proxy,
            Method::AwsIid,
            iid_evidence(&emu_late),
            &new_nonce(),
        ),
        "denied",
        too_old,
    );
    refused(
        ask(
            &late_proxy,
            Method::AwsImdsFields,
            fields_evidence(&emu_late),
            &new_nonce(),
        ),
        "denied",
        too_old,
    );
    assert_eq!(decisions(&broker, "aws-iid", "reauthenticated"), 2);
}

#[test]
fn a_broker_that_cannot_ask_aws_answers_unavailable_never_denied() {
    if !require_moto() {
        return;
    }
    let _log = log_buffer();
    // moto checking signatures: the warm-up and the admin's bootstrap are
    // the free calls.
    let mut moto = Moto::start_with_auth(4);
    let admin = moto.bootstrap_admin();
    let aws = Aws::seed(moto);
    let inst = aws.launch("hsm-client-profile");
    let env = TestEnv::new();
    let ca = env.path().join("imds-ca");
    let emu = emulator(&inst, env.path(), &ca);
    let nonce = new_nonce();

    let wrong = TestBroker::start(&broker_config(
        env.path(),
        &aws.moto,
        (&admin.id, "not-the-secret-key"),
        &ca,
        true,
    ));
    let proxy = XffProxy::start(wrong.addr(), &private_ip(&inst));
    for (m, ev) in [
        (Method::AwsIid, iid_evidence(&emu)),
        (Method::AwsImdsFields, fields_evidence(&emu)),
    ] {
        refused(ask(&proxy, m, ev, &nonce), "unavailable", "AWS");
    }
    assert_eq!(decisions(&wrong, "aws-iid", "unavailable"), 1);
    assert_eq!(decisions(&wrong, "aws-imds-fields", "unavailable"), 1);
    assert_eq!(decisions(&wrong, "aws-iid", "denied"), 0);

    // The same broker with the right secret grants: the refusal above was
    // the secret, not the setup.
    let right = TestBroker::start(&broker_config(
        env.path(),
        &aws.moto,
        (&admin.id, &admin.secret),
        &ca,
        true,
    ));
    let proxy = XffProxy::start(right.addr(), &private_ip(&inst));
    granted(
        ask(&proxy, Method::AwsIid, iid_evidence(&emu), &nonce),
        &inst,
    );
}
