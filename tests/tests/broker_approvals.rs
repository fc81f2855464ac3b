//! Quorum approvals at the broker: requests filed with the approval token
//! of a real credentials exchange, approvers' RSA-2048 and Ed25519 keys
//! made with openssl, 2-of-3 approval, one-time consumption of exactly the
//! approved key, operation and data, every refusal, rejection, expiry on
//! the broker's clock, signatures made by the openssl command, and one
//! consumption only when two broker processes sharing PostgreSQL race.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use base64::Engine as _;
use openssl::hash::MessageDigest;
use openssl::pkey::{Id, PKey, Private};
use openssl::sign::Signer;
use p11shim_proto::approval::{
    APPROVALS_PATH, Approval, ApprovalKey, Consume, Decision, NewApproval, REJECTION_PREFIX,
    sha256_hex,
};
use p11shim_tests::peers::broker::{
    BrokerProcess, TestBroker, broker_toml, http, sealed_exchange, write_secret,
};
use p11shim_tests::peers::databases::Postgres;
use p11shim_tests::{require, run_ok};
use serde_json::{Value, json};

const PIN: &str = "ca-pin-2468";
/// Request lifetime of the test rule (the shortest allowed).
const TTL_S: u64 = 60;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The attributes of synthetic machine `i`, and their fingerprint.
fn identity(i: usize) -> (BTreeMap<String, String>, String) {
    let attrs: BTreeMap<String, String> = [
        ("machine-id", format!("{:032x}", 0xa000 + i)),
        ("hostname", format!("quorum-test-{i}")),
        ("addresses", format!("192.0.2.{}", i + 10)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let fp = p11shim_proto::fingerprint::fingerprint(&attrs);
    (attrs, fp)
}

/// An approver: a key pair made by the openssl command.
struct Approver {
    name: &'static str,
    private: PathBuf,
    key: PKey<Private>,
}

impl Approver {
    fn make(dir: &Path, name: &'static str, alg: &str) -> Approver {
        let private = dir.join(format!("{name}.key"));
        let public = dir.join(format!("{name}.pem"));
        let mut keygen = Command::new("openssl");
        keygen
            .args(["genpkey", "-algorithm", alg, "-out"])
            .arg(&private);
        if alg == "RSA" {
            keygen.args(["-pkeyopt", "rsa_keygen_bits:2048"]);
        }
        run_ok(&mut keygen);
        run_ok(
            Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&private)
                .arg("-out")
                .arg(&public),
        );
        let key = PKey::private_key_from_pem(&std::fs::read(&private).expect("read key"))
            .expect("parse key");
        Approver { name, private, key }
    }

    /// Signs `data` as the broker expects: RSA PKCS#1 v1.5 SHA-256, or
    /// pure Ed25519.
    fn sign(&self, data: &[u8]) -> String {
        let sig = if self.key.id() == Id::ED25519 {
            Signer::new_without_digest(&self.key)
                .and_then(|mut s| s.sign_oneshot_to_vec(data))
                .expect("sign")
        } else {
            let mut s = Signer::new(MessageDigest::sha256(), &self.key).expect("signer");
            s.update(data).expect("update");
            s.sign_to_vec().expect("sign")
        };
        b64(&sig)
    }

    fn decision(&self, a: &Approval, reject: bool) -> Decision {
        let mut data = Vec::new();
        if reject {
            data.extend_from_slice(REJECTION_PREFIX.as_bytes());
        }
        data.extend_from_slice(&data_of(a));
        Decision {
            v: 1,
            approver: self.name.into(),
            signature: self.sign(&data),
        }
    }
}

/// alice (RSA-2048), bob (Ed25519), carol (RSA-2048).
fn approvers(dir: &Path) -> [Approver; 3] {
    [
        Approver::make(dir, "alice", "RSA"),
        Approver::make(dir, "bob", "ED25519"),
        Approver::make(dir, "carol", "RSA"),
    ]
}

fn approvers_toml(dir: &Path) -> String {
    ["alice", "bob", "carol"]
        .iter()
        .map(|n| {
            format!(
                "[approvers.{n}]\npublic_key = \"{}\"\n",
                dir.join(format!("{n}.pem")).display()
            )
        })
        .collect()
}

/// Roles `ca` (identities 0 and 1; `ca-*` keys under 2-of-3 quorum for
/// sign and destroy) and `web` (identity 2; `web-*` keys under 1-of-3).
fn roles_toml(pin: &Path) -> String {
    let quorum = |label: &str, m: u32| {
        format!(
            "policy = {{ keys = [{{ label = \"{label}\", ops = [\"sign\", \"decrypt\"] }}], quorum = [{{ label = \"{label}\", ops = [\"sign\", \"destroy\"], m = {m}, approvers = [\"alice\", \"bob\", \"carol\"], ttl_s = {TTL_S} }}] }}\n"
        )
    };
    format!(
        "[limits]\nper_ip = {{ per_minute = 60000, burst = 5000 }}\n\n\
         [roles.ca]\nmethods = [\"static-fingerprint\"]\npin = \"file:{pin}\"\nfingerprint_bind_address = false\n\
         fingerprints = [\"{}\", \"{}\"]\n{}\n\
         [roles.web]\nmethods = [\"static-fingerprint\"]\npin = \"file:{pin}\"\nfingerprint_bind_address = false\n\
         fingerprints = [\"{}\"]\n{}\n",
        identity(0).1,
        identity(1).1,
        quorum("ca-*", 2),
        identity(2).1,
        quorum("web-*", 1),
        pin = pin.display(),
    )
}

/// A credentials exchange for `role` as identity `i`; returns the approval
/// token from the sealed credentials.
fn approval_token(url: &str, role: &str, i: usize) -> String {
    let creds = sealed_exchange(
        url,
        role,
        &format!("quorum-{role}-{i}"),
        identity(i).0,
        [i as u8 + 1; 32],
    );
    assert_eq!(creds.pin.expose(), PIN);
    creds
        .approval_token
        .expect("a role with quorum rules gets an approval token")
        .expose()
        .to_owned()
}

fn post(url: &str, path: &str, token: Option<&str>, body: &impl serde::Serialize) -> (u16, Value) {
    let mut r = http()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).expect("encode"));
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    let r = r.send().expect("post");
    let status = r.status().as_u16();
    let text = r.text().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn get(url: &str, path: &str) -> (u16, Value) {
    let r = http().get(format!("{url}{path}")).send().expect("get");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn key(label: &str) -> ApprovalKey {
    ApprovalKey {
        label: Some(label.into()),
        id: Some("a1b2".into()),
        class: Some(3),
        key_type: Some(0),
        unique_id: None,
        fingerprint: sha256_hex(label.as_bytes()),
    }
}

fn new_approval(label: &str, op: &str, data: &[u8]) -> NewApproval {
    NewApproval {
        v: 1,
        key: key(label),
        op: op.into(),
        mechanism: Some(0x40),
        data_sha256: Some(sha256_hex(data)),
    }
}

fn consume_of(n: &NewApproval) -> Consume {
    Consume {
        v: 1,
        key_fingerprint: n.key.fingerprint.clone(),
        op: n.op.clone(),
        mechanism: n.mechanism,
        data_sha256: n.data_sha256.clone(),
    }
}

fn approval(v: &Value) -> Approval {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("not an Approval ({e}): {v}"))
}

fn data_of(a: &Approval) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(&a.approval_data)
        .expect("approval_data is base64")
}

fn decide(url: &str, id: &str, d: &Decision, reject: bool) -> (u16, Value) {
    let verb = if reject { "reject" } else { "approve" };
    post(url, &format!("{APPROVALS_PATH}/{id}/{verb}"), None, d)
}

fn consume(url: &str, token: &str, id: &str, c: &Consume) -> (u16, Value) {
    post(
        url,
        &format!("{APPROVALS_PATH}/{id}/consume"),
        Some(token),
        c,
    )
}

/// Asserts a problem answer of `status` and `title`.
#[track_caller]
fn refused(answer: (u16, Value), status: u16, title: &str) {
    assert_eq!(
        (answer.0, answer.1["title"].as_str()),
        (status, Some(title)),
        "{}",
        answer.1
    );
}

struct Setup {
    _dir: tempfile::TempDir,
    broker: TestBroker,
    approvers: [Approver; 3],
    /// Approval tokens of ca/identity 0, ca/identity 1, web/identity 2.
    ca0: String,
    ca1: String,
    web2: String,
}

fn setup() -> Option<Setup> {
    if !require("openssl") {
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let approvers = approvers(dir.path());
    let pin = write_secret(dir.path(), "ca.pin", PIN);
    let toml = format!(
        "{}{}",
        broker_toml(dir.path(), &roles_toml(&pin)),
        approvers_toml(dir.path())
    );
    let broker = TestBroker::start(&toml);
    let url = broker.url();
    Some(Setup {
        ca0: approval_token(&url, "ca", 0),
        ca1: approval_token(&url, "ca", 1),
        web2: approval_token(&url, "web", 2),
        _dir: dir,
        broker,
        approvers,
    })
}

#[test]
fn two_of_three_rsa_and_ed25519_approve_one_consumption_of_exactly_that_use() {
    let Some(s) = setup() else { return };
    let url = s.broker.url();
    let [alice, bob, carol] = &s.approvers;
    let n = new_approval("ca-root", "sign", b"to be signed 1");

    let (st, body) = post(&url, APPROVALS_PATH, Some(&s.ca0), &n);
    assert_eq!(st, 201, "{body}");
    let a = approval(&body);
    assert!(a.id.starts_with("apr_") && a.id.len() == 36, "{}", a.id);
    assert_eq!((a.m, a.approvers.len()), (2, 3));
    assert_eq!(a.status.as_str(), "pending");
    assert_eq!((a.role.as_str(), a.op.as_str()), ("ca", "sign"));
    assert_eq!(a.digest, sha256_hex(&data_of(&a)));
    let text = String::from_utf8(data_of(&a)).expect("text");
    assert!(text.starts_with("p11shim-approval-v1\n"), "{text}");
    for line in [
        format!("id: {}", a.id),
        "role: ca".into(),
        format!("requester: {}", a.subject),
        format!("key-fingerprint: {}", n.key.fingerprint),
        "key-label: ca-root".into(),
        "operation: sign".into(),
        "mechanism: CKM_SHA256_RSA_PKCS (0x40)".into(),
        format!("data-sha256: {}", sha256_hex(b"to be signed 1")),
        "approvals-needed: 2 of alice, bob, carol".into(),
        format!("expires-at: {}", a.expires_at),
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
    }

    // The same request again while open: the same id, 200.
    let (st, again) = post(&url, APPROVALS_PATH, Some(&s.ca0), &n);
    assert_eq!((st, approval(&again).id), (200, a.id.clone()), "{again}");
    // The same key and operation for other data is another request.
    let other = new_approval("ca-root", "sign", b"other data");
    let (st, b2) = post(&url, APPROVALS_PATH, Some(&s.ca0), &other);
    assert_eq!(st, 201, "{b2}");
    assert_ne!(approval(&b2).id, a.id);

    let c = consume_of(&n);
    refused(consume(&url, &s.ca0, &a.id, &c), 409, "conflict");
    let (st, after) = decide(&url, &a.id, &alice.decision(&a, false), false);
    assert_eq!(st, 200, "{after}");
    let after = approval(&after);
    assert_eq!(
        (after.status.as_str(), after.approvals.len()),
        ("pending", 1)
    );
    // One approval only: still not consumable.
    refused(consume(&url, &s.ca0, &a.id, &c), 409, "conflict");
    let (st, after) = decide(&url, &a.id, &bob.decision(&a, false), false);
    assert_eq!(st, 200, "{after}");
    let after = approval(&after);
    assert_eq!(after.status.as_str(), "approved");
    let names: Vec<&str> = after
        .approvals
        .iter()
        .map(|s| s.approver.as_str())
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    // Decided: carol comes too late.
    refused(
        decide(&url, &a.id, &carol.decision(&a, false), false),
        409,
        "conflict",
    );

    // Anything but exactly the approved use is a mismatch.
    let mut wrong = c.clone();
    wrong.key_fingerprint = sha256_hex(b"ca-other");
    refused(consume(&url, &s.ca0, &a.id, &wrong), 400, "bad_request");
    let mut wrong = c.clone();
    wrong.op = "destroy".into();
    refused(consume(&url, &s.ca0, &a.id, &wrong), 400, "bad_request");
    let mut wrong = c.clone();
    wrong.data_sha256 = Some(sha256_hex(b"other data"));
    refused(consume(&url, &s.ca0, &a.id, &wrong), 400, "bad_request");
    let mut wrong = c.clone();
    wrong.mechanism = Some(0x1);
    refused(consume(&url, &s.ca0, &a.id, &wrong), 400, "bad_request");
    // Another requester's token: the same role's other machine, another role.
    refused(consume(&url, &s.ca1, &a.id, &c), 403, "denied");
    refused(consume(&url, &s.web2, &a.id, &c), 403, "denied");
    refused(consume(&url, "not.a-token", &a.id, &c), 403, "denied");

    let (st, done) = consume(&url, &s.ca0, &a.id, &c);
    assert_eq!(st, 200, "{done}");
    let done = approval(&done);
    assert_eq!(done.status.as_str(), "consumed");
    assert!(done.consumed_at.is_some());
    refused(consume(&url, &s.ca0, &a.id, &c), 409, "already_used");

    // The listing by status, and the document by id.
    let (_, consumed) = get(&url, &format!("{APPROVALS_PATH}?status=consumed"));
    let ids: Vec<&str> = consumed["approvals"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert_eq!(ids, [a.id.as_str()]);
    let (_, pending) = get(&url, &format!("{APPROVALS_PATH}?status=pending"));
    assert_eq!(pending["approvals"][0]["id"], approval(&b2).id.as_str());
    let (st, one) = get(&url, &format!("{APPROVALS_PATH}/{}", a.id));
    assert_eq!((st, approval(&one).status.as_str()), (200, "consumed"));
    refused(
        get(&url, &format!("{APPROVALS_PATH}?status=odd")),
        400,
        "bad_request",
    );

    // A consumed request is closed: the same use needs a new approval.
    let (st, fresh) = post(&url, APPROVALS_PATH, Some(&s.ca0), &n);
    assert_eq!(st, 201, "{fresh}");
    assert_ne!(approval(&fresh).id, a.id);

    let count = |e: &str| {
        s.broker
            .counter(&format!("p11shim_broker_approvals_total{{event=\"{e}\"}}"))
    };
    assert_eq!(
        [
            count("requested"),
            count("approved"),
            count("rejected"),
            count("consumed"),
            count("refused")
        ],
        [3, 1, 0, 1, 11]
    );
}

#[test]
fn unregistered_duplicate_and_forged_approvals_and_uncovered_requests_are_refused() {
    let Some(s) = setup() else { return };
    let url = s.broker.url();
    let [alice, bob, carol] = &s.approvers;
    let (st, body) = post(
        &url,
        APPROVALS_PATH,
        Some(&s.ca0),
        &new_approval("ca-root", "sign", b"x"),
    );
    assert_eq!(st, 201, "{body}");
    let a = approval(&body);

    // Not an approver of this request (no key at all).
    let mut d = alice.decision(&a, false);
    d.approver = "mallory".into();
    refused(decide(&url, &a.id, &d, false), 403, "denied");
    // An approver's name with another approver's signature.
    let mut d = alice.decision(&a, false);
    d.approver = "bob".into();
    refused(decide(&url, &a.id, &d, false), 403, "denied");
    // A signature over other bytes.
    let mut d = carol.decision(&a, false);
    d.signature = carol.sign(b"p11shim-approval-v1\nid: something else\n");
    refused(decide(&url, &a.id, &d, false), 403, "denied");
    // Not base64.
    let mut d = carol.decision(&a, false);
    d.signature = "@@@".into();
    refused(decide(&url, &a.id, &d, false), 400, "bad_request");
    // A rejection's signature does not approve.
    let mut d = carol.decision(&a, true);
    d.approver = "carol".into();
    refused(decide(&url, &a.id, &d, false), 403, "denied");
    // The first approval counts, a second by the same approver does not.
    assert_eq!(
        decide(&url, &a.id, &alice.decision(&a, false), false).0,
        200
    );
    refused(
        decide(&url, &a.id, &alice.decision(&a, false), false),
        409,
        "conflict",
    );
    refused(
        decide(&url, &a.id, &alice.decision(&a, true), true),
        409,
        "conflict",
    );
    let (_, now) = get(&url, &format!("{APPROVALS_PATH}/{}", a.id));
    let now = approval(&now);
    assert_eq!((now.status.as_str(), now.approvals.len()), ("pending", 1));
    let _ = bob;

    // Requests no quorum rule covers, or without a valid token.
    let n = new_approval("ca-root", "sign", b"y");
    refused(post(&url, APPROVALS_PATH, None, &n), 403, "denied");
    refused(post(&url, APPROVALS_PATH, Some("x.y"), &n), 403, "denied");
    let mut forged = s.ca0.clone();
    forged.insert(
        3,
        if forged.as_bytes()[3] == b'A' {
            'B'
        } else {
            'A'
        },
    );
    refused(post(&url, APPROVALS_PATH, Some(&forged), &n), 403, "denied");
    refused(
        post(
            &url,
            APPROVALS_PATH,
            Some(&s.ca0),
            &new_approval("web-1", "sign", b"y"),
        ),
        403,
        "denied",
    );
    refused(
        post(
            &url,
            APPROVALS_PATH,
            Some(&s.ca0),
            &new_approval("ca-root", "decrypt", b"y"),
        ),
        403,
        "denied",
    );
    // web's rule covers web-* for web only.
    let (st, w) = post(
        &url,
        APPROVALS_PATH,
        Some(&s.web2),
        &new_approval("web-1", "sign", b"y"),
    );
    assert_eq!(st, 201, "{w}");
    assert_eq!(approval(&w).m, 1);
    // Malformed fields.
    let mut bad = n.clone();
    bad.data_sha256 = Some("ABCD".into());
    refused(
        post(&url, APPROVALS_PATH, Some(&s.ca0), &bad),
        400,
        "bad_request",
    );
    let mut bad = n.clone();
    bad.key.label = Some("ca-root\nkey-label: forged".into());
    refused(
        post(&url, APPROVALS_PATH, Some(&s.ca0), &bad),
        400,
        "bad_request",
    );
    let mut bad = n.clone();
    bad.op = "frobnicate".into();
    refused(
        post(&url, APPROVALS_PATH, Some(&s.ca0), &bad),
        400,
        "bad_request",
    );
    refused(
        post(
            &url,
            APPROVALS_PATH,
            Some(&s.ca0),
            &json!({"v": 1, "pin": "1234"}),
        ),
        400,
        "bad_request",
    );
    // Unknown and malformed ids.
    let ghost = format!("apr_{}", "0".repeat(32));
    refused(
        get(&url, &format!("{APPROVALS_PATH}/{ghost}")),
        404,
        "not_found",
    );
    refused(
        decide(&url, &ghost, &alice.decision(&a, false), false),
        404,
        "not_found",
    );
    refused(
        consume(&url, &s.ca0, "apr_nothex", &consume_of(&n)),
        404,
        "not_found",
    );
}

#[test]
fn rejections_that_make_m_unreachable_reject_the_request() {
    let Some(s) = setup() else { return };
    let url = s.broker.url();
    let [alice, bob, carol] = &s.approvers;
    let n = new_approval("ca-root", "destroy", b"");
    let n = NewApproval {
        mechanism: None,
        data_sha256: None,
        ..n
    };
    let (st, body) = post(&url, APPROVALS_PATH, Some(&s.ca0), &n);
    assert_eq!(st, 201, "{body}");
    let a = approval(&body);
    let text = String::from_utf8(data_of(&a)).unwrap();
    assert!(text.contains("\nmechanism: -\ndata-sha256: -\n"), "{text}");
    // A rejection is signed over the prefix and approval_data; a plain
    // approval signature does not reject.
    let mut d = alice.decision(&a, false);
    d.approver = "alice".into();
    refused(decide(&url, &a.id, &d, true), 403, "denied");
    let (st, one) = decide(&url, &a.id, &alice.decision(&a, true), true);
    assert_eq!(st, 200, "{one}");
    // One of three rejected: two can still approve.
    assert_eq!(approval(&one).status.as_str(), "pending");
    let (st, two) = decide(&url, &a.id, &carol.decision(&a, true), true);
    assert_eq!(st, 200, "{two}");
    let two = approval(&two);
    assert_eq!(two.status.as_str(), "rejected");
    assert_eq!(two.rejections.len(), 2);
    refused(
        decide(&url, &a.id, &bob.decision(&a, false), false),
        409,
        "conflict",
    );
    refused(consume(&url, &s.ca0, &a.id, &consume_of(&n)), 403, "denied");
    assert_eq!(
        s.broker
            .counter("p11shim_broker_approvals_total{event=\"rejected\"}"),
        1
    );
}

#[test]
fn requests_expire_on_the_brokers_clock() {
    let Some(s) = setup() else { return };
    let url = s.broker.url();
    let [alice, bob, _] = &s.approvers;
    let pending = new_approval("ca-root", "sign", b"pending");
    let approved = new_approval("ca-root", "sign", b"approved");
    let (_, p) = post(&url, APPROVALS_PATH, Some(&s.ca0), &pending);
    let p = approval(&p);
    let (_, a) = post(&url, APPROVALS_PATH, Some(&s.ca0), &approved);
    let a = approval(&a);
    for who in [alice, bob] {
        assert_eq!(decide(&url, &a.id, &who.decision(&a, false), false).0, 200);
    }
    s.broker.clock.advance(Duration::from_secs(TTL_S + 1));
    let (_, doc) = get(&url, &format!("{APPROVALS_PATH}/{}", p.id));
    assert_eq!(approval(&doc).status.as_str(), "expired");
    let (_, listed) = get(&url, &format!("{APPROVALS_PATH}?status=expired"));
    assert_eq!(listed["approvals"].as_array().map(Vec::len), Some(2));
    refused(
        decide(&url, &p.id, &alice.decision(&p, false), false),
        410,
        "expired",
    );
    refused(
        consume(&url, &s.ca0, &a.id, &consume_of(&approved)),
        410,
        "expired",
    );
    // An expired request no longer answers a repeated request: a new one.
    let (st, again) = post(&url, APPROVALS_PATH, Some(&s.ca0), &pending);
    assert_eq!(st, 201, "{again}");
    assert_ne!(approval(&again).id, p.id);
}

/// Writes `data` to a file and signs it with the openssl command.
fn openssl_sign(dir: &Path, who: &Approver, data: &[u8], args: &[&str]) -> String {
    let input = dir.join(format!("{}-data", who.name));
    let out = dir.join(format!("{}-sig", who.name));
    std::fs::write(&input, data).expect("write data");
    let mut cmd = Command::new("openssl");
    if who.key.id() == Id::ED25519 {
        cmd.args(["pkeyutl", "-sign", "-rawin", "-inkey"])
            .arg(&who.private)
            .arg("-in")
            .arg(&input)
            .arg("-out")
            .arg(&out);
    } else {
        cmd.args(["dgst", "-sha256"])
            .args(args)
            .arg("-sign")
            .arg(&who.private)
            .arg("-out")
            .arg(&out)
            .arg(&input);
    }
    run_ok(&mut cmd);
    // As an approver would send it: `openssl base64` output, line breaks
    // and all.
    let b = run_ok(Command::new("openssl").args(["base64", "-in"]).arg(&out));
    String::from_utf8(b.stdout).expect("base64 text")
}

#[test]
fn signatures_made_with_the_openssl_command_are_accepted() {
    let Some(s) = setup() else { return };
    let url = s.broker.url();
    let dir = tempfile::tempdir().expect("temp dir");
    let [alice, bob, carol] = &s.approvers;
    for (i, pair) in [[alice, bob], [carol, alice]].iter().enumerate() {
        let n = new_approval("ca-root", "sign", format!("cli {i}").as_bytes());
        let (_, a) = post(&url, APPROVALS_PATH, Some(&s.ca0), &n);
        let a = approval(&a);
        // approval_data as an approver gets it: from the base64 of the document.
        let data = data_of(&a);
        for who in pair {
            // carol signs with PSS, alice and bob with their defaults.
            let pss: &[&str] = if who.name == "carol" {
                &["-sigopt", "rsa_padding_mode:pss"]
            } else {
                &[]
            };
            let d = Decision {
                v: 1,
                approver: who.name.into(),
                signature: openssl_sign(dir.path(), who, &data, pss),
            };
            let (st, body) = decide(&url, &a.id, &d, false);
            assert_eq!(st, 200, "{} {body}", who.name);
        }
        let (st, done) = consume(&url, &s.ca0, &a.id, &consume_of(&n));
        assert_eq!((st, approval(&done).status.as_str()), (200, "consumed"));
    }
}

#[test]
fn approver_keys_are_checked_at_start() {
    if !require("openssl") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    approvers(dir.path());
    // carol's key replaced by RSA-1024.
    run_ok(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:1024",
                "-out",
            ])
            .arg(dir.path().join("weak.key")),
    );
    run_ok(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(dir.path().join("weak.key"))
            .arg("-out")
            .arg(dir.path().join("carol.pem")),
    );
    let pin = write_secret(dir.path(), "ca.pin", PIN);
    let toml = format!(
        "{}{}",
        broker_toml(dir.path(), &roles_toml(&pin)),
        approvers_toml(dir.path())
    );
    let cfg = p11shim_broker::config::Config::parse(&toml).expect("syntax is valid");
    let e = p11shim_broker::run::check(&cfg).unwrap_err();
    assert!(
        e.contains("approvers.carol.public_key") && e.contains("1024 bits"),
        "{e}"
    );
    let short = write_secret(dir.path(), "token.key", "too-short");
    let toml = toml.replace(
        "[server]\n",
        &format!(
            "[server]\napproval_token_key = \"file:{}\"\n",
            short.display()
        ),
    );
    let cfg = p11shim_broker::config::Config::parse(&toml).expect("syntax is valid");
    let e = p11shim_broker::run::check(&cfg).unwrap_err();
    assert!(!e.contains("too-short"), "{e}");
}

#[test]
fn two_broker_processes_on_one_postgres_consume_each_approval_once() {
    if !require("openssl") || !require("psql") {
        return;
    }
    let Some(pg) = Postgres::start() else {
        return;
    };
    const ROUNDS: usize = 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let approvers = approvers(dir.path());
    let pin = write_secret(dir.path(), "ca.pin", PIN);
    let url_file = write_secret(dir.path(), "store-url", &pg.url());
    let token_key = write_secret(
        dir.path(),
        "approval-token.key",
        "shared-between-replicas-0123456789abcdef",
    );
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"5s\"\nrequest_timeout = \"20s\"\n\
             approval_token_key = \"file:{}\"\n\n[store]\nkind = \"postgres\"\nurl = \"file:{}\"\npool_size = 4\n\n{}{}",
            token_key.display(),
            url_file.display(),
            roles_toml(&pin),
            approvers_toml(dir.path())
        ),
    )
    .expect("write the configuration");
    let brokers = [
        BrokerProcess::start(&config, &dir.path().join("broker-0.log")),
        BrokerProcess::start(&config, &dir.path().join("broker-1.log")),
    ];
    let urls: Vec<String> = brokers.iter().map(BrokerProcess::url).collect();
    // A token from broker 0 works at broker 1: the key is shared.
    let token = approval_token(&urls[0], "ca", 0);
    let [alice, bob, _] = &approvers;
    let mut wins = [0usize; 2];
    for round in 0..ROUNDS {
        let n = new_approval("ca-root", "sign", format!("round {round}").as_bytes());
        let (st, a) = post(&urls[round % 2], APPROVALS_PATH, Some(&token), &n);
        assert_eq!(st, 201, "round {round}: {a}");
        let a = Arc::new(approval(&a));
        // Two approvals at once, one at each replica: both count.
        let decisions = [alice.decision(&a, false), bob.decision(&a, false)];
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = decisions
            .into_iter()
            .enumerate()
            .map(|(b, d)| {
                let (url, id, barrier) = (urls[b].clone(), a.id.clone(), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    decide(&url, &id, &d, false).0
                })
            })
            .collect();
        let statuses: Vec<u16> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        assert_eq!(statuses, [200, 200], "round {round}");
        let (_, doc) = get(&urls[round % 2], &format!("{APPROVALS_PATH}/{}", a.id));
        let doc = approval(&doc);
        assert_eq!(
            (doc.status.as_str(), doc.approvals.len()),
            ("approved", 2),
            "round {round}"
        );
        // Both replicas consume at the same instant: exactly one wins.
        let c = consume_of(&n);
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|b| {
                let (url, id, token, c, barrier) = (
                    urls[b].clone(),
                    a.id.clone(),
                    token.clone(),
                    c.clone(),
                    Arc::clone(&barrier),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    let (st, body) = consume(&url, &token, &id, &c);
                    (b, st, body)
                })
            })
            .collect();
        let mut answers: Vec<(usize, u16, Value)> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        answers.sort_by_key(|a| a.1);
        let statuses: Vec<u16> = answers.iter().map(|a| a.1).collect();
        assert_eq!(statuses, [200, 409], "round {round}: {answers:?}");
        assert_eq!(answers[1].2["title"], "already_used", "round {round}");
        wins[answers[0].0] += 1;
    }
    assert_eq!(wins.iter().sum::<usize>(), ROUNDS);
    // In the shared database: every request consumed once, two decisions each.
    let sql = |q: &str| {
        let out = run_ok(
            Command::new("psql")
                .arg(pg.url())
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", q])
                .env("PGCONNECT_TIMEOUT", "10"),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        sql(
            "SELECT count(*) FROM p11shim_approvals WHERE status = 'consumed' AND consumed_at IS NOT NULL"
        ),
        ROUNDS.to_string()
    );
    assert_eq!(
        sql("SELECT count(*) FROM p11shim_approval_decisions"),
        (2 * ROUNDS).to_string()
    );
    eprintln!("consumptions won per broker: {wins:?}");
    drop(brokers);
}
