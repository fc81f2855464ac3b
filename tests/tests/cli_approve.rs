//! `p11shim approve`, the approver's command, through the spawned binary.
//!
//! Offline: the signatures it makes over approval_data with an RSA PEM
//! (PKCS#8 and PKCS#1), an Ed25519 PEM and keys held in SoftHSM2 (named by
//! a pkcs11: URI) verify with `openssl` over the same bytes, and fail over
//! other bytes; what it refuses (other data, a PIN in the URI, a wrong
//! PIN) it refuses with the right exit code and without echoing secrets.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use p11shim_proto::approval::{ApprovalFields, ApprovalKey, REJECTION_PREFIX, approval_data};
use p11shim_tests::{TestEnv, USER_PIN, require, run_ok, softhsm_lib, target_dir};

/// The CLI built next to the test binary (`cargo build -p p11shim-cli`).
fn cli_bin() -> PathBuf {
    let p = target_dir().join("p11shim");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p p11shim-cli` (make test does)",
        p.display()
    );
    p
}

fn cli(env: &TestEnv, args: &[&str]) -> Output {
    let mut c = env.command(cli_bin().to_str().expect("utf-8 path"));
    c.args(args)
        .env_remove("P11SHIM_BROKER_URL")
        .env_remove("P11SHIM_APPROVER_MODULE")
        .env("APPROVER_PIN", USER_PIN);
    c.output().expect("run p11shim")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn assert_code(o: &Output, want: i32) {
    assert_eq!(
        o.status.code(),
        Some(want),
        "--- stdout\n{}\n--- stderr\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// An approval_data document as the broker makes it, written to a file.
fn approval_file(dir: &Path, name: &str, rejection: bool) -> PathBuf {
    let key = ApprovalKey {
        label: Some("ca-root".into()),
        id: Some("01".into()),
        fingerprint: "ab".repeat(32),
        ..ApprovalKey::default()
    };
    let approvers = ["alice".to_string(), "bob".into(), "carol".into()];
    let mut data = approval_data(&ApprovalFields {
        id: "apr_00112233445566778899aabbccddeeff",
        role: "ca",
        subject: "fingerprint:00ff",
        key: &key,
        op: "sign",
        mechanism: Some(0x40),
        data_sha256: Some(&"cd".repeat(32)),
        created_at: "2026-11-25T01:00:00Z",
        expires_at: "2026-11-25T02:00:00Z",
        m: 2,
        approvers: &approvers,
    });
    if rejection {
        let mut r = REJECTION_PREFIX.as_bytes().to_vec();
        r.append(&mut data);
        data = r;
    }
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write approval data");
    p
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl")
}

fn genpkey(dir: &Path, name: &str, alg: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut a = vec!["genpkey"];
    a.extend_from_slice(alg);
    a.extend_from_slice(&["-out", p.to_str().unwrap()]);
    run_ok(Command::new("openssl").args(&a));
    p
}

fn public_pem(key: &Path) -> PathBuf {
    let p = key.with_extension("pub.pem");
    run_ok(Command::new("openssl").args([
        "pkey",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-out",
        p.to_str().unwrap(),
    ]));
    p
}

/// `openssl dgst -sha256 -verify` (RSA PKCS#1 v1.5).
fn rsa_verifies(public: &Path, sig: &Path, data: &Path) -> bool {
    let o = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        public.to_str().unwrap(),
        "-signature",
        sig.to_str().unwrap(),
        data.to_str().unwrap(),
    ]);
    o.status.success() && text(&o.stdout).contains("Verified OK")
}

/// `openssl pkeyutl -verify -rawin` (pure Ed25519).
fn ed25519_verifies(public: &Path, sig: &Path, data: &Path) -> bool {
    let o = openssl(&[
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        public.to_str().unwrap(),
        "-rawin",
        "-in",
        data.to_str().unwrap(),
        "-sigfile",
        sig.to_str().unwrap(),
    ]);
    o.status.success() && text(&o.stdout).contains("Signature Verified Successfully")
}

/// Signs `data` with `sign-file`; returns the signature's path.
fn sign_file(env: &TestEnv, data: &Path, key: &str, extra: &[&str]) -> PathBuf {
    let sig = data.with_extension("sig");
    let mut args = vec![
        "approve",
        "sign-file",
        "--data",
        data.to_str().unwrap(),
        "--key",
        key,
        "--out",
        sig.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = cli(env, &args);
    assert_code(&o, 0);
    assert!(
        text(&o.stdout).contains("operation: sign"),
        "the data is shown before signing: {}",
        text(&o.stdout)
    );
    sig
}

#[test]
fn rsa_pem_signatures_verify_with_openssl() {
    if !require("openssl") {
        return;
    }
    let env = TestEnv::new();
    let dir = env.path();
    let pkcs8 = genpkey(
        dir,
        "alice.pem",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let pkcs1 = dir.join("alice.rsa.pem");
    run_ok(Command::new("openssl").args([
        "rsa",
        "-in",
        pkcs8.to_str().unwrap(),
        "-traditional",
        "-out",
        pkcs1.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read_to_string(&pkcs1)
            .unwrap()
            .starts_with("-----BEGIN RSA PRIVATE KEY-----")
    );
    let public = public_pem(&pkcs8);
    let other = approval_file(dir, "other.txt", true);
    for (n, key) in [&pkcs8, &pkcs1].into_iter().enumerate() {
        let data = approval_file(dir, &format!("data{n}.txt"), false);
        let sig = sign_file(&env, &data, key.to_str().unwrap(), &[]);
        assert_eq!(std::fs::read(&sig).unwrap().len(), 256);
        assert!(rsa_verifies(&public, &sig, &data), "{}", key.display());
        assert!(
            !rsa_verifies(&public, &sig, &other),
            "verifies over other bytes"
        );
    }
    // A rejection, written as base64: openssl verifies the decoded bytes.
    let data = approval_file(dir, "reject.txt", true);
    let sig = sign_file(&env, &data, pkcs8.to_str().unwrap(), &["--base64"]);
    let raw = dir.join("reject.raw");
    run_ok(Command::new("openssl").args([
        "base64",
        "-d",
        "-in",
        sig.to_str().unwrap(),
        "-out",
        raw.to_str().unwrap(),
    ]));
    assert!(rsa_verifies(&public, &raw, &data));
}

#[test]
fn ed25519_pem_signatures_verify_with_openssl() {
    if !require("openssl") {
        return;
    }
    let env = TestEnv::new();
    let dir = env.path();
    let key = genpkey(dir, "bob.pem", &["-algorithm", "ed25519"]);
    let public = public_pem(&key);
    let data = approval_file(dir, "data.txt", false);
    let sig = sign_file(&env, &data, key.to_str().unwrap(), &[]);
    assert_eq!(std::fs::read(&sig).unwrap().len(), 64);
    assert!(ed25519_verifies(&public, &sig, &data));
    let other = approval_file(dir, "other.txt", true);
    assert!(!ed25519_verifies(&public, &sig, &other));
    // An encrypted key, its passphrase from a file.
    let enc = dir.join("bob.enc.pem");
    let pass = dir.join("pass");
    std::fs::write(&pass, "correct horse\n").unwrap();
    run_ok(Command::new("openssl").args([
        "pkey",
        "-in",
        key.to_str().unwrap(),
        "-aes-256-cbc",
        "-passout",
        &format!("file:{}", pass.display()),
        "-out",
        enc.to_str().unwrap(),
    ]));
    let o = cli(
        &env,
        &[
            "approve",
            "sign-file",
            "--data",
            data.to_str().unwrap(),
            "--key",
            enc.to_str().unwrap(),
            "--out",
            dir.join("x.sig").to_str().unwrap(),
        ],
    );
    assert_code(&o, 1);
    assert!(
        text(&o.stderr).contains("passphrase"),
        "{}",
        text(&o.stderr)
    );
    let pass_src = format!("file:{}", pass.display());
    let sig = sign_file(
        &env,
        &data,
        enc.to_str().unwrap(),
        &["--pin-source", &pass_src],
    );
    assert!(ed25519_verifies(&public, &sig, &data));
}

#[test]
fn softhsm_keys_sign_through_a_pkcs11_uri() {
    if !require("softhsm2-util") || !require("openssl") || !require("pkcs11-tool") {
        return;
    }
    let env = TestEnv::new();
    let dir = env.path();
    env.init_token("approvers");
    let pem = genpkey(
        dir,
        "carol.pem",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    env.import_key("approvers", &pem, "carol", "0c");
    let public = public_pem(&pem);
    let module = softhsm_lib();
    let module = module.to_str().unwrap();
    let data = approval_file(dir, "data.txt", false);
    let sig = sign_file(
        &env,
        &data,
        "pkcs11:token=approvers;object=carol;type=private",
        &["--module", module, "--pin-source", "env:APPROVER_PIN"],
    );
    assert!(rsa_verifies(&public, &sig, &data));
    assert!(!rsa_verifies(
        &public,
        &sig,
        &approval_file(dir, "o.txt", true)
    ));

    // The module and the PIN source in the URI's query, the key by id.
    let pin = p11shim_tests::peers::broker::write_secret(dir, "pin", USER_PIN);
    let data = approval_file(dir, "reject.txt", true);
    let uri = format!(
        "pkcs11:token=approvers;id=%0c;type=private?module-path={module}&pin-source=file:{}",
        pin.display()
    );
    let sig = sign_file(&env, &data, &uri, &[]);
    assert!(rsa_verifies(&public, &sig, &data));

    // An Ed25519 key generated in the token (CKM_EDDSA).
    run_ok(env.command("pkcs11-tool").args([
        "--module",
        module,
        "--token-label",
        "approvers",
        "--login",
        "--pin",
        USER_PIN,
        "--keypairgen",
        "--key-type",
        "EC:edwards25519",
        "--label",
        "dave",
        "--id",
        "0d",
    ]));
    // OpenSC writes an EdDSA public key as an SPKI PEM.
    let pub_pem = dir.join("dave.pub.pem");
    run_ok(env.command("pkcs11-tool").args([
        "--module",
        module,
        "--token-label",
        "approvers",
        "--read-object",
        "--type",
        "pubkey",
        "--id",
        "0d",
        "-o",
        pub_pem.to_str().unwrap(),
    ]));
    let data = approval_file(dir, "ed.txt", false);
    let sig = sign_file(
        &env,
        &data,
        "pkcs11:token=approvers;object=dave",
        &["--module", module, "--pin-source", "env:APPROVER_PIN"],
    );
    assert_eq!(std::fs::read(&sig).unwrap().len(), 64);
    assert!(ed25519_verifies(&pub_pem, &sig, &data));

    // A wrong PIN: exit 1, the PIN not echoed.
    let wrong = p11shim_tests::peers::broker::write_secret(dir, "wrong", "97531");
    let o = cli(
        &env,
        &[
            "approve",
            "sign-file",
            "--data",
            data.to_str().unwrap(),
            "--key",
            "pkcs11:token=approvers;object=dave",
            "--module",
            module,
            "--pin-source",
            &format!("file:{}", wrong.display()),
            "--out",
            dir.join("w.sig").to_str().unwrap(),
        ],
    );
    assert_code(&o, 1);
    let err = text(&o.stderr);
    assert!(err.contains("login") && !err.contains("97531"), "{err}");
    // Without a PIN the token's login requirement is named.
    let o = cli(
        &env,
        &[
            "approve",
            "sign-file",
            "--data",
            data.to_str().unwrap(),
            "--key",
            "pkcs11:token=approvers;object=dave",
            "--module",
            module,
            "--out",
            dir.join("w.sig").to_str().unwrap(),
        ],
    );
    assert_code(&o, 1);
    assert!(
        text(&o.stderr).contains("--pin-source"),
        "{}",
        text(&o.stderr)
    );
    // Two keys match a URI naming only the token.
    let o = cli(
        &env,
        &[
            "approve",
            "sign-file",
            "--data",
            data.to_str().unwrap(),
            "--key",
            "pkcs11:token=approvers",
            "--module",
            module,
            "--pin-source",
            "env:APPROVER_PIN",
            "--out",
            dir.join("w.sig").to_str().unwrap(),
        ],
    );
    assert_code(&o, 1);
    assert!(
        text(&o.stderr).contains("2 private keys match"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn refusals_and_usage_errors() {
    let env = TestEnv::new();
    let dir = env.path();
    let data = approval_file(dir, "data.txt", false);
    let out = dir.join("x.sig");
    let key = dir.join("none.pem");
    let base = |extra: &[&str], data: &Path| {
        let mut a = vec![
            "approve",
            "sign-file",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        cli(&env, &a)
    };
    // Not approval data: an approver key is not a general signing tool.
    let other = dir.join("contract.txt");
    std::fs::write(&other, "I owe you 1000 EUR\n").unwrap();
    let o = base(&["--key", key.to_str().unwrap()], &other);
    assert_code(&o, 1);
    assert!(
        text(&o.stderr).contains("p11shim-approval-v1"),
        "{}",
        text(&o.stderr)
    );
    // A PIN in the URI or on the command line is a usage error, not echoed.
    let o = base(&["--key", "pkcs11:token=a?pin-value=24680"], &data);
    assert_code(&o, 2);
    assert!(!text(&o.stderr).contains("24680"), "{}", text(&o.stderr));
    let o = base(
        &["--key", key.to_str().unwrap(), "--pin-source", "24680"],
        &data,
    );
    assert_code(&o, 2);
    assert!(!text(&o.stderr).contains("24680"), "{}", text(&o.stderr));
    // A pkcs11: key without a module.
    let o = base(&["--key", "pkcs11:token=a;object=b"], &data);
    assert_code(&o, 2);
    assert!(text(&o.stderr).contains("--module"), "{}", text(&o.stderr));
    // A missing key file.
    let o = base(&["--key", key.to_str().unwrap()], &data);
    assert_code(&o, 1);
    assert!(!out.exists());
    // No broker anywhere.
    let o = cli(&env, &["approve", "list"]);
    assert_code(&o, 2);
    assert!(text(&o.stderr).contains("--broker"), "{}", text(&o.stderr));
    let o = cli(
        &env,
        &[
            "approve",
            "show",
            "../admin",
            "--broker",
            "http://127.0.0.1:9",
        ],
    );
    assert_code(&o, 2);
}
