//! Inbound HTTP: per-request authorization of the verified peer, identity to the app in
//! `x-forwarded-client-cert`, and connections drained with GOAWAY when the peer's SVID expires
//! or the policy no longer lets the peer in at all. A peer the policy lets in nowhere is denied
//! per connection and answered 403 on every request (`refuse_conn`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulConnection;
use mayfly_ca::svid::SvidInfo;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::app_h1::H1App;
use super::app_h2::H2App;
use super::checks::strip_hop_by_hop;
use super::idle::{Activity, IDLE_GRACE, IdleTimer};
use super::{Body, GRPC_UNAVAILABLE, XFCC, is_grpc, local_reply, xfcc_value};
use crate::audit::NotDurable;
use crate::config::{AppProtocol, Inbound};
use crate::conn::{OpenGuard, Shared, audit_base, audit_base_fields, instant_at};
use crate::metrics::Direction;
use crate::policy::{HttpFacts, Verdict};

/// The pooled client towards the local app: HTTP/1.1 keep-alive connections, or one h2c
/// connection every request multiplexes on (`app_protocol = "http2"`).
#[derive(Clone)]
pub enum AppClient {
    Http1(Arc<H1App>),
    Http2(Arc<H2App>),
}

/// How long a connection to the app may stay unused before it is let go.
const APP_IDLE: Duration = Duration::from_secs(90);
/// How long connecting to the app may take.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most idle HTTP/1.1 connections kept to the app (as many as one peer connection's streams):
/// a burst of more concurrent requests opens more, and closes the extra ones when it is over.
const APP_MAX_IDLE: usize = super::H2_MAX_CONCURRENT_STREAMS as usize;

/// A client for the app: HTTP/1.1 keep-alive or h2c, pooled.
pub fn app_client(cfg: &Inbound) -> AppClient {
    match cfg.app_protocol {
        AppProtocol::Http2 => AppClient::Http2(H2App::new(cfg.app, APP_CONNECT_TIMEOUT, APP_IDLE)),
        AppProtocol::Http1 => AppClient::Http1(H1App::new(
            cfg.app,
            APP_CONNECT_TIMEOUT,
            APP_IDLE,
            APP_MAX_IDLE,
        )),
    }
}

impl AppClient {
    /// Sends a request to the app; its response's status, and the response as relayed to the
    /// caller.
    async fn forward(
        &self,
        req: Request<Body>,
    ) -> Result<(StatusCode, Response<Body>), Box<dyn std::error::Error + Send + Sync>> {
        match self {
            AppClient::Http1(c) => Ok(super::checks::relay(c.request(req).await?)),
            AppClient::Http2(c) => Ok(super::checks::relay(c.request(req).await?)),
        }
    }
}

struct Ctx {
    shared: Arc<Shared>,
    app: SocketAddr,
    app_client: AppClient,
    me: String,
    peer: String,
    xfcc: Option<HeaderValue>,
    port: Option<u16>,
    ip: Option<IpAddr>,
    version: http::Version,
    /// The first fields of every request's record (built once for the connection).
    audit_base: crate::audit::FieldList,
    /// The connection-level denial every request on this connection is answered with.
    refused: Option<Refusal>,
    /// The peer's request metrics.
    series: Arc<crate::metrics::PeerSeries>,
}

impl Ctx {
    /// Counts a request's decision and starts its `http.request` record.
    fn record(
        &self,
        method: &http::Method,
        path: &str,
        verdict: &Verdict,
        started: std::time::Instant,
    ) -> super::record::RequestRecord<'_> {
        self.shared
            .metrics
            .request(Direction::Inbound, verdict.label());
        super::record::RequestRecord::new(
            &self.shared.audit,
            &self.audit_base,
            method,
            path,
            verdict,
            started,
        )
    }
}

/// The connection-level denial of a peer the policy allows no request at all, and whether its
/// `connection.denied` record is durable (strict audit: if not, requests get 503, not 403).
#[derive(Clone)]
struct Refusal {
    verdict: Verdict,
    recorded: Result<(), NotDurable>,
}

/// A verified peer the policy allows nothing: the connection is denied as the TCP path denies
/// one (a `connection.denied` record with the decision ID, durable before any answer under
/// strict audit), but kept open so that every request on it gets a 403 / PERMISSION_DENIED
/// with that decision ID instead of a reset the caller's sidecar can only report as a 502.
/// No request on it is ever forwarded. `None` if the L4 decision permits after all (then each
/// request is decided on its own, as on any other connection).
async fn refuse_conn(
    shared: &Shared,
    me: &str,
    peer: &SvidInfo,
    addr: SocketAddr,
    port: Option<u16>,
    ip: Option<IpAddr>,
) -> Option<Refusal> {
    let peer_id = peer.id.to_string();
    let verdict = shared.policy.decide_l4(&peer_id, me, port, ip);
    if verdict.permits() {
        shared.metrics.decision(Direction::Inbound, "allow");
        return None;
    }
    shared.metrics.decision(Direction::Inbound, verdict.label());
    let mut fields = audit_base(
        Direction::Inbound,
        me,
        &peer_id,
        Some(addr.to_string()),
        Some(&peer.serial),
        "http",
    );
    verdict.audit_into(&mut fields);
    if let Some(p) = port {
        fields.insert("port".into(), p.into());
    }
    info!(decision = verdict.decision_id(), by = %verdict.by(), "inbound connection denied by policy: every request on it is answered 403");
    let recorded = shared.audit.record("connection.denied", fields).await;
    if let Err(e) = &recorded {
        warn!(error = %e, "strict audit: the denial's record is not durable");
    }
    Some(Refusal { verdict, recorded })
}

/// Serves one verified peer connection.
pub async fn serve_conn(
    shared: Arc<Shared>,
    cfg: Inbound,
    app_client: AppClient,
    tls: TlsStream<TcpStream>,
    peer: SvidInfo,
    addr: SocketAddr,
) {
    let me = shared.identity.id.to_string();
    let peer_id = peer.id.to_string();
    let port = Some(cfg.app.port());
    let ip = Some(addr.ip());
    let m = shared.metrics.clone();
    let refused = if shared.policy.may_allow_any(&peer_id, &me, port, ip) {
        m.decision(Direction::Inbound, "allow");
        None
    } else {
        refuse_conn(&shared, &me, &peer, addr, port, ip).await
    };
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let audit_base = audit_base_fields(
        Direction::Inbound,
        &me,
        &peer_id,
        Some(&addr.to_string()),
        Some(&peer.serial),
        "http",
    );
    let ctx = Arc::new(Ctx {
        xfcc: xfcc_value(&me, &leaf, &peer_id),
        shared: shared.clone(),
        app: cfg.app,
        app_client,
        me,
        peer: peer_id.clone(),
        port,
        ip,
        audit_base,
        refused: refused.clone(),
        series: m.mesh.peer(Direction::Inbound, &peer_id),
        version: match cfg.app_protocol {
            AppProtocol::Http1 => http::Version::HTTP_11,
            AppProtocol::Http2 => http::Version::HTTP_2,
        },
    });
    // HTTP/2: the first request within the header-read limit, then no idle stretch past
    // the idle limit (hyper's HTTP/1.1 header-read timeout covers both for HTTP/1.1).
    let (activity, idle) =
        Activity::new(shared.limits.handshake_timeout, shared.limits.idle_timeout);
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        let stream = activity.stream();
        // Boxed, as the outbound's: each HTTP/2 stream's future is moved into a task of its own.
        async move {
            let answer = Box::pin(handle(ctx, req)).await;
            Ok::<_, Infallible>(Activity::hold(answer, stream))
        }
    });
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let _open = OpenGuard::new(m.clone(), Direction::Inbound);
    let watch = Watch {
        shared: shared.clone(),
        refused: refused.is_some(),
        peer: peer_id,
        port,
        ip,
        deadline: instant_at(peer.not_after),
    };
    let io = TokioIo::new(tls);
    let draining = if h2 {
        drive(
            super::h2_server().serve_connection(io, svc),
            watch,
            Some(idle),
        )
        .await
    } else {
        drive(
            super::h1_server(shared.limits.handshake_timeout).serve_connection(io, svc),
            watch,
            None,
        )
        .await
    };
    m.ended
        .get_or_create(&crate::metrics::EndLabels {
            direction: Direction::Inbound,
            reason: draining.into(),
        })
        .inc();
}

/// What ends a peer connection besides its own traffic.
struct Watch {
    shared: Arc<Shared>,
    /// The connection is denied as a whole: it ends when the policy may allow the peer
    /// something, so that its next requests are decided afresh on a new connection.
    refused: bool,
    peer: String,
    port: Option<u16>,
    ip: Option<IpAddr>,
    deadline: tokio::time::Instant,
}

/// Runs a connection until it ends; drains it with GOAWAY (HTTP/2) or `Connection: close`
/// (HTTP/1.1) when the peer's SVID expires, when the policy no longer lets the peer in, or on
/// shutdown, giving in-flight requests a short grace; closes an HTTP/2 connection that `idle`
/// finds idle past its limits. Returns why it ended.
async fn drive<C>(conn: C, w: Watch, mut idle: Option<IdleTimer>) -> &'static str
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    let me = w.shared.identity.id.to_string();
    let mut policy = w.shared.policy.watch();
    let mut hard = w.shared.hard_stop.clone();
    let mut stopping = w.shared.draining.clone();
    let mut stop_watched = true;
    let mut draining: Option<&'static str> = None;
    let mut grace_until = tokio::time::Instant::now();
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "HTTP connection ended with an error");
                }
                break;
            }
            _ = tokio::time::sleep_until(w.deadline), if draining.is_none() => {
                info!("peer SVID expired: draining the connection");
                (draining, grace_until) = (Some("peer_svid_expired"), tokio::time::Instant::now() + DRAIN_GRACE);
                conn.as_mut().graceful_shutdown();
            }
            r = policy.changed(), if draining.is_none() => {
                let may = r.is_ok() && w.shared.policy.may_allow_any(&w.peer, &me, w.port, w.ip);
                if r.is_ok() && !may && !w.refused {
                    info!("policy no longer allows this peer: draining the connection");
                    (draining, grace_until) = (Some("policy_revoked"), tokio::time::Instant::now() + DRAIN_GRACE);
                    conn.as_mut().graceful_shutdown();
                } else if may && w.refused {
                    info!("policy may now allow this peer: closing its denied connection");
                    (draining, grace_until) = (Some("policy_changed"), tokio::time::Instant::now() + DRAIN_GRACE);
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = async { match idle.as_mut() { Some(t) => t.expired().await, None => std::future::pending().await } }, if draining.is_none() => {
                debug!("HTTP/2 connection idle past its limit: closing it");
                (draining, grace_until) = (Some("idle"), tokio::time::Instant::now() + IDLE_GRACE);
                conn.as_mut().graceful_shutdown();
            }
            r = stopping.wait_for(|s| *s), if draining.is_none() && stop_watched => {
                if r.is_ok() {
                    // The sidecar is shutting down: in-flight requests finish (until the drain
                    // deadline, the hard stop below); callers open no new stream here.
                    debug!("sidecar draining: GOAWAY / Connection: close");
                    (draining, grace_until) = (Some("shutdown"), tokio::time::Instant::now() + w.shared.limits.drain_timeout);
                    conn.as_mut().graceful_shutdown();
                } else {
                    stop_watched = false;
                }
            }
            r = hard.changed() => {
                if r.is_err() || *hard.borrow() {
                    draining = draining.or(Some("shutdown"));
                    break;
                }
            }
            _ = tokio::time::sleep_until(grace_until), if draining.is_some() => break,
        }
    }
    draining.unwrap_or("done")
}

/// How long in-flight requests may run once a connection is being drained.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

async fn handle(ctx: Arc<Ctx>, mut req: Request<Incoming>) -> Response<Body> {
    let started = std::time::Instant::now();
    let m = &ctx.shared.metrics;
    let grpc = is_grpc(req.headers());
    let path = match super::checks::admit(&ctx.shared, Direction::Inbound, &mut req) {
        Ok(p) => p,
        Err(reply) => return super::reply::unforwarded_req(req, *reply).await,
    };
    if let Some(refusal) = &ctx.refused {
        return refused(&ctx, refusal, req, path, grpc, started).await;
    }
    // Borrowed from the request: no per-request copies of the header block.
    let headers = super::checks::policy_headers(req.headers());
    let verdict = ctx.shared.policy.decide_http(
        &ctx.peer,
        &ctx.me,
        ctx.port,
        ctx.ip,
        &HttpFacts {
            method: req.method().as_str(),
            path: &path,
            headers: &headers,
        },
    );
    let mut record = ctx.record(req.method(), &path, &verdict, started);
    record.context(ctx.port, req.headers(), &ctx.series);
    if !verdict.permits() {
        let reply = match record.finish_unforwarded(StatusCode::FORBIDDEN).await {
            Ok(()) => super::reply::denied(grpc, &verdict),
            Err(e) => super::reply::audit_unavailable(&ctx.shared, Direction::Inbound, grpc, &e),
        };
        info!(method = %req.method(), path = %path, decision = verdict.decision_id(), by = %verdict.by(), "request denied by policy");
        return super::reply::unforwarded_req(req, reply).await;
    }
    // Strict audit: nothing is forwarded before its decision is on disk.
    if let Err(e) = record.before_forwarding().await {
        let reply = super::reply::audit_unavailable(&ctx.shared, Direction::Inbound, grpc, &e);
        return super::reply::unforwarded_req(req, reply).await;
    }
    let version = req.version();
    let (mut parts, body) = req.into_parts();
    let authority = super::reply::request_authority(&parts);
    let pq = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    parts.uri = match super::reply::next_hop_uri(grpc, "http", &ctx.app.to_string(), pq) {
        Ok(u) => u,
        Err(reply) => return super::reply::unforwarded(version, body, *reply).await,
    };
    strip_hop_by_hop(&mut parts.headers);
    // Only the sidecar speaks for the caller's identity.
    parts.headers.remove(XFCC);
    if let Some(v) = &ctx.xfcc {
        parts.headers.insert(XFCC, v.clone());
    }
    // HTTP/1.1 carries the caller's authority in Host. Over h2c the request's :authority is
    // the app's address (the pooled client routes by it), and a second, different Host would
    // make servers refuse the request as ambiguous.
    match ctx.version {
        http::Version::HTTP_2 => {
            parts.headers.remove(http::header::HOST);
        }
        _ => {
            if let Some(a) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
                parts.headers.insert(http::header::HOST, a);
            }
        }
    }
    parts.version = ctx.version;
    let req = Request::from_parts(parts, body.boxed());
    match ctx.app_client.forward(req).await {
        Ok((status, resp)) => {
            record.finish(status);
            resp
        }
        Err(e) => {
            m.request(Direction::Inbound, "app_unreachable");
            record.finish(StatusCode::BAD_GATEWAY);
            info!(app = %ctx.app, error = %e, "the local app did not answer");
            local_reply(
                grpc,
                StatusCode::BAD_GATEWAY,
                GRPC_UNAVAILABLE,
                "the local app did not answer",
                None,
            )
        }
    }
}

/// A request on a connection denied as a whole: recorded (an `http.request` record with the
/// connection's decision ID), answered 403 / PERMISSION_DENIED, never forwarded.
async fn refused(
    ctx: &Ctx,
    refusal: &Refusal,
    req: Request<Incoming>,
    path: String,
    grpc: bool,
    started: std::time::Instant,
) -> Response<Body> {
    let verdict = &refusal.verdict;
    let record = ctx.record(req.method(), &path, verdict, started);
    let recorded = match &refusal.recorded {
        Ok(()) => record.finish_unforwarded(StatusCode::FORBIDDEN).await,
        Err(e) => Err(e.clone()),
    };
    let reply = match recorded {
        Ok(()) => super::reply::denied(grpc, verdict),
        Err(e) => super::reply::audit_unavailable(&ctx.shared, Direction::Inbound, grpc, &e),
    };
    info!(method = %req.method(), path = %path, decision = verdict.decision_id(), "request denied: the policy allows this peer nothing");
    super::reply::unforwarded_req(req, reply).await
}
