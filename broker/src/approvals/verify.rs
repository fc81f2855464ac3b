//! Approvers' public keys and the signatures they make over a request's
//! `approval_data`.
//!
//! A key is an SPKI PEM file (`openssl pkey -pubout`): RSA of at least
//! 2048 bits, or Ed25519. RSA signatures are checked as PKCS#1 v1.5 with
//! SHA-256 (`openssl dgst -sha256 -sign`, `pkcs11-tool -m SHA256-RSA-PKCS`)
//! and, failing that, as PSS with SHA-256, MGF1-SHA-256 and any salt length
//! (`-sigopt rsa_padding_mode:pss`, `SHA256-RSA-PKCS-PSS`). Ed25519
//! signatures are pure Ed25519 over the bytes themselves
//! (`openssl pkeyutl -sign -rawin`).

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use openssl::hash::MessageDigest;
use openssl::pkey::{Id, PKey, Public};
use openssl::rsa::Padding;
use openssl::sign::{RsaPssSaltlen, Verifier};

/// The smallest RSA modulus accepted.
pub const MIN_RSA_BITS: u32 = 2048;
/// The largest decoded signature accepted (RSA-8192).
const MAX_SIGNATURE_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{path}: {message}")]
    Load { path: String, message: String },
}

/// Why a signature is not accepted (for the log; the client hears
/// `denied` or `bad_request`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("signature is not base64")]
    Encoding,
    #[error("signature of {0} bytes is out of range")]
    Length(usize),
    #[error("bad signature")]
    Bad,
}

/// What kind of key an approver has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa { bits: u32 },
    Ed25519,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::Rsa { bits } => write!(f, "RSA-{bits}"),
            KeyKind::Ed25519 => f.write_str("Ed25519"),
        }
    }
}

/// One approver's public key.
pub struct ApproverKey {
    pub path: PathBuf,
    pub kind: KeyKind,
    key: PKey<Public>,
}

impl fmt::Debug for ApproverKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApproverKey")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl ApproverKey {
    /// Loads and checks an SPKI PEM public key.
    pub fn load(path: &Path) -> Result<ApproverKey, KeyError> {
        let err = |message: String| KeyError::Load {
            path: path.display().to_string(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.kind().to_string()))?;
        ApproverKey::from_pem(&pem, path).map_err(err)
    }

    /// Parses `pem` (an SPKI `PUBLIC KEY` block); `path` names it.
    pub fn from_pem(pem: &[u8], path: &Path) -> Result<ApproverKey, String> {
        let key = PKey::public_key_from_pem(pem)
            .map_err(|_| "not a PEM public key (SPKI, `openssl pkey -pubout`)".to_string())?;
        let kind = match key.id() {
            Id::RSA => {
                let bits = key.bits();
                if bits < MIN_RSA_BITS {
                    return Err(format!(
                        "RSA key of {bits} bits; at least {MIN_RSA_BITS} are needed"
                    ));
                }
                KeyKind::Rsa { bits }
            }
            Id::ED25519 => KeyKind::Ed25519,
            other => {
                return Err(format!(
                    "key type {other:?} is not accepted (RSA >= {MIN_RSA_BITS} bits or Ed25519)"
                ));
            }
        };
        Ok(ApproverKey {
            path: path.to_owned(),
            kind,
            key,
        })
    }

    /// Checks `signature` (base64; whitespace and line breaks, as
    /// `openssl base64` writes them, are ignored) over `data`.
    pub fn verify(&self, data: &[u8], signature: &str) -> Result<(), SignatureError> {
        let compact: String = signature
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let sig = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|_| SignatureError::Encoding)?;
        if sig.is_empty() || sig.len() > MAX_SIGNATURE_BYTES {
            return Err(SignatureError::Length(sig.len()));
        }
        let ok = match self.kind {
            KeyKind::Rsa { .. } => {
                self.rsa(data, &sig, Padding::PKCS1) || self.rsa(data, &sig, Padding::PKCS1_PSS)
            }
            KeyKind::Ed25519 => Verifier::new_without_digest(&self.key)
                .and_then(|mut v| v.verify_oneshot(&sig, data))
                .unwrap_or(false),
        };
        if ok { Ok(()) } else { Err(SignatureError::Bad) }
    }

    fn rsa(&self, data: &[u8], sig: &[u8], padding: Padding) -> bool {
        let check = || -> Result<bool, openssl::error::ErrorStack> {
            let mut v = Verifier::new(MessageDigest::sha256(), &self.key)?;
            v.set_rsa_padding(padding)?;
            if padding == Padding::PKCS1_PSS {
                v.set_rsa_mgf1_md(MessageDigest::sha256())?;
                // RSA_PSS_SALTLEN_AUTO: the salt length is read from the
                // signature (openssl's default when signing is the maximum,
                // pkcs11-tool's the digest length).
                v.set_rsa_pss_saltlen(RsaPssSaltlen::custom(-2))?;
            }
            v.update(data)?;
            v.verify(sig)
        };
        check().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::pkey::Private;
    use openssl::rsa::Rsa;
    use openssl::sign::Signer;

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    fn public(k: &PKey<Private>) -> ApproverKey {
        ApproverKey::from_pem(&k.public_key_to_pem().unwrap(), Path::new("/k.pem")).unwrap()
    }

    #[test]
    fn rsa_pkcs1_and_pss() {
        let k = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let pubk = public(&k);
        assert_eq!(pubk.kind, KeyKind::Rsa { bits: 2048 });
        let data = b"p11shim-approval-v1\nid: apr_1\n";
        let mut s = Signer::new(MessageDigest::sha256(), &k).unwrap();
        s.update(data).unwrap();
        let sig = s.sign_to_vec().unwrap();
        assert_eq!(pubk.verify(data, &b64(&sig)), Ok(()));
        assert_eq!(pubk.verify(b"other", &b64(&sig)), Err(SignatureError::Bad));
        for salt in [RsaPssSaltlen::DIGEST_LENGTH, RsaPssSaltlen::MAXIMUM_LENGTH] {
            let mut s = Signer::new(MessageDigest::sha256(), &k).unwrap();
            s.set_rsa_padding(Padding::PKCS1_PSS).unwrap();
            s.set_rsa_mgf1_md(MessageDigest::sha256()).unwrap();
            s.set_rsa_pss_saltlen(salt).unwrap();
            s.update(data).unwrap();
            let sig = s.sign_to_vec().unwrap();
            // Wrapped at 64 columns, as `openssl base64` writes it.
            let wrapped: String = b64(&sig)
                .as_bytes()
                .chunks(64)
                .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
                .collect();
            assert_eq!(pubk.verify(data, &wrapped), Ok(()));
        }
        assert_eq!(pubk.verify(data, "***"), Err(SignatureError::Encoding));
        assert_eq!(pubk.verify(data, ""), Err(SignatureError::Length(0)));
    }

    #[test]
    fn ed25519_pure() {
        let k = PKey::generate_ed25519().unwrap();
        let pubk = public(&k);
        assert_eq!(pubk.kind, KeyKind::Ed25519);
        let data = b"approval data";
        let sig = Signer::new_without_digest(&k)
            .unwrap()
            .sign_oneshot_to_vec(data)
            .unwrap();
        assert_eq!(pubk.verify(data, &b64(&sig)), Ok(()));
        let other = public(&PKey::generate_ed25519().unwrap());
        assert_eq!(other.verify(data, &b64(&sig)), Err(SignatureError::Bad));
    }

    #[test]
    fn weak_and_foreign_keys_are_refused() {
        let small = PKey::from_rsa(Rsa::generate(1024).unwrap()).unwrap();
        let e = ApproverKey::from_pem(&small.public_key_to_pem().unwrap(), Path::new("/k"))
            .unwrap_err();
        assert!(e.contains("1024 bits"), "{e}");
        let ec = openssl::ec::EcKey::generate(
            &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
        )
        .unwrap();
        let ec = PKey::from_ec_key(ec).unwrap();
        let e =
            ApproverKey::from_pem(&ec.public_key_to_pem().unwrap(), Path::new("/k")).unwrap_err();
        assert!(e.contains("not accepted"), "{e}");
        assert!(ApproverKey::from_pem(b"junk", Path::new("/k")).is_err());
    }
}
