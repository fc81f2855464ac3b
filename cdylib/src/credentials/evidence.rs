//! What the module presents to the broker: read from IMDSv2, from a
//! projected token file, or from this machine's attributes.

use std::time::Duration;

use base64::Engine as _;
use p11shim_proto::{AwsEvidence, FingerprintEvidence, K8sEvidence, Secret, b64_std};
use reqwest::StatusCode;
use reqwest::blocking::Client;
use zeroize::Zeroizing;

use crate::config::{BrokerConfig, BrokerMethod};

/// Evidence for one request.
#[derive(Debug)]
pub enum Evidence {
    Aws(AwsEvidence),
    K8s(K8sEvidence),
    Fingerprint(FingerprintEvidence),
}

/// Why evidence could not be gathered (never holds a secret).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EvidenceError(pub String);

/// IMDSv2 token lifetime asked for: one exchange needs seconds.
const IMDS_TOKEN_TTL: &str = "60";
/// Largest IMDS answer read.
const IMDS_MAX: usize = 64 * 1024;

/// The IMDS base URL: `AWS_EC2_METADATA_SERVICE_ENDPOINT` (as the AWS SDKs
/// read it), else the configured one.
fn imds_base(cfg: &BrokerConfig) -> String {
    std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .ok()
        .filter(|v| v.starts_with("http://"))
        .map(|v| v.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| cfg.imds_endpoint.clone())
}

struct Imds<'a> {
    http: &'a Client,
    base: String,
    token: Zeroizing<String>,
}

impl<'a> Imds<'a> {
    fn open(http: &'a Client, cfg: &BrokerConfig) -> Result<Imds<'a>, EvidenceError> {
        let base = imds_base(cfg);
        let r = http
            .put(format!("{base}/latest/api/token"))
            .header("X-aws-ec2-metadata-token-ttl-seconds", IMDS_TOKEN_TTL)
            .send()
            .map_err(|e| EvidenceError(format!("IMDS token: {}", without_url(&e))))?;
        if !r.status().is_success() {
            return Err(EvidenceError(format!(
                "IMDS token: HTTP {}",
                r.status().as_u16()
            )));
        }
        let token =
            Zeroizing::new(read_text(r).map_err(|e| EvidenceError(format!("IMDS token: {e}")))?);
        Ok(Imds { http, base, token })
    }

    /// `Ok(None)` for 404 (e.g. no public hostname).
    fn get(&self, path: &str) -> Result<Option<String>, EvidenceError> {
        let r = self
            .http
            .get(format!("{}/latest/{path}", self.base))
            .header("X-aws-ec2-metadata-token", self.token.as_str())
            .send()
            .map_err(|e| EvidenceError(format!("IMDS {path}: {}", without_url(&e))))?;
        match r.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => read_text(r)
                .map(Some)
                .map_err(|e| EvidenceError(format!("IMDS {path}: {e}"))),
            s => Err(EvidenceError(format!("IMDS {path}: HTTP {}", s.as_u16()))),
        }
    }

    fn need(&self, path: &str) -> Result<String, EvidenceError> {
        self.get(path)?
            .ok_or_else(|| EvidenceError(format!("IMDS {path}: not found")))
    }

    fn profile_arn(&self) -> Result<Option<String>, EvidenceError> {
        let Some(info) = self.get("meta-data/iam/info")? else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(&info)
            .map_err(|_| EvidenceError("IMDS iam/info: not JSON".into()))?;
        Ok(v.get("InstanceProfileArn")
            .and_then(|a| a.as_str())
            .map(str::to_owned))
    }
}

fn read_text(r: reqwest::blocking::Response) -> Result<String, String> {
    if r.content_length().is_some_and(|n| n as usize > IMDS_MAX) {
        return Err("answer too large".into());
    }
    let b = r.bytes().map_err(|e| without_url(&e))?;
    if b.len() > IMDS_MAX {
        return Err("answer too large".into());
    }
    String::from_utf8(b.to_vec()).map_err(|_| "answer is not UTF-8".into())
}

/// A transport error's kind, without the URL (which may carry a path the
/// operator chose, but never a secret; kept short for the log).
pub fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "broken answer"
    } else {
        "request failed"
    };
    let mut src = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = src {
        detail = s.to_string();
        src = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind} ({detail})")
    }
}

/// A plain-HTTP client for IMDS: never through a proxy, short timeouts.
pub fn imds_client(timeout: Duration) -> Result<Client, EvidenceError> {
    Client::builder()
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(2)))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| EvidenceError(format!("IMDS client: {}", without_url(&e))))
}

/// Gathers the evidence the configured method needs.
pub fn gather(cfg: &BrokerConfig, imds: &Client) -> Result<Evidence, EvidenceError> {
    match cfg.method {
        BrokerMethod::AwsImdsFields => {
            let m = Imds::open(imds, cfg)?;
            Ok(Evidence::Aws(AwsEvidence {
                instance_id: Some(m.need("meta-data/instance-id")?),
                reservation_id: Some(m.need("meta-data/reservation-id")?),
                instance_type: Some(m.need("meta-data/instance-type")?),
                local_hostname: Some(m.need("meta-data/local-hostname")?),
                public_hostname: Some(m.get("meta-data/public-hostname")?.unwrap_or_default()),
                instance_profile_arn: m.profile_arn()?,
                ..Default::default()
            }))
        }
        BrokerMethod::AwsIid => {
            let m = Imds::open(imds, cfg)?;
            let doc = m.need("dynamic/instance-identity/document")?;
            Ok(Evidence::Aws(AwsEvidence {
                iid_rsa2048: Some(m.need("dynamic/instance-identity/rsa2048")?),
                iid_document: Some(b64_std().encode(doc.as_bytes())),
                instance_profile_arn: m.profile_arn()?,
                ..Default::default()
            }))
        }
        BrokerMethod::K8sSaToken => {
            let path = cfg
                .token_file
                .as_ref()
                .ok_or_else(|| EvidenceError("no token_file".into()))?;
            let raw = Zeroizing::new(
                std::fs::read(path)
                    .map_err(|e| EvidenceError(format!("{}: {}", path.display(), e.kind())))?,
            );
            let token = std::str::from_utf8(&raw)
                .map_err(|_| EvidenceError(format!("{}: not text", path.display())))?
                .trim();
            if token.is_empty() {
                return Err(EvidenceError(format!("{}: empty", path.display())));
            }
            Ok(Evidence::K8s(K8sEvidence {
                cluster: cfg.cluster.clone(),
                token: Secret::new(token),
            }))
        }
        BrokerMethod::StaticFingerprint => {
            let attributes = p11shim_proto::fingerprint::collect(&cfg.fingerprint_attributes)
                .map_err(EvidenceError)?;
            Ok(Evidence::Fingerprint(FingerprintEvidence { attributes }))
        }
    }
}
