//! The HTTP(S) front: `POST /v1/credentials`, the approval endpoints
//! under `/v1/approvals` (docs/quorum.md), `GET /healthz`, `GET /metrics`.
//! Bodies are bounded, slow clients time out, every answer carries the
//! broker's request id, and errors are `application/problem+json` with a
//! coarse kind only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use p11shim_proto::approval::{APPROVALS_PATH, ApprovalStatus, Consume, Decision, NewApproval};
use p11shim_proto::{CREDENTIALS_PATH, ErrorKind, MAX_REQUEST_BYTES, Problem, Request};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::approvals;
use crate::broker::{Broker, Refusal, new_request_id};
use crate::clientip::client_ip;
use crate::methods::Denial;

const REQUEST_ID: &str = "x-request-id";

/// The router, for serving and for tests.
pub fn router(broker: Arc<Broker>) -> Router {
    let timeout = broker.cfg.server.request_timeout;
    let inflight = broker.cfg.server.max_connections;
    Router::new()
        .route(CREDENTIALS_PATH, post(credentials))
        .route(APPROVALS_PATH, post(approval_create).get(approval_list))
        .route("/v1/approvals/{id}", get(approval_show))
        .route("/v1/approvals/{id}/approve", post(approval_approve))
        .route("/v1/approvals/{id}/reject", post(approval_reject))
        .route("/v1/approvals/{id}/consume", post(approval_consume))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(tower::limit::ConcurrencyLimitLayer::new(inflight))
        .with_state(broker)
}

fn problem(
    kind: ErrorKind,
    status: StatusCode,
    rid: &str,
    retry_after: Option<Duration>,
) -> Response {
    let mut p = Problem::new(kind, rid);
    p.status = status.as_u16();
    p.retry_after = retry_after.map(|d| d.as_secs().max(1));
    let body = serde_json::to_vec(&p).unwrap_or_default();
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(s) = p.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if let Ok(v) = HeaderValue::from_str(rid) {
        h.insert(REQUEST_ID, v);
    }
    r
}

fn refusal(r: Refusal, rid: &str) -> Response {
    let status = StatusCode::from_u16(r.kind.status()).unwrap_or(StatusCode::FORBIDDEN);
    problem(r.kind, status, rid, r.retry_after)
}

fn bad(rid: &str, status: StatusCode, why: &str, ip: IpAddr) -> Response {
    warn!(request_id = rid, client_ip = %ip, reason = why, outcome = "bad_request", "request refused");
    problem(ErrorKind::BadRequest, status, rid, None)
}

async fn credentials(
    State(b): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let rid = new_request_id();
    let xff: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let ip = match client_ip(peer.ip(), &xff, &b.cfg.server.trusted_proxies) {
        Ok(ip) => ip,
        Err(e) => {
            return bad(
                &rid,
                StatusCode::BAD_REQUEST,
                &format!("X-Forwarded-For: {e:?}"),
                peer.ip(),
            );
        }
    };
    if let Err(r) = b.admit(&rid, ip) {
        return refusal(r, &rid);
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().eq_ignore_ascii_case("application/json"))
        .unwrap_or(false);
    if !json {
        return bad(
            &rid,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content type is not application/json",
            ip,
        );
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BYTES) {
        return bad(&rid, StatusCode::PAYLOAD_TOO_LARGE, "body too large", ip);
    }
    let bytes = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return bad(
                &rid,
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large or broken",
                ip,
            );
        }
    };
    let req: Request = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            // serde's message names the field and position, never values.
            let why = format!(
                "malformed JSON: line {} column {} ({:?})",
                e.line(),
                e.column(),
                e.classify()
            );
            return bad(&rid, StatusCode::BAD_REQUEST, &why, ip);
        }
    };
    match b.decide(&rid, ip, req).await {
        Ok(resp) => {
            let mut r = axum::Json(resp).into_response();
            let h = r.headers_mut();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            if let Ok(v) = HeaderValue::from_str(&rid) {
                h.insert(REQUEST_ID, v);
            }
            r
        }
        Err(r) => refusal(r, &rid),
    }
}

/// What every approval endpoint does first: a request id, the client's
/// address (`X-Forwarded-For` from trusted proxies only) and its rate.
/// `Err` is the answer of a refusal.
fn admit_approval(
    b: &Broker,
    peer: SocketAddr,
    headers: &HeaderMap,
    endpoint: &str,
) -> Result<(String, IpAddr), Box<Response>> {
    let rid = new_request_id();
    let xff: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let ip = match client_ip(peer.ip(), &xff, &b.cfg.server.trusted_proxies) {
        Ok(ip) => ip,
        Err(e) => {
            b.metrics.approval("refused");
            return Err(Box::new(bad(
                &rid,
                StatusCode::BAD_REQUEST,
                &format!("{endpoint}: X-Forwarded-For: {e:?}"),
                peer.ip(),
            )));
        }
    };
    if let Err(r) = b.admit_approval_call(&rid, ip) {
        b.metrics.approval("refused");
        return Err(Box::new(refusal(r, &rid)));
    }
    Ok((rid, ip))
}

/// A JSON body: `application/json`, at most `MAX_REQUEST_BYTES`, of type `T`.
async fn json_body<T: DeserializeOwned>(
    b: &Broker,
    rid: &str,
    ip: IpAddr,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, Response> {
    let fail = |status, why: &str| {
        b.metrics.approval("refused");
        bad(rid, status, why, ip)
    };
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(fail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content type is not application/json",
        ));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BYTES) {
        return Err(fail(StatusCode::PAYLOAD_TOO_LARGE, "body too large"));
    }
    let bytes = axum::body::to_bytes(body, MAX_REQUEST_BYTES)
        .await
        .map_err(|_| fail(StatusCode::PAYLOAD_TOO_LARGE, "body too large or broken"))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let why = format!(
            "malformed JSON: line {} column {} ({:?})",
            e.line(),
            e.column(),
            e.classify()
        );
        fail(StatusCode::BAD_REQUEST, &why)
    })
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// A JSON answer with the request id, never cached.
fn json_answer<T: serde::Serialize>(status: StatusCode, rid: &str, v: &T) -> Response {
    let mut r = (status, axum::Json(v)).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(rid) {
        h.insert(REQUEST_ID, v);
    }
    r
}

/// The answer to a refused approval call: counted, logged with its reason,
/// the client told the kind only.
fn approval_refused(b: &Broker, rid: &str, endpoint: &str, d: &Denial) -> Response {
    approvals::refused(b, rid, endpoint, d);
    let status = StatusCode::from_u16(d.kind.status()).unwrap_or(StatusCode::FORBIDDEN);
    problem(d.kind, status, rid, d.retry_after)
}

async fn approval_create(
    State(b): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (rid, ip) = match admit_approval(&b, peer, &headers, "create") {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let n: NewApproval = match json_body(&b, &rid, ip, &headers, body).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    match approvals::create(&b, &rid, bearer(&headers), n).await {
        Ok(a) => {
            let st = if a.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            json_answer(st, &rid, &a.approval)
        }
        Err(d) => approval_refused(&b, &rid, "create", &d),
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    status: Option<ApprovalStatus>,
}

async fn approval_list(
    State(b): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (rid, ip) = match admit_approval(&b, peer, &headers, "list") {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let Ok(Query(q)) = query else {
        return bad(
            &rid,
            StatusCode::BAD_REQUEST,
            "list: status is one of pending, approved, rejected, expired, consumed",
            ip,
        );
    };
    match approvals::list(&b, q.status).await {
        Ok(l) => json_answer(StatusCode::OK, &rid, &l),
        Err(d) => approval_refused(&b, &rid, "list", &d),
    }
}

async fn approval_show(
    State(b): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (rid, _) = match admit_approval(&b, peer, &headers, "show") {
        Ok(x) => x,
        Err(r) => return *r,
    };
    match approvals::show(&b, &id).await {
        Ok(a) => json_answer(StatusCode::OK, &rid, &a),
        Err(d) => {
            // A read of an unknown id is not a refusal worth counting.
            warn!(request_id = rid, approval_id = %id.escape_debug(), outcome = d.kind.as_str(), reason = %d.reason, "approval read refused");
            let status = StatusCode::from_u16(d.kind.status()).unwrap_or(StatusCode::NOT_FOUND);
            problem(d.kind, status, &rid, d.retry_after)
        }
    }
}

async fn approval_decide(
    b: Arc<Broker>,
    peer: SocketAddr,
    id: String,
    headers: HeaderMap,
    body: Body,
    approve: bool,
) -> Response {
    let endpoint = if approve { "approve" } else { "reject" };
    let (rid, ip) = match admit_approval(&b, peer, &headers, endpoint) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let d: Decision = match json_body(&b, &rid, ip, &headers, body).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    match approvals::decide(&b, &rid, &id, d, approve).await {
        Ok(a) => json_answer(StatusCode::OK, &rid, &a),
        Err(d) => approval_refused(&b, &rid, endpoint, &d),
    }
}

async fn approval_approve(
    State(b): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    approval_decide(b, peer, id, headers, body, true).await
}

async fn approval_reject(
    State(b): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    approval_decide(b, peer, id, headers, body, false).await
}

async fn approval_consume(
    State(b): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (rid, ip) = match admit_approval(&b, peer, &headers, "consume") {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let c: Consume = match json_body(&b, &rid, ip, &headers, body).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match approvals::consume(&b, &rid, bearer(&headers), &id, c).await {
        Ok(a) => json_answer(StatusCode::OK, &rid, &a),
        Err(d) => approval_refused(&b, &rid, "consume", &d),
    }
}

async fn healthz(State(b): State<Arc<Broker>>) -> Response {
    let store = Arc::clone(&b.store);
    let ok = tokio::task::spawn_blocking(move || store.ping()).await;
    match ok {
        Ok(Ok(())) => (StatusCode::OK, "ok\n").into_response(),
        Ok(Err(e)) => {
            warn!(error = %e, "health check: store");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store check failed\n").into_response(),
    }
}

async fn metrics(State(b): State<Arc<Broker>>) -> Response {
    let mut r = b.metrics.render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// Removes expired replay entries and idle rate-limit buckets, forever.
pub async fn tidy_loop(b: Arc<Broker>) {
    let every = b.cfg.server.tidy_interval;
    loop {
        tokio::time::sleep(every).await;
        b.limits.tidy();
        let before = crate::clock::unix(b.clock.now());
        let store = Arc::clone(&b.store);
        match tokio::task::spawn_blocking(move || store.tidy(before)).await {
            Ok(Ok(n)) => {
                b.metrics.tidied.inc_by(n);
                if n > 0 {
                    info!(removed = n, "expired replay entries removed");
                }
            }
            Ok(Err(e)) => warn!(error = %e, "tidying the replay store"),
            Err(e) => warn!(error = %e, "tidy task"),
        }
        // Requests are kept for the replay retention after they expire.
        let before = before - i64::try_from(b.cfg.server.replay_retention.as_secs()).unwrap_or(0);
        let store = Arc::clone(&b.store);
        let tidied = tokio::task::spawn_blocking(move || {
            store.approvals().map(|a| a.tidy_approvals(before))
        })
        .await;
        match tidied {
            Ok(Some(Ok(n))) if n > 0 => info!(removed = n, "expired approval requests removed"),
            Ok(Some(Err(e))) => warn!(error = %e, "tidying the approval store"),
            Err(e) => warn!(error = %e, "tidy task"),
            _ => {}
        }
    }
}
