//! Per-role key ACLs at the PKCS#11 boundary: two roles over one SoftHSM2
//! token, each seeing and using only its own keys through real clients
//! (pkcs11-tool, Java's SunPKCS11, OpenSSL's pkcs11 engine), and every
//! operation allowed and denied with the spec's return codes (cryptoki).

use std::path::PathBuf;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use p11shim_tests::{Target, TestEnv, USER_PIN, p11shim_lib, require, run_ok, softhsm_lib};

mod common;
use common::{
    compile_java, openssl, openssl_cnf, openssl_verify, run_fail, sunpkcs11_cfg, text, write,
};

const TOKEN: &str = "shared";

/// The roles of the client tests.
const ROLES: &str = r#"
[acl.roles.web]
keys = [{ label = "tls-*", ops = ["sign"] }]

[acl.roles.db]
keys = [{ label = "db-*", ops = ["sign"] }]

[acl.roles.web-audit]
keys = [{ label = "tls-*", ops = ["verify"] }]
"#;

/// One token holding two signing keys with their certificates: `tls-web`
/// (id 01) and `db-key` (id 02).
fn shared_token() -> (TestEnv, PathBuf, PathBuf) {
    let env = TestEnv::new();
    env.init_token(TOKEN);
    let web = env.add_signing_key(TOKEN, "tls-web", "01");
    let db = env.add_signing_key(TOKEN, "db-key", "02");
    (env, web, db)
}

/// Points the environment's config at `role`.
fn as_role(env: &TestEnv, role: &str) {
    env.single_slot_config("p11shim", TOKEN, "", "");
    let cfg = std::fs::read_to_string(env.config_path()).unwrap();
    env.write_config(&format!("{cfg}\n[acl]\nrole = \"{role}\"\n{ROLES}"));
}

fn list_objects(env: &TestEnv, target: Target) -> String {
    let mut c = env.command("pkcs11-tool");
    c.arg("--module").arg(env.module(target));
    if target == Target::Direct {
        c.args(["--token-label", TOKEN]);
    }
    text(&run_ok(c.args([
        "--login",
        "--pin",
        USER_PIN,
        "--list-objects",
    ])))
}

#[test]
fn pkcs11_tool_lists_only_the_roles_keys() {
    require("pkcs11-tool");
    let (env, _, _) = shared_token();
    let direct = list_objects(&env, Target::Direct);
    assert!(
        direct.contains("tls-web") && direct.contains("db-key"),
        "{direct}"
    );

    as_role(&env, "web");
    let web = list_objects(&env, Target::Shim);
    assert!(web.contains("label:      tls-web"), "{web}");
    assert!(!web.contains("db-key"), "{web}");
    // The private key, its public key and its certificate.
    assert_eq!(web.matches("label:      tls-web").count(), 3, "{web}");

    as_role(&env, "db");
    let db = list_objects(&env, Target::Shim);
    assert!(db.contains("label:      db-key"), "{db}");
    assert!(!db.contains("tls-web"), "{db}");
}

#[test]
fn pkcs11_tool_cannot_sign_with_another_roles_key() {
    require("pkcs11-tool");
    let (env, web_pub, _) = shared_token();
    as_role(&env, "web");
    let msg = write(&env, "msg.txt", "to be signed\n");
    let sign = |id: &str, sig: &str| {
        let mut c = env.command("pkcs11-tool");
        c.arg("--module")
            .arg(p11shim_lib())
            .args([
                "--login",
                "--pin",
                USER_PIN,
                "--sign",
                "-m",
                "SHA256-RSA-PKCS",
                "--id",
                id,
            ])
            .arg("-i")
            .arg(&msg)
            .arg("-o")
            .arg(env.path().join(sig));
        c
    };
    run_ok(&mut sign("01", "web.sig"));
    openssl_verify(&env, &web_pub, &msg, &env.path().join("web.sig"));
    let out = run_fail(&mut sign("02", "db.sig"));
    assert!(out.contains("Private key not found"), "{out}");
}

fn java(env: &TestEnv, alias: &str) -> String {
    let cfg = sunpkcs11_cfg(env);
    let classes = compile_java(env, "AclSign.java");
    text(&run_ok(
        env.command("java")
            .arg("-cp")
            .arg(&classes)
            .arg("AclSign")
            .arg(&cfg)
            .args([USER_PIN, alias]),
    ))
}

#[test]
fn java_signs_with_its_key_and_is_refused_the_others() {
    require("java");
    let (env, _, _) = shared_token();
    as_role(&env, "web");
    let out = java(&env, "tls-web");
    assert!(out.contains("ALIASES tls-web\n"), "{out}");
    assert!(out.contains("SIGNED tls-web"), "{out}");
    let out = java(&env, "db-key");
    assert!(out.contains("NO KEY db-key"), "{out}");

    // A role that sees the key but may only verify with it.
    as_role(&env, "web-audit");
    let out = java(&env, "tls-web");
    assert!(out.contains("ALIASES tls-web\n"), "{out}");
    assert!(
        out.contains("DENIED tls-web") && out.contains("CKR_KEY_FUNCTION_NOT_PERMITTED"),
        "{out}"
    );
}

#[test]
fn openssl_signs_with_its_key_only() {
    require("openssl");
    let (env, web_pub, _) = shared_token();
    as_role(&env, "db");
    let cnf = openssl_cnf(&env);
    let msg = write(&env, "msg.txt", "openssl through the ACL\n");
    let sign = |label: &str, sig: &str| {
        let mut c = openssl(&env, &cnf);
        c.args([
            "dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine", "-sign",
        ])
        .arg(format!(
            "pkcs11:token=p11shim;object={label};type=private;pin-value={USER_PIN}"
        ))
        .arg("-out")
        .arg(env.path().join(sig))
        .arg(&msg);
        c
    };
    // The key does not exist for the db role.
    let out = run_fail(&mut sign("tls-web", "web.sig"));
    assert!(out.to_lowercase().contains("key"), "{out}");

    as_role(&env, "web");
    run_ok(&mut sign("tls-web", "web.sig"));
    openssl_verify(&env, &web_pub, &msg, &env.path().join("web.sig"));
}

// ---------------------------------------------------------------------------
// Every operation, allowed and denied.

/// `full-*` keys may do everything; `none-*` keys may only be generated;
/// `pss-*` keys sign with RSA-PSS only; `scratch-*` data objects may be
/// created, copied, changed and destroyed; `hidden-*` objects match no rule.
const MATRIX: &str = r#"
[acl]
role = "matrix"

[acl.roles.matrix]
keys = [
  { label = "full-*", ops = ["sign", "verify", "encrypt", "decrypt", "wrap", "unwrap", "derive", "generate", "destroy", "set-attributes", "copy"] },
  { label = "none-*", ops = ["generate"] },
  { label = "pss-*", ops = ["sign", "generate"], mechanisms = ["RSA_PKCS_PSS", "RSA_PKCS_KEY_PAIR_GEN"] },
  { label = "scratch-*", class = "data", ops = ["create", "copy", "set-attributes", "destroy"] },
]
"#;

struct Keys {
    rsa_pub: ObjectHandle,
    rsa: ObjectHandle,
    aes: ObjectHandle,
    ec: ObjectHandle,
}

fn rsa_pair(s: &Session, label: &str) -> (ObjectHandle, ObjectHandle) {
    let l = || Attribute::Label(label.as_bytes().to_vec());
    s.generate_key_pair(
        &Mechanism::RsaPkcsKeyPairGen,
        &[
            l(),
            Attribute::ModulusBits(2048.into()),
            Attribute::Verify(true),
            Attribute::Encrypt(true),
        ],
        &[
            l(),
            Attribute::Sign(true),
            Attribute::Decrypt(true),
            Attribute::Private(true),
        ],
    )
    .unwrap_or_else(|e| panic!("generate {label}: {e}"))
}

fn aes(s: &Session, label: &str) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Extractable(true),
            Attribute::Sensitive(false),
        ],
    )
    .unwrap_or_else(|e| panic!("generate {label}: {e}"))
}

const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

fn ec_pair(s: &Session, label: &str) -> (ObjectHandle, ObjectHandle) {
    let l = || Attribute::Label(label.as_bytes().to_vec());
    s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[l(), Attribute::EcParams(P256.to_vec())],
        &[l(), Attribute::Derive(true), Attribute::Private(true)],
    )
    .unwrap_or_else(|e| panic!("generate {label}: {e}"))
}

fn keys(s: &Session, prefix: &str) -> Keys {
    let (rsa_pub, rsa) = rsa_pair(s, &format!("{prefix}-rsa"));
    let (_, ec) = ec_pair(s, &format!("{prefix}-ec"));
    Keys {
        rsa_pub,
        rsa,
        aes: aes(s, &format!("{prefix}-aes")),
        ec,
    }
}

/// Denials seen by the matrix, each of which must have its audit record.
static DENIALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[track_caller]
fn denied<T: std::fmt::Debug>(r: Result<T, CkError>, rv: RvError) {
    DENIALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match r {
        Err(CkError::Pkcs11(got, _)) if got == rv => {}
        other => panic!("expected {rv:?}, got {other:?}"),
    }
}

fn label(s: &str) -> Attribute {
    Attribute::Label(s.as_bytes().to_vec())
}

fn find(s: &Session, l: &str) -> Vec<ObjectHandle> {
    s.find_objects(&[label(l)]).expect("C_FindObjects")
}

#[test]
fn every_operation_allowed_and_denied() {
    let env = TestEnv::new();
    env.init_token(TOKEN);
    // An object that no rule selects, made on the token directly.
    run_ok(
        env.command("pkcs11-tool")
            .arg("--module")
            .arg(softhsm_lib())
            .args(["--token-label", TOKEN, "--login", "--pin", USER_PIN])
            .args([
                "--keypairgen",
                "--key-type",
                "rsa:1024",
                "--label",
                "hidden-rsa",
                "--id",
                "99",
            ]),
    );
    env.single_slot_config("p11shim", TOKEN, "", "");
    let cfg = std::fs::read_to_string(env.config_path()).unwrap();
    let audit = env.path().join("audit.jsonl");
    env.write_config(&format!(
        "{cfg}\n{MATRIX}\n[audit]\nfile = \"{}\"\nfsync = \"always\"\n",
        audit.display()
    ));
    env.apply();
    let p11 = Pkcs11::new(p11shim_lib()).expect("load p11shim");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = p11.get_slots_with_token().unwrap()[0];
    let s = p11.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .unwrap();

    let full = keys(&s, "full");
    let none = keys(&s, "none");
    let data = b"sixteen bytes!!!".to_vec();

    // The hidden key does not exist for the role, at any search.
    assert!(find(&s, "hidden-rsa").is_empty());
    let all = s.find_objects(&[]).unwrap();
    assert_eq!(
        all.len(),
        10,
        "full-* and none-*: 2 RSA + 2 EC halves + 1 AES each"
    );
    for h in &all {
        let l = s.get_attributes(*h, &[AttributeType::Label]).unwrap();
        assert!(!format!("{l:?}").contains("hidden"), "{l:?}");
    }

    // sign / verify.
    let sig = s
        .sign(&Mechanism::Sha256RsaPkcs, full.rsa, &data)
        .expect("sign");
    s.verify(&Mechanism::Sha256RsaPkcs, full.rsa_pub, &data, &sig)
        .expect("verify");
    denied(
        s.sign(&Mechanism::Sha256RsaPkcs, none.rsa, &data),
        RvError::KeyFunctionNotPermitted,
    );
    denied(
        s.verify(&Mechanism::Sha256RsaPkcs, none.rsa_pub, &data, &sig),
        RvError::KeyFunctionNotPermitted,
    );
    // encrypt / decrypt.
    let ct = s
        .encrypt(&Mechanism::AesEcb, full.aes, &data)
        .expect("encrypt");
    assert_eq!(
        s.decrypt(&Mechanism::AesEcb, full.aes, &ct)
            .expect("decrypt"),
        data
    );
    denied(
        s.encrypt(&Mechanism::AesEcb, none.aes, &data),
        RvError::KeyFunctionNotPermitted,
    );
    denied(
        s.decrypt(&Mechanism::AesEcb, none.aes, &ct),
        RvError::KeyFunctionNotPermitted,
    );
    let rsa_ct = s
        .encrypt(&Mechanism::RsaPkcs, full.rsa_pub, &data)
        .expect("RSA encrypt");
    denied(
        s.decrypt(&Mechanism::RsaPkcs, none.rsa, &rsa_ct),
        RvError::KeyFunctionNotPermitted,
    );
    // The operation a denial refused was never started: the session is free.
    s.sign(&Mechanism::Sha256RsaPkcs, full.rsa, &data)
        .expect("sign after a denial");

    // wrap / unwrap.
    let target = aes(&s, "full-target");
    let wrapped = s
        .wrap_key(&Mechanism::AesKeyWrap, full.aes, target)
        .expect("wrap");
    denied(
        s.wrap_key(&Mechanism::AesKeyWrap, none.aes, target),
        RvError::KeyFunctionNotPermitted,
    );
    let unwrap_t = |l: &str| {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            label(l),
            Attribute::Encrypt(true),
        ]
    };
    s.unwrap_key(
        &Mechanism::AesKeyWrap,
        full.aes,
        &wrapped,
        &unwrap_t("full-unwrapped"),
    )
    .expect("unwrap");
    denied(
        s.unwrap_key(
            &Mechanism::AesKeyWrap,
            none.aes,
            &wrapped,
            &unwrap_t("full-unwrapped-2"),
        ),
        RvError::KeyFunctionNotPermitted,
    );
    denied(
        s.unwrap_key(
            &Mechanism::AesKeyWrap,
            full.aes,
            &wrapped,
            &unwrap_t("elsewhere"),
        ),
        RvError::TemplateInconsistent,
    );

    // derive.
    let (peer_pub, _) = ec_pair(&s, "full-peer");
    let point = match s
        .get_attributes(peer_pub, &[AttributeType::EcPoint])
        .unwrap()
        .pop()
    {
        Some(Attribute::EcPoint(p)) => p,
        other => panic!("{other:?}"),
    };
    let ecdh = Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), &point));
    let derived_t = |l: &str| {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32.into()),
            label(l),
        ]
    };
    s.derive_key(&ecdh, full.ec, &derived_t("full-derived"))
        .expect("derive");
    denied(
        s.derive_key(&ecdh, none.ec, &derived_t("full-derived-2")),
        RvError::KeyFunctionNotPermitted,
    );
    denied(
        s.derive_key(&ecdh, full.ec, &derived_t("elsewhere")),
        RvError::TemplateInconsistent,
    );

    // Mechanisms: the pss-* key signs with RSA-PSS only.
    let (_, pss) = rsa_pair(&s, "pss-rsa");
    let pss_params = PkcsPssParams {
        hash_alg: MechanismType::SHA256,
        mgf: PkcsMgfType::MGF1_SHA256,
        s_len: 32.into(),
    };
    let digest = [0x5a; 32];
    s.sign(&Mechanism::RsaPkcsPss(pss_params), pss, &digest)
        .expect("RSA-PSS sign");
    denied(
        s.sign(&Mechanism::Sha256RsaPkcs, pss, &data),
        RvError::MechanismInvalid,
    );

    // generate: under a rule granting it, and not elsewhere.
    denied(
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[label("elsewhere"), Attribute::ValueLen(16.into())],
        ),
        RvError::TemplateInconsistent,
    );
    denied(
        s.generate_key(&Mechanism::AesKeyGen, &[Attribute::ValueLen(16.into())]),
        RvError::TemplateInconsistent,
    );
    // A mechanism list on generate: pss-* pairs come from RSA only.
    denied(
        s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[label("pss-ec"), Attribute::EcParams(P256.to_vec())],
            &[label("pss-ec")],
        ),
        RvError::MechanismInvalid,
    );

    // create / copy / set attributes / destroy.
    let data_obj = |l: &str| {
        vec![
            Attribute::Class(ObjectClass::DATA),
            label(l),
            Attribute::Value(b"payload".to_vec()),
        ]
    };
    let scratch = s.create_object(&data_obj("scratch-1")).expect("create");
    denied(
        s.create_object(&data_obj("tls-1")),
        RvError::TemplateInconsistent,
    );
    let copy = s.copy_object(scratch, &[label("scratch-2")]).expect("copy");
    denied(
        s.copy_object(scratch, &[label("tls-copy")]),
        RvError::TemplateInconsistent,
    );
    denied(
        s.copy_object(none.aes, &[label("none-copy")]),
        RvError::KeyFunctionNotPermitted,
    );
    s.update_attributes(copy, &[label("scratch-3")])
        .expect("rename");
    denied(
        s.update_attributes(copy, &[label("tls-stolen")]),
        RvError::TemplateInconsistent,
    );
    denied(
        s.update_attributes(none.aes, &[Attribute::Encrypt(false)]),
        RvError::KeyFunctionNotPermitted,
    );
    s.update_attributes(full.aes, &[Attribute::Encrypt(true)])
        .expect("set attributes");
    s.destroy_object(copy).expect("destroy");
    denied(s.destroy_object(none.aes), RvError::KeyFunctionNotPermitted);
    s.destroy_object(target).expect("destroy a full-* key");
    drop(s);
    p11.finalize().expect("C_Finalize");

    // Every denial has its audit record, with the code the caller got.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let denials: Vec<_> = records.iter().filter(|r| r["kind"] == "denial").collect();
    assert_eq!(
        denials.len(),
        DENIALS.load(std::sync::atomic::Ordering::Relaxed),
        "{denials:#?}"
    );
    for d in &denials {
        let result = d["result"].as_str().unwrap();
        assert!(
            [
                "CKR_KEY_FUNCTION_NOT_PERMITTED",
                "CKR_MECHANISM_INVALID",
                "CKR_TEMPLATE_INCONSISTENT"
            ]
            .contains(&result),
            "{d}"
        );
        assert_eq!(d["role"], "matrix");
        assert!(d["detail"].as_str().is_some_and(|s| !s.is_empty()), "{d}");
    }
    assert!(
        denials
            .iter()
            .any(|d| d["function"] == "C_SignInit" && d["key"]["label"] == "none-rsa")
    );
}

// ---------------------------------------------------------------------------
// The policy from the broker.

#[test]
fn the_brokers_policy_for_the_role_is_enforced() {
    use p11shim_tests::peers::broker::{
        TestBroker, broker_toml, fingerprint_role, module_broker, write_secret,
    };
    require("pkcs11-tool");
    let (env, web_pub, _) = shared_token();
    let pin_file = write_secret(env.path(), "role.pin", USER_PIN);
    let broker = TestBroker::start(&broker_toml(
        env.path(),
        &fingerprint_role(
            "web",
            &pin_file,
            "policy = { keys = [{ label = \"tls-*\", ops = [\"sign\"] }] }",
        ),
    ));
    env.write_config(&format!(
        "[[slot]]\nid = 0\nlabel = \"p11shim\"\npin = \"broker\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN}\"\n\n{}\n[acl]\nsource = \"broker\"\n",
        softhsm_lib().display(),
        module_broker(
            &broker.url(),
            "web",
            "static-fingerprint",
            // Every process of the machine re-authenticates with the nonce.
            &format!("nonce_file = \"{}\"", env.path().join("nonce").display())
        ),
    ));
    // No PIN on the command line: the broker's goes to the token, and its
    // policy decides what the role sees.
    let list = text(&run_ok(
        env.command("pkcs11-tool")
            .arg("--module")
            .arg(p11shim_lib())
            .args(["--login", "--list-objects"]),
    ));
    assert!(list.contains("label:      tls-web"), "{list}");
    assert!(!list.contains("db-key"), "{list}");

    let msg = write(&env, "msg.txt", "policy from the broker\n");
    let sign = |id: &str| {
        let mut c = env.command("pkcs11-tool");
        c.arg("--module")
            .arg(p11shim_lib())
            .args([
                "--login",
                "--sign",
                "-m",
                "SHA256-RSA-PKCS",
                "--id",
                id,
                "-i",
            ])
            .arg(&msg)
            .arg("-o")
            .arg(env.path().join(format!("{id}.sig")));
        c
    };
    run_ok(&mut sign("01"));
    openssl_verify(&env, &web_pub, &msg, &env.path().join("01.sig"));
    run_fail(&mut sign("02"));
}
