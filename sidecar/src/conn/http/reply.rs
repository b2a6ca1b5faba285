//! The sidecar's own answers to requests it does not forward: 400 for a bad target, 403
//! denials with their decision ID, 503 when the audit cannot keep up; a request's body
//! drained first so that the client's connection stays usable.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;

use super::{Body, GRPC_INVALID_ARGUMENT, GRPC_PERMISSION_DENIED, GRPC_UNAVAILABLE, local_reply};

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

/// The answer to a request whose decision record cannot be made durable (strict audit): 503 /
/// UNAVAILABLE, nothing forwarded.
pub(crate) fn audit_unavailable(
    shared: &crate::conn::Shared,
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
