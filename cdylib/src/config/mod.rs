//! The module's configuration: a raw form as written in TOML, then a
//! validated model that the rest of the module uses.
//!
//! Everything is checked here, before the first vendor library is loaded.
//! An error names the file, the line and the key, so that `C_Initialize`
//! can fail with a message an operator can act on.

mod acl;
mod audit;
mod uri;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use zeroize::Zeroizing;

pub use acl::AclConfig;
pub use audit::{AuditConfig, AuditKey};
pub use uri::{Pkcs11Uri, UriError};

/// Where the configuration is read from when nothing else says.
pub const DEFAULT_PATH: &str = "/etc/p11shim/p11shim.toml";
/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "P11SHIM_CONFIG";
/// Environment variable overriding `[log] level`.
pub const LOG_ENV: &str = "P11SHIM_LOG";

// ---------------------------------------------------------------------------
// Raw form: exactly what the file says.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    log: RawLog,
    #[serde(default, rename = "slot")]
    slots: Vec<Spanned<RawSlot>>,
    broker: Option<Spanned<RawBroker>>,
    acl: Option<Spanned<acl::RawAcl>>,
    audit: Option<Spanned<audit::RawAudit>>,
    metrics: Option<Spanned<RawMetrics>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    file: Spanned<String>,
    interval_ms: Option<Spanned<u64>>,
    labels: Option<Spanned<std::collections::BTreeMap<String, String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: Spanned<String>,
    ca: Option<Spanned<String>>,
    role: Spanned<String>,
    method: Spanned<String>,
    imds_endpoint: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    cluster: Option<Spanned<String>>,
    fingerprint_attributes: Option<Spanned<Vec<String>>>,
    nonce_file: Option<Spanned<String>>,
    wait_ms: Option<Spanned<u64>>,
    request_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlot {
    id: Spanned<u64>,
    label: Spanned<String>,
    serial: Option<Spanned<String>>,
    pin: Option<Spanned<String>>,
    replay_limit: Option<Spanned<u64>>,
    #[serde(default)]
    allow_unreplicated: bool,
    replication_key: Option<Spanned<String>>,
    call_timeout_ms: Option<Spanned<u64>>,
    recovery_interval_ms: Option<Spanned<u64>>,
    recovery_max_interval_ms: Option<Spanned<u64>>,
    #[serde(default, rename = "member")]
    members: Vec<Spanned<RawMember>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    library: Spanned<String>,
    token: Option<Spanned<String>>,
    uri: Option<Spanned<String>>,
    weight: Option<Spanned<u32>>,
    #[serde(default)]
    standby: bool,
}

// ---------------------------------------------------------------------------
// Validated model.

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub source: PathBuf,
    pub log: LogConfig,
    pub slots: Vec<SlotConfig>,
    /// Where slots with `pin = "broker"` get their credentials.
    pub broker: Option<BrokerConfig>,
    /// The key ACL; `None`: no policy of p11shim's own.
    pub acl: Option<AclConfig>,
    /// The audit log; `None`: none.
    pub audit: Option<AuditConfig>,
    /// The Prometheus textfile, when `[metrics]` is configured.
    pub metrics: Option<MetricsConfig>,
}

/// `[metrics]`: counters and histograms in the Prometheus text format,
/// written to a file for node_exporter's textfile collector (a library in
/// someone else's process opens no port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Absolute path of the file, ending in `.prom`; `{pid}` in its name
    /// stands for the process id (see [`MetricsConfig::per_process`]).
    pub file: PathBuf,
    /// Time between two writes.
    pub interval_ms: u64,
    /// Labels added to every series, sorted by name.
    pub labels: Vec<(String, String)>,
}

/// The placeholder for the process id in `[metrics] file`.
pub const PID_PLACEHOLDER: &str = "{pid}";
/// Shortest and longest `[metrics] interval_ms`.
pub const METRICS_INTERVAL_MS: std::ops::RangeInclusive<u64> = 1_000..=3_600_000;
/// Label names p11shim sets itself, which `[metrics] labels` may not use.
pub const RESERVED_LABELS: [&str; 10] = [
    "slot", "member", "state", "op", "result", "le", "version", "pid", "token", "library",
];

impl MetricsConfig {
    /// Whether every process writes its own file (`{pid}` in the name);
    /// its series then carry a `pid` label too.
    pub fn per_process(&self) -> bool {
        self.file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains(PID_PLACEHOLDER))
    }

    /// The file of process `pid`.
    pub fn file_for(&self, pid: u32) -> PathBuf {
        PathBuf::from(
            self.file
                .to_string_lossy()
                .replace(PID_PLACEHOLDER, &pid.to_string()),
        )
    }
}

/// `[broker]`: credentials by attestation from `p11shim-broker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Base URL; `http://` only on a loopback address.
    pub url: String,
    /// PEM file of the CA(s) the broker's certificate must chain to.
    pub ca: Option<PathBuf>,
    pub role: String,
    pub method: BrokerMethod,
    /// IMDS base URL (AWS methods); `AWS_EC2_METADATA_SERVICE_ENDPOINT`
    /// overrides it.
    pub imds_endpoint: String,
    /// The projected service-account token (k8s-sa-token).
    pub token_file: Option<PathBuf>,
    /// The cluster name the broker knows (k8s-sa-token).
    pub cluster: Option<String>,
    /// The machine attributes covered (static-fingerprint).
    pub fingerprint_attributes: Vec<String>,
    /// Where the re-authentication nonce is kept, so that every process on
    /// the machine (and a restarted one) can re-authenticate; `None` keeps
    /// it in this process's memory only.
    pub nonce_file: Option<PathBuf>,
    /// How long the first call that needs credentials waits for them.
    pub wait_ms: u64,
    /// Time allowed for one exchange with the broker or IMDS.
    pub request_timeout_ms: u64,
}

/// Evidence the module presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerMethod {
    AwsImdsFields,
    AwsIid,
    K8sSaToken,
    StaticFingerprint,
}

impl BrokerMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerMethod::AwsImdsFields => "aws-imds-fields",
            BrokerMethod::AwsIid => "aws-iid",
            BrokerMethod::K8sSaToken => "k8s-sa-token",
            BrokerMethod::StaticFingerprint => "static-fingerprint",
        }
    }
}

/// Diagnostic logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub level: LogLevel,
    /// `None` logs to stderr.
    pub file: Option<PathBuf>,
}

/// Diagnostic log levels, from quietest to loudest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// Parses a level name as written in the config or `P11SHIM_LOG`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return None,
        })
    }
}

/// One virtual slot shown to applications.
#[derive(Debug, Clone)]
pub struct SlotConfig {
    /// Stable slot id shown to applications.
    pub id: u64,
    /// Token label shown to applications (at most 32 bytes).
    pub label: String,
    /// Token serial shown to applications (at most 16 bytes).
    pub serial: String,
    /// Where the user PIN comes from; `None` passes the application's PIN through.
    pub pin: Option<PinSource>,
    /// Bytes of multi-part input kept per operation so that it can be
    /// replayed on another member; 0 disables the replay of multi-part work.
    pub replay_limit: u64,
    /// Token keys generated on a multi-member slot may stay on one member.
    pub allow_unreplicated: bool,
    /// Label of the secret key, present on every member and marked
    /// `CKA_TRUSTED`, under which generated token keys are wrapped to reach
    /// the other members.
    pub replication_key: Option<String>,
    /// Deadline of a data-path call on a member, after which it is
    /// abandoned and the work moves to another member (network HSMs that
    /// may hang). `None`: calls run inline, never abandoned.
    pub call_timeout_ms: Option<u64>,
    /// First delay before a down member is probed again (it doubles).
    pub recovery_interval_ms: u64,
    /// Longest delay between two probes of a down member.
    pub recovery_max_interval_ms: u64,
    pub members: Vec<MemberConfig>,
}

/// Most members in one slot.
pub const MAX_MEMBERS: usize = 16;
/// Virtual slots in one configuration (session handles name their slot).
pub const MAX_SLOTS: usize = crate::dispatch::MAX_SLOTS;

/// Where a slot's user PIN is read from, at login time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    Env(String),
    File(PathBuf),
    /// The credentials `[broker]` obtains by attestation.
    Broker,
}

impl PinSource {
    /// Reads the PIN. The value is wiped from memory when dropped; errors
    /// name the source, never the value.
    pub fn read(&self) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut value = match self {
            PinSource::Env(name) => match std::env::var_os(name) {
                Some(v) => Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(v)),
                None => return Err(format!("environment variable {name} is not set")),
            },
            PinSource::File(path) => match std::fs::read(path) {
                Ok(v) => Zeroizing::new(v),
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            },
            PinSource::Broker => {
                return Err("the broker's credentials are read through the module".into());
            }
        };
        while matches!(value.last(), Some(b'\n' | b'\r')) {
            value.pop();
        }
        if value.is_empty() {
            return Err(format!("{self} is empty"));
        }
        Ok(value)
    }
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::Env(n) => write!(f, "env:{n}"),
            PinSource::File(p) => write!(f, "file:{}", p.display()),
            PinSource::Broker => f.write_str("broker"),
        }
    }
}

/// One member partition of a slot: a token in a vendor library.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub library: PathBuf,
    pub selector: TokenSelector,
    pub weight: u32,
    pub standby: bool,
}

/// How a member's token is found among the vendor library's slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    Label(String),
    Uri(Pkcs11Uri),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "token {l:?}"),
            TokenSelector::Uri(u) => write!(f, "{u:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Errors.

/// A configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The key at fault, when known (`slot[0].member[1].library`).
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn line_of(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text[..end].bytes().filter(|&b| b == b'\n').count() + 1
    }

    fn err(
        &self,
        span: Option<&Range<usize>>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: span.map(|s| self.line_of(s)),
            key: Some(key.into()),
            message: msg.into(),
        }
    }

    /// The key written on the line a parse error points at, if any.
    fn key_on_line(&self, span: &Range<usize>) -> Option<String> {
        let line = self.text.lines().nth(self.line_of(span) - 1)?;
        let (key, _) = line.split_once('=')?;
        let key = key.trim().trim_matches('"');
        (!key.is_empty() && !key.starts_with('[')).then(|| key.to_owned())
    }
}

// ---------------------------------------------------------------------------
// Loading and validation.

/// Picks the configuration file: `P11SHIM_CONFIG`, else the string passed in
/// `CK_C_INITIALIZE_ARGS.pReserved` when it is an absolute path (other
/// applications put their own parameter strings there, NSS among them),
/// else [`DEFAULT_PATH`].
pub fn locate(reserved: Option<&str>) -> PathBuf {
    if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(r) = reserved.map(str::trim).filter(|r| r.starts_with('/')) {
        return PathBuf::from(r);
    }
    PathBuf::from(DEFAULT_PATH)
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: None,
        message: format!("cannot read the configuration: {e}"),
    })?;
    parse(path, &text)
}

/// Validates configuration text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx { file: path, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let span = e.span();
        ConfigError {
            file: path.to_path_buf(),
            line: span.as_ref().map(|s| ctx.line_of(s)),
            key: span.as_ref().and_then(|s| ctx.key_on_line(s)),
            message: e.message().trim().to_owned(),
        }
    })?;
    validate(&ctx, raw)
}

fn validate(ctx: &Ctx<'_>, raw: RawConfig) -> Result<Config, ConfigError> {
    let level = match &raw.log.level {
        None => LogLevel::Warn,
        Some(l) => LogLevel::parse(l.get_ref()).ok_or_else(|| {
            ctx.err(
                Some(&l.span()),
                "log.level",
                format!(
                    "unknown level {:?} (expected off, error, warn, info, debug or trace)",
                    l.get_ref()
                ),
            )
        })?,
    };
    let file = match &raw.log.file {
        None => None,
        Some(f) if f.get_ref().is_empty() => {
            return Err(ctx.err(
                Some(&f.span()),
                "log.file",
                "must not be empty (leave it out to log to stderr)",
            ));
        }
        Some(f) => Some(PathBuf::from(f.get_ref())),
    };

    if raw.slots.is_empty() {
        return Err(ConfigError {
            file: ctx.file.to_path_buf(),
            line: None,
            key: Some("slot".into()),
            message: "no [[slot]] is configured".into(),
        });
    }
    if raw.slots.len() > MAX_SLOTS {
        return Err(ConfigError {
            file: ctx.file.to_path_buf(),
            line: None,
            key: Some("slot".into()),
            message: format!("at most {MAX_SLOTS} [[slot]] can be configured"),
        });
    }

    let mut slots: Vec<SlotConfig> = Vec::with_capacity(raw.slots.len());
    for (i, s) in raw.slots.iter().enumerate() {
        let key = |k: &str| format!("slot[{i}].{k}");
        let s_span = s.span();
        let s = s.get_ref();

        let id = *s.id.get_ref();
        if let Some(prev) = slots.iter().position(|p| p.id == id) {
            return Err(ctx.err(
                Some(&s.id.span()),
                key("id"),
                format!("slot id {id} is already used by slot[{prev}]"),
            ));
        }
        let label = s.label.get_ref().clone();
        if label.trim().is_empty() || label.len() > 32 {
            return Err(ctx.err(
                Some(&s.label.span()),
                key("label"),
                "a token label has 1 to 32 bytes",
            ));
        }
        if let Some(prev) = slots.iter().position(|p| p.label == label) {
            return Err(ctx.err(
                Some(&s.label.span()),
                key("label"),
                format!("label {label:?} is already used by slot[{prev}]"),
            ));
        }
        let serial = match &s.serial {
            Some(v)
                if v.get_ref().is_empty() || v.get_ref().len() > 16 || !v.get_ref().is_ascii() =>
            {
                return Err(ctx.err(
                    Some(&v.span()),
                    key("serial"),
                    "a token serial has 1 to 16 ASCII characters",
                ));
            }
            Some(v) => v.get_ref().clone(),
            None => default_serial(id, &label),
        };
        let pin = match &s.pin {
            None => None,
            Some(p) => Some(
                parse_pin_source(p.get_ref())
                    .map_err(|m| ctx.err(Some(&p.span()), key("pin"), m))?,
            ),
        };

        if s.members.is_empty() {
            return Err(ctx.err(
                Some(&s_span),
                key("member"),
                "a slot needs at least one [[slot.member]]",
            ));
        }
        if s.members.len() > MAX_MEMBERS {
            return Err(ctx.err(
                Some(&s_span),
                key("member"),
                format!("a slot has at most {MAX_MEMBERS} members"),
            ));
        }
        let replay_limit = s.replay_limit.as_ref().map_or(1 << 20, |v| *v.get_ref());
        let call_timeout_ms = match &s.call_timeout_ms {
            Some(v) if !(10..=600_000).contains(v.get_ref()) => {
                return Err(ctx.err(
                    Some(&v.span()),
                    key("call_timeout_ms"),
                    "between 10 and 600000",
                ));
            }
            other => other.as_ref().map(|v| *v.get_ref()),
        };
        let replication_key = match &s.replication_key {
            Some(v) if v.get_ref().is_empty() || v.get_ref().len() > 32 => {
                return Err(ctx.err(
                    Some(&v.span()),
                    key("replication_key"),
                    "the label of a key on every member, 1 to 32 bytes",
                ));
            }
            other => other.as_ref().map(|v| v.get_ref().clone()),
        };
        let recovery_interval_ms = match &s.recovery_interval_ms {
            None => 200,
            Some(v) if !(10..=60_000).contains(v.get_ref()) => {
                return Err(ctx.err(
                    Some(&v.span()),
                    key("recovery_interval_ms"),
                    "between 10 and 60000",
                ));
            }
            Some(v) => *v.get_ref(),
        };
        let recovery_max_interval_ms = match &s.recovery_max_interval_ms {
            None => 5_000.max(recovery_interval_ms),
            Some(v) if *v.get_ref() < recovery_interval_ms || *v.get_ref() > 600_000 => {
                return Err(ctx.err(
                    Some(&v.span()),
                    key("recovery_max_interval_ms"),
                    "between recovery_interval_ms and 600000",
                ));
            }
            Some(v) => *v.get_ref(),
        };
        let mut members = Vec::with_capacity(s.members.len());
        for (j, m) in s.members.iter().enumerate() {
            let mkey = |k: &str| format!("slot[{i}].member[{j}].{k}");
            let m_span = m.span();
            let m = m.get_ref();
            let library = PathBuf::from(m.library.get_ref());
            if !library.is_absolute() {
                return Err(ctx.err(
                    Some(&m.library.span()),
                    mkey("library"),
                    "the vendor library must be an absolute path",
                ));
            }
            let selector = match (&m.token, &m.uri) {
                (Some(t), None) => {
                    let t_ref = t.get_ref();
                    if t_ref.is_empty() || t_ref.len() > 32 {
                        return Err(ctx.err(
                            Some(&t.span()),
                            mkey("token"),
                            "a token label has 1 to 32 bytes",
                        ));
                    }
                    TokenSelector::Label(t_ref.clone())
                }
                (None, Some(u)) => TokenSelector::Uri(
                    Pkcs11Uri::parse(u.get_ref())
                        .map_err(|e| ctx.err(Some(&u.span()), mkey("uri"), e.0))?,
                ),
                (Some(_), Some(u)) => {
                    return Err(ctx.err(
                        Some(&u.span()),
                        mkey("uri"),
                        "give either `token` or `uri`, not both",
                    ));
                }
                (None, None) => {
                    return Err(ctx.err(
                        Some(&m_span),
                        mkey("token"),
                        "a member names its token with `token` or `uri`",
                    ));
                }
            };
            let weight = match &m.weight {
                None => 1,
                Some(w) if *w.get_ref() == 0 || *w.get_ref() > 1000 => {
                    return Err(ctx.err(
                        Some(&w.span()),
                        mkey("weight"),
                        "weight is between 1 and 1000",
                    ));
                }
                Some(w) => *w.get_ref(),
            };
            if members
                .iter()
                .any(|p: &MemberConfig| p.library == library && p.selector == selector)
            {
                return Err(ctx.err(Some(&m_span), mkey("token"), "this member is listed twice"));
            }
            members.push(MemberConfig {
                library,
                selector,
                weight,
                standby: m.standby,
            });
        }
        if members.iter().all(|m| m.standby) {
            return Err(ctx.err(
                Some(&s_span),
                key("member"),
                "every member is a standby; at least one must be active",
            ));
        }
        slots.push(SlotConfig {
            id,
            label,
            serial,
            pin,
            replay_limit,
            allow_unreplicated: s.allow_unreplicated,
            replication_key,
            call_timeout_ms,
            recovery_interval_ms,
            recovery_max_interval_ms,
            members,
        });
    }

    let broker = match &raw.broker {
        None => None,
        Some(b) => Some(validate_broker(ctx, b)?),
    };
    if broker.is_none() {
        if let Some(i) = slots.iter().position(|s| s.pin == Some(PinSource::Broker)) {
            return Err(ctx.err(
                raw.slots[i]
                    .get_ref()
                    .pin
                    .as_ref()
                    .map(|p| p.span())
                    .as_ref(),
                format!("slot[{i}].pin"),
                "pin = \"broker\" needs a [broker] section",
            ));
        }
    }

    let acl = match &raw.acl {
        None => None,
        Some(a) => Some(acl::validate(ctx, a, broker.is_some())?),
    };
    let audit = match &raw.audit {
        None => None,
        Some(a) => Some(audit::validate(ctx, a, broker.is_some())?),
    };
    let metrics = match &raw.metrics {
        None => None,
        Some(m) => Some(validate_metrics(ctx, m)?),
    };

    Ok(Config {
        source: ctx.file.to_path_buf(),
        log: LogConfig { level, file },
        slots,
        broker,
        acl,
        audit,
        metrics,
    })
}

fn validate_metrics(ctx: &Ctx<'_>, m: &Spanned<RawMetrics>) -> Result<MetricsConfig, ConfigError> {
    let m = m.get_ref();
    let f = &m.file;
    let path = PathBuf::from(f.get_ref());
    let bad = |msg: &str| Err(ctx.err(Some(&f.span()), "metrics.file", msg));
    if !path.is_absolute() {
        return bad("must be an absolute path");
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return bad("must name a file (UTF-8), not a directory");
    };
    if f.get_ref().ends_with('/') {
        return bad("must name a file, not a directory");
    }
    if !name.ends_with(".prom") {
        return bad("must end in `.prom`: node_exporter's textfile collector reads no other file");
    }
    let dir = path
        .parent()
        .map(|d| d.to_string_lossy())
        .unwrap_or_default();
    if dir.contains('{') || dir.contains('}') {
        return bad("`{pid}` may appear in the file name only, not in its directory");
    }
    if name.replace(PID_PLACEHOLDER, "").contains(['{', '}']) {
        return bad("the only placeholder is `{pid}`");
    }
    let interval_ms = match &m.interval_ms {
        None => 15_000,
        Some(i) if METRICS_INTERVAL_MS.contains(i.get_ref()) => *i.get_ref(),
        Some(i) => {
            return Err(ctx.err(
                Some(&i.span()),
                "metrics.interval_ms",
                format!(
                    "between {} and {} (milliseconds)",
                    METRICS_INTERVAL_MS.start(),
                    METRICS_INTERVAL_MS.end()
                ),
            ));
        }
    };
    let mut labels = Vec::new();
    if let Some(l) = &m.labels {
        for (name, value) in l.get_ref() {
            let key = format!("metrics.labels.{name}");
            let valid = name
                .chars()
                .enumerate()
                .all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
            if name.is_empty() || !valid {
                return Err(ctx.err(
                    Some(&l.span()),
                    key,
                    format!("{name:?} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"),
                ));
            }
            if name.starts_with("__") {
                return Err(ctx.err(
                    Some(&l.span()),
                    key,
                    "label names starting with `__` are reserved by Prometheus",
                ));
            }
            if RESERVED_LABELS.contains(&name.as_str()) {
                return Err(ctx.err(
                    Some(&l.span()),
                    key,
                    format!("p11shim sets the label `{name}` itself"),
                ));
            }
            if value.is_empty() {
                return Err(ctx.err(
                    Some(&l.span()),
                    key,
                    "an empty value is the same as no label to Prometheus",
                ));
            }
            labels.push((name.clone(), value.clone()));
        }
        if labels.len() > 16 {
            return Err(ctx.err(Some(&l.span()), "metrics.labels", "at most 16 labels"));
        }
    }
    Ok(MetricsConfig {
        file: path,
        interval_ms,
        labels,
    })
}

fn validate_broker(ctx: &Ctx<'_>, b: &Spanned<RawBroker>) -> Result<BrokerConfig, ConfigError> {
    let span = b.span();
    let b = b.get_ref();
    let url = b.url.get_ref().trim_end_matches('/').to_owned();
    let (scheme, rest) = url.split_once("://").unwrap_or(("", ""));
    let host = rest.split('/').next().unwrap_or("");
    let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match scheme {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(ctx.err(
                Some(&b.url.span()),
                "broker.url",
                "plain http is accepted for a loopback broker only; use https",
            ));
        }
        _ => {
            return Err(ctx.err(
                Some(&b.url.span()),
                "broker.url",
                "expected an https:// URL",
            ));
        }
    }
    if host.is_empty() {
        return Err(ctx.err(Some(&b.url.span()), "broker.url", "no host in the URL"));
    }
    let abs = |v: &Option<Spanned<String>>, k: &str| -> Result<Option<PathBuf>, ConfigError> {
        match v {
            None => Ok(None),
            Some(p) if Path::new(p.get_ref()).is_absolute() => Ok(Some(PathBuf::from(p.get_ref()))),
            Some(p) => Err(ctx.err(
                Some(&p.span()),
                format!("broker.{k}"),
                "must be an absolute path",
            )),
        }
    };
    let ca = abs(&b.ca, "ca")?;
    if scheme == "https" && ca.is_none() {
        return Err(ctx.err(
            Some(&span),
            "broker.ca",
            "an https broker needs `ca`, the PEM file its certificate chains to",
        ));
    }
    let role = b.role.get_ref().clone();
    let role_ok = !role.is_empty()
        && role.len() <= 64
        && role
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if !role_ok {
        return Err(ctx.err(
            Some(&b.role.span()),
            "broker.role",
            "role names use [A-Za-z0-9._-], at most 64",
        ));
    }
    let method = match b.method.get_ref().as_str() {
        "aws-imds-fields" => BrokerMethod::AwsImdsFields,
        "aws-iid" => BrokerMethod::AwsIid,
        "k8s-sa-token" => BrokerMethod::K8sSaToken,
        "static-fingerprint" => BrokerMethod::StaticFingerprint,
        other => {
            return Err(ctx.err(
                Some(&b.method.span()),
                "broker.method",
                format!("unknown method {other:?} (aws-iid, aws-imds-fields, k8s-sa-token or static-fingerprint)"),
            ));
        }
    };
    let token_file = abs(&b.token_file, "token_file")?;
    if method == BrokerMethod::K8sSaToken && token_file.is_none() {
        return Err(ctx.err(
            Some(&span),
            "broker.token_file",
            "k8s-sa-token needs the projected token's path",
        ));
    }
    let fingerprint_attributes = match &b.fingerprint_attributes {
        None => p11shim_proto::fingerprint::KNOWN
            .iter()
            .map(|s| s.to_string())
            .collect(),
        Some(a) => {
            if a.get_ref().is_empty() {
                return Err(ctx.err(
                    Some(&a.span()),
                    "broker.fingerprint_attributes",
                    "list at least one",
                ));
            }
            if let Some(x) = a
                .get_ref()
                .iter()
                .find(|x| !p11shim_proto::fingerprint::KNOWN.contains(&x.as_str()))
            {
                return Err(ctx.err(
                    Some(&a.span()),
                    "broker.fingerprint_attributes",
                    format!("unknown attribute {x:?} (machine-id, hostname, addresses)"),
                ));
            }
            a.get_ref().clone()
        }
    };
    let imds_endpoint = b
        .imds_endpoint
        .as_ref()
        .map(|e| e.get_ref().trim_end_matches('/').to_owned())
        .unwrap_or_else(|| "http://169.254.169.254".into());
    if !imds_endpoint.starts_with("http://") {
        return Err(ctx.err(
            b.imds_endpoint.as_ref().map(|e| e.span()).as_ref(),
            "broker.imds_endpoint",
            "IMDS is plain http on a link-local address",
        ));
    }
    let positive = |v: &Option<Spanned<u64>>, k: &str, d: u64| -> Result<u64, ConfigError> {
        match v {
            None => Ok(d),
            Some(x) if *x.get_ref() > 0 && *x.get_ref() <= 600_000 => Ok(*x.get_ref()),
            Some(x) => Err(ctx.err(
                Some(&x.span()),
                format!("broker.{k}"),
                "between 1 and 600000",
            )),
        }
    };
    Ok(BrokerConfig {
        url,
        ca,
        role,
        method,
        imds_endpoint,
        token_file,
        cluster: b.cluster.as_ref().map(|c| c.get_ref().clone()),
        fingerprint_attributes,
        nonce_file: abs(&b.nonce_file, "nonce_file")?,
        wait_ms: positive(&b.wait_ms, "wait_ms", 15_000)?,
        request_timeout_ms: positive(&b.request_timeout_ms, "request_timeout_ms", 5_000)?,
    })
}

fn parse_pin_source(s: &str) -> Result<PinSource, String> {
    if s == "broker" {
        return Ok(PinSource::Broker);
    }
    if let Some(name) = s.strip_prefix("env:") {
        let ok = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        return if ok {
            Ok(PinSource::Env(name.to_owned()))
        } else {
            Err(format!("{name:?} is not an environment variable name"))
        };
    }
    if let Some(path) = s.strip_prefix("file:") {
        let path = PathBuf::from(path);
        return if path.is_absolute() {
            Ok(PinSource::File(path))
        } else {
            Err("a PIN file must be an absolute path".into())
        };
    }
    // The value itself is never echoed: it may be a PIN written in by mistake.
    Err("expected \"broker\", \"env:NAME\" or \"file:/path\" (a PIN itself is never written in the configuration)".into())
}

/// A stable serial for a slot without one: derived from its id and label.
fn default_serial(id: u64, label: &str) -> String {
    // FNV-1a: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.to_le_bytes().iter().chain(label.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[log]
level = "debug"

[[slot]]
id = 0
label = "payments"
pin = "env:P11SHIM_PIN"
[[slot.member]]
library = "/usr/lib/softhsm/libsofthsm2.so"
token = "ha-a"
[[slot.member]]
library = "/usr/lib/softhsm/libsofthsm2.so"
uri = "pkcs11:token=ha-b"
weight = 2
standby = true
"#;

    fn err(text: &str) -> ConfigError {
        parse(Path::new("/etc/p.toml"), text).unwrap_err()
    }

    #[test]
    fn accepts_the_documented_schema() {
        let c = parse(Path::new("p.toml"), GOOD).unwrap();
        assert_eq!(c.log.level, LogLevel::Debug);
        assert_eq!(c.slots.len(), 1);
        let s = &c.slots[0];
        assert_eq!((s.id, s.label.as_str()), (0, "payments"));
        assert_eq!(s.pin, Some(PinSource::Env("P11SHIM_PIN".into())));
        assert_eq!(s.serial.len(), 16);
        assert_eq!(s.members[0].selector, TokenSelector::Label("ha-a".into()));
        assert!(
            matches!(&s.members[1].selector, TokenSelector::Uri(u) if u.token.as_deref() == Some("ha-b"))
        );
        assert_eq!((s.members[1].weight, s.members[1].standby), (2, true));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = err("[[slot]]\nid = 0\nlabel = \"a\"\nlabell = \"b\"\n");
        assert_eq!(e.line, Some(4));
        assert_eq!(e.key.as_deref(), Some("labell"));
        assert!(
            e.to_string()
                .starts_with("/etc/p.toml:4: key `labell`: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let e = err("[[slot]]\nid = \"zero\"\nlabel = \"a\"\n");
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("id")));
    }

    #[test]
    fn too_many_slots_are_refused() {
        let slot = |i: usize| {
            format!(
                "[[slot]]\nid = {i}\nlabel = \"s{i}\"\n[[slot.member]]\nlibrary = \"/x.so\"\ntoken = \"t{i}\"\n"
            )
        };
        let text: String = (0..=MAX_SLOTS).map(slot).collect();
        let e = err(&text);
        assert_eq!(e.key.as_deref(), Some("slot"));
        assert!(e.message.contains("at most 256"), "{}", e.message);
        let text: String = (0..MAX_SLOTS).map(slot).collect();
        assert!(parse(Path::new("/etc/p.toml"), &text).is_ok());
    }

    #[test]
    fn validation_errors_name_the_key() {
        let base = "[[slot]]\nid = 0\nlabel = \"a\"\n[[slot.member]]\nlibrary = \"/x.so\"\ntoken = \"t\"\n";
        let e = err(&format!(
            "{base}[[slot]]\nid = 0\nlabel = \"b\"\n[[slot.member]]\nlibrary = \"/x.so\"\ntoken = \"u\"\n"
        ));
        assert_eq!((e.line, e.key.as_deref()), (Some(8), Some("slot[1].id")));
        let e = err(
            "[[slot]]\nid = 0\nlabel = \"a\"\n[[slot.member]]\nlibrary = \"lib.so\"\ntoken = \"t\"\n",
        );
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(5), Some("slot[0].member[0].library"))
        );
        let e = err("[[slot]]\nid = 0\nlabel = \"a\"\n");
        assert_eq!(e.key.as_deref(), Some("slot[0].member"));
        let e = err(
            "[[slot]]\nid = 0\nlabel = \"a\"\npin = \"1234\"\n[[slot.member]]\nlibrary = \"/x.so\"\ntoken = \"t\"\n",
        );
        assert_eq!((e.line, e.key.as_deref()), (Some(4), Some("slot[0].pin")));
        assert!(
            !e.to_string().contains("1234"),
            "a mistyped PIN must not be echoed: {e}"
        );
        let e = err("[log]\nlevel = \"loud\"\n");
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("log.level")));
        let e = err(
            "[[slot]]\nid = 0\nlabel = \"a\"\n[[slot.member]]\nlibrary = \"/x.so\"\ntoken = \"t\"\nuri = \"pkcs11:token=t\"\n",
        );
        assert_eq!(e.key.as_deref(), Some("slot[0].member[0].uri"));
        let e = err(
            "[[slot]]\nid = 0\nlabel = \"a\"\n[[slot.member]]\nlibrary = \"/x.so\"\nuri = \"pkcs11:token=t?pin-value=99\"\n",
        );
        assert!(e.message.contains("pin-value"));
        assert!(err("").message.contains("no [[slot]]"));
        let long = "x".repeat(33);
        let e = err(&format!("[[slot]]\nid = 0\nlabel = \"{long}\"\n"));
        assert_eq!(e.key.as_deref(), Some("slot[0].label"));
    }

    #[test]
    fn the_annotated_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/p11shim.toml");
        let c = load(&path).unwrap();
        assert_eq!(c.slots[0].label, "payments");
        assert_eq!(c.slots[0].pin, Some(PinSource::Env("P11SHIM_PIN".into())));
        let Some(AclConfig::Config { role, policy, .. }) = &c.acl else {
            panic!("{:?}", c.acl)
        };
        assert_eq!((role.as_str(), policy.rules.len()), ("payments", 3));
    }

    #[test]
    fn metrics_section() {
        let base = "[[slot]]\nid = 0\nlabel = \"a\"\n[[slot.member]]\nlibrary = \"/x.so\"\ntoken = \"t\"\n";
        let c = parse(Path::new("p.toml"), base).unwrap();
        assert_eq!(c.metrics, None);
        let c = parse(
            Path::new("p.toml"),
            &format!(
                "{base}[metrics]\nfile = \"/var/lib/node_exporter/textfile/p11shim-{{pid}}.prom\"\nlabels = {{ service = \"payments\", zone = \"a\\\"b\" }}\n"
            ),
        )
        .unwrap();
        let m = c.metrics.unwrap();
        assert_eq!(m.interval_ms, 15_000);
        assert!(m.per_process());
        assert_eq!(
            m.file_for(42),
            PathBuf::from("/var/lib/node_exporter/textfile/p11shim-42.prom")
        );
        assert_eq!(
            m.labels,
            vec![
                ("service".to_owned(), "payments".to_owned()),
                ("zone".to_owned(), "a\"b".to_owned())
            ]
        );

        // Each mistake names its line and key, and says what is expected.
        let bad = |section: &str| err(&format!("{base}[metrics]\n{section}"));
        let e = bad("file = \"/m.prom\"\ninterval_ms = 999\n");
        assert_eq!(
            e.to_string(),
            "/etc/p.toml:9: key `metrics.interval_ms`: between 1000 and 3600000 (milliseconds)"
        );
        let e = bad("file = \"/m.prom\"\nlabels = { \"9x\" = \"v\" }\n");
        assert_eq!(
            e.to_string(),
            "/etc/p.toml:9: key `metrics.labels.9x`: \"9x\" is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
        );
        let e = bad("file = \"/m.prom\"\nlabels = { \"a-b\" = \"v\" }\n");
        assert_eq!(e.key.as_deref(), Some("metrics.labels.a-b"));
        let e = bad("file = \"/m.prom\"\nlabels = { __x = \"v\" }\n");
        assert!(e.message.contains("reserved by Prometheus"), "{e}");
        let e = bad("file = \"/m.prom\"\nlabels = { slot = \"v\" }\n");
        assert_eq!(e.message, "p11shim sets the label `slot` itself");
        let e = bad("file = \"/m.prom\"\nlabels = { x = \"\" }\n");
        assert_eq!(e.key.as_deref(), Some("metrics.labels.x"));
        let e = bad("file = \"metrics/p11shim.prom\"\n");
        assert_eq!(
            e.to_string(),
            "/etc/p.toml:8: key `metrics.file`: must be an absolute path"
        );
        let e = bad("file = \"/m.txt\"\n");
        assert!(e.message.contains("`.prom`"), "{e}");
        let e = bad("file = \"/d/{pid}/m.prom\"\n");
        assert!(e.message.contains("file name only"), "{e}");
        let e = bad("file = \"/m-{uid}.prom\"\n");
        assert_eq!(e.message, "the only placeholder is `{pid}`");
        let e = bad("file = \"/m.prom\"\nintervall_ms = 1000\n");
        assert_eq!((e.line, e.key.as_deref()), (Some(9), Some("intervall_ms")));
        let e = bad("interval_ms = 1000\n");
        assert!(e.message.contains("missing field `file`"), "{e}");
    }

    #[test]
    fn the_annotated_metrics_section_is_valid() {
        // The example's [metrics] section is commented out (it writes into
        // node_exporter's directory); uncommented, it must be valid.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/p11shim.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text.find("# [metrics]").expect("a [metrics] example");
        let section: String = text[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = parse(&path, &format!("{text}\n{section}")).unwrap();
        let m = c.metrics.expect("the uncommented section");
        assert_eq!(m.interval_ms, 15_000);
        assert!(m.per_process());
        assert_eq!(m.labels, vec![("service".into(), "payments".into())]);
    }

    #[test]
    fn pin_sources() {
        assert_eq!(
            parse_pin_source("env:A_B1"),
            Ok(PinSource::Env("A_B1".into()))
        );
        assert!(parse_pin_source("env:1A").is_err());
        assert!(parse_pin_source("file:rel/p").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "1234\n").unwrap();
        assert_eq!(&PinSource::File(p.clone()).read().unwrap()[..], b"1234");
        std::fs::write(&p, "\n").unwrap();
        assert!(PinSource::File(p).read().is_err());
        assert!(
            PinSource::Env("P11SHIM_TEST_SURELY_UNSET".into())
                .read()
                .is_err()
        );
    }

    #[test]
    fn locate_prefers_env_then_reserved() {
        // Only the reserved/default part is checked: the environment is shared by tests.
        if std::env::var_os(CONFIG_ENV).is_none() {
            assert_eq!(locate(Some("/a.toml")), PathBuf::from("/a.toml"));
            assert_eq!(locate(None), PathBuf::from(DEFAULT_PATH));
            assert_eq!(locate(Some("  ")), PathBuf::from(DEFAULT_PATH));
            assert_eq!(
                locate(Some("configdir='sql:/x' flags=readOnly")),
                PathBuf::from(DEFAULT_PATH)
            );
        }
    }
}

#[cfg(test)]
mod reference {
    //! `docs/config.md` is checked against the code: for every section, the
    //! keys the parser accepts (as its "unknown field" error lists them)
    //! must be exactly the keys the reference documents.

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// A minimal valid file, and where each section's probe goes.
    const BASE: &str = "[[slot]]\nid = 0\nlabel = \"s\"\n[[slot.member]]\nlibrary = \"/usr/lib/x.so\"\ntoken = \"t\"\n";

    fn accepted(section: &str) -> BTreeSet<String> {
        let text = match section {
            "" => format!("zz_probe = 1\n{BASE}"),
            "log" => format!("[log]\nzz_probe = 1\n{BASE}"),
            "slot" => "[[slot]]\nid = 0\nlabel = \"s\"\nzz_probe = 1\n".to_string(),
            "slot.member" => format!("{BASE}zz_probe = 1\n"),
            "broker" => format!("{BASE}[broker]\nzz_probe = 1\n"),
            "acl" => format!("{BASE}[acl]\nzz_probe = 1\n"),
            "audit" => format!("{BASE}[audit]\nzz_probe = 1\n"),
            "metrics" => format!("{BASE}[metrics]\nzz_probe = 1\n"),
            other => panic!("no probe for [{other}]"),
        };
        let e = super::parse(Path::new("probe.toml"), &text).unwrap_err();
        let msg = e.message;
        let list = msg
            .split_once("expected one of ")
            .or_else(|| msg.split_once("expected "))
            .map(|(_, l)| l)
            .unwrap_or_else(|| panic!("[{section}]: {msg}"));
        list.split(", ")
            .flat_map(|k| k.split(" or "))
            .map(|k| k.trim().trim_matches('`').to_string())
            .filter(|k| !k.is_empty())
            .collect()
    }

    /// `### [section]` headings and their `| `key` |` rows.
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
        let text = std::fs::read_to_string(&p).unwrap();
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut section = None;
        for line in text.lines() {
            if let Some(h) = line.strip_prefix("### ") {
                let h = h.trim().trim_matches('`');
                let h = h
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .trim_matches('[')
                    .trim_matches(']');
                section = Some(if h == "top level" {
                    String::new()
                } else {
                    h.to_string()
                });
                continue;
            }
            if let (Some(s), Some(row)) = (&section, line.strip_prefix("| `")) {
                if let Some((key, _)) = row.split_once('`') {
                    out.entry(s.clone()).or_default().insert(key.to_string());
                }
            }
        }
        out
    }

    #[test]
    fn the_reference_documents_every_key_and_no_other() {
        let doc = documented();
        for section in [
            "",
            "log",
            "slot",
            "slot.member",
            "broker",
            "acl",
            "audit",
            "metrics",
        ] {
            let code = accepted(section);
            let documented = doc.get(section).cloned().unwrap_or_default();
            assert_eq!(
                code, documented,
                "docs/config.md, section [{section}]: the parser accepts {code:?}"
            );
        }
    }
}
