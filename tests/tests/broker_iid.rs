//! The `rsa2048` identity document against our IMDSv2 emulator: what must
//! verify does, every malformed or substituted message is refused for the
//! right reason, the shipped AWS table is sound, and the emulator behaves
//! like IMDSv2.
//!
//! Needs `cargo build -p p11shim-peers` (the emulator) and the openssl CLI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use p11shim_broker::iid::{
    AWS_RSA2048_REGIONS, CertPins, IdentityDocument, IidError, MAX_PKCS7_BASE64, verify_rsa2048,
};
use p11shim_tests::peers::imds::{Imds, ImdsInstance};
use p11shim_tests::{TempDir, repo_root, require};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("p11shim-iid-")
        .tempdir()
        .expect("tempdir")
}

fn other_instance() -> ImdsInstance {
    ImdsInstance {
        instance_id: "i-0fedcba9876543210".into(),
        reservation_id: "r-0fedcba9876543210".into(),
        instance_type: "m5.large".into(),
        local_hostname: "ip-10-0-9-9.ec2.internal".into(),
        local_ipv4: "10.0.9.9".into(),
        account_id: "210987654321".into(),
        pending_time: "2026-02-03T04:05:06Z".into(),
        ..ImdsInstance::example()
    }
}

/// The reason of an `Invalid` refusal; panics on success.
fn refused(r: Result<IdentityDocument, IidError>) -> String {
    match r {
        Ok(doc) => panic!("accepted: {}", doc.instance_id),
        Err(IidError::Invalid(reason)) => reason,
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn assert_refused(r: Result<IdentityDocument, IidError>, expected: &str) {
    let reason = refused(r);
    assert!(
        reason.contains(expected),
        "refused for '{reason}', expected '{expected}'"
    );
}

fn pins(imds: &Imds) -> CertPins {
    CertPins::from_dir(imds.ca_dir()).expect("emulator pins")
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().expect("run openssl");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Signs `content` with the openssl CLI (`cms -sign`, DER out) using the
/// given signers and extra options, and returns the base64.
fn cli_sign(dir: &Path, content: &[u8], signers: &[(PathBuf, PathBuf)], opts: &[&str]) -> String {
    let input = dir.join("content.in");
    std::fs::write(&input, content).expect("content file");
    let mut cmd = Command::new("openssl");
    cmd.args([
        "cms",
        "-sign",
        "-binary",
        "-nodetach",
        "-nocerts",
        "-outform",
        "DER",
        "-in",
    ])
    .arg(&input);
    for (cert, key) in signers {
        cmd.arg("-signer").arg(cert).arg("-inkey").arg(key);
    }
    cmd.args(opts);
    B64.encode(run(&mut cmd))
}

fn ca_signer(ca_dir: &Path) -> (PathBuf, PathBuf) {
    (ca_dir.join("rsa2048.pem"), ca_dir.join("rsa2048.key"))
}

#[test]
fn emulator_rsa2048_verifies_with_its_ca() {
    let dir = tempdir();
    let instance = ImdsInstance::example();
    let imds = Imds::start(&instance, dir.path());
    let document = imds.fetch("dynamic/instance-identity/document");
    let rsa2048 = imds.fetch("dynamic/instance-identity/rsa2048");
    assert!(
        rsa2048.lines().all(|l| l.len() <= 64),
        "wrapped at 64 columns"
    );

    let doc = verify_rsa2048(&rsa2048, Some(document.as_bytes()), &pins(&imds)).expect("verifies");
    assert_eq!(doc.instance_id, instance.instance_id);
    assert_eq!(doc.account_id, instance.account_id);
    assert_eq!(doc.region, instance.region);
    assert_eq!(doc.availability_zone, instance.availability_zone);
    assert_eq!(doc.instance_type, instance.instance_type);
    assert_eq!(doc.image_id, instance.ami_id);
    assert_eq!(
        doc.private_ip,
        Some(instance.local_ipv4.parse().expect("ip"))
    );
    assert_eq!(
        doc.pending_time,
        epoch(1_767_323_045),
        "2026-01-02T03:04:05Z"
    );
    assert_eq!(doc.raw, document.as_bytes());

    // Without the plain document, the identity comes from the content alone.
    let alone = verify_rsa2048(&rsa2048, None, &pins(&imds)).expect("verifies without document");
    assert_eq!(alone, doc);

    // A directory that pins the region by name only works too.
    let region_only = tempdir();
    let name = format!("{}.pem", instance.region);
    std::fs::copy(imds.ca_dir().join(&name), region_only.path().join(&name)).expect("copy");
    let pins = CertPins::from_dir(region_only.path()).expect("region pins");
    assert_eq!(
        pins.regions().collect::<Vec<_>>(),
        [instance.region.as_str()]
    );
    assert_eq!(
        verify_rsa2048(&rsa2048, None, &pins).map(|d| d.instance_id),
        Ok(doc.instance_id)
    );

    // The same text with CRLF line breaks and spaces (whitespace is not
    // part of base64) verifies as well.
    let spaced = rsa2048.replace('\n', " \r\n\t");
    assert!(verify_rsa2048(&spaced, None, &self::pins(&imds)).is_ok());
}

fn epoch(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

#[test]
fn wrong_signing_key_fails() {
    let (a, b) = (tempdir(), tempdir());
    let imds_a = Imds::start(&ImdsInstance::example(), a.path());
    let imds_b = Imds::start(&ImdsInstance::example(), b.path());
    let rsa2048 = imds_a.fetch("dynamic/instance-identity/rsa2048");
    assert!(verify_rsa2048(&rsa2048, None, &pins(&imds_a)).is_ok());
    assert_refused(
        verify_rsa2048(&rsa2048, None, &pins(&imds_b)),
        "signature does not verify",
    );
    // Nor does AWS's own table accept the test CA for us-east-1.
    assert_refused(
        verify_rsa2048(&rsa2048, None, &CertPins::aws()),
        "signature does not verify",
    );
}

#[test]
fn substituted_document_fails() {
    let dir = tempdir();
    let a = ImdsInstance::example();
    let b = other_instance();
    let imds = Imds::start(&a, dir.path());
    let pkcs7_a = imds.fetch("dynamic/instance-identity/rsa2048");
    let document_a = imds.fetch("dynamic/instance-identity/document");

    let b_file = dir.path().join("b.json");
    b.write(&b_file);
    imds.control(&format!("substitute {}", b_file.display()));
    let document_b = imds.fetch("dynamic/instance-identity/document");
    let pkcs7_b = imds.fetch("dynamic/instance-identity/rsa2048");
    assert!(document_b.contains(&b.instance_id));
    // meta-data still speaks for A.
    assert_eq!(imds.fetch("meta-data/instance-id"), a.instance_id);

    // B's own pair is genuine.
    let doc_b =
        verify_rsa2048(&pkcs7_b, Some(document_b.as_bytes()), &pins(&imds)).expect("B verifies");
    assert_eq!(doc_b.instance_id, b.instance_id);
    // A's signature beside B's document, and the reverse, are refused.
    assert_refused(
        verify_rsa2048(&pkcs7_a, Some(document_b.as_bytes()), &pins(&imds)),
        "document differs from the signed content",
    );
    assert_refused(
        verify_rsa2048(&pkcs7_b, Some(document_a.as_bytes()), &pins(&imds)),
        "document differs from the signed content",
    );
}

#[test]
fn crlf_document_fails() {
    let dir = tempdir();
    let imds = Imds::start(&ImdsInstance::example(), dir.path());
    let lf = imds.fetch("dynamic/instance-identity/document");
    imds.control("crlf");
    let crlf = imds.fetch("dynamic/instance-identity/document");
    let pkcs7 = imds.fetch("dynamic/instance-identity/rsa2048");
    assert!(
        crlf.contains("\r\n") && !lf.contains('\r'),
        "the emulator mangles line ends"
    );
    assert_eq!(crlf.replace("\r\n", "\n"), lf);

    assert_refused(
        verify_rsa2048(&pkcs7, Some(crlf.as_bytes()), &pins(&imds)),
        "document differs from the signed content",
    );
    assert!(verify_rsa2048(&pkcs7, Some(lf.as_bytes()), &pins(&imds)).is_ok());
    imds.control("reset");
    assert_eq!(imds.fetch("dynamic/instance-identity/document"), lf);
}

#[test]
fn tampered_der_fails() {
    let dir = tempdir();
    let instance = ImdsInstance::example();
    let imds = Imds::start(&instance, dir.path());
    let pins = pins(&imds);
    let der = B64
        .decode(
            imds.fetch("dynamic/instance-identity/rsa2048")
                .replace('\n', ""),
        )
        .expect("base64");
    let tamper = |at: usize| {
        let mut d = der.clone();
        d[at] ^= 0x01;
        verify_rsa2048(&B64.encode(&d), None, &pins)
    };

    // A byte of the signed content (inside the instance id): the digest
    // in the signed attributes no longer matches.
    let id_at = der
        .windows(instance.instance_id.len())
        .position(|w| w == instance.instance_id.as_bytes())
        .expect("instance id in the DER");
    assert_refused(tamper(id_at + 5), "message digest does not match");
    // The last byte is the signature's.
    assert_refused(tamper(der.len() - 1), "signature does not verify");
    // A byte of the signing time, a signed attribute: the signature fails.
    let utc_time = der
        .windows(2)
        .position(|w| w == [0x17, 0x0d])
        .expect("signingTime UTCTime in the DER");
    assert_refused(tamper(utc_time + 5), "signature does not verify");
    // A truncated message does not parse.
    assert_refused(
        verify_rsa2048(&B64.encode(&der[..der.len() - 20]), None, &pins),
        "not a PKCS#7 message",
    );
    // Bytes after the message are refused, not ignored.
    let mut longer = der.clone();
    longer.extend_from_slice(b"\0junk");
    assert_refused(
        verify_rsa2048(&B64.encode(&longer), None, &pins),
        "bytes after the message",
    );
    // The untouched message still verifies.
    assert!(verify_rsa2048(&B64.encode(&der), None, &pins).is_ok());
}

#[test]
fn oversized_and_non_base64_input_fail_cleanly() {
    let dir = tempdir();
    let imds = Imds::start(&ImdsInstance::example(), dir.path());
    let pins = pins(&imds);
    let rsa2048 = imds.fetch("dynamic/instance-identity/rsa2048");

    let oversized = format!("{rsa2048}{}", "A".repeat(MAX_PKCS7_BASE64));
    assert_refused(verify_rsa2048(&oversized, None, &pins), "larger than");
    // The limit applies to the text as sent, whitespace included.
    let padded = format!("{rsa2048}{}", " ".repeat(MAX_PKCS7_BASE64));
    assert_refused(verify_rsa2048(&padded, None, &pins), "larger than");

    assert_refused(verify_rsa2048("not base64!", None, &pins), "not base64");
    assert_refused(
        verify_rsa2048(&rsa2048.replace('M', "*"), None, &pins),
        "not base64",
    );
    assert_refused(verify_rsa2048("", None, &pins), "not a PKCS#7 message");
    assert_refused(
        verify_rsa2048(&B64.encode(b"{\"region\":\"us-east-1\"}"), None, &pins),
        "not a PKCS#7 message",
    );
}

#[test]
fn region_not_pinned_fails() {
    let dir = tempdir();
    let instance = ImdsInstance::example();
    let imds = Imds::start(&instance, dir.path());
    let rsa2048 = imds.fetch("dynamic/instance-identity/rsa2048");
    // The emulator's key, but pinned for another region only.
    let elsewhere = tempdir();
    std::fs::copy(
        imds.ca_dir().join("rsa2048.pem"),
        elsewhere.path().join("eu-west-1.pem"),
    )
    .expect("copy");
    let pins = CertPins::from_dir(elsewhere.path()).expect("pins");
    assert_refused(
        verify_rsa2048(&rsa2048, None, &pins),
        "region us-east-1 is not pinned",
    );

    // A region that is not a region code is refused even by the catch-all.
    let odd = ImdsInstance {
        region: "moon".into(),
        availability_zone: "moona".into(),
        ..instance
    };
    let odd_dir = tempdir();
    let odd_imds = Imds::start(&odd, odd_dir.path());
    let odd_pkcs7 = odd_imds.fetch("dynamic/instance-identity/rsa2048");
    assert_refused(
        verify_rsa2048(&odd_pkcs7, None, &self::pins(&odd_imds)),
        "region is not a region code",
    );
}

#[test]
fn malformed_signed_data_fails() {
    if !require("openssl") {
        return;
    }
    let dir = tempdir();
    let imds = Imds::start(&ImdsInstance::example(), dir.path());
    let pins = pins(&imds);
    let document = imds.fetch("dynamic/instance-identity/document");
    let ca = ca_signer(imds.ca_dir());
    let second = Imds::start(&ImdsInstance::example(), &dir.path().join("second"));
    let other = ca_signer(second.ca_dir());
    drop(second);
    let content = document.as_bytes();

    // The control: the CLI's ordinary SHA-256 message verifies.
    let good = cli_sign(
        dir.path(),
        content,
        std::slice::from_ref(&ca),
        &["-md", "sha256"],
    );
    verify_rsa2048(&good, Some(content), &pins).expect("openssl-made message verifies");

    // Without signed attributes the signature covers the content itself.
    let no_attrs = cli_sign(
        dir.path(),
        content,
        std::slice::from_ref(&ca),
        &["-md", "sha256", "-noattr"],
    );
    verify_rsa2048(&no_attrs, Some(content), &pins).expect("message without signed attributes");

    // BER with indefinite lengths (a streaming signer's output) verifies.
    let ber = cli_sign(
        dir.path(),
        content,
        std::slice::from_ref(&ca),
        &["-md", "sha256", "-stream"],
    );
    assert_eq!(
        &B64.decode(&ber).expect("b64")[..2],
        [0x30, 0x80],
        "indefinite-length BER"
    );
    verify_rsa2048(&ber, Some(content), &pins).expect("BER message verifies");

    let two = cli_sign(
        dir.path(),
        content,
        &[ca.clone(), other],
        &["-md", "sha256"],
    );
    assert_refused(verify_rsa2048(&two, None, &pins), "more than one signer");

    let detached = B64.encode(run(Command::new("openssl")
        .args([
            "cms", "-sign", "-binary", "-nocerts", "-outform", "DER", "-md", "sha256",
        ])
        .arg("-in")
        .arg(dir.path().join("content.in"))
        .arg("-signer")
        .arg(&ca.0)
        .arg("-inkey")
        .arg(&ca.1)));
    assert_refused(
        verify_rsa2048(&detached, Some(content), &pins),
        "no embedded content",
    );

    let sha1 = cli_sign(
        dir.path(),
        content,
        std::slice::from_ref(&ca),
        &["-md", "sha1"],
    );
    assert_refused(
        verify_rsa2048(&sha1, Some(content), &pins),
        "digest is not SHA-256",
    );

    // id-ct-TSTInfo instead of id-data.
    let tst = cli_sign(
        dir.path(),
        content,
        std::slice::from_ref(&ca),
        &[
            "-md",
            "sha256",
            "-econtent_type",
            "1.2.840.113549.1.9.16.1.4",
        ],
    );
    assert_refused(
        verify_rsa2048(&tst, Some(content), &pins),
        "content type is not id-data",
    );

    // Certificates embedded in the message are ignored: signing with
    // another key and shipping its certificate does not help.
    let with_cert = B64.encode(run(Command::new("openssl")
        .args([
            "cms",
            "-sign",
            "-binary",
            "-nodetach",
            "-outform",
            "DER",
            "-md",
            "sha256",
        ])
        .arg("-in")
        .arg(dir.path().join("content.in"))
        .arg("-signer")
        .arg(dir.path().join("second/imds-ca/rsa2048.pem"))
        .arg("-inkey")
        .arg(dir.path().join("second/imds-ca/rsa2048.key"))));
    assert_refused(
        verify_rsa2048(&with_cert, Some(content), &pins),
        "signature does not verify",
    );
}

#[test]
fn openssl_cli_recipe_verifies_emulator_rsa2048() {
    if !require("openssl") {
        return;
    }
    // The procedure AWS documents, step for step (research §1.3).
    let dir = tempdir();
    let imds = Imds::start(&ImdsInstance::example(), dir.path());
    let document = imds.fetch("dynamic/instance-identity/document");
    let rsa2048 = imds.fetch("dynamic/instance-identity/rsa2048");
    let p7 = dir.path().join("rsa2048.p7");
    std::fs::write(
        &p7,
        format!("-----BEGIN PKCS7-----\n{rsa2048}\n-----END PKCS7-----\n"),
    )
    .expect("p7");
    let verify = |cert: &Path| {
        Command::new("openssl")
            .args(["smime", "-verify", "-inform", "PEM", "-noverify", "-in"])
            .arg(&p7)
            .arg("-certfile")
            .arg(cert)
            .output()
            .expect("openssl smime")
    };
    let out = verify(&imds.ca_dir().join("rsa2048.pem"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, document.as_bytes(), "content == document");
    // With the RSA-1024 certificate the signer is not found.
    assert!(!verify(&imds.ca_dir().join("rsa.pem")).status.success());

    // The plain `signature`: RSA PKCS#1 v1.5 over SHA-256(document) with
    // the RSA-1024 key, as `openssl dgst -sha256 -verify` checks it.
    let pubkey = dir.path().join("rsa_pub.pem");
    let pem = run(Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(imds.ca_dir().join("rsa.pem")));
    std::fs::write(&pubkey, pem).expect("pub");
    let sig = B64
        .decode(
            imds.fetch("dynamic/instance-identity/signature")
                .replace('\n', ""),
        )
        .expect("signature base64");
    std::fs::write(dir.path().join("sig.bin"), sig).expect("sig");
    std::fs::write(dir.path().join("document"), &document).expect("doc");
    let dgst = |doc: &str| {
        Command::new("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(&pubkey)
            .arg("-signature")
            .arg(dir.path().join("sig.bin"))
            .arg(dir.path().join(doc))
            .status()
            .expect("openssl dgst")
            .success()
    };
    assert!(dgst("document"));
    std::fs::write(
        dir.path().join("edited"),
        document.replace("t3.micro", "t3.large"),
    )
    .expect("edited");
    assert!(!dgst("edited"));
}

#[test]
fn aws_table_is_complete_and_sound() {
    // Read independently of the broker's parser: every entry is a labelled
    // RSA-2048 certificate, regions are unique, keys are distinct.
    let text =
        std::fs::read_to_string(repo_root().join("broker/src/iid/aws-rsa2048.pem")).expect("table");
    let mut regions = Vec::new();
    let mut keys = Vec::new();
    let blocks: Vec<&str> = text.split("\nregion: ").skip(1).collect();
    for block in &blocks {
        let region = block.split_whitespace().next().expect("region code");
        let cert = openssl::x509::X509::from_pem(block.as_bytes())
            .unwrap_or_else(|e| panic!("{region}: {e}"));
        let key = cert.public_key().expect("key");
        assert_eq!(key.id(), openssl::pkey::Id::RSA, "{region}");
        assert_eq!(key.bits(), 2048, "{region}");
        let subject: Vec<String> = cert
            .subject_name()
            .entries()
            .map(|e| e.data().to_string().expect("utf8"))
            .collect();
        assert!(
            subject.iter().any(|s| s == "Amazon Web Services LLC"),
            "{region}: {subject:?}"
        );
        regions.push(region.to_owned());
        keys.push(key.public_key_to_der().expect("der"));
    }
    assert_eq!(regions.len(), AWS_RSA2048_REGIONS);
    let mut unique = regions.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), regions.len(), "regions unique");
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), regions.len(), "one key per region");
    for r in [
        "us-east-1",
        "us-west-2",
        "eu-central-1",
        "us-gov-west-1",
        "cn-north-1",
        "eusc-de-east-1",
    ] {
        assert!(regions.iter().any(|x| x == r), "{r} missing");
    }

    // The broker's table holds the same keys under the same names.
    let pins = CertPins::aws();
    assert_eq!(pins.len(), AWS_RSA2048_REGIONS);
    assert_eq!(pins.regions().collect::<Vec<_>>(), unique);
    for block in &blocks {
        let region = block.split_whitespace().next().expect("region");
        let cert = openssl::x509::X509::from_pem(block.as_bytes()).expect("cert");
        let pin = pins.get(region).expect("pinned");
        assert!(
            pin.public_key().public_eq(&cert.public_key().expect("key")),
            "{region}"
        );
    }
    assert!(pins.get("xx-nowhere-1").is_none());
}

#[test]
fn emulator_speaks_imdsv2() {
    let dir = tempdir();
    let instance = ImdsInstance::example();
    let imds = Imds::start(&instance, dir.path());

    // Token PUT: TTL header required and in 1..=21600; no proxies.
    assert_eq!(imds.put_token(None, &[]).0, 400);
    for bad in ["0", "21601", "-1", "abc", ""] {
        assert_eq!(imds.put_token(Some(bad), &[]).0, 400, "ttl {bad:?}");
    }
    assert_eq!(imds.put_token(Some("21600"), &[]).0, 200);
    assert_eq!(imds.put_token(Some("1"), &[]).0, 200);
    assert_eq!(
        imds.put_token(Some("60"), &[("X-Forwarded-For", "203.0.113.9")])
            .0,
        403
    );

    // GETs need a valid token.
    let token = imds.token();
    assert_eq!(imds.get("meta-data/instance-id", None).0, 401);
    assert_eq!(
        imds.get("meta-data/instance-id", Some("not-a-token")).0,
        401
    );
    let get = |path: &str| imds.get(path, Some(&token));
    assert_eq!(
        get("meta-data/instance-id"),
        (200, instance.instance_id.clone())
    );
    assert_eq!(get("meta-data/reservation-id").1, instance.reservation_id);
    assert_eq!(get("meta-data/instance-type").1, instance.instance_type);
    assert_eq!(get("meta-data/local-hostname").1, instance.local_hostname);
    assert_eq!(get("meta-data/hostname").1, instance.local_hostname);
    assert_eq!(get("meta-data/public-hostname").1, instance.public_hostname);
    assert_eq!(get("meta-data/local-ipv4").1, instance.local_ipv4);
    assert_eq!(get("meta-data/public-ipv4").1, instance.public_ipv4);
    assert_eq!(get("meta-data/ami-id").1, instance.ami_id);
    assert_eq!(get("meta-data/placement/region").1, instance.region);
    assert_eq!(
        get("meta-data/placement/availability-zone").1,
        instance.availability_zone
    );
    let info: serde_json::Value =
        serde_json::from_str(&get("meta-data/iam/info").1).expect("iam/info");
    assert_eq!(info["Code"], "Success");
    assert_eq!(
        info["InstanceProfileArn"],
        instance.instance_profile_arn.as_str()
    );
    assert_eq!(
        info["InstanceProfileId"],
        instance.instance_profile_id.as_str()
    );
    let document = get("dynamic/instance-identity/document").1;
    assert!(
        document.starts_with("{\n  \"accountId\" : \"123456789012\",\n"),
        "{document}"
    );
    assert_eq!(get("meta-data/no-such-thing").0, 404);
    assert_eq!(get("dynamic/instance-identity/nothing").0, 404);

    // expire_tokens: the old token is dead, a new one works.
    imds.control("expire_tokens");
    assert_eq!(get("meta-data/instance-id").0, 401);
    let token = imds.token();
    assert_eq!(imds.get("meta-data/instance-id", Some(&token)).0, 200);

    // unauthorized n: exactly n GETs fail, then it recovers.
    imds.control("unauthorized 2");
    assert_eq!(imds.get("meta-data/instance-id", Some(&token)).0, 401);
    assert_eq!(imds.get("meta-data/instance-id", Some(&token)).0, 401);
    assert_eq!(imds.get("meta-data/instance-id", Some(&token)).0, 200);

    // set changes one meta-data value; the signed document stays.
    imds.control(r#"{"cmd":"set","field":"instance-type","value":"m5.large"}"#);
    assert_eq!(
        imds.get("meta-data/instance-type", Some(&token)).1,
        "m5.large"
    );
    assert_eq!(
        imds.get("dynamic/instance-identity/document", Some(&token))
            .1,
        document
    );

    // refuse_put: the hop limit is too small for this caller.
    imds.control("refuse_put");
    assert_eq!(imds.put_token(Some("60"), &[]).0, 403);

    // allow_v1: tokenless GETs answered (IMDSv1), bad tokens still not.
    imds.control("allow_v1");
    assert_eq!(imds.get("meta-data/instance-id", None).0, 200);
    assert_eq!(
        imds.get("meta-data/instance-id", Some("not-a-token")).0,
        401
    );

    // delay_ms: an answer comes no sooner than the delay.
    imds.control("delay_ms 300");
    let start = Instant::now();
    assert_eq!(imds.get("meta-data/instance-id", Some(&token)).0, 200);
    assert!(start.elapsed() >= Duration::from_millis(300));

    imds.control("reset");
    assert_eq!(imds.put_token(Some("60"), &[]).0, 200);
    assert_eq!(imds.get("meta-data/instance-id", None).0, 401);
    assert_eq!(
        imds.get("meta-data/instance-type", Some(&token)).1,
        instance.instance_type
    );

    // Bad control commands are refused, not half applied.
    assert_eq!(imds.try_control("unauthorized many").0, 400);
    assert_eq!(imds.try_control("set no-such-path x").0, 400);
    assert_eq!(imds.try_control("fly").0, 400);
    assert_eq!(imds.get("meta-data/instance-id", Some(&token)).0, 200);
}

#[test]
fn emulator_reuses_its_ca() {
    let dir = tempdir();
    let first = Imds::start(&ImdsInstance::example(), dir.path());
    let pem = std::fs::read(first.ca_dir().join("rsa2048.pem")).expect("ca");
    let pkcs7 = first.fetch("dynamic/instance-identity/rsa2048");
    drop(first);
    let second = Imds::start(&ImdsInstance::example(), dir.path());
    assert_eq!(
        std::fs::read(second.ca_dir().join("rsa2048.pem")).expect("ca"),
        pem
    );
    // The first run's message verifies against the second run's pins.
    assert!(verify_rsa2048(&pkcs7, None, &pins(&second)).is_ok());
}
