//! Starting and stopping a broker: in `main`, or on a thread of its own
//! (embedding and tests).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum_server::Handle;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use hyper_util::rt::TokioTimer;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::clock::Clock;
use crate::config::Config;
use crate::server::{router, tidy_loop};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("replay store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS certificate or key: {0}")]
    Tls(std::io::Error),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Other(String),
    #[error("Kubernetes: {0}")]
    K8s(#[from] crate::k8s::K8sError),
    #[error("[aws]: {0}")]
    Aws(#[from] crate::aws::AwsError),
    #[error("[aws] iid_cert_dir: {0}")]
    IidPins(#[from] crate::iid::IidError),
    #[error("approvals: {0}")]
    Approvals(#[from] crate::approvals::ApprovalsError),
}

/// Builds the broker state from a validated configuration.
pub fn build(cfg: Config, clock: Arc<dyn Clock>) -> Result<Arc<Broker>, StartError> {
    let store = crate::store::open(&cfg.store)?;
    let aws = cfg
        .aws
        .as_ref()
        .map(crate::aws::AwsClient::new)
        .transpose()?;
    let iid_pins = iid_pins(cfg.aws.as_ref())?;
    let k8s = crate::methods::k8s::clusters(&cfg)?;
    let approvals = crate::approvals::Approvals::load(&cfg)?;
    let mut broker = Broker::new(cfg, Arc::from(store), clock);
    broker.approvals = approvals;
    broker.k8s = k8s;
    broker.aws = aws;
    broker.iid_pins = iid_pins;
    Ok(Arc::new(broker))
}

/// AWS's pinned certificates, or a test directory's in builds with
/// `test-overrides` (the configuration refuses `iid_cert_dir` in others).
fn iid_pins(aws: Option<&crate::aws::AwsConfig>) -> Result<crate::iid::CertPins, StartError> {
    match aws.and_then(|a| a.iid_cert_dir.as_deref()) {
        None => Ok(crate::iid::CertPins::aws()),
        #[cfg(feature = "test-overrides")]
        Some(dir) => {
            let pins = crate::iid::CertPins::from_dir(dir)?;
            warn!(
                dir = %dir.display(),
                "TEST OVERRIDE: identity documents are verified against the certificates in iid_cert_dir, NOT AWS's; never use this outside tests"
            );
            Ok(pins)
        }
        #[cfg(not(feature = "test-overrides"))]
        Some(_) => Err(StartError::Other(
            "[aws] iid_cert_dir is read only by builds with the test-overrides feature".into(),
        )),
    }
}

/// Installs the process-wide TLS provider once.
fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Serves `broker` on `listener` until `handle` shuts it down.
pub async fn serve(
    broker: Arc<Broker>,
    listener: std::net::TcpListener,
    handle: Handle,
) -> Result<(), StartError> {
    listener
        .set_nonblocking(true)
        .map_err(StartError::Runtime)?;
    let addr = listener.local_addr().map_err(StartError::Runtime)?;
    let app = router(Arc::clone(&broker)).into_make_service_with_connect_info::<SocketAddr>();
    let header_timeout = broker.cfg.server.header_timeout;
    tokio::spawn(tidy_loop(Arc::clone(&broker)));
    let s = &broker.cfg.server;
    match (&s.tls_cert, &s.tls_key) {
        (Some(cert), Some(key)) => {
            tls_provider();
            let tls = RustlsConfig::from_pem_file(cert, key).await.map_err(|e| {
                StartError::Tls(std::io::Error::new(
                    e.kind(),
                    format!("{}, {}: {e}", cert.display(), key.display()),
                ))
            })?;
            info!(%addr, "serving HTTPS");
            // TCP_NODELAY: after the handshake rustls sends its session
            // tickets, and with Nagle the small answer that follows waits
            // for the client's delayed ACK of them (40 ms on Linux).
            let mut server = axum_server::from_tcp(listener)
                .acceptor(
                    RustlsAcceptor::new(tls)
                        .handshake_timeout(header_timeout)
                        .acceptor(NoDelayAcceptor::new()),
                )
                .handle(handle);
            server
                .http_builder()
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            server.serve(app).await.map_err(StartError::Runtime)
        }
        _ => {
            warn!(%addr, "serving plain HTTP on loopback: for tests and demos only");
            let mut server = axum_server::from_tcp(listener)
                .acceptor(NoDelayAcceptor::new())
                .handle(handle);
            server
                .http_builder()
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            server.serve(app).await.map_err(StartError::Runtime)
        }
    }
}

/// A broker serving on a thread of its own.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub broker: Arc<Broker>,
    handle: Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// `http://addr` or `https://addr`.
    pub fn url(&self) -> String {
        let scheme = if self.broker.cfg.server.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.handle.graceful_shutdown(Some(Duration::from_secs(2)));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a broker on its own thread and runtime; returns once it listens.
pub fn spawn(cfg: Config, clock: Arc<dyn Clock>) -> Result<Running, StartError> {
    let listen = cfg.server.listen;
    let listener = std::net::TcpListener::bind(listen).map_err(|error| StartError::Listen {
        addr: listen,
        error,
    })?;
    let addr = listener.local_addr().map_err(StartError::Runtime)?;
    let broker = build(cfg, clock)?;
    let handle = Handle::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("p11shim-broker")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let (b, h) = (Arc::clone(&broker), handle.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("p11shim-broker".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut served = tokio::spawn(serve(b, listener, h.clone()));
                // Serving can fail before it listens, and then `listening`
                // never returns.
                let done = tokio::select! {
                    l = h.listening() => {
                        let _ = tx.send(l.is_some());
                        served.await
                    }
                    done = &mut served => {
                        let _ = tx.send(false);
                        done
                    }
                };
                match done {
                    Ok(Err(e)) => warn!(error = %e, "broker stopped"),
                    Err(e) => warn!(error = %e, "broker task"),
                    Ok(Ok(())) => {}
                }
            });
        })
        .map_err(StartError::Runtime)?;
    match rx.recv() {
        Ok(true) => Ok(Running {
            addr,
            broker,
            handle,
            thread: Some(thread),
        }),
        _ => {
            let _ = thread.join();
            Err(StartError::Other(
                "the broker did not start listening".into(),
            ))
        }
    }
}

/// What `p11shim-broker check` (and `p11shim config check --broker`) proves
/// beyond the syntax: the store answers, every cluster's CA, pinned JWKS
/// and token load, every role's secrets can be read (never printed), every
/// approver's key loads, and the approval token key is long enough.
pub fn check(cfg: &Config) -> Result<(), String> {
    let store = crate::store::open(&cfg.store).map_err(|e| e.to_string())?;
    store.ping().map_err(|e| e.to_string())?;
    let approvals = crate::approvals::Approvals::load(cfg).map_err(|e| e.to_string())?;
    if let Some(role) = cfg.roles.keys().find(|r| approvals.has_quorum(r)) {
        if store.approvals().is_none() {
            return Err(format!(
                "roles.{role}.policy.quorum: the {} store keeps no approvals",
                store.kind()
            ));
        }
    }
    crate::methods::k8s::clusters(cfg).map_err(|e| e.to_string())?;
    for (name, r) in &cfg.roles {
        r.pin.read().map_err(|e| format!("roles.{name}.pin: {e}"))?;
        if let Some(k) = &r.mtls_key {
            k.read()
                .map_err(|e| format!("roles.{name}.mtls_key: {e}"))?;
        }
    }
    Ok(())
}
