//! Token buckets per source address and per claimed identity, checked
//! before any cloud call so the broker cannot be used to burn API quota.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{Limits, Rate};

#[derive(Debug)]
pub struct Limiters {
    ip: DefaultKeyedRateLimiter<IpAddr>,
    identity: DefaultKeyedRateLimiter<String>,
    /// The approval endpoints: cheap calls, polled by waiting signers and
    /// used by approvers, so they have their own bucket per address.
    approvals: DefaultKeyedRateLimiter<IpAddr>,
}

fn quota(r: Rate) -> Quota {
    let per_minute = NonZeroU32::new(r.per_minute).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(r.burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(per_minute).allow_burst(burst)
}

fn check<K: Hash + Eq + Clone>(l: &DefaultKeyedRateLimiter<K>, k: &K) -> Result<(), Duration> {
    l.check_key(k)
        .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
}

impl Limiters {
    pub fn new(l: &Limits) -> Limiters {
        Limiters {
            ip: RateLimiter::keyed(quota(l.per_ip)),
            identity: RateLimiter::keyed(quota(l.per_identity)),
            approvals: RateLimiter::keyed(quota(l.approvals_per_ip)),
        }
    }

    /// `Err(wait)` when `ip` is over its rate.
    pub fn ip(&self, ip: IpAddr) -> Result<(), Duration> {
        check(&self.ip, &ip)
    }

    /// `Err(wait)` when `ip` is over its rate of approval calls.
    pub fn approvals(&self, ip: IpAddr) -> Result<(), Duration> {
        check(&self.approvals, &ip)
    }

    /// `Err(wait)` when the claimed identity is over its rate.
    pub fn identity(&self, id: &str) -> Result<(), Duration> {
        check(&self.identity, &id.to_owned())
    }

    /// Forgets keys whose buckets are full again.
    pub fn tidy(&self) {
        self.ip.retain_recent();
        self.identity.retain_recent();
        self.approvals.retain_recent();
    }
}
