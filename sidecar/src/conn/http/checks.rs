//! The checks every proxied request passes before the policy sees it, and the header hygiene
//! of both directions (hop-by-hop headers, identity headers spelled with `_`), on the request
//! and on the next hop's answer.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use tracing::debug;

use super::{
    Body, GRPC_INVALID_ARGUMENT, GRPC_UNAVAILABLE, IDENTITY_HEADERS, MAX_HEADER_BYTES, MAX_HEADERS,
    XFCC, is_grpc, local_reply,
};
use crate::config::UnderscoreHeaders;

/// The checks every proxied request passes before the policy sees it: the audit spool can
/// take its record (fail-closed), no smuggling shape, headers within limits, no identity
/// header spelled with `_` (dropped, or refused if so configured), a path that normalises.
/// Returns the normalised path, or the local answer to send instead.
pub(crate) fn admit(
    shared: &crate::conn::Shared,
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

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
/// `te: trailers` survives (gRPC needs it).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none (HTTP/2 forbids all but `te`): one pass over the names present
    // instead of a hashed lookup per hop-by-hop name, four times per proxied request.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
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

/// A header that is hop-by-hop whatever `Connection` names (those only count when
/// `Connection` itself is present, which this also matches).
fn is_hop_by_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == header::TE
        || n == header::TRANSFER_ENCODING
        || n == header::UPGRADE
        || n == header::PROXY_AUTHENTICATE
        || n == header::PROXY_AUTHORIZATION
        || n.as_str() == "keep-alive"
        || n.as_str() == "proxy-connection"
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
/// A response from the next hop, passed on without its hop-by-hop headers; with its status.
/// Underscored spellings of identity headers are dropped here too: only mayfly sets those.
pub(crate) fn relay<B>(resp: Response<B>) -> (StatusCode, Response<Body>)
where
    B: hyper::body::Body<Data = bytes::Bytes, Error = hyper::Error> + Send + Sync + 'static,
{
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    for n in underscored_identity_headers(&parts.headers) {
        parts.headers.remove(n);
    }
    (parts.status, Response::from_parts(parts, body.boxed()))
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
    fn each_hop_by_hop_header_goes_even_without_connection() {
        for name in [
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "transfer-encoding",
            "upgrade",
            "te",
        ] {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
            h.insert("x-keep", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name} survived");
            assert!(h.contains_key("x-keep"));
        }
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
}
