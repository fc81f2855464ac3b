//! A Kubernetes apiserver as far as the broker sees one, on loopback: OIDC
//! discovery, the JWKS, and the TokenReview API, with service-account
//! tokens shaped like the projected ones a kubelet mounts. No apiserver,
//! kind or k3s can be had from the package registries, so the broker's
//! tests run against this.
//!
//! It signs with an RSA-2048 key (RS256) and a P-256 key (ES256), each with
//! a kid derived like the apiserver's (base64url SHA-256 of the public key
//! DER). TokenReview verifies the token itself, like the apiserver: the
//! signature, issuer, expiry, audiences, and that the bound pod still
//! exists. Legacy tokens (issuer `kubernetes/serviceaccount`, no `exp`) are
//! authenticated for any audience, as the apiserver does, so that a broker
//! relying on TokenReview alone would let them through.
//!
//! Control endpoints for tests: `POST /_mint`, `POST /_pods/{uid}/delete`,
//! `POST /_rotate` (new RSA key and kid, the old one gone from the JWKS),
//! `GET /_stats` (request counts).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Parser;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use openssl::bn::BigNumContext;
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Kubernetes OIDC/JWKS/TokenReview fake for the broker's tests")]
struct Args {
    /// Loopback address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The `iss` of minted tokens; defaults to this server's URL.
    #[arg(long)]
    issuer: Option<String>,
    /// The bearer token TokenReview callers must present.
    #[arg(long)]
    reviewer_token: String,
}

/// A signing key with its kid and public JWK.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Value,
    /// PEM of the public key (for the algorithm-confusion token).
    public_pem: Vec<u8>,
}

fn kid_of(public_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(openssl::sha::sha256(public_der))
}

fn rsa_key() -> Result<SigningKey, openssl::error::ErrorStack> {
    let rsa = Rsa::generate(2048)?;
    let pkey = PKey::from_rsa(rsa.clone())?;
    let kid = kid_of(&pkey.public_key_to_der()?);
    let (n, e) = (
        URL_SAFE_NO_PAD.encode(rsa.n().to_vec()),
        URL_SAFE_NO_PAD.encode(rsa.e().to_vec()),
    );
    let encoding = EncodingKey::from_rsa_pem(&rsa.private_key_to_pem()?).expect("own RSA key");
    let decoding = DecodingKey::from_rsa_components(&n, &e).expect("own RSA key");
    Ok(SigningKey {
        jwk: json!({"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256", "n": n, "e": e}),
        kid,
        alg: Algorithm::RS256,
        encoding,
        decoding,
        public_pem: pkey.public_key_to_pem()?,
    })
}

fn ec_key() -> Result<SigningKey, openssl::error::ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let ec = EcKey::generate(&group)?;
    let pkey = PKey::from_ec_key(ec.clone())?;
    let kid = kid_of(&pkey.public_key_to_der()?);
    let mut ctx = BigNumContext::new()?;
    let (mut x, mut y) = (openssl::bn::BigNum::new()?, openssl::bn::BigNum::new()?);
    ec.public_key()
        .affine_coordinates(&group, &mut x, &mut y, &mut ctx)?;
    let (x, y) = (
        URL_SAFE_NO_PAD.encode(x.to_vec_padded(32)?),
        URL_SAFE_NO_PAD.encode(y.to_vec_padded(32)?),
    );
    let encoding = EncodingKey::from_ec_pem(&pkey.private_key_to_pem_pkcs8()?).expect("own EC key");
    let decoding = DecodingKey::from_ec_components(&x, &y).expect("own EC key");
    Ok(SigningKey {
        jwk: json!({"use": "sig", "kty": "EC", "kid": kid, "alg": "ES256", "crv": "P-256", "x": x, "y": y}),
        kid,
        alg: Algorithm::ES256,
        encoding,
        decoding,
        public_pem: pkey.public_key_to_pem()?,
    })
}

#[derive(Default)]
struct Stats {
    discovery: u64,
    jwks: u64,
    tokenreview: u64,
}

struct Cluster {
    issuer: String,
    reviewer_token: String,
    rsa: SigningKey,
    ec: SigningKey,
    deleted_pods: HashSet<String>,
    /// Stable uids of service accounts and nodes, by name.
    uids: HashMap<String, String>,
    stats: Stats,
}

type Shared = Arc<Mutex<Cluster>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Cluster> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Cluster {
    fn uid_of(&mut self, what: &str) -> String {
        self.uids
            .entry(what.to_owned())
            .or_insert_with(uuid)
            .clone()
    }
}

async fn discovery(State(s): State<Shared>) -> Json<Value> {
    let mut c = lock(&s);
    c.stats.discovery += 1;
    let base = c.issuer.trim_end_matches('/').to_owned();
    Json(json!({
        "issuer": c.issuer,
        "jwks_uri": format!("{base}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256", "RS256"],
    }))
}

async fn jwks(State(s): State<Shared>) -> Response {
    let mut c = lock(&s);
    c.stats.jwks += 1;
    let body = json!({"keys": [c.rsa.jwk, c.ec.jwk]});
    (
        [(header::CONTENT_TYPE, "application/jwk-set+json")],
        body.to_string(),
    )
        .into_response()
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct MintSpec {
    #[serde(default = "default_name")]
    namespace: String,
    #[serde(default = "default_name")]
    service_account: String,
    #[serde(default)]
    pod_name: Option<String>,
    #[serde(default)]
    pod_uid: Option<String>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    audiences: Option<Vec<String>>,
    #[serde(default = "default_lifetime")]
    lifetime_s: i64,
    #[serde(default)]
    iat_offset_s: i64,
    #[serde(default)]
    nbf_offset_s: Option<i64>,
    #[serde(default = "default_alg")]
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    legacy: bool,
    #[serde(default)]
    warnafter: bool,
    #[serde(default)]
    jti: Option<String>,
}

fn default_name() -> String {
    "default".into()
}
fn default_lifetime() -> i64 {
    600
}
fn default_alg() -> String {
    "RS256".into()
}

fn bad_request(msg: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": msg.into()}))).into_response()
}

fn b64json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

async fn mint(State(s): State<Shared>, Json(m): Json<MintSpec>) -> Response {
    let mut c = lock(&s);
    let t = now();
    let iat = t + m.iat_offset_s;
    let jti = m.jti.clone().unwrap_or_else(uuid);
    let sa_uid = c.uid_of(&format!("sa/{}/{}", m.namespace, m.service_account));
    let sub = format!(
        "system:serviceaccount:{}:{}",
        m.namespace, m.service_account
    );
    let pod_uid = m
        .pod_name
        .as_ref()
        .map(|_| m.pod_uid.clone().unwrap_or_else(uuid));
    let claims = if m.legacy {
        json!({
            "iss": "kubernetes/serviceaccount",
            "kubernetes.io/serviceaccount/namespace": m.namespace,
            "kubernetes.io/serviceaccount/secret.name": format!("{}-token-x7k2p", m.service_account),
            "kubernetes.io/serviceaccount/service-account.name": m.service_account,
            "kubernetes.io/serviceaccount/service-account.uid": sa_uid,
            "sub": sub,
        })
    } else {
        let mut k8s = json!({
            "namespace": m.namespace,
            "serviceaccount": {"name": m.service_account, "uid": sa_uid},
        });
        if let (Some(name), Some(uid)) = (&m.pod_name, &pod_uid) {
            k8s["pod"] = json!({"name": name, "uid": uid});
        }
        if let Some(node) = &m.node {
            let uid = c.uid_of(&format!("node/{node}"));
            k8s["node"] = json!({"name": node, "uid": uid});
        }
        if m.warnafter {
            // The apiserver's extended tokens: a year long, warn after the
            // hour the client asked for.
            k8s["warnafter"] = json!(iat + 3607);
        }
        json!({
            "aud": m.audiences.clone().unwrap_or_else(|| vec![c.issuer.clone()]),
            "exp": iat + m.lifetime_s,
            "iat": iat,
            "iss": c.issuer,
            "jti": jti,
            "kubernetes.io": k8s,
            "nbf": t + m.nbf_offset_s.unwrap_or(m.iat_offset_s),
            "sub": sub,
        })
    };
    let (key, alg, header_alg) = match m.alg.as_str() {
        "RS256" => (Some(&c.rsa.encoding), Some(Algorithm::RS256), "RS256"),
        "ES256" => (Some(&c.ec.encoding), Some(Algorithm::ES256), "ES256"),
        "none" => (None, None, "none"),
        "HS256-pubkey" => (None, Some(Algorithm::HS256), "HS256"),
        other => return bad_request(format!("unknown alg {other}")),
    };
    let default_kid = if header_alg == "ES256" {
        &c.ec.kid
    } else {
        &c.rsa.kid
    };
    let mut hdr =
        json!({"alg": header_alg, "kid": m.kid.clone().unwrap_or_else(|| default_kid.clone())});
    if header_alg == "none" {
        hdr = json!({"alg": "none", "typ": "JWT"});
    }
    let input = format!("{}.{}", b64json(&hdr), b64json(&claims));
    let signature = match (key, alg) {
        (Some(k), Some(a)) => jsonwebtoken::crypto::sign(input.as_bytes(), k, a),
        // Algorithm confusion: HMAC keyed with the public key's PEM, the
        // bytes a naive verifier would take as the "key".
        (None, Some(a)) => jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &EncodingKey::from_secret(&c.rsa.public_pem),
            a,
        ),
        _ => Ok(String::new()),
    };
    match signature {
        Ok(sig) => Json(json!({"token": format!("{input}.{sig}"), "jti": jti, "pod_uid": pod_uid}))
            .into_response(),
        Err(e) => bad_request(format!("signing: {e}")),
    }
}

async fn delete_pod(State(s): State<Shared>, Path(uid): Path<String>) -> StatusCode {
    lock(&s).deleted_pods.insert(uid);
    StatusCode::NO_CONTENT
}

async fn rotate(State(s): State<Shared>) -> Response {
    match rsa_key() {
        Ok(k) => {
            let mut c = lock(&s);
            c.rsa = k;
            Json(json!({"kid": c.rsa.kid})).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn stats(State(s): State<Shared>) -> Json<Value> {
    let c = lock(&s);
    Json(json!({
        "discovery": c.stats.discovery,
        "jwks": c.stats.jwks,
        "tokenreview": c.stats.tokenreview,
    }))
}

/// The apiserver's `Status` for a refused caller.
fn status_failure(code: StatusCode, reason: &str) -> Response {
    (
        code,
        Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": reason, "reason": reason, "code": code.as_u16(),
        })),
    )
        .into_response()
}

/// A verified token's user, or why the token is invalid.
struct Authenticated {
    user: Value,
    audiences: Vec<String>,
}

fn part(p: &str) -> Result<Value, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|_| "invalid bearer token".to_string())?;
    serde_json::from_slice(&bytes).map_err(|_| "invalid bearer token".to_string())
}

fn authenticate(c: &Cluster, token: &str, wanted: &[String]) -> Result<Authenticated, String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, sig] = parts.as_slice() else {
        return Err("invalid bearer token".into());
    };
    let header = part(h)?;
    let claims = part(p)?;
    let kid = header["kid"].as_str().unwrap_or_default();
    let key = [&c.rsa, &c.ec]
        .into_iter()
        .find(|k| k.kid == kid)
        .ok_or("invalid bearer token, square/go-jose: error in cryptographic primitive")?;
    let alg_ok = header["alg"].as_str()
        == Some(if key.alg == Algorithm::RS256 {
            "RS256"
        } else {
            "ES256"
        });
    let input = &token[..h.len() + 1 + p.len()];
    if !alg_ok
        || !jsonwebtoken::crypto::verify(sig, input.as_bytes(), &key.decoding, key.alg)
            .unwrap_or(false)
    {
        return Err(
            "invalid bearer token, square/go-jose: error in cryptographic primitive".into(),
        );
    }
    let t = now();
    if claims["iss"] == "kubernetes/serviceaccount" {
        let ns = claims["kubernetes.io/serviceaccount/namespace"]
            .as_str()
            .unwrap_or_default();
        let sa = claims["kubernetes.io/serviceaccount/service-account.name"]
            .as_str()
            .unwrap_or_default();
        return Ok(Authenticated {
            user: json!({
                "username": format!("system:serviceaccount:{ns}:{sa}"),
                "uid": claims["kubernetes.io/serviceaccount/service-account.uid"],
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                "extra": {"authentication.kubernetes.io/credential-id":
                    [format!("Secret={}", claims["kubernetes.io/serviceaccount/secret.name"].as_str().unwrap_or_default())]},
            }),
            audiences: wanted.to_vec(),
        });
    }
    if claims["iss"].as_str() != Some(c.issuer.as_str()) {
        return Err("invalid bearer token, token issuer is not recognized".into());
    }
    match claims["exp"].as_i64() {
        Some(exp) if exp > t => {}
        _ => return Err("invalid bearer token, service account token has expired".into()),
    }
    if claims["nbf"].as_i64().is_some_and(|nbf| nbf > t) {
        return Err("invalid bearer token, service account token is not valid yet".into());
    }
    let aud: Vec<String> = match &claims["aud"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let both: Vec<String> = wanted.iter().filter(|w| aud.contains(w)).cloned().collect();
    if both.is_empty() {
        return Err(format!(
            "invalid bearer token, token audiences {aud:?} is invalid for the target audiences {wanted:?}"
        ));
    }
    let k8s = &claims["kubernetes.io"];
    let ns = k8s["namespace"].as_str().unwrap_or_default();
    let sa = k8s["serviceaccount"]["name"].as_str().unwrap_or_default();
    let mut extra = serde_json::Map::new();
    if let Some(jti) = claims["jti"].as_str() {
        extra.insert(
            "authentication.kubernetes.io/credential-id".into(),
            json!([format!("JTI={jti}")]),
        );
    }
    if let Some(uid) = k8s["pod"]["uid"].as_str() {
        let name = k8s["pod"]["name"].as_str().unwrap_or_default();
        if c.deleted_pods.contains(uid) {
            return Err(format!(
                "invalid bearer token, pod \"{name}\" (UID {uid}) is not found or has been deleted"
            ));
        }
        extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            json!([name]),
        );
        extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
    }
    if let Some(uid) = k8s["node"]["uid"].as_str() {
        extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            json!([k8s["node"]["name"]]),
        );
        extra.insert("authentication.kubernetes.io/node-uid".into(), json!([uid]));
    }
    Ok(Authenticated {
        user: json!({
            "username": format!("system:serviceaccount:{ns}:{sa}"),
            "uid": k8s["serviceaccount"]["uid"],
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "extra": extra,
        }),
        audiences: both,
    })
}

async fn tokenreview(State(s): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let mut c = lock(&s);
    c.stats.tokenreview += 1;
    let want = format!("Bearer {}", c.reviewer_token);
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(want.as_str())
    {
        return status_failure(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return status_failure(StatusCode::BAD_REQUEST, "BadRequest");
    };
    if req["kind"] != "TokenReview" || req["apiVersion"] != "authentication.k8s.io/v1" {
        return status_failure(StatusCode::BAD_REQUEST, "BadRequest");
    }
    let token = req["spec"]["token"].as_str().unwrap_or_default();
    let mut wanted: Vec<String> = req["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if wanted.is_empty() {
        // The apiserver's default audiences (--api-audiences) default to the issuer.
        wanted = vec![c.issuer.clone()];
    }
    let status = match authenticate(&c, token, &wanted) {
        Ok(a) => json!({"authenticated": true, "user": a.user, "audiences": a.audiences}),
        Err(e) => json!({"user": {}, "error": format!("[{e}]")}),
    };
    (
        StatusCode::CREATED,
        Json(json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": req["spec"],
            "status": status,
        })),
    )
        .into_response()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        eprintln!("k8s-fake: listens on loopback only, not {}", args.listen);
        std::process::exit(2);
    }
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("k8s-fake: bind {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().expect("bound address");
    let (rsa, ec) = match (rsa_key(), ec_key()) {
        (Ok(r), Ok(e)) => (r, e),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("k8s-fake: key generation: {e}");
            std::process::exit(1);
        }
    };
    let cluster = Cluster {
        issuer: args.issuer.unwrap_or_else(|| format!("http://{addr}")),
        reviewer_token: args.reviewer_token,
        rsa,
        ec,
        deleted_pods: HashSet::new(),
        uids: HashMap::new(),
        stats: Stats::default(),
    };
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/openid/v1/jwks", get(jwks))
        .route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(tokenreview),
        )
        .route("/_mint", post(mint))
        .route("/_pods/{uid}/delete", post(delete_pod))
        .route("/_rotate", post(rotate))
        .route("/_stats", get(stats))
        .with_state(Arc::new(Mutex::new(cluster)));
    println!("listening {addr}");
    let _ = std::io::stdout().flush();
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("k8s-fake: {e}");
        std::process::exit(1);
    }
}
