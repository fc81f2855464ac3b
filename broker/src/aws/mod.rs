//! The broker's AWS calls: EC2 `DescribeInstances` and IAM
//! `ListInstanceProfilesForRole`, SigV4-signed by hand.
//!
//! Layout: [`credentials`] finds the broker's own keys (static secret
//! sources, the environment, or the instance role through IMDSv2);
//! `sigv4` signs one form-encoded POST; `query` sends it with timeouts,
//! bounded retries and the classification of AWS error answers; `xml`
//! reads answers by path; `ec2` and `iam` turn answers into [`Instance`]
//! and profile ARNs. Nothing here decides allow or deny: a failed check
//! surfaces as [`AwsError::Unavailable`] (the broker could not look) or
//! [`AwsError::Api`] (AWS refused the question itself).

pub mod credentials;
mod ec2;
mod iam;
mod query;
mod sigv4;
mod xml;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Deserializer};

use crate::secrets::SecretSource;

pub use credentials::CredentialsProvider;

/// `[aws]` in the broker configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Region of the EC2 calls when the evidence does not name one.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint override for EC2 (and IAM unless `iam_endpoint` is set).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub iam_endpoint: Option<String>,
    /// The broker's own access key, as a secret source (`env:`, `file:`,
    /// `cmd:`). Given together with `secret_access_key`, or not at all.
    #[serde(default, deserialize_with = "secret_source")]
    pub access_key_id: Option<SecretSource>,
    #[serde(default, deserialize_with = "secret_source")]
    pub secret_access_key: Option<SecretSource>,
    /// Session token of temporary static credentials, if any.
    #[serde(default, deserialize_with = "secret_source")]
    pub session_token: Option<SecretSource>,
    /// IMDS base URL for the instance-role credentials; else the
    /// environment's `AWS_EC2_METADATA_SERVICE_ENDPOINT`, else
    /// `http://169.254.169.254`.
    #[serde(default)]
    pub imds_endpoint: Option<String>,
    /// TCP (and TLS) connection set-up limit of one attempt.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Limit of one whole attempt (connect, send, read the answer).
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries after the first attempt, for throttling, 5xx and network
    /// failures only; at most 2.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// How long `ListInstanceProfilesForRole` answers are reused.
    #[serde(default = "default_profile_cache", with = "humantime_serde")]
    pub profile_cache: Duration,
    /// `MaxItems` of each `ListInstanceProfilesForRole` page; AWS's
    /// default (100) when unset.
    #[serde(default)]
    pub iam_page_size: Option<u32>,
    /// A directory of test certificates (`<region>.pem`, `rsa2048.pem`)
    /// that replaces AWS's pinned identity-document certificates. Read
    /// only by builds with the `test-overrides` feature; others refuse it.
    #[serde(default)]
    pub iid_cert_dir: Option<std::path::PathBuf>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_retries() -> u32 {
    MAX_RETRIES
}
fn default_profile_cache() -> Duration {
    Duration::from_secs(60)
}

/// The most retries a call makes after its first attempt.
pub const MAX_RETRIES: u32 = 2;

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            endpoint: None,
            iam_endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            imds_endpoint: None,
            connect_timeout: default_connect_timeout(),
            request_timeout: default_request_timeout(),
            retries: default_retries(),
            profile_cache: default_profile_cache(),
            iam_page_size: None,
            iid_cert_dir: None,
        }
    }
}

fn secret_source<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretSource>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| SecretSource::parse(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// An EC2 instance as `DescribeInstances` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    pub reservation_id: String,
    pub owner_id: String,
    /// `running`, `stopped`, `terminated`, …
    pub state: String,
    pub instance_type: String,
    pub image_id: String,
    pub private_ip: Option<IpAddr>,
    pub public_ip: Option<IpAddr>,
    pub private_dns: String,
    pub public_dns: String,
    pub launch_time: SystemTime,
    pub profile_arn: Option<String>,
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
    /// Every address of every network interface: private, public, IPv6.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    /// The API could not answer (network, 5xx, throttling, our own
    /// credentials refused): the broker answers `unavailable`.
    #[error("AWS unavailable: {0}")]
    Unavailable(String),
    /// The API answered with an error about the request.
    #[error("AWS error {code}: {message}")]
    Api { code: String, message: String },
    /// The `[aws]` configuration cannot work (a key without its secret,
    /// an endpoint that is not a URL, an unreadable secret source).
    #[error("AWS configuration: {0}")]
    Config(String),
}

/// The AWS services the broker speaks the Query protocol with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// EC2, API version 2016-11-15, regional endpoint.
    Ec2,
    /// IAM, API version 2010-05-08, one global endpoint signed for
    /// us-east-1 (the region argument is ignored).
    Iam,
    /// STS, API version 2011-06-15, regional endpoint.
    Sts,
}

impl Service {
    /// The SigV4 signing name.
    pub fn signing_name(self) -> &'static str {
        match self {
            Service::Ec2 => "ec2",
            Service::Iam => "iam",
            Service::Sts => "sts",
        }
    }

    /// The Query API version sent as `Version`.
    pub fn api_version(self) -> &'static str {
        match self {
            Service::Ec2 => "2016-11-15",
            Service::Iam => "2010-05-08",
            Service::Sts => "2011-06-15",
        }
    }
}

/// A client of the EC2 and IAM Query APIs with the broker's credentials.
/// Cheap to share behind an `Arc`; all methods take `&self`.
pub struct AwsClient {
    transport: query::Transport,
    credentials: CredentialsProvider,
    ec2_endpoint: Option<String>,
    iam_endpoint: Option<String>,
    profile_cache_ttl: Duration,
    iam_page_size: Option<u32>,
    profiles: Mutex<HashMap<String, CachedProfiles>>,
}

/// When a role's profile list was read, and the list.
type CachedProfiles = (Instant, Arc<Vec<String>>);

impl fmt::Debug for AwsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsClient")
            .field("ec2_endpoint", &self.ec2_endpoint)
            .field("iam_endpoint", &self.iam_endpoint)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

/// Profile lists cached at most; a role name is configuration, so this is
/// only a guard against a runaway caller.
const PROFILE_CACHE_MAX: usize = 1024;

impl AwsClient {
    /// Builds the client and settles where its credentials come from:
    /// the configured secret sources (read now), else the environment's
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`,
    /// else the instance role through IMDSv2 (fetched at first use).
    pub fn new(config: &AwsConfig) -> Result<AwsClient, AwsError> {
        if config.retries > MAX_RETRIES {
            return Err(AwsError::Config(format!(
                "retries = {} is more than {MAX_RETRIES}",
                config.retries
            )));
        }
        if let Some(n) = config.iam_page_size.filter(|n| !(1..=1000).contains(n)) {
            return Err(AwsError::Config(format!(
                "iam_page_size = {n} is not within 1..=1000"
            )));
        }
        let ec2_endpoint = config
            .endpoint
            .as_deref()
            .map(normalize_endpoint)
            .transpose()?;
        let iam_endpoint = match config
            .iam_endpoint
            .as_deref()
            .or(config.endpoint.as_deref())
        {
            Some(e) => Some(normalize_endpoint(e)?),
            None => None,
        };
        let transport = query::Transport::new(
            config.connect_timeout,
            config.request_timeout,
            config.retries,
        )?;
        let credentials = CredentialsProvider::from_config(config)?;
        Ok(AwsClient {
            transport,
            credentials,
            ec2_endpoint,
            iam_endpoint,
            profile_cache_ttl: config.profile_cache,
            iam_page_size: config.iam_page_size,
            profiles: Mutex::new(HashMap::new()),
        })
    }

    /// The instance `instance_id` in `region`, or `None` when EC2 does not
    /// know it (`InvalidInstanceID.NotFound`, `.Malformed`, or an id that
    /// is not an instance id at all, which is not sent).
    pub async fn describe_instance(
        &self,
        region: &str,
        instance_id: &str,
    ) -> Result<Option<Instance>, AwsError> {
        if !ec2::is_instance_id(instance_id) {
            return Ok(None);
        }
        let mut instances = Vec::new();
        let mut next_token: Option<String> = None;
        for _ in 0..ec2::MAX_PAGES {
            let mut params = vec![
                ("Action", "DescribeInstances"),
                ("InstanceId.1", instance_id),
            ];
            if let Some(t) = next_token.as_deref() {
                params.push(("NextToken", t));
            }
            let xml = match self.call(Service::Ec2, region, &params, true).await {
                Ok(x) => x,
                Err(AwsError::Api { code, .. }) if ec2::is_unknown_instance(&code) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let page = ec2::parse_describe_instances(&xml)?;
            instances.extend(page.instances);
            match page.next_token {
                Some(t) => next_token = Some(t),
                None => return ec2::the_instance(instances, instance_id),
            }
        }
        Err(AwsError::Unavailable(format!(
            "DescribeInstances kept paging after {} pages",
            ec2::MAX_PAGES
        )))
    }

    /// ARNs of the instance profiles holding the IAM role `role_name`,
    /// every page read; reused for `profile_cache`.
    pub async fn instance_profiles_for_role(
        &self,
        role_name: &str,
    ) -> Result<Vec<String>, AwsError> {
        if !iam::is_role_name(role_name) {
            return Err(AwsError::Api {
                code: "ValidationError".into(),
                message: "not an IAM role name".into(),
            });
        }
        let now = Instant::now();
        let cached = self
            .profiles
            .lock()
            .get(role_name)
            .filter(|(at, _)| now.duration_since(*at) < self.profile_cache_ttl)
            .map(|(_, arns)| Arc::clone(arns));
        if let Some(arns) = cached {
            return Ok(arns.as_ref().clone());
        }
        let page_size = self.iam_page_size.map(|n| n.to_string());
        let mut arns = Vec::new();
        let mut marker: Option<String> = None;
        let mut complete = false;
        for _ in 0..iam::MAX_PAGES {
            let mut params = vec![
                ("Action", "ListInstanceProfilesForRole"),
                ("RoleName", role_name),
            ];
            if let Some(n) = page_size.as_deref() {
                params.push(("MaxItems", n));
            }
            if let Some(m) = marker.as_deref() {
                params.push(("Marker", m));
            }
            let xml = self.call(Service::Iam, "us-east-1", &params, true).await?;
            let page = iam::parse_profiles_for_role(&xml)?;
            arns.extend(page.arns);
            match page.marker {
                Some(m) => marker = Some(m),
                None => {
                    complete = true;
                    break;
                }
            }
        }
        if !complete {
            return Err(AwsError::Unavailable(format!(
                "ListInstanceProfilesForRole kept paging after {} pages",
                iam::MAX_PAGES
            )));
        }
        let mut cache = self.profiles.lock();
        if cache.len() >= PROFILE_CACHE_MAX {
            let ttl = self.profile_cache_ttl;
            cache.retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if cache.len() >= PROFILE_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(role_name.to_owned(), (now, Arc::new(arns.clone())));
        Ok(arns)
    }

    /// Any Query API call: `Action` and its parameters (`Version` is
    /// added), signed and sent to the service's endpoint for `region`.
    /// Returns the answer's XML. Calls whose action starts with
    /// `Describe`, `List` or `Get` are retried like the broker's own;
    /// others only when the request cannot have reached AWS.
    pub async fn query(
        &self,
        service: Service,
        region: &str,
        params: &[(&str, &str)],
    ) -> Result<String, AwsError> {
        let action = params
            .iter()
            .find(|(k, _)| *k == "Action")
            .map(|(_, v)| *v)
            .ok_or_else(|| AwsError::Config("a Query call needs an Action".into()))?;
        let read_only = ["Describe", "List", "Get"]
            .iter()
            .any(|p| action.starts_with(p));
        self.call(service, region, params, read_only).await
    }

    /// The credentials provider, e.g. to warm it up at start.
    pub fn credentials(&self) -> &CredentialsProvider {
        &self.credentials
    }

    async fn call(
        &self,
        service: Service,
        region: &str,
        params: &[(&str, &str)],
        idempotent: bool,
    ) -> Result<String, AwsError> {
        let (url, signing_region) = match service {
            Service::Iam => (
                self.iam_endpoint
                    .clone()
                    .unwrap_or_else(|| "https://iam.amazonaws.com/".to_owned()),
                "us-east-1",
            ),
            Service::Ec2 | Service::Sts => {
                if !is_region(region) {
                    return Err(AwsError::Api {
                        code: "InvalidRegion".into(),
                        message: "not an AWS region name".into(),
                    });
                }
                let url = self.ec2_endpoint.clone().unwrap_or_else(|| {
                    format!("https://{}.{region}.amazonaws.com/", service.signing_name())
                });
                (url, region)
            }
        };
        let body = form_encode(
            params
                .iter()
                .copied()
                .chain([("Version", service.api_version())]),
        );
        let action = params
            .iter()
            .find(|(k, _)| *k == "Action")
            .map_or("", |(_, v)| *v);
        let target = query::Target {
            url: &url,
            region: signing_region,
            service: service.signing_name(),
            action,
        };
        self.transport
            .call(&self.credentials, &target, body.into_bytes(), idempotent)
            .await
    }
}

/// `us-east-1`, `eu-central-2`, `us-gov-west-1`, `cn-north-1`: the region
/// becomes part of a host name, so nothing else gets through.
fn is_region(r: &str) -> bool {
    let mut parts = r.split('-');
    let first = parts.next().unwrap_or("");
    let rest: Vec<&str> = parts.collect();
    r.len() <= 32
        && first.len() == 2
        && first.bytes().all(|b| b.is_ascii_lowercase())
        && rest.len() >= 2
        && rest[..rest.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && rest[rest.len() - 1].parse::<u8>().is_ok()
}

/// `application/x-www-form-urlencoded` as botocore writes it (Python's
/// `urlencode`): RFC 3986 unreserved characters stay, a space becomes
/// `+`, every other byte `%XX`. AWS hashes the body as sent, so any
/// encoding signs correctly there; emulators that re-encode the decoded
/// form before checking the signature (moto) need this exact one.
fn form_encode<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    fn push(out: &mut String, s: &str) {
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    out.push(char::from(b))
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
    }
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        push(&mut out, k);
        out.push('=');
        push(&mut out, v);
    }
    out
}

/// Checks an endpoint override and gives it a path (`/` when it has none).
fn normalize_endpoint(e: &str) -> Result<String, AwsError> {
    let u = url::Url::parse(e).map_err(|err| AwsError::Config(format!("endpoint '{e}': {err}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(AwsError::Config(format!(
            "endpoint '{e}' is not an http(s) URL"
        )));
    }
    if u.query().is_some()
        || u.fragment().is_some()
        || !u.username().is_empty()
        || u.password().is_some()
    {
        return Err(AwsError::Config(format!(
            "endpoint '{e}' must not carry a query, fragment or user"
        )));
    }
    Ok(u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_names() {
        for r in [
            "us-east-1",
            "eu-central-2",
            "us-gov-west-1",
            "cn-north-1",
            "ap-southeast-3",
        ] {
            assert!(is_region(r), "{r}");
        }
        for r in [
            "",
            "us",
            "us-east",
            "US-east-1",
            "evil.com/#-a-1",
            "us-east-1.x",
            "us--1",
            "us-east-x",
        ] {
            assert!(!is_region(r), "{r}");
        }
    }

    #[test]
    fn config_defaults_and_parsing() {
        let c: AwsConfig = toml::from_str("").unwrap();
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        assert_eq!(c.profile_cache, Duration::from_secs(60));
        assert_eq!(c.retries, 2);
        let c: AwsConfig = toml::from_str(
            "access_key_id = \"env:BROKER_AK\"\nsecret_access_key = \"file:/etc/p11shim/aws-secret\"\nrequest_timeout = \"800ms\"\n",
        )
        .unwrap();
        assert_eq!(c.access_key_id, Some(SecretSource::Env("BROKER_AK".into())));
        assert_eq!(c.request_timeout, Duration::from_millis(800));
        let e = toml::from_str::<AwsConfig>("secret_access_key = \"wJalrXUtnFEMI\"\n").unwrap_err();
        assert!(e.to_string().contains("never inline"), "{e}");
    }

    #[test]
    fn config_is_checked() {
        let bad = |c: AwsConfig| AwsClient::new(&c).unwrap_err().to_string();
        let e = bad(AwsConfig {
            retries: 3,
            ..Default::default()
        });
        assert!(e.contains("retries"), "{e}");
        let e = bad(AwsConfig {
            endpoint: Some("ftp://x/".into()),
            ..Default::default()
        });
        assert!(e.contains("http"), "{e}");
        let e = bad(AwsConfig {
            access_key_id: Some(SecretSource::Env("P11SHIM_TEST_UNSET_AK".into())),
            ..Default::default()
        });
        assert!(e.contains("secret_access_key"), "{e}");
    }

    #[test]
    fn form_encoding_is_botocore_s() {
        let body = form_encode(
            [
                ("Action", "PutUserPolicy"),
                (
                    "PolicyDocument",
                    "{\"Action\": \"ec2:*\",\n\"a~b\": \"é/+&=\"}",
                ),
            ]
            .into_iter(),
        );
        assert_eq!(
            body,
            "Action=PutUserPolicy&PolicyDocument=%7B%22Action%22%3A+%22ec2%3A%2A%22%2C%0A%22a~b%22%3A+%22%C3%A9%2F%2B%26%3D%22%7D"
        );
    }

    #[test]
    fn endpoints_get_a_path() {
        assert_eq!(
            normalize_endpoint("http://127.0.0.1:5000").unwrap(),
            "http://127.0.0.1:5000/"
        );
        assert_eq!(
            normalize_endpoint("https://proxy.example/aws/").unwrap(),
            "https://proxy.example/aws/"
        );
        assert!(normalize_endpoint("http://u:p@h/").is_err());
        assert!(normalize_endpoint("http://h/?a=b").is_err());
    }
}
