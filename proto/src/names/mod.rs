//! Names of PKCS#11 constants (mechanisms, key types, object classes and
//! return codes), for policies, logs and audit records.

mod tables;

use std::sync::OnceLock;

use tables::{CLASSES, KEY_TYPES, MECHANISMS, RETURN_CODES};

/// `CKM_` name of a mechanism, e.g. `CKM_RSA_PKCS_PSS`.
pub fn mechanism_name(v: u64) -> Option<&'static str> {
    by_value(MECHANISMS, v, &MECH_INDEX)
}

/// `CKR_` name of a return code, e.g. `CKR_KEY_FUNCTION_NOT_PERMITTED`.
pub fn rv_name(v: u64) -> Option<&'static str> {
    by_value(RETURN_CODES, v, &RV_INDEX)
}

/// `CKK_` name of a key type.
pub fn key_type_name(v: u64) -> Option<&'static str> {
    KEY_TYPES.iter().find(|(_, x)| *x == v).map(|(n, _)| *n)
}

/// `CKO_` name of an object class.
pub fn class_name(v: u64) -> Option<&'static str> {
    CLASSES.iter().find(|(_, x)| *x == v).map(|(n, _)| *n)
}

/// A mechanism by name (`CKM_SHA256_RSA_PKCS`, `sha256_rsa_pkcs`,
/// `SHA256-RSA-PKCS`) or number (`0x40`, `64`).
pub fn mechanism_value(s: &str) -> Option<u64> {
    by_name(MECHANISMS, "CKM_", s)
}

/// A key type by name (`rsa`, `ec`, `aes`, `generic-secret`, `CKK_AES`) or
/// number.
pub fn key_type_value(s: &str) -> Option<u64> {
    match s.to_ascii_lowercase().as_str() {
        "ecdsa" => return Some(0x3),
        "ed25519" | "ed448" | "eddsa" => return Some(0x40),
        _ => {}
    }
    by_name(KEY_TYPES, "CKK_", s)
}

/// An object class by name (`private-key`, `CKO_SECRET_KEY`) or number.
pub fn class_value(s: &str) -> Option<u64> {
    by_name(CLASSES, "CKO_", s)
}

static MECH_INDEX: OnceLock<Vec<(u64, &'static str)>> = OnceLock::new();
static RV_INDEX: OnceLock<Vec<(u64, &'static str)>> = OnceLock::new();

/// Value → name through a sorted index; the first name the headers give a
/// value wins (later ones are deprecated aliases).
fn by_value(
    table: &'static [(&'static str, u64)],
    v: u64,
    index: &OnceLock<Vec<(u64, &'static str)>>,
) -> Option<&'static str> {
    let idx = index.get_or_init(|| {
        let mut idx: Vec<_> = table.iter().map(|(n, v)| (*v, *n)).collect();
        // Stable: equal values keep the headers' order.
        idx.sort_by_key(|(v, _)| *v);
        idx.dedup_by_key(|(v, _)| *v);
        idx
    });
    idx.binary_search_by_key(&v, |(v, _)| *v)
        .ok()
        .map(|i| idx[i].1)
}

fn by_name(table: &[(&str, u64)], prefix: &str, s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok();
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok();
    }
    let norm = s.to_ascii_uppercase().replace('-', "_");
    let norm = norm.strip_prefix(prefix).unwrap_or(&norm);
    table
        .iter()
        .find(|(n, _)| &n[prefix.len()..] == norm)
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_both_ways() {
        assert_eq!(mechanism_name(0xd), Some("CKM_RSA_PKCS_PSS"));
        assert_eq!(mechanism_value("CKM_RSA_PKCS_PSS"), Some(0xd));
        assert_eq!(mechanism_value("sha256-rsa-pkcs"), Some(0x40));
        assert_eq!(mechanism_value("0x1081"), Some(0x1081));
        assert_eq!(mechanism_value("1"), Some(1));
        assert_eq!(mechanism_value("RSA_PKCS_PSSS"), None);
        assert_eq!(rv_name(0x68), Some("CKR_KEY_FUNCTION_NOT_PERMITTED"));
        assert_eq!(rv_name(0), Some("CKR_OK"));
        assert_eq!(rv_name(0x8000_0001), None);
        assert_eq!(key_type_value("rsa"), Some(0));
        assert_eq!(key_type_value("ec"), Some(3));
        assert_eq!(key_type_value("aes"), Some(0x1f));
        assert_eq!(key_type_value("generic-secret"), Some(0x10));
        assert_eq!(key_type_value("CKK_EC_EDWARDS"), Some(0x40));
        assert_eq!(class_value("private-key"), Some(3));
        assert_eq!(class_value("secret_key"), Some(4));
        assert_eq!(class_value("key"), None);
        assert_eq!(class_name(2), Some("CKO_PUBLIC_KEY"));
        assert_eq!(key_type_name(0x1f), Some("CKK_AES"));
    }

    #[test]
    fn tables_agree_with_the_headers() {
        use pkcs11_sys as p;
        for (n, v) in [
            ("CKM_ECDSA", p::CKM_ECDSA),
            ("CKM_AES_GCM", p::CKM_AES_GCM),
            ("CKM_SHA512_RSA_PKCS_PSS", p::CKM_SHA512_RSA_PKCS_PSS),
            ("CKM_EDDSA", p::CKM_EDDSA),
            ("CKM_AES_KEY_WRAP_PAD", p::CKM_AES_KEY_WRAP_PAD),
            ("CKM_GENERIC_SECRET_KEY_GEN", p::CKM_GENERIC_SECRET_KEY_GEN),
        ] {
            assert_eq!(mechanism_value(n), Some(v as u64), "{n}");
        }
        assert_eq!(
            rv_name(p::CKR_OBJECT_HANDLE_INVALID as u64),
            Some("CKR_OBJECT_HANDLE_INVALID")
        );
        assert_eq!(
            rv_name(p::CKR_TEMPLATE_INCONSISTENT as u64),
            Some("CKR_TEMPLATE_INCONSISTENT")
        );
        assert_eq!(
            key_type_value("CKK_GOSTR3410"),
            Some(p::CKK_GOSTR3410 as u64)
        );
        assert_eq!(class_value("CKO_MECHANISM"), Some(p::CKO_MECHANISM as u64));
        assert_eq!(MECHANISMS.len(), 443);
    }
}
