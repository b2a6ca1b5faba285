//! The control plane's HTTPS API (HTTP/2 and HTTP/1.1 over TLS 1.3).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info_span, warn};

use super::ca::{Ca, Caller};
use super::metrics::PathLabel;
use crate::accept::{self, Limit};
use crate::api::{self, ErrorBody, SvidRequest, SvidResponse};
use crate::svid::SvidInfo;
use crate::verify::{SpiffeClientVerifier, describe_tls_error, peer_identity};

mod endpoints;
mod signin;

pub(super) fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Reads a request body of at most `limit` bytes within the client timeout; otherwise the
/// answer to send (408, or 413 counted as a `body_too_large` refusal). `what` names the body
/// in the 413's text.
pub(super) async fn read_body(
    ca: &Ca,
    body: Incoming,
    limit: usize,
    what: &str,
) -> Result<Bytes, Response<Full<Bytes>>> {
    match tokio::time::timeout(
        ca.settings().client_timeout,
        Limited::new(body, limit).collect(),
    )
    .await
    {
        Err(_) => Err(error(408, "timeout", "request body too slow".into())),
        Ok(Err(e)) => {
            ca.metrics.refuse("body_too_large");
            Err(error(413, "body_too_large", format!("{what} refused: {e}")))
        }
        Ok(Ok(b)) => Ok(b.to_bytes()),
    }
}

/// Reads a JSON request body (at most [`api::MAX_BODY`]); otherwise the answer to send: a
/// 400 `bad_request` that says what was `expected`, or what [`read_body`] refused.
pub(super) async fn read_json<T: serde::de::DeserializeOwned>(
    ca: &Ca,
    body: Incoming,
    expected: &str,
) -> Result<T, Response<Full<Bytes>>> {
    let body = read_body(ca, body, api::MAX_BODY, "request body").await?;
    serde_json::from_slice(&body).map_err(|e| {
        ca.metrics.refuse("bad_request");
        error(400, "bad_request", format!("expected {expected}: {e}"))
    })
}

/// A CSR sent as base64 DER; otherwise a 400 `bad_csr`.
#[allow(clippy::result_large_err)] // the error is the answer itself, sent at once
pub(super) fn decode_csr(ca: &Ca, csr: &str) -> Result<Vec<u8>, Response<Full<Bytes>>> {
    STANDARD.decode(csr.as_bytes()).map_err(|e| {
        ca.metrics.refuse("bad_csr");
        error(400, "bad_csr", format!("csr is not base64: {e}"))
    })
}

pub(super) fn error(status: u16, reason: &str, msg: String) -> Response<Full<Bytes>> {
    let body = serde_json::to_string(&ErrorBody {
        error: msg,
        reason: reason.to_owned(),
    })
    .unwrap_or_default();
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    )
}

/// Response bodies: whole (most) or streamed (`/v1/watch`).
pub type RespBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// How often a watch stream repeats the snapshot when nothing changes (a heartbeat).
pub const WATCH_HEARTBEAT: Duration = Duration::from_secs(15);

pub use super::ca::DEFAULT_MAX_CONNECTIONS;

/// An accepted connection, counted in the open-connections gauge until it ends.
struct Open(Gauge);

impl Open {
    fn new(open: Gauge) -> Self {
        open.inc();
        Self(open)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The SPIFFE IDs a watch asks endpoints for ([`api::UPSTREAMS_HEADER`]).
fn upstreams(headers: &http::HeaderMap) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for v in headers.get_all(api::UPSTREAMS_HEADER) {
        let v = v
            .to_str()
            .map_err(|_| format!("{} is not text", api::UPSTREAMS_HEADER))?;
        for id in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let id = crate::identity::id::parse_id(id)
                .map_err(|e| format!("{}: {id:?}: {e}", api::UPSTREAMS_HEADER))?;
            if !out.contains(&id.to_string()) {
                out.push(id.to_string());
            }
        }
    }
    if out.len() > api::MAX_UPSTREAMS {
        return Err(format!(
            "{}: at most {} SPIFFE IDs",
            api::UPSTREAMS_HEADER,
            api::MAX_UPSTREAMS
        ));
    }
    Ok(out)
}

/// What woke a watch stream.
enum Wake {
    Policy,
    Endpoints,
    Heartbeat,
    End,
}

fn watch(ca: Arc<Ca>, peer: Option<SvidInfo>, headers: &http::HeaderMap) -> Response<RespBody> {
    let Some(peer) = peer else {
        return error(
            401,
            "unauthenticated",
            "watch needs mTLS with a valid SVID".into(),
        )
        .map(BodyExt::boxed);
    };
    if let Some(refused) = signin::not_a_person(&ca, &peer.id, "opens no watch stream") {
        return refused.map(BodyExt::boxed);
    }
    let ids = match upstreams(headers) {
        Ok(ids) => Arc::new(ids),
        Err(e) => return error(400, "bad_request", e).map(BodyExt::boxed),
    };
    // The stream lives no longer than the certificate that opened it: the sidecar reconnects
    // with its renewed SVID (it rotates at half-life, long before this).
    let left =
        Duration::try_from(peer.not_after - time::OffsetDateTime::now_utc()).unwrap_or_default();
    let until = tokio::time::Instant::now() + left;
    let rx = ca.dist.subscribe();
    let reg = ca.registry.subscribe();
    let state = (
        ca,
        rx,
        reg,
        true,
        None::<std::collections::BTreeMap<String, Vec<String>>>,
    );
    let stream = futures_util::stream::unfold(
        state,
        move |(ca, mut rx, mut reg, first, mut last)| {
            let ids = ids.clone();
            async move {
                let mut wake = if first { Wake::Policy } else { Wake::End };
                loop {
                    if !first {
                        let left = until.saturating_duration_since(tokio::time::Instant::now());
                        if left.is_zero() {
                            return None;
                        }
                        // A change, or a heartbeat; a closed channel means shutdown.
                        wake = tokio::select! {
                            r = rx.changed() => if r.is_ok() { Wake::Policy } else { Wake::End },
                            r = reg.changed() => if r.is_ok() { Wake::Endpoints } else { Wake::End },
                            _ = tokio::time::sleep(WATCH_HEARTBEAT.min(left)) => Wake::Heartbeat,
                        };
                        if matches!(wake, Wake::End) || tokio::time::Instant::now() >= until {
                            return None;
                        }
                    }
                    let now = time::OffsetDateTime::now_utc();
                    let endpoints = ca
                        .registry
                        .addresses_of(ids.iter().map(String::as_str), now);
                    // A registry change that does not touch this sidecar's upstreams is not sent.
                    if matches!(wake, Wake::Endpoints) && last.as_ref() == Some(&endpoints) {
                        continue;
                    }
                    // Without any good read of the grants, end the stream: the sidecar reconnects.
                    let mut snap = ca.dist.snapshot(&ca).await?;
                    snap.endpoints = endpoints.clone();
                    last = Some(endpoints);
                    let mut line = serde_json::to_vec(&snap).unwrap_or_default();
                    line.push(b'\n');
                    return Some((
                        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(line))),
                        (ca, rx, reg, false, last),
                    ));
                }
            }
        },
    );
    let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// Serves one request.
pub async fn handle(
    ca: Arc<Ca>,
    peer: Option<SvidInfo>,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let start = Instant::now();
    // A connection outlives the handshake that authenticated it (keep-alive): a client
    // certificate that has expired since authenticates nothing.
    let peer = peer.filter(|p| p.not_after > time::OffsetDateTime::now_utc());
    let path = req.uri().path().to_owned();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, api::BUNDLE_PATH) => {
            json_response(StatusCode::OK, ca.jwks().as_str().to_owned())
        }
        (&Method::POST, api::SVID_PATH) => svid(ca.clone(), peer, addr, req).await,
        (&Method::POST, api::AUDIT_PATH) => audit(ca.clone(), peer, req).await,
        (&Method::POST, api::JWTSVID_PATH) => jwt_svid(ca.clone(), peer, req).await,
        (&Method::GET, api::WATCH_PATH) => return watch(ca.clone(), peer, req.headers()),
        (&Method::PUT | &Method::DELETE, api::ENDPOINTS_PATH) => {
            endpoints::endpoints(ca.clone(), peer, req).await
        }
        (&Method::POST, api::USER_SVID_PATH) => signin::user_svid(ca.clone(), addr, req).await,
        (&Method::GET, api::OIDC_PATH) => signin::issuers(&ca),
        (
            _,
            api::BUNDLE_PATH
            | api::USER_SVID_PATH
            | api::OIDC_PATH
            | api::SVID_PATH
            | api::JWTSVID_PATH
            | api::AUDIT_PATH
            | api::WATCH_PATH
            | api::ENDPOINTS_PATH,
        ) => error(405, "method_not_allowed", "method not allowed".into()),
        (m, p) if super::user_api::serves(p) => {
            let (m, p) = (m.clone(), p.to_owned());
            match read_body(&ca, req.into_body(), api::MAX_BODY, "request body").await {
                Ok(b) => {
                    let (status, body) = super::user_api::answer(ca.clone(), peer, m, p, b).await;
                    json_response(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body)
                }
                Err(refused) => refused,
            }
        }
        _ => error(404, "not_found", format!("no such endpoint: {path}")),
    };
    let label = match path.as_str() {
        api::BUNDLE_PATH
        | api::SVID_PATH
        | api::JWTSVID_PATH
        | api::AUDIT_PATH
        | api::USER_SVID_PATH
        | api::ENDPOINTS_PATH => path,
        _ => "other".to_owned(),
    };
    ca.metrics
        .latency
        .get_or_create(&PathLabel { path: label })
        .observe(start.elapsed().as_secs_f64());
    resp.map(BodyExt::boxed)
}

/// `POST /v1/jwtsvid`: a JWT-SVID for the caller's certificate's SPIFFE ID (a `spiffe_id` in
/// the body is ignored).
async fn jwt_svid(
    ca: Arc<Ca>,
    peer: Option<SvidInfo>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let Some(peer) = peer else {
        ca.metrics.refuse("unauthenticated");
        return error(
            401,
            "unauthenticated",
            "a JWT-SVID needs mTLS with your current SVID".into(),
        );
    };
    if let Some(refused) = signin::not_a_person(&ca, &peer.id, "gets no JWT-SVIDs") {
        return refused;
    }
    let parsed: api::JwtSvidRequest =
        match read_json(&ca, req.into_body(), r#"{"audience": ["..."]}"#).await {
            Ok(p) => p,
            Err(refused) => return refused,
        };
    let ca2 = ca.clone();
    // Signing and the audit event's write are blocking work.
    let result = tokio::task::spawn_blocking(move || {
        ca2.mint_jwt(&peer, &parsed.audience).map(|m| (m, peer))
    })
    .await;
    match result {
        Ok(Ok((minted, peer))) => {
            let resp = api::JwtSvidResponse {
                spiffe_id: peer.id.to_string(),
                token: minted.token,
                expires_at: minted.expires_at.unix_timestamp(),
            };
            json_response(
                StatusCode::OK,
                serde_json::to_string(&resp).unwrap_or_default(),
            )
        }
        Ok(Err(refusal)) => {
            ca.metrics.refuse(refusal.reason());
            error(refusal.status(), refusal.reason(), refusal.to_string())
        }
        Err(e) => error(500, "internal", format!("JWT-SVID task failed: {e}")),
    }
}

async fn audit(
    ca: Arc<Ca>,
    peer: Option<SvidInfo>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let body = match read_body(&ca, req.into_body(), api::MAX_AUDIT_BODY, "audit batch").await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let ca2 = ca.clone();
    match tokio::task::spawn_blocking(move || super::audit::ingest(&ca2, peer.as_ref(), &body))
        .await
    {
        Ok(Ok(acked)) => json_response(StatusCode::OK, super::audit::acked_body(acked)),
        Ok(Err(e)) => {
            ca.metrics.refuse(e.reason());
            let body = serde_json::json!({
                "error": e.to_string(), "reason": e.reason(), "expected": e.expected(),
            });
            json_response(
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body.to_string(),
            )
        }
        Err(e) => error(500, "internal", format!("audit task failed: {e}")),
    }
}

async fn svid(
    ca: Arc<Ca>,
    peer: Option<SvidInfo>,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let parsed: SvidRequest = match read_json(&ca, req.into_body(), "a valid SVID request").await {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    let csr = match decode_csr(&ca, &parsed.csr) {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let caller = match (parsed.token, parsed.k8s_token, peer) {
        (Some(t), _, _) => Caller::Token(t),
        (None, Some(jwt), _) => Caller::K8s(jwt),
        (None, None, Some(info)) => Caller::Svid(info),
        (None, None, None) => Caller::Anonymous,
    };
    let ttl = parsed.ttl.map(Duration::from_secs);
    let peer_text = addr.to_string();
    let ca2 = ca.clone();
    // Signing and the store's fsync are blocking work.
    let result =
        tokio::task::spawn_blocking(move || ca2.issue_svid(&csr, caller, ttl, &peer_text)).await;
    match result {
        Ok(Ok(issued)) => {
            let ttl = (issued.not_after - time::OffsetDateTime::now_utc())
                .whole_seconds()
                .max(0) as u64;
            let bundle: serde_json::Value =
                serde_json::from_str(&ca.jwks()).unwrap_or(serde_json::Value::Null);
            let resp = SvidResponse {
                spiffe_id: issued.id.to_string(),
                chain: issued.chain.iter().map(|c| STANDARD.encode(c)).collect(),
                bundle,
                ttl,
                serial: issued.serial,
            };
            json_response(
                StatusCode::OK,
                serde_json::to_string(&resp).unwrap_or_default(),
            )
        }
        Ok(Err(refusal)) => error(refusal.status(), refusal.reason(), refusal.to_string()),
        Err(e) => error(500, "internal", format!("issuance task failed: {e}")),
    }
}

/// Accepts TLS connections on `listener` until `shutdown` flips, then drains connections for
/// up to `drain`. At most `max_connections` (from the settings) are open at once: one more is
/// closed as soon as it is accepted, so its client learns at once and retries with backoff
/// (rather than waiting unseen in the listen backlog), and the refusal is counted.
pub async fn serve(
    ca: Arc<Ca>,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let verifier = Arc::new(SpiffeClientVerifier::optional(ca.bundles()));
    let tls =
        match crate::tls::server_config_with(ca.credentials(), verifier, &[b"h2", b"http/1.1"]) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, "cannot build the TLS configuration");
                return;
            }
        };
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let max = ca
        .settings()
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    let refused = ca.metrics.connections_refused.clone();
    let limit = Limit::new(slots, move |_: &SocketAddr, first| {
        refused.inc();
        if first {
            warn!(
                limit = max,
                "connection limit reached: closing new connections until some end (--max-connections)"
            );
        }
    });
    accept::serve("api", listener, shutdown, limit, |tcp, addr| {
        let open = Open::new(ca.metrics.open_connections.clone());
        let acceptor = acceptor.clone();
        let ca = ca.clone();
        let span = info_span!("conn", peer = %addr, spiffe_id = tracing::field::Empty);
        let watcher = graceful.watcher();
        (span, async move {
            let _open = open;
            let timeout = ca.settings().client_timeout;
            let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    ca.metrics.handshake_failures.inc();
                    debug!(error = %describe_tls_error(&e), "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    ca.metrics.handshake_failures.inc();
                    debug!("TLS handshake timed out");
                    return;
                }
            };
            let peer = peer_identity(tls.get_ref().1.peer_certificates()).ok();
            if let Some(p) = &peer {
                tracing::Span::current().record("spiffe_id", tracing::field::display(&p.id));
            }
            let svc = hyper::service::service_fn(move |req| {
                let ca = ca.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(handle(ca, peer, addr, req).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .max_buf_size(64 * 1024);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(64)
                .max_header_list_size(32 * 1024)
                .keep_alive_interval(Some(Duration::from_secs(30)));
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                debug!(error = %e, "connection ended with an error");
            }
        })
    })
    .await;
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
}
