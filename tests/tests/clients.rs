//! Real PKCS#11 clients against p11shim: OpenSC's pkcs11-tool, Java's
//! SunPKCS11, OpenSSL's pkcs11 engine, NSS, GnuTLS, python-pkcs11 and a C
//! program linked with `-lp11shim`.
//!
//! Every test makes its own SoftHSM2 token, shows it through p11shim as
//! virtual slot 0 labelled [`SLOT`], and checks what the client produced:
//! signatures are verified outside the token with `openssl` and the public
//! key read back from the token.

use std::path::{Path, PathBuf};
use std::process::Command;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use p11shim_tests::{
    Target, TestEnv, USER_PIN, p11shim_lib, repo_root, require, run_ok, softhsm_lib,
};

mod common;
use common::{
    compile_java, openssl, openssl_cnf, openssl_verify, run_fail, sunpkcs11_cfg, text, write,
};

/// Label of the SoftHSM2 token behind the virtual slot.
const TOKEN: &str = "backing-token";
/// Label of the virtual slot's token, as clients see it.
const SLOT: &str = "p11shim-slot";
/// The RSA key pair: CKA_ID (hex) and label.
const RSA_ID: &str = "01";
const RSA_LABEL: &str = "rsa-key";
/// The EC P-256 key pair: CKA_ID (hex) and label.
const EC_ID: &str = "02";
const EC_LABEL: &str = "ec-key";

// ---------------------------------------------------------------------------
// Helpers.

/// A test environment with one SoftHSM2 token shown through p11shim as
/// virtual slot 0, which passes the application's PIN through.
fn shim_env() -> TestEnv {
    let env = TestEnv::new();
    env.init_token(TOKEN);
    env.single_slot_config(SLOT, TOKEN, "", "");
    env
}

/// `pkcs11-tool` on p11shim, or on the SoftHSM2 token directly.
fn pkcs11_tool_on(env: &TestEnv, target: Target) -> Command {
    let mut c = env.command("pkcs11-tool");
    c.arg("--module").arg(env.module(target));
    if target == Target::Direct {
        c.args(["--token-label", TOKEN]);
    }
    c
}

/// `pkcs11-tool` on p11shim.
fn pkcs11_tool(env: &TestEnv) -> Command {
    pkcs11_tool_on(env, Target::Shim)
}

/// Generates a key pair through p11shim with pkcs11-tool (`rsa:2048`,
/// `EC:prime256v1`).
fn keygen(env: &TestEnv, key_type: &str, id: &str, label: &str) {
    let out = run_ok(pkcs11_tool(env).args([
        "--login",
        "--pin",
        USER_PIN,
        "--keypairgen",
        "--key-type",
        key_type,
        "--id",
        id,
        "--label",
        label,
    ]));
    assert!(text(&out).contains("Key pair generated"), "{}", text(&out));
}

/// `pkcs11-tool --sign` of `input` into `output` with the key `id`; ECDSA
/// signatures are DER, as OpenSSL writes them.
fn pkcs11_tool_sign(
    env: &TestEnv,
    target: Target,
    mechanism: &str,
    id: &str,
    input: &Path,
    output: &Path,
) -> Command {
    let mut c = pkcs11_tool_on(env, target);
    c.args([
        "--login",
        "--pin",
        USER_PIN,
        "--sign",
        "--signature-format",
        "openssl",
        "-m",
        mechanism,
        "--id",
        id,
        "-i",
    ])
    .arg(input)
    .arg("-o")
    .arg(output);
    c
}

/// Reads a public key out of the token (DER SubjectPublicKeyInfo) and
/// returns the file it was written to.
fn read_pubkey(env: &TestEnv, target: Target, id: &str) -> PathBuf {
    let path = env.path().join(format!("pub-{id}-{target:?}.der"));
    run_ok(
        pkcs11_tool_on(env, target)
            .args(["--read-object", "--type", "pubkey", "--id", id, "-o"])
            .arg(&path),
    );
    let der = std::fs::read(&path).expect("public key");
    assert!(
        der.len() > 50 && der[0] == 0x30,
        "not a DER public key: {der:02x?}"
    );
    path
}

/// The RFC 7512 URI of a private key in the virtual slot, with the PIN.
fn key_uri(label: &str) -> String {
    format!("pkcs11:token={SLOT};object={label};type=private?pin-value={USER_PIN}")
}

/// Makes a self-signed certificate (DER) for a token key with the openssl
/// pkcs11 engine: the token signs it through p11shim.
fn engine_self_signed(env: &TestEnv, cnf: &Path, label: &str) -> PathBuf {
    let der = env.path().join(format!("{label}.cert.der"));
    run_ok(
        openssl(env, cnf)
            .args([
                "req",
                "-x509",
                "-new",
                "-engine",
                "pkcs11",
                "-keyform",
                "engine",
                "-key",
                &key_uri(label),
            ])
            .args([
                "-subj",
                &format!("/CN={label}"),
                "-days",
                "2",
                "-outform",
                "DER",
                "-out",
            ])
            .arg(&der),
    );
    der
}

/// The RSA-2048 and EC P-256 key pairs, each with a self-signed certificate
/// of the same CKA_ID and label, as Java and NSS expect.
fn keys_with_certs(env: &TestEnv) {
    keygen(env, "rsa:2048", RSA_ID, RSA_LABEL);
    keygen(env, "EC:prime256v1", EC_ID, EC_LABEL);
    let cnf = openssl_cnf(env);
    for (id, label) in [(RSA_ID, RSA_LABEL), (EC_ID, EC_LABEL)] {
        let cert = engine_self_signed(env, &cnf, label);
        let out = run_ok(
            pkcs11_tool(env)
                .args(["--login", "--pin", USER_PIN, "--write-object"])
                .arg(&cert)
                .args(["--type", "cert", "--id", id, "--label", label]),
        );
        assert!(text(&out).contains("Created certificate"), "{}", text(&out));
    }
}

/// Generates in SoftHSM2 directly an RSA-2048 key pair that signs and does
/// not decrypt.
fn softhsm_sign_only_rsa_key(env: &TestEnv, id: u8, label: &str) {
    env.apply();
    let p11 = Pkcs11::new(softhsm_lib()).expect("load SoftHSM2");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = p11
        .get_slots_with_token()
        .expect("C_GetSlotList")
        .into_iter()
        .find(|s| p11.get_token_info(*s).is_ok_and(|t| t.label() == TOKEN))
        .expect("the SoftHSM2 token");
    let session = p11.open_rw_session(slot).expect("C_OpenSession");
    session
        .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .expect("C_Login");
    let common = [
        Attribute::Token(true),
        Attribute::Id(vec![id]),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    let mut public = common.to_vec();
    public.extend([
        Attribute::ModulusBits(2048.into()),
        Attribute::PublicExponent(vec![1, 0, 1]),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
    ]);
    let mut private = common.to_vec();
    private.extend([
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
    ]);
    session
        .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
        .expect("C_GenerateKeyPair");
    drop(session);
    p11.finalize().expect("C_Finalize");
}

/// `keytool -list` on the virtual slot through SunPKCS11.
fn keytool_list(env: &TestEnv, cfg: &Path) -> Command {
    let mut c = env.command("keytool");
    c.args([
        "-list",
        "-storetype",
        "PKCS11",
        "-providerClass",
        "sun.security.pkcs11.SunPKCS11",
        "-providerArg",
    ])
    .arg(cfg);
    c
}

/// Checks that the Java program signed with both keys and nothing failed.
fn assert_java_signed(out: &str) {
    assert!(out.contains(&format!("RSA OK {RSA_LABEL}")), "{out}");
    assert!(out.contains(&format!("EC OK {EC_LABEL}")), "{out}");
    assert!(out.contains("keys signed: 2"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
}

// ---------------------------------------------------------------------------
// OpenSC pkcs11-tool.

/// pkcs11-tool's self test (signing and verifying with the token's keys) and
/// its fork test pass through p11shim.
#[test]
fn pkcs11_tool_self_test_and_fork_test() {
    if !require("pkcs11-tool") || !require("softhsm2-util") {
        return;
    }
    let env = shim_env();
    // The self test decrypts with every RSA key able to, including with an
    // OAEP label, which SoftHSM2 rejects (CKR_ARGUMENTS_BAD, without p11shim
    // too): the RSA key signs only. It tests every mechanism with the first
    // private key only, and skips EC keys: the RSA key is the only key.
    softhsm_sign_only_rsa_key(&env, 1, RSA_LABEL);

    let out = text(&run_ok(
        pkcs11_tool(&env).args(["--login", "--pin", USER_PIN, "--test"]),
    ));
    assert!(out.contains("No errors"), "{out}");
    assert!(
        out.contains(&format!("testing key 0 ({RSA_LABEL})")),
        "the RSA key was not tested:\n{out}"
    );
    for line in [
        "RSA-X-509: OK",
        "RSA-PKCS: OK",
        "SHA1-RSA-PKCS: OK",
        "all 4 digest functions seem to work",
    ] {
        assert!(out.contains(line), "missing {line:?}:\n{out}");
    }
    for bad in [
        "error:",
        "ERR",
        "failed",
        "FAILED",
        "Aborting",
        "doesn't match",
    ] {
        assert!(!out.contains(bad), "{bad:?} in the output:\n{out}");
    }

    // The child of a fork initializes the module again; the parent goes on.
    let out = text(&run_ok(pkcs11_tool(&env).args([
        "--test-fork",
        "--login",
        "--pin",
        USER_PIN,
        "--test",
    ])));
    assert!(
        out.contains("Calling C_Initialize in forked child process"),
        "{out}"
    );
    assert!(out.contains("No errors"), "{out}");
    for bad in ["error:", "failed", "FAILED", "Aborting"] {
        assert!(!out.contains(bad), "{bad:?} in the output:\n{out}");
    }
}

/// pkcs11-tool generates RSA-2048 and EC P-256 key pairs through p11shim and
/// signs with them; openssl verifies with the public keys read back.
#[test]
fn pkcs11_tool_keygen_and_sign_verified_by_openssl() {
    if !require("pkcs11-tool") || !require("openssl") || !require("softhsm2-util") {
        return;
    }
    let env = shim_env();
    keygen(&env, "rsa:2048", RSA_ID, RSA_LABEL);
    keygen(&env, "EC:prime256v1", EC_ID, EC_LABEL);

    // The virtual slot is what pkcs11-tool sees.
    let out = text(&run_ok(pkcs11_tool(&env).arg("--list-slots")));
    assert!(
        out.contains(&format!("token label        : {SLOT}")),
        "{out}"
    );

    // The keys are in the SoftHSM2 token, the public halves identical.
    let objects = text(&run_ok(pkcs11_tool_on(&env, Target::Direct).args([
        "--login",
        "--pin",
        USER_PIN,
        "--list-objects",
    ])));
    assert!(
        objects.contains(RSA_LABEL) && objects.contains(EC_LABEL),
        "{objects}"
    );
    for id in [RSA_ID, EC_ID] {
        let through = std::fs::read(read_pubkey(&env, Target::Shim, id)).unwrap();
        let direct = std::fs::read(read_pubkey(&env, Target::Direct, id)).unwrap();
        assert_eq!(through, direct, "public key {id} differs through p11shim");
    }

    let msg = write(&env, "message.txt", "p11shim signs for pkcs11-tool\n");

    // RSA: the token hashes (SHA256-RSA-PKCS).
    let rsa_sig = env.path().join("rsa.sig");
    run_ok(&mut pkcs11_tool_sign(
        &env,
        Target::Shim,
        "SHA256-RSA-PKCS",
        RSA_ID,
        &msg,
        &rsa_sig,
    ));
    assert_eq!(std::fs::metadata(&rsa_sig).unwrap().len(), 256);
    openssl_verify(
        &env,
        &read_pubkey(&env, Target::Shim, RSA_ID),
        &msg,
        &rsa_sig,
    );

    // EC: SoftHSM2 2.6 has no CKM_ECDSA_SHA256 (C_SignInit returns
    // CKR_MECHANISM_INVALID, through p11shim as directly), so the digest is
    // computed here and signed with CKM_ECDSA.
    for target in [Target::Direct, Target::Shim] {
        let out = run_fail(&mut pkcs11_tool_sign(
            &env,
            target,
            "ECDSA-SHA256",
            EC_ID,
            &msg,
            &env.path().join("unused.sig"),
        ));
        assert!(out.contains("CKR_MECHANISM_INVALID"), "{target:?}:\n{out}");
    }
    let digest = env.path().join("message.sha256");
    run_ok(
        env.command("openssl")
            .args(["dgst", "-sha256", "-binary", "-out"])
            .arg(&digest)
            .arg(&msg),
    );
    let ec_sig = env.path().join("ec.sig");
    run_ok(&mut pkcs11_tool_sign(
        &env,
        Target::Shim,
        "ECDSA",
        EC_ID,
        &digest,
        &ec_sig,
    ));
    openssl_verify(&env, &read_pubkey(&env, Target::Shim, EC_ID), &msg, &ec_sig);
}

// ---------------------------------------------------------------------------
// Java SunPKCS11.

/// keytool lists the token's keys as PrivateKeyEntry through SunPKCS11, and
/// a Java program signs and verifies SHA256withRSA and SHA256withECDSA with
/// them, logging in with the PIN.
#[test]
fn java_sunpkcs11_keytool_and_signatures_with_pin() {
    if !require("keytool")
        || !require("javac")
        || !require("java")
        || !require("pkcs11-tool")
        || !require("openssl")
    {
        return;
    }
    let env = shim_env();
    keys_with_certs(&env);
    let cfg = sunpkcs11_cfg(&env);

    let out = text(&run_ok(
        keytool_list(&env, &cfg).args(["-storepass", USER_PIN]),
    ));
    assert!(out.contains("Your keystore contains 2 entries"), "{out}");
    for label in [RSA_LABEL, EC_LABEL] {
        assert!(
            out.contains(&format!("{label}, PrivateKeyEntry")),
            "{label} is not a PrivateKeyEntry:\n{out}"
        );
    }

    let classes = compile_java(&env, "P11Sign.java");
    let out = text(&run_ok(
        env.command("java")
            .arg("-cp")
            .arg(&classes)
            .arg("P11Sign")
            .arg(&cfg)
            .arg(USER_PIN),
    ));
    assert_java_signed(&out);

    // A wrong PIN reaches the token.
    let out = run_fail(
        env.command("java")
            .arg("-cp")
            .arg(&classes)
            .arg("P11Sign")
            .arg(&cfg)
            .arg("0000"),
    );
    assert!(out.contains("CKR_PIN_INCORRECT"), "{out}");
}

/// With `pin = "env:P11SHIM_PIN"` in the slot, Java loads the PKCS11
/// KeyStore with no password at all and signs: p11shim logs in for it.
#[test]
fn java_sunpkcs11_without_pin_uses_the_slot_pin_source() {
    if !require("keytool")
        || !require("javac")
        || !require("java")
        || !require("pkcs11-tool")
        || !require("openssl")
    {
        return;
    }
    let env = shim_env();
    keys_with_certs(&env);
    // From now on the slot logs in with the PIN from the environment.
    env.single_slot_config(SLOT, TOKEN, "pin = \"env:P11SHIM_PIN\"", "");
    let cfg = sunpkcs11_cfg(&env);
    let classes = compile_java(&env, "P11Sign.java");

    // The token has a protected authentication path: no PIN to type.
    let out = text(&run_ok(pkcs11_tool(&env).arg("--list-token-slots")));
    assert!(out.contains("PIN pad present"), "{out}");

    let out = text(&run_ok(
        env.command("java")
            .env("P11SHIM_PIN", USER_PIN)
            .arg("-cp")
            .arg(&classes)
            .arg("P11Sign")
            .arg(&cfg),
    ));
    assert_java_signed(&out);

    // keytool, told the password comes from a protected path, lists the keys.
    let out = text(&run_ok(
        keytool_list(&env, &cfg)
            .env("P11SHIM_PIN", USER_PIN)
            .arg("-protected"),
    ));
    for label in [RSA_LABEL, EC_LABEL] {
        assert!(
            out.contains(&format!("{label}, PrivateKeyEntry")),
            "{label} is not a PrivateKeyEntry:\n{out}"
        );
    }

    // Without the PIN source, the login fails with p11shim's own code.
    let out = run_fail(
        env.command("java")
            .env_remove("P11SHIM_PIN")
            .arg("-cp")
            .arg(&classes)
            .arg("P11Sign")
            .arg(&cfg),
    );
    assert!(
        out.contains("0xD0530003"),
        "expected CKR_P11SHIM_PIN_SOURCE_UNAVAILABLE:\n{out}"
    );
    // A wrong PIN in the source is the token's refusal.
    let out = run_fail(
        env.command("java")
            .env("P11SHIM_PIN", "0000")
            .arg("-cp")
            .arg(&classes)
            .arg("P11Sign")
            .arg(&cfg),
    );
    assert!(out.contains("CKR_PIN_INCORRECT"), "{out}");
}

// ---------------------------------------------------------------------------
// OpenSSL 3 with the pkcs11 engine.

/// OpenSSL's pkcs11 engine, loaded from openssl.cnf with MODULE_PATH set to
/// p11shim, signs with RSA and EC keys and issues a self-signed certificate
/// for the token key.
#[test]
fn openssl_engine_signs_and_issues_a_self_signed_certificate() {
    if !require("openssl") || !require("pkcs11-tool") || !require("softhsm2-util") {
        return;
    }
    let env = shim_env();
    keygen(&env, "rsa:2048", RSA_ID, RSA_LABEL);
    keygen(&env, "EC:prime256v1", EC_ID, EC_LABEL);
    let cnf = openssl_cnf(&env);
    let out = text(&run_ok(
        openssl(&env, &cnf).args(["engine", "-t", "pkcs11"]),
    ));
    assert!(out.contains("[ available ]"), "{out}");

    let msg = write(&env, "message.txt", "p11shim signs for OpenSSL\n");
    let rsa_pub = read_pubkey(&env, Target::Shim, RSA_ID);
    let ec_pub = read_pubkey(&env, Target::Shim, EC_ID);

    // RSA with `openssl dgst -sign`.
    let rsa_sig = env.path().join("rsa.sig");
    run_ok(
        openssl(&env, &cnf)
            .args([
                "dgst",
                "-sha256",
                "-engine",
                "pkcs11",
                "-keyform",
                "engine",
                "-sign",
                &key_uri(RSA_LABEL),
                "-out",
            ])
            .arg(&rsa_sig)
            .arg(&msg),
    );
    openssl_verify(&env, &rsa_pub, &msg, &rsa_sig);

    // EC with `openssl pkeyutl -sign` over the digest.
    let digest = env.path().join("message.sha256");
    run_ok(
        env.command("openssl")
            .args(["dgst", "-sha256", "-binary", "-out"])
            .arg(&digest)
            .arg(&msg),
    );
    let ec_sig = env.path().join("ec.sig");
    run_ok(
        openssl(&env, &cnf)
            .args([
                "pkeyutl",
                "-sign",
                "-engine",
                "pkcs11",
                "-keyform",
                "engine",
                "-inkey",
                &key_uri(EC_LABEL),
                "-in",
            ])
            .arg(&digest)
            .arg("-out")
            .arg(&ec_sig),
    );
    openssl_verify(&env, &ec_pub, &msg, &ec_sig);

    // A self-signed certificate for the RSA key.
    let cert = env.path().join("cert.pem");
    run_ok(
        openssl(&env, &cnf)
            .args([
                "req",
                "-x509",
                "-new",
                "-engine",
                "pkcs11",
                "-keyform",
                "engine",
                "-key",
                &key_uri(RSA_LABEL),
            ])
            .args(["-subj", "/CN=test", "-days", "2", "-out"])
            .arg(&cert),
    );
    let cert_pub = env.path().join("cert-pub.der");
    run_ok(
        env.command("openssl")
            .args(["x509", "-noout", "-pubkey", "-in"])
            .arg(&cert)
            .arg("-out")
            .arg(env.path().join("cert-pub.pem")),
    );
    run_ok(
        env.command("openssl")
            .args(["pkey", "-pubin", "-outform", "DER", "-in"])
            .arg(env.path().join("cert-pub.pem"))
            .arg("-out")
            .arg(&cert_pub),
    );
    assert_eq!(
        std::fs::read(&cert_pub).unwrap(),
        std::fs::read(&rsa_pub).unwrap(),
        "the certificate's key is not the token's"
    );
    let out = text(&run_ok(
        env.command("openssl")
            .args(["verify", "-CAfile"])
            .arg(&cert)
            .arg(&cert),
    ));
    assert!(out.contains(": OK"), "{out}");
    let subject = text(&run_ok(
        env.command("openssl")
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(&cert),
    ));
    assert!(subject.contains("CN = test"), "{subject}");

    // A wrong PIN in the URI fails.
    let uri = key_uri(RSA_LABEL).replace(USER_PIN, "0000");
    run_fail(
        openssl(&env, &cnf)
            .args([
                "dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine", "-sign", &uri, "-out",
            ])
            .arg(env.path().join("bad.sig"))
            .arg(&msg),
    );
}

// ---------------------------------------------------------------------------
// NSS.

/// NSS's modutil adds p11shim and lists its slot and token; certutil lists
/// the token, its certificates and keys, and signs a request with its key.
#[test]
fn nss_modutil_and_certutil_use_the_slot() {
    if !require("modutil") || !require("certutil") || !require("pkcs11-tool") || !require("openssl")
    {
        return;
    }
    let env = shim_env();
    keys_with_certs(&env);
    let db = env.path().join("nssdb");
    std::fs::create_dir(&db).unwrap();
    let dbarg = format!("sql:{}", db.display());
    let pinfile = write(&env, "nss-pin.txt", format!("{USER_PIN}\n"));
    run_ok(
        env.command("certutil")
            .args(["-N", "-d", &dbarg, "--empty-password"]),
    );

    let out = text(&run_ok(
        env.command("modutil")
            .args(["-dbdir", &dbarg, "-add", "p11shim", "-libfile"])
            .arg(p11shim_lib())
            .arg("-force"),
    ));
    assert!(
        out.contains("Module \"p11shim\" added to database"),
        "{out}"
    );

    let out = text(&run_ok(
        env.command("modutil").args(["-dbdir", &dbarg, "-list"]),
    ));
    let shim = out
        .split("library name: ")
        .nth(1)
        .unwrap_or_else(|| panic!("p11shim is not listed:\n{out}"));
    assert!(
        shim.starts_with(&p11shim_lib().display().to_string()),
        "{out}"
    );
    for want in [
        "status: loaded",
        "slots: 1 slot attached",
        &format!("token: {SLOT}"),
    ] {
        assert!(out.contains(want), "missing {want:?}:\n{out}");
    }

    let out = text(&run_ok(env.command("certutil").args(["-U", "-d", &dbarg])));
    assert!(out.contains(&format!("token: {SLOT}")), "{out}");

    let out = text(&run_ok(
        env.command("certutil")
            .args(["-L", "-d", &dbarg, "-h", SLOT, "-f"])
            .arg(&pinfile),
    ));
    for label in [RSA_LABEL, EC_LABEL] {
        assert!(
            out.contains(&format!("{SLOT}:{label}")),
            "certificate {label} is not listed:\n{out}"
        );
    }
    let out = text(&run_ok(
        env.command("certutil")
            .args(["-K", "-d", &dbarg, "-h", SLOT, "-f"])
            .arg(&pinfile),
    ));
    assert!(out.contains(RSA_LABEL) && out.contains(EC_LABEL), "{out}");

    // NSS signs a certificate request with each token key.
    for (id, cn) in [(RSA_ID, "nss-rsa"), (EC_ID, "nss-ec")] {
        let req = env.path().join(format!("{cn}.csr.der"));
        run_ok(
            env.command("certutil")
                .args([
                    "-R",
                    "-d",
                    &dbarg,
                    "-h",
                    SLOT,
                    "-k",
                    id,
                    "-s",
                    &format!("CN={cn}"),
                    "-z",
                    "/dev/null",
                    "-f",
                ])
                .arg(&pinfile)
                .arg("-o")
                .arg(&req),
        );
        let out = text(&run_ok(
            env.command("openssl")
                .args(["req", "-inform", "DER", "-noout", "-verify", "-in"])
                .arg(&req),
        ));
        assert!(out.contains("verify OK"), "{out}");
        let csr_pub = env.path().join(format!("{cn}.pub.pem"));
        run_ok(
            env.command("openssl")
                .args(["req", "-inform", "DER", "-noout", "-pubkey", "-in"])
                .arg(&req)
                .arg("-out")
                .arg(&csr_pub),
        );
        let csr_der = env.path().join(format!("{cn}.pub.der"));
        run_ok(
            env.command("openssl")
                .args(["pkey", "-pubin", "-outform", "DER", "-in"])
                .arg(&csr_pub)
                .arg("-out")
                .arg(&csr_der),
        );
        assert_eq!(
            std::fs::read(&csr_der).unwrap(),
            std::fs::read(read_pubkey(&env, Target::Shim, id)).unwrap(),
            "{cn}: not the token's key"
        );
    }
}

// ---------------------------------------------------------------------------
// GnuTLS.

/// GnuTLS p11tool lists the token's objects (private keys only after login)
/// and signs with both keys through p11shim.
#[test]
fn gnutls_p11tool_lists_objects_and_signs() {
    if !require("p11tool") || !require("pkcs11-tool") || !require("openssl") {
        return;
    }
    let env = shim_env();
    keys_with_certs(&env);
    let p11tool = || {
        let mut c = env.command("p11tool");
        c.arg("--provider")
            .arg(p11shim_lib())
            .env("GNUTLS_PIN", USER_PIN);
        c
    };
    let token = format!("pkcs11:token={SLOT}");

    let out = text(&run_ok(p11tool().arg("--list-tokens")));
    assert!(out.contains(&format!("Label: {SLOT}")), "{out}");

    let out = text(&run_ok(p11tool().args(["--login", "--list-all", &token])));
    for (id, label) in [(RSA_ID, RSA_LABEL), (EC_ID, EC_LABEL)] {
        for ty in ["private", "public", "cert"] {
            let want = format!("id=%{id};object={label};type={ty}");
            assert!(out.contains(&want), "missing {want}:\n{out}");
        }
    }
    assert!(
        out.contains("Private key (RSA-2048)") && out.contains("Private key (EC/ECDSA-SECP256R1)"),
        "{out}"
    );

    // Without login the private keys stay hidden.
    let out = text(&run_ok(p11tool().args(["--list-all", &token])));
    assert!(
        out.contains("type=public") && !out.contains("type=private"),
        "{out}"
    );

    for (label, alg) in [(RSA_LABEL, "RSA-SHA256"), (EC_LABEL, "ECDSA-SHA256")] {
        let out = text(&run_ok(p11tool().args([
            "--login",
            "--test-sign",
            &format!("{token};object={label}"),
        ])));
        let signed = format!("Signing using {alg}... ok");
        for want in [
            signed.as_str(),
            "Verifying against private key parameters... ok",
            "Verifying against public key in the token... ok",
        ] {
            assert!(out.contains(want), "missing {want:?}:\n{out}");
        }
    }
}

// ---------------------------------------------------------------------------
// python-pkcs11.

/// python-pkcs11 generates RSA and EC key pairs in the token through
/// p11shim, signs and verifies; openssl verifies the signatures with the
/// public keys read from SoftHSM2 directly.
#[test]
fn python_pkcs11_generates_signs_and_verifies() {
    let python = repo_root().join(".venv/bin/python");
    if !require(&python.display().to_string()) || !require("pkcs11-tool") || !require("openssl") {
        return;
    }
    let env = shim_env();
    let msg = write(&env, "message.txt", "p11shim signs for python-pkcs11\n");
    let out = text(&run_ok(
        env.command(&python.display().to_string())
            .arg(repo_root().join("tests/clients/python/sign.py"))
            .arg(p11shim_lib())
            .args([SLOT, USER_PIN])
            .arg(env.path()),
    ));
    assert!(out.contains("RSA OK") && out.contains("EC OK"), "{out}");
    assert!(out.contains("private keys: py-ec,py-rsa"), "{out}");

    // The keys are in SoftHSM2, and the signatures check out in software.
    for (id, sig) in [("21", "py-rsa.sig"), ("22", "py-ec.sig")] {
        let pubkey = read_pubkey(&env, Target::Direct, id);
        openssl_verify(&env, &pubkey, &msg, &env.path().join(sig));
    }
}

// ---------------------------------------------------------------------------
// A C program linked with -lp11shim.

/// A C program linked with -lp11shim (no dlopen) signs by calling the C_*
/// functions by name, and gets CKR_P11SHIM_CONFIG_INVALID from
/// C_Initialize with a broken configuration.
#[test]
fn c_program_linked_with_libp11shim() {
    if !require("cc") || !require("pkg-config") || !require("pkcs11-tool") || !require("openssl") {
        return;
    }
    let env = shim_env();
    keygen(&env, "rsa:2048", RSA_ID, RSA_LABEL);

    let libdir = p11shim_lib()
        .parent()
        .expect("library directory")
        .to_path_buf();
    let cflags = text(&run_ok(
        Command::new("pkg-config").args(["--cflags", "p11-kit-1"]),
    ));
    let exe = env.path().join("linked");
    run_ok(
        env.command("cc")
            .args(["-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&exe)
            .arg(format!("-I{}", repo_root().join("include").display()))
            .args(cflags.split_whitespace())
            .arg(repo_root().join("tests/clients/c/linked.c"))
            .arg(format!("-L{}", libdir.display()))
            .arg("-lp11shim")
            .arg(format!("-Wl,-rpath,{}", libdir.display())),
    );
    // It is linked, not loaded, and finds the module through its rpath: the
    // test runner's LD_LIBRARY_PATH would take precedence.
    let ldd = text(&run_ok(
        Command::new("ldd").arg(&exe).env_remove("LD_LIBRARY_PATH"),
    ));
    assert!(
        ldd.contains(&format!(
            "libp11shim.so => {}",
            libdir.join("libp11shim.so").display()
        )),
        "{ldd}"
    );

    let broken = write(&env, "broken.toml", "[[slot]]\nid = \"zero\"\n");
    let msg = write(
        &env,
        "message.txt",
        "p11shim signs for a linked C program\n",
    );
    let sig = env.path().join("c.sig");
    let out = text(&run_ok(
        env.command(&exe.display().to_string())
            .env_remove("LD_LIBRARY_PATH")
            .arg(env.config_path())
            .arg(&broken)
            .args([USER_PIN, RSA_LABEL])
            .arg(&msg)
            .arg(&sig),
    ));
    for want in [
        "initialize: OK",
        "slots: 1",
        &format!("token: {SLOT}"),
        "login: OK",
        "keys found: 1",
        "signature length: 256",
        "signed: 256 bytes",
        "finalize: OK",
        "broken config: CKR_P11SHIM_CONFIG_INVALID",
        "after the failure: CKR_CRYPTOKI_NOT_INITIALIZED",
    ] {
        assert!(out.contains(want), "missing {want:?}:\n{out}");
    }
    openssl_verify(&env, &read_pubkey(&env, Target::Shim, RSA_ID), &msg, &sig);
}
