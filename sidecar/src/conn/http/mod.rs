//! HTTP-aware proxying (`protocol = "http"`): HTTP/1.1 and HTTP/2 (gRPC included) from the app,
//! HTTP/2 over mTLS between sidecars, a policy decision per request, and the caller's verified
//! identity handed to the app in `x-forwarded-client-cert`.

mod app_h1;
mod app_h2;
pub mod checks;
#[cfg(test)]
mod h1_tests;
#[cfg(test)]
mod h2_tests;
mod idle;
pub mod inbound;
pub mod outbound;
mod record;
#[doc(hidden)]
pub use record::RESPONSE_FIELDS;
#[cfg(test)]
mod record_golden;
pub mod reply;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

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

/// Most concurrent streams a peer may open on one HTTP/2 connection to us.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Flow-control window of each HTTP/2 stream we receive on (server and client side).
pub const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// Flow-control window of a whole HTTP/2 connection we receive on: enough for several large
/// bodies at once, since every request between two sidecars shares one connection.
pub const H2_CONN_WINDOW: u32 = 4 * 1024 * 1024;
/// Largest HTTP/2 frame we accept: the protocol's default (a TLS record carries at most 16 KB).
pub const H2_MAX_FRAME: u32 = 16 * 1024;
/// A PING after this long without a frame from the peer (no answer within hyper's default
/// 20 s closes the connection).
const H2_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// An HTTP/2 server builder with mayfly's limits and flow-control windows (the app side of
/// the outbound, and the inbound from other sidecars).
pub fn h2_server() -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .max_frame_size(H2_MAX_FRAME)
        .adaptive_window(false)
        .keep_alive_interval(Some(H2_KEEP_ALIVE));
    b
}

/// An HTTP/2 client builder with the same limits and windows: the pooled connection between
/// sidecars (outbound) and the connection to an `app_protocol = "http2"` app (inbound).
/// Adaptive windows stay off: their BDP pings cost a lock and a clock read per data frame,
/// and on loopback or a LAN a fixed window is never the limit.
pub fn h2_client() -> hyper::client::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .max_frame_size(H2_MAX_FRAME)
        .adaptive_window(false)
        .keep_alive_interval(Some(H2_KEEP_ALIVE))
        .keep_alive_while_idle(true);
    b
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells HTTP/2 prior knowledge (h2c) from HTTP/1 on a plaintext connection by peeking at its
/// first bytes, within `timeout`. `None`: the client sent too little in time, or left.
///
/// Readiness-driven: a preface that arrives in pieces is looked at again when the next piece
/// arrives (the socket's readiness is cleared only if nothing came in since the last peek), not
/// on a timer.
pub async fn sniff_h2(tcp: &tokio::net::TcpStream, timeout: std::time::Duration) -> Option<bool> {
    let fut = async {
        loop {
            let ready = tcp.ready(tokio::io::Interest::READABLE).await.ok()?;
            match tcp.try_io(tokio::io::Interest::READABLE, || peek_preface(tcp)) {
                Ok(verdict) => return verdict,
                // The client closed its side after part of the preface: no more will come
                // (and a closed side stays readable, so waiting again would spin).
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && ready.is_read_closed() => {
                    return None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return None,
            }
        }
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

/// One non-blocking peek at the connection's first bytes: `Some(true)` the whole HTTP/2
/// preface, `Some(false)` anything else, `None` the client left; `WouldBlock` while what
/// arrived so far is a prefix of the preface (or nothing did).
fn peek_preface(tcp: &tokio::net::TcpStream) -> std::io::Result<Option<bool>> {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; H2_PREFACE.len()];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    let n = recv(tcp.as_raw_fd(), &mut buf, flags).map_err(std::io::Error::from)?;
    if n == 0 {
        return Ok(None);
    }
    if buf[..n] != H2_PREFACE[..n] {
        return Ok(Some(false));
    }
    if n == H2_PREFACE.len() {
        return Ok(Some(true));
    }
    Err(std::io::ErrorKind::WouldBlock.into())
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

/// gRPC status PERMISSION_DENIED.
pub const GRPC_PERMISSION_DENIED: u8 = 7;
/// gRPC status UNAVAILABLE.
pub const GRPC_UNAVAILABLE: u8 = 14;
/// gRPC status DEADLINE_EXCEEDED.
pub const GRPC_DEADLINE_EXCEEDED: u8 = 4;
/// gRPC status INVALID_ARGUMENT.
pub const GRPC_INVALID_ARGUMENT: u8 = 3;

/// The Envoy-format XFCC value for a verified peer.
pub fn xfcc_value(by: &str, peer_leaf_der: &[u8], peer_id: &str) -> Option<HeaderValue> {
    let hash = hex::encode(mayfly_ca::keys::sha256(peer_leaf_der));
    HeaderValue::from_str(&format!("By={by};Hash={hash};URI={peer_id}")).ok()
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

#[cfg(test)]
mod replies {
    use super::*;

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

#[cfg(test)]
mod sniffing {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::{H2_PREFACE, sniff_h2};

    /// The server side of a loopback connection whose client sends `pieces`, pausing between
    /// them, and then closes (`close`) or stays silent; and what `sniff_h2` made of it.
    async fn sniff(
        pieces: &'static [&'static [u8]],
        close: bool,
        timeout: Duration,
    ) -> Option<bool> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.set_nodelay(true).unwrap();
            for p in pieces {
                c.write_all(p).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !close {
                tokio::time::sleep(timeout * 2).await;
            }
        });
        let (server, _) = listener.accept().await.unwrap();
        let verdict = sniff_h2(&server, timeout).await;
        client.abort();
        verdict
    }

    #[tokio::test]
    async fn a_preface_that_arrives_in_pieces_is_told_as_http2() {
        let (a, b) = H2_PREFACE.split_at(9);
        let pieces: &'static [&'static [u8]] =
            Box::leak(vec![a, &b[..5], &b[5..]].into_boxed_slice());
        assert_eq!(
            sniff(pieces, false, Duration::from_secs(10)).await,
            Some(true)
        );
    }

    #[tokio::test]
    async fn an_http1_request_is_told_as_not_http2() {
        let pieces: &'static [&'static [u8]] = &[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"];
        assert_eq!(
            sniff(pieces, false, Duration::from_secs(10)).await,
            Some(false)
        );
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_preface_is_neither() {
        let pieces: &'static [&'static [u8]] = &[b"PRI * HTTP/2.0"];
        assert_eq!(sniff(pieces, true, Duration::from_secs(10)).await, None);
    }

    #[tokio::test]
    async fn a_client_that_stalls_mid_preface_is_cut_at_the_timeout() {
        let pieces: &'static [&'static [u8]] = &[b"PRI * HTTP/2.0"];
        assert_eq!(sniff(pieces, false, Duration::from_millis(300)).await, None);
    }
}
