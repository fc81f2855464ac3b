//! PKCS#11 URIs (RFC 7512) naming an approver's private key in a token:
//! `pkcs11:token=Approvers;object=carol;type=private?module-path=/usr/lib/x.so`.
//!
//! Only what selects a token and one private key is understood; any other
//! attribute is refused rather than ignored, so that a typo cannot select
//! a different key. A PIN is never taken from the URI (`pin-value`): it
//! would sit in the shell's history and the process list.

use std::fmt;
use std::path::PathBuf;

use p11shim::config::PinSource;

/// A parsed `pkcs11:` URI.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub token: Option<String>,
    pub manufacturer: Option<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub slot_id: Option<u64>,
    /// `CKA_LABEL`.
    pub object: Option<String>,
    /// `CKA_ID`, raw bytes.
    pub id: Option<Vec<u8>>,
    /// `module-path` (query).
    pub module_path: Option<PathBuf>,
    /// `pin-source` (query): `file:/path` or `env:NAME`.
    pub pin_source: Option<PinSource>,
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Pkcs11Uri {
    /// The selecting attributes, for messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (k, v) in [
            ("token", &self.token),
            ("manufacturer", &self.manufacturer),
            ("serial", &self.serial),
            ("model", &self.model),
            ("object", &self.object),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k}={}", encode(v.as_bytes())));
            }
        }
        if let Some(s) = self.slot_id {
            parts.push(format!("slot-id={s}"));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id={}", encode_all(id)));
        }
        parts.push("type=private".into());
        write!(f, "pkcs11:{}", parts.join(";"))
    }
}

/// Parses a `pkcs11:` URI. Errors name the attribute, never echo a
/// `pin-value`.
pub fn parse(s: &str) -> Result<Pkcs11Uri, String> {
    let rest = s
        .strip_prefix("pkcs11:")
        .ok_or_else(|| "a PKCS#11 URI starts with \"pkcs11:\"".to_string())?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let mut uri = Pkcs11Uri::default();
    let mut seen = Vec::new();
    for attr in path.split(';').filter(|a| !a.is_empty()) {
        let (name, value) = attr
            .split_once('=')
            .ok_or_else(|| format!("{attr:?}: expected name=value"))?;
        if seen.contains(&name) {
            return Err(format!("{name} appears twice"));
        }
        seen.push(name);
        let bytes = decode(value).map_err(|e| format!("{name}: {e}"))?;
        let text = || {
            String::from_utf8(bytes.clone()).map_err(|_| format!("{name}: not UTF-8 once decoded"))
        };
        match name {
            "token" => uri.token = Some(text()?),
            "manufacturer" => uri.manufacturer = Some(text()?),
            "serial" => uri.serial = Some(text()?),
            "model" => uri.model = Some(text()?),
            "object" => uri.object = Some(text()?),
            "id" => uri.id = Some(bytes),
            "slot-id" => {
                uri.slot_id = Some(
                    text()?
                        .parse()
                        .map_err(|_| "slot-id: not a decimal number".to_string())?,
                );
            }
            "type" => {
                if text()? != "private" {
                    return Err("type: an approver signs with a private key (type=private)".into());
                }
            }
            n if n.starts_with("x-") => {}
            n => return Err(format!("unsupported attribute {n:?}")),
        }
    }
    for attr in query.unwrap_or("").split('&').filter(|a| !a.is_empty()) {
        let (name, value) = attr.split_once('=').unwrap_or((attr, ""));
        if seen.contains(&name) {
            return Err(format!("{name} appears twice"));
        }
        seen.push(name);
        match name {
            "pin-value" => {
                return Err(
                    "pin-value is refused: give the PIN with --pin-source env:NAME or file:/path"
                        .into(),
                );
            }
            "module-path" => {
                let bytes = decode(value).map_err(|e| format!("{name}: {e}"))?;
                let p = String::from_utf8(bytes)
                    .map_err(|_| "module-path: not UTF-8 once decoded".to_string())?;
                uri.module_path = Some(PathBuf::from(p));
            }
            "pin-source" => {
                let bytes = decode(value).map_err(|e| format!("{name}: {e}"))?;
                let p = String::from_utf8(bytes)
                    .map_err(|_| "pin-source: not UTF-8 once decoded".to_string())?;
                uri.pin_source = Some(pin_source(&p)?);
            }
            n if n.starts_with("x-") => {}
            n => return Err(format!("unsupported query attribute {n:?}")),
        }
    }
    Ok(uri)
}

/// `env:NAME` or `file:/absolute/path`: where a PIN or passphrase is read.
/// The value given is never echoed (it may be a PIN typed by mistake).
pub fn pin_source(s: &str) -> Result<PinSource, String> {
    if let Some(name) = s.strip_prefix("env:") {
        let ok = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        return if ok {
            Ok(PinSource::Env(name.to_owned()))
        } else {
            Err("env: needs an environment variable name".into())
        };
    }
    if let Some(path) = s.strip_prefix("file:") {
        // RFC 8089 also allows file:///path.
        let path = path.strip_prefix("//").unwrap_or(path);
        let path = PathBuf::from(path);
        return if path.is_absolute() {
            Ok(PinSource::File(path))
        } else {
            Err("file: needs an absolute path".into())
        };
    }
    Err("expected env:NAME or file:/path (a PIN itself is never given on the command line)".into())
}

fn decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "bad percent-encoding".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Percent-encodes what is not an RFC 7512 `pchar` of a value.
fn encode(v: &[u8]) -> String {
    v.iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() || b"-._~:[]@!$'()*+,=&".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

fn encode_all(v: &[u8]) -> String {
    v.iter().map(|c| format!("%{c:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_object_id_and_query() {
        let u = parse(
            "pkcs11:token=Approver%20Keys;object=carol;id=%01%a2;type=private;serial=abc?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin",
        )
        .unwrap();
        assert_eq!(u.token.as_deref(), Some("Approver Keys"));
        assert_eq!(u.object.as_deref(), Some("carol"));
        assert_eq!(u.id.as_deref(), Some(&[0x01, 0xa2][..]));
        assert_eq!(u.serial.as_deref(), Some("abc"));
        assert_eq!(
            u.module_path,
            Some(PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"))
        );
        assert_eq!(u.pin_source, Some(PinSource::File("/run/pin".into())));
        assert_eq!(
            u.to_string(),
            "pkcs11:token=Approver%20Keys;serial=abc;object=carol;id=%01%A2;type=private"
        );
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        assert!(parse("pkcs11:token=a;type=public").is_err());
        assert!(parse("pkcs11:token=a;tokn=b").is_err());
        assert!(parse("pkcs11:token=a;token=b").is_err());
        assert!(parse("pkcs11:object=%zz").is_err());
        assert!(parse("pkcs11:slot-id=x").is_err());
        assert!(parse("file:/key.pem").is_err());
        let e = parse("pkcs11:token=a?pin-value=123456").unwrap_err();
        assert!(!e.contains("123456"), "{e}");
        assert!(parse("pkcs11:token=a;x-vendor=1").is_ok());
    }

    #[test]
    fn pin_sources() {
        assert_eq!(pin_source("env:PIN_1"), Ok(PinSource::Env("PIN_1".into())));
        assert_eq!(
            pin_source("file:///run/pin"),
            Ok(PinSource::File("/run/pin".into()))
        );
        assert!(pin_source("file:pin").is_err());
        assert!(pin_source("env:1X").is_err());
        let e = pin_source("123456").unwrap_err();
        assert!(!e.contains("123456"));
    }
}
