//! End-to-end, HTTP mode: a request the sidecar answers itself (a denial) does not spoil a
//! kept-alive HTTP/1.1 connection. The body the client sends with it is read and discarded, so
//! the next request on the same connection is served; a body too large to read is answered
//! with `Connection: close`, and the connection then ends in order. Both directions: denied
//! by web's egress policy (outbound sidecar), denied by orders (inbound sidecar) seen through
//! web, and a client speaking HTTP/1.1 straight to orders' inbound listener over mTLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use mayfly_tests::mesh::Pair;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const ORDERS_POLICY: &str = r#"version = 1
[[rule]]
name = "callers-read-orders"
from = ["spiffe://mayfly.local/web", "spiffe://mayfly.local/tester"]
to = ["spiffe://mayfly.local/orders"]
methods = ["GET"]
"#;

// web's egress policy guards its own prefix: a denial there comes from the outbound sidecar.
const WEB_POLICY: &str = r#"version = 1
[[rule]]
name = "web-calls-orders"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]

[[rule]]
name = "no-private-egress"
action = "deny"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
paths = ["/private", "/private/**"]
"#;

/// web -> orders in HTTP mode, and an SVID for a client of the test's own (`tester`).
async fn mesh() -> Pair {
    Pair::http()
        .policy(ORDERS_POLICY)
        .web_policy(WEB_POLICY)
        .tester()
        .start()
        .await
}

/// One response read off a kept-alive connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// The `Connection` header, lowercased, if any.
    connection: Option<String>,
}

/// Reads one HTTP/1.1 response (Content-Length or chunked body). Err when the connection
/// ends or fails before a whole response arrived.
async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> Result<Answer, String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) => return Err(format!("closed after {} header bytes", buf.len())),
            Ok(_) => buf.push(b[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_owned())
    };
    if let Some(n) = header("content-length") {
        let mut body = vec![0u8; n.parse().unwrap()];
        s.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    } else if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
                line.push(b[0]);
            }
            let size = usize::from_str_radix(String::from_utf8_lossy(&line).trim(), 16).unwrap();
            let mut chunk = vec![0u8; size + 2];
            s.read_exact(&mut chunk).await.map_err(|e| e.to_string())?;
            if size == 0 {
                break;
            }
        }
    }
    Ok(Answer {
        status,
        connection: header("connection"),
    })
}

/// A POST to `path` with a `len`-byte body on the kept-alive connection `s`: the head first,
/// the body a moment later (as a client on a real network sends it, and as the sidecar sees it
/// when it answers before the body is in), then the answer.
async fn post<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    path: &str,
    len: usize,
) -> Result<Answer, String> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: orders\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(30)).await;
    s.write_all(&vec![b'x'; len])
        .await
        .map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    read_response(s).await
}

async fn get<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, path: &str) -> Result<Answer, String> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: orders\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    read_response(s).await
}

/// Ten rounds of a denied POST with a body, then a GET, all on one connection: every GET is
/// answered. Returns a description of the first failure.
async fn rounds<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, denied: &str) -> Result<(), String> {
    for round in 0..10 {
        let a = post(s, denied, 4096 + round * 1000)
            .await
            .map_err(|e| format!("round {round}: POST: {e}"))?;
        if a.status != 403 || a.connection.is_some() {
            return Err(format!("round {round}: POST answered {a:?}"));
        }
        let a = get(s, "/orders/1")
            .await
            .map_err(|e| format!("round {round}: GET after a denied POST: {e}"))?;
        if a.status != 200 {
            return Err(format!("round {round}: GET answered {a:?}"));
        }
    }
    Ok(())
}

/// A body over the drain limit: the denial says `Connection: close`, and the connection then
/// ends in order (the answer arrives whole, then end of stream, not a reset).
async fn too_large<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, denied: &str) {
    let a = post(s, denied, 256 * 1024).await.unwrap();
    assert_eq!(
        (a.status, a.connection.as_deref()),
        (403, Some("close")),
        "{a:?}"
    );
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the connection ends after a Connection: close answer");
    assert!(n.is_ok() && rest.is_empty(), "{n:?} {rest:?}");
}

async fn plain(addr: &str) -> tokio::net::TcpStream {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// An mTLS connection to orders' inbound listener with the tester's SVID, no ALPN (HTTP/1.1).
async fn tls(m: &Pair) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(m.tester.join("svid.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(m.tester.join("svid.key")).unwrap();
    let key = mayfly_ca::keys::SecretKey::from_pkcs8(key.secret_der().to_vec()).unwrap();
    let creds = mayfly_ca::tls::Credentials::new();
    creds.set(mayfly_ca::tls::Svid::new(chain, &key).unwrap());
    let td = mayfly_ca::id::parse_trust_domain("mayfly.local").unwrap();
    let bundle = mayfly_ca::bundle::TrustBundle::from_pem(
        td,
        &std::fs::read_to_string(m.tester.join("bundle.pem")).unwrap(),
    )
    .unwrap();
    let bundles = Arc::new(arc_swap::ArcSwap::from_pointee(
        mayfly_ca::bundle::BundleSet::single(bundle),
    ));
    let cfg = mayfly_ca::tls::client_config(
        creds,
        bundles,
        mayfly_ca::verify::IdMatcher::Exact(
            mayfly_ca::id::parse_id("spiffe://mayfly.local/orders").unwrap(),
        ),
        &[],
    )
    .unwrap();
    let tcp = plain(&m.inbound).await;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(mayfly_ca::tls::dial_name(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_post_with_a_body_leaves_a_kept_alive_connection_usable_in_both_directions() {
    let m = mesh().await;
    // Denied by web's egress policy: the outbound sidecar answers.
    let mut s = plain(&m.out).await;
    let egress = rounds(&mut s, "/private/orders").await;
    // Denied by orders (POST is not allowed there), the 403 relayed by web.
    let mut s = plain(&m.out).await;
    let relayed = rounds(&mut s, "/orders/1").await;
    // Straight to orders' inbound listener, HTTP/1.1 over mTLS.
    let mut s = tls(&m).await;
    let inbound = rounds(&mut s, "/orders/1").await;
    assert_eq!(
        (&egress, &relayed, &inbound),
        (&Ok(()), &Ok(()), &Ok(())),
        "egress denial, inbound denial through web, inbound denial over mTLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_post_with_a_body_too_large_to_read_is_answered_with_connection_close() {
    let m = mesh().await;
    too_large(&mut plain(&m.out).await, "/private/orders").await;
    too_large(&mut tls(&m).await, "/orders/1").await;
}
