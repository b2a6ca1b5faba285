//! L4 proxying: inbound mTLS termination and outbound mTLS origination, one task and one span
//! per connection, a policy decision per connection, and no connection outliving the peer's
//! SVID or the policy that admitted it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mayfly_ca::accept::{self, Limit};
use mayfly_ca::svid::SvidInfo;
use mayfly_ca::tls::{client_config, dial_name, server_config};
use mayfly_ca::verify::{IdMatcher, describe_tls_error, peer_identity};
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, info, info_span, warn};

use crate::config::{Inbound, Limits, Outbound, Protocol};
use crate::identity::Identity;
use crate::metrics::{DirLabels, Direction, EndLabels, Metrics};
use crate::policy::{PolicyState, Verdict};
use crate::splice::{End, Outcome, splice};

/// What every connection task shares.
pub struct Shared {
    /// Our identity.
    pub identity: Arc<Identity>,
    /// The policy in force.
    pub policy: Arc<PolicyState>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Timeouts and limits.
    pub limits: Limits,
    /// Flips when the drain deadline has passed: open connections end.
    pub hard_stop: watch::Receiver<bool>,
    /// Bounds concurrent connections.
    pub slots: Arc<Semaphore>,
    /// The audit trail.
    pub audit: Arc<crate::audit::Auditor>,
}

/// The fields every audit record of a connection or request starts with.
pub(crate) fn audit_base(
    direction: Direction,
    local: &str,
    peer: &str,
    peer_addr: Option<String>,
    peer_serial: Option<&str>,
    protocol: &str,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    let mut m = serde_json::Map::new();
    m.insert(
        "direction".into(),
        Value::from(match direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }),
    );
    m.insert("local_id".into(), Value::from(local));
    m.insert("peer_id".into(), Value::from(peer));
    if let Some(a) = peer_addr {
        m.insert("peer_addr".into(), Value::from(a));
    }
    if let Some(s) = peer_serial {
        m.insert("peer_serial".into(), Value::from(s));
    }
    m.insert("protocol".into(), Value::from(protocol));
    m
}

/// Adds what a finished connection did.
fn audit_close(
    mut m: serde_json::Map<String, serde_json::Value>,
    out: &Outcome,
    direction: Direction,
    started: std::time::Instant,
) -> serde_json::Map<String, serde_json::Value> {
    let (to_app, from_app) = match direction {
        Direction::Inbound => (out.a_to_b, out.b_to_a),
        Direction::Outbound => (out.b_to_a, out.a_to_b),
    };
    m.insert("bytes_to_app".into(), to_app.into());
    m.insert("bytes_from_app".into(), from_app.into());
    m.insert(
        "duration_ms".into(),
        (started.elapsed().as_millis() as u64).into(),
    );
    m.insert("end".into(), out.end.reason().into());
    if let End::Revoked(why) = &out.end {
        m.insert("end_detail".into(), why.clone().into());
    }
    m
}

/// A tokio Instant for a wall-clock time (peer SVID expiry).
pub(crate) fn instant_at(t: OffsetDateTime) -> tokio::time::Instant {
    let left = (t - OffsetDateTime::now_utc()).as_seconds_f64().max(0.0);
    tokio::time::Instant::now() + Duration::from_secs_f64(left.min(1e9))
}

/// Resolves when the connection must end for a reason other than its own traffic: the policy
/// now denies it, or the sidecar's drain deadline passed.
async fn stop_signal(
    shared: Arc<Shared>,
    source: String,
    destination: String,
    port: Option<u16>,
    ip: Option<std::net::IpAddr>,
) -> End {
    let mut generation = shared.policy.watch();
    let mut hard = shared.hard_stop.clone();
    loop {
        tokio::select! {
            r = generation.changed() => {
                if r.is_err() {
                    return std::future::pending().await;
                }
                let v = shared.policy.decide_l4(&source, &destination, port, ip);
                if !v.permits() {
                    return End::Revoked(format!("{} ({})", v.by(), v.decision_id()));
                }
            }
            r = hard.changed() => {
                if r.is_err() || *hard.borrow() {
                    return End::Shutdown;
                }
            }
        }
    }
}

fn record_end(m: &Metrics, direction: Direction, out: &Outcome, started: std::time::Instant) {
    let d = DirLabels { direction };
    // For inbound, a->b is network->app; for outbound, a is the app.
    let (to_app, from_app) = match direction {
        Direction::Inbound => (out.a_to_b, out.b_to_a),
        Direction::Outbound => (out.b_to_a, out.a_to_b),
    };
    m.bytes_in.get_or_create(&d).inc_by(to_app);
    m.bytes_out.get_or_create(&d).inc_by(from_app);
    m.ended
        .get_or_create(&EndLabels {
            direction,
            reason: out.end.reason().into(),
        })
        .inc();
    let level_info = matches!(out.end, End::PeerSvidExpired | End::Revoked(_));
    // The reason as the metric spells it, and the detail as text (no Rust Debug syntax).
    let (end, detail) = match &out.end {
        End::Revoked(s) | End::Error(s) => (out.end.reason(), s.as_str()),
        e => (e.reason(), ""),
    };
    if level_info {
        info!(
            end,
            detail,
            to_app,
            from_app,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        );
    } else {
        debug!(
            end,
            detail,
            to_app,
            from_app,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        );
    }
}

pub(crate) struct OpenGuard(Arc<Metrics>, Direction);

impl OpenGuard {
    pub(crate) fn new(m: Arc<Metrics>, direction: Direction) -> Self {
        m.open.get_or_create(&DirLabels { direction }).inc();
        Self(m, direction)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0
            .open
            .get_or_create(&DirLabels { direction: self.1 })
            .dec();
    }
}

/// Serves the inbound listener until `stop` flips.
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
    let app_client = crate::http::inbound::app_client(&cfg);
    let tls = match server_config(
        shared.identity.creds.clone(),
        shared.identity.bundles.clone(),
        alpn,
    ) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the inbound TLS configuration");
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
        (span, async move {
            let Some((tls, peer)) = accept_peer(&shared, &acceptor, tcp).await else {
                return;
            };
            match cfg.protocol {
                Protocol::Tcp => inbound_conn(shared, cfg, tls, peer, addr).await,
                Protocol::Http => {
                    crate::http::inbound::serve_conn(shared, cfg, app_client, tls, peer, addr).await
                }
            }
        })
    })
    .await;
}

/// TLS handshake with a timeout, then the peer's identity; counts and logs failures.
async fn accept_peer(
    shared: &Shared,
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, SvidInfo)> {
    let m = &shared.metrics;
    let tls =
        match tokio::time::timeout(shared.limits.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let why = describe_tls_error(&e);
                m.handshake_failed(Direction::Inbound, reason_of(&why));
                info!(error = %why, "inbound TLS handshake refused");
                return None;
            }
            Err(_) => {
                m.handshake_failed(Direction::Inbound, "timeout");
                debug!("inbound TLS handshake timed out");
                return None;
            }
        };
    let peer: SvidInfo = match peer_identity(tls.get_ref().1.peer_certificates()) {
        Ok(p) => p,
        Err(e) => {
            m.handshake_failed(Direction::Inbound, e.reason());
            return None;
        }
    };
    let kx = mayfly_ca::tls::negotiated_group(tls.get_ref().1);
    m.handshake(Direction::Inbound, kx);
    tracing::Span::current()
        .record("spiffe_id", tracing::field::display(&peer.id))
        .record("kx", tracing::field::display(kx));
    if peer.not_after <= OffsetDateTime::now_utc() {
        m.handshake_failed(Direction::Inbound, "expired");
        return None;
    }
    Some((tls, peer))
}

async fn inbound_conn(
    shared: Arc<Shared>,
    cfg: Inbound,
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SvidInfo,
    addr: SocketAddr,
) {
    let started = std::time::Instant::now();
    let m = shared.metrics.clone();
    let source = peer.id.to_string();
    let destination = shared.identity.id.to_string();
    let port = Some(cfg.app.port());
    let ip = Some(addr.ip());
    if !shared.audit.admits() {
        m.decision(Direction::Inbound, "audit_full");
        warn!("audit spool full (fail-closed): refusing the connection");
        return;
    }
    let verdict = shared.policy.decide_l4(&source, &destination, port, ip);
    m.decision(Direction::Inbound, verdict.label());
    let mut fields = audit_base(
        Direction::Inbound,
        &destination,
        &source,
        Some(addr.to_string()),
        Some(&peer.serial),
        "tcp",
    );
    verdict.audit_into(&mut fields);
    if !verdict.permits() {
        info!(decision = verdict.decision_id(), by = %verdict.by(), "inbound connection denied by policy");
        // Strict audit: the connection is closed once its denial is on disk.
        if let Err(e) = shared.audit.record("connection.denied", fields).await {
            warn!(error = %e, "strict audit: the denial's record is not durable");
        }
        return;
    }
    if let Verdict::Decided(d) = &verdict
        && !d.allow
    {
        info!(decision = %d.decision_id, "dry-run: connection would be denied; letting it pass");
    }
    let app = match tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(cfg.app))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(app = %cfg.app, error = %e, "cannot connect to the local app");
            m.decision(Direction::Inbound, "app_unreachable");
            return;
        }
        Err(_) => {
            warn!(app = %cfg.app, "timed out connecting to the local app");
            m.decision(Direction::Inbound, "app_unreachable");
            return;
        }
    };
    let _ = app.set_nodelay(true);
    let _open = OpenGuard::new(m.clone(), Direction::Inbound);
    debug!(
        decision = verdict.decision_id(),
        "inbound connection admitted"
    );
    // Strict audit: no byte is forwarded before the decision is on disk.
    if let Err(e) = shared.audit.record("connection.open", fields.clone()).await {
        m.decision(Direction::Inbound, "audit_unavailable");
        warn!(error = %e, "strict audit: the decision record is not durable; closing the connection");
        return;
    }
    let stop = stop_signal(shared.clone(), source, destination, port, ip);
    let out = splice(
        tls,
        app,
        shared.limits.idle_timeout,
        instant_at(peer.not_after),
        stop,
    )
    .await;
    record_end(&m, Direction::Inbound, &out, started);
    shared.audit.emit(
        "connection.close",
        audit_close(fields, &out, Direction::Inbound, started),
    );
}

pub(crate) fn reason_of(msg: &str) -> &'static str {
    let m = msg.to_ascii_lowercase();
    if m.contains("expired") {
        "expired"
    } else if m.contains("not valid yet") {
        "not_yet_valid"
    } else if m.contains("no trust bundle") {
        "unknown_trust_domain"
    } else if m.contains("unknown issuer") {
        "unknown_issuer"
    } else if m.contains("no certificate")
        || m.contains("peer sent no certificates")
        || m.contains("nocertificates")
    {
        "no_certificate"
    } else if m.contains("x.509-svid") {
        "not_an_svid"
    } else if m.contains("expected") {
        "unexpected_server_id"
    } else {
        "tls"
    }
}

/// Serves one outbound upstream until `stop` flips.
pub async fn serve_outbound(
    shared: Arc<Shared>,
    up: Outbound,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) {
    let tls = match client_config(
        shared.identity.creds.clone(),
        shared.identity.bundles.clone(),
        IdMatcher::Exact(up.spiffe_id.clone()),
        &[],
    ) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::error!(error = %e, upstream = %up.name, "cannot build the outbound TLS configuration");
            return;
        }
    };
    let connector = TlsConnector::from(tls);
    let up = Arc::new(up);
    let metrics = shared.metrics.clone();
    let limit = Limit::new(shared.slots.clone(), move |_: &SocketAddr, _| {
        metrics.decision(Direction::Outbound, "over_limit");
    });
    accept::serve("outbound", listener, stop, limit, |tcp, addr| {
        let span = info_span!("outbound", upstream = %up.name, client = %addr, spiffe_id = %up.spiffe_id, kx = tracing::field::Empty);
        let shared = shared.clone();
        let connector = connector.clone();
        let up = up.clone();
        (span, outbound_conn(shared, up, connector, tcp))
    })
    .await;
}

async fn outbound_conn(
    shared: Arc<Shared>,
    up: Arc<Outbound>,
    connector: TlsConnector,
    app: TcpStream,
) {
    let started = std::time::Instant::now();
    let m = shared.metrics.clone();
    let source = shared.identity.id.to_string();
    let destination = up.spiffe_id.to_string();
    // Egress policy first: nothing leaves that the policy would not let in.
    if !shared.audit.admits() {
        m.decision(Direction::Outbound, "audit_full");
        warn!("audit spool full (fail-closed): refusing the connection");
        return;
    }
    let verdict = shared
        .policy
        .decide_l4(&source, &destination, up.port, None);
    m.decision(Direction::Outbound, verdict.label());
    let mut fields = audit_base(
        Direction::Outbound,
        &source,
        &destination,
        None,
        None,
        "tcp",
    );
    verdict.audit_into(&mut fields);
    if !verdict.permits() {
        info!(decision = verdict.decision_id(), by = %verdict.by(), "outbound connection denied by policy");
        // Strict audit: the connection is closed once its denial is on disk.
        if let Err(e) = shared.audit.record("connection.denied", fields).await {
            warn!(error = %e, "strict audit: the denial's record is not durable");
        }
        return;
    }
    let tcp = match tokio::time::timeout(
        shared.limits.connect_timeout,
        TcpStream::connect(&up.remote),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(remote = %up.remote, error = %e, "cannot connect to the remote sidecar");
            m.decision(Direction::Outbound, "remote_unreachable");
            return;
        }
        Err(_) => {
            warn!(remote = %up.remote, "timed out connecting to the remote sidecar");
            m.decision(Direction::Outbound, "remote_unreachable");
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(
        shared.limits.handshake_timeout,
        connector.connect(dial_name(), tcp),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let why = describe_tls_error(&e);
            m.handshake_failed(Direction::Outbound, reason_of(&why));
            warn!(error = %why, "outbound TLS handshake refused");
            return;
        }
        Err(_) => {
            m.handshake_failed(Direction::Outbound, "timeout");
            return;
        }
    };
    let server = match peer_identity(tls.get_ref().1.peer_certificates()) {
        Ok(p) => p,
        Err(e) => {
            m.handshake_failed(Direction::Outbound, e.reason());
            return;
        }
    };
    let kx = mayfly_ca::tls::negotiated_group(tls.get_ref().1);
    m.handshake(Direction::Outbound, kx);
    tracing::Span::current().record("kx", tracing::field::display(kx));
    let _open = OpenGuard::new(m.clone(), Direction::Outbound);
    fields.insert("peer_addr".into(), up.remote.clone().into());
    fields.insert("peer_serial".into(), server.serial.clone().into());
    // Strict audit: no byte is forwarded before the decision is on disk.
    if let Err(e) = shared.audit.record("connection.open", fields.clone()).await {
        m.decision(Direction::Outbound, "audit_unavailable");
        warn!(error = %e, "strict audit: the decision record is not durable; closing the connection");
        return;
    }
    let stop = stop_signal(shared.clone(), source, destination, up.port, None);
    let out = splice(
        app,
        tls,
        shared.limits.idle_timeout,
        instant_at(server.not_after),
        stop,
    )
    .await;
    record_end(&m, Direction::Outbound, &out, started);
    shared.audit.emit(
        "connection.close",
        audit_close(fields, &out, Direction::Outbound, started),
    );
}
