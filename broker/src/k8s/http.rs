//! The HTTP client of the Kubernetes verifiers: TLS trust limited to the
//! cluster's CA when one is configured, no redirects (a bearer token must
//! not follow one), bounded timeouts and response sizes, and the broker's
//! own service-account token as bearer where one is configured.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderValue};
use zeroize::Zeroizing;

use super::K8sError;
use crate::secrets::SecretSource;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a bearer token read from its source is reused. The kubelet
/// rewrites a projected token file long before it expires, so a minute is
/// safe; a 401 drops it at once.
const BEARER_TTL: Duration = Duration::from_secs(60);

/// An `https` URL, or an `http` one on a loopback address (tests, or a
/// `kubectl proxy` on the same host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url(url::Url);

fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

impl Url {
    pub fn parse_checked(s: &str) -> Result<Url, K8sError> {
        let u = url::Url::parse(s).map_err(|_| K8sError::Config(format!("{s:?} is not a URL")))?;
        let ok = match u.scheme() {
            "https" => u.host().is_some(),
            "http" => is_loopback(&u),
            _ => false,
        };
        if !ok || !u.username().is_empty() || u.password().is_some() {
            return Err(K8sError::Config(format!(
                "{s:?}: an https URL (http only on loopback), without credentials"
            )));
        }
        Ok(Url(u))
    }

    pub fn is_https(&self) -> bool {
        self.0.scheme() == "https"
    }

    pub fn join(&self, path: &str) -> Url {
        let mut u = self.0.clone();
        let base = u.path().trim_end_matches('/').to_owned();
        u.set_path(&format!("{base}{path}"));
        Url(u)
    }

    fn same_origin(&self, other: &Url) -> bool {
        self.0.origin() == other.0.origin()
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The broker's own token, read from its source and kept a short while.
struct Bearer {
    source: SecretSource,
    /// Only requests to this origin carry the token.
    origin: Url,
    cached: tokio::sync::Mutex<Option<(Instant, Zeroizing<String>)>>,
}

pub struct HttpClient {
    client: reqwest::Client,
    bearer: Option<Bearer>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field(
                "bearer",
                &self
                    .bearer
                    .as_ref()
                    .map(|b| (&b.source, b.origin.0.as_str())),
            )
            .finish()
    }
}

fn unavailable(e: &reqwest::Error) -> K8sError {
    // reqwest's Display names the URL, never headers or bodies.
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let url = e.url().map(|u| u.as_str()).unwrap_or("");
    K8sError::Unavailable(format!("{what}: {url}"))
}

impl HttpClient {
    /// `ca_file`: when set, the only trust anchors (PEM bundle); else the
    /// web PKI roots. `bearer`: the token sent to `origin` only.
    pub fn new(
        ca_file: Option<&Path>,
        bearer: Option<(SecretSource, Url)>,
    ) -> Result<HttpClient, K8sError> {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .https_only(false)
            .user_agent(concat!("p11shim-broker/", env!("CARGO_PKG_VERSION")));
        if let Some(p) = ca_file {
            let pem = std::fs::read(p)
                .map_err(|e| K8sError::Config(format!("ca_file {}: {}", p.display(), e.kind())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
                K8sError::Config(format!("ca_file {}: not PEM certificates", p.display()))
            })?;
            if certs.is_empty() {
                return Err(K8sError::Config(format!(
                    "ca_file {}: no certificate",
                    p.display()
                )));
            }
            b = b.tls_built_in_root_certs(false);
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let client = b
            .build()
            .map_err(|e| K8sError::Config(format!("HTTP client: {e}")))?;
        Ok(HttpClient {
            client,
            bearer: bearer.map(|(source, origin)| Bearer {
                source,
                origin,
                cached: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// Reads the bearer token now, so a broken source shows at start.
    pub fn check_bearer(&self) -> Result<(), K8sError> {
        if let Some(b) = &self.bearer {
            b.source
                .read()
                .map_err(|e| K8sError::Config(format!("token: {e}")))?;
        }
        Ok(())
    }

    async fn authorization(&self, url: &Url) -> Result<Option<HeaderValue>, K8sError> {
        let Some(b) = &self.bearer else {
            return Ok(None);
        };
        if !b.origin.same_origin(url) {
            return Ok(None);
        }
        let mut cached = b.cached.lock().await;
        let fresh = cached
            .as_ref()
            .is_some_and(|(t, _)| t.elapsed() < BEARER_TTL);
        if !fresh {
            let v = b
                .source
                .read()
                .map_err(|e| K8sError::Unavailable(format!("broker's own token: {e}")))?;
            *cached = Some((Instant::now(), v));
        }
        let token = cached.as_ref().map(|(_, v)| v.as_str()).unwrap_or_default();
        let mut h =
            HeaderValue::from_str(&Zeroizing::new(format!("Bearer {token}"))).map_err(|_| {
                K8sError::Unavailable("broker's own token is not a header value".into())
            })?;
        h.set_sensitive(true);
        Ok(Some(h))
    }

    async fn forget_bearer(&self) {
        if let Some(b) = &self.bearer {
            *b.cached.lock().await = None;
        }
    }

    /// Sends the request; any status but 2xx is `Unavailable`: neither an
    /// apiserver refusing the broker nor one failing says anything about
    /// the token under review.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &Url,
        limit: usize,
    ) -> Result<Vec<u8>, K8sError> {
        let req = match self.authorization(url).await? {
            Some(h) => req.header(AUTHORIZATION, h),
            None => req,
        };
        let mut resp = req.send().await.map_err(|e| unavailable(&e))?;
        let status = resp.status();
        if !status.is_success() {
            if status == reqwest::StatusCode::UNAUTHORIZED {
                self.forget_bearer().await;
            }
            return Err(K8sError::Unavailable(format!("{url} answered {status}")));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| unavailable(&e))? {
            if body.len() + chunk.len() > limit {
                return Err(K8sError::Unavailable(format!(
                    "{url}: answer larger than {limit} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    pub async fn get(&self, url: &Url, limit: usize) -> Result<Vec<u8>, K8sError> {
        let req = self
            .client
            .get(url.0.clone())
            .header("accept", "application/json");
        self.send(req, url, limit).await
    }

    /// POSTs a JSON body; the body may hold a secret and is wiped after.
    pub async fn post_json(
        &self,
        url: &Url,
        body: Zeroizing<Vec<u8>>,
        limit: usize,
    ) -> Result<Zeroizing<Vec<u8>>, K8sError> {
        let req = self
            .client
            .post(url.0.clone())
            .header("content-type", "application/json")
            .header("accept", "application/json")
            // reqwest takes its own copy; ours is wiped when `body` drops.
            .body(body.to_vec());
        self.send(req, url, limit).await.map(Zeroizing::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for ok in [
            "https://kubernetes.default.svc",
            "http://127.0.0.1:8080",
            "http://[::1]:1/x",
            "http://localhost:1",
        ] {
            Url::parse_checked(ok).unwrap();
        }
        for bad in [
            "http://10.0.0.1",
            "ftp://127.0.0.1",
            "https://u:p@h",
            "not a url",
            "file:///etc/x",
        ] {
            assert!(Url::parse_checked(bad).is_err(), "{bad}");
        }
        let u = Url::parse_checked("https://h:6443/").unwrap();
        assert_eq!(u.join("/apis/x").to_string(), "https://h:6443/apis/x");
        let u = Url::parse_checked("https://h/prefix").unwrap();
        assert_eq!(u.join("/apis/x").to_string(), "https://h/prefix/apis/x");
    }
}
