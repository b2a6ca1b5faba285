//! One outbound request's attempts: each to an endpoint chosen by the upstream's pool, the
//! next one (on another endpoint, within the retry budget and at most two more) only when a
//! retry cannot do harm:
//!
//! - the request provably never reached the app: no connection or TLS session to the
//!   endpoint, a pooled connection that closed before the request was written (hyper hands it
//!   back), HTTP/2 `REFUSED_STREAM`, or GOAWAY above its stream;
//! - otherwise (a reset after it was written, a 502/503/504 from the replica's sidecar) only
//!   for an idempotent method (GET, HEAD, OPTIONS, PUT, DELETE, TRACE).
//!
//! A body is replayed only when it is empty or buffered (a known length of at most
//! [`MAX_BUFFERED`]); a streamed body is sent once, so only the first kind of failure, before
//! it was taken, is retried. Connect, TLS and reset failures eject the endpoint.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};

use super::super::Body;
use super::Upstream;
use crate::upstreams::Target;

/// Largest request body kept in memory so that it can be sent again.
pub(super) const MAX_BUFFERED: u64 = 64 * 1024;

/// Why no answer is relayed: the status to answer, the failure's metric reason and a message.
pub(super) struct Failed {
    pub(super) status: StatusCode,
    pub(super) reason: &'static str,
    pub(super) message: String,
}

/// The request's body, as the attempts see it.
enum Replay {
    /// Empty or read in full: sent again as often as needed.
    Buffered(Bytes, Option<HeaderMap>),
    /// Streamed from the app: sent once (`None` once taken).
    Streamed(Option<Body>),
}

impl Replay {
    /// Buffers `body` if it is empty or of a known small length.
    async fn new(body: Incoming) -> Result<Self, Failed> {
        let small = body.size_hint().upper().is_some_and(|n| n <= MAX_BUFFERED);
        if !(body.is_end_stream() || small) {
            return Ok(Replay::Streamed(Some(body.boxed())));
        }
        match body.collect().await {
            Ok(c) => {
                let trailers = c.trailers().cloned();
                Ok(Replay::Buffered(c.to_bytes(), trailers))
            }
            Err(e) => Err(Failed {
                status: StatusCode::BAD_REQUEST,
                reason: "bad_request_body",
                message: format!("mayfly: the request body could not be read: {e}"),
            }),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Replay::Buffered(..))
    }

    /// The body of the next attempt; `None` when a streamed body was taken already.
    fn take(&mut self) -> Option<Body> {
        match self {
            Replay::Buffered(b, None) => Some(Full::new(b.clone()).map_err(|e| match e {}).boxed()),
            Replay::Buffered(b, Some(t)) => {
                let t = t.clone();
                Some(
                    Full::new(b.clone())
                        .map_err(|e| match e {})
                        .with_trailers(async move { Some(Ok(t)) })
                        .boxed(),
                )
            }
            Replay::Streamed(b) => b.take(),
        }
    }

    /// A streamed body handed back unsent.
    fn put_back(&mut self, body: Body) {
        if let Replay::Streamed(slot) = self {
            *slot = Some(body);
        }
    }
}

/// The methods RFC 9110 calls idempotent.
fn idempotent(m: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(m)
}

/// Whether an HTTP/2 error proves the server did not process the stream.
fn never_processed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src = Some(e);
    while let Some(s) = src {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away()
                    && h2.is_remote()
                    && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        src = s.source();
    }
    false
}

/// The request line and headers, to build each attempt from.
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    first: Option<http::request::Parts>,
}

impl Head {
    fn request(&mut self, body: Body) -> Request<Body> {
        if let Some(p) = self.first.take() {
            return Request::from_parts(p, body);
        }
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = Version::HTTP_2;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

impl Upstream {
    /// Sends the request (`parts` ready for the next hop) to `first`, then to other
    /// endpoints as the module doc says; `on_target` learns each attempt's endpoint. The
    /// answer's head and status, or why there is none.
    pub(super) async fn attempts(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        first: Target,
        mut on_target: impl FnMut(&std::sync::Arc<crate::upstreams::Endpoint>),
    ) -> Result<(StatusCode, Response<Body>), Failed> {
        let pool = self.pool();
        let retry_any = idempotent(&parts.method);
        let mut head = Head {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            first: Some(parts),
        };
        let mut body = Replay::new(body).await?;
        let mut tried = Vec::new();
        let mut target = first;
        loop {
            on_target(target.endpoint());
            let started = std::time::Instant::now();
            let endpoint = target.endpoint().clone();
            // Whether the next attempt may go, and why this one failed.
            let (retry, failed) = match self.ready_sender(target.address()).await {
                Err(e) => {
                    if e.is_ours() {
                        return Err(Failed {
                            status: StatusCode::BAD_GATEWAY,
                            reason: "upstream_unreachable",
                            message: format!("mayfly: {e}"),
                        });
                    }
                    pool.failed(&endpoint, &e.to_string());
                    pool.answered(&endpoint, None, started.elapsed());
                    (
                        true,
                        Failed {
                            status: StatusCode::BAD_GATEWAY,
                            reason: "upstream_unreachable",
                            message: format!("mayfly: {e}"),
                        },
                    )
                }
                Ok(mut sender) => {
                    let Some(b) = body.take() else {
                        return Err(Failed {
                            status: StatusCode::BAD_GATEWAY,
                            reason: "upstream_error",
                            message: "mayfly: the request body was sent already".into(),
                        });
                    };
                    match sender.try_send_request(head.request(b)).await {
                        Ok(resp) => {
                            let status = resp.status();
                            pool.answered(&endpoint, Some(status.as_u16()), started.elapsed());
                            let gateway = matches!(status.as_u16(), 502..=504);
                            if !(gateway && retry_any && body.replayable()) {
                                return Ok(super::super::checks::relay(resp));
                            }
                            tried.push(endpoint.clone());
                            if !pool.may_retry(tried.len()) {
                                return Ok(super::super::checks::relay(resp));
                            }
                            let Some(t) = pool.target(&tried) else {
                                return Ok(super::super::checks::relay(resp));
                            };
                            tracing::info!(endpoint = %target.address(), status = status.as_u16(), "gateway error from the upstream: retrying on another endpoint");
                            target = t;
                            continue;
                        }
                        Err(mut e) => {
                            pool.answered(&endpoint, None, started.elapsed());
                            let unsent = e.take_message();
                            let err = e.into_error();
                            let retry = if let Some(req) = unsent {
                                // Handed back before it was written: nothing reached the app.
                                body.put_back(req.into_body());
                                true
                            } else if never_processed(&err) {
                                body.replayable()
                            } else {
                                pool.failed(&endpoint, &format!("request failed: {err}"));
                                retry_any && body.replayable()
                            };
                            (
                                retry,
                                Failed {
                                    status: StatusCode::BAD_GATEWAY,
                                    reason: "upstream_error",
                                    message: format!("mayfly: upstream request failed: {err}"),
                                },
                            )
                        }
                    }
                }
            };
            tracing::info!(endpoint = %target.address(), error = %failed.message, retry, "upstream attempt failed");
            tried.push(endpoint);
            if !retry || !pool.may_retry(tried.len()) {
                return Err(failed);
            }
            match pool.target(&tried) {
                Some(t) => target = t,
                None => return Err(failed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refused_streams_prove_the_app_never_saw_a_request_and_only_idempotent_methods_retry_otherwise()
     {
        let refused = h2::Error::from(h2::Reason::REFUSED_STREAM);
        assert!(never_processed(&refused));
        for r in [
            h2::Reason::INTERNAL_ERROR,
            h2::Reason::CANCEL,
            h2::Reason::NO_ERROR,
        ] {
            assert!(!never_processed(&h2::Error::from(r)), "{r:?}");
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(!never_processed(&io));
        for m in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            assert!(
                idempotent(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
        for m in ["POST", "PATCH", "CONNECT"] {
            assert!(
                !idempotent(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
    }
}
