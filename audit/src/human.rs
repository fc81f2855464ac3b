//! One human-readable line per record, for `p11shim audit tail`.

use serde_json::{Map, Value};

/// Renders one audit line for people:
/// `2025-03-01T12:00:00.123456Z 3f2a9c01:42 key_use C_Sign CKR_OK slot=0
/// member=ha-a role=payments subject=i-0abc mech=CKM_ECDSA key="k1"
/// id=0102 120us`. A line that is not a record is shown as such.
pub fn render_human(line: &str) -> String {
    let line = line.trim_end_matches(['\n', '\r']);
    let Ok(obj) = serde_json::from_str::<Map<String, Value>>(line) else {
        let cut: String = line.chars().take(80).collect();
        return format!("(not an audit record: {cut:?})");
    };
    let s = |k: &str| obj.get(k).and_then(Value::as_str);
    let mut out = String::with_capacity(160);
    let mut push = |part: &str| {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(part);
    };
    push(s("time").unwrap_or("-"));
    let chain: String = s("chain").unwrap_or("?").chars().take(8).collect();
    let seq = obj
        .get("seq")
        .and_then(Value::as_u64)
        .map_or("?".into(), |v| v.to_string());
    push(&format!("{chain}:{seq}"));
    push(s("kind").unwrap_or("?"));
    push(s("function").unwrap_or("?"));
    push(s("result").unwrap_or("?"));
    if let Some(v) = obj.get("slot").and_then(Value::as_u64) {
        push(&format!("slot={v}"));
    }
    for (k, name) in [
        ("member", "member"),
        ("role", "role"),
        ("subject", "subject"),
        ("mechanism", "mech"),
    ] {
        if let Some(v) = s(k) {
            push(&format!("{name}={v}"));
        }
    }
    if let Some(key) = obj.get("key").and_then(Value::as_object) {
        let ks = |k: &str| key.get(k).and_then(Value::as_str);
        if let Some(l) = ks("label") {
            push(&format!("key={l:?}"));
        }
        for k in ["id", "fp", "class", "type"] {
            if let Some(v) = ks(k) {
                push(&format!("{k}={v}"));
            }
        }
    }
    if let Some(v) = obj.get("latency_us").and_then(Value::as_u64) {
        push(&format!("{v}us"));
    }
    if let Some(v) = s("data_sha256") {
        push(&format!("data={}", &v[..v.len().min(16)]));
    }
    if let Some(v) = s("detail") {
        push(&format!("({v})"));
    }
    if obj.contains_key("sig") {
        push(&format!(
            "signed {} {}",
            s("alg").unwrap_or("?"),
            s("key_id").unwrap_or("?")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_record_and_refuses_garbage() {
        let l = r#"{"v":1,"chain":"00112233445566778899aabbccddeeff","seq":4,"time":"2025-01-02T03:04:05.000006Z","kind":"denial","function":"C_SignInit","result":"CKR_KEY_FUNCTION_NOT_PERMITTED","rv":"0x00000068","role":"web","slot":0,"mechanism":"CKM_ECDSA","key":{"label":"k\"1","id":"0a"},"detail":"role web may not sign with k1","prev":"00"}"#;
        assert_eq!(
            render_human(l),
            "2025-01-02T03:04:05.000006Z 00112233:4 denial C_SignInit \
             CKR_KEY_FUNCTION_NOT_PERMITTED slot=0 role=web mech=CKM_ECDSA \
             key=\"k\\\"1\" id=0a (role web may not sign with k1)"
        );
        assert!(render_human("{\"v\":1,\"cha").starts_with("(not an audit record"));
    }
}
