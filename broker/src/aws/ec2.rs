//! EC2 `DescribeInstances`: the answer read into [`Instance`].

use std::net::IpAddr;

use roxmltree::Node;

use super::xml::{all, at, parse, text};
use super::{AwsError, Instance};

/// Pages read before giving up; one instance id never needs a second.
pub(super) const MAX_PAGES: usize = 20;

/// `i-` and 8 or 17 lowercase hex digits.
pub(super) fn is_instance_id(id: &str) -> bool {
    id.strip_prefix("i-").is_some_and(|h| {
        (h.len() == 8 || h.len() == 17)
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Error codes meaning "no such instance": the broker denies, it does
/// not report the API as unavailable.
pub(super) fn is_unknown_instance(code: &str) -> bool {
    matches!(
        code,
        "InvalidInstanceID.NotFound" | "InvalidInstanceID.Malformed"
    )
}

#[derive(Debug)]
pub(super) struct Page {
    pub instances: Vec<Instance>,
    pub next_token: Option<String>,
}

/// Reads `DescribeInstancesResponse/reservationSet/item/instancesSet/item`.
pub(super) fn parse_describe_instances(xml: &str) -> Result<Page, AwsError> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    if root.tag_name().name() != "DescribeInstancesResponse" {
        return Err(malformed(format!(
            "root element is <{}>",
            root.tag_name().name()
        )));
    }
    let mut instances = Vec::new();
    if let Some(set) = at(root, &["reservationSet"]) {
        for r in all(set, "item") {
            let reservation_id = required(r, &["reservationId"])?;
            let owner_id = text(r, &["ownerId"]).unwrap_or("").to_owned();
            if let Some(iset) = at(r, &["instancesSet"]) {
                for i in all(iset, "item") {
                    instances.push(instance(i, &reservation_id, &owner_id)?);
                }
            }
        }
    }
    Ok(Page {
        instances,
        next_token: text(root, &["nextToken"]).map(str::to_owned),
    })
}

/// The one instance called `id` among those of every page.
pub(super) fn the_instance(
    instances: Vec<Instance>,
    id: &str,
) -> Result<Option<Instance>, AwsError> {
    let mut matching = instances.into_iter().filter(|i| i.instance_id == id);
    let first = matching.next();
    if matching.next().is_some() {
        return Err(malformed(format!("instance {id} is listed more than once")));
    }
    Ok(first)
}

fn instance(i: Node<'_, '_>, reservation_id: &str, owner_id: &str) -> Result<Instance, AwsError> {
    let launch = required(i, &["launchTime"])?;
    let launch_time = humantime::parse_rfc3339(&launch)
        .map_err(|e| malformed(format!("launchTime '{launch}': {e}")))?;
    let private_ip = ip(i, &["privateIpAddress"])?;
    let public_ip = ip(i, &["ipAddress"])?;
    let mut addresses = Vec::new();
    let mut add = |a: Option<IpAddr>| {
        if let Some(a) = a.filter(|a| !addresses.contains(a)) {
            addresses.push(a);
        }
    };
    add(private_ip);
    add(public_ip);
    if let Some(enis) = at(i, &["networkInterfaceSet"]) {
        for eni in all(enis, "item") {
            add(ip(eni, &["privateIpAddress"])?);
            add(ip(eni, &["association", "publicIp"])?);
            if let Some(set) = at(eni, &["privateIpAddressesSet"]) {
                for p in all(set, "item") {
                    add(ip(p, &["privateIpAddress"])?);
                    add(ip(p, &["association", "publicIp"])?);
                }
            }
            if let Some(set) = at(eni, &["ipv6AddressesSet"]) {
                for p in all(set, "item") {
                    add(ip(p, &["ipv6Address"])?);
                }
            }
        }
    }
    Ok(Instance {
        instance_id: required(i, &["instanceId"])?,
        reservation_id: reservation_id.to_owned(),
        owner_id: owner_id.to_owned(),
        state: required(i, &["instanceState", "name"])?,
        instance_type: text(i, &["instanceType"]).unwrap_or("").to_owned(),
        image_id: text(i, &["imageId"]).unwrap_or("").to_owned(),
        private_ip,
        public_ip,
        private_dns: text(i, &["privateDnsName"]).unwrap_or("").to_owned(),
        public_dns: text(i, &["dnsName"]).unwrap_or("").to_owned(),
        launch_time,
        profile_arn: text(i, &["iamInstanceProfile", "arn"]).map(str::to_owned),
        vpc_id: text(i, &["vpcId"]).map(str::to_owned),
        subnet_id: text(i, &["subnetId"]).map(str::to_owned),
        addresses,
    })
}

fn required(n: Node<'_, '_>, path: &[&str]) -> Result<String, AwsError> {
    text(n, path)
        .map(str::to_owned)
        .ok_or_else(|| malformed(format!("{} is missing", path.join("/"))))
}

fn ip(n: Node<'_, '_>, path: &[&str]) -> Result<Option<IpAddr>, AwsError> {
    text(n, path)
        .map(|t| {
            t.parse::<IpAddr>()
                .map_err(|_| malformed(format!("{} '{t}' is not an IP address", path.join("/"))))
        })
        .transpose()
}

/// An answer we cannot read is a failure to check, not a verdict.
fn malformed(what: String) -> AwsError {
    AwsError::Unavailable(format!("DescribeInstances answer: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// Shaped like AWS's documented answer: two network interfaces, the
    /// second with a secondary private address, an association and IPv6.
    const ANSWER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>8f7724cf-496f-496e-8fe3-example</requestId>
  <reservationSet>
    <item>
      <reservationId>r-1234567890abcdef0</reservationId>
      <ownerId>123456789012</ownerId>
      <groupSet/>
      <instancesSet>
        <item>
          <instanceId>i-1234567890abcdef0</instanceId>
          <imageId>ami-bff32ccc</imageId>
          <instanceState><code>16</code><name>running</name></instanceState>
          <privateDnsName>ip-192-168-1-88.eu-west-1.compute.internal</privateDnsName>
          <dnsName>ec2-54-194-252-215.eu-west-1.compute.amazonaws.com</dnsName>
          <instanceType>t2.micro</instanceType>
          <launchTime>2018-05-08T16:46:19.000Z</launchTime>
          <subnetId>subnet-56f5f633</subnetId>
          <vpcId>vpc-11112222</vpcId>
          <privateIpAddress>192.168.1.88</privateIpAddress>
          <ipAddress>54.194.252.215</ipAddress>
          <iamInstanceProfile>
            <arn>arn:aws:iam::123456789012:instance-profile/hsm-client</arn>
            <id>AIPAJ7OXVF4EXAMPLE</id>
          </iamInstanceProfile>
          <networkInterfaceSet>
            <item>
              <networkInterfaceId>eni-0a</networkInterfaceId>
              <privateIpAddress>192.168.1.88</privateIpAddress>
              <association><publicIp>54.194.252.215</publicIp></association>
              <privateIpAddressesSet>
                <item><privateIpAddress>192.168.1.88</privateIpAddress><primary>true</primary>
                  <association><publicIp>54.194.252.215</publicIp></association></item>
              </privateIpAddressesSet>
              <ipv6AddressesSet/>
            </item>
            <item>
              <networkInterfaceId>eni-0b</networkInterfaceId>
              <privateIpAddress>192.168.2.10</privateIpAddress>
              <privateIpAddressesSet>
                <item><privateIpAddress>192.168.2.10</privateIpAddress><primary>true</primary></item>
                <item><privateIpAddress>192.168.2.11</privateIpAddress><primary>false</primary>
                  <association><publicIp>3.250.1.2</publicIp></association></item>
              </privateIpAddressesSet>
              <ipv6AddressesSet><item><ipv6Address>2001:db8::1234</ipv6Address></item></ipv6AddressesSet>
            </item>
          </networkInterfaceSet>
        </item>
      </instancesSet>
    </item>
  </reservationSet>
  <nextToken>tok-2</nextToken>
</DescribeInstancesResponse>"#;

    #[test]
    fn reads_every_field_and_every_address() {
        let page = parse_describe_instances(ANSWER).unwrap();
        assert_eq!(page.next_token.as_deref(), Some("tok-2"));
        let i = the_instance(page.instances, "i-1234567890abcdef0")
            .unwrap()
            .unwrap();
        assert_eq!(i.reservation_id, "r-1234567890abcdef0");
        assert_eq!(i.owner_id, "123456789012");
        assert_eq!(i.state, "running");
        assert_eq!(i.instance_type, "t2.micro");
        assert_eq!(i.image_id, "ami-bff32ccc");
        assert_eq!(i.private_ip, Some("192.168.1.88".parse().unwrap()));
        assert_eq!(i.public_ip, Some("54.194.252.215".parse().unwrap()));
        assert_eq!(
            i.public_dns,
            "ec2-54-194-252-215.eu-west-1.compute.amazonaws.com"
        );
        assert_eq!(
            i.profile_arn.as_deref(),
            Some("arn:aws:iam::123456789012:instance-profile/hsm-client")
        );
        assert_eq!(i.vpc_id.as_deref(), Some("vpc-11112222"));
        assert_eq!(
            i.launch_time,
            UNIX_EPOCH + Duration::from_secs(1_525_797_979)
        );
        let want: Vec<IpAddr> = [
            "192.168.1.88",
            "54.194.252.215",
            "192.168.2.10",
            "192.168.2.11",
            "3.250.1.2",
            "2001:db8::1234",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(i.addresses, want);
    }

    #[test]
    fn empty_and_broken_answers() {
        let empty = "<DescribeInstancesResponse><requestId>x</requestId><reservationSet/></DescribeInstancesResponse>";
        let page = parse_describe_instances(empty).unwrap();
        assert!(page.instances.is_empty() && page.next_token.is_none());
        assert!(
            the_instance(page.instances, "i-12345678")
                .unwrap()
                .is_none()
        );

        let bad_ip = ANSWER.replace(
            "<ipAddress>54.194.252.215</ipAddress>",
            "<ipAddress>54.194.252</ipAddress>",
        );
        assert!(matches!(
            parse_describe_instances(&bad_ip),
            Err(AwsError::Unavailable(_))
        ));
        let no_launch = ANSWER.replace("<launchTime>2018-05-08T16:46:19.000Z</launchTime>", "");
        assert!(matches!(
            parse_describe_instances(&no_launch),
            Err(AwsError::Unavailable(_))
        ));
        assert!(parse_describe_instances("<Response/>").is_err());
    }

    #[test]
    fn a_doubled_instance_is_not_picked() {
        let page = parse_describe_instances(ANSWER).unwrap();
        let mut twice = page.instances.clone();
        twice.extend(page.instances);
        assert!(the_instance(twice, "i-1234567890abcdef0").is_err());
    }

    #[test]
    fn instance_ids() {
        assert!(is_instance_id("i-1234567890abcdef0"));
        assert!(is_instance_id("i-12345678"));
        assert!(!is_instance_id("i-1234567890ABCDEF0"));
        assert!(!is_instance_id("i-123"));
        assert!(!is_instance_id("r-12345678"));
        assert!(!is_instance_id("i-12345678&Action=RunInstances"));
    }
}
