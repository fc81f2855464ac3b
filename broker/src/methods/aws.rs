//! `aws-imds-fields` and `aws-iid`: what the instance says about itself,
//! checked live against EC2 `DescribeInstances` and IAM (research §2 (i)
//! and (ii)).
//!
//! Both end in the same checks of the instance EC2 describes: running,
//! the request's source address among its addresses, its instance profile
//! in the role, its account and region allowed, and its launch recent
//! enough for a first use. An old instance is not denied here: it may
//! still re-authenticate with the nonce of an earlier first use, so the
//! age only withholds the first use ([`Verified::first_use`]).
//!
//! A failure to ask AWS is never a denial: the client sees `unavailable`
//! and retries, the reason goes to the log.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use p11shim_proto::AwsEvidence;

use super::{Context, Denial, Verified, replay_key};
use crate::aws::{AwsClient, AwsError, Instance};
use crate::clientip::canonical;
use crate::clock::unix;
use crate::iid::{CertPins, IidError, verify_rsa2048};

/// Longest hostname accepted (DNS: 253 characters).
const MAX_HOSTNAME: usize = 253;
/// Longest instance profile ARN accepted (IAM: 2048).
const MAX_ARN: usize = 2048;
/// Largest `iid_document` accepted, base64 (a real one is about 600 bytes).
const MAX_DOCUMENT_B64: usize = 4 * 1024;
/// How far the document's `pendingTime` may be from EC2's `LaunchTime`:
/// both are the last start, EC2 reports whole seconds.
const PENDING_TOLERANCE: Duration = Duration::from_secs(1);
/// Why a first use is withheld from an old instance.
const TOO_OLD: &str = "instance older than max_instance_age";

/// `aws-imds-fields`: the metadata fields of the evidence must equal what
/// EC2 says about the instance they name, and the request must come from
/// one of that instance's addresses.
pub async fn imds_fields(
    ctx: &Context<'_>,
    aws: &AwsClient,
    ev: Option<&AwsEvidence>,
) -> Result<Verified, Denial> {
    let ev = ev.ok_or_else(|| Denial::bad_request("aws evidence missing"))?;
    let f = Fields::read(ev)?;
    let regions = allowed_regions(ctx)?;

    // The evidence names no region: ask each allowed one, in order.
    let mut found = None;
    for region in &regions {
        if let Some(i) = aws
            .describe_instance(region, f.instance_id)
            .await
            .map_err(unavailable)?
        {
            found = Some((region.as_str(), i));
            break;
        }
    }
    let (region, inst) = found.ok_or_else(|| {
        Denial::denied(format!(
            "unknown instance {} in {}",
            f.instance_id,
            regions.join(",")
        ))
    })?;
    running(&inst)?;
    let id = &inst.instance_id;
    if inst.reservation_id != f.reservation_id {
        return Err(Denial::denied(format!(
            "instance {id}: reservation {} is not EC2's {}",
            f.reservation_id, inst.reservation_id
        )));
    }
    if inst.instance_type != f.instance_type {
        return Err(Denial::denied(format!(
            "instance {id}: type {} is not EC2's {}",
            f.instance_type, inst.instance_type
        )));
    }
    if !inst.private_dns.eq_ignore_ascii_case(f.local_hostname) {
        return Err(Denial::denied(format!(
            "instance {id}: local hostname {} is not EC2's {}",
            f.local_hostname, inst.private_dns
        )));
    }
    if !inst.public_dns.eq_ignore_ascii_case(f.public_hostname) {
        return Err(Denial::denied(format!(
            "instance {id}: public hostname '{}' is not EC2's '{}'",
            f.public_hostname, inst.public_dns
        )));
    }
    source_among_addresses(ctx, &inst)?;
    account_allowed(ctx, &inst.owner_id, id)?;
    member(ctx, aws, &inst, f.profile_arn).await?;
    Ok(Verified {
        subject: subject(&inst.owner_id, region, id),
        replay_key: replay_key(&[
            b"v1",
            b"imds-fields",
            ctx.role_name.as_bytes(),
            id.as_bytes(),
            inst.reservation_id.as_bytes(),
            unix(inst.launch_time).to_string().as_bytes(),
        ]),
        first_use: first_use(ctx, inst.launch_time),
    })
}

/// `aws-iid`: the `rsa2048` signed identity document, verified against the
/// pinned certificate of its region, then the same live checks as
/// `aws-imds-fields` on the instance it names.
pub async fn iid(
    ctx: &Context<'_>,
    aws: &AwsClient,
    pins: &CertPins,
    ev: Option<&AwsEvidence>,
) -> Result<Verified, Denial> {
    let ev = ev.ok_or_else(|| Denial::bad_request("aws evidence missing"))?;
    let pkcs7 = ev
        .iid_rsa2048
        .as_deref()
        .ok_or_else(|| Denial::bad_request("aws.iid_rsa2048 missing"))?;
    let document = match ev.iid_document.as_deref() {
        None => None,
        Some(d) if d.len() > MAX_DOCUMENT_B64 => {
            return Err(Denial::bad_request("aws.iid_document too large"));
        }
        Some(d) => Some(
            p11shim_proto::b64_std()
                .decode(d)
                .map_err(|_| Denial::bad_request("aws.iid_document is not base64"))?,
        ),
    };
    let profile_arn = optional_arn(ev.instance_profile_arn.as_deref())?;
    let doc = verify_rsa2048(pkcs7, document.as_deref(), pins).map_err(|e| match e {
        IidError::Invalid(_) => Denial::denied(e.to_string()),
        IidError::Pins(_) => Denial::unavailable(e.to_string()),
    })?;
    let id = doc.instance_id.as_str();

    // The document names its instance only once verified: rate-limit that
    // instance now, before any AWS call.
    if let Err(wait) = ctx.limits.identity(id) {
        return Err(Denial::rate_limited(
            format!("identity {id} over its rate"),
            wait,
        ));
    }
    account_allowed(ctx, &doc.account_id, id)?;
    let regions = allowed_regions(ctx)?;
    if !regions.contains(&doc.region) {
        return Err(Denial::denied(format!(
            "instance {id}: region {} is not the role's",
            doc.region
        )));
    }

    let inst = aws
        .describe_instance(&doc.region, id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| Denial::denied(format!("unknown instance {id} in {}", doc.region)))?;
    running(&inst)?;
    if inst.owner_id != doc.account_id {
        return Err(Denial::denied(format!(
            "instance {id}: owner {} is not the document's account {}",
            inst.owner_id, doc.account_id
        )));
    }
    if doc.private_ip != inst.private_ip {
        return Err(Denial::denied(format!(
            "instance {id}: document private IP {} is not EC2's {}",
            show(doc.private_ip),
            show(inst.private_ip)
        )));
    }
    let apart = doc
        .pending_time
        .duration_since(inst.launch_time)
        .or_else(|_| inst.launch_time.duration_since(doc.pending_time))
        .unwrap_or_default();
    if apart > PENDING_TOLERANCE {
        return Err(Denial::denied(format!(
            "instance {id}: document pendingTime {} is not EC2's LaunchTime {} (a document from before a stop/start?)",
            humantime::format_rfc3339_seconds(doc.pending_time),
            humantime::format_rfc3339_seconds(inst.launch_time)
        )));
    }
    source_among_addresses(ctx, &inst)?;
    member(ctx, aws, &inst, profile_arn).await?;
    Ok(Verified {
        subject: subject(&doc.account_id, &doc.region, id),
        replay_key: replay_key(&[
            b"v1",
            b"iid",
            ctx.role_name.as_bytes(),
            doc.account_id.as_bytes(),
            id.as_bytes(),
            unix(doc.pending_time).to_string().as_bytes(),
        ]),
        first_use: first_use(ctx, doc.pending_time),
    })
}

/// The `aws-imds-fields` evidence, its syntax checked.
struct Fields<'a> {
    instance_id: &'a str,
    reservation_id: &'a str,
    instance_type: &'a str,
    local_hostname: &'a str,
    /// Empty when the instance has no public name.
    public_hostname: &'a str,
    profile_arn: Option<&'a str>,
}

impl<'a> Fields<'a> {
    fn read(ev: &'a AwsEvidence) -> Result<Fields<'a>, Denial> {
        let need = |v: &'a Option<String>, name: &str| {
            v.as_deref()
                .ok_or_else(|| Denial::bad_request(format!("aws.{name} missing")))
        };
        let f = Fields {
            instance_id: need(&ev.instance_id, "instance_id")?,
            reservation_id: need(&ev.reservation_id, "reservation_id")?,
            instance_type: need(&ev.instance_type, "instance_type")?,
            local_hostname: need(&ev.local_hostname, "local_hostname")?,
            public_hostname: ev.public_hostname.as_deref().unwrap_or(""),
            profile_arn: optional_arn(ev.instance_profile_arn.as_deref())?,
        };
        if !aws_id(f.instance_id, "i-") {
            return Err(Denial::bad_request("aws.instance_id is malformed"));
        }
        if !aws_id(f.reservation_id, "r-") {
            return Err(Denial::bad_request("aws.reservation_id is malformed"));
        }
        let type_ok = !f.instance_type.is_empty()
            && f.instance_type.len() <= 32
            && f.instance_type
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !type_ok {
            return Err(Denial::bad_request("aws.instance_type is malformed"));
        }
        if f.local_hostname.is_empty() || !hostname(f.local_hostname) {
            return Err(Denial::bad_request("aws.local_hostname is malformed"));
        }
        if !hostname(f.public_hostname) {
            return Err(Denial::bad_request("aws.public_hostname is malformed"));
        }
        Ok(f)
    }
}

/// `<prefix>` and 8 or 17 lowercase hex digits, as EC2 makes them.
fn aws_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|h| {
        (h.len() == 8 || h.len() == 17)
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Letters, digits, `-` and `.`; empty allowed (checked by the caller).
fn hostname(s: &str) -> bool {
    s.len() <= MAX_HOSTNAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// An instance profile ARN, when sent: `arn:<partition>:iam::<account>:instance-profile/<path and name>`.
fn optional_arn(arn: Option<&str>) -> Result<Option<&str>, Denial> {
    let Some(arn) = arn else { return Ok(None) };
    let bad = || Denial::bad_request("aws.instance_profile_arn is malformed");
    if arn.len() > MAX_ARN || arn.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(bad());
    }
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ok = matches!(parts.as_slice(),
        ["arn", partition, "iam", "", account, resource]
            if partition.starts_with("aws")
            && account.len() == 12
            && account.bytes().all(|b| b.is_ascii_digit())
            && resource.starts_with("instance-profile/"));
    if ok { Ok(Some(arn)) } else { Err(bad()) }
}

/// The role's regions, else the `[aws]` region.
fn allowed_regions(ctx: &Context<'_>) -> Result<Vec<String>, Denial> {
    if !ctx.role.regions.is_empty() {
        return Ok(ctx.role.regions.clone());
    }
    ctx.aws_region
        .map(|r| vec![r.to_owned()])
        .ok_or_else(|| Denial::unavailable("neither the role's regions nor [aws].region is set"))
}

fn running(inst: &Instance) -> Result<(), Denial> {
    if inst.state == "running" {
        Ok(())
    } else {
        Err(Denial::denied(format!(
            "instance {} is {}, not running",
            inst.instance_id, inst.state
        )))
    }
}

/// The request's source (the peer, or the client behind a trusted proxy)
/// must be one of the instance's addresses: a copied document or copied
/// fields used from elsewhere fail here.
fn source_among_addresses(ctx: &Context<'_>, inst: &Instance) -> Result<(), Denial> {
    let ip = canonical(ctx.client_ip);
    if inst.addresses.iter().any(|a| canonical(*a) == ip) {
        Ok(())
    } else {
        Err(Denial::denied(format!(
            "instance {}: source {ip} is not among its addresses",
            inst.instance_id
        )))
    }
}

fn account_allowed(ctx: &Context<'_>, account: &str, id: &str) -> Result<(), Denial> {
    let ids = &ctx.role.account_ids;
    if ids.is_empty() || ids.iter().any(|a| a == account) {
        Ok(())
    } else {
        Err(Denial::denied(format!(
            "instance {id}: account {account} is not the role's"
        )))
    }
}

/// Role membership: EC2's instance profile (equal to the one the evidence
/// names, when it names one) is listed by the role, or holds the role's
/// IAM role.
async fn member(
    ctx: &Context<'_>,
    aws: &AwsClient,
    inst: &Instance,
    claimed: Option<&str>,
) -> Result<(), Denial> {
    let id = &inst.instance_id;
    let arn = inst
        .profile_arn
        .as_deref()
        .ok_or_else(|| Denial::denied(format!("instance {id} has no instance profile")))?;
    if let Some(c) = claimed.filter(|c| *c != arn) {
        return Err(Denial::denied(format!(
            "instance {id}: profile {c} is not EC2's {arn}"
        )));
    }
    let role = ctx.role;
    if role.allowed_instance_profile_arns.iter().any(|a| a == arn) {
        return Ok(());
    }
    if let Some(name) = role.iam_role_name.as_deref() {
        let profiles = aws
            .instance_profiles_for_role(name)
            .await
            .map_err(unavailable)?;
        if profiles.iter().any(|a| a == arn) {
            return Ok(());
        }
    }
    Err(Denial::denied(format!(
        "instance {id}: profile {arn} is not in the role"
    )))
}

/// A first use only while `now - launched ≤ max_instance_age + clock_skew`.
fn first_use(ctx: &Context<'_>, launched: SystemTime) -> Result<(), &'static str> {
    let age = ctx.now.duration_since(launched).unwrap_or_default();
    if age > ctx.role.max_instance_age + ctx.role.clock_skew {
        Err(TOO_OLD)
    } else {
        Ok(())
    }
}

fn subject(account: &str, region: &str, id: &str) -> String {
    format!("aws:{account}:{region}:{id}")
}

fn show(ip: Option<IpAddr>) -> String {
    ip.map_or_else(|| "(none)".to_owned(), |a| a.to_string())
}

/// The broker could not look (or AWS refused its question): never a
/// denial, the client retries.
fn unavailable(e: AwsError) -> Denial {
    Denial::unavailable(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Limits};
    use crate::ratelimit::Limiters;

    const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[aws]
region = "eu-west-1"
[roles.r]
methods = ["aws-iid"]
pin = "env:P11SHIM_TEST_UNSET_PIN"
account_ids = ["123456789012"]
iam_role_name = "hsm"
max_instance_age = "10m"
clock_skew = "1m"
"#;

    #[test]
    fn age_window_regions_and_accounts() {
        let parse = |t: &str| Config::parse(t).unwrap_or_else(|e| panic!("{e}"));
        let cfg = parse(CONFIG);
        let listed = parse(&CONFIG.replace(
            "clock_skew",
            "regions = [\"us-east-1\", \"us-west-2\"]\nclock_skew",
        ));
        let limits = Limiters::new(&Limits::default());
        let launched = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        fn context<'a>(cfg: &'a Config, limits: &'a Limiters, now: SystemTime) -> Context<'a> {
            Context {
                role_name: "r",
                role: &cfg.roles["r"],
                client_ip: IpAddr::from([10, 0, 0, 5]),
                now,
                limits,
                aws_region: cfg.aws.as_ref().and_then(|a| a.region.as_deref()),
            }
        }
        let ctx = |cfg, age| context(cfg, &limits, launched + Duration::from_secs(age));
        // max_instance_age + clock_skew, to the second.
        assert_eq!(first_use(&ctx(&cfg, 660), launched), Ok(()));
        assert_eq!(first_use(&ctx(&cfg, 661), launched), Err(TOO_OLD));
        // A launch time ahead of the broker's clock is age zero.
        let ahead = launched + Duration::from_secs(5);
        assert_eq!(first_use(&ctx(&cfg, 0), ahead), Ok(()));
        assert_eq!(
            allowed_regions(&ctx(&cfg, 0)),
            Ok(vec!["eu-west-1".to_owned()])
        );
        assert_eq!(
            allowed_regions(&ctx(&listed, 0)),
            Ok(vec!["us-east-1".to_owned(), "us-west-2".to_owned()])
        );
        assert!(account_allowed(&ctx(&cfg, 0), "123456789012", "i-1").is_ok());
        let d = account_allowed(&ctx(&cfg, 0), "210987654321", "i-1").unwrap_err();
        assert_eq!(d.kind, p11shim_proto::ErrorKind::Denied);
    }

    #[test]
    fn ids_hostnames_and_arns() {
        assert!(aws_id("i-0123456789abcdef0", "i-"));
        assert!(aws_id("r-12345678", "r-"));
        assert!(!aws_id("i-0123456789ABCDEF0", "i-"));
        assert!(!aws_id("r-0123456789abcdef0", "i-"));
        assert!(hostname("ip-10-0-0-5.ec2.internal"));
        assert!(hostname(""));
        assert!(!hostname("a b"));
        assert!(!hostname(&"a".repeat(254)));
        let arn = "arn:aws:iam::123456789012:instance-profile/hsm-client";
        assert_eq!(optional_arn(Some(arn)), Ok(Some(arn)));
        assert_eq!(optional_arn(None), Ok(None));
        for bad in [
            "arn:aws:iam::123456789012:role/hsm-client",
            "arn:aws:iam::12345678901:instance-profile/x",
            "arn:aws:s3::123456789012:instance-profile/x",
            "arn:aws:iam::123456789012:instance-profile/a b",
            "instance-profile/x",
        ] {
            assert!(optional_arn(Some(bad)).is_err(), "{bad}");
        }
    }
}
