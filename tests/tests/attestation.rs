//! Credentials by attestation, end to end: `p11shim-broker` (in this
//! process, SQLite store) grants a `static-fingerprint` role, and real
//! clients sign through p11shim with no PIN anywhere in their
//! configuration. Also: one-time use across processes, the nonce file,
//! expiry refresh and PIN rotation while a client keeps signing, a broker
//! that comes up late, and one that never does.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use p11shim_tests::peers::broker::{
    TestBroker, broker_toml, fingerprint_role, module_broker, write_secret,
};
use p11shim_tests::{TestEnv, USER_PIN, p11shim_lib, require, run_ok, softhsm_lib, status_json};

mod common;
use common::{
    java_signs_without_pin, openssl, openssl_cnf, openssl_verify, pkcs11_tool_sign_without_pin,
    text,
};

const TOKEN: &str = "att";
const ROLE: &str = "signer";

/// A token holding an RSA key pair (id 01, label `rsa`) with a self-signed
/// certificate, a broker granting its PIN to this machine, and p11shim's
/// configuration with `pin = "broker"`.
struct Setup {
    env: TestEnv,
    broker: TestBroker,
    pin_file: PathBuf,
    pubkey: PathBuf,
}

fn setup(role_extra: &str, module_extra: &str) -> Setup {
    let env = TestEnv::new();
    let pubkey = env.token_with_signing_key(TOKEN);
    let pin_file = write_secret(env.path(), "role.pin", USER_PIN);
    let broker = TestBroker::start(&broker_toml(
        env.path(),
        &fingerprint_role(ROLE, &pin_file, role_extra),
    ));
    write_module_config(&env, &broker.url(), module_extra);
    Setup {
        env,
        broker,
        pin_file,
        pubkey,
    }
}

fn write_module_config(env: &TestEnv, url: &str, module_extra: &str) {
    env.write_config(&format!(
        "[log]\nlevel = \"debug\"\nfile = \"{}\"\n\n[[slot]]\nid = 0\nlabel = \"{TOKEN}\"\npin = \"broker\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN}\"\n\n{}",
        env.path().join("p11shim.log").display(),
        softhsm_lib().display(),
        module_broker(url, ROLE, "static-fingerprint", module_extra)
    ));
}

fn nonce_file(env: &TestEnv) -> String {
    format!("nonce_file = \"{}\"\n", env.path().join("nonce").display())
}

/// pkcs11-tool signs with the token key, logging in with no PIN.
fn pkcs11_tool_sign(env: &TestEnv, n: u32) -> std::process::Output {
    pkcs11_tool_sign_without_pin(env, n).2
}

fn assert_no_pin_in_logs(s: &Setup) {
    let log = s.env.log();
    assert!(!log.is_empty());
    // USER_PIN is short; look for it as a whole token of the log.
    for needle in [
        format!("\"{USER_PIN}\""),
        format!("={USER_PIN}"),
        format!(" {USER_PIN} "),
    ] {
        assert!(!log.contains(&needle), "the PIN appears in the module log");
    }
}

#[test]
fn pkcs11_tool_java_and_openssl_sign_with_no_pin_configured() {
    if !require("pkcs11-tool") || !require("openssl") || !require("java") || !require("javac") {
        return;
    }
    let s = setup("", "");
    // Every process on the machine shares the nonce through the file.
    write_module_config(&s.env, &s.broker.url(), &nonce_file(&s.env));

    // The virtual token has a protected authentication path.
    let out = text(&run_ok(
        s.env
            .command("pkcs11-tool")
            .arg("--module")
            .arg(p11shim_lib())
            .arg("--list-token-slots"),
    ));
    assert!(out.contains("PIN pad present"), "{out}");

    // pkcs11-tool: no --pin.
    let out = pkcs11_tool_sign(&s.env, 1);
    assert!(out.status.success(), "{}", text(&out));
    let msg = s.env.path().join("msg1.txt");
    let raw = s.env.path().join("msg1.sig");
    openssl_verify(&s.env, &s.pubkey, &msg, &raw);

    // OpenSSL's pkcs11 engine: a key URI without pin-value.
    let cnf = openssl_cnf(&s.env);
    let sig = s.env.path().join("engine.sig");
    run_ok(
        openssl(&s.env, &cnf)
            .args([
                "dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine", "-sign",
            ])
            .arg(format!("pkcs11:token={TOKEN};object=rsa;type=private"))
            .arg("-out")
            .arg(&sig)
            .arg(&msg),
    );
    openssl_verify(&s.env, &s.pubkey, &msg, &sig);

    // Java SunPKCS11: an empty keystore password; 20 signatures.
    java_signs_without_pin(&s.env, 20);

    // Three processes, each a first use or a nonce re-authentication.
    assert_eq!(
        s.broker.counter(
            "p11shim_broker_decisions_total{method=\"static-fingerprint\",outcome=\"granted\"}"
        ),
        1
    );
    assert!(s.broker.counter("p11shim_broker_decisions_total{method=\"static-fingerprint\",outcome=\"reauthenticated\"}") >= 2);
    assert_no_pin_in_logs(&s);
}

#[test]
fn a_second_process_without_the_nonce_is_refused_as_already_used() {
    if !require("pkcs11-tool") {
        return;
    }
    let s = setup("", "wait_ms = 5000\n");
    let out = pkcs11_tool_sign(&s.env, 1);
    assert!(out.status.success(), "{}", text(&out));
    // A new process has a new nonce: the identity was used, the login fails
    // with p11shim's PIN-source code, and the broker raises its alarm.
    let out = pkcs11_tool_sign(&s.env, 2);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("0xd0530003") || text(&out).contains("0xD0530003"),
        "{}",
        text(&out)
    );
    assert_eq!(
        s.broker.counter(
            "p11shim_broker_decisions_total{method=\"static-fingerprint\",outcome=\"already_used\"}"
        ),
        1
    );
    assert!(s.env.log().contains("already used"), "{}", s.env.log());
}

#[test]
fn reauth_never_serves_an_identity_once_even_with_the_nonce() {
    if !require("pkcs11-tool") {
        return;
    }
    let s = setup("reauth = \"never\"\n", "wait_ms = 5000\n");
    write_module_config(
        &s.env,
        &s.broker.url(),
        &format!("wait_ms = 5000\n{}", nonce_file(&s.env)),
    );
    assert!(pkcs11_tool_sign(&s.env, 1).status.success());
    let out = pkcs11_tool_sign(&s.env, 2);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        s.broker.counter(
            "p11shim_broker_decisions_total{method=\"static-fingerprint\",outcome=\"already_used\"}"
        ),
        1
    );
}

fn open(env: &TestEnv) -> Pkcs11 {
    env.apply();
    let p11 = Pkcs11::new(p11shim_lib()).expect("load p11shim");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    p11
}

fn sign_once(session: &cryptoki::session::Session, key: cryptoki::object::ObjectHandle) {
    let sig = session
        .sign(&Mechanism::Sha256RsaPkcs, key, b"payload")
        .expect("C_Sign");
    assert_eq!(sig.len(), 256);
}

/// The credentials expire every 5 s; the module re-authenticates with its
/// nonce before that, while a client signs without a pause. Then the PIN
/// is rotated (token and broker): a fresh login is refused by the token
/// with the old PIN, and p11shim asks the broker again and gets the new one.
#[test]
fn expiry_refresh_and_pin_rotation_while_signing() {
    let s = setup("ttl = \"5s\"\n", "");
    let p11 = open(&s.env);
    let slot = p11.get_slots_with_token().expect("slots")[0];
    let session = p11.open_rw_session(slot).expect("open");
    session
        .login(UserType::User, None)
        .expect("C_Login with no PIN");
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(vec![1]),
        ])
        .expect("find")[0];
    let until = Instant::now() + Duration::from_secs(12);
    let mut signed = 0u32;
    while Instant::now() < until && signed < 100_000 {
        sign_once(&session, key);
        signed += 1;
    }
    let status = status_json(&p11shim_lib());
    let reauth = s.broker.counter(
        "p11shim_broker_decisions_total{method=\"static-fingerprint\",outcome=\"reauthenticated\"}",
    );
    assert!(
        reauth >= 2,
        "{reauth} re-authentications in 12 s with a 5 s lifetime; status {status}"
    );

    // Rotation: the token's PIN changes, then the broker's.
    session
        .set_pin(&AuthPin::new(USER_PIN.into()), &AuthPin::new("4321".into()))
        .expect("C_SetPIN");
    write_secret(s.pin_file.parent().unwrap(), "role.pin", "4321");
    session.logout().expect("C_Logout");
    session
        .login(UserType::User, None)
        .unwrap_or_else(|e| panic!("C_Login after the rotation: {e:?}\n{}", s.env.log()));
    // Handles of private objects do not outlive a logout.
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(vec![1]),
        ])
        .expect("find")[0];
    sign_once(&session, key);
    assert!(
        s.env.log().contains("refused the brokered PIN"),
        "{}",
        s.env.log()
    );
    drop(session);
    p11.finalize().expect("C_Finalize");
}

/// The broker is not up when the application initializes; C_Login waits
/// for it (within `wait_ms`) and succeeds once it answers.
#[test]
fn broker_down_at_start_then_up() {
    let s = setup("", "wait_ms = 20000\n");
    // Reserve a port, point the module at it, and start the broker there
    // only after C_Initialize.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut broker = s.broker;
    broker.stop();
    write_module_config(
        &s.env,
        &format!("http://127.0.0.1:{port}"),
        "wait_ms = 20000\n",
    );
    let p11 = open(&s.env);
    let toml = broker
        .toml
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        TestBroker::start(&toml)
    });
    let slot = p11.get_slots_with_token().expect("slots")[0];
    let session = p11.open_ro_session(slot).expect("open");
    session
        .login(UserType::User, None)
        .expect("C_Login once the broker is up");
    let broker = starter.join().unwrap();
    assert_eq!(
        broker.counter(
            "p11shim_broker_decisions_total{method=\"static-fingerprint\",outcome=\"granted\"}"
        ),
        1
    );
    assert!(
        s.env.log().contains("no credentials from the broker"),
        "{}",
        s.env.log()
    );
    drop(session);
    p11.finalize().expect("C_Finalize");
}

/// A broker that never answers: C_Login fails with p11shim's PIN-source
/// code after `wait_ms`, and the status names the last error.
#[test]
fn broker_never_up_fails_login_clearly() {
    let s = setup("", "");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    write_module_config(
        &s.env,
        &format!("http://127.0.0.1:{port}"),
        "wait_ms = 1500\nrequest_timeout_ms = 500\n",
    );
    let p11 = open(&s.env);
    let slot = p11.get_slots_with_token().expect("slots")[0];
    let session = p11.open_ro_session(slot).expect("open");
    let e = session.login(UserType::User, None).expect_err("no broker");
    assert!(
        format!("{e:?}").contains("3494051843")
            || format!("{e}").to_lowercase().contains("d0530003"),
        "{e:?}"
    );
    let status = status_json(&p11shim_lib());
    assert!(status.contains("\"state\":\"pending\""), "{status}");
    assert!(status.contains("cannot connect"), "{status}");
    drop(session);
    p11.finalize().expect("C_Finalize");
}
