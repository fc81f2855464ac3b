//! The checks made before any network call: the token's compact JWS shape,
//! its header (only RS256 and ES256), and its claims, still unverified,
//! read only to refuse what no projected service-account token looks like
//! (legacy secret-based tokens, extended default-audience tokens, lifetimes
//! above the configured maximum, wrong issuer or audience, outside its
//! validity window). Nothing here trusts a claim: the identity is taken
//! only after the signature (OIDC) or the apiserver (TokenReview) said yes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::K8sError;

/// Larger tokens are refused unread. Real projected tokens are about 1 KiB.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The issuer of legacy, secret-based service-account tokens.
const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";

/// The signature algorithms the Kubernetes token signer uses. Everything
/// else, `none` and the HMAC family above all, is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }

    pub fn jsonwebtoken(self) -> jsonwebtoken::Algorithm {
        match self {
            Alg::Rs256 => jsonwebtoken::Algorithm::RS256,
            Alg::Es256 => jsonwebtoken::Algorithm::ES256,
        }
    }
}

/// A token split into its parts, with its header read.
#[derive(Debug)]
pub struct Compact<'a> {
    /// `base64url(header) "." base64url(payload)`: what the signature covers.
    pub signing_input: &'a str,
    /// The signature, still base64url.
    pub signature: &'a str,
    pub alg: Alg,
    pub kid: Option<String>,
    payload: Vec<u8>,
}

fn denied(reason: impl Into<String>) -> K8sError {
    K8sError::Denied(reason.into())
}

/// A claim or header value as it may appear in a log line: quoted, control
/// characters escaped, cut at 64 characters.
pub fn shown(s: &str) -> String {
    shown_at_most(s, 64)
}

/// [`shown`], cut at `max` characters.
pub fn shown_at_most(s: &str, max: usize) -> String {
    let cut: String = s.chars().take(max).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

fn b64_part(part: &str, what: &str) -> Result<Vec<u8>, K8sError> {
    if !part
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(denied(format!("malformed token: {what} is not base64url")));
    }
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| denied(format!("malformed token: {what} is not base64url")))
}

fn json_object(bytes: &[u8], what: &str) -> Result<Map<String, Value>, K8sError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(denied(format!(
            "malformed token: {what} is not a JSON object"
        ))),
    }
}

impl<'a> Compact<'a> {
    /// Size, shape and header checks.
    pub fn parse(token: &'a str) -> Result<Compact<'a>, K8sError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(denied(format!(
                "token of {} bytes (at most {MAX_TOKEN_LEN})",
                token.len()
            )));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(denied(
                "malformed token: not a compact JWS (three dot-separated parts)",
            ));
        };
        if h.is_empty() || p.is_empty() {
            return Err(denied("malformed token: empty header or payload"));
        }
        let header = json_object(&b64_part(h, "header")?, "header")?;
        let alg = match header.get("alg") {
            Some(Value::String(a)) if a == "RS256" => Alg::Rs256,
            Some(Value::String(a)) if a == "ES256" => Alg::Es256,
            Some(Value::String(a)) => {
                return Err(denied(format!(
                    "algorithm {} refused (RS256 or ES256 only)",
                    shown(a)
                )));
            }
            _ => return Err(denied("malformed token: header without alg")),
        };
        match header.get("typ") {
            None => {}
            Some(Value::String(t)) if t.eq_ignore_ascii_case("JWT") => {}
            Some(t) => {
                return Err(denied(format!(
                    "header typ {} refused (JWT only)",
                    shown(&t.to_string())
                )));
            }
        }
        if header.contains_key("crit") {
            return Err(denied("header has crit extensions (none is understood)"));
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) if !k.is_empty() => Some(k.clone()),
            Some(_) => return Err(denied("malformed token: kid is not a non-empty string")),
        };
        if s.is_empty() {
            return Err(denied("malformed token: no signature"));
        }
        // Decoding it checks the alphabet; the key checks the length.
        b64_part(s, "signature")?;
        let payload = b64_part(p, "payload")?;
        Ok(Compact {
            signing_input: &token[..h.len() + 1 + p.len()],
            signature: s,
            alg,
            kid,
            payload,
        })
    }

    /// The payload's claims, read without trusting them.
    pub fn claims(&self) -> Result<Claims, K8sError> {
        Claims::parse(&json_object(&self.payload, "payload")?)
    }
}

/// `kubernetes.io.pod` or `.node`: a bound object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    pub name: String,
    pub uid: String,
}

/// The claims of a projected service-account token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: Option<i64>,
    pub jti: Option<String>,
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<Bound>,
    pub node: Option<Bound>,
}

fn int_claim(m: &Map<String, Value>, k: &str) -> Result<Option<i64>, K8sError> {
    match m.get(k) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| denied(format!("claim {k} is not an integer NumericDate"))),
    }
}

fn str_claim<'m>(m: &'m Map<String, Value>, k: &str) -> Result<Option<&'m str>, K8sError> {
    match m.get(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(denied(format!("claim {k} is not a string"))),
    }
}

fn bound(m: &Map<String, Value>, k: &str) -> Result<Option<Bound>, K8sError> {
    let Some(v) = m.get(k) else { return Ok(None) };
    let o = v
        .as_object()
        .ok_or_else(|| denied(format!("claim kubernetes.io.{k} is not an object")))?;
    match (str_claim(o, "name")?, str_claim(o, "uid")?) {
        (Some(name), Some(uid)) if !name.is_empty() && !uid.is_empty() => Ok(Some(Bound {
            name: name.to_owned(),
            uid: uid.to_owned(),
        })),
        _ => Err(denied(format!(
            "claim kubernetes.io.{k} lacks its name or uid"
        ))),
    }
}

/// A namespace is a DNS-1123 label.
pub fn valid_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A service-account name is a DNS-1123 subdomain.
pub fn valid_service_account(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(valid_namespace)
}

impl Claims {
    fn parse(m: &Map<String, Value>) -> Result<Claims, K8sError> {
        let iss = str_claim(m, "iss")?.unwrap_or_default();
        if iss == LEGACY_ISSUER {
            return Err(denied(
                "legacy secret-based service-account token; mount a projected token",
            ));
        }
        let Some(exp) = int_claim(m, "exp")? else {
            return Err(denied(
                "token without exp (legacy or non-expiring); mount a projected token",
            ));
        };
        let k8s = match m.get("kubernetes.io") {
            Some(Value::Object(o)) => o,
            _ => {
                return Err(denied(
                    "no kubernetes.io claim: not a service-account token",
                ));
            }
        };
        if k8s.contains_key("warnafter") {
            return Err(denied(
                "token with warnafter: an extended default-audience token, never a broker token",
            ));
        }
        let Some(iat) = int_claim(m, "iat")? else {
            return Err(denied("token without iat"));
        };
        let aud = match m.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| denied("claim aud holds a non-string"))?,
            None => Vec::new(),
            Some(_) => return Err(denied("claim aud is neither a string nor an array")),
        };
        let namespace = str_claim(k8s, "namespace")?.unwrap_or_default();
        let sa = match k8s.get("serviceaccount") {
            Some(Value::Object(o)) => str_claim(o, "name")?.unwrap_or_default(),
            _ => "",
        };
        if !valid_namespace(namespace) || !valid_service_account(sa) {
            return Err(denied(
                "claims kubernetes.io.namespace / serviceaccount.name missing or invalid",
            ));
        }
        Ok(Claims {
            iss: iss.to_owned(),
            sub: str_claim(m, "sub")?.unwrap_or_default().to_owned(),
            aud,
            exp,
            iat,
            nbf: int_claim(m, "nbf")?,
            jti: str_claim(m, "jti")?.map(str::to_owned),
            namespace: namespace.to_owned(),
            service_account: sa.to_owned(),
            pod: bound(k8s, "pod")?,
            node: bound(k8s, "node")?,
        })
    }

    /// The checks every mode makes on the claims, given the cluster's
    /// issuer and audience, the largest `exp - iat`, the clock skew allowed
    /// and the time.
    pub fn check(
        &self,
        issuer: &str,
        audience: &str,
        max_lifetime: Duration,
        leeway: Duration,
        now: SystemTime,
    ) -> Result<(), K8sError> {
        let lifetime = self.exp.saturating_sub(self.iat);
        if lifetime <= 0 {
            return Err(denied("exp is not after iat"));
        }
        if lifetime as u64 > max_lifetime.as_secs() {
            return Err(denied(format!(
                "token lifetime {lifetime} s above the maximum {} s",
                max_lifetime.as_secs()
            )));
        }
        if self.iss != issuer {
            return Err(denied(format!(
                "issuer {} is not the cluster's",
                shown(&self.iss)
            )));
        }
        if !self.aud.iter().any(|a| a == audience) {
            return Err(denied(format!(
                "audience {} does not contain the broker's",
                shown(&self.aud.join(","))
            )));
        }
        let now = unix_seconds(now);
        let leeway = i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX);
        if now > self.exp.saturating_add(leeway) {
            return Err(denied(format!("token expired {} s ago", now - self.exp)));
        }
        if let Some(nbf) = self.nbf
            && nbf > now.saturating_add(leeway)
        {
            return Err(denied(format!(
                "token not valid for another {} s (nbf)",
                nbf - now
            )));
        }
        if self.iat > now.saturating_add(leeway) {
            return Err(denied(format!(
                "token issued {} s in the future",
                self.iat - now
            )));
        }
        let want = format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        );
        if self.sub != want {
            return Err(denied(
                "sub does not name the kubernetes.io service account",
            ));
        }
        Ok(())
    }
}

/// Seconds since the epoch; times before it count as negative.
pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enc(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    fn token(h: Value, p: Value) -> String {
        format!("{}.{}.c2ln", enc(&h), enc(&p))
    }

    fn good_claims(iat: i64) -> Value {
        json!({
            "iss": "https://issuer.example", "sub": "system:serviceaccount:ns1:sa1",
            "aud": ["hsm-broker"], "iat": iat, "nbf": iat, "exp": iat + 600, "jti": "j1",
            "kubernetes.io": {"namespace": "ns1", "serviceaccount": {"name": "sa1", "uid": "u"},
                              "pod": {"name": "p", "uid": "pu"}}
        })
    }

    fn reason(r: Result<impl std::fmt::Debug, K8sError>) -> String {
        match r {
            Err(K8sError::Denied(r)) => r,
            other => panic!("expected Denied, got {other:?}"),
        }
    }

    const T0: i64 = 1_700_000_000;

    fn at(s: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s as u64)
    }

    fn check(c: &Claims, now: i64) -> Result<(), K8sError> {
        c.check(
            "https://issuer.example",
            "hsm-broker",
            Duration::from_secs(3600),
            Duration::from_secs(60),
            at(now),
        )
    }

    #[test]
    fn good_token_passes() {
        let t = token(json!({"alg": "RS256", "kid": "k"}), good_claims(T0));
        let c = Compact::parse(&t).unwrap();
        assert_eq!(c.alg, Alg::Rs256);
        assert_eq!(c.kid.as_deref(), Some("k"));
        assert_eq!(c.signature, "c2ln");
        assert!(t.starts_with(c.signing_input) && t[c.signing_input.len()..] == *".c2ln");
        let claims = c.claims().unwrap();
        assert_eq!(claims.pod.as_ref().unwrap().uid, "pu");
        check(&claims, T0 + 10).unwrap();
    }

    #[test]
    fn algorithms_other_than_rs256_es256_are_refused() {
        for alg in ["none", "HS256", "HS512", "RS384", "PS256", "EdDSA", "rs256"] {
            let t = token(json!({"alg": alg}), good_claims(T0));
            assert!(reason(Compact::parse(&t)).contains("refused"), "{alg}");
        }
        let t = token(json!({"alg": "ES256", "typ": "jwt"}), good_claims(T0));
        assert_eq!(Compact::parse(&t).unwrap().alg, Alg::Es256);
        let t = token(json!({"alg": "ES256", "typ": "JOSE"}), good_claims(T0));
        assert!(reason(Compact::parse(&t)).contains("typ"));
        let t = token(json!({"alg": "ES256", "crit": ["b64"]}), good_claims(T0));
        assert!(reason(Compact::parse(&t)).contains("crit"));
    }

    #[test]
    fn shapes() {
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            ".e30.c2ln",
            "e30..c2ln",
            "e30.e30.",
            "e+0.e30.c2ln",
            "e30=.e30.c2ln",
        ] {
            reason(Compact::parse(bad));
        }
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(reason(Compact::parse(&huge)).contains("bytes"));
        // A header that is base64 but not JSON.
        let t = format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode(b"not json"));
        assert!(reason(Compact::parse(&t)).contains("JSON"));
    }

    #[test]
    fn claim_refusals() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|c| c["iss"] = json!("kubernetes/serviceaccount")),
                "legacy",
            ),
            (
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                "without exp",
            ),
            (
                Box::new(|c| c["kubernetes.io"]["warnafter"] = json!(T0 + 3607)),
                "warnafter",
            ),
            (Box::new(|c| c["exp"] = json!(T0 + 3601)), "lifetime"),
            (Box::new(|c| c["iss"] = json!("https://other")), "issuer"),
            (
                Box::new(|c| c["aud"] = json!("https://kubernetes.default.svc")),
                "audience",
            ),
            (
                Box::new(|c| c["exp"] = json!(T0 - 100)),
                "exp is not after iat",
            ),
            (Box::new(|c| c["nbf"] = json!(T0 + 500)), "nbf"),
            (
                Box::new(|c| c["sub"] = json!("system:serviceaccount:ns1:other")),
                "sub",
            ),
            (
                Box::new(|c| c["kubernetes.io"]["namespace"] = json!("NS:x")),
                "namespace",
            ),
            (Box::new(|c| c["exp"] = json!(1.5e9)), "integer"),
            (
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("kubernetes.io");
                }),
                "kubernetes.io",
            ),
        ];
        for (edit, want) in cases {
            let mut c = good_claims(T0);
            edit(&mut c);
            let t = token(json!({"alg": "RS256"}), c);
            let r = reason(
                Compact::parse(&t)
                    .unwrap()
                    .claims()
                    .and_then(|c| check(&c, T0 + 10)),
            );
            assert!(r.contains(want), "{r} lacks {want}");
        }
    }

    #[test]
    fn time_window_with_leeway() {
        let c = Compact::parse(&token(json!({"alg": "RS256"}), good_claims(T0)))
            .unwrap()
            .claims()
            .unwrap();
        check(&c, T0 + 600 + 60).unwrap();
        assert!(reason(check(&c, T0 + 600 + 61)).contains("expired"));
        check(&c, T0 - 60).unwrap();
        assert!(reason(check(&c, T0 - 61)).contains("nbf"));
    }

    #[test]
    fn shown_is_bounded_and_escaped() {
        assert_eq!(shown("a\nb"), "\"a\\nb\"");
        assert!(shown(&"x".repeat(500)).len() < 80);
    }
}
