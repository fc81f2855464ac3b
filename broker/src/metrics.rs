//! Prometheus metrics served at `GET /metrics`.

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Decision {
    pub method: String,
    /// `granted`, `reauthenticated`, or the error kind.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Scope {
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApprovalEvent {
    /// `requested`, `approved`, `rejected`, `consumed` or `refused`.
    pub event: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub decisions: Family<Decision, Counter>,
    pub rate_limited: Family<Scope, Counter>,
    pub request_seconds: Histogram,
    pub store_seconds: Histogram,
    pub tidied: Counter,
    pub approvals: Family<ApprovalEvent, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("p11shim_broker");
        let decisions = Family::<Decision, Counter>::default();
        let rate_limited = Family::<Scope, Counter>::default();
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let request_seconds = Histogram::new(buckets);
        let store_seconds = Histogram::new(buckets);
        let tidied = Counter::default();
        registry.register(
            "decisions",
            "Credential requests by method and outcome",
            decisions.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit, by scope",
            rate_limited.clone(),
        );
        registry.register(
            "request_seconds",
            "Time to answer a credential request",
            request_seconds.clone(),
        );
        registry.register(
            "store_seconds",
            "Time of one replay-store consume",
            store_seconds.clone(),
        );
        registry.register(
            "replay_entries_tidied",
            "Expired replay entries removed",
            tidied.clone(),
        );
        let approvals = Family::<ApprovalEvent, Counter>::default();
        registry.register(
            "approvals",
            "Quorum approval requests created, approved, rejected, consumed, and refusals of the approval endpoints",
            approvals.clone(),
        );
        Metrics {
            approvals,
            registry,
            decisions,
            rate_limited,
            request_seconds,
            store_seconds,
            tidied,
        }
    }

    pub fn decision(&self, method: &str, outcome: &str) {
        self.decisions
            .get_or_create(&Decision {
                method: method.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn approval(&self, event: &str) {
        self.approvals
            .get_or_create(&ApprovalEvent {
                event: event.to_owned(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}
