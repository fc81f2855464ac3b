//! Quorum (m-of-n) approval of key use, end to end: a role's policy at the
//! broker puts a CA key under a 2-of-3 rule with an RSA approver (a PEM
//! file), an Ed25519 approver and an approver whose RSA key lives in a
//! SoftHSM2 token; real clients (pkcs11-tool, Java's SunPKCS11) sign
//! through p11shim, approvers decide with `p11shim approve` and
//! `pkcs11-tool`, and every signature is verified.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use p11shim_tests::peers::broker::{
    TestBroker, broker_toml, fingerprint_role, module_broker, write_secret,
};
use p11shim_tests::{TestEnv, USER_PIN, p11shim_lib, repo_root, require, run_ok, softhsm_lib};
use serde_json::Value;

mod common;
use common::{compile_java, openssl_verify, sunpkcs11_cfg, text, write};

const TOKEN: &str = "ca";
const CAROL_TOKEN: &str = "carol";

struct Setup {
    env: TestEnv,
    broker: TestBroker,
    ca_pub: PathBuf,
    alice: PathBuf,
    bob: PathBuf,
}

fn cli() -> PathBuf {
    let p = p11shim_tests::target_dir().join("p11shim");
    assert!(
        p.exists(),
        "{} missing: cargo build -p p11shim-cli",
        p.display()
    );
    p
}

fn openssl(args: &[&str]) {
    run_ok(Command::new("openssl").args(args));
}

/// Approver keys: alice RSA-2048 (PEM), bob Ed25519 (PEM), carol RSA-2048
/// generated inside a SoftHSM2 token; their public keys for the broker.
fn approver_keys(env: &TestEnv) -> (PathBuf, PathBuf, PathBuf, PathBuf, PathBuf) {
    let d = env.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (alice, alice_pub) = (d.join("alice.pem"), d.join("alice.pub.pem"));
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &s(&alice),
    ]);
    openssl(&["pkey", "-in", &s(&alice), "-pubout", "-out", &s(&alice_pub)]);
    let (bob, bob_pub) = (d.join("bob.pem"), d.join("bob.pub.pem"));
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", &s(&bob)]);
    openssl(&["pkey", "-in", &s(&bob), "-pubout", "-out", &s(&bob_pub)]);
    env.init_token(CAROL_TOKEN);
    run_ok(
        env.command("pkcs11-tool")
            .arg("--module")
            .arg(softhsm_lib())
            .args(["--token-label", CAROL_TOKEN, "--login", "--pin", USER_PIN])
            .args([
                "--keypairgen",
                "--key-type",
                "rsa:2048",
                "--id",
                "01",
                "--label",
                "carol",
            ]),
    );
    let carol_der = d.join("carol.pub.der");
    run_ok(
        env.command("pkcs11-tool")
            .arg("--module")
            .arg(softhsm_lib())
            .args([
                "--token-label",
                CAROL_TOKEN,
                "--read-object",
                "--type",
                "pubkey",
                "--id",
                "01",
                "-o",
            ])
            .arg(&carol_der),
    );
    let carol_pub = d.join("carol.pub.pem");
    openssl(&[
        "pkey",
        "-pubin",
        "-inform",
        "DER",
        "-in",
        &s(&carol_der),
        "-out",
        &s(&carol_pub),
    ]);
    (alice, alice_pub, bob, bob_pub, carol_pub)
}

fn setup(wait_ms: u64) -> Setup {
    let env = TestEnv::new();
    env.init_token(TOKEN);
    let ca_pub = env.add_signing_key(TOKEN, "ca-root", "0a");
    let (alice, alice_pub, bob, bob_pub, carol_pub) = approver_keys(&env);
    let pin_file = write_secret(env.path(), "role.pin", USER_PIN);
    let role = fingerprint_role(
        "ca",
        &pin_file,
        &format!(
            "policy = {{ keys = [{{ label = \"ca-*\", ops = [\"sign\", \"verify\"] }}], quorum = [{{ label = \"ca-root\", class = \"private-key\", ops = [\"sign\"], m = 2, approvers = [\"alice\", \"bob\", \"carol\"], wait_ms = {wait_ms} }}] }}\n"
        ),
    );
    let approvers = format!(
        "[approvers.alice]\npublic_key = \"{}\"\n[approvers.bob]\npublic_key = \"{}\"\n[approvers.carol]\npublic_key = \"{}\"\n",
        alice_pub.display(),
        bob_pub.display(),
        carol_pub.display()
    );
    let broker = TestBroker::start(&broker_toml(env.path(), &format!("{role}\n{approvers}")));
    env.write_config(&format!(
        "[log]\nlevel = \"info\"\nfile = \"{}\"\n\n[[slot]]\nid = 0\nlabel = \"{TOKEN}\"\npin = \"broker\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN}\"\n\n{}\n[acl]\nsource = \"broker\"\n\n[audit]\nfile = \"{}\"\nfsync = \"always\"\n",
        env.path().join("p11shim.log").display(),
        softhsm_lib().display(),
        module_broker(
            &broker.url(),
            "ca",
            "static-fingerprint",
            &format!("nonce_file = \"{}\"", env.path().join("nonce").display())
        ),
        env.path().join("audit.jsonl").display(),
    ));
    Setup {
        env,
        broker,
        ca_pub,
        alice,
        bob,
    }
}

impl Setup {
    fn approve(&self, args: &[&str]) -> std::process::Output {
        Command::new(cli())
            .arg("approve")
            .args(args)
            .args(["--broker", &self.broker.url()])
            .env("NO_COLOR", "1")
            .output()
            .expect("p11shim approve")
    }

    fn pending(&self) -> Vec<Value> {
        let out = self.approve(&["list", "--status", "pending", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let v: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
        v["approvals"].as_array().cloned().unwrap_or_default()
    }

    /// pkcs11-tool signs `msg` with the CA key, no PIN anywhere.
    fn sign(&self, msg: &Path, sig: &Path) -> std::process::Output {
        self.env
            .command("pkcs11-tool")
            .arg("--module")
            .arg(p11shim_lib())
            .args([
                "--login",
                "--sign",
                "--id",
                "0a",
                "-m",
                "SHA256-RSA-PKCS",
                "-i",
            ])
            .arg(msg)
            .arg("-o")
            .arg(sig)
            .output()
            .expect("pkcs11-tool")
    }
}

/// pkcs11-tool failed with CKR_FUNCTION_REJECTED (it prints the number).
fn rejected(out: &std::process::Output) -> bool {
    let t = text(out);
    !out.status.success() && (t.contains("CKR_FUNCTION_REJECTED") || t.contains("(0x200)"))
}

#[test]
fn two_of_three_approve_one_signature_and_only_one() {
    if !require("pkcs11-tool") || !require("openssl") {
        return;
    }
    let s = setup(0);
    let msg = write(&s.env, "tbs.txt", "certificate to be signed\n");
    let sig = s.env.path().join("tbs.sig");

    // No approval yet: refused at once, and the request is filed.
    let out = s.sign(&msg, &sig);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(rejected(&out), "{}", text(&out));
    let pending = s.pending();
    assert_eq!(pending.len(), 1, "{pending:?}");
    let req = &pending[0];
    let id = req["id"].as_str().unwrap().to_string();
    assert_eq!(req["key"]["label"], "ca-root");
    assert_eq!(req["op"], "sign");
    assert_eq!(req["role"], "ca");
    let log = std::fs::read_to_string(s.env.path().join("p11shim.log")).unwrap();
    assert!(
        log.contains(&id),
        "the module's log names the request: {log}"
    );

    // alice approves with her PEM key: one of two.
    let out = s.approve(&[
        "sign",
        &id,
        "--approver",
        "alice",
        "--key",
        s.alice.to_str().unwrap(),
        "--yes",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // One approval only: still refused, same request.
    let out = s.sign(&msg, &sig);
    assert!(rejected(&out), "{}", text(&out));
    assert_eq!(s.pending().len(), 1);
    // alice again: a duplicate approver is refused.
    let out = s.approve(&[
        "sign",
        &id,
        "--approver",
        "alice",
        "--key",
        s.alice.to_str().unwrap(),
        "--yes",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    // Someone not registered, and a bad signature, are refused.
    let out = s.approve(&[
        "sign",
        &id,
        "--approver",
        "mallory",
        "--key",
        s.alice.to_str().unwrap(),
        "--yes",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let junk = write(&s.env, "junk.sig", [7u8; 256]);
    let out = s.approve(&[
        "submit",
        &id,
        "--approver",
        "carol",
        "--signature",
        junk.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{}", text(&out));

    // carol signs the approval data with her key in a SoftHSM2 token,
    // through pkcs11-tool, and submits the signature.
    let data = s.env.path().join("approval.bin");
    let out = s.approve(&["show", &id, "--data-out", data.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let carol_sig = s.env.path().join("carol.sig");
    run_ok(
        s.env
            .command("pkcs11-tool")
            .arg("--module")
            .arg(softhsm_lib())
            .args(["--token-label", CAROL_TOKEN, "--login", "--pin", USER_PIN])
            .args(["--sign", "-m", "SHA256-RSA-PKCS", "--id", "01", "-i"])
            .arg(&data)
            .arg("-o")
            .arg(&carol_sig),
    );
    let out = s.approve(&[
        "submit",
        &id,
        "--approver",
        "carol",
        "--signature",
        carol_sig.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(s.pending().is_empty());

    // Approved: the same call now signs, and the signature verifies.
    let out = s.sign(&msg, &sig);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        std::fs::read_to_string(s.env.path().join("p11shim.log")).unwrap_or_default()
    );
    openssl_verify(&s.env, &s.ca_pub, &msg, &sig);

    // The approval was consumed: signing again needs a new one.
    let out = s.sign(&msg, &sig);
    assert!(rejected(&out), "{}", text(&out));
    let again = s.pending();
    assert_eq!(again.len(), 1);
    assert_ne!(again[0]["id"].as_str().unwrap(), id);
    // Other data is another request too.
    let other = write(&s.env, "other.txt", "another certificate\n");
    let out = s.sign(&other, &sig);
    assert!(rejected(&out), "{}", text(&out));
    assert_eq!(s.pending().len(), 2);

    // The audit log holds the story: requests, the consumption with its
    // approvers, the refusals.
    let records: Vec<Value> = std::fs::read_to_string(s.env.path().join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let consumed: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "approval" && r["function"] == "approval_consumed")
        .collect();
    assert_eq!(consumed.len(), 1, "{records:#?}");
    let detail = consumed[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&id) && detail.contains("alice@") && detail.contains("carol@"),
        "{detail}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "approval" && r["function"] == "approval_refused")
    );
    assert!(
        records.iter().any(|r| r["kind"] == "key_use"
            && r["function"] == "C_Sign"
            && r["result"] == "CKR_OK")
    );
    let _ = &s.bob;
}

#[test]
fn java_waits_for_approval_then_signs() {
    if !require("java") || !require("javac") {
        return;
    }
    let s = setup(60_000);
    let cfg = sunpkcs11_cfg(&s.env);
    let classes = compile_java(&s.env, "AclSign.java");
    let mut java = s
        .env
        .command("java")
        .arg("-cp")
        .arg(&classes)
        .arg("AclSign")
        .arg(&cfg)
        .args(["-", "ca-root"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("java");
    // The signature waits: the request appears at the broker.
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        if let Some(r) = s.pending().first() {
            break r["id"].as_str().unwrap().to_string();
        }
        if let Ok(Some(st)) = java.try_wait() {
            panic!("java ended before asking for approval: {st}");
        }
        assert!(Instant::now() < deadline, "no approval request from Java");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        java.try_wait().unwrap().is_none(),
        "Java waits for approval"
    );
    for (who, key) in [("alice", &s.alice), ("bob", &s.bob)] {
        let out = s.approve(&[
            "sign",
            &id,
            "--approver",
            who,
            "--key",
            key.to_str().unwrap(),
            "--yes",
        ]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let out = java.wait_with_output().expect("java");
    let t = text(&out);
    assert!(out.status.success() && t.contains("SIGNED ca-root"), "{t}");
    let _ = repo_root();
}
