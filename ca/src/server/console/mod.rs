//! The read-only web console (`mayfly-ca run --ui-listen ADDR`): server-rendered pages of the
//! mesh from the audit store, the registry, the issuance log and the grants, and a live stream
//! of decisions (server-sent events).
//!
//! On a loopback address it is plain HTTP for the person at this machine. Anywhere else it is
//! served only over TLS with the control plane's own SVID (the API listener's certificate,
//! rotated with it), to clients presenting an SVID of the trust domain whose SPIFFE ID is on the
//! allow list (`--ui-allow`): [`allowed`] is the one check.
//!
//! - [`routes`]: dispatch, security headers, the verification cache.
//! - [`pages`]: HTML (maud, escaped by default) of every page but the graph.
//! - [`graph`]: the mesh graph (edges from decisions, drawn as SVG).
//! - [`records`]: decision records read from audit lines.
//! - [`sse`]: the live decision stream.
//! - [`replay`]: policy what-if on the recorded decisions (a candidate pasted into a form).
//! - [`state`]: what the pages share (the follower's findings, the verification cache).
//!
//! Nothing here is on the API's request path: the console has its own listener and tasks, and
//! reads the store off the runtime's threads.

pub mod graph;
pub mod pages;
pub mod records;
pub mod replay;
pub mod routes;
pub mod sse;
pub mod state;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::ca::Ca;
use crate::svid::SvidInfo;
use crate::verify::{SpiffeClientVerifier, describe_tls_error, peer_identity};

/// Where the console listens unless told otherwise (`--ui-listen`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8445";

/// Most console connections open at once (each live view holds one).
pub const MAX_CONNECTIONS: usize = 64;

/// How the console is served.
#[derive(Debug, Clone)]
pub struct ConsoleOptions {
    /// The listener's address.
    pub listen: SocketAddr,
    /// Serve over TLS with the control plane's SVID, requiring an allowed client SVID
    /// (`--ui-tls`; required for an address that is not loopback).
    pub tls: bool,
    /// SPIFFE IDs allowed in over TLS (`--ui-allow`).
    pub allow: Vec<String>,
    /// Whether failing to bind is an error (an address given) or only a warning (the default
    /// address, which another control plane on the machine may hold).
    pub must_bind: bool,
}

/// Why the console's settings are refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// A non-loopback address without TLS would show the mesh to the network.
    #[error(
        "--ui-listen {0} is not a loopback address: the console is served there only over TLS \
         with client certificates (--ui-tls --ui-allow SPIFFE_ID)"
    )]
    NotLoopback(SocketAddr),
    /// TLS without anyone allowed in.
    #[error("--ui-tls needs at least one --ui-allow SPIFFE_ID: otherwise no one can open it")]
    NoneAllowed,
    /// An allow-list entry is not a SPIFFE ID.
    #[error("--ui-allow {0:?}: {1}")]
    BadId(String, crate::identity::id::IdError),
}

impl ConsoleOptions {
    /// Checks the settings: a non-loopback address needs TLS, TLS needs an allow list of valid
    /// SPIFFE IDs.
    pub fn check(&self) -> Result<(), ConsoleError> {
        if !self.listen.ip().is_loopback() && !self.tls {
            return Err(ConsoleError::NotLoopback(self.listen));
        }
        if self.tls && self.allow.is_empty() {
            return Err(ConsoleError::NoneAllowed);
        }
        for a in &self.allow {
            crate::identity::id::parse_id(a).map_err(|e| ConsoleError::BadId(a.clone(), e))?;
        }
        Ok(())
    }
}

/// Whether a client may see the console: anyone on plain loopback HTTP (the listener is
/// refused anywhere else), over TLS only a verified SVID, still valid, whose SPIFFE ID is on
/// the allow list. The one place this is decided.
pub fn allowed(opts: &ConsoleOptions, peer: Option<&SvidInfo>) -> bool {
    if !opts.tls {
        return opts.listen.ip().is_loopback();
    }
    let Some(peer) = peer else { return false };
    if peer.not_after <= time::OffsetDateTime::now_utc() {
        return false;
    }
    let id = peer.id.to_string();
    opts.allow.contains(&id)
}

/// Serves the console on `listener` until `shutdown` flips.
pub async fn serve(
    ca: Arc<Ca>,
    listener: TcpListener,
    opts: ConsoleOptions,
    shutdown: watch::Receiver<bool>,
) {
    let acceptor = if opts.tls {
        let verifier = Arc::new(SpiffeClientVerifier::new(ca.bundles()));
        match crate::tls::server_config_with(ca.credentials(), verifier, &[b"http/1.1"]) {
            Ok(c) => Some(TlsAcceptor::from(Arc::new(c))),
            Err(e) => {
                tracing::error!(error = %e, "console: cannot build the TLS configuration");
                return;
            }
        }
    } else {
        None
    };
    let state = Arc::new(state::State::new(ca.clone(), opts, shutdown.clone()));
    let poller = tokio::spawn(sse::poll(state.clone(), shutdown.clone()));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let limit = crate::accept::Limit::new(slots, |_: &SocketAddr, first| {
        if first {
            warn!(
                limit = MAX_CONNECTIONS,
                "console: connection limit reached; closing new connections"
            );
        }
    });
    crate::accept::serve("console", listener, shutdown, limit, |tcp, addr| {
        let state = state.clone();
        let acceptor = acceptor.clone();
        let span = tracing::info_span!("console", peer = %addr);
        (span, async move {
            match acceptor {
                None => connection(state, None, TokioIo::new(tcp)).await,
                Some(acceptor) => {
                    let timeout = state.ca.settings().client_timeout;
                    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            debug!(error = %describe_tls_error(&e), "console: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let peer = peer_identity(tls.get_ref().1.peer_certificates()).ok();
                    connection(state, peer, TokioIo::new(tls)).await;
                }
            }
        })
    })
    .await;
    poller.abort();
}

/// One HTTP/1.1 connection.
async fn connection<IO>(state: Arc<state::State>, peer: Option<SvidInfo>, io: TokioIo<IO>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(routes::handle(state, peer.as_ref(), req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024)
        .serve_connection(io, svc)
        .await
    {
        debug!(error = %e, "console connection ended with an error");
    }
}
