//! Checkpoint signatures: Ed25519 with a key the module holds, or
//! HMAC-SHA256 with a key the broker hands out. Key bytes are never
//! printed: `Debug` shows the algorithm and the key id only.

use std::fmt;

use ed25519_dalek::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::Error;
use crate::record::hex;

/// Algorithm name of Ed25519 checkpoints.
pub const ALG_ED25519: &str = "ed25519";
/// Algorithm name of HMAC-SHA256 checkpoints.
pub const ALG_HMAC: &str = "hmac-sha256";

/// The key that signs checkpoints.
pub enum Signer {
    /// An Ed25519 private key.
    Ed25519(SigningKey),
    /// An HMAC-SHA256 key.
    Hmac(Zeroizing<Vec<u8>>),
}

impl Signer {
    /// An Ed25519 key from PKCS#8 PEM (`openssl genpkey -algorithm ed25519`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Signer, Error> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Signer::Ed25519)
            .map_err(|e| Error::Key(format!("not an Ed25519 PKCS#8 private key: {e}")))
    }

    /// An HMAC-SHA256 key.
    pub fn hmac(key: Zeroizing<Vec<u8>>) -> Signer {
        Signer::Hmac(key)
    }

    /// The name written in the checkpoints' `alg` field.
    pub fn alg(&self) -> &'static str {
        match self {
            Signer::Ed25519(_) => ALG_ED25519,
            Signer::Hmac(_) => ALG_HMAC,
        }
    }

    /// First 8 bytes, in hex, of SHA-256 of the public key (Ed25519) or of
    /// the HMAC key.
    pub fn key_id(&self) -> String {
        match self {
            Signer::Ed25519(k) => key_id(k.verifying_key().as_bytes()),
            Signer::Hmac(k) => key_id(k),
        }
    }

    /// The key that verifies this signer's checkpoints.
    pub fn verify_key(&self) -> VerifyKey {
        match self {
            Signer::Ed25519(k) => VerifyKey::Ed25519(k.verifying_key()),
            Signer::Hmac(k) => VerifyKey::Hmac(k.clone()),
        }
    }

    pub(crate) fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match self {
            Signer::Ed25519(k) => k.sign(msg).to_bytes().to_vec(),
            Signer::Hmac(k) => {
                let mut mac = new_mac(k);
                mac.update(msg);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("alg", &self.alg())
            .field("key_id", &self.key_id())
            .finish()
    }
}

/// The key that checks checkpoint signatures.
pub enum VerifyKey {
    /// An Ed25519 public key.
    Ed25519(VerifyingKey),
    /// The HMAC-SHA256 key.
    Hmac(Zeroizing<Vec<u8>>),
    /// No key: the hash chain only.
    None,
}

impl VerifyKey {
    /// An Ed25519 public key from SPKI PEM (`openssl pkey -pubout`).
    pub fn from_public_pem(pem: &str) -> Result<VerifyKey, Error> {
        VerifyingKey::from_public_key_pem(pem)
            .map(VerifyKey::Ed25519)
            .map_err(|e| Error::Key(format!("not an Ed25519 public key: {e}")))
    }

    /// The key's algorithm name, `None` for [`VerifyKey::None`].
    pub fn alg(&self) -> Option<&'static str> {
        match self {
            VerifyKey::Ed25519(_) => Some(ALG_ED25519),
            VerifyKey::Hmac(_) => Some(ALG_HMAC),
            VerifyKey::None => None,
        }
    }

    /// The key id checkpoints name (see [`Signer::key_id`]).
    pub fn key_id(&self) -> Option<String> {
        match self {
            VerifyKey::Ed25519(k) => Some(key_id(k.as_bytes())),
            VerifyKey::Hmac(k) => Some(key_id(k)),
            VerifyKey::None => None,
        }
    }

    /// Whether `sig` is this key's signature of `msg`.
    pub(crate) fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match self {
            VerifyKey::Ed25519(k) => ed25519_dalek::Signature::from_slice(sig)
                .is_ok_and(|s| k.verify_strict(msg, &s).is_ok()),
            VerifyKey::Hmac(k) => {
                let mut mac = new_mac(k);
                mac.update(msg);
                // Constant-time comparison.
                mac.verify_slice(sig).is_ok()
            }
            VerifyKey::None => false,
        }
    }
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKey")
            .field("alg", &self.alg())
            .field("key_id", &self.key_id())
            .finish()
    }
}

fn new_mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; the error case cannot happen.
    <Hmac<Sha256> as hmac::Mac>::new_from_slice(key)
        .unwrap_or_else(|_| <Hmac<Sha256> as hmac::Mac>::new(&Default::default()))
}

fn key_id(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes)[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    // A fixed RFC 8032 test key (section 7.1, TEST 1), in PKCS#8 and SPKI.
    const PRIV: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n\
        -----END PRIVATE KEY-----\n";
    const PUB: &str = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n\
        -----END PUBLIC KEY-----\n";

    #[test]
    fn ed25519_from_pem_signs_and_verifies() {
        let s = Signer::from_pkcs8_pem(PRIV).unwrap();
        let v = VerifyKey::from_public_pem(PUB).unwrap();
        assert_eq!(s.key_id(), v.key_id().unwrap());
        let sig = s.sign(b"line");
        assert!(v.verify(b"line", &sig));
        assert!(!v.verify(b"lime", &sig));
        assert!(Signer::from_pkcs8_pem(PUB).is_err());
        assert!(VerifyKey::from_public_pem(PRIV).is_err());
    }

    #[test]
    fn hmac_signs_and_verifies_and_debug_hides_the_key() {
        let s = Signer::hmac(Zeroizing::new(b"0123456789abcdef0123456789abcdef".to_vec()));
        let sig = s.sign(b"line");
        assert!(s.verify_key().verify(b"line", &sig));
        let other = VerifyKey::Hmac(Zeroizing::new(b"another key".to_vec()));
        assert!(!other.verify(b"line", &sig));
        let dbg = format!("{s:?} {:?}", s.verify_key());
        assert!(!dbg.contains("0123456789abcdef0123"), "{dbg}");
        assert!(dbg.contains("hmac-sha256"));
        let ed = Signer::from_pkcs8_pem(PRIV).unwrap();
        assert!(!format!("{ed:?}").contains("SigningKey"));
    }
}
