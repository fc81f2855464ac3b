//! Signing approval_data with an approver's key: a PEM private key file
//! (RSA PKCS#8 or PKCS#1, Ed25519 PKCS#8, optionally encrypted), or a
//! private key in a PKCS#11 token named by an RFC 7512 URI.
//!
//! Signatures are what the broker verifies and what standard tools make:
//! RSA PKCS#1 v1.5 with SHA-256 (`openssl dgst -sha256 -sign`,
//! `CKM_SHA256_RSA_PKCS`) and pure Ed25519 (`openssl pkeyutl -sign
//! -rawin`, `CKM_EDDSA` without parameters).
//!
//! PEM keys go through OpenSSL (already linked by this command for
//! provisioning): it reads every PEM form approvers have, and its RSA
//! signing is blinded and constant-time. Key bytes and PINs are held in
//! `Zeroizing` buffers and never appear in a message.

use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use p11shim::config::PinSource;
use zeroize::Zeroizing;

use super::ApproveError;
use super::uri::Pkcs11Uri;

/// DER of the Ed25519 curve OID (1.3.101.112), as `CKA_EC_PARAMS` holds it.
const ED25519_OID: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];

/// Where the approver's private key is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRef {
    Pem(PathBuf),
    Pkcs11(Pkcs11Uri),
}

impl KeyRef {
    /// `pkcs11:...` or a file path (for clap).
    pub fn parse(s: &str) -> Result<KeyRef, String> {
        if s.starts_with("pkcs11:") {
            super::uri::parse(s).map(KeyRef::Pkcs11)
        } else if s.is_empty() {
            Err("empty key".into())
        } else {
            Ok(KeyRef::Pem(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyRef::Pem(p) => write!(f, "{}", p.display()),
            KeyRef::Pkcs11(u) => write!(f, "{u}"),
        }
    }
}

/// The algorithm of a signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// RSA PKCS#1 v1.5 with SHA-256; the modulus size in bits.
    RsaSha256 {
        bits: u32,
    },
    Ed25519,
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Algorithm::RsaSha256 { bits } => write!(f, "RSA-{bits} PKCS#1 v1.5 SHA-256"),
            Algorithm::Ed25519 => f.write_str("Ed25519"),
        }
    }
}

/// A signature made.
#[derive(Clone, Debug)]
pub struct Signed {
    pub signature: Vec<u8>,
    pub algorithm: Algorithm,
}

/// Options of a PKCS#11 key (ignored for a PEM file, but for the PIN
/// source, which then gives the passphrase of an encrypted key).
#[derive(Clone, Debug, Default)]
pub struct TokenOptions {
    /// `--module`, else the URI's `module-path`, else
    /// `$P11SHIM_APPROVER_MODULE`.
    pub module: Option<PathBuf>,
    /// `--pin-source`, else the URI's `pin-source`.
    pub pin: Option<PinSource>,
}

/// Signs `data` with the key.
pub fn sign(key: &KeyRef, opts: &TokenOptions, data: &[u8]) -> Result<Signed, ApproveError> {
    match key {
        KeyRef::Pem(path) => sign_pem(path, opts.pin.as_ref(), data),
        KeyRef::Pkcs11(uri) => sign_pkcs11(uri, opts, data),
    }
}

fn key_err(path: &Path, what: impl std::fmt::Display) -> ApproveError {
    ApproveError::Key(format!("{}: {what}", path.display()))
}

fn sign_pem(path: &Path, pass: Option<&PinSource>, data: &[u8]) -> Result<Signed, ApproveError> {
    use openssl::pkey::{Id, PKey};
    use openssl::sign::Signer;

    let pem = Zeroizing::new(std::fs::read(path).map_err(|e| key_err(path, e.kind()))?);
    let encrypted = pem.windows(9).any(|w| w == b"ENCRYPTED");
    let key = match pass {
        Some(src) => {
            let pass = src
                .read()
                .map_err(|e| key_err(path, format!("passphrase: {e}")))?;
            PKey::private_key_from_pem_passphrase(&pem, &pass)
        }
        None if encrypted => {
            return Err(key_err(
                path,
                "the key is encrypted: give its passphrase with --pin-source env:NAME or file:/path",
            ));
        }
        None => PKey::private_key_from_pem(&pem),
    }
    // OpenSSL's error text names no key material, but it is not helpful
    // either: say what is expected.
    .map_err(|_| {
        key_err(
            path,
            "not a PEM private key (RSA PKCS#8 or PKCS#1, Ed25519 PKCS#8), or a wrong passphrase",
        )
    })?;
    let failed = |e: openssl::error::ErrorStack| key_err(path, format!("signing failed: {e}"));
    match key.id() {
        Id::RSA => {
            let bits = key.bits();
            let mut s =
                Signer::new(openssl::hash::MessageDigest::sha256(), &key).map_err(failed)?;
            s.set_rsa_padding(openssl::rsa::Padding::PKCS1)
                .map_err(failed)?;
            let signature = s.sign_oneshot_to_vec(data).map_err(failed)?;
            Ok(Signed {
                signature,
                algorithm: Algorithm::RsaSha256 { bits },
            })
        }
        Id::ED25519 => {
            let mut s = Signer::new_without_digest(&key).map_err(failed)?;
            let signature = s.sign_oneshot_to_vec(data).map_err(failed)?;
            Ok(Signed {
                signature,
                algorithm: Algorithm::Ed25519,
            })
        }
        _ => Err(key_err(
            path,
            "approvers sign with RSA or Ed25519 keys; this is another kind of key",
        )),
    }
}

fn tok(uri: &Pkcs11Uri, what: &str, e: impl std::fmt::Display) -> ApproveError {
    ApproveError::Token(format!("{uri}: {what}: {e}"))
}

/// The module to load for a URI.
pub fn module_for(uri: &Pkcs11Uri, opts: &TokenOptions) -> Result<PathBuf, ApproveError> {
    opts.module
        .clone()
        .or_else(|| uri.module_path.clone())
        .or_else(|| std::env::var_os("P11SHIM_APPROVER_MODULE").map(PathBuf::from))
        .ok_or_else(|| {
            ApproveError::Usage(
                "a pkcs11: key needs its PKCS#11 module: --module LIB, module-path= in the URI, or $P11SHIM_APPROVER_MODULE".into(),
            )
        })
}

fn sign_pkcs11(uri: &Pkcs11Uri, opts: &TokenOptions, data: &[u8]) -> Result<Signed, ApproveError> {
    let module = module_for(uri, opts)?;
    let ctx = Pkcs11::new(&module).map_err(|e| {
        ApproveError::Token(format!(
            "cannot load the PKCS#11 module {}: {e}",
            module.display()
        ))
    })?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| tok(uri, "C_Initialize", e))?;
    // The session is closed when `sign_with` returns, then the module is
    // finalized (cryptoki's context does not do it when dropped).
    let signed = sign_with(&ctx, uri, opts, data);
    let _ = ctx.finalize();
    signed
}

fn sign_with(
    ctx: &Pkcs11,
    uri: &Pkcs11Uri,
    opts: &TokenOptions,
    data: &[u8],
) -> Result<Signed, ApproveError> {
    let slot = find_slot(ctx, uri)?;
    let info = ctx
        .get_token_info(slot)
        .map_err(|e| tok(uri, "C_GetTokenInfo", e))?;
    let session = ctx
        .open_ro_session(slot)
        .map_err(|e| tok(uri, "C_OpenSession", e))?;
    let pin_source = opts.pin.as_ref().or(uri.pin_source.as_ref());
    match pin_source {
        Some(src) => {
            let pin = src.read().map_err(|e| tok(uri, "PIN", e))?;
            let pin = std::str::from_utf8(&pin)
                .map_err(|_| tok(uri, "PIN", format!("{src} is not UTF-8")))?;
            match session.login(UserType::User, Some(&AuthPin::new(pin.into()))) {
                Ok(())
                | Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::UserAlreadyLoggedIn,
                    _,
                )) => {}
                Err(e) => return Err(tok(uri, &format!("login with the PIN from {src}"), e)),
            }
        }
        None if info.login_required() => {
            return Err(tok(
                uri,
                "login",
                "the token needs a PIN: give --pin-source env:NAME or file:/path",
            ));
        }
        None => {}
    }
    let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
    if let Some(l) = &uri.object {
        template.push(Attribute::Label(l.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    let found = session
        .find_objects(&template)
        .map_err(|e| tok(uri, "C_FindObjects", e))?;
    let key = match found.as_slice() {
        [k] => *k,
        [] => return Err(tok(uri, "key", "no private key matches")),
        many => {
            return Err(tok(
                uri,
                "key",
                format!(
                    "{} private keys match; name one with object= and/or id=",
                    many.len()
                ),
            ));
        }
    };
    let attrs = session
        .get_attributes(key, &[AttributeType::KeyType, AttributeType::Sign])
        .map_err(|e| tok(uri, "C_GetAttributeValue", e))?;
    let mut key_type = None;
    for a in attrs {
        match a {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Sign(false) => {
                return Err(tok(uri, "key", "CKA_SIGN is false: the key cannot sign"));
            }
            _ => {}
        }
    }
    let (mechanism, algorithm) = match key_type {
        Some(KeyType::RSA) => {
            let bits = session
                .get_attributes(key, &[AttributeType::Modulus])
                .ok()
                .and_then(|a| match a.first() {
                    Some(Attribute::Modulus(m)) => Some(significant_bits(m)),
                    _ => None,
                })
                .unwrap_or(0);
            (Mechanism::Sha256RsaPkcs, Algorithm::RsaSha256 { bits })
        }
        Some(KeyType::EC_EDWARDS) => {
            let params = session
                .get_attributes(key, &[AttributeType::EcParams])
                .map_err(|e| tok(uri, "CKA_EC_PARAMS", e))?;
            let ed25519 = matches!(params.first(), Some(Attribute::EcParams(p))
                if p.as_slice() == ED25519_OID || printable(p) == Some("edwards25519"));
            if !ed25519 {
                return Err(tok(uri, "key", "an Edwards key, but not on Ed25519"));
            }
            (
                Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                Algorithm::Ed25519,
            )
        }
        Some(t) => {
            return Err(tok(
                uri,
                "key",
                format!("approvers sign with RSA or Ed25519 keys; this is {t}"),
            ));
        }
        None => return Err(tok(uri, "key", "its CKA_KEY_TYPE is not readable")),
    };
    let signature = session
        .sign(&mechanism, key, data)
        .map_err(|e| tok(uri, "C_Sign", e))?;
    Ok(Signed {
        signature,
        algorithm,
    })
}

/// The one slot whose token the URI selects.
fn find_slot(ctx: &Pkcs11, uri: &Pkcs11Uri) -> Result<Slot, ApproveError> {
    let mut matching = Vec::new();
    for slot in ctx
        .get_slots_with_token()
        .map_err(|e| tok(uri, "C_GetSlotList", e))?
    {
        if uri.slot_id.is_some_and(|id| id != slot.id()) {
            continue;
        }
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| tok(uri, "C_GetTokenInfo", e))?;
        if !info.token_initialized() {
            continue;
        }
        let ok = [
            (&uri.token, info.label()),
            (&uri.manufacturer, info.manufacturer_id()),
            (&uri.serial, info.serial_number()),
            (&uri.model, info.model()),
        ]
        .iter()
        .all(|(want, have)| want.as_deref().is_none_or(|w| w == *have));
        if ok {
            matching.push(slot);
        }
    }
    match matching.as_slice() {
        [s] => Ok(*s),
        [] => Err(tok(uri, "token", "no token matches")),
        many => Err(tok(
            uri,
            "token",
            format!(
                "{} tokens match; name one with token= or serial=",
                many.len()
            ),
        )),
    }
}

/// `CKA_EC_PARAMS` as a DER PrintableString (`curveName` form).
fn printable(p: &[u8]) -> Option<&str> {
    match p {
        [0x13, n, rest @ ..] if *n as usize == rest.len() => std::str::from_utf8(rest).ok(),
        _ => None,
    }
}

fn significant_bits(be: &[u8]) -> u32 {
    let skip = be.iter().take_while(|b| **b == 0).count();
    match be.get(skip) {
        Some(first) => ((be.len() - skip) * 8) as u32 - first.leading_zeros(),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_key(
        dir: &Path,
        name: &str,
        key: &openssl::pkey::PKey<openssl::pkey::Private>,
        pkcs1: bool,
    ) -> PathBuf {
        let pem = if pkcs1 {
            key.rsa().unwrap().private_key_to_pem().unwrap()
        } else {
            key.private_key_to_pem_pkcs8().unwrap()
        };
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    }

    fn verify(key: &openssl::pkey::PKey<openssl::pkey::Private>, data: &[u8], sig: &[u8]) -> bool {
        use openssl::sign::Verifier;
        let mut v = if key.id() == openssl::pkey::Id::RSA {
            Verifier::new(openssl::hash::MessageDigest::sha256(), key).unwrap()
        } else {
            Verifier::new_without_digest(key).unwrap()
        };
        v.verify_oneshot(sig, data).unwrap()
    }

    #[test]
    fn pem_keys_sign_what_openssl_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"p11shim-approval-v1\nid: apr_01\n";
        let rsa =
            openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let ed = openssl::pkey::PKey::generate_ed25519().unwrap();
        for (name, key, pkcs1) in [
            ("rsa8.pem", &rsa, false),
            ("rsa1.pem", &rsa, true),
            ("ed.pem", &ed, false),
        ] {
            let p = write_key(dir.path(), name, key, pkcs1);
            let s = sign(&KeyRef::Pem(p), &TokenOptions::default(), data).unwrap();
            assert!(verify(key, data, &s.signature), "{name}");
            assert!(!verify(key, b"other", &s.signature), "{name}");
        }
        let s = sign(
            &KeyRef::Pem(dir.path().join("ed.pem")),
            &TokenOptions::default(),
            data,
        )
        .unwrap();
        assert_eq!((s.algorithm, s.signature.len()), (Algorithm::Ed25519, 64));
    }

    #[test]
    fn encrypted_pem_needs_its_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let ed = openssl::pkey::PKey::generate_ed25519().unwrap();
        let pem = ed
            .private_key_to_pem_pkcs8_passphrase(
                openssl::symm::Cipher::aes_256_cbc(),
                b"s3cret-pass",
            )
            .unwrap();
        let p = dir.path().join("ed.enc.pem");
        std::fs::write(&p, pem).unwrap();
        let e = sign(&KeyRef::Pem(p.clone()), &TokenOptions::default(), b"x").unwrap_err();
        assert!(e.to_string().contains("passphrase"), "{e}");
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "wrong\n").unwrap();
        let opts = TokenOptions {
            pin: Some(PinSource::File(pass.clone())),
            ..Default::default()
        };
        let e = sign(&KeyRef::Pem(p.clone()), &opts, b"x")
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains("wrong") || e.contains("wrong passphrase"),
            "{e}"
        );
        std::fs::write(&pass, "s3cret-pass\n").unwrap();
        let s = sign(&KeyRef::Pem(p), &opts, b"x").unwrap();
        assert!(verify(&ed, b"x", &s.signature));
    }

    #[test]
    fn other_keys_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ec = openssl::ec::EcKey::generate(
            &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
        )
        .unwrap();
        let ec = openssl::pkey::PKey::from_ec_key(ec).unwrap();
        let p = write_key(dir.path(), "ec.pem", &ec, false);
        let e = sign(&KeyRef::Pem(p), &TokenOptions::default(), b"x").unwrap_err();
        assert!(e.to_string().contains("RSA or Ed25519"), "{e}");
        let g = dir.path().join("garbage.pem");
        std::fs::write(&g, "hello").unwrap();
        assert!(sign(&KeyRef::Pem(g), &TokenOptions::default(), b"x").is_err());
        assert!(
            sign(
                &KeyRef::Pem(dir.path().join("missing")),
                &TokenOptions::default(),
                b"x"
            )
            .is_err()
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(significant_bits(&[0, 0x80, 0]), 16);
        assert_eq!(significant_bits(&[0x01, 0xff]), 9);
        assert_eq!(printable(b"\x13\x0cedwards25519"), Some("edwards25519"));
        assert!(matches!(
            KeyRef::parse("pkcs11:token=a"),
            Ok(KeyRef::Pkcs11(_))
        ));
        assert!(KeyRef::parse("pkcs11:bogus=1").is_err());
        assert_eq!(KeyRef::parse("k.pem"), Ok(KeyRef::Pem("k.pem".into())));
    }
}
