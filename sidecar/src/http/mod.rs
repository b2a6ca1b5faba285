//! HTTP-aware proxying (`protocol = "http"`): HTTP/1.1 and HTTP/2 (gRPC included) from the app,
//! HTTP/2 over mTLS between sidecars, a policy decision per request, and the caller's verified
//! identity handed to the app in `x-forwarded-client-cert`.

mod idle;
pub mod inbound;
pub mod outbound;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tracing::debug;

use crate::config::UnderscoreHeaders;

/// The body type every proxied message uses (streamed, trailers preserved).
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The identity header the inbound sidecar sets (Envoy's format).
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// The decision ID of a denial, on every 403 the sidecar answers.
pub const DECISION_ID: HeaderName = HeaderName::from_static("x-mayfly-decision-id");

/// Headers only the sidecar sets: a request header that spells one of them with `_` for `-` is
/// dropped or refused (WSGI and CGI-style servers read both spellings as one).
pub const IDENTITY_HEADERS: [HeaderName; 2] = [XFCC, DECISION_ID];

/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 100;
/// Largest header block, in bytes.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// An HTTP/1.1 server builder with mayfly's limits (header count and size, slowloris timeout).
pub fn h1_server(header_timeout: std::time::Duration) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES * 2)
        .max_headers(MAX_HEADERS);
    b
}

/// An HTTP/2 server builder with mayfly's limits.
pub fn h2_server() -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
    b
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells HTTP/2 prior knowledge (h2c) from HTTP/1 on a plaintext connection by peeking at its
/// first bytes, within `timeout`. `None`: the client sent too little in time, or left.
pub async fn sniff_h2(tcp: &tokio::net::TcpStream, timeout: std::time::Duration) -> Option<bool> {
    let fut = async {
        let mut buf = [0u8; 24];
        loop {
            let n = tcp.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != H2_PREFACE[..n] {
                return Some(false);
            }
            if n == H2_PREFACE.len() {
                return Some(true);
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

/// The checks every proxied request passes before the policy sees it: the audit spool can
/// take its record (fail-closed), no smuggling shape, headers within limits, no identity
/// header spelled with `_` (dropped, or refused if so configured), a path that normalises.
/// Returns the normalised path, or the local answer to send instead.
pub(crate) fn admit(
    shared: &crate::proxy::Shared,
    direction: crate::metrics::Direction,
    req: &mut http::Request<hyper::body::Incoming>,
) -> Result<String, Box<Response<Body>>> {
    let m = &shared.metrics;
    let grpc = is_grpc(req.headers());
    let refuse = |label: &str, status: StatusCode, code: u8, msg: &str| {
        m.request(direction, label);
        Err(Box::new(local_reply(grpc, status, code, msg, None)))
    };
    if !shared.audit.admits() {
        return refuse(
            "audit_full",
            StatusCode::SERVICE_UNAVAILABLE,
            GRPC_UNAVAILABLE,
            "mayfly: audit spool full, refusing unaudited traffic",
        );
    }
    if let Err(why) = smuggling_check(req.headers()) {
        return refuse(
            "malformed",
            StatusCode::BAD_REQUEST,
            GRPC_INVALID_ARGUMENT,
            why,
        );
    }
    if let Err(why) = header_limits(req.headers()) {
        return refuse(
            "malformed",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GRPC_INVALID_ARGUMENT,
            why,
        );
    }
    let forged = underscored_identity_headers(req.headers());
    if let Some(first) = forged.first() {
        if shared.limits.underscore_identity_headers == UnderscoreHeaders::Reject {
            return refuse(
                "malformed",
                StatusCode::BAD_REQUEST,
                GRPC_INVALID_ARGUMENT,
                &format!("header `{first}` spells a header only mayfly sets"),
            );
        }
        debug!(header = %first, "dropped a request header that spells an identity header with `_`");
        for n in &forged {
            req.headers_mut().remove(n);
        }
    }
    mayfly_policy::normalize_path(req.uri().path()).or_else(|e| {
        refuse(
            "malformed",
            StatusCode::BAD_REQUEST,
            GRPC_INVALID_ARGUMENT,
            &format!("request path refused: {e}"),
        )
    })
}

/// The names in `h` that equal one of [`IDENTITY_HEADERS`] once `_` is read as `-`, other than
/// the header itself.
pub fn underscored_identity_headers(h: &HeaderMap) -> Vec<HeaderName> {
    h.keys()
        .filter(|n| {
            let n = n.as_str().as_bytes();
            n.contains(&b'_')
                && IDENTITY_HEADERS.iter().any(|id| {
                    let id = id.as_str().as_bytes();
                    id.len() == n.len()
                        && id
                            .iter()
                            .zip(n)
                            .all(|(a, b)| a == b || (*a == b'-' && *b == b'_'))
                })
        })
        .cloned()
        .collect()
}

/// The headers as the policy sees them (names are lowercase already). The identity header is
/// left out: only the inbound sidecar sets it, after the decision.
pub(crate) fn policy_headers(h: &HeaderMap) -> Vec<(&str, &str)> {
    h.iter()
        .filter(|(n, _)| *n != XFCC)
        .filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?)))
        .collect()
}

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Whether a request is gRPC (its errors must be gRPC statuses, not HTTP errors).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// A local answer: plain text for HTTP, a trailers-only status for gRPC.
pub fn local_reply(
    grpc: bool,
    status: StatusCode,
    grpc_code: u8,
    message: &str,
    decision_id: Option<&str>,
) -> Response<Body> {
    let mut r = if grpc {
        let mut r = Response::new(empty());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(u16::from(grpc_code)));
        if let Ok(v) = HeaderValue::from_str(&message.replace(['\r', '\n'], " ")) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(full(format!("{message}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if let Some(id) = decision_id.and_then(|d| HeaderValue::from_str(d).ok()) {
        r.headers_mut().insert(DECISION_ID, id);
    }
    r
}

/// Most bytes of a request body the sidecar reads and discards when it answers the request
/// itself (a denial, a refusal): enough for ordinary API bodies, so that the client's HTTP/1.1
/// connection stays usable for its next request.
pub const DRAIN_LIMIT: u64 = 64 * 1024;
/// How long the sidecar waits for such a body before it answers anyway.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads and discards `body` up to `limit` bytes; true when it ended within the limit.
async fn discard(body: &mut hyper::body::Incoming, limit: u64) -> bool {
    use hyper::body::Body as _;
    let mut seen = 0u64;
    loop {
        if body.is_end_stream() {
            return true;
        }
        match body.frame().await {
            None => return true,
            Some(Err(_)) => return false,
            Some(Ok(f)) => {
                seen += f.data_ref().map_or(0, |d| d.len() as u64);
                if seen > limit {
                    return false;
                }
            }
        }
    }
}

/// The sidecar's own answer to a request it does not forward. The request's body is read and
/// discarded first (up to [`DRAIN_LIMIT`] within [`DRAIN_TIMEOUT`]): an HTTP/1.1 server that
/// answers before the body is in must otherwise close the connection, and the client's next
/// request on it fails. A larger or slower body gets `Connection: close` on the answer instead,
/// and is discarded in the background for a little longer, so that the close is orderly (a
/// socket closed with unread data resets the connection, and the answer with it).
pub(crate) async fn unforwarded(
    version: http::Version,
    mut body: hyper::body::Incoming,
    mut resp: Response<Body>,
) -> Response<Body> {
    use hyper::body::Body as _;
    let small = body.size_hint().lower() <= DRAIN_LIMIT;
    if small
        && tokio::time::timeout(DRAIN_TIMEOUT, discard(&mut body, DRAIN_LIMIT))
            .await
            .unwrap_or(false)
    {
        return resp;
    }
    if version < http::Version::HTTP_2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, discard(&mut body, u64::MAX)).await;
        });
    }
    resp
}

/// [`unforwarded`] for a whole request.
pub(crate) async fn unforwarded_req(
    req: http::Request<hyper::body::Incoming>,
    resp: Response<Body>,
) -> Response<Body> {
    let version = req.version();
    unforwarded(version, req.into_body(), resp).await
}

/// The audit record of one HTTP request. Batched durability: one `http.request` record, emitted
/// once the caller's status is known. Strict: the `http.request` record (the decision, without
/// a status) is made durable before the request is forwarded, and an `http.response` record
/// (same request line and decision ID, with the status) follows when the answer is known; a
/// denial is one `http.request` record with its 403, durable before the 403 is sent.
pub(crate) struct RequestRecord<'a> {
    audit: &'a crate::audit::Auditor,
    fields: serde_json::Map<String, serde_json::Value>,
    started: std::time::Instant,
    /// The decision is recorded already (strict): `finish` records only the outcome.
    decided: bool,
}

/// The fields an `http.response` record repeats from its `http.request` record.
const RESPONSE_FIELDS: [&str; 7] = [
    "direction",
    "local_id",
    "peer_id",
    "protocol",
    "method",
    "path",
    "decision_id",
];

impl<'a> RequestRecord<'a> {
    /// `base` (from `proxy::audit_base`) plus the request line and the policy's verdict.
    pub(crate) fn new(
        audit: &'a crate::audit::Auditor,
        mut base: serde_json::Map<String, serde_json::Value>,
        method: &http::Method,
        path: &str,
        verdict: &crate::policy::Verdict,
        started: std::time::Instant,
    ) -> Self {
        base.insert("method".into(), method.as_str().into());
        base.insert("path".into(), path.into());
        verdict.audit_into(&mut base);
        Self {
            audit,
            fields: base,
            started,
            decided: false,
        }
    }

    /// Before the request is forwarded. Strict: records the decision and waits until it is
    /// durable; an error means the request must be refused. Batched: nothing yet.
    pub(crate) async fn before_forwarding(&mut self) -> Result<(), crate::audit::NotDurable> {
        if self.audit.durability() != crate::audit::Durability::Strict {
            return Ok(());
        }
        self.decided = true;
        self.audit.record("http.request", self.fields.clone()).await
    }

    fn outcome(&mut self, status: StatusCode) {
        if self.decided {
            self.fields
                .retain(|k, _| RESPONSE_FIELDS.contains(&k.as_str()));
        }
        self.fields.insert("status".into(), status.as_u16().into());
        self.fields.insert(
            "duration_ms".into(),
            (self.started.elapsed().as_millis() as u64).into(),
        );
    }

    /// Records the outcome of a forwarded request (never waits).
    pub(crate) fn finish(mut self, status: StatusCode) {
        self.outcome(status);
        let kind = if self.decided {
            "http.response"
        } else {
            "http.request"
        };
        self.audit.emit(kind, self.fields);
    }

    /// Records a request answered here without forwarding it (a denial). Strict: waits until
    /// the record is durable; an error means the answer must be a refusal instead.
    pub(crate) async fn finish_unforwarded(
        mut self,
        status: StatusCode,
    ) -> Result<(), crate::audit::NotDurable> {
        self.outcome(status);
        self.audit.record("http.request", self.fields).await
    }
}

/// The answer to a request whose decision record cannot be made durable (strict audit): 503 /
/// UNAVAILABLE, nothing forwarded.
pub(crate) fn audit_unavailable(
    shared: &crate::proxy::Shared,
    direction: crate::metrics::Direction,
    grpc: bool,
    why: &crate::audit::NotDurable,
) -> Response<Body> {
    shared.metrics.request(direction, "audit_unavailable");
    tracing::warn!(error = %why, "strict audit: the decision record is not durable; refusing the request");
    local_reply(
        grpc,
        StatusCode::SERVICE_UNAVAILABLE,
        GRPC_UNAVAILABLE,
        "mayfly: the audit record of this request cannot be made durable, refusing it",
        None,
    )
}

/// The answer to a request the policy refused: 403 / PERMISSION_DENIED with the decision ID.
pub(crate) fn denied(grpc: bool, verdict: &crate::policy::Verdict) -> Response<Body> {
    local_reply(
        grpc,
        StatusCode::FORBIDDEN,
        GRPC_PERMISSION_DENIED,
        &format!(
            "denied by mayfly policy (decision {})",
            verdict.decision_id()
        ),
        Some(verdict.decision_id()),
    )
}

/// The authority the caller addressed: the request URI's, else its Host header.
pub(crate) fn request_authority(parts: &http::request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
}

/// The request target for the next hop, or the 400 / INVALID_ARGUMENT answer to give.
pub(crate) fn next_hop_uri(
    grpc: bool,
    scheme: &str,
    authority: &str,
    path_and_query: String,
) -> Result<http::Uri, Box<Response<Body>>> {
    http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| {
            Box::new(local_reply(
                grpc,
                StatusCode::BAD_REQUEST,
                GRPC_INVALID_ARGUMENT,
                &format!("bad request target: {e}"),
                None,
            ))
        })
}

/// A response from the next hop, passed on without its hop-by-hop headers; with its status.
/// Underscored spellings of identity headers are dropped here too: only mayfly sets those.
pub(crate) fn relay(resp: Response<hyper::body::Incoming>) -> (StatusCode, Response<Body>) {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    for n in underscored_identity_headers(&parts.headers) {
        parts.headers.remove(n);
    }
    (parts.status, Response::from_parts(parts, body.boxed()))
}

/// gRPC status PERMISSION_DENIED.
pub const GRPC_PERMISSION_DENIED: u8 = 7;
/// gRPC status UNAVAILABLE.
pub const GRPC_UNAVAILABLE: u8 = 14;
/// gRPC status INVALID_ARGUMENT.
pub const GRPC_INVALID_ARGUMENT: u8 = 3;

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
/// `te: trailers` survives (gRPC needs it).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Read before `Connection` is applied: a conforming HTTP/1.1 client that sends TE names it
    // in `Connection: te`, and the app only sends trailers to a request that accepts them.
    let trailers = h.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|p| {
                p.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            })
        })
    });
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        h.remove(n);
    }
    h.remove(header::TE);
    if trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Refuses a header block over [`MAX_HEADERS`] entries or [`MAX_HEADER_BYTES`] bytes
/// (431 Request Header Fields Too Large), whatever the protocol let through.
pub fn header_limits(h: &HeaderMap) -> Result<(), &'static str> {
    if h.len() > MAX_HEADERS {
        return Err("too many request headers");
    }
    let bytes: usize = h.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if bytes > MAX_HEADER_BYTES {
        return Err("request headers too large");
    }
    Ok(())
}

/// Refuses request smuggling shapes: both Content-Length and Transfer-Encoding, or several
/// different Content-Length values.
pub fn smuggling_check(h: &HeaderMap) -> Result<(), &'static str> {
    let cls: Vec<&HeaderValue> = h.get_all(header::CONTENT_LENGTH).iter().collect();
    if !cls.is_empty() && h.contains_key(header::TRANSFER_ENCODING) {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if cls.len() > 1 && cls.iter().any(|v| *v != cls[0]) {
        return Err("conflicting Content-Length values");
    }
    Ok(())
}

/// The Envoy-format XFCC value for a verified peer.
pub fn xfcc_value(by: &str, peer_leaf_der: &[u8], peer_id: &str) -> Option<HeaderValue> {
    let hash = hex::encode(mayfly_ca::keys::sha256(peer_leaf_der));
    HeaderValue::from_str(&format!("By={by};Hash={hash};URI={peer_id}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(
            !h.contains_key("x-secret")
                && !h.contains_key("keep-alive")
                && !h.contains_key(header::CONNECTION)
        );
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn te_trailers_survives_being_named_in_connection() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("te"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get(header::TRAILER).unwrap(), "x-sum");
        assert!(!h.contains_key(header::CONNECTION));
    }

    #[test]
    fn identity_headers_spelled_with_underscores_are_found_and_nothing_else() {
        let mut h = HeaderMap::new();
        for n in [
            "x_forwarded_client_cert",
            "x-forwarded_client-cert",
            "x_mayfly_decision_id",
            "x-forwarded-client-cert",
            "x_forwarded_client_certs",
            "x_other",
        ] {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        let mut found: Vec<String> = underscored_identity_headers(&h)
            .iter()
            .map(|n| n.to_string())
            .collect();
        found.sort();
        assert_eq!(
            found,
            [
                "x-forwarded_client-cert",
                "x_forwarded_client_cert",
                "x_mayfly_decision_id"
            ]
        );
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert!(smuggling_check(&h).is_ok());
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(smuggling_check(&h).is_err());
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert!(smuggling_check(&h).is_err());
    }

    #[test]
    fn grpc_denials_are_trailers_only_with_permission_denied() {
        let r = local_reply(
            true,
            StatusCode::FORBIDDEN,
            GRPC_PERMISSION_DENIED,
            "no",
            Some("d-1"),
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers().get("grpc-status").unwrap(), "7");
        assert_eq!(r.headers().get(DECISION_ID).unwrap(), "d-1");
        let r = local_reply(
            false,
            StatusCode::FORBIDDEN,
            GRPC_PERMISSION_DENIED,
            "no",
            Some("d-2"),
        );
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
}
