//! `[acl]`: where the role's key ACL policy comes from.
//!
//! ```toml
//! [acl]
//! source = "config"          # or "broker": the policy of the broker's grant
//! role = "web"               # the role in force (source = "config")
//!
//! [acl.roles.web]
//! keys = [{ label = "tls-*", ops = ["sign"] }]
//! ```
//!
//! Without an `[acl]` section every object is visible and every operation
//! reaches the token (p11shim adds no policy of its own).

use std::collections::BTreeMap;

use p11shim_proto::policy::{Policy, PolicyDoc};
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Ctx};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcl {
    source: Option<Spanned<String>>,
    role: Option<Spanned<String>>,
    #[serde(default)]
    roles: BTreeMap<String, Spanned<PolicyDoc>>,
}

/// The validated `[acl]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AclConfig {
    /// The policy that comes with the broker's credentials; until they
    /// arrive every object is hidden.
    Broker,
    /// A role and its policy from this file.
    Config {
        /// The role in force.
        role: String,
        /// Its policy.
        policy: Policy,
        /// Every role of `[acl.roles]`, validated (the one in force
        /// included), for tools that explain another role's decisions.
        roles: BTreeMap<String, Policy>,
    },
}

pub(super) fn validate(
    ctx: &Ctx<'_>,
    raw: &Spanned<RawAcl>,
    has_broker: bool,
) -> Result<AclConfig, ConfigError> {
    let span = raw.span();
    let raw = raw.get_ref();
    let source = match &raw.source {
        Some(s) => match s.get_ref().as_str() {
            "broker" | "config" => s.get_ref().as_str(),
            other => {
                return Err(ctx.err(
                    Some(&s.span()),
                    "acl.source",
                    format!("unknown source {other:?} (expected \"broker\" or \"config\")"),
                ));
            }
        },
        None if has_broker && raw.role.is_none() => "broker",
        None => "config",
    };
    if source == "broker" {
        if !has_broker {
            return Err(ctx.err(
                raw.source.as_ref().map(|s| s.span()).as_ref(),
                "acl.source",
                "source = \"broker\" needs a [broker] section",
            ));
        }
        if let Some(r) = &raw.role {
            return Err(ctx.err(
                Some(&r.span()),
                "acl.role",
                "with source = \"broker\" the role is the broker's; leave role out",
            ));
        }
        if let Some((name, p)) = raw.roles.iter().next() {
            return Err(ctx.err(
                Some(&p.span()),
                format!("acl.roles.{name}"),
                "with source = \"broker\" the policy comes from the broker; leave [acl.roles] out",
            ));
        }
        return Ok(AclConfig::Broker);
    }
    let Some(role) = &raw.role else {
        return Err(ctx.err(
            Some(&span),
            "acl.role",
            "name the role whose policy applies (a key of [acl.roles])",
        ));
    };
    if !raw.roles.contains_key(role.get_ref()) {
        let known: Vec<_> = raw.roles.keys().map(String::as_str).collect();
        return Err(ctx.err(
            Some(&role.span()),
            "acl.role",
            format!(
                "no [acl.roles.{}] (defined: {})",
                role.get_ref(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        ));
    }
    // Every role's policy is checked, not only the one in force.
    let mut roles = BTreeMap::new();
    for (name, d) in &raw.roles {
        let p = d.get_ref().validate().map_err(|e| {
            ctx.err(
                Some(&d.span()),
                format!("acl.roles.{name}.{}", e.path()),
                e.message,
            )
        })?;
        if !p.quorum.is_empty() {
            return Err(ctx.err(
                Some(&d.span()),
                format!("acl.roles.{name}.quorum"),
                "quorum approvals live at the broker: use source = \"broker\" and put the rule in the broker's role policy",
            ));
        }
        roles.insert(name.clone(), p);
    }
    Ok(AclConfig::Config {
        role: role.get_ref().clone(),
        policy: roles.get(role.get_ref()).cloned().unwrap_or_default(),
        roles,
    })
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;
    use std::path::Path;

    const SLOT: &str = r#"
[[slot]]
id = 0
label = "s"
[[slot.member]]
library = "/usr/lib/softhsm/libsofthsm2.so"
token = "a"
"#;

    fn acl(extra: &str) -> Result<Option<AclConfig>, String> {
        parse(Path::new("p11shim.toml"), &format!("{SLOT}{extra}"))
            .map(|c| c.acl)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_role_from_the_file() {
        let a = acl(
            "[acl]\nrole = \"web\"\n[acl.roles.web]\nkeys = [{ label = \"tls-*\", ops = [\"sign\"] }]\n[acl.roles.db]\nkeys = []\n",
        )
        .unwrap();
        let Some(AclConfig::Config {
            role,
            policy,
            roles,
        }) = a
        else {
            panic!("{a:?}")
        };
        assert_eq!(role, "web");
        assert_eq!(policy.rules.len(), 1);
        assert_eq!(roles.keys().collect::<Vec<_>>(), ["db", "web"]);
        assert_eq!(roles["web"], policy);
        assert!(roles["db"].rules.is_empty());
        assert_eq!(acl("").unwrap(), None);
    }

    #[test]
    fn errors_point_at_the_key() {
        let e = acl("[acl]\nrole = \"web\"\n[acl.roles.db]\nkeys = []\n").unwrap_err();
        assert_eq!(
            e,
            "p11shim.toml:9: key `acl.role`: no [acl.roles.web] (defined: db)"
        );
        let e = acl(
            "[acl]\nrole = \"web\"\n[acl.roles.web]\nkeys = []\n[acl.roles.db]\nkeys = [{ ops = [\"sing\"] }]\n",
        )
        .unwrap_err();
        assert!(
            e.contains("key `acl.roles.db.keys[0].ops`: unknown operation \"sing\""),
            "{e}"
        );
        let e = acl("[acl]\nsource = \"broker\"\n").unwrap_err();
        assert!(
            e.ends_with("source = \"broker\" needs a [broker] section"),
            "{e}"
        );
        let e = acl("[acl]\nsource = \"ldap\"\n").unwrap_err();
        assert!(e.contains("unknown source \"ldap\""), "{e}");
        let e = acl("[acl]\n").unwrap_err();
        assert!(e.contains("key `acl.role`"), "{e}");
    }
}
