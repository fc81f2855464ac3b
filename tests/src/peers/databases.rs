//! Throwaway PostgreSQL and Redis servers (the `p11shim-servers` crate,
//! shared with the benchmark).

pub use p11shim_servers::*;
