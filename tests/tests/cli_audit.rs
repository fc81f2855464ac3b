//! `p11shim acl explain` and `p11shim audit verify|tail` through the built
//! binary: the key ACL's decisions for attributes, for a broker role and
//! for a real key on a SoftHSM2 token; a real audit log written by the
//! module while pkcs11-tool signs, verified intact and after each kind of
//! tampering; its last records and new ones as they are appended.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use p11shim_tests::peers::broker::{broker_toml, fingerprint_role, write_secret};
use p11shim_tests::{TestEnv, USER_PIN, require, run_ok, target_dir};
use serde_json::Value;

mod common;
use common::pkcs11_tool_sign_without_pin;

const TOKEN: &str = "shared";

/// The CLI built next to the test binary (`cargo build -p p11shim-cli`;
/// `make test` does).
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
    env.command(cli_bin().to_str().expect("utf-8 path"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run p11shim")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
fn assert_code(o: &Output, want: i32) {
    assert_eq!(
        o.status.code(),
        Some(want),
        "--- stdout\n{}\n--- stderr\n{}",
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", stdout(o)))
}

/// The indices of the rules an explanation marks as deciding.
fn deciding(v: &Value) -> Vec<u64> {
    v["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|r| r["decides"] == true)
        .map(|r| r["index"].as_u64().expect("index"))
        .collect()
}

// ---------------------------------------------------------------------------
// acl explain

const ROLES: &str = r#"
[acl]
role = "web"

[acl.roles.web]
keys = [
  { label = "tls-*", class = "private-key", ops = ["sign"], mechanisms = ["RSA_PKCS_PSS", "SHA256_RSA_PKCS_PSS"] },
  { label = "tls-*", class = "certificate" },
  { id = "0a0b", class = "secret-key", ops = ["encrypt", "decrypt"] },
]

[acl.roles.db]
keys = [{ label = "db-*", ops = ["sign"] }]
"#;

/// A one-slot configuration over `TOKEN` with the roles above; `extra`
/// goes into the slot table.
fn acl_config(env: &TestEnv, extra: &str) -> PathBuf {
    env.single_slot_config("p11shim", TOKEN, extra, "");
    let cfg = std::fs::read_to_string(env.config_path()).expect("config");
    env.write_config(&format!("{cfg}\n{ROLES}"))
}

#[test]
fn acl_explain_allows_and_names_the_deciding_rule() {
    let env = TestEnv::new();
    let cfg = acl_config(&env, "");
    let key = "label=tls-web,class=private-key,key_type=rsa,id=01";
    let cfg = cfg.to_str().unwrap();
    let args = [
        "acl",
        "explain",
        "web",
        key,
        "sign",
        "--mechanism",
        "SHA256_RSA_PKCS_PSS",
        "--config",
        cfg,
    ];
    let o = cli(&env, &args);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("ALLOW CKR_OK"), "{out}");
    // The deciding rule is marked; the certificate rule says why it does not select.
    assert!(
        out.contains(
            "* keys[0] { label = \"tls-*\", class = \"CKO_PRIVATE_KEY\", ops = [\"sign\"]"
        ),
        "{out}"
    );
    assert!(
        out.contains("does not select: class CKO_CERTIFICATE is not CKO_PRIVATE_KEY"),
        "{out}"
    );
    let v = json(&cli(&env, &[&args[..], &["--json"]].concat()));
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["rv"], "CKR_OK");
    assert_eq!(v["mechanism"], "CKM_SHA256_RSA_PKCS_PSS");
    assert_eq!(v["key"]["key_type"], "CKK_RSA");
    assert_eq!(deciding(&v), [0]);
    assert_eq!(v["rules"][1]["mismatch"], "class");
    assert_eq!(v["rules"][2]["mismatch"], "id");
    // Without --config: the module's own lookup (P11SHIM_CONFIG).
    let o = cli(&env, &args[..7]);
    assert_code(&o, 0);
}

#[test]
fn acl_explain_denials_give_the_applications_return_code() {
    let env = TestEnv::new();
    let cfg = acl_config(&env, "");
    let cfg = cfg.to_str().unwrap();
    let explain = |role: &str, key: &str, op: &str, mech: Option<&str>| {
        let mut a = vec!["acl", "explain", role, key, op, "--config", cfg, "--json"];
        if let Some(m) = mech {
            a.extend(["--mechanism", m]);
        }
        let o = cli(&env, &a);
        assert_code(&o, 1);
        json(&o)
    };
    let rsa = "label=tls-web,class=private-key,key_type=rsa,id=01";

    // The operation: visible, but no rule grants decrypt.
    let v = explain("web", rsa, "decrypt", None);
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["rv"], "CKR_KEY_FUNCTION_NOT_PERMITTED");
    assert_eq!(v["reason"], "no rule grants decrypt");
    assert_eq!(deciding(&v), [0], "the rule that selects the key decides");
    // A certificate the role sees, with no operation at all.
    let v = explain("web", "label=tls-web,class=certificate", "sign", None);
    assert_eq!(v["rv"], "CKR_KEY_FUNCTION_NOT_PERMITTED");
    assert_eq!(deciding(&v), [1]);

    // The mechanism: sign is granted with PSS only.
    let v = explain("web", rsa, "sign", Some("CKM_SHA256_RSA_PKCS"));
    assert_eq!(v["rv"], "CKR_MECHANISM_INVALID");
    assert_eq!(
        v["reason"],
        "sign is granted, but not with CKM_SHA256_RSA_PKCS"
    );
    assert_eq!(deciding(&v), [0]);
    assert_eq!(v["rules"][0]["grants_op"], true);
    assert_eq!(v["rules"][0]["mechanism_ok"], false);

    // Invisible: no rule selects another role's key.
    let v = explain(
        "web",
        "label=db-key,class=private-key,key_type=rsa",
        "sign",
        None,
    );
    assert_eq!(v["invisible"], true);
    assert_eq!(v["rv"], "CKR_KEY_HANDLE_INVALID");
    assert!(deciding(&v).is_empty());
    assert_eq!(v["rules"][0]["mismatch"], "label");
    let v = explain("web", "label=db-key,class=private-key", "destroy", None);
    assert_eq!(v["rv"], "CKR_OBJECT_HANDLE_INVALID");
    // ... which is the other role's to sign with.
    let o = cli(
        &env,
        &[
            "acl",
            "explain",
            "db",
            "label=db-key,class=private-key",
            "sign",
            "--config",
            cfg,
        ],
    );
    assert_code(&o, 0);

    // The human form of an invisible key.
    let o = cli(
        &env,
        &[
            "acl",
            "explain",
            "web",
            "label=db-key",
            "sign",
            "--config",
            cfg,
        ],
    );
    assert_code(&o, 1);
    assert!(
        stdout(&o).contains("DENY invisible: CKR_KEY_HANDLE_INVALID"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn acl_explain_usage_errors_exit_2_and_unreadable_configs_3() {
    let env = TestEnv::new();
    let cfg = acl_config(&env, "");
    let cfg = cfg.to_str().unwrap();
    for args in [
        &["acl", "explain", "web", "label=x", "sing", "--config", cfg][..],
        &[
            "acl",
            "explain",
            "web",
            "label=x",
            "sign",
            "--mechanism",
            "RSA_NOPE",
        ],
        &["acl", "explain", "web", "tls-web", "sign", "--config", cfg],
        &[
            "acl", "explain", "nobody", "label=x", "sign", "--config", cfg,
        ],
        &["acl", "explain", "web", "label=x", "sign", "--slot", "0"],
    ] {
        assert_code(&cli(&env, args), 2);
    }
    let o = cli(
        &env,
        &[
            "acl",
            "explain",
            "web",
            "label=x",
            "sign",
            "--config",
            "/nonexistent.toml",
        ],
    );
    assert_code(&o, 3);
}

#[test]
fn acl_explain_a_broker_roles_policy() {
    let env = TestEnv::new();
    let pin = write_secret(env.path(), "broker.pin", "s3cret-broker-pin");
    let broker = env.path().join("broker.toml");
    let policy = r#"policy = { keys = [{ label = "pay-*", key_type = "ec", ops = ["sign"], mechanisms = ["ECDSA"] }] }"#;
    std::fs::write(
        &broker,
        broker_toml(env.path(), &fingerprint_role("payments", &pin, policy)),
    )
    .unwrap();
    let b = broker.to_str().unwrap();
    // No module configuration is needed for attributes.
    let o = cli(
        &env,
        &[
            "acl",
            "explain",
            "payments",
            "label=pay-1,class=private-key,key_type=ec",
            "sign",
            "--mechanism",
            "ECDSA",
            "--broker",
            b,
            "--json",
        ],
    );
    assert_code(&o, 0);
    let v = json(&o);
    assert_eq!(v["source"]["kind"], "broker");
    assert_eq!(deciding(&v), [0]);
    let o = cli(
        &env,
        &[
            "acl",
            "explain",
            "payments",
            "label=pay-1,class=private-key,key_type=rsa",
            "sign",
            "--broker",
            b,
        ],
    );
    assert_code(&o, 1);
    assert!(
        stdout(&o).contains("does not select: key_type CKK_ECDSA is not CKK_RSA"),
        "{}",
        stdout(&o)
    );
    let o = cli(
        &env,
        &["acl", "explain", "other", "label=x", "sign", "--broker", b],
    );
    assert_code(&o, 3);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no role \"other\" (defined: payments)"));
    // The PIN is never shown.
    assert!(
        !stdout(&o).contains("s3cret") && !String::from_utf8_lossy(&o.stderr).contains("s3cret")
    );
}

#[test]
fn acl_explain_a_real_key_by_its_pkcs11_uri() {
    require("pkcs11-tool");
    let env = TestEnv::new();
    env.init_token(TOKEN);
    env.add_signing_key(TOKEN, "tls-web", "01");
    env.add_signing_key(TOKEN, "db-key", "02");
    let pin = write_secret(env.path(), "user.pin", USER_PIN);
    let cfg = acl_config(&env, &format!("pin = \"file:{}\"", pin.display()));
    let cfg = cfg.to_str().unwrap();
    let explain = |uri: &str, op: &str, mech: &str| {
        cli(
            &env,
            &[
                "acl",
                "explain",
                "web",
                uri,
                op,
                "--token-key",
                "--mechanism",
                mech,
                "--config",
                cfg,
                "--json",
            ],
        )
    };
    // The private key (found only after login, with the slot's PIN file).
    let o = explain("pkcs11:object=tls-web;type=private", "sign", "RSA_PKCS_PSS");
    assert_code(&o, 0);
    let v = json(&o);
    assert_eq!(v["key"]["class"], "CKO_PRIVATE_KEY");
    assert_eq!(v["key"]["key_type"], "CKK_RSA", "read from the token");
    assert_eq!(v["key"]["id"], "01");
    assert_eq!(v["key"]["slot"], 0);
    assert!(v["key"]["member"].as_str().unwrap().contains(TOKEN), "{v}");
    assert_eq!(deciding(&v), [0]);
    // By id and the virtual slot's label (what applications see).
    let o = explain(
        "pkcs11:token=p11shim;id=%01;type=private",
        "sign",
        "RSA_PKCS",
    );
    assert_code(&o, 1);
    assert_eq!(json(&o)["rv"], "CKR_MECHANISM_INVALID");
    // The member token's own label works too.
    let o = explain(
        &format!("pkcs11:token={TOKEN};object=tls-web;type=cert"),
        "sign",
        "RSA_PKCS_PSS",
    );
    assert_code(&o, 1);
    assert_eq!(json(&o)["rv"], "CKR_KEY_FUNCTION_NOT_PERMITTED");
    // Another role's key: invisible.
    let o = explain("pkcs11:object=db-key;type=private", "sign", "RSA_PKCS_PSS");
    assert_code(&o, 1);
    let v = json(&o);
    assert_eq!(v["invisible"], true);
    assert_eq!(v["key"]["label"], "db-key");
    // Ambiguous (key pair and certificate share the label): a usage error
    // listing them.
    let o = explain("pkcs11:object=tls-web", "sign", "RSA_PKCS_PSS");
    assert_code(&o, 2);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("matches 3 objects"), "{err}");
    assert!(
        err.contains("CKO_CERTIFICATE") && err.contains("CKO_PUBLIC_KEY"),
        "{err}"
    );
    // Absent, and a PIN on the command line: refused.
    assert_code(&explain("pkcs11:object=nope", "sign", "RSA_PKCS_PSS"), 3);
    let o = explain(
        "pkcs11:object=tls-web;type=private?pin-value=1234",
        "sign",
        "RSA_PKCS_PSS",
    );
    assert_code(&o, 2);
    // The PIN given there is not echoed.
    assert!(!String::from_utf8_lossy(&o.stderr).contains("1234"));
}

// ---------------------------------------------------------------------------
// audit verify and tail

/// A token holding `rsa` (id 01), the module configured with a PIN file,
/// an ACL and an audit log signed with a fresh Ed25519 key (checkpoints
/// every 2 records). Returns the audit file and the public key (PEM).
fn audited(env: &TestEnv, extra: &str) -> (PathBuf, PathBuf) {
    env.token_with_signing_key(TOKEN);
    let pin = write_secret(env.path(), "user.pin", USER_PIN);
    let key = env.path().join("audit-ed25519.pem");
    run_ok(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&key),
    );
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let public = env.path().join("audit-ed25519.pub.pem");
    run_ok(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public),
    );
    let file = env.path().join("audit.log");
    env.single_slot_config(
        "p11shim",
        TOKEN,
        &format!("pin = \"file:{}\"", pin.display()),
        "",
    );
    let cfg = std::fs::read_to_string(env.config_path()).unwrap();
    env.write_config(&format!(
        "{cfg}\n[acl]\nrole = \"web\"\n[acl.roles.web]\nkeys = [{{ label = \"rsa\", ops = [\"sign\"] }}]\n\n[audit]\nfile = \"{}\"\nfsync = \"always\"\ncheckpoint_records = 2\nsigning_key = \"file:{}\"\n{extra}\n",
        file.display(),
        key.display()
    ));
    (file, public)
}

/// One pkcs11-tool run signing through the module: one more chain.
fn sign(env: &TestEnv, n: u32) {
    let (_, _, out) = pkcs11_tool_sign_without_pin(env, n);
    assert!(
        out.status.success(),
        "pkcs11-tool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn put(p: &Path, ls: &[String]) {
    std::fs::write(p, ls.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

fn record(l: &str) -> Value {
    serde_json::from_str(l).unwrap()
}

/// `audit verify --json` of `file` with `public`: (exit code, report).
fn verify(env: &TestEnv, file: &Path, public: &Path, extra: &[&str]) -> (i32, Value) {
    let mut a = vec![
        "audit",
        "verify",
        file.to_str().unwrap(),
        "--public-key",
        public.to_str().unwrap(),
        "--json",
    ];
    a.extend(extra);
    let o = cli(env, &a);
    (o.status.code().expect("exit code"), json(&o))
}

/// The 1-based line of the first `key_use` record after the start of the
/// second chain, with a record after it in the same chain.
fn a_middle_record(ls: &[String]) -> usize {
    let chain2 = record(
        &ls[ls
            .iter()
            .skip(1)
            .position(|l| record(l)["seq"] == 0)
            .unwrap()
            + 1],
    )["chain"]
        .clone();
    let i = ls
        .iter()
        .position(|l| {
            let r = record(l);
            r["chain"] == chain2 && r["kind"] == "key_use"
        })
        .expect("a key_use record in the second chain");
    assert_eq!(record(&ls[i + 1])["chain"], chain2);
    i + 1
}

#[test]
fn audit_verify_a_real_log_and_every_kind_of_tampering() {
    require("pkcs11-tool");
    require("openssl");
    let env = TestEnv::new();
    let (file, public) = audited(&env, "");
    for n in 0..3 {
        sign(&env, n);
    }
    let good = lines(&file);
    assert!(good.iter().any(|l| l.contains("\"kind\":\"key_use\"")));

    // Intact: every chain terminated, every checkpoint signed and verified.
    let (code, r) = verify(&env, &file, &public, &["--strict"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["chains"].as_array().unwrap().len(), 3, "{r}");
    for c in r["chains"].as_array().unwrap() {
        assert_eq!(c["terminated"], true);
        assert!(c["checkpoints"].as_u64().unwrap() >= 2);
        assert_eq!(c["verified"], c["checkpoints"]);
    }
    assert_eq!(r["records"], good.len());
    let o = cli(
        &env,
        &[
            "audit",
            "verify",
            file.to_str().unwrap(),
            "--public-key",
            public.to_str().unwrap(),
        ],
    );
    assert_code(&o, 0);
    assert!(stdout(&o).contains("terminated"), "{}", stdout(&o));
    assert!(stdout(&o).ends_with("ok\n"), "{}", stdout(&o));

    let m = a_middle_record(&good);
    let seq = |line: usize| record(&good[line - 1])["seq"].as_u64().unwrap();
    let broken = |ls: &[String]| {
        put(&file, ls);
        let (code, r) = verify(&env, &file, &public, &[]);
        assert_eq!(code, 1, "{r}");
        r["broken"].clone()
    };

    // An edited record: the next one's `prev` no longer matches.
    let mut ls = good.clone();
    ls[m - 1] = ls[m - 1].replace("\"kind\":\"key_use\"", "\"kind\":\"login\"");
    assert_ne!(ls[m - 1], good[m - 1]);
    let b = broken(&ls);
    assert_eq!(b["line"], m + 1, "{b}");
    assert_eq!(b["seq"], seq(m) + 1);
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("hash of seq {}", seq(m))),
        "{b}"
    );
    assert_eq!(b["file"], file.to_str().unwrap());

    // A deleted line: a seq gap where it was.
    let mut ls = good.clone();
    ls.remove(m - 1);
    let b = broken(&ls);
    assert_eq!(b["line"], m, "{b}");
    assert!(b["reason"].as_str().unwrap().contains("seq gap"), "{b}");

    // Two lines swapped.
    let mut ls = good.clone();
    ls.swap(m - 1, m);
    let b = broken(&ls);
    assert_eq!(b["line"], m, "{b}");
    assert_eq!(b["seq"], seq(m) + 1);

    // A truncated last line.
    put(&file, &good);
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len - 10).unwrap();
    drop(f);
    let (code, r) = verify(&env, &file, &public, &[]);
    assert_eq!(code, 1);
    assert_eq!(r["broken"]["line"], good.len(), "{r}");
    assert!(
        r["broken"]["reason"]
            .as_str()
            .unwrap()
            .contains("incomplete last line"),
        "{r}"
    );

    // Cut at a record boundary: intact but unterminated; --strict fails.
    put(&file, &good[..good.len() - 2]);
    let (code, r) = verify(&env, &file, &public, &[]);
    assert_eq!(code, 0, "{r}");
    assert!(
        r["warnings"][0].as_str().unwrap().contains("unterminated"),
        "{r}"
    );
    let (code, _) = verify(&env, &file, &public, &["--strict"]);
    assert_eq!(code, 1);

    // Another key: its signature does not match.
    put(&file, &good);
    let other = env.path().join("other.pem");
    run_ok(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&other),
    );
    let other_pub = env.path().join("other.pub.pem");
    run_ok(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&other)
            .arg("-out")
            .arg(&other_pub),
    );
    let (code, r) = verify(&env, &file, &other_pub, &[]);
    assert_eq!(code, 1);
    assert!(
        r["broken"]["reason"]
            .as_str()
            .unwrap()
            .contains("not by the given key"),
        "{r}"
    );
    // No key at all: the chain only, which --strict does not accept.
    let o = cli(&env, &["audit", "verify", file.to_str().unwrap()]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("signatures were not checked"),
        "{}",
        stdout(&o)
    );
    assert_code(
        &cli(
            &env,
            &["audit", "verify", file.to_str().unwrap(), "--strict"],
        ),
        1,
    );
    // An HMAC key given as a literal is a usage error.
    assert_code(
        &cli(
            &env,
            &[
                "audit",
                "verify",
                file.to_str().unwrap(),
                "--hmac-key",
                "s3cret",
            ],
        ),
        2,
    );
}

#[test]
fn audit_verify_rotated_files_oldest_first() {
    require("pkcs11-tool");
    require("openssl");
    let env = TestEnv::new();
    // The module rotates: chains continue from one file into the next.
    let (file, public) = audited(&env, "rotate_bytes = 4096\nkeep = 20");
    for n in 0..8 {
        sign(&env, n);
    }
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", file.display()));
    let mut set: Vec<PathBuf> = (1..=20).map(numbered).filter(|p| p.exists()).collect();
    assert!(set.len() >= 2, "rotated into {} files", set.len() + 1);
    set.reverse();
    set.push(file.clone());
    let names: Vec<&str> = set.iter().map(|p| p.to_str().unwrap()).collect();
    let p = public.to_str().unwrap();
    let o = cli(
        &env,
        &[
            &["audit", "verify"],
            &names[..],
            &["--public-key", p, "--strict"],
        ]
        .concat(),
    );
    assert_code(&o, 0);
    let o = cli(
        &env,
        &[
            "audit",
            "verify",
            "--rotated",
            names[names.len() - 1],
            "--public-key",
            p,
            "--strict",
            "--json",
        ],
    );
    assert_code(&o, 0);
    let v = json(&o);
    assert_eq!(v["files"], serde_json::json!(names));
    assert_eq!(v["chains"].as_array().unwrap().len(), 8);
    // Newest first: a chain runs backwards, and the output says how to
    // give the files.
    let reversed: Vec<&str> = names.iter().rev().copied().collect();
    let o = cli(
        &env,
        &[&["audit", "verify"], &reversed[..], &["--public-key", p]].concat(),
    );
    assert_code(&o, 1);
    assert!(stdout(&o).contains("BROKEN"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("hint: rotated files are verified oldest first"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn audit_tail_shows_the_last_records_and_follows_new_ones() {
    require("pkcs11-tool");
    require("openssl");
    let env = TestEnv::new();
    let (file, _) = audited(&env, "");
    sign(&env, 0);
    let all = lines(&file);
    let o = cli(&env, &["audit", "tail", "-n", "3", file.to_str().unwrap()]);
    assert_code(&o, 0);
    let shown: Vec<String> = stdout(&o).lines().map(str::to_owned).collect();
    assert_eq!(shown.len(), 3, "{shown:?}");
    for (s, l) in shown.iter().zip(&all[all.len() - 3..]) {
        let r = record(l);
        let tag = format!(
            "{}:{} {}",
            &r["chain"].as_str().unwrap()[..8],
            r["seq"],
            r["kind"].as_str().unwrap()
        );
        assert!(
            s.starts_with(r["time"].as_str().unwrap()) && s.contains(&tag),
            "{s} / {l}"
        );
    }
    assert!(
        shown[2].contains(" stop ") && shown[2].contains("signed ed25519"),
        "{shown:?}"
    );
    let o = cli(
        &env,
        &["audit", "tail", "-n", "2", "--json", file.to_str().unwrap()],
    );
    assert_eq!(
        stdout(&o),
        format!("{}\n{}\n", all[all.len() - 2], all[all.len() - 1])
    );
    // The key_use line shows the function, the result, the role and the key.
    let o = cli(
        &env,
        &["audit", "tail", "-n", "100", file.to_str().unwrap()],
    );
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.contains("key_use C_Sign CKR_OK")
                && l.contains("role=web")
                && l.contains("key=\"rsa\"")
                && l.contains("mech=CKM_SHA256_RSA_PKCS")),
        "{}",
        stdout(&o)
    );

    // -f: a record appended by another module run, then one after rotation.
    let mut tail = Tail(
        env.command(cli_bin().to_str().unwrap())
            .args(["audit", "tail", "-f", "-n", "0"])
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tail -f"),
    );
    let (tx, rx) = mpsc::channel();
    let out = tail.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str| -> String {
        // Bounded: at most 60 s for the record to appear.
        for _ in 0..600 {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("tail -f never showed {what:?}");
    };
    sign(&env, 1);
    let seen = wait_for("key_use C_Sign");
    assert!(seen.contains("role=web"), "{seen}");
    wait_for(" stop ");
    std::fs::rename(&file, PathBuf::from(format!("{}.1", file.display()))).unwrap();
    sign(&env, 2);
    wait_for(" start ");
    wait_for("key_use C_Sign");
    // SIGTERM: a clean exit.
    // SAFETY: kill(2) on our own child, not reaped yet.
    assert_eq!(unsafe { libc::kill(tail.0.id() as i32, libc::SIGTERM) }, 0);
    let status = tail.0.wait().unwrap();
    assert!(status.success(), "tail -f after SIGTERM: {status:?}");
}

/// `tail -f`, killed if the test fails before it ends.
struct Tail(std::process::Child);

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
