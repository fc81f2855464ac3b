//! p11shim-broker: verifies what the platform says about an instance or a
//! pod, applies the role's rules (membership, instance age, one-time use)
//! and hands the role its HSM credentials.

pub mod aws;
pub mod iid;
pub mod k8s;
pub mod secrets;
pub mod store;
