//! Offline verification: the cluster's signing keys as a JWKS, pinned in a
//! file or found through OIDC discovery (`{issuer}/.well-known/openid-configuration`
//! → `jwks_uri`), and the token's signature checked with the key its `kid`
//! names, under the algorithm that key is for.
//!
//! A discovered JWKS is cached. An unknown `kid` triggers one refresh, at
//! most once per [`REFRESH_MIN_INTERVAL`] (so that a stream of made-up kids
//! cannot turn the broker against the apiserver); the set is also refetched
//! when older than [`MAX_AGE`], so that a key the cluster dropped stops
//! being trusted. When that periodic refetch fails, the cached set is kept.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use serde_json::Value;
use tokio::sync::Mutex;

use super::K8sError;
use super::http::{HttpClient, Url};
use super::jws::{Alg, Compact, shown};

/// The shortest time between two refreshes caused by unknown kids.
pub const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// A discovered key set older than this is fetched again.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// A larger discovery document or JWKS is refused.
const MAX_DOCUMENT: usize = 256 * 1024;

/// One verification key and the algorithm it serves.
struct Key {
    alg: Alg,
    key: DecodingKey,
}

/// Keys by kid. Keys that cannot serve RS256 or ES256 signatures (HMAC
/// secrets, other curves, encryption keys) are left out.
pub struct KeySet {
    keys: HashMap<String, Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

fn b64_len(v: Option<&Value>) -> Option<usize> {
    let s = v?.as_str()?;
    URL_SAFE_NO_PAD.decode(s).ok().map(|b| b.len())
}

fn key_of(jwk: &serde_json::Map<String, Value>) -> Option<(String, Key)> {
    let kid = jwk.get("kid")?.as_str().filter(|k| !k.is_empty())?;
    if let Some(u) = jwk.get("use")
        && u.as_str() != Some("sig")
    {
        return None;
    }
    let declared = jwk.get("alg").and_then(Value::as_str);
    let (alg, key) = match jwk.get("kty")?.as_str()? {
        "RSA" => {
            // ring wants at least 2048 bits; say it here, once.
            if b64_len(jwk.get("n"))? < 256 {
                return None;
            }
            let key =
                DecodingKey::from_rsa_components(jwk.get("n")?.as_str()?, jwk.get("e")?.as_str()?)
                    .ok()?;
            (Alg::Rs256, key)
        }
        "EC" => {
            if jwk.get("crv")?.as_str()? != "P-256"
                || b64_len(jwk.get("x"))? != 32
                || b64_len(jwk.get("y"))? != 32
            {
                return None;
            }
            let key =
                DecodingKey::from_ec_components(jwk.get("x")?.as_str()?, jwk.get("y")?.as_str()?)
                    .ok()?;
            (Alg::Es256, key)
        }
        _ => return None,
    };
    if declared.is_some_and(|d| d != alg.name()) {
        return None;
    }
    Some((kid.to_owned(), Key { alg, key }))
}

impl KeySet {
    /// Reads a JWKS document (`{"keys": [...]}`).
    pub fn parse(bytes: &[u8]) -> Result<KeySet, String> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("JWKS has no keys array")?;
        let mut keys = HashMap::new();
        for jwk in list.iter().filter_map(Value::as_object) {
            if let Some((kid, key)) = key_of(jwk) {
                // Two keys under one kid: trust neither.
                if keys.insert(kid.clone(), key).is_some() {
                    return Err(format!("JWKS has two keys with kid {}", shown(&kid)));
                }
            }
        }
        if keys.is_empty() {
            return Err("JWKS has no usable RS256 or ES256 signing key".into());
        }
        Ok(KeySet { keys })
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Checks the signature with the `kid` key, which must serve the
    /// header's algorithm.
    fn check(&self, jws: &Compact<'_>, kid: &str) -> Result<(), K8sError> {
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| K8sError::Denied(format!("unknown key id {}", shown(kid))))?;
        if key.alg != jws.alg {
            return Err(K8sError::Denied(format!(
                "key {} is for {}, the token says {}",
                shown(kid),
                key.alg.name(),
                jws.alg.name()
            )));
        }
        match jsonwebtoken::crypto::verify(
            jws.signature,
            jws.signing_input.as_bytes(),
            &key.key,
            key.alg.jsonwebtoken(),
        ) {
            Ok(true) => Ok(()),
            _ => Err(K8sError::Denied("bad signature".into())),
        }
    }
}

/// Where the keys come from.
#[derive(Debug)]
pub enum KeySource {
    /// A JWKS file read once at start: an unknown kid is refused.
    Pinned(KeySet),
    Discovered(Box<Discovery>),
}

#[derive(Debug, Default)]
struct Cache {
    keys: Option<Arc<KeySet>>,
    fetched_at: Option<SystemTime>,
    last_attempt: Option<SystemTime>,
}

/// A JWKS found through the issuer's discovery document.
#[derive(Debug)]
pub struct Discovery {
    issuer: String,
    document: Url,
    http: HttpClient,
    cache: Mutex<Cache>,
}

/// Whether `interval` has passed from `then` to `now`; a clock that went
/// back counts as passed, so that a clock step cannot stop refreshes.
fn elapsed(then: Option<SystemTime>, now: SystemTime, interval: Duration) -> bool {
    match then {
        None => true,
        Some(t) => now.duration_since(t).map_or(true, |d| d >= interval),
    }
}

impl Discovery {
    pub fn new(issuer: String, http: HttpClient) -> Result<Discovery, K8sError> {
        let document = Url::parse_checked(&issuer)?.join("/.well-known/openid-configuration");
        Ok(Discovery {
            issuer,
            document,
            http,
            cache: Mutex::new(Cache::default()),
        })
    }

    async fn fetch(&self) -> Result<KeySet, K8sError> {
        let doc = self.http.get(&self.document, MAX_DOCUMENT).await?;
        let doc: Value = serde_json::from_slice(&doc)
            .map_err(|_| K8sError::Unavailable("discovery document is not JSON".into()))?;
        // OpenID Connect Discovery 1.0 §4.3: the document names its issuer.
        if doc.get("issuer").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(K8sError::Unavailable(
                "discovery document names another issuer".into(),
            ));
        }
        let jwks_uri = doc
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| K8sError::Unavailable("discovery document has no jwks_uri".into()))?;
        let jwks_uri = Url::parse_checked(jwks_uri).map_err(|_| {
            K8sError::Unavailable("jwks_uri is not https (or http on loopback)".into())
        })?;
        let jwks = self.http.get(&jwks_uri, MAX_DOCUMENT).await?;
        KeySet::parse(&jwks).map_err(K8sError::Unavailable)
    }

    /// The key set that should hold `kid`, refreshed as the module header
    /// says.
    async fn keys_for(&self, kid: &str, now: SystemTime) -> Result<Arc<KeySet>, K8sError> {
        // Held across the fetch: concurrent requests wait for one fetch
        // instead of each making their own.
        let mut cache = self.cache.lock().await;
        let stale = elapsed(cache.fetched_at, now, MAX_AGE);
        if cache.keys.is_none() || (stale && elapsed(cache.last_attempt, now, REFRESH_MIN_INTERVAL))
        {
            cache.last_attempt = Some(now);
            match self.fetch().await {
                Ok(k) => {
                    cache.keys = Some(Arc::new(k));
                    cache.fetched_at = Some(now);
                }
                Err(e) if cache.keys.is_some() => {
                    tracing::warn!(issuer = %self.issuer, error = %e, "JWKS refresh failed; the cached keys stay in use");
                }
                Err(e) => return Err(e),
            }
        }
        let keys = cache
            .keys
            .clone()
            .ok_or_else(|| K8sError::Unavailable("no JWKS".into()))?;
        if keys.contains(kid) {
            return Ok(keys);
        }
        if !elapsed(cache.last_attempt, now, REFRESH_MIN_INTERVAL) {
            return Err(K8sError::Denied(format!(
                "unknown key id {} (keys refreshed less than {} s ago)",
                shown(kid),
                REFRESH_MIN_INTERVAL.as_secs()
            )));
        }
        cache.last_attempt = Some(now);
        let fresh = Arc::new(self.fetch().await?);
        tracing::info!(issuer = %self.issuer, keys = ?fresh, "JWKS refreshed for an unknown kid");
        cache.keys = Some(fresh.clone());
        cache.fetched_at = Some(now);
        Ok(fresh)
    }
}

impl KeySource {
    /// Checks the token's signature.
    pub async fn verify(&self, jws: &Compact<'_>, now: SystemTime) -> Result<(), K8sError> {
        let kid = jws
            .kid
            .as_deref()
            .ok_or_else(|| K8sError::Denied("token header has no kid".into()))?;
        match self {
            KeySource::Pinned(keys) => keys.check(jws, kid),
            KeySource::Discovered(d) => d.keys_for(kid, now).await?.check(jws, kid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rsa_jwk(kid: &str, bits: u32) -> Value {
        let k = openssl::rsa::Rsa::generate(bits).unwrap();
        json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
               "n": URL_SAFE_NO_PAD.encode(k.n().to_vec()), "e": URL_SAFE_NO_PAD.encode(k.e().to_vec())})
    }

    #[test]
    fn unusable_keys_are_left_out() {
        let set = json!({"keys": [
            rsa_jwk("a", 2048),
            rsa_jwk("small", 1024),
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AA", "e": "AQAB"},
        ]});
        let mut wrong_alg = rsa_jwk("es", 2048);
        wrong_alg["alg"] = json!("ES256");
        let mut v = set.clone();
        v["keys"].as_array_mut().unwrap().push(wrong_alg);
        let ks = KeySet::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(ks.contains("a"));
        for k in ["small", "h", "p384", "enc", "es"] {
            assert!(!ks.contains(k), "{k}");
        }
    }

    #[test]
    fn duplicate_kid_and_empty_sets_are_refused() {
        let v = json!({"keys": [rsa_jwk("a", 2048), rsa_jwk("a", 2048)]});
        assert!(KeySet::parse(&serde_json::to_vec(&v).unwrap()).is_err());
        assert!(KeySet::parse(br#"{"keys": []}"#).is_err());
        assert!(KeySet::parse(b"[]").is_err());
    }

    #[test]
    fn refresh_interval() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert!(elapsed(None, t, REFRESH_MIN_INTERVAL));
        assert!(!elapsed(
            Some(t),
            t + Duration::from_secs(29),
            REFRESH_MIN_INTERVAL
        ));
        assert!(elapsed(
            Some(t),
            t + Duration::from_secs(30),
            REFRESH_MIN_INTERVAL
        ));
        assert!(elapsed(
            Some(t),
            t - Duration::from_secs(1),
            REFRESH_MIN_INTERVAL
        ));
    }
}
