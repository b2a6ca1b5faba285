//! Outbound HTTP: the app speaks HTTP/1.1 or h2c to a loopback port; every request is checked
//! against the egress policy and sent over a pooled HTTP/2 mTLS connection to the remote
//! sidecar (the static `remote`, or the endpoint chosen for this request), which must present
//! the configured SPIFFE ID. One pooled connection per endpoint address.

mod forward;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioIo;
use mayfly_ca::tls::dial_name;
use mayfly_ca::verify::{describe_tls_error, peer_identity};
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, info, warn};

use super::checks::strip_hop_by_hop;
use super::idle::Activity;
use super::{Body, GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE, is_grpc, local_reply};
use crate::config::Outbound;
use crate::conn::{OpenGuard, Shared, audit_base_fields, handshake, instant_at};
use crate::metrics::Direction;
use crate::policy::HttpFacts;
use crate::upstreams::Pool;

/// A new pooled connection is opened when the current one's server SVID has less than this
/// left, so requests never race its expiry.
const EXPIRY_MARGIN: time::Duration = time::Duration::seconds(2);

struct Pooled {
    sender: SendRequest<Body>,
    /// Serial of our own SVID on that connection: after a rotation, new requests move to a
    /// connection that presents the new one.
    our_serial: String,
    /// New requests go to a new connection from here on: shortly before the server's SVID
    /// expires (2 s, or a fifth of the remaining life for very short SVIDs).
    refresh_at: OffsetDateTime,
}

/// One endpoint's pooled connection slot (dials to it are serialised; others are not held up).
type Slot = Arc<Mutex<Option<Pooled>>>;

/// One upstream's HTTP/2 connections, one per endpoint address (many requests share each;
/// replaced when it closes, when either side's SVID rotates or nears expiry; dropped when
/// the endpoint leaves the set).
pub struct Upstream {
    up: Arc<Outbound>,
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    connector: TlsConnector,
    pools: std::sync::Mutex<HashMap<String, Slot>>,
    /// The upstream's request metrics.
    series: Arc<crate::metrics::PeerSeries>,
    /// Our SPIFFE ID and the upstream's, as text: built once, not per request.
    me: String,
    dest: String,
    /// The first fields of every request's record (built once for the upstream).
    audit_base: crate::audit::FieldList,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum DialError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("TLS handshake with {0} refused: {1}")]
    Tls(String, String),
    #[error("{0} did not negotiate HTTP/2 (is its inbound in http mode?)")]
    NoH2(String),
    #[error("HTTP/2 handshake with {0} failed: {1}")]
    H2(String, String),
    #[error("no SVID yet")]
    NoSvid,
}

impl DialError {
    /// A failure of ours, not of the endpoint.
    pub(super) fn is_ours(&self) -> bool {
        matches!(self, DialError::NoSvid)
    }
}

impl Upstream {
    /// The upstream's TLS client configuration (HTTP/2 only), from our identity.
    pub fn new(
        up: Arc<Outbound>,
        shared: Arc<Shared>,
    ) -> Result<Arc<Self>, mayfly_ca::tls::TlsError> {
        let cfg = mayfly_ca::tls::client_config(
            shared.identity.creds.clone(),
            shared.identity.bundles.clone(),
            mayfly_ca::verify::IdMatcher::Exact(up.spiffe_id.clone()),
            &[b"h2"],
        )?;
        let pool = shared.upstreams.pool_for(&up);
        let dest = up.spiffe_id.to_string();
        let series = shared.metrics.mesh.peer(Direction::Outbound, &dest);
        let me = shared.identity.id.to_string();
        let audit_base = audit_base_fields(
            Direction::Outbound,
            &me,
            &dest,
            up.remote.as_deref(),
            None,
            "http",
        );
        Ok(Arc::new(Self {
            series,
            me,
            dest,
            audit_base,
            up,
            shared,
            pool,
            connector: TlsConnector::from(Arc::new(cfg)),
            pools: std::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// The pool slot of `addr`. A new address means the endpoint set changed: slots of
    /// endpoints no longer live are dropped then (their connections close once their requests
    /// finish), not on every request.
    fn slot(&self, addr: &str) -> Slot {
        let mut pools = self
            .pools
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = pools.get(addr) {
            return s.clone();
        }
        let live = self.pool.addresses();
        pools.retain(|a, _| live.iter().any(|l| l == a));
        pools.entry(addr.to_owned()).or_default().clone()
    }

    async fn sender(&self, addr: &str) -> Result<SendRequest<Body>, DialError> {
        let ours = self
            .shared
            .identity
            .creds
            .get()
            .map(|s| s.info.serial.clone())
            .ok_or(DialError::NoSvid)?;
        let pool = self.slot(addr);
        let mut slot = pool.lock().await;
        if let Some(p) = slot.as_ref()
            && !p.sender.is_closed()
            && p.our_serial == ours
            && OffsetDateTime::now_utc() < p.refresh_at
        {
            return Ok(p.sender.clone());
        }
        let p = self.dial(addr, ours).await?;
        let s = p.sender.clone();
        *slot = Some(p);
        Ok(s)
    }

    /// A sender ready for a new stream. A pooled connection that turns out to be closing (the
    /// server closed it as idle, or is shutting down) is replaced once.
    pub(super) fn pool(&self) -> &Pool {
        &self.pool
    }

    pub(super) async fn ready_sender(&self, addr: &str) -> Result<SendRequest<Body>, DialError> {
        let mut sender = self.sender(addr).await?;
        if sender.ready().await.is_ok() {
            return Ok(sender);
        }
        debug!("pooled upstream connection is closing: dialling a new one");
        self.slot(addr).lock().await.take();
        sender = self.sender(addr).await?;
        sender
            .ready()
            .await
            .map_err(|e| DialError::H2(addr.to_owned(), e.to_string()))?;
        Ok(sender)
    }

    async fn dial(&self, addr: &str, our_serial: String) -> Result<Pooled, DialError> {
        let m = &self.shared.metrics;
        let limits = &self.shared.limits;
        let remote = addr.to_owned();
        let tcp =
            match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(&remote)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(DialError::Connect(remote, e.to_string())),
                Err(_) => return Err(DialError::Connect(remote, "timed out".into())),
            };
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(
            limits.handshake_timeout,
            self.connector.connect(dial_name(), tcp),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let why = describe_tls_error(&e);
                m.handshake_failed(Direction::Outbound, handshake::failure_reason(&e));
                return Err(DialError::Tls(remote, why));
            }
            Err(_) => {
                m.handshake_failed(Direction::Outbound, "timeout");
                return Err(DialError::Tls(remote, "timed out".into()));
            }
        };
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(DialError::NoH2(remote));
        }
        let server = peer_identity(tls.get_ref().1.peer_certificates())
            .map_err(|e| DialError::Tls(remote.clone(), e.to_string()))?;
        let (sender, conn) = super::h2_client()
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| DialError::H2(remote.clone(), e.to_string()))?;
        let deadline = instant_at(server.not_after);
        let metrics = m.clone();
        let mut hard = self.shared.hard_stop.clone();
        tokio::spawn(
            async move {
                let _open = OpenGuard::new(metrics.clone(), Direction::Outbound);
                let reason = tokio::select! {
                    r = conn => {
                        if let Err(e) = r { debug!(error = %e, "upstream HTTP/2 connection ended"); }
                        "done"
                    }
                    // No connection outlives the server's credential.
                    _ = tokio::time::sleep_until(deadline) => "peer_svid_expired",
                    _ = async { while hard.changed().await.is_ok() { if *hard.borrow() { return; } } } => "shutdown",
                };
                metrics
                    .ended
                    .get_or_create(&crate::metrics::EndLabels { direction: Direction::Outbound, reason: reason.into() })
                    .inc();
            }
            .instrument(tracing::Span::current()),
        );
        debug!(server = %server.id, serial = %server.serial, "new HTTP/2 connection to the upstream");
        let left = server.not_after - OffsetDateTime::now_utc();
        Ok(Pooled {
            sender,
            our_serial,
            refresh_at: server.not_after - EXPIRY_MARGIN.min(left / 5),
        })
    }

    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let started = std::time::Instant::now();
        let m = &self.shared.metrics;
        let grpc = is_grpc(req.headers());
        let path = match super::checks::admit(&self.shared, Direction::Outbound, &mut req) {
            Ok(p) => p,
            Err(reply) => return super::reply::unforwarded_req(req, *reply).await,
        };
        let (me, dest) = (self.me.as_str(), self.dest.as_str());
        // Borrowed from the request: no per-request copies of the header block.
        let headers = super::checks::policy_headers(req.headers());
        let verdict = self.shared.policy.decide_http(
            me,
            dest,
            self.up.port,
            None,
            &HttpFacts {
                method: req.method().as_str(),
                path: &path,
                headers: &headers,
            },
        );
        m.request(Direction::Outbound, verdict.label());
        let mut record = super::record::RequestRecord::new(
            &self.shared.audit,
            &self.audit_base,
            req.method(),
            &path,
            &verdict,
            started,
        );
        record.context(self.up.port, req.headers(), &self.series);
        if !verdict.permits() {
            let reply = match record.finish_unforwarded(StatusCode::FORBIDDEN).await {
                Ok(()) => super::reply::denied(grpc, &verdict),
                Err(e) => {
                    super::reply::audit_unavailable(&self.shared, Direction::Outbound, grpc, &e)
                }
            };
            info!(method = %req.method(), path = %path, decision = verdict.decision_id(), "request denied by egress policy");
            return super::reply::unforwarded_req(req, reply).await;
        }
        // Held until the answer's head arrives: the request counts as outstanding on it.
        let Some(target) = self.pool.target(&[]) else {
            m.request(Direction::Outbound, "no_endpoint");
            warn!(spiffe_id = %dest, "no live endpoint is registered under the upstream's SPIFFE ID: answering 503");
            let reply = match record
                .finish_unforwarded(StatusCode::SERVICE_UNAVAILABLE)
                .await
            {
                Ok(()) => local_reply(
                    grpc,
                    StatusCode::SERVICE_UNAVAILABLE,
                    GRPC_UNAVAILABLE,
                    &format!("mayfly: no live endpoint is registered under {dest}"),
                    None,
                ),
                Err(e) => {
                    super::reply::audit_unavailable(&self.shared, Direction::Outbound, grpc, &e)
                }
            };
            return super::reply::unforwarded_req(req, reply).await;
        };
        self.pool.deposit();
        record.peer_addr(target.address());
        // Strict audit: nothing is forwarded before its decision is on disk.
        if let Err(e) = record.before_forwarding().await {
            let reply =
                super::reply::audit_unavailable(&self.shared, Direction::Outbound, grpc, &e);
            return super::reply::unforwarded_req(req, reply).await;
        }
        let version = req.version();
        let (mut parts, body) = req.into_parts();
        let authority =
            super::reply::request_authority(&parts).unwrap_or_else(|| self.up.name.clone());
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        parts.uri = match super::reply::next_hop_uri(grpc, "https", &authority, pq) {
            Ok(u) => u,
            Err(reply) => return super::reply::unforwarded(version, body, *reply).await,
        };
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(http::header::HOST);
        parts.version = http::Version::HTTP_2;
        // Every attempt, retries included, within the request's deadline.
        let timeout = self.up.request_timeout;
        let deadline = tokio::time::Instant::from_std(started) + timeout;
        // The endpoint of the attempt in flight, and when it began.
        let mut current = None;
        let attempts = self.attempts(parts, body, target, |e| {
            current = Some((e.clone(), std::time::Instant::now()));
        });
        let failed = match tokio::time::timeout_at(deadline, attempts).await {
            Ok(Ok((status, resp))) => {
                if let Some((e, _)) = &current {
                    record.peer_addr(e.address());
                }
                record.finish(status);
                return resp;
            }
            Ok(Err(f)) => f,
            Err(_) => {
                // The attempt cut short counts as an answer that took this long.
                if let Some((e, at)) = &current {
                    self.pool.timed_out(e, at.elapsed());
                }
                forward::Failed {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    reason: "timeout",
                    message: format!(
                        "mayfly: no answer from the upstream within its request_timeout ({} ms)",
                        timeout.as_millis()
                    ),
                }
            }
        };
        m.request(Direction::Outbound, failed.reason);
        info!(error = %failed.message, status = failed.status.as_u16(), "upstream request failed");
        if let Some((e, _)) = &current {
            record.peer_addr(e.address());
        }
        record.error(failed.reason);
        record.finish(failed.status);
        let code = if failed.status == StatusCode::GATEWAY_TIMEOUT {
            GRPC_DEADLINE_EXCEEDED
        } else {
            GRPC_UNAVAILABLE
        };
        local_reply(grpc, failed.status, code, &failed.message, None)
    }
}

impl Upstream {
    /// Serves one connection from the app: HTTP/1.1 or h2c prior knowledge, each request
    /// decided by the egress policy and sent over the pooled HTTP/2 mTLS connection.
    pub async fn serve_conn(self: Arc<Self>, tcp: TcpStream) {
        let limits = self.shared.limits.clone();
        let mut hard = self.shared.hard_stop.clone();
        let (activity, idle) = Activity::new(limits.handshake_timeout, limits.idle_timeout);
        let svc = hyper::service::service_fn(move |req| {
            let upstream = self.clone();
            let stream = activity.stream();
            // Boxed: over HTTP/2 hyper spawns each stream's future as a task, and the request's
            // whole state machine would be copied on every move into it (7 % of A's CPU was
            // memmove); a box moves as one pointer.
            async move {
                let answer = Box::pin(upstream.handle(req)).await;
                Ok::<_, Infallible>(Activity::hold(answer, stream))
            }
        });
        // h2c prior knowledge or HTTP/1.1; a client that sends nothing is cut.
        let Some(h2) = super::sniff_h2(&tcp, limits.handshake_timeout).await else {
            return;
        };
        let io = TokioIo::new(tcp);
        let stop = async {
            while hard.changed().await.is_ok() {
                if *hard.borrow() {
                    return;
                }
            }
        };
        let r = if h2 {
            // Preface and then nothing: closed like an idle HTTP/1.1 connection.
            let conn =
                super::idle::serve_with_idle(super::h2_server().serve_connection(io, svc), idle);
            tokio::select! { r = conn => r, _ = stop => Ok(()) }
        } else {
            let conn = super::h1_server(limits.handshake_timeout).serve_connection(io, svc);
            tokio::select! { r = conn => r, _ = stop => Ok(()) }
        };
        if let Err(e) = r {
            debug!(error = %e, "app connection ended with an error");
        }
    }
}
