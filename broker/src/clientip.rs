//! The client's address: the TCP peer, or, when the peer is a trusted
//! proxy, the rightmost untrusted entry of `X-Forwarded-For`.
//!
//! The leftmost entry is whatever the client wrote and is never used.

use std::net::IpAddr;

use ipnet::IpNet;

/// Normalises IPv4-mapped IPv6 (`::ffff:10.0.0.1`) to IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|n| n.contains(&ip))
}

/// Why a forwarded chain could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum ForwardedError {
    /// An entry of `X-Forwarded-For` is not an address.
    Malformed,
    /// Every hop is a trusted proxy: there is no client address.
    OnlyProxies,
}

/// Resolves the client address from the TCP `peer` and every
/// `X-Forwarded-For` header value, in order.
pub fn client_ip(
    peer: IpAddr,
    forwarded_for: &[&str],
    proxies: &[IpNet],
) -> Result<IpAddr, ForwardedError> {
    let peer = canonical(peer);
    if !trusted(peer, proxies) {
        return Ok(peer);
    }
    let hops: Vec<&str> = forwarded_for
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if hops.is_empty() {
        // A trusted proxy that did not forward: the proxy is the client.
        return Ok(peer);
    }
    for h in hops.iter().rev() {
        let ip: IpAddr = h.parse().map_err(|_| ForwardedError::Malformed)?;
        let ip = canonical(ip);
        if !trusted(ip, proxies) {
            return Ok(ip);
        }
    }
    Err(ForwardedError::OnlyProxies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn untrusted_peer_ignores_header() {
        let ip = client_ip("10.0.0.5".parse().unwrap(), &["1.2.3.4"], &[]).unwrap();
        assert_eq!(ip, "10.0.0.5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rightmost_untrusted_through_proxies() {
        let p = nets(&["10.0.0.0/8"]);
        let ip = client_ip(
            "10.0.0.1".parse().unwrap(),
            &["6.6.6.6, 172.16.0.9", "10.0.0.2"],
            &p,
        )
        .unwrap();
        assert_eq!(ip, "172.16.0.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn mapped_and_malformed() {
        let p = nets(&["127.0.0.0/8"]);
        let ip = client_ip(
            "::ffff:127.0.0.1".parse().unwrap(),
            &["::ffff:192.0.2.7"],
            &p,
        )
        .unwrap();
        assert_eq!(ip, "192.0.2.7".parse::<IpAddr>().unwrap());
        assert_eq!(
            client_ip("127.0.0.1".parse().unwrap(), &["x"], &p),
            Err(ForwardedError::Malformed)
        );
        assert_eq!(
            client_ip("127.0.0.1".parse().unwrap(), &["127.0.0.2"], &p),
            Err(ForwardedError::OnlyProxies)
        );
    }
}
