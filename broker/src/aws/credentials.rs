//! The broker's own AWS credentials, chosen once at start in this order:
//!
//! 1. `aws.access_key_id` + `aws.secret_access_key` (+ `aws.session_token`)
//!    from the configuration, as secret sources (`env:`, `file:`, `cmd:`);
//! 2. the environment: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY`
//!    (+ `AWS_SESSION_TOKEN`);
//! 3. the instance role of the machine the broker runs on, through IMDSv2:
//!    `PUT /latest/api/token`, then `GET
//!    /latest/meta-data/iam/security-credentials/` for the role name and
//!    `…/<role>` for the keys. They are fetched again 5 minutes before
//!    their `Expiration`; if that fails while the old keys are still
//!    valid, the old keys are used and a warning logged.
//!
//! Keys live in `aws_credential_types::Credentials` (zeroized on drop,
//! redacted in `Debug`); IMDS answers are read into zeroizing buffers. No
//! key, secret or token reaches a log line or an error.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use serde::Deserialize;
use tokio::sync::Mutex;
use tracing::{info, warn};
use zeroize::Zeroizing;

use super::{AwsConfig, AwsError};

/// Default IMDS base URL.
pub const IMDS_DEFAULT: &str = "http://169.254.169.254";
/// Environment override of the IMDS base URL, as the AWS SDKs read it.
pub const IMDS_ENDPOINT_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT";
/// Instance-role keys are fetched again this long before they expire.
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// Lifetime asked for IMDSv2 session tokens (the maximum, six hours).
const IMDS_TOKEN_TTL: Duration = Duration::from_secs(21_600);
/// Largest IMDS answer read.
const IMDS_MAX_ANSWER: usize = 64 << 10;

/// Where the broker's keys come from; see the module header.
pub struct CredentialsProvider {
    source: Source,
}

enum Source {
    Fixed {
        credentials: Credentials,
        origin: &'static str,
    },
    Imds(Imds),
}

impl fmt::Debug for CredentialsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Fixed { origin, .. } => write!(f, "CredentialsProvider({origin})"),
            Source::Imds(i) => write!(
                f,
                "CredentialsProvider(instance role via IMDS at {})",
                i.base
            ),
        }
    }
}

impl CredentialsProvider {
    /// Settles the source. Static sources are read now; a key without its
    /// secret (in the configuration or the environment) is an error, not
    /// a reason to try the next source.
    pub fn from_config(config: &AwsConfig) -> Result<CredentialsProvider, AwsError> {
        let read = |s: &crate::secrets::SecretSource| {
            s.read().map_err(|e| AwsError::Config(e.to_string()))
        };
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(ak), Some(sk)) => {
                let token = config.session_token.as_ref().map(read).transpose()?;
                return Ok(CredentialsProvider {
                    source: Source::Fixed {
                        credentials: credentials(
                            read(ak)?,
                            read(sk)?,
                            token,
                            None,
                            "configuration",
                        ),
                        origin: "configuration",
                    },
                });
            }
            (None, None) if config.session_token.is_none() => {}
            _ => {
                return Err(AwsError::Config(
                    "aws.access_key_id and aws.secret_access_key are given together (session_token only with them)"
                        .into(),
                ));
            }
        }
        let env = |n: &str| {
            std::env::var(n)
                .ok()
                .filter(|v| !v.is_empty())
                .map(Zeroizing::new)
        };
        match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(ak), Some(sk)) => {
                return Ok(CredentialsProvider {
                    source: Source::Fixed {
                        credentials: credentials(
                            ak,
                            sk,
                            env("AWS_SESSION_TOKEN"),
                            None,
                            "environment",
                        ),
                        origin: "environment",
                    },
                });
            }
            (None, None) => {}
            _ => {
                return Err(AwsError::Config(
                    "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set".into(),
                ));
            }
        }
        let base = config
            .imds_endpoint
            .clone()
            .or_else(|| {
                std::env::var(IMDS_ENDPOINT_ENV)
                    .ok()
                    .filter(|v| !v.is_empty())
            })
            .unwrap_or_else(|| IMDS_DEFAULT.to_owned());
        Ok(CredentialsProvider {
            source: Source::Imds(Imds::new(
                &base,
                config.connect_timeout,
                config.request_timeout,
            )?),
        })
    }

    /// Where the keys come from: `configuration`, `environment` or
    /// `instance role`.
    pub fn origin(&self) -> &'static str {
        match &self.source {
            Source::Fixed { origin, .. } => origin,
            Source::Imds(_) => "instance role",
        }
    }

    /// Fetches the keys if they must be (instance role), so that a broker
    /// can fail at start rather than at its first request.
    pub async fn check(&self) -> Result<(), AwsError> {
        self.credentials().await.map(drop)
    }

    /// How many times instance-role keys were fetched from IMDS.
    pub async fn imds_fetches(&self) -> u64 {
        match &self.source {
            Source::Fixed { .. } => 0,
            Source::Imds(i) => i.state.lock().await.fetches,
        }
    }

    /// The keys to sign with now.
    pub(super) async fn credentials(&self) -> Result<Credentials, AwsError> {
        match &self.source {
            Source::Fixed { credentials, .. } => Ok(credentials.clone()),
            Source::Imds(i) => i.credentials().await,
        }
    }

    /// Forgets instance-role keys AWS called expired.
    pub(super) async fn invalidate(&self) {
        if let Source::Imds(i) = &self.source {
            let mut state = i.state.lock().await;
            state.cached = None;
        }
    }
}

fn credentials(
    ak: Zeroizing<String>,
    sk: Zeroizing<String>,
    token: Option<Zeroizing<String>>,
    expiry: Option<SystemTime>,
    origin: &'static str,
) -> Credentials {
    // `Credentials` keeps its own zeroizing copies; the wrappers passed in
    // wipe theirs when they drop at the end of this call.
    Credentials::new(
        ak.as_str(),
        sk.as_str(),
        token.as_ref().map(|t| t.as_str().to_owned()),
        expiry,
        origin,
    )
}

struct Imds {
    base: String,
    http: reqwest::Client,
    state: Mutex<ImdsState>,
}

#[derive(Default)]
struct ImdsState {
    token: Option<(Zeroizing<String>, Instant)>,
    cached: Option<(Credentials, SystemTime)>,
    fetches: u64,
}

/// The JSON at `iam/security-credentials/<role>`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RoleCredentials {
    code: String,
    access_key_id: String,
    secret_access_key: String,
    #[serde(default)]
    token: Option<String>,
    expiration: String,
}

/// Reads the role credentials JSON. A parse error names only its line and
/// column: serde's own message can quote a value.
fn parse_role_credentials(body: &str) -> Result<(Credentials, SystemTime), AwsError> {
    let rc: RoleCredentials = serde_json::from_str(body).map_err(|e| {
        unavailable(&format!(
            "role credentials JSON does not parse (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let RoleCredentials {
        code,
        access_key_id,
        secret_access_key,
        token,
        expiration,
    } = rc;
    let (ak, sk, token) = (
        Zeroizing::new(access_key_id),
        Zeroizing::new(secret_access_key),
        token.map(Zeroizing::new).filter(|t| !t.is_empty()),
    );
    if code != "Success" {
        return Err(unavailable(&format!(
            "role credentials answer Code '{}'",
            code.chars().take(40).collect::<String>()
        )));
    }
    let expires = humantime::parse_rfc3339(expiration.trim())
        .map_err(|_| unavailable("role credentials Expiration is not an RFC 3339 time"))?;
    Ok((
        credentials(ak, sk, token, Some(expires), "instance role"),
        expires,
    ))
}

impl Imds {
    fn new(
        base: &str,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Imds, AwsError> {
        let u = url::Url::parse(base)
            .map_err(|e| AwsError::Config(format!("IMDS endpoint '{base}': {e}")))?;
        if u.scheme() != "http" && u.scheme() != "https" {
            return Err(AwsError::Config(format!(
                "IMDS endpoint '{base}' is not an http URL"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| AwsError::Config(format!("HTTP client: {e}")))?;
        Ok(Imds {
            base: base.trim_end_matches('/').to_owned(),
            http,
            state: Mutex::new(ImdsState::default()),
        })
    }

    async fn credentials(&self) -> Result<Credentials, AwsError> {
        // One caller refreshes at a time; the others wait and reuse.
        let mut state = self.state.lock().await;
        let now = SystemTime::now();
        let fresh = state
            .cached
            .as_ref()
            .filter(|(_, expires)| now + REFRESH_BEFORE_EXPIRY < *expires)
            .map(|(c, _)| c.clone());
        if let Some(c) = fresh {
            return Ok(c);
        }
        match self.fetch(&mut state).await {
            Ok((c, expires)) => {
                state.fetches += 1;
                info!(expires = %humantime::format_rfc3339_seconds(expires), "instance-role credentials fetched from IMDS");
                state.cached = Some((c.clone(), expires));
                Ok(c)
            }
            Err(e) => match &state.cached {
                Some((c, expires)) if now < *expires => {
                    warn!(error = %e, "IMDS credential refresh failed; the current keys stay in use until they expire");
                    Ok(c.clone())
                }
                _ => Err(e),
            },
        }
    }

    async fn fetch(&self, state: &mut ImdsState) -> Result<(Credentials, SystemTime), AwsError> {
        let listing = self
            .get(state, "/latest/meta-data/iam/security-credentials/")
            .await?;
        let role = listing
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or_else(|| unavailable("the instance has no IAM role"))?
            .to_owned();
        if !super::iam::is_role_name(&role) {
            return Err(unavailable("IMDS named a role that is not a role name"));
        }
        let body = self
            .get(
                state,
                &format!("/latest/meta-data/iam/security-credentials/{role}"),
            )
            .await?;
        parse_role_credentials(&body)
    }

    /// A GET with the session token; a 401 (token expired or revoked)
    /// gets one new token and one more try.
    async fn get(&self, state: &mut ImdsState, path: &str) -> Result<Zeroizing<String>, AwsError> {
        for fresh in [false, true] {
            if fresh {
                state.token = None;
            }
            let token = self.token(state).await?;
            let response = self
                .http
                .get(format!("{}{path}", self.base))
                .header("x-aws-ec2-metadata-token", sensitive(&token)?)
                .send()
                .await
                .map_err(|e| unavailable(&format!("GET {path}: {}", error_chain(&e))))?;
            match response.status().as_u16() {
                200 => return read_body(response, path).await,
                401 if !fresh => continue,
                404 if path.ends_with('/') => {
                    return Err(unavailable("the instance has no IAM role"));
                }
                s => return Err(unavailable(&format!("GET {path}: HTTP {s}"))),
            }
        }
        Err(unavailable(&format!(
            "GET {path}: IMDS refused two fresh session tokens"
        )))
    }

    async fn token(&self, state: &mut ImdsState) -> Result<Zeroizing<String>, AwsError> {
        let now = Instant::now();
        if let Some((t, _)) = state.token.as_ref().filter(|(_, until)| now < *until) {
            return Ok(t.clone());
        }
        let response = self
            .http
            .put(format!("{}/latest/api/token", self.base))
            .header(
                "x-aws-ec2-metadata-token-ttl-seconds",
                IMDS_TOKEN_TTL.as_secs().to_string(),
            )
            .send()
            .await
            .map_err(|e| unavailable(&format!("PUT /latest/api/token: {}", error_chain(&e))))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(unavailable(&format!(
                "PUT /latest/api/token: HTTP {status}"
            )));
        }
        let token = read_body(response, "/latest/api/token").await?;
        let token = Zeroizing::new(token.trim().to_owned());
        if token.is_empty() {
            return Err(unavailable("IMDS gave an empty session token"));
        }
        // Renewed a minute early so that a token never expires in flight.
        let valid_until = Instant::now() + IMDS_TOKEN_TTL - Duration::from_secs(60);
        state.token = Some((token.clone(), valid_until));
        Ok(token)
    }
}

fn sensitive(v: &str) -> Result<reqwest::header::HeaderValue, AwsError> {
    let mut h = reqwest::header::HeaderValue::from_str(v)
        .map_err(|_| unavailable("IMDS gave a token that is not a header value"))?;
    h.set_sensitive(true);
    Ok(h)
}

async fn read_body(
    mut response: reqwest::Response,
    path: &str,
) -> Result<Zeroizing<String>, AwsError> {
    let mut body = Zeroizing::new(Vec::new());
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| unavailable(&format!("GET {path}: {}", error_chain(&e))))?
    {
        if body.len() + chunk.len() > IMDS_MAX_ANSWER {
            return Err(unavailable(&format!("GET {path}: answer too large")));
        }
        body.extend_from_slice(&chunk);
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| unavailable(&format!("{path}: answer is not UTF-8")))?;
    Ok(Zeroizing::new(text.to_owned()))
}

fn error_chain(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(l) = last {
        msg.push_str(&format!(" ({l})"));
    }
    msg
}

fn unavailable(what: &str) -> AwsError {
    AwsError::Unavailable(format!("instance-role credentials from IMDS: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::SecretSource;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn static_sources_are_read_and_never_shown() {
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, v: &str| {
            let p = d.path().join(name);
            std::fs::write(&p, v).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            SecretSource::File(p)
        };
        let config = AwsConfig {
            access_key_id: Some(write("ak", "AKIAEXAMPLEKEYID0001\n")),
            secret_access_key: Some(write("sk", "very-secret-access-key-value\n")),
            ..Default::default()
        };
        let p = CredentialsProvider::from_config(&config).unwrap();
        assert_eq!(p.origin(), "configuration");
        let shown = format!("{p:?}");
        assert!(
            !shown.contains("very-secret") && !shown.contains("AKIAEXAMPLE"),
            "{shown}"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let c = rt.block_on(p.credentials()).unwrap();
        assert_eq!(c.access_key_id(), "AKIAEXAMPLEKEYID0001");
        assert_eq!(c.secret_access_key(), "very-secret-access-key-value");
        assert!(!format!("{c:?}").contains("very-secret"));
    }

    #[test]
    fn a_key_without_its_secret_is_refused() {
        let config = AwsConfig {
            secret_access_key: Some(SecretSource::Env("P11SHIM_TEST_UNSET_SK".into())),
            ..Default::default()
        };
        assert!(matches!(
            CredentialsProvider::from_config(&config),
            Err(AwsError::Config(_))
        ));
    }

    #[test]
    fn role_credentials_json() {
        let good = r#"{"Code":"Success","LastUpdated":"2026-01-01T00:00:00Z","Type":"AWS-HMAC","AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"hidden-secret","Token":"tok","Expiration":"2026-01-01T06:00:00Z"}"#;
        let (c, expires) = parse_role_credentials(good).unwrap();
        assert_eq!(c.access_key_id(), "ASIAEXAMPLE");
        assert_eq!(c.session_token(), Some("tok"));
        assert_eq!(
            expires,
            humantime::parse_rfc3339("2026-01-01T06:00:00Z").unwrap()
        );
        for bad in [
            good.replace("\"2026-01-01T06:00:00Z\"", "5"),
            good.replace("\"Success\"", "\"Failure\""),
            good.replace("2026-01-01T06:00:00Z", "tomorrow"),
            good.replace("\"AccessKeyId\":\"ASIAEXAMPLE\",", ""),
        ] {
            let e = parse_role_credentials(&bad).err().unwrap().to_string();
            assert!(!e.contains("hidden-secret") && !e.contains("tok\""), "{e}");
        }
    }
}
