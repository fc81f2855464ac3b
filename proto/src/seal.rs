//! Credentials sealed to the module's ephemeral key with HPKE (RFC 9180)
//! base mode: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.
//!
//! The associated data binds the ciphertext to the response it travels in
//! (request id, role, subject, expiry), so a sealed blob cannot be moved
//! into another answer.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use base64::Engine as _;

use crate::b64_url;

/// The one suite offered, as named in [`crate::ResponseKey::alg`].
pub const ALG: &str = "HPKE-X25519-SHA256-CHACHA20POLY1305";
/// HPKE `info`.
pub const INFO: &[u8] = b"p11shim-broker v1 credentials";

type Kem = X25519HkdfSha256;

/// A sealed credentials document.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// base64url of the 32-byte encapsulated key.
    pub enc: String,
    /// base64url of the ciphertext of the JSON credentials.
    pub ct: String,
    /// The associated data, in clear (see [`aad`]).
    pub aad: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("unsupported response key algorithm")]
    Algorithm,
    #[error("malformed response key")]
    Key,
    #[error("malformed sealed credentials")]
    Malformed,
    #[error("associated data does not match the response")]
    Aad,
    #[error("sealed credentials do not open with this key")]
    Open,
}

/// The associated data for a response.
pub fn aad(request_id: &str, role: &str, subject: &str, expires_at: &str) -> String {
    format!("v1|{request_id}|{role}|{subject}|{expires_at}")
}

/// The module's ephemeral key pair; the private half is zeroized on drop.
pub struct KeyPair {
    sk: <Kem as hpke::Kem>::PrivateKey,
    pk: <Kem as hpke::Kem>::PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("pk", &self.public_b64())
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    pub fn generate() -> KeyPair {
        let (sk, pk) = Kem::gen_keypair();
        KeyPair { sk, pk }
    }

    /// base64url of the public key, for [`crate::ResponseKey::pk`].
    pub fn public_b64(&self) -> String {
        b64_url().encode(self.pk.to_bytes())
    }

    pub fn response_key(&self) -> crate::ResponseKey {
        crate::ResponseKey {
            alg: ALG.to_owned(),
            pk: self.public_b64(),
        }
    }

    /// Opens `sealed`, which must carry exactly `expected_aad`.
    pub fn open(
        &self,
        sealed: &Sealed,
        expected_aad: &str,
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if sealed.aad != expected_aad {
            return Err(SealError::Aad);
        }
        let enc = b64_url()
            .decode(&sealed.enc)
            .map_err(|_| SealError::Malformed)?;
        let ct = b64_url()
            .decode(&sealed.ct)
            .map_err(|_| SealError::Malformed)?;
        let enc =
            <Kem as hpke::Kem>::EncappedKey::from_bytes(&enc).map_err(|_| SealError::Malformed)?;
        hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.sk,
            &enc,
            INFO,
            &ct,
            sealed.aad.as_bytes(),
        )
        .map(Zeroizing::new)
        .map_err(|_| SealError::Open)
    }
}

/// Seals `plaintext` to the key a request named.
pub fn seal(key: &crate::ResponseKey, plaintext: &[u8], aad: String) -> Result<Sealed, SealError> {
    if key.alg != ALG {
        return Err(SealError::Algorithm);
    }
    let pk = b64_url().decode(&key.pk).map_err(|_| SealError::Key)?;
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&pk).map_err(|_| SealError::Key)?;
    let (enc, ct) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeS::Base,
        &pk,
        INFO,
        plaintext,
        aad.as_bytes(),
    )
    .map_err(|_| SealError::Key)?;
    Ok(Sealed {
        enc: b64_url().encode(enc.to_bytes()),
        ct: b64_url().encode(ct),
        aad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let kp = KeyPair::generate();
        let a = aad("r1", "role", "subj", "2026-01-01T00:00:00Z");
        let s = seal(&kp.response_key(), b"{\"pin\":\"1234\"}", a.clone()).unwrap();
        assert!(!s.ct.contains("1234"));
        assert_eq!(&kp.open(&s, &a).unwrap()[..], b"{\"pin\":\"1234\"}");
    }

    #[test]
    fn wrong_key_or_aad_fails() {
        let kp = KeyPair::generate();
        let other = KeyPair::generate();
        let a = aad("r1", "role", "subj", "x");
        let s = seal(&kp.response_key(), b"secret", a.clone()).unwrap();
        assert_eq!(other.open(&s, &a).unwrap_err(), SealError::Open);
        assert_eq!(
            kp.open(&s, "v1|r2|role|subj|x").unwrap_err(),
            SealError::Aad
        );
        let mut moved = s.clone();
        moved.aad = "v1|r2|role|subj|x".into();
        assert_eq!(
            kp.open(&moved, &moved.aad.clone()).unwrap_err(),
            SealError::Open
        );
        let mut bad = kp.response_key();
        bad.alg = "HPKE-P256".into();
        assert_eq!(seal(&bad, b"x", a).unwrap_err(), SealError::Algorithm);
    }
}
