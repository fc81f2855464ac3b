//! Cloud and storage peers the broker tests start themselves, on loopback:
//! moto (EC2 + IAM), our IMDSv2 emulator, the Kubernetes fake, PostgreSQL
//! and Redis. Each is a child process killed when its handle drops.

pub mod broker;
pub mod databases;
pub mod imds;
pub mod k8s;
pub mod moto;
