//! What one audit record holds, and how it becomes one JSON line.
//!
//! The record is built from typed values only: there is no field that could
//! carry a PIN, a key value, plaintext or the data to be signed (at most its
//! SHA-256). The line is written by hand, field by field, in a fixed order,
//! so that the bytes a hash chain covers are stable and the writer thread
//! allocates nothing per record beyond its reused buffer.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::names;

/// The kind of event a record stands for (serialized in snake_case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The first record of a chain: an `Auditor` started.
    Start,
    /// A credential fetched from the broker (method, subject, role, result).
    Credentials,
    /// `C_Login`.
    Login,
    /// `C_Logout`.
    Logout,
    /// A key used: sign, verify, decrypt, encrypt, unwrap, wrap, derive...
    KeyUse,
    /// A key generated, created, copied, destroyed or its attributes set.
    KeyManagement,
    /// A call refused by policy (or because the audit log cannot take it).
    Denial,
    /// An HA member left the slot's rotation.
    Failover,
    /// An HA member came back.
    Recovery,
    /// Quorum approval of a key use: a request filed, an approval
    /// consumed (with its approvers), or refused.
    Approval,
    /// A checkpoint: the chain so far, signed when a signer exists.
    Checkpoint,
    /// The last record of a chain: a checkpoint written by `stop`.
    Stop,
    /// Records that could not be queued: `detail` says how many.
    Lost,
}

impl Kind {
    /// The name written in the `kind` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Start => "start",
            Kind::Credentials => "credentials",
            Kind::Login => "login",
            Kind::Logout => "logout",
            Kind::KeyUse => "key_use",
            Kind::KeyManagement => "key_management",
            Kind::Denial => "denial",
            Kind::Failover => "failover",
            Kind::Recovery => "recovery",
            Kind::Approval => "approval",
            Kind::Checkpoint => "checkpoint",
            Kind::Stop => "stop",
            Kind::Lost => "lost",
        }
    }

    /// The kind named `s` in a record.
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "start" => Kind::Start,
            "credentials" => Kind::Credentials,
            "login" => Kind::Login,
            "logout" => Kind::Logout,
            "key_use" => Kind::KeyUse,
            "key_management" => Kind::KeyManagement,
            "denial" => Kind::Denial,
            "failover" => Kind::Failover,
            "recovery" => Kind::Recovery,
            "approval" => Kind::Approval,
            "checkpoint" => Kind::Checkpoint,
            "stop" => Kind::Stop,
            "lost" => Kind::Lost,
            _ => return None,
        })
    }

    /// Whether records of this kind carry a signature (when a signer exists).
    pub fn is_checkpoint(self) -> bool {
        matches!(self, Kind::Checkpoint | Kind::Stop)
    }
}

/// The key a call used, as far as the module knows it. Never its value.
#[derive(Clone, Debug, Default)]
pub struct KeyRef {
    /// `CKA_LABEL`.
    pub label: Option<String>,
    /// `CKA_ID`, written in hex.
    pub id: Option<Vec<u8>>,
    /// A fingerprint of the key (e.g. SHA-256 of its public key), written
    /// as the hex of its first 16 bytes.
    pub fingerprint: Option<[u8; 32]>,
    /// `CKA_CLASS`, written as its `CKO_` name.
    pub class: Option<u64>,
    /// `CKA_KEY_TYPE`, written as its `CKK_` name.
    pub key_type: Option<u64>,
}

/// One security-relevant event.
#[derive(Clone, Debug)]
pub struct Record {
    /// When the call started (set by the caller).
    pub time: SystemTime,
    /// What kind of event.
    pub kind: Kind,
    /// `"C_SignInit"`, or an event name (`"failover"`, `"credentials"`).
    pub function: &'static str,
    /// CK_RV of the call (0 = `CKR_OK`).
    pub result: u64,
    /// The role the caller acts as.
    pub role: Option<Arc<str>>,
    /// The attested subject: instance id, pod.
    pub subject: Option<Arc<str>>,
    /// The virtual slot.
    pub slot: Option<u64>,
    /// The HA member that served the call.
    pub member: Option<Arc<str>>,
    /// The mechanism (`CKM_*`).
    pub mechanism: Option<u64>,
    /// The key used or managed.
    pub key: Option<Arc<KeyRef>>,
    /// How long the call took.
    pub latency_us: Option<u64>,
    /// SHA-256 of the data signed or decrypted, when configured.
    pub data_sha256: Option<[u8; 32]>,
    /// Free text: why a call was denied, the broker method...
    pub detail: Option<Cow<'static, str>>,
}

impl Record {
    /// A record of `kind` for `function` with `result`, dated now.
    pub fn new(kind: Kind, function: &'static str, result: u64) -> Record {
        Record {
            time: SystemTime::now(),
            kind,
            function,
            result,
            role: None,
            subject: None,
            slot: None,
            member: None,
            mechanism: None,
            key: None,
            latency_us: None,
            data_sha256: None,
            detail: None,
        }
    }
}

/// The signature part of a checkpoint line: everything before it is what
/// was signed (with the closing brace).
pub(crate) struct SigFields<'a> {
    pub alg: &'static str,
    pub key_id: &'a str,
}

/// Appends the line of `r` (without its signature and newline) to `out`:
/// `{"v":1,"chain":...,"prev":"..."` and, for a checkpoint with a signer,
/// `"alg"` and `"key_id"`; then the closing brace. The caller appends the
/// signature (see [`append_sig`]) and the newline.
pub(crate) fn format(
    out: &mut Vec<u8>,
    chain: &str,
    seq: u64,
    r: &Record,
    prev: &[u8; 32],
    sig: Option<&SigFields<'_>>,
) {
    out.extend_from_slice(b"{\"v\":1,\"chain\":\"");
    out.extend_from_slice(chain.as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    push_u64(out, seq);
    out.extend_from_slice(b",\"time\":\"");
    push_time(out, r.time);
    out.extend_from_slice(b"\",\"kind\":\"");
    out.extend_from_slice(r.kind.as_str().as_bytes());
    out.extend_from_slice(b"\",\"function\":");
    push_str(out, r.function);
    out.extend_from_slice(b",\"result\":\"");
    match names::rv(r.result) {
        Some(n) => out.extend_from_slice(n.as_bytes()),
        None => push_hex_u64(out, r.result),
    }
    out.extend_from_slice(b"\",\"rv\":\"");
    push_hex_u64(out, r.result);
    out.push(b'"');
    if let Some(v) = &r.role {
        out.extend_from_slice(b",\"role\":");
        push_str(out, v);
    }
    if let Some(v) = &r.subject {
        out.extend_from_slice(b",\"subject\":");
        push_str(out, v);
    }
    if let Some(v) = r.slot {
        out.extend_from_slice(b",\"slot\":");
        push_u64(out, v);
    }
    if let Some(v) = &r.member {
        out.extend_from_slice(b",\"member\":");
        push_str(out, v);
    }
    if let Some(v) = r.mechanism {
        out.extend_from_slice(b",\"mechanism\":\"");
        push_named(out, names::mechanism(v), v);
        out.push(b'"');
    }
    if let Some(k) = &r.key {
        push_key(out, k);
    }
    if let Some(v) = r.latency_us {
        out.extend_from_slice(b",\"latency_us\":");
        push_u64(out, v);
    }
    if let Some(v) = &r.data_sha256 {
        out.extend_from_slice(b",\"data_sha256\":\"");
        push_hex(out, v);
        out.push(b'"');
    }
    if let Some(v) = &r.detail {
        out.extend_from_slice(b",\"detail\":");
        push_str(out, v);
    }
    out.extend_from_slice(b",\"prev\":\"");
    push_hex(out, prev);
    out.push(b'"');
    if let Some(s) = sig {
        out.extend_from_slice(b",\"alg\":\"");
        out.extend_from_slice(s.alg.as_bytes());
        out.extend_from_slice(b"\",\"key_id\":\"");
        out.extend_from_slice(s.key_id.as_bytes());
        out.push(b'"');
    }
    out.push(b'}');
}

/// The marker that starts the signature field, always the last one.
pub(crate) const SIG_FIELD: &[u8] = b",\"sig\":\"";

/// Turns the signed line `{...}` at the end of `out` (starting at `start`)
/// into `{...,"sig":"<base64>"}`.
pub(crate) fn append_sig(out: &mut Vec<u8>, sig: &[u8]) {
    use base64::Engine as _;
    let close = out.pop();
    debug_assert_eq!(close, Some(b'}'));
    out.extend_from_slice(SIG_FIELD);
    let b64 = base64::engine::general_purpose::STANDARD.encode(sig);
    out.extend_from_slice(b64.as_bytes());
    out.extend_from_slice(b"\"}");
}

fn push_key(out: &mut Vec<u8>, k: &KeyRef) {
    out.extend_from_slice(b",\"key\":{");
    let mut first = true;
    let mut sep = |out: &mut Vec<u8>, name: &[u8]| {
        if !first {
            out.push(b',');
        }
        first = false;
        out.push(b'"');
        out.extend_from_slice(name);
        out.extend_from_slice(b"\":");
    };
    if let Some(v) = &k.label {
        sep(out, b"label");
        push_str(out, v);
    }
    if let Some(v) = &k.id {
        sep(out, b"id");
        out.push(b'"');
        push_hex(out, v);
        out.push(b'"');
    }
    if let Some(v) = &k.fingerprint {
        sep(out, b"fp");
        out.push(b'"');
        push_hex(out, &v[..16]);
        out.push(b'"');
    }
    if let Some(v) = k.class {
        sep(out, b"class");
        out.push(b'"');
        push_named(out, names::class(v), v);
        out.push(b'"');
    }
    if let Some(v) = k.key_type {
        sep(out, b"type");
        out.push(b'"');
        push_named(out, names::key_type(v), v);
        out.push(b'"');
    }
    out.push(b'}');
}

fn push_named(out: &mut Vec<u8>, name: Option<&str>, v: u64) {
    match name {
        Some(n) => out.extend_from_slice(n.as_bytes()),
        None => push_hex_u64(out, v),
    }
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `0x` and at least 8 hex digits, as CK_RV values are usually shown.
fn push_hex_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(b"0x");
    let digits = (64 - v.leading_zeros()).div_ceil(4).max(8);
    for i in (0..digits).rev() {
        out.push(HEX[((v >> (i * 4)) & 0xf) as usize]);
    }
}

pub(crate) fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for b in bytes {
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 0xf) as usize]);
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut v = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut v, bytes);
    // Only ASCII hex digits were pushed.
    String::from_utf8(v).unwrap_or_default()
}

/// A JSON string: quotes, backslashes and control characters escaped.
pub(crate) fn push_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// RFC 3339 in UTC with microseconds: `2025-03-01T12:00:00.123456Z`.
/// Times before 1970 are written as 1970-01-01, past 9999 as 9999-12-31.
pub(crate) fn push_time(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    // 253402300799 = 9999-12-31T23:59:59Z.
    let secs = d.as_secs().min(253_402_300_799);
    let micros = d.subsec_micros();
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let (y, m, dd) = civil_from_days(days);
    let two = |out: &mut Vec<u8>, v: u64| {
        out.push(b'0' + (v / 10) as u8);
        out.push(b'0' + (v % 10) as u8);
    };
    let y = y as u64;
    two(out, y / 100);
    two(out, y % 100);
    out.push(b'-');
    two(out, m);
    out.push(b'-');
    two(out, dd);
    out.push(b'T');
    two(out, sod / 3600);
    out.push(b':');
    two(out, sod / 60 % 60);
    out.push(b':');
    two(out, sod % 60);
    out.push(b'.');
    let mut us = [0u8; 6];
    let mut v = micros;
    for slot in us.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&us);
    out.push(b'Z');
}

/// Year, month, day of the day `z` days after 1970-01-01 (proleptic
/// Gregorian; Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line(r: &Record) -> String {
        let mut out = Vec::new();
        format(
            &mut out,
            "00112233445566778899aabbccddeeff",
            7,
            r,
            &[0xab; 32],
            None,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn times_are_rfc3339_utc_micros() {
        let mut out = Vec::new();
        push_time(&mut out, UNIX_EPOCH);
        assert_eq!(out, b"1970-01-01T00:00:00.000000Z");
        out.clear();
        // 2024-02-29T23:59:58.000123Z (a leap day).
        push_time(&mut out, UNIX_EPOCH + Duration::new(1_709_251_198, 123_456));
        assert_eq!(out, b"2024-02-29T23:59:58.000123Z");
        out.clear();
        push_time(&mut out, UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(out, b"1970-01-01T00:00:00.000000Z");
        out.clear();
        push_time(&mut out, UNIX_EPOCH + Duration::from_secs(u64::MAX / 4));
        assert_eq!(out, b"9999-12-31T23:59:59.000000Z");
    }

    #[test]
    fn fields_in_order_and_absent_ones_omitted() {
        let mut r = Record::new(Kind::KeyUse, "C_Sign", 0);
        r.time = UNIX_EPOCH;
        assert_eq!(
            line(&r),
            format!(
                "{{\"v\":1,\"chain\":\"00112233445566778899aabbccddeeff\",\"seq\":7,\
                 \"time\":\"1970-01-01T00:00:00.000000Z\",\"kind\":\"key_use\",\
                 \"function\":\"C_Sign\",\"result\":\"CKR_OK\",\"rv\":\"0x00000000\",\
                 \"prev\":\"{}\"}}",
                "ab".repeat(32)
            )
        );
        r.result = 0x8000_0000 | 0x1234_5678;
        r.role = Some("pay\"ments\n".into());
        r.slot = Some(3);
        r.mechanism = Some(0x1041);
        r.key = Some(Arc::new(KeyRef {
            label: Some("k1".into()),
            id: Some(vec![0xde, 0xad]),
            fingerprint: Some([0x11; 32]),
            class: Some(3),
            key_type: Some(3),
        }));
        r.latency_us = Some(42);
        r.detail = Some("\u{1}x".into());
        let l = line(&r);
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["result"], "0x92345678");
        assert_eq!(v["role"], "pay\"ments\n");
        assert_eq!(v["mechanism"], "CKM_ECDSA");
        assert_eq!(v["key"]["id"], "dead");
        assert_eq!(v["key"]["fp"], "11".repeat(16));
        assert_eq!(v["key"]["class"], "CKO_PRIVATE_KEY");
        assert_eq!(v["key"]["type"], "CKK_EC");
        assert_eq!(v["detail"], "\u{1}x");
        assert!(l.contains("\"slot\":3,\"mechanism\""));
    }

    #[test]
    fn vendor_mechanism_in_hex() {
        let mut r = Record::new(Kind::KeyUse, "C_Sign", 0xa0);
        r.mechanism = Some(0x8000_0001);
        let v: serde_json::Value = serde_json::from_str(&line(&r)).unwrap();
        assert_eq!(v["mechanism"], "0x80000001");
        assert_eq!(v["result"], "CKR_PIN_INCORRECT");
        assert_eq!(v["rv"], "0x000000a0");
    }
}
