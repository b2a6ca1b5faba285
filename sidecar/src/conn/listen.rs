//! The traffic listeners: bound at start (a taken port fails the start), listening only once
//! the sidecar is ready, then served by [`mayfly_ca::accept`] under the connection limit, one
//! task and one span per connection, handed to [`tcp`] or [`http`] by protocol.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use mayfly_ca::accept::{self, Limit};
use mayfly_ca::tls::server_config;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, info_span, warn};

use super::{Shared, handshake, http, tcp};
use crate::config::{self, Inbound, Outbound, Protocol};
use crate::metrics::{Direction, Metrics};
use crate::ready::Readiness;

/// One connection's task, as handed to [`accept::serve`]: boxed, so that the task spawned for
/// it holds the connection's future once (a future moved into an `async` block and awaited
/// there is laid out twice, and an idle connection's task lives as long as the connection).
type ConnTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A listener that could not be bound or could not listen.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {what} {addr}: {source}")]
pub struct BindError {
    /// Which listener.
    pub what: String,
    /// The address.
    pub addr: SocketAddr,
    /// The OS error.
    pub source: std::io::Error,
}

/// The listen backlog: bursts of new connections (a deploy, a reconnect storm) must not
/// overflow the kernel's accept queue (the default is 128 here).
const BACKLOG: u32 = 4096;

/// A bound socket that is not listening yet.
pub struct Reserved {
    what: String,
    /// The bound address (the port chosen, if 0 was asked for).
    addr: SocketAddr,
    socket: TcpSocket,
}

/// Binds `addr` (the port is taken and its errors surface now) without listening.
pub fn reserve(what: &str, addr: SocketAddr) -> Result<Reserved, BindError> {
    let err = |source| BindError {
        what: what.into(),
        addr,
        source,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    let addr = socket.local_addr().unwrap_or(addr);
    Ok(Reserved {
        what: what.into(),
        addr,
        socket,
    })
}

impl Reserved {
    /// Starts listening.
    pub fn listen(self) -> Result<TcpListener, BindError> {
        let (what, addr) = (self.what, self.addr);
        self.socket
            .listen(BACKLOG)
            .map_err(|source| BindError { what, addr, source })
    }
}

/// The traffic listeners, bound at start and listening only once the sidecar is ready.
pub struct Held {
    inbound: Vec<(config::Inbound, Reserved)>,
    outbound: Vec<(config::Outbound, Reserved)>,
}

impl Held {
    /// Binds every traffic listener (none listens yet): a port that is taken fails now.
    pub fn reserve(inbound: &[Inbound], outbound: &[Outbound]) -> Result<Self, BindError> {
        let mut held = Self {
            inbound: Vec::new(),
            outbound: Vec::new(),
        };
        for (n, i) in inbound.iter().enumerate() {
            let what = match n {
                0 => "inbound".to_owned(),
                n => format!("inbound[{n}]"),
            };
            held.inbound.push((i.clone(), reserve(&what, i.listen)?));
        }
        for o in outbound {
            let what = format!("outbound {}", o.name);
            held.outbound.push((o.clone(), reserve(&what, o.listen)?));
        }
        Ok(held)
    }

    /// Each inbound listener's address, in configuration order.
    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        self.inbound.iter().map(|(_, r)| r.addr).collect()
    }

    /// Each outbound upstream's local address, by name.
    pub fn outbound_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.outbound
            .iter()
            .map(|(o, r)| (o.name.clone(), r.addr))
            .collect()
    }
}

/// Holds the traffic listeners until the SVID and the policy are in force (and the audit spool
/// takes records): until then their ports are bound but not listening, so a client gets
/// "connection refused" (and can retry elsewhere, the request unsent) instead of a 403
/// `no-policy` or a failed handshake. Then serves them until `stop` flips; a listener that
/// cannot listen is reported on `failed`.
pub async fn open_when_ready(
    ready: Readiness,
    held: Held,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    failed: watch::Sender<Option<String>>,
) {
    if !ready.wait(&mut stop).await {
        return;
    }
    let mut tasks = Vec::new();
    let fail = |e: BindError| {
        error!(error = %e, "cannot open a listener");
        failed.send_replace(Some(e.to_string()));
    };
    for (i, r) in held.inbound {
        match r.listen() {
            Ok(l) => tasks.push(tokio::spawn(serve_inbound(
                shared.clone(),
                i,
                l,
                stop.clone(),
            ))),
            Err(e) => return fail(e),
        }
    }
    for (o, r) in held.outbound {
        match r.listen() {
            Ok(l) => tasks.push(tokio::spawn(serve_outbound(
                shared.clone(),
                o,
                l,
                stop.clone(),
            ))),
            Err(e) => return fail(e),
        }
    }
    info!("SVID and policy in force: listening");
    for t in tasks {
        let _ = t.await;
    }
}

/// Serves an inbound listener until `stop` flips: the mTLS handshake, then the verified
/// connection to the L4 or the HTTP proxy.
pub async fn serve_inbound(
    shared: Arc<Shared>,
    cfg: Inbound,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) {
    let alpn: &[&[u8]] = match cfg.protocol {
        Protocol::Tcp => &[],
        Protocol::Http => &[b"h2", b"http/1.1"],
    };
    let app_client = http::inbound::app_client(&cfg);
    let tls = match server_config(
        shared.identity.creds.clone(),
        shared.identity.bundles.clone(),
        alpn,
    ) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            error!(error = %e, "cannot build the inbound TLS configuration");
            return;
        }
    };
    let acceptor = TlsAcceptor::from(tls);
    let metrics = shared.metrics.clone();
    let limit = Limit::new(shared.slots.clone(), move |addr: &SocketAddr, _| {
        metrics.decision(Direction::Inbound, "over_limit");
        warn!(peer = %addr, "connection limit reached: refusing");
    });
    accept::serve("inbound", listener, stop, limit, |tcp, addr| {
        let span = info_span!(
            "inbound",
            peer = %addr,
            spiffe_id = tracing::field::Empty,
            kx = tracing::field::Empty
        );
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let cfg = cfg.clone();
        let app_client = app_client.clone();
        // Boxed (see `ConnTask`); the handshake and the HTTP proxy in boxes of their own, so
        // that an L4 connection's task is the size of the L4 proxy alone, and a finished
        // handshake's state is freed rather than kept for the connection's life.
        let task: ConnTask = Box::pin(async move {
            let handshake = Box::pin(handshake::accept_peer(&shared, &acceptor, tcp));
            let Some((tls, peer)) = handshake.await else {
                return;
            };
            match cfg.protocol {
                Protocol::Tcp => tcp::inbound_conn(shared, cfg, tls, peer, addr).await,
                Protocol::Http => {
                    Box::pin(http::inbound::serve_conn(
                        shared, cfg, app_client, tls, peer, addr,
                    ))
                    .await
                }
            }
        });
        (span, task)
    })
    .await;
}

/// Serves one outbound upstream's local listener until `stop` flips: each connection from the
/// app goes to the L4 or the HTTP proxy of that upstream.
pub async fn serve_outbound(
    shared: Arc<Shared>,
    up: Outbound,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) {
    let (name, id) = (up.name.clone(), up.spiffe_id.to_string());
    let span = move |addr: &SocketAddr| info_span!("outbound", upstream = %name, client = %addr, spiffe_id = %id, kx = tracing::field::Empty);
    let limit = outbound_limit(&shared);
    let upstream_name = up.name.clone();
    let unusable = |e: mayfly_ca::tls::TlsError| {
        error!(error = %e, upstream = %upstream_name, "cannot build the outbound TLS configuration");
    };
    match up.protocol {
        Protocol::Tcp => {
            let upstream = match tcp::Upstream::new(shared.clone(), up) {
                Ok(u) => u,
                Err(e) => return unusable(e),
            };
            accept::serve("outbound", listener, stop, limit, |app, addr| {
                let task: ConnTask = Box::pin(upstream.clone().serve_conn(app));
                (span(&addr), task)
            })
            .await
        }
        Protocol::Http => {
            let upstream = match http::outbound::Upstream::new(Arc::new(up), shared.clone()) {
                Ok(u) => u,
                Err(e) => return unusable(e),
            };
            accept::serve("outbound", listener, stop, limit, |app, addr| {
                let task: ConnTask = Box::pin(upstream.clone().serve_conn(app));
                (span(&addr), task)
            })
            .await
        }
    }
}

/// The connection limit of an outbound listener: a refusal is counted, not logged (the app is
/// local and sees its connection closed).
fn outbound_limit(shared: &Shared) -> Limit<impl FnMut(&SocketAddr, bool) + Send> {
    let metrics: Arc<Metrics> = shared.metrics.clone();
    Limit::new(shared.slots.clone(), move |_: &SocketAddr, _| {
        metrics.decision(Direction::Outbound, "over_limit");
    })
}
