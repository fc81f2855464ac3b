//! The provisioning plan of `p11shim provision`: a raw TOML form, then a
//! validated model tied to the module configuration it names. Secrets are
//! only ever named here (`file:` or `env:` sources, as in the module
//! configuration); they are read when needed and held in zeroizing memory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use p11shim::config::{Config, PinSource, SlotConfig, TokenSelector};
use serde::Deserialize;
use zeroize::Zeroizing;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    config: PathBuf,
    #[serde(default)]
    slots: Option<Vec<u64>>,
    #[serde(default)]
    replication: RawReplication,
    #[serde(default, rename = "member")]
    members: Vec<RawMember>,
    #[serde(default, rename = "key")]
    keys: Vec<RawKey>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    token: String,
    #[serde(default)]
    init: bool,
    so_pin: Option<String>,
    pin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    label: String,
    id: String,
    #[serde(rename = "type")]
    kind: String,
    bits: Option<u32>,
    curve: Option<String>,
    import: Option<PathBuf>,
    usage: Option<Vec<String>>,
}

/// The validated plan.
#[derive(Debug)]
pub struct Plan {
    pub file: PathBuf,
    /// The module configuration, loaded by the module's own loader.
    pub config: Config,
    /// Indexes into `config.slots` of the slots provisioned.
    pub slots: Vec<usize>,
    /// The replication key's value (32 bytes) when given; otherwise one is
    /// generated here when a member lacks it and no member has it yet.
    pub replication_value: Option<SecretRef>,
    pub members: Vec<MemberPlan>,
    pub keys: Vec<KeySpec>,
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretRef::Env(n) => write!(f, "env:{n}"),
            SecretRef::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl SecretRef {
    fn parse(s: &str) -> Result<SecretRef, String> {
        if let Some(n) = s.strip_prefix("env:").filter(|n| !n.is_empty()) {
            Ok(SecretRef::Env(n.to_owned()))
        } else if let Some(p) = s.strip_prefix("file:").filter(|p| p.starts_with('/')) {
            Ok(SecretRef::File(PathBuf::from(p)))
        } else {
            Err("a secret is given as \"file:/absolute/path\" or \"env:NAME\", never inline".into())
        }
    }

    /// The raw bytes (for a PIN, without a trailing line end).
    pub fn read(&self, strip_newline: bool) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut v = match self {
            SecretRef::Env(n) => Zeroizing::new(
                std::env::var_os(n)
                    .map(std::os::unix::ffi::OsStringExt::into_vec)
                    .ok_or_else(|| format!("environment variable {n} is not set"))?,
            ),
            SecretRef::File(p) => Zeroizing::new(
                std::fs::read(p)
                    .map_err(|e| format!("cannot read {}: {}", p.display(), e.kind()))?,
            ),
        };
        if strip_newline {
            while matches!(v.last(), Some(b'\n' | b'\r')) {
                v.pop();
            }
        }
        if v.is_empty() {
            return Err(format!("{self} is empty"));
        }
        Ok(v)
    }
}

/// What to do with one member token, matched by its label.
#[derive(Debug)]
pub struct MemberPlan {
    pub token: String,
    pub init: bool,
    pub so_pin: Option<SecretRef>,
    pub pin: Option<SecretRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa { bits: u32 },
    Ec { curve: Curve },
    Aes { bits: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    P256,
    P384,
    P521,
}

impl Curve {
    /// DER of the named curve's OID (`CKA_EC_PARAMS`).
    pub fn params(self) -> &'static [u8] {
        match self {
            Curve::P256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            Curve::P384 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
            Curve::P521 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23],
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Curve::P256 => "p256",
            Curve::P384 => "p384",
            Curve::P521 => "p521",
        }
    }
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyKind::Rsa { bits } => write!(f, "RSA-{bits}"),
            KeyKind::Ec { curve } => write!(f, "EC {}", curve.name()),
            KeyKind::Aes { bits } => write!(f, "AES-{bits}"),
        }
    }
}

/// What a key may be used for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub sign: bool,
    pub verify: bool,
    pub encrypt: bool,
    pub decrypt: bool,
    pub wrap: bool,
    pub unwrap: bool,
    pub derive: bool,
}

/// One key put on every member.
#[derive(Debug, Clone)]
pub struct KeySpec {
    pub label: String,
    pub id: Vec<u8>,
    pub kind: KeyKind,
    /// A PKCS#8 (or traditional) PEM private key imported on every member;
    /// `None`: generated on one member and copied under the replication key.
    pub import: Option<PathBuf>,
    pub usage: Usage,
}

impl KeySpec {
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The token label a member selector names.
pub fn selector_label(s: &TokenSelector) -> Option<&str> {
    match s {
        TokenSelector::Label(l) => Some(l),
        TokenSelector::Uri(u) => u.token.as_deref(),
    }
}

/// Reads and validates a plan and the module configuration it names.
pub fn load(path: &Path) -> Result<Plan, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the plan: {e}", path.display()))?;
    let raw: RawPlan = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        match line {
            Some(l) => format!("{}:{l}: {}", path.display(), e.message().trim()),
            None => format!("{}: {}", path.display(), e.message().trim()),
        }
    })?;
    let at = |key: &str, msg: String| format!("{}: key `{key}`: {msg}", path.display());
    let cfg_path = if raw.config.is_absolute() {
        raw.config.clone()
    } else {
        path.parent().unwrap_or(Path::new(".")).join(&raw.config)
    };
    let config = p11shim::config::load(&cfg_path).map_err(|e| e.to_string())?;
    let slots: Vec<usize> = match &raw.slots {
        None => (0..config.slots.len()).collect(),
        Some(ids) => ids
            .iter()
            .map(|id| {
                config
                    .slots
                    .iter()
                    .position(|s| s.id == *id)
                    .ok_or_else(|| at("slots", format!("no slot {id} in {}", cfg_path.display())))
            })
            .collect::<Result<_, _>>()?,
    };
    if slots.is_empty() {
        return Err(at("slots", "no slot to provision".into()));
    }
    let replication_value = raw
        .replication
        .value
        .as_deref()
        .map(SecretRef::parse)
        .transpose()
        .map_err(|m| at("replication.value", m))?;
    let labels: BTreeSet<&str> = slots
        .iter()
        .flat_map(|&i| config.slots[i].members.iter())
        .filter_map(|m| selector_label(&m.selector))
        .collect();
    let mut members = Vec::new();
    for (i, m) in raw.members.iter().enumerate() {
        let key = |k: &str| format!("member[{i}].{k}");
        if !labels.contains(m.token.as_str()) {
            return Err(at(
                &key("token"),
                format!("{:?} is not a member of the slots provisioned", m.token),
            ));
        }
        if members.iter().any(|p: &MemberPlan| p.token == m.token) {
            return Err(at(&key("token"), format!("{:?} is listed twice", m.token)));
        }
        let so_pin = m
            .so_pin
            .as_deref()
            .map(SecretRef::parse)
            .transpose()
            .map_err(|e| at(&key("so_pin"), e))?;
        let pin = m
            .pin
            .as_deref()
            .map(SecretRef::parse)
            .transpose()
            .map_err(|e| at(&key("pin"), e))?;
        if m.init && (so_pin.is_none() || pin.is_none()) {
            return Err(at(
                &key("init"),
                "initializing a token needs so_pin and pin".into(),
            ));
        }
        members.push(MemberPlan {
            token: m.token.clone(),
            init: m.init,
            so_pin,
            pin,
        });
    }
    let mut keys: Vec<KeySpec> = Vec::new();
    for (i, k) in raw.keys.iter().enumerate() {
        let key = |n: &str| format!("key[{i}].{n}");
        if k.label.is_empty() || k.label.len() > 64 {
            return Err(at(&key("label"), "1 to 64 bytes".into()));
        }
        let id = hex(&k.id).ok_or_else(|| at(&key("id"), "hex bytes, e.g. \"01\"".into()))?;
        if keys.iter().any(|o| o.label == k.label || o.id == id) {
            return Err(at(
                &key("label"),
                "two keys with the same label or id".into(),
            ));
        }
        let kind = match k.kind.as_str() {
            "rsa" => match k.bits.unwrap_or(2048) {
                b @ (2048 | 3072 | 4096) => KeyKind::Rsa { bits: b },
                b => {
                    return Err(at(
                        &key("bits"),
                        format!("{b}: RSA keys are 2048, 3072 or 4096 bits"),
                    ));
                }
            },
            "ec" => KeyKind::Ec {
                curve: match k.curve.as_deref().unwrap_or("p256") {
                    "p256" | "prime256v1" | "secp256r1" => Curve::P256,
                    "p384" | "secp384r1" => Curve::P384,
                    "p521" | "secp521r1" => Curve::P521,
                    c => return Err(at(&key("curve"), format!("{c:?}: p256, p384 or p521"))),
                },
            },
            "aes" => match k.bits.unwrap_or(256) {
                b @ (128 | 192 | 256) => KeyKind::Aes { bits: b },
                b => {
                    return Err(at(
                        &key("bits"),
                        format!("{b}: AES keys are 128, 192 or 256 bits"),
                    ));
                }
            },
            t => return Err(at(&key("type"), format!("{t:?}: rsa, ec or aes"))),
        };
        if k.import.is_some() && matches!(kind, KeyKind::Aes { .. }) {
            return Err(at(
                &key("import"),
                "only RSA and EC keys are imported from PEM".into(),
            ));
        }
        if k.bits.is_some() && matches!(kind, KeyKind::Ec { .. }) {
            return Err(at(&key("bits"), "EC keys take a curve, not bits".into()));
        }
        if let Some(p) = &k.import
            && !p.is_absolute()
        {
            return Err(at(&key("import"), "an absolute path".into()));
        }
        let usage = match &k.usage {
            None => match kind {
                KeyKind::Rsa { .. } => Usage {
                    sign: true,
                    verify: true,
                    encrypt: true,
                    decrypt: true,
                    ..Usage::default()
                },
                KeyKind::Ec { .. } => Usage {
                    sign: true,
                    verify: true,
                    ..Usage::default()
                },
                KeyKind::Aes { .. } => Usage {
                    encrypt: true,
                    decrypt: true,
                    ..Usage::default()
                },
            },
            Some(list) => {
                let mut u = Usage::default();
                for name in list {
                    match name.as_str() {
                        "sign" => u.sign = true,
                        "verify" => u.verify = true,
                        "encrypt" => u.encrypt = true,
                        "decrypt" => u.decrypt = true,
                        "wrap" => u.wrap = true,
                        "unwrap" => u.unwrap = true,
                        "derive" => u.derive = true,
                        n => {
                            return Err(at(
                                &key("usage"),
                                format!(
                                    "{n:?}: sign, verify, encrypt, decrypt, wrap, unwrap or derive"
                                ),
                            ));
                        }
                    }
                }
                u
            }
        };
        keys.push(KeySpec {
            label: k.label.clone(),
            id,
            kind,
            import: k.import.clone(),
            usage,
        });
    }
    for &si in &slots {
        let s: &SlotConfig = &config.slots[si];
        if s.members.len() > 1
            && s.replication_key.is_none()
            && keys.iter().any(|k| k.import.is_none())
        {
            return Err(format!(
                "{}: slot {} has {} members and no replication_key: generated keys could not reach every member",
                cfg_path.display(),
                s.id,
                s.members.len()
            ));
        }
        for m in &s.members {
            if selector_label(&m.selector).is_none() {
                return Err(format!(
                    "{}: slot {}: member {} names no token label; provision finds members by label",
                    cfg_path.display(),
                    s.id,
                    m.selector
                ));
            }
        }
    }
    Ok(Plan {
        file: path.to_path_buf(),
        config,
        slots,
        replication_value,
        members,
        keys,
    })
}

impl Plan {
    pub fn member(&self, token: &str) -> Option<&MemberPlan> {
        self.members.iter().find(|m| m.token == token)
    }

    /// Where a member's user PIN comes from: the plan's, else the slot's.
    pub fn user_pin_source(&self, slot: &SlotConfig, token: &str) -> Option<PinRef> {
        if let Some(p) = self.member(token).and_then(|m| m.pin.clone()) {
            return Some(PinRef::Plan(p));
        }
        slot.pin.clone().map(PinRef::Module)
    }
}

/// A user PIN's source: the plan, or the slot's own `pin` (which may be
/// the broker).
#[derive(Debug, Clone)]
pub enum PinRef {
    Plan(SecretRef),
    Module(PinSource),
}

impl std::fmt::Display for PinRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinRef::Plan(s) => s.fmt(f),
            PinRef::Module(s) => s.fmt(f),
        }
    }
}
