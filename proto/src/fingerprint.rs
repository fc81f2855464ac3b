//! Machine fingerprints for the `static-fingerprint` method: a SHA-256 over
//! chosen machine attributes, which the broker compares with the role's
//! allow list.
//!
//! The encoding is length-prefixed (`name`, `value` pairs in name order), so
//! no two attribute sets encode to the same bytes.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// Attributes the module knows how to collect.
pub const KNOWN: [&str; 3] = ["machine-id", "hostname", "addresses"];

/// Hex SHA-256 fingerprint of `attrs`.
pub fn fingerprint(attrs: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    h.update(b"p11shim-fingerprint-v1");
    for (k, v) in attrs {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Collects the named attributes of this machine. `addresses` is the sorted,
/// comma-separated list of non-loopback IP addresses of the up interfaces
/// (all addresses when only loopback ones exist).
pub fn collect(names: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for n in names {
        let v = match n.as_str() {
            "machine-id" => read_trimmed("/etc/machine-id")
                .or_else(|_| read_trimmed("/var/lib/dbus/machine-id"))
                .map_err(|e| format!("machine-id: {e}"))?,
            "hostname" => hostname()?,
            "addresses" => addresses()?.join(","),
            other => return Err(format!("unknown machine attribute '{other}'")),
        };
        out.insert(n.clone(), v);
    }
    Ok(out)
}

fn read_trimmed(p: &str) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(p)?.trim().to_owned())
}

fn hostname() -> Result<String, String> {
    read_trimmed("/proc/sys/kernel/hostname").map_err(|e| format!("hostname: {e}"))
}

/// Interface addresses from `/proc/net/fib_trie`-free sources: IPv4 from the
/// kernel's local routing table, IPv6 from `/proc/net/if_inet6`.
fn addresses() -> Result<Vec<String>, String> {
    let mut all = Vec::new();
    if let Ok(s) = std::fs::read_to_string("/proc/net/if_inet6") {
        for line in s.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 6 && f[0].len() == 32 {
                let mut b = [0u8; 16];
                for (i, x) in b.iter_mut().enumerate() {
                    *x = u8::from_str_radix(&f[0][2 * i..2 * i + 2], 16).unwrap_or(0);
                }
                all.push(std::net::IpAddr::from(b));
            }
        }
    }
    let trie =
        std::fs::read_to_string("/proc/net/fib_trie").map_err(|e| format!("addresses: {e}"))?;
    let lines: Vec<&str> = trie.lines().collect();
    for w in lines.windows(2) {
        if w[1].trim() == "/32 host LOCAL" {
            if let Some(ip) = w[0]
                .trim()
                .strip_prefix("|-- ")
                .and_then(|s| s.parse().ok())
            {
                all.push(std::net::IpAddr::V4(ip));
            }
        }
    }
    all.sort();
    all.dedup();
    let outside: Vec<_> = all
        .iter()
        .filter(|a| !a.is_loopback() && !is_link_local(a))
        .collect();
    let chosen: Vec<String> = if outside.is_empty() {
        all.iter().map(|a| a.to_string()).collect()
    } else {
        outside.iter().map(|a| a.to_string()).collect()
    };
    Ok(chosen)
}

fn is_link_local(a: &std::net::IpAddr) -> bool {
    match a {
        std::net::IpAddr::V4(v) => v.is_link_local(),
        std::net::IpAddr::V6(v) => (v.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefix_separates_fields() {
        let a: BTreeMap<_, _> = [("ab".to_string(), "c".to_string())].into();
        let b: BTreeMap<_, _> = [("a".to_string(), "bc".to_string())].into();
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 64);
    }

    #[test]
    fn collects_this_machine() {
        let names: Vec<String> = KNOWN.iter().map(|s| s.to_string()).collect();
        let m = collect(&names).unwrap();
        assert!(!m["hostname"].is_empty());
        assert!(!m["addresses"].is_empty());
        assert_eq!(fingerprint(&m), fingerprint(&collect(&names).unwrap()));
        assert!(collect(&["serial".into()]).is_err());
    }
}
