//! The broker's AWS calls: EC2 `DescribeInstances` and IAM
//! `ListInstanceProfilesForRole`, SigV4-signed by hand.

use std::net::IpAddr;
use std::time::SystemTime;

use serde::Deserialize;

/// `[aws]` in the broker configuration.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Region of the EC2 calls when the evidence does not name one.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint override for EC2 (and IAM unless `iam_endpoint` is set).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub iam_endpoint: Option<String>,
}

/// An EC2 instance as `DescribeInstances` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    pub reservation_id: String,
    pub owner_id: String,
    /// `running`, `stopped`, `terminated`, …
    pub state: String,
    pub instance_type: String,
    pub image_id: String,
    pub private_ip: Option<IpAddr>,
    pub public_ip: Option<IpAddr>,
    pub private_dns: String,
    pub public_dns: String,
    pub launch_time: SystemTime,
    pub profile_arn: Option<String>,
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
    /// Every address of every network interface: private, public, IPv6.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    /// The API could not answer (network, 5xx, throttling, our own
    /// credentials refused): the broker answers `unavailable`.
    #[error("AWS unavailable: {0}")]
    Unavailable(String),
    /// The API answered with an error about the request.
    #[error("AWS error {code}: {message}")]
    Api { code: String, message: String },
}
