//! PKCS#11 URIs (RFC 7512), as far as a member selector needs them.
//!
//! Only the path attributes that identify a token or a slot are accepted.
//! `pin-value` and `pin-source` are refused: a secret never lives in a member
//! selector (use the slot's `pin` instead).

use std::fmt;

/// The token-identifying attributes of a `pkcs11:` URI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub token: Option<String>,
    pub manufacturer: Option<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub slot_id: Option<u64>,
    pub slot_description: Option<String>,
    pub slot_manufacturer: Option<String>,
    pub library_manufacturer: Option<String>,
    pub library_description: Option<String>,
}

/// Why a URI was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriError(pub String);

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn percent_decode(s: &str) -> Result<String, UriError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UriError(format!("bad percent-encoding in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UriError(format!("{s:?} is not UTF-8 once decoded")))
}

impl Pkcs11Uri {
    /// Parses `pkcs11:attr=value;attr=value[?query]`.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        let rest = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| UriError("a PKCS#11 URI starts with \"pkcs11:\"".into()))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        if let Some(q) = query {
            for item in q.split('&').filter(|i| !i.is_empty()) {
                let name = item.split_once('=').map_or(item, |(n, _)| n);
                match name {
                    "pin-value" | "pin-source" => {
                        return Err(UriError(format!(
                            "{name} is not accepted in a member URI; put the PIN source in the slot's `pin` key"
                        )));
                    }
                    "module-name" | "module-path" => {}
                    other => return Err(UriError(format!("unknown query attribute {other:?}"))),
                }
            }
        }
        let mut uri = Pkcs11Uri::default();
        for item in path.split(';').filter(|i| !i.is_empty()) {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| UriError(format!("attribute {item:?} has no value")))?;
            let value = percent_decode(value)?;
            let slot = match name {
                "token" => &mut uri.token,
                "manufacturer" => &mut uri.manufacturer,
                "serial" => &mut uri.serial,
                "model" => &mut uri.model,
                "slot-description" => &mut uri.slot_description,
                "slot-manufacturer" => &mut uri.slot_manufacturer,
                "library-manufacturer" => &mut uri.library_manufacturer,
                "library-description" => &mut uri.library_description,
                "slot-id" => {
                    let id = value
                        .parse()
                        .map_err(|_| UriError(format!("slot-id {value:?} is not a number")))?;
                    uri.slot_id = Some(id);
                    continue;
                }
                "library-version" | "id" | "object" | "type" => {
                    return Err(UriError(format!(
                        "attribute {name:?} does not select a token; a member URI names a token"
                    )));
                }
                other => return Err(UriError(format!("unknown path attribute {other:?}"))),
            };
            if slot.replace(value).is_some() {
                return Err(UriError(format!("attribute {name:?} given twice")));
            }
        }
        if uri == Pkcs11Uri::default() {
            return Err(UriError(
                "the URI selects no token (give token=, serial= or slot-id=)".into(),
            ));
        }
        Ok(uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_and_serial() {
        let u = Pkcs11Uri::parse("pkcs11:token=ha%20a;serial=0123abc;slot-id=7").unwrap();
        assert_eq!(u.token.as_deref(), Some("ha a"));
        assert_eq!(u.serial.as_deref(), Some("0123abc"));
        assert_eq!(u.slot_id, Some(7));
    }

    #[test]
    fn refuses_pins_and_nonsense() {
        assert!(
            Pkcs11Uri::parse("pkcs11:token=a?pin-value=1234")
                .unwrap_err()
                .0
                .contains("pin-value")
        );
        assert!(Pkcs11Uri::parse("pkcs:token=a").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:token=a;token=b").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:tokn=a").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:token=%zz").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:slot-id=x").is_err());
    }
}
