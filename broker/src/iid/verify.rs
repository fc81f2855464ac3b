//! Verification of the `rsa2048` instance identity document (research
//! §1.3): a PKCS#7 SignedData, SHA-256 and RSA-2048 PKCS#1 v1.5, with the
//! document embedded. The signer's key is never taken from the message: it
//! is the pinned key of the region the content names (a wrong pick fails
//! the signature). The identity is read from the verified content only.
//!
//! Parsing: OpenSSL reads the message first because AWS, like OpenSSL's
//! streaming signer, may send BER (indefinite lengths, a constructed
//! eContent), and re-encodes it as DER; the RustCrypto `cms` types then give
//! the structure that the checks below need (signer infos, signed
//! attributes), which the openssl crate does not expose.

use std::net::IpAddr;
use std::time::SystemTime;

use base64::Engine as _;
use cms::cert::x509::der::asn1::{ObjectIdentifier, OctetStringRef};
use cms::cert::x509::der::{Decode, Encode, Tagged};
use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerInfo};
use openssl::hash::MessageDigest;
use openssl::pkcs7::Pkcs7;
use openssl::sign::Verifier;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::certs::{CertPins, PinnedCert};
use super::{IdentityDocument, IidError};

/// The largest `rsa2048` value accepted, as sent (base64 with line breaks).
/// A real one is about 2 KiB.
pub const MAX_PKCS7_BASE64: usize = 8 * 1024;

const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

fn invalid(reason: impl Into<String>) -> IidError {
    IidError::Invalid(reason.into())
}

/// Verifies an `rsa2048` value as IMDS serves it and returns the identity
/// it signs. `document`, when the client also sent the plain document, must
/// be byte-equal to the signed content: no normalisation, so a document
/// with CRLF line ends beside LF content fails.
pub fn verify_rsa2048(
    pkcs7_b64: &str,
    document: Option<&[u8]>,
    pins: &CertPins,
) -> Result<IdentityDocument, IidError> {
    if pkcs7_b64.len() > MAX_PKCS7_BASE64 {
        return Err(invalid(format!(
            "pkcs7 larger than {MAX_PKCS7_BASE64} bytes"
        )));
    }
    let compact: Vec<u8> = pkcs7_b64
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let ber = base64::engine::general_purpose::STANDARD
        .decode(&compact)
        .map_err(|_| invalid("pkcs7 is not base64"))?;
    if trailing_bytes(&ber) {
        return Err(invalid("pkcs7 has bytes after the message"));
    }
    let der = Pkcs7::from_der(&ber)
        .and_then(|p| p.to_der())
        .map_err(|_| invalid("pkcs7 is not a PKCS#7 message"))?;
    let info = ContentInfo::from_der(&der).map_err(|_| invalid("pkcs7 is not a PKCS#7 message"))?;
    if info.content_type != ID_SIGNED_DATA {
        return Err(invalid("pkcs7 is not SignedData"));
    }
    let signed: SignedData = info
        .content
        .decode_as()
        .map_err(|_| invalid("pkcs7 SignedData is malformed"))?;

    let signer = match signed.signer_infos.0.as_slice() {
        [one] => one,
        [] => return Err(invalid("pkcs7 has no signer")),
        _ => return Err(invalid("pkcs7 has more than one signer")),
    };
    if signed.encap_content_info.econtent_type != ID_DATA {
        return Err(invalid("pkcs7 content type is not id-data"));
    }
    let content = signed
        .encap_content_info
        .econtent
        .as_ref()
        .ok_or_else(|| invalid("pkcs7 has no embedded content"))?
        .decode_as::<OctetStringRef<'_>>()
        .map_err(|_| invalid("pkcs7 content is not an OCTET STRING"))?
        .as_bytes();

    // The key is chosen by the region the (not yet trusted) content names;
    // if the content lies about its region, the signature check fails.
    let unverified: DocumentJson = serde_json::from_slice(content)
        .map_err(|_| invalid("document is not the expected JSON"))?;
    let pin = pins.get(&unverified.region).ok_or_else(|| {
        if super::certs::is_region_name(&unverified.region) {
            invalid(format!("region {} is not pinned", unverified.region))
        } else {
            invalid("document region is not a region code")
        }
    })?;

    check_signer(signer, content, pin)?;

    if let Some(document) = document {
        if document != content {
            return Err(invalid("document differs from the signed content"));
        }
    }
    identity(unverified, content)
}

/// Whether a definite-length outer SEQUENCE is followed by more bytes
/// (OpenSSL would ignore them). An indefinite-length (BER) message ends
/// where OpenSSL's parser says.
fn trailing_bytes(ber: &[u8]) -> bool {
    let (Some(&0x30), Some(&first)) = (ber.first(), ber.get(1)) else {
        return false;
    };
    let (header, len) = match first {
        0x80 => return false,
        n if n < 0x80 => (2, usize::from(n)),
        n => {
            let count = usize::from(n & 0x7f);
            if count > 4 || ber.len() < 2 + count {
                return false;
            }
            let len = ber[2..2 + count]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (2 + count, len)
        }
    };
    header.checked_add(len).is_some_and(|end| ber.len() > end)
}

/// The signer's digest, signed attributes and RSA signature.
fn check_signer(signer: &SignerInfo, content: &[u8], pin: &PinnedCert) -> Result<(), IidError> {
    if signer.digest_alg.oid != ID_SHA256 {
        return Err(invalid("pkcs7 digest is not SHA-256"));
    }
    if signer
        .digest_alg
        .parameters
        .as_ref()
        .is_some_and(|p| !is_null(p))
    {
        return Err(invalid("pkcs7 digest parameters are not absent or NULL"));
    }
    let sig_alg = signer.signature_algorithm.oid;
    if sig_alg != RSA_ENCRYPTION && sig_alg != SHA256_WITH_RSA {
        return Err(invalid("pkcs7 signature algorithm is not RSA PKCS#1 v1.5"));
    }

    // RFC 5652 §5.4: with signed attributes, the signature covers their DER
    // encoding as an explicit SET OF, and they must carry the content type
    // and the content's digest; without them it covers the content itself.
    let signed_bytes: Vec<u8> = match &signer.signed_attrs {
        Some(attrs) => {
            let mut content_type = None;
            let mut message_digest = None;
            for attr in attrs.iter() {
                let slot = if attr.oid == ID_CONTENT_TYPE {
                    &mut content_type
                } else if attr.oid == ID_MESSAGE_DIGEST {
                    &mut message_digest
                } else {
                    continue;
                };
                if slot.is_some() || attr.values.len() != 1 {
                    return Err(invalid("pkcs7 signed attribute repeated"));
                }
                *slot = attr.values.get(0);
            }
            let content_type = content_type
                .ok_or_else(|| invalid("pkcs7 signed attributes lack the content type"))?
                .decode_as::<ObjectIdentifier>()
                .map_err(|_| invalid("pkcs7 content-type attribute is malformed"))?;
            if content_type != ID_DATA {
                return Err(invalid("pkcs7 content-type attribute is not id-data"));
            }
            let digest = message_digest
                .ok_or_else(|| invalid("pkcs7 signed attributes lack the message digest"))?
                .decode_as::<OctetStringRef<'_>>()
                .map_err(|_| invalid("pkcs7 message-digest attribute is malformed"))?;
            if digest.as_bytes() != Sha256::digest(content).as_slice() {
                return Err(invalid("pkcs7 message digest does not match the content"));
            }
            attrs
                .to_der()
                .map_err(|_| invalid("pkcs7 signed attributes cannot be encoded"))?
        }
        None => content.to_vec(),
    };

    let ok = Verifier::new(MessageDigest::sha256(), pin.public_key())
        .and_then(|mut v| v.verify_oneshot(signer.signature.as_bytes(), &signed_bytes))
        .unwrap_or(false);
    if !ok {
        return Err(invalid(
            "pkcs7 signature does not verify with the region's pinned key",
        ));
    }
    Ok(())
}

fn is_null(any: &cms::cert::x509::der::Any) -> bool {
    any.tag() == cms::cert::x509::der::Tag::Null && any.value().is_empty()
}

/// The fields of the document the broker uses; the rest is ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DocumentJson {
    account_id: String,
    region: String,
    availability_zone: String,
    instance_id: String,
    instance_type: String,
    image_id: String,
    pending_time: String,
    #[serde(default)]
    private_ip: Option<String>,
}

/// Structural checks on the verified JSON.
fn identity(doc: DocumentJson, raw: &[u8]) -> Result<IdentityDocument, IidError> {
    if !is_aws_id(&doc.instance_id, "i-") {
        return Err(invalid("instanceId is not i- and 8 to 17 hex digits"));
    }
    if !(doc.account_id.len() == 12 && doc.account_id.bytes().all(|b| b.is_ascii_digit())) {
        return Err(invalid(format!(
            "instance {}: accountId is not 12 digits",
            doc.instance_id
        )));
    }
    let at = |m: &str| invalid(format!("instance {}: {m}", doc.instance_id));
    if !is_aws_id(&doc.image_id, "ami-") {
        return Err(at("imageId is not ami- and 8 to 17 hex digits"));
    }
    // `us-west-2b`, or a Local Zone `us-west-2-lax-1a`.
    let zone_ok = doc
        .availability_zone
        .strip_prefix(doc.region.as_str())
        .is_some_and(|rest| {
            !rest.is_empty()
                && rest.len() <= 16
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !zone_ok {
        return Err(at("availabilityZone is not a zone of the region"));
    }
    let type_ok = !doc.instance_type.is_empty()
        && doc.instance_type.len() <= 32
        && doc
            .instance_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !type_ok {
        return Err(at("instanceType is malformed"));
    }
    let pending_time: SystemTime = humantime::parse_rfc3339(&doc.pending_time)
        .map_err(|_| at("pendingTime is not RFC 3339"))?;
    let private_ip = match doc.private_ip.as_deref() {
        None => None,
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| at("privateIp is not an IP address"))?,
        ),
    };
    Ok(IdentityDocument {
        account_id: doc.account_id,
        region: doc.region,
        availability_zone: doc.availability_zone,
        instance_id: doc.instance_id,
        instance_type: doc.instance_type,
        image_id: doc.image_id,
        pending_time,
        private_ip,
        raw: raw.to_vec(),
    })
}

/// `<prefix>` followed by 8 to 17 lowercase hex digits (`i-…`, `ami-…`).
fn is_aws_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|hex| {
        (8..=17).contains(&hex.len())
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(edit: impl FnOnce(&mut serde_json::Value)) -> Result<IdentityDocument, IidError> {
        let mut v = serde_json::json!({
            "accountId": "123456789012", "architecture": "x86_64", "availabilityZone": "us-west-2b",
            "imageId": "ami-5fb8c835", "instanceId": "i-1234567890abcdef0", "instanceType": "t2.micro",
            "kernelId": null, "pendingTime": "2016-11-19T16:32:11Z", "privateIp": "10.158.112.84",
            "region": "us-west-2", "version": "2017-09-30"
        });
        edit(&mut v);
        let raw = serde_json::to_vec(&v).expect("json");
        let parsed: DocumentJson = serde_json::from_slice(&raw).map_err(|_| invalid("json"))?;
        identity(parsed, &raw)
    }

    #[test]
    fn structural_checks() {
        let ok = doc(|_| {}).expect("valid document");
        assert_eq!(ok.instance_id, "i-1234567890abcdef0");
        assert_eq!(ok.private_ip, Some("10.158.112.84".parse().expect("ip")));
        assert_eq!(
            ok.pending_time,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_479_573_131)
        );
        assert!(
            doc(|v| v["privateIp"] = serde_json::Value::Null).is_ok_and(|d| d.private_ip.is_none())
        );
        assert!(doc(|v| v["availabilityZone"] = "us-west-2-lax-1a".into()).is_ok());
        assert!(doc(|v| v["privateIp"] = "2600:1f14::1".into()).is_ok());

        let cases: [(&str, serde_json::Value); 11] = [
            ("instanceId", "i-1234567".into()),
            ("instanceId", "i-1234567890abcdef01".into()),
            ("instanceId", "i-1234567890ABCDEF0".into()),
            ("instanceId", "x-1234567890abcdef0".into()),
            ("accountId", "12345678901".into()),
            ("accountId", "12345678901a".into()),
            ("pendingTime", "2016-11-19 16:32:11".into()),
            ("privateIp", "10.158.112".into()),
            ("availabilityZone", "eu-west-1a".into()),
            ("imageId", "ami-xyz".into()),
            ("instanceType", "t2 micro".into()),
        ];
        for (field, value) in cases {
            let shown = value.to_string();
            assert!(
                doc(|v| v[field] = value).is_err(),
                "{field} = {shown} was accepted"
            );
        }
        assert!(doc(|v| v["accountId"] = 123456789012u64.into()).is_err());
    }

    #[test]
    fn ids() {
        assert!(is_aws_id("i-0123abcd", "i-"));
        assert!(is_aws_id("i-0123456789abcdef0", "i-"));
        assert!(!is_aws_id("i-0123abc", "i-"));
        assert!(!is_aws_id("i-", "i-"));
    }
}
