//! `static-fingerprint`: the machine's attributes hash to a fingerprint on
//! the role's allow list (for static VMs, where instance metadata does not
//! exist or does not change).
//!
//! The attributes are not secret, so the role binds the request's source
//! address to the `addresses` attribute by default, and one-time use with
//! nonce re-authentication limits a copied fingerprint to nothing once the
//! real machine has made its first request.

use std::net::IpAddr;

use p11shim_proto::FingerprintEvidence;
use p11shim_proto::fingerprint::fingerprint;

use super::{Context, Denial, Verified, replay_key};

const MAX_ATTRIBUTE: usize = 4096;

pub fn verify(ctx: &Context<'_>, ev: Option<&FingerprintEvidence>) -> Result<Verified, Denial> {
    let ev = ev.ok_or_else(|| Denial::bad_request("fingerprint evidence missing"))?;
    let role = ctx.role;
    let sent: Vec<&String> = ev.attributes.keys().collect();
    let mut want: Vec<&String> = role.fingerprint_attributes.iter().collect();
    want.sort();
    if sent != want {
        return Err(Denial::bad_request(format!(
            "fingerprint attributes {sent:?} are not the role's {want:?}"
        )));
    }
    if ev
        .attributes
        .values()
        .any(|v| v.len() > MAX_ATTRIBUTE || v.contains('\0'))
    {
        return Err(Denial::bad_request(
            "fingerprint attribute too long or not text",
        ));
    }
    let fp = fingerprint(&ev.attributes);
    let listed = role
        .fingerprints
        .iter()
        .any(|f| f.eq_ignore_ascii_case(&fp));
    if !listed {
        return Err(Denial::denied(format!(
            "fingerprint {} not in role",
            &fp[..16]
        )));
    }
    if role.fingerprint_bind_address {
        if let Some(addrs) = ev.attributes.get("addresses") {
            // A loopback source is the broker's own host, which no remote
            // peer can claim.
            let ok = ctx.client_ip.is_loopback()
                || addrs
                    .split(',')
                    .filter_map(|a| a.trim().parse::<IpAddr>().ok())
                    .map(crate::clientip::canonical)
                    .any(|a| a == ctx.client_ip);
            if !ok {
                return Err(Denial::denied(format!(
                    "source {} not among the fingerprinted addresses",
                    ctx.client_ip
                )));
            }
        }
    }
    Ok(Verified {
        subject: format!("fingerprint:{}", &fp[..16]),
        replay_key: replay_key(&[b"v1", b"fp", ctx.role_name.as_bytes(), fp.as_bytes()]),
        first_use: Ok(()),
    })
}
