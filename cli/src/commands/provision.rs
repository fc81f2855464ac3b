//! `p11shim provision FILE [--dry-run] [--json]`: one command for the HA
//! setup that vendors make a procedure of (init every partition, the same
//! keys on each, one member at a time). From a plan (`plan.rs`, documented
//! in `docs/cli.md`) and the module configuration it names, for each slot:
//!
//! 1. initializes the member tokens marked `init = true` that are not yet
//!    (SO PIN and user PIN from `file:`/`env:` sources);
//! 2. puts the slot's `replication_key` (AES-256, `CKA_TRUSTED`, set by the
//!    security officer) on every member lacking it;
//! 3. puts every planned key on every member: imported from PEM on each,
//!    or generated once on one member sensitive, extractable and
//!    `CKA_WRAP_WITH_TRUSTED`, wrapped under the replication key with
//!    `CKM_AES_KEY_WRAP_PAD` and unwrapped on the others with the same
//!    attributes, the public key created from its public attributes (the
//!    module's own replication of generated keys, `dispatch/keygen.rs`);
//! 4. verifies that every member holds the same objects (class, `CKA_ID`,
//!    label, key type, public key or check value).
//!
//! What is already there is left alone, so a second run changes nothing.
//! The member vendor libraries are called directly (cryptoki), each loaded
//! and initialized once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use serde_json::{Value, json};
use zeroize::{Zeroize, Zeroizing};

use super::CliError;
use crate::output::{Style, print_json};
use crate::plan::{self, KeyKind, KeySpec, PinRef, Plan, Usage};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The provisioning plan (TOML; see docs/cli.md).
    pub file: PathBuf,
    /// Show what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Length of the replication key made here (AES-256).
const REPLICATION_KEY_LEN: usize = 32;

fn tok(e: impl std::fmt::Display) -> CliError {
    CliError::Token(e.to_string())
}

/// One member token of a slot, in its vendor library.
struct Member {
    token: String,
    library: PathBuf,
    /// Its slot in the vendor library, once the token exists.
    slot: Option<Slot>,
    /// The user session, once logged in.
    session: Option<Session>,
}

/// What a run did or would do.
#[derive(Default)]
struct Report {
    actions: Vec<Value>,
    lines: Vec<String>,
}

impl Report {
    fn action(
        &mut self,
        slot: u64,
        what: &str,
        detail: String,
        bar: Option<&indicatif::ProgressBar>,
    ) {
        if let Some(b) = bar {
            b.set_message(detail.clone());
            b.inc(1);
        }
        self.lines.push(format!("slot {slot}: {detail}"));
        self.actions
            .push(json!({ "slot": slot, "action": what, "detail": detail }));
    }
}

/// Vendor libraries loaded once each.
struct Libraries(BTreeMap<PathBuf, Pkcs11>);

impl Libraries {
    fn get(&mut self, path: &Path) -> Result<&Pkcs11, CliError> {
        if !self.0.contains_key(path) {
            let ctx = Pkcs11::new(path)
                .map_err(|e| CliError::Token(format!("cannot load {}: {e}", path.display())))?;
            ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                .map_err(|e| CliError::Token(format!("{}: C_Initialize: {e}", path.display())))?;
            self.0.insert(path.to_path_buf(), ctx);
        }
        Ok(&self.0[path])
    }
}

impl Drop for Libraries {
    fn drop(&mut self) {
        for (_, ctx) in std::mem::take(&mut self.0) {
            let _ = ctx.finalize();
        }
    }
}

/// The slot of the token labelled `label` (initialized), if any.
fn find_token(ctx: &Pkcs11, label: &str) -> Result<Option<Slot>, CliError> {
    for s in ctx.get_slots_with_token().map_err(tok)? {
        let info = ctx.get_token_info(s).map_err(tok)?;
        if info.token_initialized() && info.label() == label {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// A slot whose token is not initialized yet.
fn free_slot(ctx: &Pkcs11) -> Result<Option<Slot>, CliError> {
    for s in ctx.get_slots_with_token().map_err(tok)? {
        if !ctx.get_token_info(s).map_err(tok)?.token_initialized() {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

fn auth(pin: &[u8], what: &str) -> Result<AuthPin, CliError> {
    let s =
        std::str::from_utf8(pin).map_err(|_| CliError::Token(format!("{what} is not UTF-8")))?;
    Ok(AuthPin::new(Box::from(s)))
}

/// Reads a user PIN from the plan or the slot's source (the broker
/// included, through the module's own exchange).
fn user_pin(plan: &Plan, src: &PinRef, dry_run: bool) -> Result<Zeroizing<Vec<u8>>, CliError> {
    match src {
        PinRef::Plan(s) => s.read(true).map_err(CliError::Token),
        PinRef::Module(p11shim::config::PinSource::Broker) => {
            if dry_run {
                return Err(CliError::Token(
                    "--dry-run does not ask the broker for the PIN (that is a use of this machine's identity); give the member's pin in the plan".into(),
                ));
            }
            let b = plan.config.broker.as_ref().ok_or_else(|| {
                CliError::Token("pin = \"broker\" but the configuration has no [broker]".into())
            })?;
            let g = p11shim::credentials::exchange_once(b)
                .map_err(|e| CliError::Token(e.to_string()))?;
            Ok(g.pin.clone())
        }
        PinRef::Module(p) => p.read().map_err(CliError::Token),
    }
}

fn find(s: &Session, template: &[Attribute]) -> Result<Vec<ObjectHandle>, CliError> {
    s.find_objects(template).map_err(tok)
}

/// The replication key on a member (public object: visible without login).
fn replication_key(s: &Session, label: &str) -> Result<Option<ObjectHandle>, CliError> {
    let found = find(
        s,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ],
    )?;
    match found.len() {
        0 => Ok(None),
        1 => Ok(Some(found[0])),
        n => Err(CliError::Token(format!(
            "{n} keys labelled {label:?}: the replication key must exist once"
        ))),
    }
}

/// Wipes the secret values held in a template once it has been used.
fn wipe(template: &mut [Attribute]) {
    for a in template {
        match a {
            Attribute::Value(v)
            | Attribute::PrivateExponent(v)
            | Attribute::Prime1(v)
            | Attribute::Prime2(v)
            | Attribute::Exponent1(v)
            | Attribute::Exponent2(v)
            | Attribute::Coefficient(v) => v.zeroize(),
            _ => {}
        }
    }
}

fn usage_attrs(u: &Usage, private: bool, public: bool) -> Vec<Attribute> {
    let mut t = Vec::new();
    if private {
        t.extend([
            Attribute::Sign(u.sign),
            Attribute::Decrypt(u.decrypt),
            Attribute::Unwrap(u.unwrap),
            Attribute::Derive(u.derive),
        ]);
    }
    if public {
        t.extend([
            Attribute::Verify(u.verify),
            Attribute::Encrypt(u.encrypt),
            Attribute::Wrap(u.wrap),
        ]);
    }
    t
}

/// The class of a key's object that holds its secret.
fn secret_class(k: &KeySpec) -> ObjectClass {
    match k.kind {
        KeyKind::Aes { .. } => ObjectClass::SECRET_KEY,
        _ => ObjectClass::PRIVATE_KEY,
    }
}

fn key_type(k: &KeySpec) -> KeyType {
    match k.kind {
        KeyKind::Rsa { .. } => KeyType::RSA,
        KeyKind::Ec { .. } => KeyType::EC,
        KeyKind::Aes { .. } => KeyType::AES,
    }
}

fn identity(k: &KeySpec, class: ObjectClass) -> Vec<Attribute> {
    vec![
        Attribute::Class(class),
        Attribute::Label(k.label.as_bytes().to_vec()),
        Attribute::Id(k.id.clone()),
    ]
}

/// The template of a key's secret part (generated or unwrapped): sensitive,
/// extractable only under a trusted key.
fn secret_template(k: &KeySpec) -> Vec<Attribute> {
    let mut t = identity(k, secret_class(k));
    t.extend([
        Attribute::KeyType(key_type(k)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
    ]);
    let aes = matches!(k.kind, KeyKind::Aes { .. });
    t.extend(usage_attrs(&k.usage, true, aes));
    if aes {
        t.extend([
            Attribute::Sign(k.usage.sign),
            Attribute::Verify(k.usage.verify),
        ]);
    }
    t
}

fn public_template(k: &KeySpec) -> Vec<Attribute> {
    let mut t = identity(k, ObjectClass::PUBLIC_KEY);
    t.extend([
        Attribute::KeyType(key_type(k)),
        Attribute::Token(true),
        Attribute::Private(false),
    ]);
    t.extend(usage_attrs(&k.usage, false, true));
    t
}

/// Generates a key on one member; returns its secret part and, for a pair,
/// its public key.
fn generate(s: &Session, k: &KeySpec) -> Result<(ObjectHandle, Option<ObjectHandle>), CliError> {
    let mut secret = secret_template(k);
    match k.kind {
        KeyKind::Aes { bits } => {
            secret.push(Attribute::ValueLen(((bits / 8) as u64).into()));
            Ok((
                s.generate_key(&Mechanism::AesKeyGen, &secret)
                    .map_err(tok)?,
                None,
            ))
        }
        KeyKind::Rsa { bits } => {
            let mut public = public_template(k);
            public.extend([
                Attribute::ModulusBits((bits as u64).into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
            ]);
            let (p, sk) = s
                .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &secret)
                .map_err(tok)?;
            Ok((sk, Some(p)))
        }
        KeyKind::Ec { curve } => {
            let mut public = public_template(k);
            public.push(Attribute::EcParams(curve.params().to_vec()));
            let (p, sk) = s
                .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &secret)
                .map_err(tok)?;
            Ok((sk, Some(p)))
        }
    }
}

/// The public attributes of a public key, to create it elsewhere.
fn public_values(s: &Session, o: ObjectHandle, k: &KeySpec) -> Result<Vec<Attribute>, CliError> {
    let types: &[AttributeType] = match k.kind {
        KeyKind::Rsa { .. } => &[AttributeType::Modulus, AttributeType::PublicExponent],
        KeyKind::Ec { .. } => &[AttributeType::EcParams, AttributeType::EcPoint],
        KeyKind::Aes { .. } => &[],
    };
    s.get_attributes(o, types).map_err(tok)
}

/// DER OCTET STRING around `v` (`CKA_EC_POINT`).
fn octet_string(v: &[u8]) -> Vec<u8> {
    let mut out = vec![0x04];
    match v.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(v);
    out
}

/// The templates of an imported key's private and public parts.
fn import_templates(k: &KeySpec, pem: &Path) -> Result<(Vec<Attribute>, Vec<Attribute>), CliError> {
    let text = Zeroizing::new(
        std::fs::read(pem)
            .map_err(|e| CliError::Plan(format!("{}: {}", pem.display(), e.kind())))?,
    );
    let key = openssl::pkey::PKey::private_key_from_pem(&text)
        .map_err(|_| CliError::Plan(format!("{}: not a PEM private key", pem.display())))?;
    let mut private = identity(k, ObjectClass::PRIVATE_KEY);
    private.extend([
        Attribute::KeyType(key_type(k)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
    ]);
    private.extend(usage_attrs(&k.usage, true, false));
    let mut public = public_template(k);
    let mismatch = || {
        CliError::Plan(format!(
            "{}: the key is not {} as key {:?} says",
            pem.display(),
            k.kind,
            k.label
        ))
    };
    match k.kind {
        KeyKind::Rsa { bits } => {
            let rsa = key.rsa().map_err(|_| mismatch())?;
            if rsa.n().num_bits() as u32 != bits {
                return Err(mismatch());
            }
            let part =
                |b: Option<&openssl::bn::BigNumRef>| b.map(|b| b.to_vec()).unwrap_or_default();
            private.extend([
                Attribute::Modulus(rsa.n().to_vec()),
                Attribute::PublicExponent(rsa.e().to_vec()),
                Attribute::PrivateExponent(rsa.d().to_vec()),
                Attribute::Prime1(part(rsa.p())),
                Attribute::Prime2(part(rsa.q())),
                Attribute::Exponent1(part(rsa.dmp1())),
                Attribute::Exponent2(part(rsa.dmq1())),
                Attribute::Coefficient(part(rsa.iqmp())),
            ]);
            public.extend([
                Attribute::Modulus(rsa.n().to_vec()),
                Attribute::PublicExponent(rsa.e().to_vec()),
            ]);
        }
        KeyKind::Ec { curve } => {
            let ec = key.ec_key().map_err(|_| mismatch())?;
            let nid = ec.group().curve_name();
            let want = match curve {
                plan::Curve::P256 => openssl::nid::Nid::X9_62_PRIME256V1,
                plan::Curve::P384 => openssl::nid::Nid::SECP384R1,
                plan::Curve::P521 => openssl::nid::Nid::SECP521R1,
            };
            if nid != Some(want) {
                return Err(mismatch());
            }
            let bytes = (ec.group().degree() as i32 + 7) / 8;
            let scalar = ec
                .private_key()
                .to_vec_padded(bytes)
                .map_err(|_| mismatch())?;
            let mut bn = openssl::bn::BigNumContext::new().map_err(|_| mismatch())?;
            let point = ec
                .public_key()
                .to_bytes(
                    ec.group(),
                    openssl::ec::PointConversionForm::UNCOMPRESSED,
                    &mut bn,
                )
                .map_err(|_| mismatch())?;
            private.extend([
                Attribute::EcParams(curve.params().to_vec()),
                Attribute::Value(scalar),
            ]);
            public.extend([
                Attribute::EcParams(curve.params().to_vec()),
                Attribute::EcPoint(octet_string(&point)),
            ]);
        }
        KeyKind::Aes { .. } => return Err(mismatch()),
    }
    Ok((private, public))
}

/// A member's objects as compared across members.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectIdentity {
    class: String,
    id: String,
    label: String,
    key_type: String,
    /// Public key (modulus and exponent, or curve and point) or a secret
    /// key's check value.
    public: String,
}

fn hexs(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

fn objects(s: &Session) -> Result<Vec<ObjectIdentity>, CliError> {
    let mut out = Vec::new();
    for o in find(s, &[Attribute::Token(true)])? {
        let attrs = s
            .get_attributes(
                o,
                &[
                    AttributeType::Class,
                    AttributeType::Id,
                    AttributeType::Label,
                    AttributeType::KeyType,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                    AttributeType::CheckValue,
                ],
            )
            .map_err(tok)?;
        let mut id = ObjectIdentity {
            class: String::new(),
            id: String::new(),
            label: String::new(),
            key_type: String::new(),
            public: String::new(),
        };
        let mut public = Vec::new();
        for a in attrs {
            match a {
                Attribute::Class(c) => id.class = c.to_string(),
                Attribute::Id(v) => id.id = hexs(&v),
                Attribute::Label(v) => id.label = String::from_utf8_lossy(&v).into_owned(),
                Attribute::KeyType(t) => id.key_type = t.to_string(),
                Attribute::Modulus(v) => public.push(format!("n={}", hexs(&v))),
                Attribute::PublicExponent(v) => public.push(format!("e={}", hexs(&v))),
                Attribute::EcParams(v) => public.push(format!("params={}", hexs(&v))),
                Attribute::EcPoint(v) => public.push(format!("point={}", hexs(&v))),
                Attribute::CheckValue(v) if !v.is_empty() => {
                    public.push(format!("kcv={}", hexs(&v)))
                }
                _ => {}
            }
        }
        if id.class == ObjectClass::SECRET_KEY.to_string()
            && id.key_type == KeyType::AES.to_string()
            && !public.iter().any(|p| p.starts_with("kcv="))
        {
            // Not every token keeps CKA_CHECK_VALUE on unwrapped keys
            // (SoftHSM2 does not): the same value, computed as defined
            // (the first 3 bytes of a zero block encrypted), when the key
            // may encrypt.
            if let Ok(c) = s.encrypt(&Mechanism::AesEcb, o, &[0u8; 16]) {
                public.push(format!("kcv={}", hexs(&c[..3.min(c.len())])));
            }
        }
        id.public = public.join(",");
        out.push(id);
    }
    out.sort();
    Ok(out)
}

pub fn run(args: &Args, style: &Style) -> Result<(), CliError> {
    let plan = plan::load(&args.file).map_err(CliError::Plan)?;
    let bar = (style.terminal && !args.json).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos} {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b
    });
    let mut libs = Libraries(BTreeMap::new());
    let mut report = Report::default();
    let mut verified = Vec::new();
    let result = (|| -> Result<(), CliError> {
        for &si in &plan.slots {
            let v = provision_slot(
                &plan,
                si,
                args.dry_run,
                &mut libs,
                &mut report,
                bar.as_ref(),
            )?;
            verified.extend(v);
        }
        Ok(())
    })();
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    result?;
    let changed = !report.actions.is_empty();
    if args.json {
        print_json(&json!({
            "plan": plan.file.display().to_string(),
            "dry_run": args.dry_run,
            "changed": changed && !args.dry_run,
            "actions": report.actions,
            "verified": verified,
        }));
        return Ok(());
    }
    let verb = if args.dry_run { "would" } else { "did" };
    if report.lines.is_empty() {
        println!(
            "{} nothing to do: every member already holds what the plan asks",
            style.ok("ok")
        );
    } else {
        println!("{} ({verb}):", style.bold("provision"));
        for l in &report.lines {
            println!("  {l}");
        }
    }
    for v in &verified {
        println!(
            "{} slot {}: {} members hold the same {} objects",
            style.ok("verified"),
            v["slot"],
            v["members"],
            v["objects"]
        );
    }
    if args.dry_run {
        println!("{}", style.dim("dry run: nothing was changed"));
    }
    Ok(())
}

fn provision_slot(
    plan: &Plan,
    si: usize,
    dry_run: bool,
    libs: &mut Libraries,
    report: &mut Report,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<Option<Value>, CliError> {
    let slot = &plan.config.slots[si];
    let sid = slot.id;
    let mut members: Vec<Member> = Vec::new();
    for m in &slot.members {
        let token = plan::selector_label(&m.selector)
            .unwrap_or_default()
            .to_owned();
        let ctx = libs.get(&m.library)?;
        members.push(Member {
            slot: find_token(ctx, &token)?,
            token,
            library: m.library.clone(),
            session: None,
        });
    }
    let at =
        |m: &Member, e: CliError| CliError::Token(format!("slot {sid} member {}: {e}", m.token));

    // 1. Tokens.
    let mut pending_init = BTreeSet::new();
    for m in &mut members {
        if m.slot.is_some() {
            continue;
        }
        let mp = plan.member(&m.token).filter(|p| p.init).ok_or_else(|| {
            CliError::Token(format!(
                "slot {sid}: no initialized token {:?} in {} (set init = true for it in the plan to initialize one)",
                m.token,
                m.library.display()
            ))
        })?;
        report.action(
            sid,
            "init-token",
            format!("initialize token {:?} in {}", m.token, m.library.display()),
            bar,
        );
        if dry_run {
            pending_init.insert(m.token.clone());
            continue;
        }
        let ctx = libs.get(&m.library)?;
        let free = free_slot(ctx)?.ok_or_else(|| {
            CliError::Token(format!(
                "{}: no uninitialized token left for {:?}",
                m.library.display(),
                m.token
            ))
        })?;
        let so = mp
            .so_pin
            .as_ref()
            .map(|s| s.read(true))
            .transpose()
            .map_err(CliError::Token)?;
        let user = mp
            .pin
            .as_ref()
            .map(|s| s.read(true))
            .transpose()
            .map_err(CliError::Token)?;
        let (Some(so), Some(user)) = (so, user) else {
            return Err(CliError::Token(format!(
                "member {}: init needs so_pin and pin",
                m.token
            )));
        };
        let so = auth(&so, "the SO PIN")?;
        ctx.init_token(free, &so, &m.token)
            .map_err(|e| at(m, tok(e)))?;
        let s = ctx.open_rw_session(free).map_err(|e| at(m, tok(e)))?;
        s.login(UserType::So, Some(&so))
            .map_err(|e| at(m, tok(e)))?;
        s.init_pin(&auth(&user, "the user PIN")?)
            .map_err(|e| at(m, tok(e)))?;
        s.logout().map_err(|e| at(m, tok(e)))?;
        drop(s);
        m.slot = Some(free);
    }

    // 2. The replication key, by the security officer.
    if let Some(label) = &slot.replication_key {
        let mut missing = Vec::new();
        let mut present = 0;
        for (i, m) in members.iter().enumerate() {
            let has = match m.slot {
                Some(s) if !pending_init.contains(&m.token) => {
                    let ctx = libs.get(&m.library)?;
                    let sess = ctx.open_ro_session(s).map_err(|e| at(m, tok(e)))?;
                    replication_key(&sess, label)
                        .map_err(|e| at(m, e))?
                        .is_some()
                }
                _ => false,
            };
            if has {
                present += 1;
            } else {
                missing.push(i);
            }
        }
        if !missing.is_empty() {
            if present > 0 && plan.replication_value.is_none() {
                return Err(CliError::Token(format!(
                    "slot {sid}: the replication key {label:?} is on {present} member(s) but not on {}; it cannot be read back: give its value in [replication] value",
                    missing
                        .iter()
                        .map(|&i| members[i].token.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let names: Vec<&str> = missing.iter().map(|&i| members[i].token.as_str()).collect();
            let origin = match &plan.replication_value {
                Some(v) => format!("from {v}"),
                None => "generated here, kept nowhere else".into(),
            };
            report.action(
                sid,
                "replication-key",
                format!(
                    "trusted AES-256 replication key {label:?} ({origin}) on {}",
                    names.join(", ")
                ),
                bar,
            );
            if !dry_run {
                let value = match &plan.replication_value {
                    Some(v) => v.read(false).map_err(CliError::Token)?,
                    None => {
                        let mut v = Zeroizing::new(vec![0u8; REPLICATION_KEY_LEN]);
                        getrandom::fill(&mut v[..])
                            .map_err(|e| CliError::Token(format!("random: {e}")))?;
                        v
                    }
                };
                if value.len() != REPLICATION_KEY_LEN {
                    return Err(CliError::Plan(format!(
                        "the replication key value must be {REPLICATION_KEY_LEN} raw bytes"
                    )));
                }
                for &i in &missing {
                    let m = &members[i];
                    let so = plan
                        .member(&m.token)
                        .and_then(|p| p.so_pin.as_ref())
                        .ok_or_else(|| {
                            CliError::Plan(format!(
                                "member {}: putting the replication key needs its so_pin in the plan",
                                m.token
                            ))
                        })?
                        .read(true)
                        .map_err(CliError::Token)?;
                    let ctx = libs.get(&m.library)?;
                    let s = ctx
                        .open_rw_session(
                            m.slot
                                .ok_or_else(|| at(m, CliError::Token("no token".into())))?,
                        )
                        .map_err(|e| at(m, tok(e)))?;
                    s.login(UserType::So, Some(&auth(&so, "the SO PIN")?))
                        .map_err(|e| at(m, tok(e)))?;
                    let mut t = vec![
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::Token(true),
                        Attribute::Private(false),
                        Attribute::Label(label.as_bytes().to_vec()),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(true),
                        Attribute::Trusted(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Value(value.to_vec()),
                    ];
                    let r = s.create_object(&t);
                    wipe(&mut t);
                    r.map_err(|e| at(m, tok(e)))?;
                    s.logout().map_err(|e| at(m, tok(e)))?;
                }
            }
        }
    }

    // 3. Keys, as the user.
    if dry_run && !pending_init.is_empty() {
        for k in &plan.keys {
            let how = match &k.import {
                Some(p) => format!("import from {} on every member", p.display()),
                None => format!(
                    "generate on {}, copy to the others under the replication key",
                    members[0].token
                ),
            };
            report.action(
                sid,
                "key",
                format!("key {:?} (id {}, {}): {how}", k.label, k.id_hex(), k.kind),
                bar,
            );
        }
        return Ok(None);
    }
    for m in &mut members {
        let src = plan.user_pin_source(slot, &m.token).ok_or_else(|| {
            CliError::Plan(format!(
                "member {}: no user PIN: give pin in the plan or on the slot",
                m.token
            ))
        })?;
        let pin = user_pin(plan, &src, dry_run)?;
        let ctx = libs.get(&m.library)?;
        let slot_id = m
            .slot
            .ok_or_else(|| CliError::Token(format!("member {}: no token", m.token)))?;
        let s = if dry_run {
            ctx.open_ro_session(slot_id)
        } else {
            ctx.open_rw_session(slot_id)
        }
        .map_err(|e| CliError::Token(format!("member {}: {e}", m.token)))?;
        match s.login(UserType::User, Some(&auth(&pin, "the user PIN")?)) {
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => {
                return Err(CliError::Token(format!(
                    "member {}: login ({src}): {e}",
                    m.token
                )));
            }
        }
        m.session = Some(s);
    }
    for k in &plan.keys {
        provision_key(slot, &members, k, dry_run, report, bar)?;
    }

    // 4. Verify.
    if dry_run {
        return Ok(None);
    }
    let mut seen: Vec<(String, Vec<ObjectIdentity>)> = Vec::new();
    for m in &members {
        let s = m
            .session
            .as_ref()
            .ok_or_else(|| CliError::Token("no session".into()))?;
        seen.push((m.token.clone(), objects(s)?));
    }
    let (first_token, first) = &seen[0];
    for (token, objs) in &seen[1..] {
        if objs != first {
            let a: BTreeSet<_> = first.iter().collect();
            let b: BTreeSet<_> = objs.iter().collect();
            let describe = |o: &ObjectIdentity| {
                format!("{} {:?} id {} ({})", o.class, o.label, o.id, o.key_type)
            };
            let only_first: Vec<String> = a.difference(&b).map(|o| describe(o)).collect();
            let only_other: Vec<String> = b.difference(&a).map(|o| describe(o)).collect();
            return Err(CliError::Mismatch(format!(
                "slot {sid}: members {first_token} and {token} do not hold the same objects: only on {first_token}: [{}]; only on {token}: [{}]",
                only_first.join("; "),
                only_other.join("; ")
            )));
        }
    }
    Ok(Some(json!({
        "slot": sid,
        "members": members.len(),
        "objects": first.len(),
    })))
}

fn sess(m: &Member) -> Result<&Session, CliError> {
    m.session
        .as_ref()
        .ok_or_else(|| CliError::Token(format!("member {}: no session", m.token)))
}

/// Puts one key on every member that lacks it.
fn provision_key(
    slot: &p11shim::config::SlotConfig,
    members: &[Member],
    k: &KeySpec,
    dry_run: bool,
    report: &mut Report,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<(), CliError> {
    let sid = slot.id;
    let mut holders = Vec::new();
    let mut missing = Vec::new();
    for (i, m) in members.iter().enumerate() {
        if find(sess(m)?, &identity(k, secret_class(k)))?.is_empty() {
            missing.push(i);
        } else {
            holders.push(i);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let names = |ix: &[usize]| {
        ix.iter()
            .map(|&i| members[i].token.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let desc = format!("key {:?} (id {}, {})", k.label, k.id_hex(), k.kind);
    if let Some(pem) = &k.import {
        report.action(
            sid,
            "import",
            format!(
                "{desc}: import from {} on {}",
                pem.display(),
                names(&missing)
            ),
            bar,
        );
        if dry_run {
            return Ok(());
        }
        for &i in &missing {
            let (mut private, public) = import_templates(k, pem)?;
            let s = sess(&members[i])?;
            let r = s.create_object(&private);
            wipe(&mut private);
            r.map_err(|e| CliError::Token(format!("member {}: {desc}: {e}", members[i].token)))?;
            if find(s, &identity(k, ObjectClass::PUBLIC_KEY))?.is_empty() {
                s.create_object(&public).map_err(|e| {
                    CliError::Token(format!(
                        "member {}: {desc} public key: {e}",
                        members[i].token
                    ))
                })?;
            }
        }
        return Ok(());
    }
    let rk_label = slot.replication_key.as_deref();
    let (source, targets) = match holders.first() {
        Some(&h) => (h, missing.clone()),
        None => (missing[0], missing[1..].to_vec()),
    };
    let detail = if holders.is_empty() {
        format!(
            "{desc}: generate on {}{}",
            members[source].token,
            if targets.is_empty() {
                String::new()
            } else {
                format!(", copy to {} under the replication key", names(&targets))
            }
        )
    } else {
        format!(
            "{desc}: copy from {} to {} under the replication key",
            members[source].token,
            names(&targets)
        )
    };
    report.action(
        sid,
        if holders.is_empty() {
            "generate"
        } else {
            "copy"
        },
        detail,
        bar,
    );
    if dry_run {
        return Ok(());
    }
    let src = sess(&members[source])?;
    let src_name = &members[source].token;
    let (secret, public) = if holders.is_empty() {
        generate(src, k).map_err(|e| CliError::Token(format!("member {src_name}: {desc}: {e}")))?
    } else {
        let sk = find(src, &identity(k, secret_class(k)))?[0];
        let pk = find(src, &identity(k, ObjectClass::PUBLIC_KEY))?
            .first()
            .copied();
        (sk, pk)
    };
    if targets.is_empty() {
        return Ok(());
    }
    let rk_label = rk_label.ok_or_else(|| {
        CliError::Plan(format!(
            "slot {sid} has no replication_key: {desc} cannot be copied"
        ))
    })?;
    let rk = replication_key(src, rk_label)?.ok_or_else(|| {
        CliError::Token(format!(
            "member {src_name}: no replication key {rk_label:?}"
        ))
    })?;
    let wrapped = Zeroizing::new(src.wrap_key(&Mechanism::AesKeyWrapPad, rk, secret).map_err(|e| {
        CliError::Token(format!(
            "member {src_name}: {desc} cannot be wrapped under the trusted replication key ({e}); a key made outside p11shim provision may not be extractable: import it instead"
        ))
    })?);
    let public_values = match (public, k.kind) {
        (Some(p), _) => public_values(src, p, k)?,
        (None, KeyKind::Aes { .. }) => Vec::new(),
        (None, _) => {
            return Err(CliError::Token(format!(
                "member {src_name}: {desc}: no public key to copy"
            )));
        }
    };
    for &i in &targets {
        let m = &members[i];
        let s = sess(m)?;
        let rk = replication_key(s, rk_label)?.ok_or_else(|| {
            CliError::Token(format!(
                "member {}: no replication key {rk_label:?}",
                m.token
            ))
        })?;
        s.unwrap_key(&Mechanism::AesKeyWrapPad, rk, &wrapped, &secret_template(k))
            .map_err(|e| CliError::Token(format!("member {}: {desc}: unwrap: {e}", m.token)))?;
        if !public_values.is_empty() && find(s, &identity(k, ObjectClass::PUBLIC_KEY))?.is_empty() {
            let mut t = public_template(k);
            t.extend(public_values.iter().cloned());
            s.create_object(&t).map_err(|e| {
                CliError::Token(format!("member {}: {desc} public key: {e}", m.token))
            })?;
        }
    }
    Ok(())
}
