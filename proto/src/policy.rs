//! A role's key ACL policy: the document the broker hands out with the
//! credentials (or the module's `[acl]` section holds), and its validated
//! form.
//!
//! A policy is a list of rules. A rule selects objects by their attributes
//! (label glob, `CKA_ID`, class, key type, `CKA_UNIQUE_ID`; every selector
//! given must match) and grants operations on them, optionally only with
//! some mechanisms. An object no rule selects does not exist for the role;
//! an operation no selecting rule grants is refused. Deny by default.
//!
//! ```toml
//! keys = [
//!   { label = "tls-*", ops = ["sign"], mechanisms = ["RSA_PKCS_PSS", "SHA256_RSA_PKCS_PSS"] },
//!   { label = "tls-*", class = "certificate" },          # visible, no operation
//!   { id = "a1b2", class = "secret-key", ops = ["encrypt", "decrypt"] },
//! ]
//! ```

use serde::{Deserialize, Serialize};

use crate::names;

/// The policy document as written (TOML in configs, JSON on the wire).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    #[serde(default)]
    pub keys: Vec<RuleDoc>,
    /// Keys whose use needs m-of-n approval (docs/quorum.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quorum: Vec<QuorumDoc>,
}

/// A quorum rule as written: the keys and operations it covers, and who
/// approves.
///
/// ```toml
/// quorum = [{ label = "ca-root*", ops = ["sign"], m = 2, approvers = ["alice", "bob", "carol"], wait_ms = 60000 }]
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuorumDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_id: Option<String>,
    /// Operations that need approval: sign, decrypt, unwrap, derive, wrap,
    /// destroy.
    pub ops: Vec<String>,
    /// Approvals needed.
    pub m: u32,
    /// Who may approve (names of the broker's `[approvers.<name>]`).
    pub approvers: Vec<String>,
    /// How long the application's call waits for approval (0: it returns
    /// `CKR_FUNCTION_REJECTED` at once, and succeeds when called again once
    /// approved). At most one hour.
    #[serde(default)]
    pub wait_ms: u64,
    /// How long a request stays open (seconds, 60 to 86400; default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
}

/// Operations a quorum rule may cover: those whose call p11shim can hold
/// until approval comes.
pub const QUORUM_OPS: [Op; 6] = [
    Op::Sign,
    Op::Decrypt,
    Op::Unwrap,
    Op::Derive,
    Op::Wrap,
    Op::Destroy,
];

/// A validated quorum rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quorum {
    /// Its selectors and the operations it covers (`mechanisms` unused).
    pub rule: Rule,
    pub m: u32,
    pub approvers: Vec<String>,
    pub wait_ms: u64,
    pub ttl_s: u64,
}

/// One rule as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    /// Glob over `CKA_LABEL`: `*` any run, `?` one character.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `CKA_ID` in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `data`, `certificate`, `public-key`, `private-key`, `secret-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// `rsa`, `ec`, `aes`, `generic-secret`, … or a `CKK_` name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<String>,
    /// `CKA_UNIQUE_ID` (PKCS#11 3.0) as the token reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_id: Option<String>,
    /// Operations granted; none makes the objects visible only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<String>,
    /// When given, the only mechanisms the granted operations may use
    /// (`CKM_` names, with or without the prefix, or hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanisms: Option<Vec<String>>,
}

/// What a role may do with an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Op {
    /// `C_SignInit`, `C_SignRecoverInit`, `C_MessageSignInit`.
    Sign,
    /// `C_VerifyInit`, `C_VerifyRecoverInit`, `C_MessageVerifyInit`.
    Verify,
    Encrypt,
    Decrypt,
    /// `C_WrapKey` with this key as the wrapping key.
    Wrap,
    /// `C_UnwrapKey`: the unwrapping key, and the object unwrapped.
    Unwrap,
    /// `C_DeriveKey`: the base key, and the object derived.
    Derive,
    /// `C_DigestKey` with this key as input.
    Digest,
    /// `C_GenerateKey(Pair)`: the objects generated.
    Generate,
    /// `C_CreateObject`.
    Create,
    /// `C_CopyObject`: the source, and the copy.
    Copy,
    /// `C_DestroyObject`.
    Destroy,
    /// `C_SetAttributeValue`: the object before and after.
    SetAttributes,
}

impl Op {
    pub const ALL: [Op; 13] = [
        Op::Sign,
        Op::Verify,
        Op::Encrypt,
        Op::Decrypt,
        Op::Wrap,
        Op::Unwrap,
        Op::Derive,
        Op::Digest,
        Op::Generate,
        Op::Create,
        Op::Copy,
        Op::Destroy,
        Op::SetAttributes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Sign => "sign",
            Op::Verify => "verify",
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Wrap => "wrap",
            Op::Unwrap => "unwrap",
            Op::Derive => "derive",
            Op::Digest => "digest",
            Op::Generate => "generate",
            Op::Create => "create",
            Op::Copy => "copy",
            Op::Destroy => "destroy",
            Op::SetAttributes => "set-attributes",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        let s = s.replace('_', "-");
        Op::ALL.into_iter().find(|o| o.name() == s)
    }

    /// The operation's bit in an [`OpSet`].
    pub fn bit(self) -> u16 {
        1 << self as u8
    }
}

/// A set of operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OpSet(pub u16);

impl OpSet {
    pub fn contains(self, op: Op) -> bool {
        self.0 & op.bit() != 0
    }
    pub fn insert(&mut self, op: Op) {
        self.0 |= op.bit();
    }
    pub fn iter(self) -> impl Iterator<Item = Op> {
        Op::ALL.into_iter().filter(move |o| self.contains(*o))
    }
}

/// A validated rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its position in the document, for explanations.
    pub index: usize,
    pub label: Option<Glob>,
    pub id: Option<Vec<u8>>,
    pub class: Option<u64>,
    pub key_type: Option<u64>,
    pub unique_id: Option<Vec<u8>>,
    pub ops: OpSet,
    /// Sorted; `None` = any mechanism.
    pub mechanisms: Option<Vec<u64>>,
}

/// A validated policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub quorum: Vec<Quorum>,
}

impl Policy {
    /// The quorum rule covering `op` on an object, if any (the first).
    pub fn quorum_for(&self, a: &Attrs, op: Op) -> Option<&Quorum> {
        self.quorum
            .iter()
            .find(|q| q.rule.ops.contains(op) && q.rule.mismatch(a).is_none())
    }
}

/// The attributes a rule can select on, as read from the token (or as a
/// template asks for them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attrs {
    pub class: Option<u64>,
    pub key_type: Option<u64>,
    pub id: Option<Vec<u8>>,
    pub label: Option<Vec<u8>>,
    pub unique_id: Option<Vec<u8>>,
}

impl Rule {
    /// `None` when the rule selects the object, else the first selector
    /// that does not match.
    pub fn mismatch(&self, a: &Attrs) -> Option<&'static str> {
        if let Some(g) = &self.label {
            if !a.label.as_deref().is_some_and(|l| g.matches(l)) {
                return Some("label");
            }
        }
        if self.id.is_some() && self.id != a.id {
            return Some("id");
        }
        if self.class.is_some() && self.class != a.class {
            return Some("class");
        }
        if self.key_type.is_some() && self.key_type != a.key_type {
            return Some("key_type");
        }
        if self.unique_id.is_some() && self.unique_id != a.unique_id {
            return Some("unique_id");
        }
        None
    }
}

/// A policy that does not validate: names the rule and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", self.path())]
pub struct PolicyError {
    pub rule: usize,
    pub field: &'static str,
    pub message: String,
}

impl PolicyError {
    /// `keys[1].ops`, `quorum[0].m`.
    pub fn path(&self) -> String {
        match self.field.strip_prefix("quorum") {
            Some("") => format!("quorum[{}]", self.rule),
            Some(rest) => format!("quorum[{}]{rest}", self.rule),
            None => format!("keys[{}].{}", self.rule, self.field),
        }
    }
}

impl PolicyDoc {
    /// Parses a policy from the JSON the broker sends (`null` or `{}` is the
    /// empty policy, which denies everything).
    pub fn from_json(v: &serde_json::Value) -> Result<PolicyDoc, String> {
        if v.is_null() {
            return Ok(PolicyDoc::default());
        }
        serde_json::from_value(v.clone()).map_err(|e| e.to_string())
    }

    pub fn validate(&self) -> Result<Policy, PolicyError> {
        let rules = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, r)| r.validate(i))
            .collect::<Result<_, _>>()?;
        let quorum = self
            .quorum
            .iter()
            .enumerate()
            .map(|(i, q)| q.validate(i))
            .collect::<Result<_, _>>()?;
        Ok(Policy { rules, quorum })
    }
}

impl RuleDoc {
    fn validate(&self, index: usize) -> Result<Rule, PolicyError> {
        let err = |field, message: String| PolicyError {
            rule: index,
            field,
            message,
        };
        let label = match &self.label {
            Some(g) => Some(Glob::new(g).map_err(|m| err("label", m))?),
            None => None,
        };
        let id = match &self.id {
            Some(h) => Some(hex_decode(h).ok_or_else(|| err("id", format!("{h:?} is not hex")))?),
            None => None,
        };
        let class = match &self.class {
            Some(c) => Some(
                names::class_value(c)
                    .ok_or_else(|| err("class", format!("unknown object class {c:?}")))?,
            ),
            None => None,
        };
        let key_type = match &self.key_type {
            Some(k) => Some(
                names::key_type_value(k)
                    .ok_or_else(|| err("key_type", format!("unknown key type {k:?}")))?,
            ),
            None => None,
        };
        let unique_id = self.unique_id.as_ref().map(|u| u.as_bytes().to_vec());
        let mut ops = OpSet::default();
        for o in &self.ops {
            let op = Op::parse(o).ok_or_else(|| {
                let all: Vec<_> = Op::ALL.iter().map(|o| o.name()).collect();
                err(
                    "ops",
                    format!("unknown operation {o:?} (one of: {})", all.join(", ")),
                )
            })?;
            ops.insert(op);
        }
        let mechanisms = match &self.mechanisms {
            Some(list) => {
                if list.is_empty() {
                    return Err(err(
                        "mechanisms",
                        "an empty list allows nothing; leave it out to allow any mechanism".into(),
                    ));
                }
                let mut v = list
                    .iter()
                    .map(|m| {
                        names::mechanism_value(m)
                            .ok_or_else(|| err("mechanisms", format!("unknown mechanism {m:?}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                v.sort_unstable();
                v.dedup();
                Some(v)
            }
            None => None,
        };
        Ok(Rule {
            index,
            label,
            id,
            class,
            key_type,
            unique_id,
            ops,
            mechanisms,
        })
    }
}

impl QuorumDoc {
    fn validate(&self, index: usize) -> Result<Quorum, PolicyError> {
        let err = |field, message: String| PolicyError {
            rule: index,
            field,
            message,
        };
        // The selectors and ops validate as a key rule's do; errors are
        // renamed to this list.
        let as_rule = RuleDoc {
            label: self.label.clone(),
            id: self.id.clone(),
            class: self.class.clone(),
            key_type: self.key_type.clone(),
            unique_id: self.unique_id.clone(),
            ops: self.ops.clone(),
            mechanisms: None,
        };
        let rule = as_rule.validate(index).map_err(|e| PolicyError {
            field: quorum_field(e.field),
            ..e
        })?;
        if rule.ops.0 == 0 {
            return Err(err(
                "quorum.ops",
                "list the operations that need approval".into(),
            ));
        }
        if let Some(op) = rule.ops.iter().find(|o| !QUORUM_OPS.contains(o)) {
            return Err(err(
                "quorum.ops",
                format!(
                    "{} cannot be held for approval (one of: sign, decrypt, unwrap, derive, wrap, destroy)",
                    op.name()
                ),
            ));
        }
        if rule.label.is_none()
            && rule.id.is_none()
            && rule.unique_id.is_none()
            && rule.class.is_none()
            && rule.key_type.is_none()
        {
            return Err(err(
                "quorum",
                "select the keys (label, id, unique_id, class or key_type)".into(),
            ));
        }
        let mut seen = Vec::new();
        for a in &self.approvers {
            let ok = !a.is_empty()
                && a.len() <= 64
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
            if !ok {
                return Err(err(
                    "quorum.approvers",
                    format!("{a:?}: approver names use [A-Za-z0-9._@-], at most 64"),
                ));
            }
            if seen.contains(&a) {
                return Err(err("quorum.approvers", format!("{a:?} is listed twice")));
            }
            seen.push(a);
        }
        if self.m == 0 || self.m as usize > self.approvers.len() {
            return Err(err(
                "quorum.m",
                format!(
                    "between 1 and the number of approvers ({})",
                    self.approvers.len()
                ),
            ));
        }
        if self.wait_ms > 3_600_000 {
            return Err(err("quorum.wait_ms", "at most 3600000 (one hour)".into()));
        }
        let ttl_s = self.ttl_s.unwrap_or(3600);
        if !(60..=86_400).contains(&ttl_s) {
            return Err(err("quorum.ttl_s", "between 60 and 86400".into()));
        }
        Ok(Quorum {
            rule,
            m: self.m,
            approvers: self.approvers.clone(),
            wait_ms: self.wait_ms,
            ttl_s,
        })
    }
}

fn quorum_field(f: &'static str) -> &'static str {
    match f {
        "label" => "quorum.label",
        "id" => "quorum.id",
        "class" => "quorum.class",
        "key_type" => "quorum.key_type",
        "ops" => "quorum.ops",
        other => other,
    }
}

/// A label glob: `*` matches any run of characters, `?` exactly one; every
/// other character matches itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    pattern: Vec<char>,
    text: String,
}

impl Glob {
    pub fn new(p: &str) -> Result<Glob, String> {
        if p.is_empty() {
            return Err("an empty glob matches only an empty label; use \"*\" for any".into());
        }
        Ok(Glob {
            pattern: p.chars().collect(),
            text: p.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the label matches. Linear in practice: the classic
    /// backtrack-to-last-star algorithm.
    pub fn matches(&self, label: &[u8]) -> bool {
        let Ok(label) = std::str::from_utf8(label) else {
            return false;
        };
        let t: Vec<char> = label.chars().collect();
        let p = &self.pattern;
        let (mut pi, mut ti) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
                pi += 1;
                ti += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, ti));
                pi += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        while pi < p.len() && p[pi] == '*' {
            pi += 1;
        }
        pi == p.len()
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = Glob::new("tls-*").unwrap();
        assert!(g.matches(b"tls-web"));
        assert!(g.matches(b"tls-"));
        assert!(!g.matches(b"db-key"));
        assert!(!g.matches(b"xtls-web"));
        let g = Glob::new("a?c*z").unwrap();
        assert!(g.matches(b"abcz"));
        assert!(g.matches(b"abc-yyy-z"));
        assert!(!g.matches(b"acz"));
        assert!(Glob::new("*").unwrap().matches(b""));
        assert!(Glob::new("**x").unwrap().matches(b"aax"));
        assert!(!Glob::new("exact").unwrap().matches(b"exact-not"));
        assert!(!Glob::new("x").unwrap().matches(&[0xff]));
    }

    #[test]
    fn a_document_validates_with_names_resolved() {
        let doc: PolicyDoc = toml::from_str(
            r#"keys = [
                { label = "tls-*", ops = ["sign"], mechanisms = ["RSA_PKCS_PSS", "CKM_SHA256_RSA_PKCS_PSS", "0x1"] },
                { id = "A1b2", class = "private-key", key_type = "rsa", ops = ["decrypt", "set_attributes"] },
            ]"#,
        )
        .unwrap();
        let p = doc.validate().unwrap();
        assert_eq!(p.rules.len(), 2);
        assert!(p.rules[0].ops.contains(Op::Sign));
        assert!(!p.rules[0].ops.contains(Op::Verify));
        assert_eq!(p.rules[0].mechanisms, Some(vec![0x1, 0xd, 0x43]));
        assert_eq!(p.rules[1].id, Some(vec![0xa1, 0xb2]));
        assert_eq!(p.rules[1].class, Some(3));
        assert_eq!(p.rules[1].key_type, Some(0));
        assert!(p.rules[1].ops.contains(Op::SetAttributes));
    }

    #[test]
    fn errors_name_the_rule_and_field() {
        let bad = |s: &str| -> String {
            let doc: PolicyDoc = toml::from_str(s).unwrap();
            doc.validate().unwrap_err().to_string()
        };
        assert_eq!(
            bad(r#"keys = [{ label = "a" }, { ops = ["sigh"] }]"#),
            "keys[1].ops: unknown operation \"sigh\" (one of: sign, verify, encrypt, decrypt, wrap, unwrap, derive, digest, generate, create, copy, destroy, set-attributes)"
        );
        assert!(bad(r#"keys = [{ id = "xyz" }]"#).starts_with("keys[0].id:"));
        assert!(bad(r#"keys = [{ class = "key" }]"#).starts_with("keys[0].class:"));
        assert!(bad(r#"keys = [{ key_type = "rsb" }]"#).starts_with("keys[0].key_type:"));
        assert!(
            bad(r#"keys = [{ mechanisms = ["RSA_PKCS_PSSS"] }]"#)
                .starts_with("keys[0].mechanisms:")
        );
        assert!(bad(r#"keys = [{ mechanisms = [] }]"#).contains("allows nothing"));
        assert!(toml::from_str::<PolicyDoc>(r#"keys = [{ lable = "x" }]"#).is_err());
    }

    #[test]
    fn quorum_rules() {
        let doc: PolicyDoc = toml::from_str(
            r#"keys = [{ label = "ca-*", ops = ["sign"] }]
            quorum = [{ label = "ca-root*", ops = ["sign", "destroy"], m = 2, approvers = ["alice", "bob", "carol"], wait_ms = 60000 }]"#,
        )
        .unwrap();
        let p = doc.validate().unwrap();
        let q = &p.quorum[0];
        assert_eq!((q.m, q.wait_ms, q.ttl_s), (2, 60000, 3600));
        let root = Attrs {
            label: Some(b"ca-root-2026".to_vec()),
            ..Attrs::default()
        };
        assert!(p.quorum_for(&root, Op::Sign).is_some());
        assert!(p.quorum_for(&root, Op::Verify).is_none());
        let other = Attrs {
            label: Some(b"ca-issuing".to_vec()),
            ..Attrs::default()
        };
        assert!(p.quorum_for(&other, Op::Sign).is_none());
        let bad = |q: &str| -> String {
            let doc: PolicyDoc = toml::from_str(&format!("quorum = [{q}]")).unwrap();
            doc.validate().unwrap_err().to_string()
        };
        assert_eq!(
            bad(r#"{ label = "k", ops = ["sign"], m = 3, approvers = ["a", "b"] }"#),
            "quorum[0].m: between 1 and the number of approvers (2)"
        );
        assert!(
            bad(r#"{ label = "k", ops = ["verify"], m = 1, approvers = ["a"] }"#)
                .starts_with("quorum[0].ops: verify cannot")
        );
        assert!(
            bad(r#"{ label = "k", ops = ["sign"], m = 1, approvers = ["a", "a"] }"#)
                .contains("listed twice")
        );
        assert!(
            bad(r#"{ ops = ["sign"], m = 1, approvers = ["a"] }"#)
                .starts_with("quorum[0]: select the keys")
        );
        assert!(
            bad(r#"{ label = "k", ops = ["sing"], m = 1, approvers = ["a"] }"#)
                .starts_with("quorum[0].ops: unknown")
        );
        assert!(
            bad(r#"{ label = "k", ops = ["sign"], m = 1, approvers = ["a b"] }"#)
                .starts_with("quorum[0].approvers")
        );
        assert!(
            bad(r#"{ label = "k", ops = ["sign"], m = 1, approvers = ["a"], ttl_s = 5 }"#)
                .starts_with("quorum[0].ttl_s")
        );
    }

    #[test]
    fn json_from_the_broker() {
        let v = serde_json::json!({"keys": [{"label": "x", "ops": ["sign"]}]});
        let p = PolicyDoc::from_json(&v).unwrap().validate().unwrap();
        assert_eq!(p.rules.len(), 1);
        assert_eq!(
            PolicyDoc::from_json(&serde_json::Value::Null).unwrap(),
            PolicyDoc::default()
        );
        assert!(PolicyDoc::from_json(&serde_json::json!({"key": []})).is_err());
    }
}
