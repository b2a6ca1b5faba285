//! End-to-end, HTTP mode, against spellings that permissive backends read differently from a
//! strict proxy: identity headers with `_`, path parameters / case / trailing dots in front of
//! deny rules, HTTP/2 connections that never send a request, HTTP/1.1 chunked trailers.
//! Both directions (outbound and inbound sidecar), HTTP/1.1 and HTTP/2 from the client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use mayfly_tests::mesh::Pair;
use mayfly_tests::{curl, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ORDERS_POLICY: &str = r#"version = 1
[[service]]
id = "spiffe://mayfly.local/orders"
protocol = "http"

[[rule]]
name = "callers-reach-orders"
from = ["spiffe://mayfly.local/web", "spiffe://mayfly.local/tester"]
to = ["spiffe://mayfly.local/orders"]
paths = ["/**"]

[[rule]]
name = "no-admin"
action = "deny"
from = ["spiffe://mayfly.local/*"]
to = ["spiffe://mayfly.local/orders"]
paths = ["/admin", "/admin/**"]
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

/// Short limits so that an idle HTTP/2 connection is closed well within a test.
const LIMITS: &str = "[limits]\nhandshake_timeout = \"3s\"\nidle_timeout = \"4s\"\n";

/// web -> orders in HTTP mode, and an SVID for a client of the test's own (`tester`).
async fn mesh(app: &str) -> Pair {
    Pair::http()
        .policy(ORDERS_POLICY)
        .web_policy(WEB_POLICY)
        .app(app)
        .extra(LIMITS)
        .tester()
        .start()
        .await
}

#[derive(Clone, Copy, Debug)]
enum Version {
    Http1,
    Http2,
}

/// GET `path` exactly as written, through web's outbound listener (plaintext): (status, body).
fn get_outbound(m: &Pair, v: Version, path: &str, headers: &[&str]) -> (u16, String) {
    let url = format!("http://{}{path}", m.out);
    let flag = match v {
        Version::Http1 => "--http1.1",
        Version::Http2 => "--http2-prior-knowledge",
    };
    run_curl(&[flag], &url, headers)
}

/// GET `path` exactly as written, straight to orders' inbound listener with the tester's
/// SVID (the server's name is not checked: this client only proves its own identity).
fn get_inbound(m: &Pair, v: Version, path: &str, headers: &[&str]) -> (u16, String) {
    let url = format!("https://{}{path}", m.inbound);
    let flag = match v {
        Version::Http1 => "--http1.1",
        Version::Http2 => "--http2",
    };
    let cert = m.tester.join("svid.pem");
    let key = m.tester.join("svid.key");
    run_curl(
        &[
            flag,
            "-k",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
        &url,
        headers,
    )
}

fn run_curl(flags: &[&str], url: &str, headers: &[&str]) -> (u16, String) {
    let mut args: Vec<&str> = flags.to_vec();
    args.extend(["--path-as-is", "-w", "\n%{http_code}"]);
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    let (ok, out, err) = curl(&args);
    assert!(ok, "curl {url}: {err}");
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

/// An HTTP/1.1 app that answers `{"path": ..., "trailers": {...}}`, with a response trailer
/// `x-app-sum: 42` (declared in `Trailer`). Returns its address.
async fn trailer_app() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let path = req.uri().path().to_owned();
                        let collected = req.into_body().collect().await.ok();
                        let trailers: serde_json::Map<String, serde_json::Value> = collected
                            .as_ref()
                            .and_then(|c| c.trailers())
                            .map(|t| {
                                t.iter()
                                    .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").into()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let json = serde_json::json!({ "path": path, "trailers": trailers });
                        let mut t = hyper::http::HeaderMap::new();
                        t.insert("x-app-sum", hyper::http::HeaderValue::from_static("42"));
                        let frames = vec![
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                Bytes::from(json.to_string()),
                            )),
                            Ok(hyper::body::Frame::trailers(t)),
                        ];
                        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
                        let resp = hyper::Response::builder()
                            .header("trailer", "x-app-sum")
                            .body(body)
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// The spellings of a denied `/{name}` that permissive backends route to it.
fn spellings(name: &str) -> Vec<String> {
    let cap = format!("{}{}", name[..1].to_uppercase(), &name[1..]);
    vec![
        format!("/{name};x"),
        format!("/{name};/"),
        format!("/{}", name.to_uppercase()),
        format!("/{cap}"),
        format!("/{name}."),
        format!("/{name}%20"),
    ]
}

const DOT_SEGMENTS: [&str; 2] = ["/public/..;/admin", "/public/%2e%2e;/admin"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_spellings_meet_deny_rules_in_both_directions_over_http1_and_http2() {
    let app = trailer_app().await;
    let m = mesh(&app).await;
    let m = Arc::new(m);
    let m2 = m.clone();
    let failures = tokio::task::spawn_blocking(move || {
        let m = m2;
        let mut failures = Vec::new();
        let mut check = |what: &str, got: (u16, String), want: u16| {
            if got.0 != want {
                failures.push(format!("{what}: want {want}, got {} {:?}", got.0, got.1));
            }
        };
        for v in [Version::Http1, Version::Http2] {
            // The control: an allowed path reaches the app through both sidecars, and directly.
            check(
                &format!("{v:?} out /public/x"),
                get_outbound(&m, v, "/public/x", &[]),
                200,
            );
            check(
                &format!("{v:?} in /public/x"),
                get_inbound(&m, v, "/public/x", &[]),
                200,
            );
            for p in DOT_SEGMENTS {
                check(&format!("{v:?} out {p}"), get_outbound(&m, v, p, &[]), 400);
                check(&format!("{v:?} in {p}"), get_inbound(&m, v, p, &[]), 400);
            }
            // Outbound: web's egress deny rule.
            for p in spellings("private") {
                check(&format!("{v:?} out {p}"), get_outbound(&m, v, &p, &[]), 403);
            }
            // Inbound: orders' deny rule, reached through the mesh and directly.
            for p in spellings("admin") {
                check(
                    &format!("{v:?} mesh {p}"),
                    get_outbound(&m, v, &p, &[]),
                    403,
                );
                check(&format!("{v:?} in {p}"), get_inbound(&m, v, &p, &[]), 403);
            }
        }
        failures
    })
    .await
    .unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A WSGI app (Python's `wsgiref`) that answers `{"xfcc": environ["HTTP_X_FORWARDED_CLIENT_CERT"]}`.
struct Wsgi {
    child: Child,
    addr: String,
}

impl Drop for Wsgi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const WSGI_APP: &str = r#"
import json, sys
from wsgiref.simple_server import make_server, WSGIRequestHandler

def app(environ, start_response):
    body = json.dumps({"xfcc": environ.get("HTTP_X_FORWARDED_CLIENT_CERT")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"#;

fn wsgi_app(dir: &Path) -> Wsgi {
    let script = dir.join("wsgi_app.py");
    std::fs::write(&script, WSGI_APP).unwrap();
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 is required for this test");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().expect("the WSGI app prints its port");
    Wsgi {
        child,
        addr: format!("127.0.0.1:{port}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_header_spelled_with_underscores_never_reaches_a_wsgi_app() {
    let scratch = tempfile::tempdir().unwrap();
    let wsgi = wsgi_app(scratch.path());
    let m = Arc::new(mesh(&wsgi.addr).await);
    let forged = "x_forwarded_client_cert: By=x;URI=spiffe://mayfly.local/admin";
    let m2 = m.clone();
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for v in [Version::Http1, Version::Http2] {
            seen.push((v, "web", get_outbound(&m2, v, "/orders", &[forged])));
            seen.push((v, "tester", get_inbound(&m2, v, "/orders", &[forged])));
        }
        seen
    })
    .await
    .unwrap();
    for (v, caller, (status, body)) in seen {
        assert_eq!(status, 200, "{v:?} {caller}: {body}");
        let xfcc = serde_json::from_str::<serde_json::Value>(&body).unwrap()["xfcc"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            !xfcc.contains("mayfly.local/admin"),
            "{v:?} {caller}: the forged identity reached the app: {xfcc}"
        );
        // Exactly the sidecar's own value: one element, naming the real caller.
        assert!(!xfcc.contains(','), "{v:?} {caller}: {xfcc}");
        assert!(
            xfcc.starts_with("By=spiffe://mayfly.local/orders;Hash=")
                && xfcc.ends_with(&format!(";URI=spiffe://mayfly.local/{caller}")),
            "{v:?} {caller}: {xfcc}"
        );
    }
    drop(wsgi);
}

/// A raw HTTP/2-over-TLS client (Python's `ssl`) with a client certificate: after the
/// handshake it sends nothing (`silent`) or the preface and an empty SETTINGS (`preface`), then
/// waits up to `within` seconds for the server to close. Prints `closed` or `open`, after
/// `settings` when the server's SETTINGS frame arrived (and on stderr, when it closed).
const RAW_H2_CLIENT: &str = r#"
import socket, ssl, sys, time
host, port, cert, key, mode, within = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection((host, int(port))))
assert s.selected_alpn_protocol() == "h2", s.selected_alpn_protocol()
if mode == "preface":
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
start = time.monotonic()
deadline = start + float(within)
got = b""
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        print("open", flush=True)
        break
    s.settimeout(left)
    try:
        data = s.recv(4096)
    except socket.timeout:
        continue
    except (ssl.SSLError, OSError):
        data = b""
    if not data:
        print("closed", flush=True)
        print("after", round(time.monotonic() - start, 1), "s", file=sys.stderr, flush=True)
        break
    if not got and len(data) >= 9 and data[3] == 4:
        print("settings", flush=True)
    got += data
"#;

/// Runs [`RAW_H2_CLIENT`] against orders' inbound with the tester's SVID.
fn raw_h2(m: &Pair, mode: &str, within: Duration) -> String {
    let (host, port) = m.inbound.rsplit_once(':').unwrap();
    let o = Command::new("python3")
        .args(["-c", RAW_H2_CLIENT, host, port])
        .arg(m.tester.join("svid.pem"))
        .arg(m.tester.join("svid.key"))
        .args([mode, &within.as_secs().to_string()])
        .output()
        .expect("python3 is required for this test");
    eprintln!(
        "raw h2 client ({mode}): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_sends_no_request_is_closed_like_an_idle_http1_one() {
    let app = trailer_app().await;
    let m = Arc::new(mesh(&app).await);
    // Limit 3 s (header-read) or 4 s (idle) plus a 1 s grace; the bug kept them 40 s and more.
    let within = Duration::from_secs(12);
    let idle = "mayfly_sidecar_connections_ended_total{direction=\"inbound\",reason=\"idle\"}";

    // mTLS with a valid client SVID, then silence; and mTLS, the preface and SETTINGS, then
    // silence.
    let m2 = m.clone();
    let silent = tokio::task::spawn_blocking(move || raw_h2(&m2, "silent", within));
    let m2 = m.clone();
    let preface_only = tokio::task::spawn_blocking(move || raw_h2(&m2, "preface", within));
    // The same over h2c from the app to the outbound sidecar.
    let out = m.out.clone();
    let h2c = async move {
        let mut s = tokio::net::TcpStream::connect(&out).await.unwrap();
        s.write_all(PREFACE_AND_SETTINGS).await.unwrap();
        let mut buf = [0u8; 1024];
        let read_all = async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(within, read_all).await.is_ok()
    };
    let h2c = h2c.await;
    // hyper sends its SETTINGS at once: both connections made it through TLS into HTTP/2.
    for (what, out) in [
        ("a silent connection", silent.await.unwrap()),
        ("a preface without a stream", preface_only.await.unwrap()),
    ] {
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            ["settings", "closed"],
            "{what}: {out}"
        );
    }
    assert!(h2c, "an h2c connection without a stream stayed open");
    // Closed by the idle limits, not refused: both ended as "idle".
    let ok = eventually(Duration::from_secs(5), async || {
        m.orders.metric(idle).await >= 2.0
    })
    .await;
    assert!(ok, "{}", m.orders.admin_get("/metrics").await.1);
    // Traffic still flows afterwards: the pooled sidecar-to-sidecar connection, closed as idle
    // too, is replaced.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let m2 = m.clone();
    let (status, body) = tokio::task::spawn_blocking(move || {
        get_outbound(&m2, Version::Http1, "/public/after-idle", &[])
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}\n{}", m.web.proc.log());
}

/// A request body of one chunk and a trailer `x-client-sum: 7`, declared in `Trailer`.
type Frames = std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>;

fn body_with_trailers() -> http_body_util::StreamBody<tokio_stream::Iter<Frames>> {
    let mut t = hyper::http::HeaderMap::new();
    t.insert("x-client-sum", hyper::http::HeaderValue::from_static("7"));
    http_body_util::StreamBody::new(tokio_stream::iter(vec![
        Ok(hyper::body::Frame::data(Bytes::from_static(b"hello"))),
        Ok(hyper::body::Frame::trailers(t)),
    ]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_chunked_trailers_cross_the_mesh_both_ways() {
    let app = trailer_app().await;
    let m = mesh(&app).await;
    let tcp = tokio::net::TcpStream::connect(&m.out).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/public/upload")
        .header("host", "orders")
        // RFC 9110 §10.1.4: a client that sends TE lists it in Connection.
        .header("te", "trailers")
        .header("connection", "te")
        .header("trailer", "x-client-sum")
        .body(body_with_trailers())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    let body: serde_json::Value = serde_json::from_slice(&collected.to_bytes()).unwrap();
    assert_eq!(
        body["trailers"]["x-client-sum"], "7",
        "request trailers lost: {body}"
    );
    assert_eq!(
        trailers
            .as_ref()
            .and_then(|t| t.get("x-app-sum"))
            .map(|v| v.to_str().unwrap()),
        Some("42"),
        "response trailers lost: {trailers:?}"
    );
    let _ = &m.web;
}
