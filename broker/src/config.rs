//! The broker's TOML configuration: server, store, limits, cloud endpoints
//! and roles. Validated once at start; every error names its key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use p11shim_proto::{Method, Reauth};
use serde::Deserialize;

use crate::aws::AwsConfig;
use crate::k8s::ClusterConfig;
use crate::secrets::SecretSource;
use crate::store::StoreConfig;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default = "default_store")]
    pub store: StoreConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub aws: Option<AwsConfig>,
    /// `[k8s.<cluster>]`: the clusters whose service-account tokens are
    /// accepted (`k8s-sa-token`).
    #[serde(default)]
    pub k8s: BTreeMap<String, ClusterConfig>,
    #[serde(default)]
    pub roles: BTreeMap<String, Role>,
    /// `[approvers.<name>]`: who may approve requests of quorum rules
    /// (`policy.quorum[].approvers` name them), and their public keys.
    #[serde(default)]
    pub approvers: BTreeMap<String, ApproverConfig>,
}

/// `[approvers.<name>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverConfig {
    /// SPKI PEM public key (`openssl pkey -pubout`): RSA of at least 2048
    /// bits, or Ed25519. Loaded and checked at start.
    pub public_key: PathBuf,
}

fn default_store() -> StoreConfig {
    StoreConfig::Sqlite {
        path: PathBuf::from("/var/lib/p11shim-broker/replay.db"),
        busy_timeout_ms: 5_000,
    }
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain and key. Without them the broker serves plain
    /// HTTP, which it accepts only on a loopback address.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Proxies whose `X-Forwarded-For` is believed (CIDR list).
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Time allowed for a client to send its request headers.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time allowed for a whole request, body and verification included.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the listen queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// How often expired replay entries are removed.
    #[serde(default = "default_tidy_interval", with = "humantime_serde")]
    pub tidy_interval: Duration,
    /// How long a replay entry outlives the last use it records.
    #[serde(default = "default_safety_buffer", with = "humantime_serde")]
    pub replay_retention: Duration,
    /// The HMAC key of approval tokens (a secret source, at least 32
    /// bytes), the same on every replica. Absent: a random key per
    /// process, which other replicas do not accept.
    #[serde(default)]
    pub approval_token_key: Option<SecretSource>,
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_max_connections() -> usize {
    1024
}
fn default_log_format() -> String {
    "text".into()
}
fn default_tidy_interval() -> Duration {
    Duration::from_secs(600)
}
fn default_safety_buffer() -> Duration {
    Duration::from_secs(72 * 3600)
}

/// `[limits]`: token buckets checked before any cloud call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_per_ip")]
    pub per_ip: Rate,
    #[serde(default = "default_per_identity")]
    pub per_identity: Rate,
    /// The approval endpoints (`/v1/approvals`), per source address: a
    /// signer waiting for approval reads its request every 200 ms.
    #[serde(default = "default_approvals_per_ip")]
    pub approvals_per_ip: Rate,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_ip: default_per_ip(),
            per_identity: default_per_identity(),
            approvals_per_ip: default_approvals_per_ip(),
        }
    }
}

/// `burst` requests at once, refilled at `per_minute`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

fn default_per_ip() -> Rate {
    Rate {
        per_minute: 60,
        burst: 20,
    }
}
fn default_approvals_per_ip() -> Rate {
    Rate {
        per_minute: 1200,
        burst: 200,
    }
}

fn default_per_identity() -> Rate {
    Rate {
        per_minute: 12,
        burst: 6,
    }
}

/// `[roles.<name>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Verification methods this role accepts.
    pub methods: Vec<Method>,
    /// The PIN handed to the role: `file:`, `env:` or `cmd:`. Read at every
    /// grant, so a rotated PIN is served at once.
    pub pin: SecretSource,
    /// Optional client certificate chain (PEM file) and key for HSMs using
    /// mutual TLS.
    #[serde(default)]
    pub mtls_cert: Option<PathBuf>,
    #[serde(default)]
    pub mtls_key: Option<SecretSource>,
    #[serde(default)]
    pub mtls_ca: Option<PathBuf>,
    /// The HMAC key the module signs its audit checkpoints with (module
    /// `[audit] signing_key = "broker"`); sealed like the PIN.
    #[serde(default)]
    pub audit_key: Option<SecretSource>,
    /// Lifetime of the credentials; the module re-authenticates before it ends.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(default)]
    pub reauth: Reauth,
    /// Refuse requests that do not send an HPKE response key.
    #[serde(default = "yes")]
    pub require_sealed: bool,

    // AWS methods.
    /// Allowed accounts (the instance's owner); empty: any.
    #[serde(default)]
    pub account_ids: Vec<String>,
    /// Allowed regions; empty: the `[aws]` region only.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Membership: instance profiles of this IAM role (ListInstanceProfilesForRole).
    #[serde(default)]
    pub iam_role_name: Option<String>,
    /// Membership: a static list of instance profile ARNs.
    #[serde(default)]
    pub allowed_instance_profile_arns: Vec<String>,
    /// First use only within this time after launch (or last start).
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_instance_age: Duration,
    /// Clock skew tolerated on launch times and token times.
    #[serde(default = "default_skew", with = "humantime_serde")]
    pub clock_skew: Duration,

    // static-fingerprint.
    /// Accepted machine fingerprints (hex SHA-256, see `p11shim-broker fingerprint`).
    #[serde(default)]
    pub fingerprints: Vec<String>,
    /// The attributes a fingerprint covers; requests must send exactly these.
    #[serde(default = "default_fp_attrs")]
    pub fingerprint_attributes: Vec<String>,
    /// Require the source address among the `addresses` attribute.
    #[serde(default = "yes")]
    pub fingerprint_bind_address: bool,

    // k8s-sa-token.
    /// The `[k8s.<name>]` cluster of this role; may be left out when
    /// exactly one cluster is configured.
    #[serde(default)]
    pub k8s_cluster: Option<String>,
    /// Allowed `"<namespace>/<service-account>"`, or `"<namespace>/*"` for
    /// every service account of a namespace.
    #[serde(default)]
    pub service_accounts: Vec<String>,

    /// The key ACL policy handed to the module with the credentials
    /// (`p11shim_proto::policy`); validated at load.
    #[serde(default)]
    pub policy: Option<p11shim_proto::policy::PolicyDoc>,
}

fn yes() -> bool {
    true
}
fn default_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_age() -> Duration {
    Duration::from_secs(600)
}
fn default_skew() -> Duration {
    Duration::from_secs(60)
}
fn default_fp_attrs() -> Vec<String> {
    vec!["machine-id".into(), "hostname".into(), "addresses".into()]
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(path.display().to_string(), e.to_string()))?;
        Config::parse(&text).map_err(|mut e| {
            e.path = format!("{}: {}", path.display(), e.path);
            e
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                .map(|l| format!("line {l}"))
                .unwrap_or_default();
            err(line, e.message().to_owned())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        match (&s.tls_cert, &s.tls_key) {
            (Some(_), Some(_)) => {}
            (None, None) => {
                if !s.listen.ip().is_loopback() {
                    return Err(err(
                        "server.listen",
                        "plain HTTP is served on loopback addresses only; set tls_cert and tls_key",
                    ));
                }
            }
            _ => return Err(err("server", "tls_cert and tls_key go together")),
        }
        if !matches!(s.log_format.as_str(), "text" | "json") {
            return Err(err("server.log_format", "text or json"));
        }
        if s.max_connections == 0 {
            return Err(err("server.max_connections", "must be at least 1"));
        }
        for (k, r) in [
            ("limits.per_ip", self.limits.per_ip),
            ("limits.per_identity", self.limits.per_identity),
            ("limits.approvals_per_ip", self.limits.approvals_per_ip),
        ] {
            if r.per_minute == 0 || r.burst == 0 {
                return Err(err(k, "per_minute and burst must be at least 1"));
            }
        }
        for (name, c) in &self.k8s {
            if !valid_role_name(name) {
                return Err(err(
                    format!("k8s.{name}"),
                    "cluster names use [A-Za-z0-9._-], at most 64",
                ));
            }
            c.validate()
                .map_err(|e| err(format!("k8s.{name}"), e.to_string()))?;
        }
        if self.aws.as_ref().is_some_and(|a| a.iid_cert_dir.is_some())
            && !cfg!(feature = "test-overrides")
        {
            return Err(err(
                "aws.iid_cert_dir",
                "replaces AWS's pinned certificates; only builds with the test-overrides feature read it",
            ));
        }
        self.validate_approvers()?;
        if self.roles.is_empty() {
            return Err(err("roles", "no role is configured"));
        }
        for (name, r) in &self.roles {
            let at = |k: &str| format!("roles.{name}.{k}");
            if !valid_role_name(name) {
                return Err(err(
                    format!("roles.{name}"),
                    "role names use [A-Za-z0-9._-], at most 64",
                ));
            }
            if r.methods.is_empty() {
                return Err(err(at("methods"), "list at least one method"));
            }
            if let Some(p) = &r.policy {
                p.validate()
                    .map_err(|e| err(at(&format!("policy.{}", e.path())), e.message))?;
                self.validate_quorum(p, &at)?;
            }
            if r.ttl < Duration::from_secs(5) || r.ttl > Duration::from_secs(7 * 86400) {
                return Err(err(at("ttl"), "between 5s and 7d"));
            }
            let aws = r
                .methods
                .iter()
                .any(|m| matches!(m, Method::AwsIid | Method::AwsImdsFields));
            if aws {
                if self.aws.is_none() {
                    return Err(err(at("methods"), "AWS methods need an [aws] section"));
                }
                if r.iam_role_name.is_none() && r.allowed_instance_profile_arns.is_empty() {
                    return Err(err(
                        at("iam_role_name"),
                        "AWS methods need iam_role_name or allowed_instance_profile_arns",
                    ));
                }
                if let Some(a) = r
                    .account_ids
                    .iter()
                    .find(|a| a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
                {
                    return Err(err(
                        at("account_ids"),
                        format!("'{a}' is not a 12-digit account id"),
                    ));
                }
                let region_set = self.aws.as_ref().is_some_and(|a| a.region.is_some());
                if r.regions.is_empty() && !region_set {
                    return Err(err(
                        at("regions"),
                        "AWS methods need the role's regions or [aws].region",
                    ));
                }
            }
            if r.methods.contains(&Method::StaticFingerprint) {
                if r.fingerprints.is_empty() {
                    return Err(err(
                        at("fingerprints"),
                        "static-fingerprint needs at least one fingerprint",
                    ));
                }
                if let Some(f) = r
                    .fingerprints
                    .iter()
                    .find(|f| f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit()))
                {
                    return Err(err(
                        at("fingerprints"),
                        format!("'{f}' is not a hex SHA-256"),
                    ));
                }
                if r.fingerprint_attributes.is_empty() {
                    return Err(err(
                        at("fingerprint_attributes"),
                        "list at least one attribute",
                    ));
                }
            }
            self.validate_k8s_role(r, &at)?;
            if r.mtls_cert.is_some() != r.mtls_key.is_some() {
                return Err(err(at("mtls_cert"), "mtls_cert and mtls_key go together"));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The approvers section, and a role's quorum rules against it and the
    /// store.
    fn validate_approvers(&self) -> Result<(), ConfigError> {
        for (name, a) in &self.approvers {
            if !valid_role_name(name) {
                return Err(err(
                    format!("approvers.{name}"),
                    "approver names use [A-Za-z0-9._-], at most 64",
                ));
            }
            if !a.public_key.is_absolute() {
                return Err(err(
                    format!("approvers.{name}.public_key"),
                    "an absolute path to an SPKI PEM public key",
                ));
            }
        }
        Ok(())
    }

    fn validate_quorum(
        &self,
        p: &p11shim_proto::policy::PolicyDoc,
        at: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        for (i, q) in p.quorum.iter().enumerate() {
            if let Some(a) = q
                .approvers
                .iter()
                .find(|a| !self.approvers.contains_key(*a))
            {
                return Err(err(
                    at(&format!("policy.quorum[{i}].approvers")),
                    format!("no [approvers.{a}] section"),
                ));
            }
        }
        if !p.quorum.is_empty() && matches!(self.store, StoreConfig::Redis { .. }) {
            return Err(err(
                at("policy.quorum"),
                "quorum approvals need the sqlite or postgres store (kind = \"redis\" keeps no approvals)",
            ));
        }
        Ok(())
    }

    /// The cluster a `k8s-sa-token` role trusts: its `k8s_cluster`, or the
    /// only cluster configured.
    pub fn k8s_cluster_of<'a>(&'a self, role: &'a Role) -> Option<&'a str> {
        match &role.k8s_cluster {
            Some(c) => Some(c),
            None if self.k8s.len() == 1 => self.k8s.keys().next().map(String::as_str),
            None => None,
        }
    }

    fn validate_k8s_role(&self, r: &Role, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        if !r.methods.contains(&Method::K8sSaToken) {
            if r.k8s_cluster.is_some() || !r.service_accounts.is_empty() {
                return Err(err(
                    at("service_accounts"),
                    "k8s_cluster and service_accounts are for k8s-sa-token roles",
                ));
            }
            return Ok(());
        }
        if self.k8s.is_empty() {
            return Err(err(
                at("methods"),
                "k8s-sa-token needs a [k8s.<cluster>] section",
            ));
        }
        match &r.k8s_cluster {
            Some(c) if !self.k8s.contains_key(c) => {
                return Err(err(at("k8s_cluster"), format!("no [k8s.{c}] section")));
            }
            Some(_) => {}
            None if self.k8s.len() > 1 => {
                return Err(err(
                    at("k8s_cluster"),
                    "name the cluster: more than one [k8s.<cluster>] is configured",
                ));
            }
            None => {}
        }
        if r.service_accounts.is_empty() {
            return Err(err(
                at("service_accounts"),
                "k8s-sa-token needs at least one \"<namespace>/<service-account>\"",
            ));
        }
        if let Some(bad) = r
            .service_accounts
            .iter()
            .find(|a| ServiceAccountPattern::parse(a).is_none())
        {
            return Err(err(
                at("service_accounts"),
                format!("'{bad}' is not \"<namespace>/<service-account>\" or \"<namespace>/*\""),
            ));
        }
        Ok(())
    }
}

/// One entry of a role's `service_accounts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceAccountPattern<'a> {
    pub namespace: &'a str,
    /// `None`: every service account of the namespace (`"<namespace>/*"`).
    pub service_account: Option<&'a str>,
}

impl<'a> ServiceAccountPattern<'a> {
    pub fn parse(s: &'a str) -> Option<ServiceAccountPattern<'a>> {
        let (ns, sa) = s.split_once('/')?;
        if !crate::k8s::jws::valid_namespace(ns) {
            return None;
        }
        let service_account = match sa {
            "*" => None,
            sa if crate::k8s::jws::valid_service_account(sa) => Some(sa),
            _ => return None,
        };
        Some(ServiceAccountPattern {
            namespace: ns,
            service_account,
        })
    }

    pub fn matches(&self, namespace: &str, service_account: &str) -> bool {
        self.namespace == namespace && self.service_account.is_none_or(|s| s == service_account)
    }
}

/// Role names travel in requests and logs.
pub fn valid_role_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SecretSource::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:0"
[store]
kind = "sqlite"
path = "/tmp/x.db"
[roles.demo]
methods = ["static-fingerprint"]
pin = "env:DEMO_PIN"
fingerprints = ["0000000000000000000000000000000000000000000000000000000000000000"]
"#;

    #[test]
    fn quorum_rules_name_configured_approvers_and_a_transactional_store() {
        let quorum = format!(
            "{MINIMAL}policy = {{ keys = [{{ label = \"ca-*\", ops = [\"sign\"] }}], quorum = [{{ label = \"ca-*\", ops = [\"sign\"], m = 2, approvers = [\"alice\", \"bob\"] }}] }}\n"
        );
        let approvers = "[approvers.alice]\npublic_key = \"/etc/a.pem\"\n[approvers.bob]\npublic_key = \"/etc/b.pem\"\n";
        let c = Config::parse(&format!("{quorum}{approvers}")).unwrap();
        assert_eq!(c.approvers.len(), 2);
        let e = Config::parse(&quorum).unwrap_err();
        assert_eq!(e.path, "roles.demo.policy.quorum[0].approvers");
        assert!(e.message.contains("[approvers.alice]"), "{e}");
        let redis = format!("{quorum}{approvers}").replace(
            "kind = \"sqlite\"\npath = \"/tmp/x.db\"",
            "kind = \"redis\"\nurl = \"env:REDIS_URL\"",
        );
        let e = Config::parse(&redis).unwrap_err();
        assert_eq!(e.path, "roles.demo.policy.quorum");
        let e = Config::parse(&format!(
            "{quorum}{}",
            approvers.replace("/etc/b.pem", "b.pem")
        ))
        .unwrap_err();
        assert_eq!(e.path, "approvers.bob.public_key");
        let e = Config::parse(&quorum.replace("m = 2", "m = 3")).unwrap_err();
        assert_eq!(e.path, "roles.demo.policy.quorum[0].m");
        let keyed = format!("{quorum}{approvers}").replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\napproval_token_key = \"file:/etc/p11shim-broker/approval.key\"",
        );
        assert!(
            Config::parse(&keyed)
                .unwrap()
                .server
                .approval_token_key
                .is_some()
        );
        let inline = keyed.replace("file:/etc/p11shim-broker/approval.key", "s3cret");
        assert!(Config::parse(&inline).is_err());
    }

    #[test]
    fn minimal_is_valid() {
        let c = Config::parse(MINIMAL).unwrap();
        let r = &c.roles["demo"];
        assert_eq!(r.reauth, Reauth::Nonce);
        assert!(r.require_sealed);
        assert_eq!(r.ttl, Duration::from_secs(3600));
    }

    #[test]
    fn the_annotated_example_is_valid() {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/broker.toml");
        let c = Config::load(Path::new(p)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.roles.len(), 4);
        assert_eq!(c.k8s.len(), 1);
        assert!(c.server.tls_cert.is_some());
        assert_eq!(c.approvers.len(), 3);
        let q = &c.roles["ca"].policy.as_ref().expect("ca's policy").quorum;
        assert_eq!((q[0].m, q[0].approvers.len()), (2, 3));
        assert!(c.server.approval_token_key.is_some());
    }

    #[test]
    fn refusals_name_their_key() {
        let e = Config::parse(&MINIMAL.replace("127.0.0.1:0", "0.0.0.0:8443")).unwrap_err();
        assert_eq!(e.path, "server.listen");
        let e = Config::parse(&format!(
            "{MINIMAL}policy = {{ keys = [{{ label = \"a\" }}, {{ ops = [\"sing\"] }}] }}\n"
        ))
        .unwrap_err();
        assert_eq!(e.path, "roles.demo.policy.keys[1].ops");
        assert!(e.message.contains("unknown operation \"sing\""), "{e}");
        let e = Config::parse(&MINIMAL.replace("env:DEMO_PIN", "1234")).unwrap_err();
        assert!(e.message.contains("never inline"), "{e}");
        let e = Config::parse(&MINIMAL.replace("static-fingerprint", "aws-iid")).unwrap_err();
        assert_eq!(e.path, "roles.demo.methods");
        let aws = MINIMAL.replace("static-fingerprint", "aws-iid") + "iam_role_name = \"hsm\"\n";
        let e = Config::parse(&format!("[aws]\n{aws}")).unwrap_err();
        assert_eq!(e.path, "roles.demo.regions");
        let c = Config::parse(&format!("[aws]\nregion = \"eu-west-1\"\n{aws}")).unwrap();
        assert_eq!(c.roles["demo"].methods, [Method::AwsIid]);
        let dir = format!("[aws]\nregion = \"eu-west-1\"\niid_cert_dir = \"/tmp/ca\"\n{aws}");
        let parsed = Config::parse(&dir);
        if cfg!(feature = "test-overrides") {
            parsed.unwrap_or_else(|e| panic!("{e}"));
        } else {
            assert_eq!(parsed.unwrap_err().path, "aws.iid_cert_dir");
        }
        let e = Config::parse(&MINIMAL.replace("static-fingerprint", "k8s-sa-token")).unwrap_err();
        assert_eq!(e.path, "roles.demo.methods");
        let e = Config::parse(&MINIMAL.replace("methods", "method")).unwrap_err();
        assert!(e.path.starts_with("line "), "{e}");
        let e = Config::parse(&MINIMAL.replace("\"0000", "\"zz00")).unwrap_err();
        assert_eq!(e.path, "roles.demo.fingerprints");
    }

    const K8S: &str = r#"
[server]
listen = "127.0.0.1:0"
[k8s.a]
issuer = "https://issuer-a.example"
audience = "hsm-broker"
mode = "oidc"
[roles.pod]
methods = ["k8s-sa-token"]
pin = "env:DEMO_PIN"
service_accounts = ["payments/signer", "batch/*"]
"#;

    #[test]
    fn k8s_roles() {
        let c = Config::parse(K8S).unwrap();
        let r = &c.roles["pod"];
        assert_eq!(c.k8s_cluster_of(r), Some("a"));
        assert_eq!(c.k8s["a"].audience, "hsm-broker");

        let two = format!(
            "{K8S}[k8s.b]\nissuer = \"https://b.example\"\naudience = \"hsm\"\nmode = \"oidc\"\n"
        );
        let e = Config::parse(&two).unwrap_err();
        assert_eq!(e.path, "roles.pod.k8s_cluster");
        let named = two.replace("service_accounts", "k8s_cluster = \"b\"\nservice_accounts");
        let c = Config::parse(&named).unwrap();
        assert_eq!(c.k8s_cluster_of(&c.roles["pod"]), Some("b"));

        let e = Config::parse(&K8S.replace("pin = ", "k8s_cluster = \"zz\"\npin = ")).unwrap_err();
        assert_eq!(e.path, "roles.pod.k8s_cluster");
        for bad in [
            "\"payments\"",
            "\"Pay/x\"",
            "\"payments/\"",
            "\"/x\"",
            "\"a/b/c\"",
        ] {
            let e = Config::parse(&K8S.replace("\"batch/*\"", bad)).unwrap_err();
            assert_eq!(e.path, "roles.pod.service_accounts", "{bad}");
        }
        let e = Config::parse(
            &K8S.replace("service_accounts = [\"payments/signer\", \"batch/*\"]", ""),
        )
        .unwrap_err();
        assert_eq!(e.path, "roles.pod.service_accounts");
        // The cluster's own checks, under its key.
        let e = Config::parse(&K8S.replace("\"hsm-broker\"", "\"https://kubernetes.default.svc\""))
            .unwrap_err();
        assert_eq!(e.path, "k8s.a");
        // Allow-list fields on a role of another method.
        let e = Config::parse(&MINIMAL.replace("pin = ", "service_accounts = [\"a/b\"]\npin = "))
            .unwrap_err();
        assert_eq!(e.path, "roles.demo.service_accounts");
    }

    #[test]
    fn service_account_patterns() {
        let p = ServiceAccountPattern::parse("payments/signer").unwrap();
        assert!(p.matches("payments", "signer"));
        assert!(!p.matches("payments", "signer2"));
        assert!(!p.matches("payment", "signer"));
        let p = ServiceAccountPattern::parse("batch/*").unwrap();
        assert!(p.matches("batch", "anything"));
        assert!(!p.matches("batch2", "anything"));
        assert!(ServiceAccountPattern::parse("*/x").is_none());
        assert!(ServiceAccountPattern::parse("ns/x*").is_none());
    }
}
