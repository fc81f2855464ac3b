//! p11shim-broker: verifies what the platform says about an instance or a
//! pod, applies the role's rules (membership, instance age, one-time use)
//! and hands the role its HSM credentials.
//!
//! Layout: [`server`] (HTTP front) → [`broker`] (one decision) →
//! [`methods`] (evidence → identity, using [`aws`], [`iid`], [`k8s`]) →
//! [`store`] (one-time use) → credentials from [`secrets`], sealed with
//! `p11shim_proto::seal`. [`approvals`]: quorum (m-of-n) approval of key
//! use, beside the credentials path.

pub mod approvals;
pub mod aws;
pub mod broker;
pub mod clientip;
pub mod clock;
pub mod config;
pub mod iid;
pub mod k8s;
pub mod methods;
pub mod metrics;
pub mod ratelimit;
pub mod run;
pub mod secrets;
pub mod server;
pub mod store;
