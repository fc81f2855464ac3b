//! `p11shim approve`, the approver's command, through the spawned binary.
//!
//! Offline: the signatures it makes over approval_data with an RSA PEM
//! (PKCS#8 and PKCS#1), an Ed25519 PEM and keys held in SoftHSM2 (named by
//! a pkcs11: URI) verify with `openssl` over the same bytes, and fail over
//! other bytes; what it refuses (other data, a PIN in the URI, a wrong
//! PIN) it refuses with the right exit code and without echoing secrets.
//!
//! End to end against an in-process broker with a 2-of-3 rule (approvers
//! with an RSA PEM, an Ed25519 PEM and an RSA key in SoftHSM2), requests
//! filed as the module files them (with the approval token of a real
//! credentials exchange): list, show --data-out + openssl + submit, sign
//! with the token's key, approved at 2 of 3; rejections; the broker's
//! refusals as one-line errors; a broker that shows one request and asks
//! to sign another refused, nothing posted to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use p11shim_proto::approval::{
    APPROVALS_PATH, Approval, ApprovalFields, ApprovalKey, NewApproval, REJECTION_PREFIX,
    approval_data, sha256_hex,
};
use p11shim_tests::peers::broker::{TestBroker, broker_toml, http, sealed_exchange, write_secret};
use p11shim_tests::{TestEnv, USER_PIN, require, run_ok, softhsm_lib, target_dir};
use serde_json::Value;

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
    let pin = write_secret(dir, "pin", USER_PIN);
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
    let wrong = write_secret(dir, "wrong", "97531");
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

// ---------------------------------------------------------------------------
// End to end: the CLI against an in-process broker with a 2-of-3 rule.

/// The PIN of the quorum role.
const ROLE_PIN: &str = "ca-pin-1357";

/// The attributes of a synthetic machine, and their fingerprint.
fn identity() -> (BTreeMap<String, String>, String) {
    let attrs: BTreeMap<String, String> = [
        ("machine-id", "0000000000000000000000000000c11a".to_owned()),
        ("hostname", "approve-cli-test".to_owned()),
        ("addresses", "192.0.2.77".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let fp = p11shim_proto::fingerprint::fingerprint(&attrs);
    (attrs, fp)
}

/// A broker with role `ca` (`ca-*` keys under 2-of-3 quorum for sign) and
/// approvers alice (RSA PEM), bob (Ed25519 PEM) and carol (RSA, her
/// private key in the SoftHSM2 token `approvers`).
struct Quorum {
    env: TestEnv,
    broker: TestBroker,
    alice: PathBuf,
    bob: PathBuf,
    /// The approval token of the role's machine.
    token: String,
}

impl Quorum {
    fn start() -> Option<Quorum> {
        if !require("openssl") || !require("softhsm2-util") {
            return None;
        }
        let env = TestEnv::new();
        let dir = env.path();
        let alice = genpkey(
            dir,
            "alice.pem",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        );
        let bob = genpkey(dir, "bob.pem", &["-algorithm", "ed25519"]);
        let carol = genpkey(
            dir,
            "carol.pem",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        );
        env.init_token("approvers");
        env.import_key("approvers", &carol, "carol", "0c");
        let mut approvers = String::new();
        for (name, key) in [("alice", &alice), ("bob", &bob), ("carol", &carol)] {
            approvers.push_str(&format!(
                "[approvers.{name}]\npublic_key = \"{}\"\n",
                public_pem(key).display()
            ));
        }
        // The private key of carol lives in the token only.
        std::fs::remove_file(&carol).expect("remove carol's PEM");
        let pin = write_secret(dir, "ca.pin", ROLE_PIN);
        let roles = format!(
            "[limits]\nper_ip = {{ per_minute = 60000, burst = 5000 }}\n\n\
             [roles.ca]\nmethods = [\"static-fingerprint\"]\npin = \"file:{}\"\nfingerprint_bind_address = false\n\
             fingerprints = [\"{}\"]\n\
             policy = {{ keys = [{{ label = \"ca-*\", ops = [\"sign\"] }}], quorum = [{{ label = \"ca-*\", ops = [\"sign\"], m = 2, approvers = [\"alice\", \"bob\", \"carol\"], ttl_s = 600 }}] }}\n",
            pin.display(),
            identity().1
        );
        let broker = TestBroker::start(&format!("{}{approvers}", broker_toml(dir, &roles)));
        let token = approval_token(&broker.url());
        Some(Quorum {
            env,
            broker,
            alice,
            bob,
            token,
        })
    }

    /// Files a request as the module does: POST /v1/approvals with the
    /// approval token; returns its id.
    fn request(&self, label: &str, data: &[u8]) -> String {
        let n = NewApproval {
            v: 1,
            key: ApprovalKey {
                label: Some(label.into()),
                id: Some("01".into()),
                class: Some(3),
                key_type: Some(0),
                unique_id: None,
                fingerprint: sha256_hex(label.as_bytes()),
            },
            op: "sign".into(),
            mechanism: Some(0x40),
            data_sha256: Some(sha256_hex(data)),
        };
        let r = http()
            .post(format!("{}{APPROVALS_PATH}", self.broker.url()))
            .header("authorization", format!("Bearer {}", self.token))
            .json(&n)
            .send()
            .expect("post approval");
        assert_eq!(r.status().as_u16(), 201);
        let a: Approval = r.json().expect("approval");
        a.id
    }

    fn get(&self, id: &str) -> Approval {
        http()
            .get(format!("{}{APPROVALS_PATH}/{id}", self.broker.url()))
            .send()
            .expect("get approval")
            .json()
            .expect("approval")
    }

    /// `p11shim approve ARGS --broker URL`.
    fn cli(&self, args: &[&str]) -> Output {
        let url = self.broker.url();
        let mut a = args.to_vec();
        a.extend_from_slice(&["--broker", &url]);
        cli(&self.env, &a)
    }
}

/// A credentials exchange as the module makes it; returns the approval
/// token sealed in the credentials.
fn approval_token(url: &str) -> String {
    sealed_exchange(url, "ca", "approve-cli-0", identity().0, [7u8; 32])
        .approval_token
        .expect("a role with quorum rules is given an approval token")
        .expose()
        .to_owned()
}

#[test]
fn two_of_three_through_list_show_openssl_submit_and_a_token_key() {
    let Some(q) = Quorum::start() else { return };
    let dir = q.env.path();
    let id = q.request("ca-root", b"tbs certificate 1");

    // list: the request, checked, 0 of 2.
    let o = q.cli(&["approve", "list"]);
    assert_code(&o, 0);
    let out = text(&o.stdout);
    let row = out
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} not listed:\n{out}"));
    for col in [
        "ca",
        "ca-root",
        "sign",
        "CKM_SHA256_RSA_PKCS",
        "0/2",
        "pending",
    ] {
        assert!(row.split_whitespace().any(|c| c == col), "{col:?} in {row}");
    }
    let o = q.cli(&["approve", "list", "--json"]);
    assert_code(&o, 0);
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["approvals"][0]["id"], id.as_str());
    assert_eq!(v["approvals"][0]["verified"], true);
    let o = q.cli(&["approve", "list", "--status", "approved"]);
    assert_code(&o, 0);
    assert!(!text(&o.stdout).contains(&id));

    // show --data-out writes exactly approval_data; openssl signs it;
    // submit posts the signature.
    let req = dir.join("req.txt");
    let o = q.cli(&["approve", "show", &id, "--data-out", req.to_str().unwrap()]);
    assert_code(&o, 0);
    let shown = text(&o.stdout);
    let a = q.get(&id);
    for want in [
        a.digest.as_str(),
        &sha256_hex(b"tbs certificate 1"),
        "ca-root",
        &a.subject,
        "0 of 2 needed",
    ] {
        assert!(shown.contains(want), "{want:?} in\n{shown}");
    }
    let data = std::fs::read(&req).unwrap();
    assert_eq!(p11shim_proto::b64_std().encode(&data), a.approval_data);
    let sig = dir.join("alice.sig");
    run_ok(Command::new("openssl").args([
        "dgst",
        "-sha256",
        "-sign",
        q.alice.to_str().unwrap(),
        "-out",
        sig.to_str().unwrap(),
        req.to_str().unwrap(),
    ]));
    let o = q.cli(&[
        "approve",
        "submit",
        &id,
        "--approver",
        "alice",
        "--signature",
        sig.to_str().unwrap(),
    ]);
    assert_code(&o, 0);
    assert!(
        text(&o.stdout).contains("1 of 2 approvals"),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(q.get(&id).status.as_str(), "pending");

    // alice again: refused before anything is sent.
    let o = q.cli(&[
        "approve",
        "submit",
        &id,
        "--approver",
        "alice",
        "--signature",
        sig.to_str().unwrap(),
    ]);
    assert_code(&o, 1);
    assert!(
        text(&o.stderr).contains("alice already approved"),
        "{}",
        text(&o.stderr)
    );

    // carol signs with her key in SoftHSM2: approved at 2 of 3.
    let module = softhsm_lib();
    let o = q.cli(&[
        "approve",
        "sign",
        &id,
        "--approver",
        "carol",
        "--key",
        "pkcs11:token=approvers;object=carol;type=private",
        "--module",
        module.to_str().unwrap(),
        "--pin-source",
        "env:APPROVER_PIN",
        "--json",
    ]);
    assert_code(&o, 0);
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (
            v["status"].as_str(),
            v["approvals"].as_u64(),
            v["m"].as_u64()
        ),
        (Some("approved"), Some(2), Some(2)),
        "{v}"
    );
    let a = q.get(&id);
    assert_eq!(a.status.as_str(), "approved");
    let names: Vec<&str> = a.approvals.iter().map(|s| s.approver.as_str()).collect();
    assert_eq!(names, ["alice", "carol"]);

    // bob comes too late: the CLI says so and signs nothing.
    let o = q.cli(&[
        "approve",
        "sign",
        &id,
        "--approver",
        "bob",
        "--key",
        q.bob.to_str().unwrap(),
    ]);
    assert_code(&o, 1);
    assert!(
        text(&o.stderr).contains("is approved"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn rejections_refusals_of_the_broker_and_usage() {
    let Some(q) = Quorum::start() else { return };
    let dir = q.env.path();
    let id = q.request("ca-root", b"tbs certificate 2");

    // A signature that does not verify with bob's registered key (alice's
    // over the right bytes): the broker's `denied`, exit 1, one line.
    let req = dir.join("req.txt");
    assert_code(
        &q.cli(&["approve", "show", &id, "--data-out", req.to_str().unwrap()]),
        0,
    );
    let sig = dir.join("forged.sig");
    run_ok(Command::new("openssl").args([
        "dgst",
        "-sha256",
        "-sign",
        q.alice.to_str().unwrap(),
        "-out",
        sig.to_str().unwrap(),
        req.to_str().unwrap(),
    ]));
    let o = q.cli(&[
        "approve",
        "submit",
        &id,
        "--approver",
        "bob",
        "--signature",
        sig.to_str().unwrap(),
    ]);
    assert_code(&o, 1);
    let err = text(&o.stderr);
    assert!(
        err.contains("denied") && err.contains("broker request id") && err.lines().count() == 1,
        "{err}"
    );
    // Not an approver of the request: said by the CLI.
    let o = q.cli(&[
        "approve",
        "sign",
        &id,
        "--approver",
        "mallory",
        "--key",
        q.alice.to_str().unwrap(),
    ]);
    assert_code(&o, 1);
    assert!(
        text(&o.stderr).contains("mallory is not an approver"),
        "{}",
        text(&o.stderr)
    );
    // No such request: the broker's `not_found`.
    let o = q.cli(&["approve", "show", "apr_00000000000000000000000000000000"]);
    assert_code(&o, 1);
    assert!(
        text(&o.stderr).contains("no approval request apr_0000"),
        "{}",
        text(&o.stderr)
    );
    // Usage: a malformed id, a missing --approver.
    assert_code(&q.cli(&["approve", "show", "apr/../x"]), 2);
    assert_code(&q.cli(&["approve", "sign", &id, "--key", "k.pem"]), 2);

    // bob rejects with his Ed25519 key: one rejection of the two that make
    // 2 of 3 unreachable.
    let o = q.cli(&[
        "approve",
        "reject",
        &id,
        "--approver",
        "bob",
        "--key",
        q.bob.to_str().unwrap(),
        "--yes",
    ]);
    assert_code(&o, 0);
    assert!(
        text(&o.stdout).contains("1 rejection(s); status pending"),
        "{}",
        text(&o.stdout)
    );
    // alice rejects offline: the rejection bytes, sign-file, submit --reject.
    let rej = dir.join("reject.txt");
    assert_code(
        &q.cli(&[
            "approve",
            "show",
            &id,
            "--data-out",
            rej.to_str().unwrap(),
            "--reject",
        ]),
        0,
    );
    let sig = sign_file(&q.env, &rej, q.alice.to_str().unwrap(), &["--base64"]);
    let o = q.cli(&[
        "approve",
        "submit",
        &id,
        "--approver",
        "alice",
        "--signature",
        sig.to_str().unwrap(),
        "--reject",
    ]);
    assert_code(&o, 0);
    assert!(
        text(&o.stdout).contains("status rejected"),
        "{}",
        text(&o.stdout)
    );
    let a = q.get(&id);
    assert_eq!((a.status.as_str(), a.rejections.len()), ("rejected", 2));
    // Rejected: nothing left to decide.
    let o = q.cli(&["approve", "list", "--status", "rejected"]);
    assert_code(&o, 0);
    assert!(text(&o.stdout).contains(&id));
}

/// A fake broker on 127.0.0.1 answering every request with `body` (200),
/// recording the request lines; at most `max` connections.
fn fake_broker(body: String, max: usize) -> (String, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = tx.send(first.trim_end().to_owned());
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, rx)
}

#[test]
fn a_broker_showing_one_request_and_asking_to_sign_another_is_refused() {
    let Some(q) = Quorum::start() else { return };
    let id = q.request("ca-root", b"tbs certificate 3");
    let honest = q.get(&id);
    // Shown: a harmless data hash; signed: the real request's bytes.
    let mut tampered = serde_json::to_value(&honest).unwrap();
    tampered["data_sha256"] = Value::String(sha256_hex(b"the harmless thing"));
    let (url, requests) = fake_broker(tampered.to_string(), 2);
    for args in [
        vec!["approve", "show", &id],
        vec![
            "approve",
            "sign",
            &id,
            "--approver",
            "alice",
            "--key",
            q.alice.to_str().unwrap(),
            "--yes",
        ],
    ] {
        let mut a = args.clone();
        a.extend_from_slice(&["--broker", &url]);
        let o = cli(&q.env, &a);
        assert_code(&o, 1);
        let err = text(&o.stderr);
        assert!(
            err.contains(&format!("refusing {id}")) && err.contains("data-sha256"),
            "{err}"
        );
    }
    let list = serde_json::json!({ "v": 1, "approvals": [tampered] }).to_string();
    let (url, _) = fake_broker(list, 1);
    let o = cli(&q.env, &["approve", "list", "--broker", &url]);
    assert_code(&o, 1);
    assert!(text(&o.stdout).contains("INVALID"), "{}", text(&o.stdout));
    // Only reads reached the fake broker: nothing was signed and posted.
    let seen: Vec<String> = requests.try_iter().collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|r| r.starts_with("GET ")), "{seen:?}");
    // The real broker still has it pending, untouched.
    assert_eq!(q.get(&id).approvals.len(), 0);
}
