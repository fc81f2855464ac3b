//! The broker's HTTP front against bad and hostile input: malformed JSON,
//! wrong content type, oversized bodies, slow clients, unknown roles,
//! unsealed requests, replays, rate limits; and that a sealed answer opens
//! only with the requester's key.

use std::io::{Read, Write};
use std::time::Duration;

use p11shim_proto::seal::KeyPair;
use p11shim_proto::{FingerprintEvidence, Method, Request, Secret, b64_url};
use p11shim_tests::peers::broker::{TestBroker, broker_toml, fingerprint_role, write_secret};

use base64::Engine as _;

fn broker(extra_role: &str, limits: &str) -> (tempfile::TempDir, TestBroker) {
    let dir = tempfile::tempdir().unwrap();
    let pin = write_secret(dir.path(), "pin", "123456");
    let toml = broker_toml(
        dir.path(),
        &format!("{limits}\n{}", fingerprint_role("fp", &pin, extra_role)),
    );
    let b = TestBroker::start(&toml);
    (dir, b)
}

fn request(key: Option<&KeyPair>, nonce: u8) -> Request {
    let names: Vec<String> = p11shim_proto::fingerprint::KNOWN
        .iter()
        .map(|s| s.to_string())
        .collect();
    Request {
        v: 1,
        request_id: format!("req-{nonce}"),
        role: "fp".into(),
        method: Some(Method::StaticFingerprint),
        fingerprint: Some(FingerprintEvidence {
            attributes: p11shim_proto::fingerprint::collect(&names).unwrap(),
        }),
        client_nonce: Some(Secret::new(b64_url().encode([nonce; 32]))),
        response_key: key.map(|k| k.response_key()),
        ..Default::default()
    }
}

fn post(b: &TestBroker, r: &Request) -> (u16, serde_json::Value) {
    b.post("application/json", serde_json::to_vec(r).unwrap())
}

#[test]
fn malformed_wrong_type_and_oversized_bodies_are_bad_requests() {
    let (_d, b) = broker("", "");
    let (st, body) = b.post("application/json", "{\"v\":1,");
    assert_eq!(
        (st, body["title"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    let (st, body) = b.post(
        "application/json",
        "{\"v\":1,\"request_id\":\"a\",\"role\":\"fp\",\"pin\":\"x\"}",
    );
    assert_eq!(
        (st, body["title"].as_str()),
        (400, Some("bad_request")),
        "unknown fields: {body}"
    );
    let (st, body) = b.post("text/plain", serde_json::to_vec(&request(None, 1)).unwrap());
    assert_eq!(
        (st, body["title"].as_str()),
        (415, Some("bad_request")),
        "{body}"
    );
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(64 * 1024));
    let (st, body) = b.post("application/json", big);
    assert_eq!(
        (st, body["title"].as_str()),
        (413, Some("bad_request")),
        "{body}"
    );
    assert!(b.metrics().contains("p11shim_broker_request_seconds"));
}

#[test]
fn unknown_role_foreign_method_and_unsealed_requests_are_refused() {
    let (_d, b) = broker("", "");
    let k = KeyPair::generate();
    let mut r = request(Some(&k), 1);
    r.role = "nobody".into();
    assert_eq!(post(&b, &r).1["title"], "denied");
    let mut r = request(Some(&k), 1);
    r.method = Some(Method::AwsIid);
    assert_eq!(post(&b, &r).1["title"], "denied");
    let (st, body) = post(&b, &request(None, 1));
    assert_eq!(
        (st, body["title"].as_str()),
        (400, Some("bad_request")),
        "the role requires sealing: {body}"
    );
    let mut r = request(Some(&k), 1);
    r.fingerprint
        .as_mut()
        .unwrap()
        .attributes
        .insert("hostname".into(), "elsewhere".into());
    assert_eq!(post(&b, &r).1["title"], "denied");
}

#[test]
fn sealed_answer_opens_only_with_the_requesters_key_and_replays_are_refused() {
    let (_d, b) = broker("reauth = \"never\"\n", "");
    let k = KeyPair::generate();
    let (st, body) = post(&b, &request(Some(&k), 1));
    assert_eq!(st, 200, "{body}");
    assert!(
        body.get("credentials").is_none(),
        "credentials travel sealed only"
    );
    let resp: p11shim_proto::Response = serde_json::from_value(body.clone()).unwrap();
    let sealed = resp.sealed_credentials.clone().unwrap();
    let aad = p11shim_proto::seal::aad(
        &resp.request_id,
        &resp.role,
        &resp.subject,
        &resp.expires_at,
    );
    let plain = k.open(&sealed, &aad).expect("the requester's key opens it");
    let creds: p11shim_proto::Credentials = serde_json::from_slice(&plain).unwrap();
    assert_eq!(creds.pin.expose(), "123456");
    assert!(
        KeyPair::generate().open(&sealed, &aad).is_err(),
        "another key must not open it"
    );
    assert!(!body.to_string().contains("123456"));
    // The same identity again: already used, whatever the nonce.
    let (st, body) = post(&b, &request(Some(&k), 1));
    assert_eq!(
        (st, body["title"].as_str()),
        (409, Some("already_used")),
        "{body}"
    );
}

#[test]
fn rate_limits_answer_429_with_retry_after() {
    let (_d, b) = broker("", "[limits]\nper_ip = { per_minute = 1, burst = 3 }\n");
    let k = KeyPair::generate();
    let mut last = (0, serde_json::Value::Null);
    for i in 0..5 {
        last = post(&b, &request(Some(&k), i + 1));
    }
    assert_eq!(
        (last.0, last.1["title"].as_str()),
        (429, Some("rate_limited")),
        "{}",
        last.1
    );
    assert!(last.1["retry_after"].as_u64().is_some_and(|s| s >= 1));
}

#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let (_d, b) = broker("", "");
    let mut s = std::net::TcpStream::connect(b.addr()).unwrap();
    s.write_all(b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 1024];
    // header_timeout is 2 s: the broker answers 408 or closes; it does not
    // wait for the rest (the read times out after 20 s if it did).
    let n = s.read(&mut buf).expect("the broker closes the connection");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    // The broker still serves others.
    let (st, _) = post(&b, &request(Some(&KeyPair::generate()), 9));
    assert_eq!(st, 200);
    let health = p11shim_tests::peers::broker::http()
        .get(format!("{}/healthz", b.url()))
        .send()
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[test]
fn a_role_with_a_client_certificate_hands_it_over_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let pin = write_secret(dir.path(), "pin", "123456");
    let cert = dir.path().join("client.crt");
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let key = write_secret(
        dir.path(),
        "client.key",
        "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----",
    );
    let extra = format!(
        "mtls_cert = \"{}\"\nmtls_key = \"file:{}\"\n",
        cert.display(),
        key.display()
    );
    let b = TestBroker::start(&broker_toml(
        dir.path(),
        &fingerprint_role("fp", &pin, &extra),
    ));
    let k = KeyPair::generate();
    let (st, body) = post(&b, &request(Some(&k), 1));
    assert_eq!(st, 200, "{body}");
    assert!(
        !body.to_string().contains("PRIVATE KEY"),
        "the key travels sealed only"
    );
    let resp: p11shim_proto::Response = serde_json::from_value(body).unwrap();
    let aad = p11shim_proto::seal::aad(
        &resp.request_id,
        &resp.role,
        &resp.subject,
        &resp.expires_at,
    );
    let plain = k
        .open(resp.sealed_credentials.as_ref().unwrap(), &aad)
        .unwrap();
    let creds: p11shim_proto::Credentials = serde_json::from_slice(&plain).unwrap();
    let mtls = creds.mtls.expect("the client certificate and key");
    assert!(mtls.cert_pem.contains("BEGIN CERTIFICATE"));
    assert!(mtls.key_pem.expose().contains("BEGIN PRIVATE KEY"));
}
