//! `p11shim acl explain ROLE KEY OP`: what the module's key ACL decides
//! for a role, a key and an operation, and why, rule by rule.
//!
//! The decision is the module's own code (`p11shim::policy`: `Acl::grant`
//! and `Grant::check`, or `Acl::may_create` for the operations that make
//! an object), over the role's rules from the module's `[acl.roles]` or
//! from a broker role's `policy`. The key is given by its attributes, or
//! with `--token-key` as a `pkcs11:` URI read from a member token of the
//! module's configuration (its vendor library loaded directly), so an
//! operator can ask about a real key.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use p11shim::config::{Config, MemberConfig, PinSource, Pkcs11Uri, SlotConfig, TokenSelector};
use p11shim::policy::{Acl, Attrs, Denial, Op, Policy, Rule, RuleVerdict};
use p11shim_proto::names;
use pkcs11_sys::{
    CK_RV, CKO_CERTIFICATE, CKO_DATA, CKO_PRIVATE_KEY, CKO_PUBLIC_KEY, CKO_SECRET_KEY,
    CKR_KEY_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID, CKR_TEMPLATE_INCONSISTENT,
    CKR_UNWRAPPING_KEY_HANDLE_INVALID, CKR_WRAPPING_KEY_HANDLE_INVALID,
};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::CliError;
use crate::output::{Style, print_json};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The role: a key of the module's [acl.roles], or with --broker a
    /// role of the broker's configuration.
    pub role: String,
    /// The key: attributes `label=tls-web,class=private-key,key_type=rsa,id=01`
    /// (also `unique_id=`), or with --token-key a `pkcs11:` URI
    /// (`object=`, `id=`, `type=`, and `token=` naming a virtual slot or a
    /// member token).
    pub key: String,
    /// The operation: sign, verify, encrypt, decrypt, wrap, unwrap, derive,
    /// digest, generate, create, copy, destroy, set-attributes.
    #[arg(value_parser = parse_op)]
    pub op: Op,
    /// The mechanism the call would use (`CKM_` name, with or without the
    /// prefix, or a number).
    #[arg(long, value_name = "M", value_parser = parse_mechanism)]
    pub mechanism: Option<u64>,
    /// The module's configuration (default: what the module reads:
    /// $P11SHIM_CONFIG, else /etc/p11shim/p11shim.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Take the role's rules from this broker configuration (its
    /// `policy`) instead of the module's [acl.roles].
    #[arg(long, value_name = "FILE")]
    pub broker: Option<PathBuf>,
    /// KEY is a `pkcs11:` URI: read the object's attributes from a member
    /// token of the module's configuration (logging in with the slot's
    /// configured PIN source when it has one; never a PIN on the command
    /// line).
    #[arg(long)]
    pub token_key: bool,
    /// With --token-key: the virtual slot whose members are searched.
    #[arg(long, value_name = "ID", requires = "token_key")]
    pub slot: Option<u64>,
    /// Print the explanation as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_op(s: &str) -> Result<Op, String> {
    Op::parse(s).ok_or_else(|| {
        let all: Vec<_> = Op::ALL.iter().map(|o| o.name()).collect();
        format!("unknown operation {s:?} (one of: {})", all.join(", "))
    })
}

fn parse_mechanism(s: &str) -> Result<u64, String> {
    names::mechanism_value(s).ok_or_else(|| format!("unknown mechanism {s:?}"))
}

fn usage(m: impl Into<String>) -> CliError {
    CliError::Usage(m.into())
}

fn tok(e: impl std::fmt::Display) -> CliError {
    CliError::Token(e.to_string())
}

// ---------------------------------------------------------------------------
// The key, as attributes.

/// `label=…,class=…,key_type=…,id=…,unique_id=…`. A segment that does not
/// start with a known `name=` continues the previous value, so a label may
/// hold commas (unless followed by one of these names).
pub fn parse_attrs(s: &str) -> Result<Attrs, CliError> {
    const NAMES: [&str; 6] = ["label", "class", "key_type", "key-type", "id", "unique_id"];
    let mut pairs: Vec<(&str, String)> = Vec::new();
    for seg in s.split(',') {
        let known = seg
            .split_once('=')
            .filter(|(n, _)| NAMES.contains(&n.trim()));
        match (known, pairs.last_mut()) {
            (Some((n, v)), _) => pairs.push((n.trim(), v.to_owned())),
            (None, Some((_, v))) => {
                v.push(',');
                v.push_str(seg);
            }
            (None, None) => {
                return Err(usage(format!(
                    "KEY: {seg:?} is not name=value (names: label, class, key_type, id, unique_id); with --token-key KEY is a pkcs11: URI"
                )));
            }
        }
    }
    let mut a = Attrs::default();
    for (n, v) in pairs {
        let dup = match n {
            "label" => a.label.replace(v.as_bytes().to_vec()).is_some(),
            "class" => {
                let c = names::class_value(&v).ok_or_else(|| {
                    usage(format!(
                        "KEY: unknown class {v:?} (data, certificate, public-key, private-key, secret-key)"
                    ))
                })?;
                a.class.replace(c).is_some()
            }
            "key_type" | "key-type" => {
                let k = names::key_type_value(&v)
                    .ok_or_else(|| usage(format!("KEY: unknown key type {v:?}")))?;
                a.key_type.replace(k).is_some()
            }
            "id" => {
                let id =
                    hex_decode(&v).ok_or_else(|| usage(format!("KEY: id {v:?} is not hex")))?;
                a.id.replace(id).is_some()
            }
            _ => a.unique_id.replace(v.as_bytes().to_vec()).is_some(),
        };
        if dup {
            return Err(usage(format!("KEY: {n} given twice")));
        }
    }
    Ok(a)
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

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

// ---------------------------------------------------------------------------
// The key, from a token.

/// What a `pkcs11:` URI says about an object and its token.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ObjectUri {
    pub object: Option<Vec<u8>>,
    pub id: Option<Vec<u8>>,
    pub class: Option<u64>,
    /// The token-identifying attributes, when any.
    pub token: Option<Pkcs11Uri>,
}

fn percent_decode(s: &str) -> Result<Vec<u8>, CliError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let v = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| usage(format!("KEY: bad percent-encoding in {s:?}")))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Parses an RFC 7512 object URI: `object=`, `id=`, `type=` here, the
/// token's attributes by the module's own member-URI parser.
pub fn parse_object_uri(s: &str) -> Result<ObjectUri, CliError> {
    let rest = s
        .strip_prefix("pkcs11:")
        .ok_or_else(|| usage("KEY: with --token-key, a URI starting with \"pkcs11:\""))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    for item in query.split('&').filter(|i| !i.is_empty()) {
        let name = item.split_once('=').map_or(item, |(n, _)| n);
        if name == "pin-value" || name == "pin-source" {
            return Err(usage(format!(
                "KEY: {name} is refused: the PIN is read from the slot's configured source, never from the command line"
            )));
        }
    }
    let mut uri = ObjectUri::default();
    let mut token_items = Vec::new();
    for item in path.split(';').filter(|i| !i.is_empty()) {
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| usage(format!("KEY: URI attribute {item:?} has no value")))?;
        let twice = match name {
            "object" => uri.object.replace(percent_decode(value)?).is_some(),
            "id" => uri.id.replace(percent_decode(value)?).is_some(),
            "type" => {
                let c = match value {
                    "private" => CKO_PRIVATE_KEY,
                    "public" => CKO_PUBLIC_KEY,
                    "secret-key" => CKO_SECRET_KEY,
                    "cert" => CKO_CERTIFICATE,
                    "data" => CKO_DATA,
                    other => {
                        return Err(usage(format!(
                            "KEY: type={other} (RFC 7512: private, public, secret-key, cert, data)"
                        )));
                    }
                };
                uri.class.replace(c as u64).is_some()
            }
            _ => {
                token_items.push(item);
                false
            }
        };
        if twice {
            return Err(usage(format!("KEY: URI attribute {name:?} given twice")));
        }
    }
    if uri.object.is_none() && uri.id.is_none() {
        return Err(usage(
            "KEY: the URI names no object (give object= and/or id=)",
        ));
    }
    if !token_items.is_empty() {
        let t = Pkcs11Uri::parse(&format!("pkcs11:{}", token_items.join(";")))
            .map_err(|e| usage(format!("KEY: {e}")))?;
        uri.token = Some(t);
    }
    Ok(uri)
}

/// Where a token key was read.
#[derive(Debug)]
struct Found {
    attrs: Attrs,
    slot: u64,
    member: String,
    /// Said when the search could not see private objects.
    notes: Vec<String>,
}

/// The members to search: the slot of `--slot`, else the virtual slot
/// whose label is the URI's `token=`, else every slot's members filtered
/// by the URI's token attributes.
fn candidates<'c>(
    cfg: &'c Config,
    uri: &ObjectUri,
    slot: Option<u64>,
) -> Result<Vec<(&'c SlotConfig, &'c MemberConfig, bool)>, CliError> {
    let all = |s: &'c SlotConfig, filter: bool| s.members.iter().map(move |m| (s, m, filter));
    if let Some(id) = slot {
        let s = cfg.slots.iter().find(|s| s.id == id).ok_or_else(|| {
            usage(format!(
                "--slot {id}: no such slot in {}",
                cfg.source.display()
            ))
        })?;
        return Ok(all(s, uri.token.is_some()).collect());
    }
    if let Some(label) = uri.token.as_ref().and_then(|t| t.token.as_deref())
        && let Some(s) = cfg.slots.iter().find(|s| s.label == label)
    {
        return Ok(all(s, false).collect());
    }
    if uri.token.is_none() && cfg.slots.len() > 1 {
        return Err(usage(format!(
            "{} has {} slots: name one with --slot or the URI's token=",
            cfg.source.display(),
            cfg.slots.len()
        )));
    }
    Ok(cfg
        .slots
        .iter()
        .flat_map(|s| all(s, uri.token.is_some()))
        .collect())
}

/// Whether the token in `slot` is the member's, and (with `uri`) also
/// what the URI's token attributes say. Mirrors the module's own member
/// resolution.
fn token_matches(
    ctx: &Pkcs11,
    slot: Slot,
    sel: &TokenSelector,
    uri: Option<&Pkcs11Uri>,
) -> Result<bool, CliError> {
    let ti = ctx.get_token_info(slot).map_err(tok)?;
    if !ti.token_initialized() {
        return Ok(false);
    }
    let uri_ok = |u: &Pkcs11Uri| -> Result<bool, CliError> {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        let mut ok = eq(&u.token, ti.label())
            && eq(&u.manufacturer, ti.manufacturer_id())
            && eq(&u.serial, ti.serial_number())
            && eq(&u.model, ti.model())
            && u.slot_id.is_none_or(|s| s == slot.id());
        if ok && (u.slot_description.is_some() || u.slot_manufacturer.is_some()) {
            let si = ctx.get_slot_info(slot).map_err(tok)?;
            ok = eq(&u.slot_description, si.slot_description())
                && eq(&u.slot_manufacturer, si.manufacturer_id());
        }
        if ok && (u.library_manufacturer.is_some() || u.library_description.is_some()) {
            let li = ctx.get_library_info().map_err(tok)?;
            ok = eq(&u.library_manufacturer, li.manufacturer_id())
                && eq(&u.library_description, li.library_description());
        }
        Ok(ok)
    };
    let member = match sel {
        TokenSelector::Label(l) => ti.label() == l,
        TokenSelector::Uri(u) => uri_ok(u)?,
    };
    Ok(member && uri.map_or(Ok(true), uri_ok)?)
}

fn find(s: &Session, uri: &ObjectUri) -> Result<Vec<ObjectHandle>, CliError> {
    let mut t = Vec::new();
    if let Some(l) = &uri.object {
        t.push(Attribute::Label(l.clone()));
    }
    if let Some(id) = &uri.id {
        t.push(Attribute::Id(id.clone()));
    }
    if let Some(c) = uri.class {
        t.push(Attribute::Class(
            ObjectClass::try_from(c as pkcs11_sys::CK_OBJECT_CLASS).map_err(tok)?,
        ));
    }
    s.find_objects(&t).map_err(tok)
}

fn login(s: &Session, pin: &Zeroizing<Vec<u8>>, src: &str) -> Result<(), CliError> {
    let text = std::str::from_utf8(pin)
        .map_err(|_| CliError::Token(format!("the PIN from {src} is not UTF-8")))?;
    match s.login(UserType::User, Some(&AuthPin::new(Box::from(text)))) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
            Ok(())
        }
        Err(e) => Err(CliError::Token(format!(
            "login with the PIN from {src}: {e}"
        ))),
    }
}

fn object_attrs(s: &Session, o: ObjectHandle) -> Result<Attrs, CliError> {
    let mut a = Attrs::default();
    let want = [
        AttributeType::Class,
        AttributeType::KeyType,
        AttributeType::Id,
        AttributeType::Label,
        AttributeType::UniqueId,
    ];
    for attr in s.get_attributes(o, &want).map_err(tok)? {
        match attr {
            Attribute::Class(c) => a.class = Some(pkcs11_sys::CK_OBJECT_CLASS::from(c) as u64),
            Attribute::KeyType(k) => a.key_type = Some(pkcs11_sys::CK_KEY_TYPE::from(k) as u64),
            Attribute::Id(v) => a.id = Some(v),
            Attribute::Label(v) => a.label = Some(v),
            Attribute::UniqueId(v) => a.unique_id = Some(v),
            _ => {}
        }
    }
    Ok(a)
}

fn describe(a: &Attrs) -> String {
    let mut parts = Vec::new();
    if let Some(c) = a.class {
        parts.push(format!("class={}", class_text(c)));
    }
    if let Some(k) = a.key_type {
        parts.push(format!("key_type={}", key_type_text(k)));
    }
    if let Some(id) = &a.id {
        parts.push(format!("id={}", hex(id)));
    }
    if let Some(l) = &a.label {
        parts.push(format!("label={:?}", String::from_utf8_lossy(l)));
    }
    if let Some(u) = &a.unique_id {
        parts.push(format!("unique_id={:?}", String::from_utf8_lossy(u)));
    }
    parts.join(" ")
}

/// One member: its library loaded, the token found, the object searched
/// (logged in with the slot's PIN source when it has one, or for a
/// `broker` PIN only when nothing was found without).
fn search_member(
    cfg: &Config,
    slot: &SlotConfig,
    m: &MemberConfig,
    uri: &ObjectUri,
    filter: bool,
) -> Result<Option<Found>, CliError> {
    let lib = &m.library;
    let ctx = Pkcs11::new(lib).map_err(|e| tok(format!("cannot load {}: {e}", lib.display())))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| tok(format!("{}: C_Initialize: {e}", lib.display())))?;
    let result = (|| {
        let mut token = None;
        for s in ctx.get_slots_with_token().map_err(tok)? {
            if token_matches(&ctx, s, &m.selector, uri.token.as_ref().filter(|_| filter))? {
                token = Some(s);
                break;
            }
        }
        let Some(token) = token else {
            return Ok(None);
        };
        let session = ctx.open_ro_session(token).map_err(tok)?;
        let mut notes = Vec::new();
        match &slot.pin {
            Some(p @ (PinSource::Env(_) | PinSource::File(_))) => {
                let pin = p.read().map_err(CliError::Token)?;
                login(&session, &pin, &p.to_string())?;
            }
            Some(PinSource::Broker) => {}
            None => notes.push(format!(
                "slot {} has no PIN source (applications give the PIN): private objects were not searched",
                slot.id
            )),
        }
        let mut found = find(&session, uri)?;
        if found.is_empty() && slot.pin == Some(PinSource::Broker) {
            let b = cfg
                .broker
                .as_ref()
                .ok_or_else(|| tok("pin = \"broker\" but the configuration has no [broker]"))?;
            let g = p11shim::credentials::exchange_once(b).map_err(tok)?;
            login(&session, &g.pin, "the broker")?;
            notes.push("logged in with the PIN from one broker exchange".into());
            found = find(&session, uri)?;
        }
        match found.as_slice() {
            [] => Ok(None),
            [o] => Ok(Some(Found {
                attrs: object_attrs(&session, *o)?,
                slot: slot.id,
                member: format!("{} in {}", m.selector, lib.display()),
                notes,
            })),
            many => {
                let list: Vec<String> = many
                    .iter()
                    .map(|o| object_attrs(&session, *o).map(|a| describe(&a)))
                    .collect::<Result<_, _>>()?;
                Err(usage(format!(
                    "KEY matches {} objects on {}: {}; narrow it with type= or id=",
                    many.len(),
                    m.selector,
                    list.join("; ")
                )))
            }
        }
    })();
    let _ = ctx.finalize();
    result
}

fn resolve_token_key(cfg: &Config, uri: &ObjectUri, slot: Option<u64>) -> Result<Found, CliError> {
    let mut failures = Vec::new();
    let mut searched = 0;
    for (s, m, filter) in candidates(cfg, uri, slot)? {
        match search_member(cfg, s, m, uri, filter) {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => searched += 1,
            Err(e @ CliError::Usage(_)) => return Err(e),
            Err(e) => failures.push(format!("slot {} member {}: {e}", s.id, m.selector)),
        }
    }
    let mut msg = format!("no object matches the URI on the {searched} member token(s) searched");
    if !failures.is_empty() {
        let _ = write!(msg, "; {}", failures.join("; "));
    }
    Err(CliError::Token(msg))
}

// ---------------------------------------------------------------------------
// The decision.

/// Operations whose KEY is the object a call would make (checked as the
/// module checks a template); the others name an existing object.
fn makes_object(op: Op) -> bool {
    matches!(op, Op::Generate | Op::Create)
}

/// What an invisible object gives the application: the handle kind the
/// function names for this operation.
fn invisible_rv(op: Op) -> CK_RV {
    match op {
        Op::Wrap => CKR_WRAPPING_KEY_HANDLE_INVALID,
        Op::Unwrap => CKR_UNWRAPPING_KEY_HANDLE_INVALID,
        Op::Destroy | Op::Copy | Op::SetAttributes => CKR_OBJECT_HANDLE_INVALID,
        _ => CKR_KEY_HANDLE_INVALID,
    }
}

/// The module's decision: `Err((denial, CK_RV))` when denied.
pub fn decide(acl: &Acl, a: &Attrs, op: Op, mechanism: Option<u64>) -> Result<(), (Denial, CK_RV)> {
    if makes_object(op) {
        acl.may_create(op, a, mechanism)
            .map_err(|d| (d, d.rv(CKR_TEMPLATE_INCONSISTENT)))
    } else {
        acl.grant(a)
            .check(op, mechanism)
            .map_err(|d| (d, d.rv(invisible_rv(op))))
    }
}

/// Whether a rule takes part in the decision: it allows, or it selects
/// the object and is what makes the denial (the operation or the
/// mechanism it does not grant).
fn decides(v: &RuleVerdict, outcome: &Result<(), (Denial, CK_RV)>) -> bool {
    let selects = v.mismatch.is_none();
    match outcome {
        Ok(()) => selects && v.grants_op && v.mechanism_ok,
        Err((Denial::Mechanism(..), _)) => selects && v.grants_op,
        Err(_) => selects,
    }
}

fn rv_text(rv: CK_RV) -> String {
    names::rv_name(rv as u64)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("CK_RV {rv:#010x}"))
}

fn mech_text(m: u64) -> String {
    names::mechanism_name(m)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{m:#x}"))
}

fn class_text(c: u64) -> String {
    names::class_name(c)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{c:#x}"))
}

fn key_type_text(k: u64) -> String {
    names::key_type_name(k)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{k:#x}"))
}

/// A rule as the policy document writes it.
fn rule_text(r: &Rule) -> String {
    let mut parts = Vec::new();
    if let Some(g) = &r.label {
        parts.push(format!("label = {:?}", g.as_str()));
    }
    if let Some(id) = &r.id {
        parts.push(format!("id = \"{}\"", hex(id)));
    }
    if let Some(c) = r.class {
        parts.push(format!("class = {:?}", class_text(c)));
    }
    if let Some(k) = r.key_type {
        parts.push(format!("key_type = {:?}", key_type_text(k)));
    }
    if let Some(u) = &r.unique_id {
        parts.push(format!("unique_id = {:?}", String::from_utf8_lossy(u)));
    }
    let ops: Vec<String> = r.ops.iter().map(|o| format!("{:?}", o.name())).collect();
    parts.push(format!("ops = [{}]", ops.join(", ")));
    if let Some(ms) = &r.mechanisms {
        let ms: Vec<String> = ms.iter().map(|m| format!("{:?}", mech_text(*m))).collect();
        parts.push(format!("mechanisms = [{}]", ms.join(", ")));
    }
    format!("{{ {} }}", parts.join(", "))
}

/// Why a rule does not select the object: its selector and the value.
fn mismatch_text(field: &str, r: &Rule, a: &Attrs) -> String {
    let have =
        |v: Option<String>, attr: &str| v.unwrap_or_else(|| format!("the key has no {attr}"));
    match field {
        "label" => format!(
            "label {:?} does not match {}",
            r.label.as_ref().map_or("", |g| g.as_str()),
            have(
                a.label
                    .as_ref()
                    .map(|l| format!("{:?}", String::from_utf8_lossy(l))),
                "CKA_LABEL"
            )
        ),
        "id" => format!(
            "id {} is not {}",
            r.id.as_deref().map(hex).unwrap_or_default(),
            have(a.id.as_deref().map(hex), "CKA_ID")
        ),
        "class" => format!(
            "class {} is not {}",
            r.class.map(class_text).unwrap_or_default(),
            have(a.class.map(class_text), "CKA_CLASS")
        ),
        "key_type" => format!(
            "key_type {} is not {}",
            r.key_type.map(key_type_text).unwrap_or_default(),
            have(a.key_type.map(key_type_text), "CKA_KEY_TYPE")
        ),
        "unique_id" => format!(
            "unique_id {:?} is not {}",
            r.unique_id
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default(),
            have(
                a.unique_id
                    .as_ref()
                    .map(|u| format!("{:?}", String::from_utf8_lossy(u))),
                "CKA_UNIQUE_ID"
            )
        ),
        other => format!("{other} does not match"),
    }
}

// ---------------------------------------------------------------------------
// The role's rules.

/// Everything an explanation shows.
struct Explanation<'a> {
    args: &'a Args,
    acl: &'a Acl,
    attrs: &'a Attrs,
    source: &'a Source,
    /// The virtual slot and member a token key was read from.
    location: Option<&'a (u64, String)>,
    outcome: &'a Result<(), (Denial, CK_RV)>,
    verdicts: &'a [RuleVerdict],
    notes: &'a [String],
}

/// Where the role's rules came from.
struct Source {
    kind: &'static str,
    file: PathBuf,
}

fn broker_policy(path: &Path, role: &str) -> Result<(Policy, Vec<String>), CliError> {
    let fail = |message: String| CliError::BrokerConfig {
        file: path.display().to_string(),
        message,
    };
    let cfg = p11shim_broker::config::Config::load(path).map_err(|e| fail(e.to_string()))?;
    let r = cfg.roles.get(role).ok_or_else(|| {
        let known: Vec<_> = cfg.roles.keys().map(String::as_str).collect();
        fail(format!("no role {role:?} (defined: {})", list(&known)))
    })?;
    match &r.policy {
        Some(doc) => doc
            .validate()
            .map(|p| (p, Vec::new()))
            .map_err(|e| fail(format!("roles.{role}.policy.{e}"))),
        None => Ok((
            Policy::default(),
            vec![format!(
                "role {role:?} has no policy: with [acl] source = \"broker\" the module hides every object"
            )],
        )),
    }
}

fn module_policy(cfg: &Config, role: &str) -> Result<Policy, CliError> {
    let file = cfg.source.display();
    match &cfg.acl {
        Some(p11shim::config::AclConfig::Config { roles, .. }) => {
            roles.get(role).cloned().ok_or_else(|| {
                let known: Vec<_> = roles.keys().map(String::as_str).collect();
                usage(format!(
                    "{file}: no [acl.roles.{role}] (defined: {}); a broker role's policy needs --broker FILE",
                    list(&known)
                ))
            })
        }
        Some(p11shim::config::AclConfig::Broker) => Err(usage(format!(
            "{file}: [acl] source = \"broker\": the rules are the broker's; give its configuration with --broker FILE"
        ))),
        None => Err(usage(format!(
            "{file} has no [acl] section: the module applies no key ACL (everything is allowed)"
        ))),
    }
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

// ---------------------------------------------------------------------------

/// Explains the decision; `Ok(true)` when the operation is allowed.
pub fn run(args: &Args, style: &Style) -> Result<bool, CliError> {
    let config_path = args
        .config
        .clone()
        .unwrap_or_else(|| p11shim::config::locate(None));
    // The module's configuration holds the roles (without --broker) and
    // the member tokens (--token-key).
    let module = if args.token_key {
        Some(p11shim::config::load(&config_path)?)
    } else {
        None
    };
    let (policy, source, mut notes) = match &args.broker {
        Some(b) => {
            let (p, notes) = broker_policy(b, &args.role)?;
            (
                p,
                Source {
                    kind: "broker",
                    file: b.clone(),
                },
                notes,
            )
        }
        None => {
            let loaded;
            let cfg = match &module {
                Some(c) => c,
                None => {
                    loaded = p11shim::config::load(&config_path)?;
                    &loaded
                }
            };
            (
                module_policy(cfg, &args.role)?,
                Source {
                    kind: "config",
                    file: cfg.source.clone(),
                },
                Vec::new(),
            )
        }
    };
    let (attrs, location) = match (&module, args.token_key) {
        (Some(cfg), true) => {
            let uri = parse_object_uri(&args.key)?;
            let f = resolve_token_key(cfg, &uri, args.slot)?;
            notes.extend(f.notes);
            (f.attrs, Some((f.slot, f.member)))
        }
        _ => (parse_attrs(&args.key)?, None),
    };
    let acl = Acl::new(&args.role, policy);
    let outcome = decide(&acl, &attrs, args.op, args.mechanism);
    let verdicts = acl.explain(&attrs, args.op, args.mechanism);
    let e = Explanation {
        args,
        acl: &acl,
        attrs: &attrs,
        source: &source,
        location: location.as_ref(),
        outcome: &outcome,
        verdicts: &verdicts,
        notes: &notes,
    };
    if args.json {
        print_json(&e.to_json());
    } else {
        e.print(style);
    }
    Ok(outcome.is_ok())
}

impl Explanation<'_> {
    fn to_json(&self) -> Value {
        let Explanation {
            args,
            acl,
            attrs,
            source,
            location,
            outcome,
            verdicts,
            notes,
        } = *self;
        let rules: Vec<Value> = acl
            .rules()
            .iter()
            .zip(verdicts)
            .map(|(r, v)| {
                json!({
                    "index": v.index,
                    "rule": rule_text(r),
                    "selects": v.mismatch.is_none(),
                    "mismatch": v.mismatch,
                    "mismatch_detail": v.mismatch.map(|f| mismatch_text(f, r, attrs)),
                    "grants_op": v.grants_op,
                    "mechanism_ok": v.mechanism_ok,
                    "decides": decides(v, outcome),
                })
            })
            .collect();
        json!({
            "role": args.role,
            "source": { "kind": source.kind, "file": source.file.display().to_string() },
            "key": {
                "label": attrs.label.as_ref().map(|l| String::from_utf8_lossy(l).into_owned()),
                "class": attrs.class.map(class_text),
                "key_type": attrs.key_type.map(key_type_text),
                "id": attrs.id.as_deref().map(hex),
                "unique_id": attrs.unique_id.as_ref().map(|u| String::from_utf8_lossy(u).into_owned()),
                "slot": location.map(|l| l.0),
                "member": location.map(|l| l.1.clone()),
            },
            "op": args.op.name(),
            "mechanism": args.mechanism.map(mech_text),
            "decision": if outcome.is_ok() { "allow" } else { "deny" },
            "rv": match outcome { Ok(()) => "CKR_OK".to_owned(), Err((_, rv)) => rv_text(*rv) },
            "invisible": matches!(outcome, Err((Denial::Invisible, _))),
            "reason": outcome.as_ref().err().map(|(d, _)| d.reason()),
            "rules": rules,
            "notes": notes,
        })
    }

    fn print(&self, style: &Style) {
        let Explanation {
            args,
            acl,
            attrs,
            source,
            location,
            outcome,
            verdicts,
            notes,
        } = *self;
        println!(
            "role {:?} ({} {}), {} on {}{}",
            args.role,
            source.kind,
            source.file.display(),
            args.op.name(),
            describe(attrs),
            args.mechanism
                .map(|m| format!(" with {}", mech_text(m)))
                .unwrap_or_default()
        );
        if let Some((slot, member)) = location {
            println!("key read from slot {slot}: {member}");
        }
        for n in notes {
            println!("{} {n}", style.warn("note:"));
        }
        match outcome {
            Ok(()) => println!("{} CKR_OK", style.ok("ALLOW")),
            Err((Denial::Invisible, rv)) => println!(
                "{} invisible: {}: no rule selects the object; the role does not see it (C_FindObjects skips it)",
                style.error("DENY"),
                rv_text(*rv)
            ),
            Err((d, rv)) => println!("{} {}: {}", style.error("DENY"), rv_text(*rv), d.reason()),
        }
        if acl.rules().is_empty() {
            println!("the role has no rules: every object is hidden");
            return;
        }
        println!("rules:");
        let op = args.op.name();
        for (r, v) in acl.rules().iter().zip(verdicts) {
            let mark = decides(v, outcome);
            let verdict = match v.mismatch {
                Some(f) => format!("does not select: {}", mismatch_text(f, r, attrs)),
                None if !v.grants_op => format!("selects; does not grant {op}"),
                None if !v.mechanism_ok => format!(
                    "selects; grants {op}, but not with {}",
                    args.mechanism.map_or("no mechanism".into(), mech_text)
                ),
                None if r.mechanisms.is_some() => {
                    format!("selects; grants {op} with this mechanism")
                }
                None => format!("selects; grants {op} (any mechanism)"),
            };
            let head = format!("keys[{}] {}", v.index, rule_text(r));
            if mark {
                println!("  {} {}", style.bold("*"), style.bold(&head));
                println!("      {verdict}  {}", style.bold("<- decides"));
            } else {
                println!("    {}", style.dim(&head));
                println!("      {verdict}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p11shim::policy::PolicyDoc;
    use pkcs11_sys::{
        CKK_RSA, CKM_ECDSA, CKM_RSA_PKCS, CKM_RSA_PKCS_PSS, CKR_KEY_FUNCTION_NOT_PERMITTED,
        CKR_MECHANISM_INVALID,
    };

    fn acl(text: &str) -> Acl {
        let doc: PolicyDoc = toml::from_str(text).unwrap();
        Acl::new("web", doc.validate().unwrap())
    }

    const WEB: &str = r#"keys = [
        { label = "tls-*", class = "private-key", ops = ["sign"], mechanisms = ["RSA_PKCS_PSS"] },
        { label = "tls-*", class = "certificate" },
        { id = "0102", class = "secret-key", ops = ["generate", "encrypt"] },
    ]"#;

    #[test]
    fn attributes_parse_with_names_and_commas_in_labels() {
        let a = parse_attrs("label=tls,web,class=private-key,key_type=rsa,id=01").unwrap();
        assert_eq!(a.label.as_deref(), Some(&b"tls,web"[..]));
        assert_eq!(a.class, Some(CKO_PRIVATE_KEY as u64));
        assert_eq!(a.key_type, Some(CKK_RSA as u64));
        assert_eq!(a.id, Some(vec![1]));
        assert!(parse_attrs("tls-web").is_err());
        assert!(parse_attrs("class=key").is_err());
        assert!(parse_attrs("id=0g").is_err());
        assert!(parse_attrs("label=a,label=b").is_err());
    }

    #[test]
    fn object_uris() {
        let u = parse_object_uri("pkcs11:token=payments;object=tls%2Cweb;id=%01%02;type=private")
            .unwrap();
        assert_eq!(u.object.as_deref(), Some(&b"tls,web"[..]));
        assert_eq!(u.id, Some(vec![1, 2]));
        assert_eq!(u.class, Some(CKO_PRIVATE_KEY as u64));
        assert_eq!(u.token.unwrap().token.as_deref(), Some("payments"));
        assert!(parse_object_uri("pkcs11:object=a?pin-value=1234").is_err());
        assert!(parse_object_uri("pkcs11:token=a").is_err());
        assert!(parse_object_uri("pkcs11:object=a;type=key").is_err());
        assert!(parse_object_uri("label=a").is_err());
    }

    /// The rules marked as deciding are consistent with the module's
    /// decision for every operation and mechanism tried.
    #[test]
    fn the_deciding_rules_agree_with_the_decision() {
        let a = acl(WEB);
        let objects = [
            parse_attrs("label=tls-web,class=private-key,key_type=rsa,id=01").unwrap(),
            parse_attrs("label=tls-web,class=certificate,id=01").unwrap(),
            parse_attrs("label=db,class=secret-key,key_type=aes,id=0102").unwrap(),
            parse_attrs("label=db-key,class=private-key").unwrap(),
        ];
        let mechs = [None, Some(CKM_RSA_PKCS_PSS as u64), Some(CKM_ECDSA as u64)];
        for o in &objects {
            for op in Op::ALL {
                for m in mechs {
                    let out = decide(&a, o, op, m);
                    let v = a.explain(o, op, m);
                    let allowing = v
                        .iter()
                        .any(|v| v.mismatch.is_none() && v.grants_op && v.mechanism_ok);
                    if !makes_object(op) {
                        assert_eq!(out.is_ok(), allowing, "{op:?} {m:?} {o:?}");
                    }
                    if out.is_ok() {
                        assert!(v.iter().any(|v| decides(v, &out)));
                    }
                }
            }
        }
    }

    #[test]
    fn return_codes() {
        let a = acl(WEB);
        let key = parse_attrs("label=tls-web,class=private-key,key_type=rsa").unwrap();
        assert_eq!(
            decide(&a, &key, Op::Sign, Some(CKM_RSA_PKCS_PSS as u64)),
            Ok(())
        );
        let e = decide(&a, &key, Op::Sign, Some(CKM_RSA_PKCS as u64)).unwrap_err();
        assert_eq!(e.1, CKR_MECHANISM_INVALID);
        let e = decide(&a, &key, Op::Decrypt, None).unwrap_err();
        assert_eq!(e.1, CKR_KEY_FUNCTION_NOT_PERMITTED);
        let other = parse_attrs("label=db-key,class=private-key").unwrap();
        assert_eq!(
            decide(&a, &other, Op::Sign, None).unwrap_err().1,
            CKR_KEY_HANDLE_INVALID
        );
        assert_eq!(
            decide(&a, &other, Op::Destroy, None).unwrap_err().1,
            CKR_OBJECT_HANDLE_INVALID
        );
        assert_eq!(
            decide(&a, &other, Op::Generate, None).unwrap_err().1,
            CKR_TEMPLATE_INCONSISTENT
        );
        let new = parse_attrs("class=secret-key,key_type=aes,id=0102").unwrap();
        assert_eq!(decide(&a, &new, Op::Generate, None), Ok(()));
    }
}
