//! The HTTP(S) front: `POST /v1/credentials`, `GET /healthz`,
//! `GET /metrics`. Bodies are bounded, slow clients time out, every answer
//! carries the broker's request id, and errors are
//! `application/problem+json` with a coarse kind only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use p11shim_proto::{CREDENTIALS_PATH, ErrorKind, MAX_REQUEST_BYTES, Problem, Request};
use tracing::{info, warn};

use crate::broker::{Broker, Refusal, new_request_id};
use crate::clientip::client_ip;

const REQUEST_ID: &str = "x-request-id";

/// The router, for serving and for tests.
pub fn router(broker: Arc<Broker>) -> Router {
    let timeout = broker.cfg.server.request_timeout;
    let inflight = broker.cfg.server.max_connections;
    Router::new()
        .route(CREDENTIALS_PATH, post(credentials))
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
    }
}
