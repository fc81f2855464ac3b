//! The check made before an approval request is shown or signed: the bytes
//! the broker asks approvers to sign (`approval_data`) must be exactly the
//! canonical text of the fields it shows, and `digest` their SHA-256. A
//! broker (or anything between it and the approver) that shows one request
//! and asks for a signature over another is caught here.

use base64::Engine as _;
use p11shim_proto::approval::{
    APPROVAL_DATA_V1, Approval, ApprovalFields, REJECTION_PREFIX, approval_data, sha256_hex,
    valid_hex, valid_text,
};

use super::ApproveError;

/// Checks `a` (the answer for request `id`) and returns its approval_data.
pub fn verified(id: &str, a: &Approval) -> Result<Vec<u8>, ApproveError> {
    let bad = |what: String| ApproveError::Mismatch {
        id: id.to_owned(),
        what,
    };
    if a.v != p11shim_proto::VERSION {
        return Err(bad(format!("unknown document version {}", a.v)));
    }
    if a.id != id {
        return Err(bad(format!("the broker answered with request {:?}", a.id)));
    }
    for (name, v) in [
        ("id", a.id.as_str()),
        ("role", &a.role),
        ("requester", &a.subject),
        ("operation", &a.op),
        ("created-at", &a.created_at),
        ("expires-at", &a.expires_at),
    ] {
        if !valid_text(v) {
            return Err(bad(format!("{name} is not a printable single-line value")));
        }
    }
    if let Some(l) = &a.key.label
        && !valid_text(l)
    {
        return Err(bad("key-label is not a printable single-line value".into()));
    }
    if let Some(n) = a
        .approvers
        .iter()
        .find(|n| !valid_text(n) || n.contains(','))
    {
        return Err(bad(format!("approver name {n:?} is not allowed")));
    }
    if !valid_hex(&a.key.fingerprint, Some(32)) {
        return Err(bad(
            "key-fingerprint is not 32 bytes of lowercase hex".into()
        ));
    }
    if let Some(k) = &a.key.id
        && !valid_hex(k, None)
    {
        return Err(bad("key-id is not lowercase hex".into()));
    }
    if let Some(d) = &a.data_sha256
        && !valid_hex(d, Some(32))
    {
        return Err(bad("data-sha256 is not 32 bytes of lowercase hex".into()));
    }
    if a.m == 0 || a.m as usize > a.approvers.len() {
        return Err(bad(format!(
            "{} approvals needed of {} approvers",
            a.m,
            a.approvers.len()
        )));
    }
    let given = p11shim_proto::b64_std()
        .decode(a.approval_data.trim())
        .map_err(|_| bad("approval_data is not base64".into()))?;
    let expected = approval_data(&ApprovalFields {
        id: &a.id,
        role: &a.role,
        subject: &a.subject,
        key: &a.key,
        op: &a.op,
        mechanism: a.mechanism,
        data_sha256: a.data_sha256.as_deref(),
        created_at: &a.created_at,
        expires_at: &a.expires_at,
        m: a.m,
        approvers: &a.approvers,
    });
    if given != expected {
        return Err(bad(first_difference(&expected, &given)));
    }
    if a.digest != sha256_hex(&given) {
        return Err(bad("digest is not the SHA-256 of approval_data".into()));
    }
    Ok(given)
}

/// Where the bytes to sign differ from the fields shown, for the message.
fn first_difference(expected: &[u8], given: &[u8]) -> String {
    let e = String::from_utf8_lossy(expected);
    let g = String::from_utf8_lossy(given);
    let mut el = e.split_inclusive('\n');
    let mut gl = g.split_inclusive('\n');
    for n in 1..=64 {
        match (el.next(), gl.next()) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => {
                return format!(
                    "approval_data line {n} reads {:?} where the request shows {:?}",
                    y.trim_end_matches('\n'),
                    x.trim_end_matches('\n')
                );
            }
            (Some(x), None) => {
                return format!(
                    "approval_data ends before line {n} ({:?})",
                    x.trim_end_matches('\n')
                );
            }
            (None, Some(y)) => {
                return format!(
                    "approval_data has an extra line {n} ({:?})",
                    y.trim_end_matches('\n')
                );
            }
            (None, None) => break,
        }
    }
    "approval_data is not the request's canonical text".into()
}

/// What a file to sign offline must be: an approval or a rejection of one,
/// as `approve show --data-out` writes it. Returns whether it is a
/// rejection. Refusing anything else keeps an approver's key from being
/// used as a general signing tool by mistake.
pub fn offline_data(data: &[u8]) -> Result<bool, String> {
    let text = std::str::from_utf8(data).map_err(|_| "not UTF-8 text".to_string())?;
    if text.chars().any(|c| c.is_control() && c != '\n') || !text.ends_with('\n') {
        return Err("not the line-oriented text of approval_data".into());
    }
    let (rejection, body) = match text.strip_prefix(REJECTION_PREFIX) {
        Some(b) => (true, b),
        None => (false, text),
    };
    if !body.starts_with(&format!("{APPROVAL_DATA_V1}\n")) {
        return Err(format!(
            "does not start with {APPROVAL_DATA_V1:?} (write it with `p11shim approve show ID --data-out FILE`)"
        ));
    }
    Ok(rejection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p11shim_proto::approval::{ApprovalKey, ApprovalStatus};

    fn doc() -> Approval {
        let key = ApprovalKey {
            label: Some("ca-root".into()),
            id: Some("a1".into()),
            fingerprint: "ab".repeat(32),
            ..ApprovalKey::default()
        };
        let approvers = vec!["alice".to_string(), "bob".into(), "carol".into()];
        let data = approval_data(&ApprovalFields {
            id: "apr_01",
            role: "ca",
            subject: "fingerprint:00ff",
            key: &key,
            op: "sign",
            mechanism: Some(0x40),
            data_sha256: Some(&"cd".repeat(32)),
            created_at: "2026-11-25T01:00:00Z",
            expires_at: "2026-11-25T02:00:00Z",
            m: 2,
            approvers: &approvers,
        });
        Approval {
            v: 1,
            id: "apr_01".into(),
            role: "ca".into(),
            subject: "fingerprint:00ff".into(),
            key,
            op: "sign".into(),
            mechanism: Some(0x40),
            data_sha256: Some("cd".repeat(32)),
            created_at: "2026-11-25T01:00:00Z".into(),
            expires_at: "2026-11-25T02:00:00Z".into(),
            m: 2,
            approvers,
            approvals: vec![],
            rejections: vec![],
            status: ApprovalStatus::Pending,
            consumed_at: None,
            approval_data: p11shim_proto::b64_std().encode(&data),
            digest: sha256_hex(&data),
        }
    }

    #[test]
    fn an_honest_document_passes() {
        let a = doc();
        let data = verified("apr_01", &a).unwrap();
        assert!(data.starts_with(b"p11shim-approval-v1\nid: apr_01\n"));
        assert_eq!(offline_data(&data), Ok(false));
        let mut r = REJECTION_PREFIX.as_bytes().to_vec();
        r.extend_from_slice(&data);
        assert_eq!(offline_data(&r), Ok(true));
    }

    #[test]
    fn a_field_shown_differently_from_what_is_signed_is_caught() {
        // The broker shows "sign" but asks for a signature over "decrypt".
        let mut a = doc();
        let honest = a.clone();
        a.op = "decrypt".into();
        let e = verified("apr_01", &a).unwrap_err().to_string();
        assert!(
            e.contains("line 8") && e.contains("operation: sign") && e.contains("decrypt"),
            "{e}"
        );
        // Another data hash, another key, another m, another requester.
        for tamper in [
            (|a: &mut Approval| a.data_sha256 = Some("ee".repeat(32))) as fn(&mut Approval),
            |a| a.key.fingerprint = "ac".repeat(32),
            |a| a.m = 1,
            |a| a.subject = "fingerprint:11".into(),
            |a| a.approvers.push("mallory".into()),
            |a| a.expires_at = "2027-01-01T00:00:00Z".into(),
            |a| a.mechanism = None,
        ] {
            let mut a = honest.clone();
            tamper(&mut a);
            assert!(verified("apr_01", &a).is_err(), "{a:?}");
        }
        // Extra bytes after the canonical text.
        let mut a = honest.clone();
        let mut data = p11shim_proto::b64_std().decode(&a.approval_data).unwrap();
        data.extend_from_slice(b"operation: decrypt\n");
        a.approval_data = p11shim_proto::b64_std().encode(&data);
        a.digest = sha256_hex(&data);
        let e = verified("apr_01", &a).unwrap_err().to_string();
        assert!(e.contains("extra line 14"), "{e}");
    }

    #[test]
    fn digest_id_and_values_are_checked() {
        let mut a = doc();
        a.digest = "00".repeat(32);
        assert!(verified("apr_01", &a).is_err());
        assert!(verified("apr_02", &doc()).is_err());
        let mut a = doc();
        a.approval_data = "!!".into();
        assert!(verified("apr_01", &a).is_err());
        // A line break in a value could forge a line of its own.
        let mut a = doc();
        a.role = "ca\noperation: sign".into();
        assert!(verified("apr_01", &a).is_err());
        assert!(offline_data(b"hello\n").is_err());
        assert!(offline_data(b"p11shim-approval-v1\r\nid: x\n").is_err());
    }
}
