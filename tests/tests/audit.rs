//! The audit log of the module: what a session of a real application
//! leaves in it (logins, key use, key management, denials, failovers,
//! recoveries, broker exchanges), that it verifies with the checkpoint key,
//! that no PIN, key value or signed data reaches it or the diagnostic log,
//! and what fail-closed and fail-open do when the log cannot be written.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use p11shim_audit::{VerifyKey, verify};
use p11shim_tests::{TestEnv, p11shim_lib, run_ok, softhsm_lib};

mod common;
use serde_json::Value;

const TOKEN: &str = "audited";
/// A PIN and data that must never appear in any log.
const PIN: &str = "Pq7-never-logged-91";
const SO: &str = "So8-never-logged-22";
const DATA: &[u8] = b"confidential payload 5f3a9c to be signed";
const KEY_VALUE: [u8; 32] = *b"AES-VALUE-that-must-not-leak-01!";

/// CKR_P11SHIM_AUDIT_UNAVAILABLE (include/p11shim.h).
const AUDIT_UNAVAILABLE: u64 = 0x8000_0000 | 0x5053_0006;

fn ed25519_key(env: &TestEnv) -> (PathBuf, PathBuf) {
    let key = env.path().join("audit-ed25519.pem");
    let public = env.path().join("audit-ed25519.pub.pem");
    run_ok(
        std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&key),
    );
    run_ok(
        std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (key, public)
}

/// A token with an RSA signing key `tls-web` (id 01), a config with the
/// `web` role's ACL and `audit` (appended to `[audit]`).
fn setup(audit: &str) -> TestEnv {
    setup_with(|_| audit.to_string())
}

/// [`setup`] with an `[audit]` section that may name files of the test.
fn setup_with(audit: impl FnOnce(&TestEnv) -> String) -> TestEnv {
    let env = TestEnv::new();
    let audit = audit(&env);
    env.init_token_with(TOKEN, SO, PIN);
    let pem = env.rsa_pem();
    let out = std::process::Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", env.softhsm_conf())
        .arg("--import")
        .arg(&pem)
        .args([
            "--token", TOKEN, "--label", "tls-web", "--id", "01", "--pin", PIN,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.write_config(&format!(
        "[log]\nlevel = \"trace\"\nfile = \"{}\"\n\n[[slot]]\nid = 0\nlabel = \"p11shim\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN}\"\n\n\
         [acl]\nrole = \"web\"\n[acl.roles.web]\nkeys = [{{ label = \"tls-*\", ops = [\"sign\"] }}, {{ label = \"tmp-*\", ops = [\"generate\", \"create\", \"destroy\", \"encrypt\"] }}]\n\n\
         [audit]\n{audit}\n",
        env.path().join("p11shim.log").display(),
        softhsm_lib().display(),
    ));
    env.apply();
    env
}

fn module() -> (Pkcs11, Session) {
    let p11 = Pkcs11::new(p11shim_lib()).expect("load p11shim");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = p11.get_slots_with_token().unwrap()[0];
    let s = p11.open_rw_session(slot).unwrap();
    (p11, s)
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn find<'a>(rs: &'a [Value], kind: &str, function: &str) -> Vec<&'a Value> {
    rs.iter()
        .filter(|r| r["kind"] == kind && r["function"] == function)
        .collect()
}

#[track_caller]
fn fails<T: std::fmt::Debug>(r: Result<T, CkError>, rv: RvError) {
    match r {
        Err(CkError::Pkcs11(got, _)) if got == rv => {}
        other => panic!("expected {rv:?}, got {other:?}"),
    }
}

fn rsa_key(s: &Session) -> ObjectHandle {
    s.find_objects(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Label(b"tls-web".to_vec()),
    ])
    .unwrap()[0]
}

#[test]
fn a_session_leaves_signed_records_that_name_role_key_and_result() {
    let mut public = PathBuf::new();
    let env = setup_with(|env| {
        let (key, public_key) = ed25519_key(env);
        public = public_key;
        format!(
            "file = \"{}\"\nfsync = \"always\"\nsigning_key = \"file:{}\"\ndata_hash = true\n",
            env.path().join("audit.jsonl").display(),
            key.display()
        )
    });
    let log = env.path().join("audit.jsonl");
    let (p11, s) = module();
    s.login(UserType::User, Some(&AuthPin::new(PIN.into())))
        .unwrap();
    let k = rsa_key(&s);
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, k, DATA).expect("sign");
    assert_eq!(sig.len(), 256);
    fails(
        s.decrypt(&Mechanism::RsaPkcs, k, &sig),
        RvError::KeyFunctionNotPermitted,
    );
    fails(
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Label(b"other".to_vec()),
                Attribute::ValueLen(32.into()),
            ],
        ),
        RvError::TemplateInconsistent,
    );
    let tmp = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(b"tmp-aes".to_vec()),
            Attribute::Value(KEY_VALUE.to_vec()),
            Attribute::Encrypt(true),
            Attribute::Token(false),
        ])
        .expect("create");
    let ct = s
        .encrypt(&Mechanism::AesEcb, tmp, &DATA[..32])
        .expect("encrypt");
    assert_eq!(ct.len(), 32);
    s.destroy_object(tmp).expect("destroy");
    s.logout().unwrap();
    drop(s);
    p11.finalize().expect("C_Finalize");

    let rs = records(&log);
    // The chain starts, and ends with the stop checkpoint.
    assert_eq!(rs.first().unwrap()["kind"], "start");
    assert_eq!(rs.last().unwrap()["kind"], "stop");

    let login = find(&rs, "login", "C_Login");
    assert_eq!(login.len(), 1, "{rs:#?}");
    assert_eq!(login[0]["result"], "CKR_OK");
    assert_eq!(login[0]["role"], "web");
    assert_eq!(login[0]["detail"], "user=user pin_source=application");

    let sign = find(&rs, "key_use", "C_Sign");
    assert_eq!(sign.len(), 1, "{rs:#?}");
    let sign = sign[0];
    assert_eq!(sign["result"], "CKR_OK");
    assert_eq!(sign["mechanism"], "CKM_SHA256_RSA_PKCS");
    assert_eq!(sign["key"]["label"], "tls-web");
    assert_eq!(sign["key"]["id"], "01");
    assert_eq!(sign["key"]["class"], "CKO_PRIVATE_KEY");
    assert_eq!(sign["key"]["fp"].as_str().map(str::len), Some(32));
    assert_eq!(sign["slot"], 0);
    assert_eq!(sign["member"], "p11shim#0");
    assert!(sign["latency_us"].is_u64());
    // data_hash = true: the SHA-256 of the data, never the data.
    let digest = {
        use sha2::Digest;
        hex(&sha2::Sha256::digest(DATA))
    };
    assert_eq!(sign["data_sha256"], digest.as_str());

    let denied = find(&rs, "denial", "C_DecryptInit");
    assert_eq!(denied.len(), 1, "{rs:#?}");
    assert_eq!(denied[0]["result"], "CKR_KEY_FUNCTION_NOT_PERMITTED");
    assert_eq!(denied[0]["key"]["label"], "tls-web");
    assert_eq!(denied[0]["detail"], "no rule grants decrypt");
    let denied = find(&rs, "denial", "C_GenerateKey");
    assert_eq!(denied[0]["result"], "CKR_TEMPLATE_INCONSISTENT");

    let created = find(&rs, "key_management", "C_CreateObject");
    assert_eq!(created[0]["key"]["label"], "tmp-aes");
    assert_eq!(
        find(&rs, "key_use", "C_Encrypt")[0]["mechanism"],
        "CKM_AES_ECB"
    );
    assert_eq!(
        find(&rs, "key_management", "C_DestroyObject")[0]["result"],
        "CKR_OK"
    );
    assert_eq!(find(&rs, "logout", "C_Logout")[0]["result"], "CKR_OK");

    // The chain verifies with the public key, and not with another.
    let pem = std::fs::read_to_string(&public).unwrap();
    let report = verify(
        std::slice::from_ref(&log),
        &VerifyKey::from_public_pem(&pem).unwrap(),
    )
    .unwrap();
    assert!(report.broken.is_none(), "{report:?}");
    let other = TestEnv::new();
    let (_, other_pub) = ed25519_key(&other);
    let pem = std::fs::read_to_string(&other_pub).unwrap();
    let report = verify(
        std::slice::from_ref(&log),
        &VerifyKey::from_public_pem(&pem).unwrap(),
    )
    .unwrap();
    assert!(
        report.broken.is_some(),
        "a wrong key must not verify: {report:?}"
    );

    no_secrets(&env, &log);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Neither the audit log nor the diagnostic log (at trace level) holds the
/// PINs, the key value or the signed data, in any common encoding.
fn no_secrets(env: &TestEnv, audit: &Path) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let logs = [
        std::fs::read(audit).unwrap(),
        std::fs::read(env.path().join("p11shim.log")).unwrap(),
    ];
    assert!(logs[1].len() > 1000, "the trace log was written");
    for secret in [PIN.as_bytes(), SO.as_bytes(), DATA, &KEY_VALUE[..]] {
        for needle in [
            secret.to_vec(),
            hex(secret).into_bytes(),
            b64.encode(secret).into_bytes(),
        ] {
            for log in &logs {
                assert!(
                    !log.windows(needle.len()).any(|w| w == needle.as_slice()),
                    "a secret reached a log"
                );
            }
        }
    }
}

#[test]
fn fail_closed_refuses_security_relevant_calls_while_the_sink_fails() {
    // /dev/full: every write fails with ENOSPC.
    let _env = setup("file = \"/dev/full\"\non_failure = \"fail-closed\"\nfsync = \"never\"\n");
    let (p11, s) = module();
    // The writer finds the sink failing with its first write (the start
    // record); a bounded wait for that.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match s.login(UserType::User, Some(&AuthPin::new(PIN.into()))) {
            Err(CkError::Pkcs11(RvError::VendorDefined(rv), _)) => break rv,
            // The sink may fail between the login and the logout: then the
            // logout is the call refused.
            Ok(()) => match s.logout() {
                Ok(()) => {}
                Err(CkError::Pkcs11(RvError::VendorDefined(rv), _)) => break rv,
                Err(e) => panic!("{e}"),
            },
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "C_Login never refused");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(refused as u64, AUDIT_UNAVAILABLE);
    // Calls that are not security-relevant go on; nothing hangs.
    assert!(!p11.get_slots_with_token().unwrap().is_empty());
    let other = p11
        .open_ro_session(p11.get_slots_with_token().unwrap()[0])
        .unwrap();
    let digest = other.digest(&Mechanism::Sha256, b"abc").unwrap();
    assert_eq!(digest.len(), 32);
    // The public key of tls-web: the role's, and not private.
    for o in other.find_objects(&[]).unwrap() {
        let l = other.get_attributes(o, &[AttributeType::Label]).unwrap();
        assert!(
            matches!(l.as_slice(), [Attribute::Label(v)] if v == b"tls-web"),
            "{l:?}"
        );
    }
    drop((s, other));
    let t = Instant::now();
    p11.finalize().expect("C_Finalize");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "C_Finalize is bounded"
    );
}

#[test]
fn fail_closed_with_a_fifo_no_one_reads() {
    let env = TestEnv::new();
    let fifo = env.path().join("audit.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let _setup = setup(&format!(
        "file = \"{}\"\nfsync = \"never\"\n",
        fifo.display()
    ));
    let (p11, s) = module();
    let r = s.login(UserType::User, Some(&AuthPin::new(PIN.into())));
    match r {
        Err(CkError::Pkcs11(RvError::VendorDefined(rv), _)) => {
            assert_eq!(rv as u64, AUDIT_UNAVAILABLE)
        }
        other => panic!("expected CKR_P11SHIM_AUDIT_UNAVAILABLE, got {other:?}"),
    }
    drop(s);
    p11.finalize().expect("C_Finalize");
    drop(env);
}

#[test]
fn fail_open_goes_on_and_counts_the_loss() {
    let env =
        setup("file = \"/dev/full\"\non_failure = \"fail-open\"\nfsync = \"never\"\nqueue = 16\n");
    let (p11, s) = module();
    s.login(UserType::User, Some(&AuthPin::new(PIN.into())))
        .expect("login goes on");
    let k = rsa_key(&s);
    for _ in 0..64 {
        s.sign(&Mechanism::Sha256RsaPkcs, k, DATA)
            .expect("sign goes on");
    }
    // The status query counts what was lost.
    let status: Value = serde_json::from_str(&p11shim_tests::status_json(&p11shim_lib())).unwrap();
    let audit = &status["audit"];
    assert_eq!(audit["healthy"], false, "{audit}");
    assert!(audit["lost"].as_u64().unwrap() > 0, "{audit}");
    drop(s);
    p11.finalize().expect("C_Finalize");
    // The loss is logged (once per episode) in the diagnostic log.
    let log = std::fs::read_to_string(env.path().join("p11shim.log")).unwrap();
    assert!(log.contains("records are being lost (fail-open)"), "{log}");
}

fn find_key(s: &Session, label: &str) -> ObjectHandle {
    let found = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap();
    assert!(!found.is_empty(), "{label}");
    found[0]
}

#[test]
fn failover_and_recovery_are_recorded() {
    let env = TestEnv::new();
    let members = env.ha_members(2);
    let log = env.path().join("audit.jsonl");
    env.ha_config(
        &members,
        &format!(
            "recovery_interval_ms = 20\nrecovery_max_interval_ms = 100\n\n[audit]\nfile = \"{}\"\nfsync = \"always\"\n",
            log.display()
        )
        .replace("\n\n[audit]", "\n[audit]"),
    );
    // [audit] must come after the members: rewrite the config in order.
    let cfg = std::fs::read_to_string(env.config_path()).unwrap();
    let (head, audit) = cfg.split_once("[audit]").unwrap();
    let (audit, members_part) = audit.split_once("\n[[slot.member]]").unwrap();
    env.write_config(&format!(
        "{head}\n[[slot.member]]{members_part}\n[audit]{audit}\n"
    ));
    env.apply();
    let (p11, s) = module();
    s.login(
        UserType::User,
        Some(&AuthPin::new(p11shim_tests::USER_PIN.into())),
    )
    .unwrap();
    let k = find_key(&s, "rsa");
    s.sign(&Mechanism::Sha256RsaPkcs, k, DATA).unwrap();
    // The member serving the first session (the first member) fails: the
    // session moves to the other.
    members[0].set("fail all CKR_DEVICE_ERROR\n");
    s.sign(&Mechanism::Sha256RsaPkcs, k, DATA)
        .expect("sign after failover");
    members[0].heal();
    // Recovery: bounded wait for the probe to bring the member back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !records(&log).iter().any(|r| r["kind"] == "recovery") {
        assert!(Instant::now() < deadline, "no recovery record");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(s);
    p11.finalize().unwrap();
    let rs = records(&log);
    let down: Vec<_> = rs.iter().filter(|r| r["kind"] == "failover").collect();
    assert!(
        down.iter().any(|r| r["function"] == "member_down"),
        "{rs:#?}"
    );
    let rec = rs.iter().find(|r| r["kind"] == "recovery").unwrap();
    assert_eq!(rec["function"], "member_recovered");
    assert!(rec["member"].as_str().unwrap().starts_with("ha#"));
    assert!(verify(&[log], &VerifyKey::None).unwrap().broken.is_none());
}

#[test]
fn broker_exchanges_are_recorded_and_checkpoints_use_the_brokers_key() {
    use p11shim_tests::peers::broker::{
        TestBroker, broker_toml, fingerprint_role, module_broker, write_secret,
    };
    let env = TestEnv::new();
    env.init_token_with(TOKEN, SO, PIN);
    let pin_file = write_secret(env.path(), "role.pin", PIN);
    let hmac_key = "audit-hmac-key-5b1e0c9d8a7f6e5d4c3b2a19";
    let key_file = write_secret(env.path(), "audit.key", hmac_key);
    let broker = TestBroker::start(&broker_toml(
        env.path(),
        &fingerprint_role(
            "signer",
            &pin_file,
            &format!("audit_key = \"file:{}\"", key_file.display()),
        ),
    ));
    let log = env.path().join("audit.jsonl");
    env.write_config(&format!(
        "[[slot]]\nid = 0\nlabel = \"p11shim\"\npin = \"broker\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN}\"\n\n{}\n[audit]\nfile = \"{}\"\nfsync = \"always\"\nsigning_key = \"broker\"\n",
        softhsm_lib().display(),
        module_broker(&broker.url(), "signer", "static-fingerprint", ""),
        log.display(),
    ));
    env.apply();
    let (p11, s) = module();
    // No PIN: the broker's goes to the token.
    s.login(UserType::User, None)
        .expect("login with the broker's PIN");
    s.logout().unwrap();
    drop(s);
    p11.finalize().unwrap();

    let rs = records(&log);
    let c = rs
        .iter()
        .find(|r| r["kind"] == "credentials")
        .expect("a credentials record");
    assert_eq!(c["result"], "CKR_OK");
    assert_eq!(c["role"], "signer");
    assert!(
        c["subject"].as_str().unwrap().starts_with("fingerprint:"),
        "{c}"
    );
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .starts_with("method=static-fingerprint")
    );
    let login = find(&rs, "login", "C_Login");
    assert_eq!(login[0]["detail"], "user=user pin_source=broker");
    assert_eq!(login[0]["subject"], c["subject"]);
    // Checkpoints are signed with the broker's HMAC key: the log verifies
    // with it and not with another.
    let key = |k: &str| VerifyKey::Hmac(p11shim_audit::Zeroizing::new(k.as_bytes().to_vec()));
    let report = verify(std::slice::from_ref(&log), &key(hmac_key)).unwrap();
    assert!(report.broken.is_none(), "{report:?}");
    assert!(report.checkpoints > 0);
    let report = verify(std::slice::from_ref(&log), &key("another key")).unwrap();
    assert!(report.broken.is_some());
    // Neither the PIN nor the HMAC key reached a log.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(PIN) && !text.contains(hmac_key));
}

#[test]
fn a_process_that_exits_without_c_finalize_still_closes_its_chain() {
    // OpenSSL's pkcs11 engine never calls C_Finalize.
    if !p11shim_tests::require("openssl") {
        return;
    }
    let env = setup_with(|env| {
        format!(
            "file = \"{}\"\nfsync = \"always\"\n",
            env.path().join("audit.jsonl").display()
        )
    });
    let cnf = common::openssl_cnf(&env);
    let msg = common::write(&env, "msg.txt", "signed by a process that just exits\n");
    run_ok(
        common::openssl(&env, &cnf)
            .args([
                "dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine", "-sign",
            ])
            .arg(format!(
                "pkcs11:token=p11shim;object=tls-web;type=private;pin-value={PIN}"
            ))
            .arg("-out")
            .arg(env.path().join("msg.sig"))
            .arg(&msg),
    );
    let rs = records(&env.path().join("audit.jsonl"));
    assert!(
        find(&rs, "key_use", "C_Sign").len() == 1 || find(&rs, "key_use", "C_SignFinal").len() == 1,
        "{rs:#?}"
    );
    assert_eq!(rs.last().unwrap()["kind"], "stop", "{rs:#?}");
    let report = verify(&[env.path().join("audit.jsonl")], &VerifyKey::None).unwrap();
    assert!(
        report.broken.is_none() && report.warnings.iter().all(|w| !w.contains("unterminated")),
        "{report:?}"
    );
}
