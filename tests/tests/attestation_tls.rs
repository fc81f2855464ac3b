//! The broker over real TLS, end to end: `p11shim-broker` serves HTTPS with
//! a server certificate from a test CA made here with the openssl CLI, and
//! the module (`[broker] url = "https://…"`, `ca` = that CA) obtains the PIN
//! so that pkcs11-tool signs with none. Then the refusals: a module trusting
//! another CA cannot log in (0xD0530003, `last_error` naming the TLS
//! failure), a module configured with plain http to a non-loopback broker
//! does not initialize, and a broker whose TLS key file is missing does not
//! start.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::UserType;
use p11shim_tests::peers::broker::{
    TestBroker, broker_bin, broker_toml, fingerprint_role, module_broker, write_secret,
};
use p11shim_tests::{TestEnv, USER_PIN, p11shim_lib, require, run_ok, softhsm_lib, status_json};

mod common;
use common::{openssl_verify, pkcs11_tool_sign_without_pin, text};

const TOKEN: &str = "tls";
const ROLE: &str = "signer";

/// A CA (`<name>.pem`, `<name>.key`) in `dir`: self-signed EC P-256,
/// `CA:TRUE`, allowed to sign certificates.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let pem = dir.join(format!("{name}.pem"));
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
            ])
            .arg(format!("/CN=p11shim test {name}"))
            .args([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
            ])
            .arg(dir.join(format!("{name}.key")))
            .arg("-out")
            .arg(&pem),
    );
    pem
}

/// A server certificate for `127.0.0.1` and `localhost` signed by the CA
/// `ca` (made by [`make_ca`]); returns the certificate and key paths.
fn make_server_cert(dir: &Path, ca: &str) -> (PathBuf, PathBuf) {
    let key = dir.join("server.key");
    let csr = dir.join("server.csr");
    let cert = dir.join("server.pem");
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&csr),
    );
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature\n\
         extendedKeyUsage = serverAuth\n\
         subjectAltName = IP:127.0.0.1, DNS:localhost\n",
    )
    .expect("write the extensions");
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(dir.join(format!("{ca}.pem")))
            .arg("-CAkey")
            .arg(dir.join(format!("{ca}.key")))
            .args(["-set_serial", "2", "-extfile"])
            .arg(&ext)
            .arg("-out")
            .arg(&cert),
    );
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod the server key");
    (cert, key)
}

/// `broker_toml` with the server's certificate and key in `[server]`.
fn tls_broker_toml(dir: &Path, cert: &Path, key: &Path, roles: &str) -> String {
    broker_toml(dir, roles).replacen(
        "[server]\n",
        &format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        1,
    )
}

/// A token with an RSA key pair (id 01), a broker over HTTPS granting its
/// PIN to this machine, and the CA its certificate chains to.
struct Setup {
    env: TestEnv,
    broker: TestBroker,
    ca: PathBuf,
    pubkey: PathBuf,
}

fn setup() -> Setup {
    let env = TestEnv::new();
    env.init_token(TOKEN);
    let pem = env.rsa_pem();
    env.import_key(TOKEN, &pem, "rsa", "01");
    let pubkey = env.path().join("rsa.pub.der");
    run_ok(
        Command::new("openssl")
            .args(["pkey", "-in"])
            .arg(&pem)
            .args(["-pubout", "-outform", "DER", "-out"])
            .arg(&pubkey),
    );
    let ca = make_ca(env.path(), "ca");
    let (cert, key) = make_server_cert(env.path(), "ca");
    let pin_file = write_secret(env.path(), "role.pin", USER_PIN);
    let broker = TestBroker::start(&tls_broker_toml(
        env.path(),
        &cert,
        &key,
        &fingerprint_role(ROLE, &pin_file, ""),
    ));
    assert!(broker.url().starts_with("https://"), "{}", broker.url());
    Setup {
        env,
        broker,
        ca,
        pubkey,
    }
}

/// The module's configuration: one slot with `pin = "broker"`, the
/// broker at `url`, trusting `ca`.
fn write_module_config(env: &TestEnv, url: &str, ca: &Path, extra: &str) {
    let broker = module_broker(
        url,
        ROLE,
        "static-fingerprint",
        &format!("ca = \"{}\"\n{extra}", ca.display()),
    );
    env.write_config(&format!(
        "[log]\nlevel = \"debug\"\nfile = \"{}\"\n\n[[slot]]\nid = 0\nlabel = \"{TOKEN}\"\npin = \"broker\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN}\"\n\n{broker}",
        env.path().join("p11shim.log").display(),
        softhsm_lib().display(),
    ));
}

fn pkcs11_tool_sign(env: &TestEnv, n: u32) -> std::process::Output {
    pkcs11_tool_sign_without_pin(env, n).2
}

/// A decision counter of the broker's `/metrics`, fetched over HTTPS
/// trusting the test CA `ca`.
fn decisions(b: &TestBroker, ca: &Path, outcome: &str) -> u64 {
    let pem = std::fs::read(ca).expect("read the CA");
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA certificate"))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let text = client
        .get(format!("{}/metrics", b.url()))
        .send()
        .expect("metrics over HTTPS")
        .text()
        .expect("metrics text");
    let prefix = format!(
        "p11shim_broker_decisions_total{{method=\"static-fingerprint\",outcome=\"{outcome}\"}}"
    );
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// pkcs11-tool signs through p11shim with no PIN, the PIN coming from the
/// broker over HTTPS: first at `https://127.0.0.1:<port>` (the certificate's
/// IP SAN), then from a second process at `https://localhost:<port>` (its
/// DNS SAN), which re-authenticates with the shared nonce.
#[test]
fn pkcs11_tool_signs_with_the_pin_from_an_https_broker() {
    if !require("pkcs11-tool") || !require("openssl") {
        return;
    }
    let s = setup();
    let nonce = format!(
        "nonce_file = \"{}\"\n",
        s.env.path().join("nonce").display()
    );
    write_module_config(&s.env, &s.broker.url(), &s.ca, &nonce);
    let out = pkcs11_tool_sign(&s.env, 1);
    assert!(out.status.success(), "{}\n{}", text(&out), s.env.log());
    openssl_verify(
        &s.env,
        &s.pubkey,
        &s.env.path().join("msg1.txt"),
        &s.env.path().join("msg1.sig"),
    );

    let by_name = format!("https://localhost:{}", s.broker.addr().port());
    write_module_config(&s.env, &by_name, &s.ca, &nonce);
    let out = pkcs11_tool_sign(&s.env, 2);
    assert!(out.status.success(), "{}\n{}", text(&out), s.env.log());
    openssl_verify(
        &s.env,
        &s.pubkey,
        &s.env.path().join("msg2.txt"),
        &s.env.path().join("msg2.sig"),
    );

    assert_eq!(decisions(&s.broker, &s.ca, "granted"), 1);
    assert_eq!(decisions(&s.broker, &s.ca, "reauthenticated"), 1);
    let log = s.env.log();
    assert!(
        log.contains("credentials obtained from the broker"),
        "{log}"
    );
    assert!(
        !log.contains(&format!("\"{USER_PIN}\"")),
        "the PIN is in the log"
    );
}

/// A module whose `ca` is another CA refuses the broker's certificate: the
/// login fails with CKR_P11SHIM_PIN_SOURCE_UNAVAILABLE, the status's
/// `last_error` names the certificate failure, and the broker decided
/// nothing.
#[test]
fn a_module_trusting_another_ca_cannot_log_in() {
    if !require("openssl") {
        return;
    }
    let s = setup();
    let other = make_ca(s.env.path(), "other-ca");
    write_module_config(
        &s.env,
        &s.broker.url(),
        &other,
        "wait_ms = 3000\nrequest_timeout_ms = 2000\n",
    );
    s.env.apply();
    let p11 = Pkcs11::new(p11shim_lib()).expect("load p11shim");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = p11.get_slots_with_token().expect("slots")[0];
    let session = p11.open_ro_session(slot).expect("C_OpenSession");
    let e = session
        .login(UserType::User, None)
        .expect_err("the broker's certificate is not trusted");
    assert!(
        matches!(
            e,
            cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::VendorDefined(0xD053_0003), _)
        ),
        "not CKR_P11SHIM_PIN_SOURCE_UNAVAILABLE: {e:?}"
    );
    let status = status_json(&p11shim_lib());
    let v: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let last_error = find_key(&v, "last_error")
        .and_then(|l| l.as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no last_error in the status: {status}"));
    let lower = last_error.to_lowercase();
    assert!(
        lower.contains("certificate") && lower.contains("issuer"),
        "last_error does not name the TLS failure: {last_error}"
    );
    assert!(!status.contains("\"state\":\"ready\""), "{status}");
    assert_eq!(decisions(&s.broker, &s.ca, "granted"), 0);
    drop(session);
    p11.finalize().expect("C_Finalize");
}

/// The first value under `key` anywhere in a JSON document.
fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

/// `http://` to an address that is not loopback is refused by the module's
/// configuration: C_Initialize fails with CKR_P11SHIM_CONFIG_INVALID and
/// says why; an `https://` broker without `ca` is refused too.
#[test]
fn plain_http_to_a_remote_broker_is_refused_by_the_module_config() {
    if !require("pkcs11-tool") {
        return;
    }
    let env = TestEnv::new();
    env.init_token(TOKEN);
    for (url, want) in [
        (
            "http://192.0.2.10:8080",
            "plain http is accepted for a loopback broker only",
        ),
        (
            "http://broker.example:8080",
            "plain http is accepted for a loopback broker only",
        ),
        ("https://192.0.2.10:8443", "an https broker needs `ca`"),
    ] {
        env.write_config(&format!(
            "[[slot]]\nid = 0\nlabel = \"{TOKEN}\"\npin = \"broker\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN}\"\n\n{}",
            softhsm_lib().display(),
            module_broker(url, ROLE, "static-fingerprint", "")
        ));
        let out = env
            .command("pkcs11-tool")
            .arg("--module")
            .arg(p11shim_lib())
            .arg("--list-slots")
            .output()
            .expect("pkcs11-tool");
        let all = text(&out);
        assert!(!out.status.success(), "{url}: {all}");
        assert!(
            all.to_lowercase().contains("0xd0530001"),
            "{url}: not CKR_P11SHIM_CONFIG_INVALID: {all}"
        );
        assert!(all.contains(want), "{url}: {all}");
        assert!(
            all.contains("broker.url") || all.contains("broker.ca"),
            "{all}"
        );
    }
    // The same file with a loopback http URL initializes.
    env.write_config(&format!(
        "[[slot]]\nid = 0\nlabel = \"{TOKEN}\"\npin = \"broker\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN}\"\n\n{}",
        softhsm_lib().display(),
        module_broker("http://127.0.0.1:9", ROLE, "static-fingerprint", "")
    ));
    run_ok(
        env.command("pkcs11-tool")
            .arg("--module")
            .arg(p11shim_lib())
            .arg("--list-slots"),
    );
}

/// The broker binary given a TLS configuration whose key file is missing
/// exits at start with an error naming the TLS key, and serves nothing.
#[test]
fn the_broker_refuses_a_missing_tls_key_at_start() {
    if !require("openssl") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    make_ca(dir.path(), "ca");
    let (cert, key) = make_server_cert(dir.path(), "ca");
    std::fs::remove_file(&key).expect("remove the key");
    let pin = write_secret(dir.path(), "role.pin", USER_PIN);
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        tls_broker_toml(dir.path(), &cert, &key, &fingerprint_role(ROLE, &pin, "")),
    )
    .expect("write the configuration");
    let log = dir.path().join("broker.log");
    let mut child = Command::new(broker_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn p11shim-broker");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "p11shim-broker still runs 30 s after start with a missing TLS key: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().expect("stdout"), &mut stdout)
        .expect("read stdout");
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "exited with {status}: {stderr}");
    assert!(
        !stdout.contains("listening"),
        "it said it listens: {stdout}"
    );
    assert!(
        stderr.contains("TLS") && stderr.contains(&key.display().to_string()),
        "the error does not name the TLS key file: {stderr}"
    );
}
