//! One credential decision: rate limits, syntax, the role's method, the
//! one-time-use gate, then the credentials (sealed when asked).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use p11shim_proto::{
    Credentials, ErrorKind, Method, Mtls, Request, Response, Secret, VERSION, b64_url, seal,
};
use sha2::{Digest, Sha256};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::aws::AwsClient;
use crate::clock::{Clock, rfc3339, unix};
use crate::config::{Config, Role};
use crate::iid::CertPins;
use crate::methods::{self, Context, Denial, Verified};
use crate::metrics::{Metrics, Scope};
use crate::ratelimit::Limiters;
use crate::store::{Claim, Outcome, ReplayStore};

/// The broker's shared state.
#[derive(Debug)]
pub struct Broker {
    pub cfg: Config,
    pub store: Arc<dyn ReplayStore>,
    pub clock: Arc<dyn Clock>,
    pub limits: Limiters,
    pub metrics: Metrics,
    /// One verifier per `[k8s.<name>]` cluster, built by `run::build`.
    pub k8s: methods::k8s::Clusters,
    /// The EC2 and IAM client of the AWS methods (`None` without `[aws]`).
    pub aws: Option<AwsClient>,
    /// The certificates `aws-iid` documents are verified against.
    pub iid_pins: CertPins,
    /// Approvers' keys, the approval token key and the quorum rules; set
    /// by `run::build` (empty here: no token is minted or accepted).
    pub approvals: crate::approvals::Approvals,
}

/// A refusal as the HTTP layer answers it.
#[derive(Debug)]
pub struct Refusal {
    pub kind: ErrorKind,
    pub retry_after: Option<Duration>,
}

impl Broker {
    pub fn new(cfg: Config, store: Arc<dyn ReplayStore>, clock: Arc<dyn Clock>) -> Broker {
        let limits = Limiters::new(&cfg.limits);
        Broker {
            cfg,
            store,
            clock,
            limits,
            metrics: Metrics::new(),
            k8s: methods::k8s::Clusters::new(),
            aws: None,
            iid_pins: CertPins::aws(),
            approvals: crate::approvals::Approvals::default(),
        }
    }

    /// Rate limit per source address, before the body is even read.
    pub fn admit(&self, rid: &str, client_ip: IpAddr) -> Result<(), Refusal> {
        self.limits.ip(client_ip).map_err(|wait| {
            self.metrics
                .rate_limited
                .get_or_create(&Scope { scope: "ip".into() })
                .inc();
            warn!(request_id = rid, %client_ip, "rate limited: source address");
            Refusal {
                kind: ErrorKind::RateLimited,
                retry_after: Some(wait),
            }
        })
    }

    /// The rate of approval calls from `client_ip`.
    pub fn admit_approval_call(&self, rid: &str, client_ip: IpAddr) -> Result<(), Refusal> {
        self.limits.approvals(client_ip).map_err(|wait| {
            self.metrics
                .rate_limited
                .get_or_create(&Scope {
                    scope: "approvals".into(),
                })
                .inc();
            warn!(request_id = rid, %client_ip, "rate limited: approval calls from this address");
            Refusal {
                kind: ErrorKind::RateLimited,
                retry_after: Some(wait),
            }
        })
    }

    /// Decides one parsed request.
    pub async fn decide(
        self: &Arc<Self>,
        rid: &str,
        client_ip: IpAddr,
        req: Request,
    ) -> Result<Response, Refusal> {
        let started = Instant::now();
        let method = req.method.map(Method::as_str).unwrap_or("none");
        let result = self.decide_inner(rid, client_ip, &req).await;
        self.metrics
            .request_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok((resp, outcome)) => {
                let o = if outcome == Outcome::Reauthenticated {
                    "reauthenticated"
                } else {
                    "granted"
                };
                self.metrics.decision(method, o);
                info!(request_id = rid, client_request_id = %req.request_id, %client_ip, role = %req.role, method, subject = %resp.subject, outcome = o, "credentials issued");
                Ok(resp)
            }
            Err((d, retry_after)) => {
                self.metrics.decision(method, d.kind.as_str());
                if d.kind == ErrorKind::AlreadyUsed {
                    warn!(request_id = rid, client_request_id = %req.request_id, %client_ip, role = %req.role, method, reason = %d.reason, "ALARM: identity already used; a second party holds this instance's evidence, or the client lost its nonce");
                } else {
                    warn!(request_id = rid, client_request_id = %req.request_id, %client_ip, role = %req.role, method, outcome = d.kind.as_str(), reason = %d.reason, "request refused");
                }
                Err(Refusal {
                    kind: d.kind,
                    retry_after,
                })
            }
        }
    }

    async fn decide_inner(
        self: &Arc<Self>,
        rid: &str,
        client_ip: IpAddr,
        req: &Request,
    ) -> Result<(Response, Outcome), (Denial, Option<Duration>)> {
        let plain = |d: Denial| {
            let wait = d.retry_after;
            (d, wait)
        };
        check_syntax(req).map_err(plain)?;
        let role = self
            .cfg
            .roles
            .get(&req.role)
            .ok_or_else(|| plain(Denial::denied(format!("no role '{}'", req.role))))?;
        let method = req
            .method
            .ok_or_else(|| plain(Denial::bad_request("method missing")))?;
        if !role.methods.contains(&method) {
            return Err(plain(Denial::denied(format!(
                "role does not accept {method}"
            ))));
        }
        if role.require_sealed && req.response_key.is_none() {
            return Err(plain(Denial::bad_request("role requires a response_key")));
        }
        if let Some(k) = &req.response_key {
            if k.alg != seal::ALG {
                return Err(plain(Denial::bad_request(
                    "unsupported response key algorithm",
                )));
            }
        }
        if let Some(id) = self.claimed_identity(method, req) {
            if let Err(wait) = self.limits.identity(&id) {
                self.metrics
                    .rate_limited
                    .get_or_create(&Scope {
                        scope: "identity".into(),
                    })
                    .inc();
                return Err((
                    Denial {
                        kind: ErrorKind::RateLimited,
                        reason: format!("identity {id} over its rate"),
                        retry_after: Some(wait),
                    },
                    Some(wait),
                ));
            }
        }
        let now = self.clock.now();
        let ctx = Context {
            role_name: &req.role,
            role,
            client_ip,
            now,
            limits: &self.limits,
            aws_region: self.cfg.aws.as_ref().and_then(|a| a.region.as_deref()),
        };
        let verified = self.verify(method, &ctx, req).await.map_err(|d| {
            if d.kind == ErrorKind::RateLimited {
                self.metrics
                    .rate_limited
                    .get_or_create(&Scope {
                        scope: "identity".into(),
                    })
                    .inc();
            }
            plain(d)
        })?;
        let outcome = self
            .consume(rid, req, role, &verified, now)
            .await
            .map_err(plain)?;
        let resp = self.grant(rid, req, role, &verified, now).map_err(plain)?;
        Ok((resp, outcome))
    }

    /// The identity a request claims, for the per-identity rate limit; read
    /// from the evidence before anything is verified.
    fn claimed_identity(&self, method: Method, req: &Request) -> Option<String> {
        match method {
            Method::AwsImdsFields => req.aws.as_ref().and_then(|a| a.instance_id.clone()),
            // The document names its instance only once verified; the
            // method limits that instance before any AWS call.
            Method::AwsIid => None,
            Method::StaticFingerprint => req
                .fingerprint
                .as_ref()
                .map(|f| p11shim_proto::fingerprint::fingerprint(&f.attributes)),
            Method::K8sSaToken => methods::k8s::claimed_identity(req.k8s.as_ref()),
        }
    }

    async fn verify(
        &self,
        method: Method,
        ctx: &Context<'_>,
        req: &Request,
    ) -> Result<Verified, Denial> {
        match method {
            Method::StaticFingerprint => {
                methods::fingerprint::verify(ctx, req.fingerprint.as_ref())
            }
            Method::K8sSaToken => {
                methods::k8s::verify(ctx, &self.cfg, &self.k8s, req.k8s.as_ref()).await
            }
            Method::AwsImdsFields => {
                methods::aws::imds_fields(ctx, self.aws_client()?, req.aws.as_ref()).await
            }
            Method::AwsIid => {
                methods::aws::iid(ctx, self.aws_client()?, &self.iid_pins, req.aws.as_ref()).await
            }
        }
    }

    fn aws_client(&self) -> Result<&AwsClient, Denial> {
        self.aws
            .as_ref()
            .ok_or_else(|| Denial::unavailable("no [aws] client in this broker"))
    }

    async fn consume(
        self: &Arc<Self>,
        rid: &str,
        req: &Request,
        role: &Role,
        v: &Verified,
        now: SystemTime,
    ) -> Result<Outcome, Denial> {
        let nonce_hash = req
            .client_nonce
            .as_ref()
            .map(|n| -> [u8; 32] { Sha256::digest(n.expose().as_bytes()).into() });
        let retention = role.ttl + self.cfg.server.replay_retention;
        let key = v.replay_key;
        let subject = v.subject.clone();
        let role_name = req.role.clone();
        let reauth = role.reauth;
        let first_use_allowed = v.first_use.is_ok();
        let me = Arc::clone(self);
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            let claim = Claim {
                key,
                role: &role_name,
                subject: &subject,
                nonce_hash,
                reauth,
                now: unix(now),
                expires_at: unix(now + retention),
                first_use: first_use_allowed,
            };
            me.store.consume(&claim)
        })
        .await
        .map_err(|e| Denial::unavailable(format!("replay store task: {e}")))?;
        self.metrics
            .store_seconds
            .observe(started.elapsed().as_secs_f64());
        match out {
            Ok(Outcome::FirstUse) => Ok(Outcome::FirstUse),
            Ok(Outcome::Reauthenticated) => Ok(Outcome::Reauthenticated),
            Ok(Outcome::NotAllowed) => Err(Denial::denied(format!(
                "first use refused: {}",
                v.first_use.err().unwrap_or("not allowed")
            ))),
            Ok(Outcome::AlreadyUsed) => Err(Denial {
                kind: ErrorKind::AlreadyUsed,
                reason: format!("{} already used (request {rid})", v.subject),
                retry_after: None,
            }),
            Err(e) => Err(Denial::unavailable(e.to_string())),
        }
    }

    fn grant(
        &self,
        rid: &str,
        req: &Request,
        role: &Role,
        v: &Verified,
        now: SystemTime,
    ) -> Result<Response, Denial> {
        let _ = rid;
        let pin = role
            .pin
            .read()
            .map_err(|e| Denial::unavailable(format!("role PIN: {e}")))?;
        let mtls = match (&role.mtls_cert, &role.mtls_key) {
            (Some(cert), Some(key)) => Some(Mtls {
                cert_pem: std::fs::read_to_string(cert).map_err(|e| {
                    Denial::unavailable(format!("mtls_cert {}: {}", cert.display(), e.kind()))
                })?,
                key_pem: Secret(
                    key.read()
                        .map_err(|e| Denial::unavailable(format!("mtls_key: {e}")))?,
                ),
                ca_pem: match &role.mtls_ca {
                    Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
                        Denial::unavailable(format!("mtls_ca {}: {}", p.display(), e.kind()))
                    })?),
                    None => None,
                },
            }),
            _ => None,
        };
        let audit_key = match &role.audit_key {
            Some(k) => {
                Some(Secret(k.read().map_err(|e| {
                    Denial::unavailable(format!("audit_key: {e}"))
                })?))
            }
            None => None,
        };
        let expires = now + role.ttl;
        let approval_token = self
            .approvals
            .token_for(&req.role, &v.subject, expires)?
            .map(Secret);
        let creds = Credentials {
            pin: Secret(pin),
            mtls,
            audit_key,
            approval_token,
        };
        let expires_at = rfc3339(expires);
        let policy = role
            .policy
            .as_ref()
            .map(|t| serde_json::to_value(t).unwrap_or(serde_json::Value::Null))
            .unwrap_or(serde_json::Value::Null);
        let mut resp = Response {
            v: VERSION,
            request_id: req.request_id.clone(),
            role: req.role.clone(),
            subject: v.subject.clone(),
            issued_at: rfc3339(now),
            expires_at,
            ttl_seconds: role.ttl.as_secs(),
            reauth: role.reauth,
            policy,
            credentials: None,
            sealed_credentials: None,
        };
        match &req.response_key {
            Some(k) => {
                let plain = Zeroizing::new(
                    serde_json::to_vec(&creds)
                        .map_err(|e| Denial::unavailable(format!("encode: {e}")))?,
                );
                let aad = seal::aad(
                    &resp.request_id,
                    &resp.role,
                    &resp.subject,
                    &resp.expires_at,
                );
                resp.sealed_credentials = Some(
                    seal::seal(k, &plain, aad)
                        .map_err(|e| Denial::bad_request(format!("response key: {e}")))?,
                );
            }
            None => resp.credentials = Some(creds),
        }
        Ok(resp)
    }
}

/// Field syntax, before any lookup.
fn check_syntax(req: &Request) -> Result<(), Denial> {
    if req.v != VERSION {
        return Err(Denial::bad_request(format!(
            "protocol version {} not served",
            req.v
        )));
    }
    let rid_ok = !req.request_id.is_empty()
        && req.request_id.len() <= 64
        && req
            .request_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !rid_ok {
        return Err(Denial::bad_request(
            "request_id must be 1-64 of [A-Za-z0-9-]",
        ));
    }
    if !crate::config::valid_role_name(&req.role) {
        return Err(Denial::bad_request("malformed role name"));
    }
    if let Some(n) = &req.client_nonce {
        let raw = b64_url()
            .decode(n.expose())
            .map_err(|_| Denial::bad_request("client_nonce is not base64url"))?;
        if !(16..=64).contains(&raw.len()) {
            return Err(Denial::bad_request("client_nonce must be 16 to 64 bytes"));
        }
    }
    Ok(())
}

/// A fresh request id for the broker's log.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
