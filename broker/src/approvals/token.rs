//! The approval token: the bearer credential of a module's approval
//! requests and consumptions, handed out sealed with its credentials.
//!
//! `base64url(JSON {"role", "subject", "exp"}) "." base64url(HMAC-SHA256(key,
//! first part))`, without padding. Stateless: any replica holding the same
//! `[server] approval_token_key` accepts it until `exp` (Unix seconds, the
//! grant's expiry). The MAC is compared in constant time.

use std::fmt;

use base64::Engine as _;
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sign::Signer;
use p11shim_proto::b64_url;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;
/// The longest token read.
const MAX_TOKEN_CHARS: usize = 2048;

/// What a token says, once its MAC is checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenClaims {
    pub role: String,
    pub subject: String,
    /// Unix seconds.
    pub exp: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("approval token malformed")]
    Malformed,
    #[error("approval token MAC does not verify")]
    BadMac,
    #[error("approval token expired")]
    Expired,
    #[error("approval token key: {0}")]
    Key(String),
}

/// The HMAC key of the approval tokens.
pub struct TokenKey {
    key: Zeroizing<Vec<u8>>,
    /// Whether it was made at random by this process.
    pub ephemeral: bool,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("ephemeral", &self.ephemeral)
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    /// A key from a secret source's value: its bytes, at least
    /// [`MIN_KEY_BYTES`] of them.
    pub fn from_secret(value: &str) -> Result<TokenKey, TokenError> {
        if value.len() < MIN_KEY_BYTES {
            return Err(TokenError::Key(format!(
                "{} bytes; at least {MIN_KEY_BYTES} are needed (e.g. `openssl rand -base64 48`)",
                value.len()
            )));
        }
        Ok(TokenKey {
            key: Zeroizing::new(value.as_bytes().to_vec()),
            ephemeral: false,
        })
    }

    /// 32 random bytes, for this process only.
    pub fn random() -> Result<TokenKey, TokenError> {
        let mut k = Zeroizing::new(vec![0u8; 32]);
        getrandom::fill(&mut k).map_err(|e| TokenError::Key(format!("random: {e}")))?;
        Ok(TokenKey {
            key: k,
            ephemeral: true,
        })
    }

    fn mac(&self, payload: &[u8]) -> Result<Vec<u8>, TokenError> {
        let run = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
            let k = PKey::hmac(&self.key)?;
            let mut s = Signer::new(MessageDigest::sha256(), &k)?;
            s.update(payload)?;
            s.sign_to_vec()
        };
        run().map_err(|e| TokenError::Key(format!("HMAC: {e}")))
    }

    /// A token for `role` and `subject`, valid until `exp`.
    pub fn mint(&self, claims: &TokenClaims) -> Result<Zeroizing<String>, TokenError> {
        let json = serde_json::to_vec(claims).map_err(|e| TokenError::Key(e.to_string()))?;
        let payload = b64_url().encode(json);
        let mac = self.mac(payload.as_bytes())?;
        Ok(Zeroizing::new(format!(
            "{payload}.{}",
            b64_url().encode(mac)
        )))
    }

    /// The claims of `token` if its MAC verifies and it has not expired at
    /// `now`.
    pub fn verify(&self, token: &str, now: i64) -> Result<TokenClaims, TokenError> {
        if token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Malformed);
        }
        let (payload, mac) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let mac = b64_url().decode(mac).map_err(|_| TokenError::Malformed)?;
        let expected = self.mac(payload.as_bytes())?;
        if mac.len() != expected.len() || !bool::from(mac.ct_eq(&expected)) {
            return Err(TokenError::BadMac);
        }
        let json = b64_url()
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let claims: TokenClaims =
            serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TokenClaims {
        TokenClaims {
            role: "ca".into(),
            subject: "fingerprint:ab".into(),
            exp: 1_000,
        }
    }

    #[test]
    fn round_trip_and_tampering() {
        let k = TokenKey::from_secret(&"k".repeat(32)).unwrap();
        let t = k.mint(&claims()).unwrap();
        assert_eq!(k.verify(&t, 999), Ok(claims()));
        assert_eq!(k.verify(&t, 1_000), Err(TokenError::Expired));
        let other = TokenKey::from_secret(&"j".repeat(32)).unwrap();
        assert_eq!(other.verify(&t, 0), Err(TokenError::BadMac));
        // Another payload under the first token's MAC.
        let mut forged = claims();
        forged.role = "root".into();
        let forged_payload = b64_url().encode(serde_json::to_vec(&forged).unwrap());
        let mac = t.split_once('.').unwrap().1;
        assert_eq!(
            k.verify(&format!("{forged_payload}.{mac}"), 0),
            Err(TokenError::BadMac)
        );
        assert_eq!(k.verify("nodot", 0), Err(TokenError::Malformed));
        assert_eq!(k.verify("a.!!", 0), Err(TokenError::Malformed));
    }

    #[test]
    fn short_keys_are_refused_and_never_shown() {
        let e = TokenKey::from_secret("short-secret")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("short-secret"), "{e}");
        let r = TokenKey::random().unwrap();
        assert!(r.ephemeral);
        assert!(!format!("{r:?}").contains("key:"));
    }
}
