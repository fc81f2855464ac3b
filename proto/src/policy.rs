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
}

/// A policy that does not validate: names the rule and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("keys[{rule}].{field}: {message}")]
pub struct PolicyError {
    pub rule: usize,
    pub field: &'static str,
    pub message: String,
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
        Ok(Policy { rules })
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
