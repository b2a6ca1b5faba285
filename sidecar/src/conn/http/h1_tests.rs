//! The inbound's HTTP/1.1 client towards the app (a stack of idle keep-alive connections),
//! against real HTTP/1.1 apps on loopback: reuse, concurrency, an app that closes idle
//! connections, idle timeout and the bound on idle connections.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use super::app_h1::H1App;

/// Connections an app accepted and saw end.
#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    closed: AtomicUsize,
}

impl Counts {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A hyper HTTP/1.1 app answering `METHOD URI HOST`; with `together`, each request waits until
/// that many are in the app at once (an HTTP/1.1 connection carries one at a time).
async fn h1_app(together: Option<usize>) -> (SocketAddr, Arc<Counts>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let barrier = together.map(|n| Arc::new(tokio::sync::Barrier::new(n)));
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let barrier = barrier.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let barrier = barrier.clone();
                async move {
                    if let Some(b) = barrier {
                        b.wait().await;
                    }
                    let host = req
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("none");
                    let body = format!("{} {} {host}", req.method(), req.uri());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                }
            });
            let c = c.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
                c.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

/// An app on threads of its own that answers one request per connection (keep-alive, no
/// `Connection: close`) and closes the connection `after` later, as an app whose keep-alive
/// timeout is short does; just before it does, it writes a byte to `signal` if given. Serves
/// at most 4 connections.
fn closing_app(
    after: Duration,
    signal: Option<std::os::unix::net::UnixStream>,
) -> (SocketAddr, Arc<Counts>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let signal = Arc::new(std::sync::Mutex::new(signal));
    std::thread::spawn(move || {
        for s in l.incoming().take(4) {
            let Ok(mut s) = s else { return };
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let signal = signal.clone();
            std::thread::spawn(move || {
                let (mut buf, mut got) = ([0u8; 4096], Vec::new());
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                std::thread::sleep(after);
                if let Some(sig) = signal.lock().unwrap().take().as_mut() {
                    let _ = sig.write_all(b"x");
                }
            });
        }
    });
    (addr, counts)
}

async fn send(app: &Arc<H1App>, req: Request<super::Body>) -> String {
    let resp = app.request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

async fn get(app: &Arc<H1App>, addr: SocketAddr) -> String {
    let req = Request::builder()
        .uri(format!("http://{addr}/"))
        .body(super::empty())
        .unwrap();
    send(app, req).await
}

/// `n` GETs at once, each answered by the app.
async fn concurrent_gets(app: &Arc<H1App>, addr: SocketAddr, n: usize) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { get(&app, addr).await })
        })
        .collect();
    for t in tasks {
        let answer = tokio::time::timeout(Duration::from_secs(10), t).await;
        assert_eq!(answer.unwrap().unwrap(), format!("GET / {addr}"));
    }
}

fn pool(addr: SocketAddr, idle: Duration, max_idle: usize) -> Arc<H1App> {
    H1App::new(addr, Duration::from_secs(5), idle, max_idle)
}

#[tokio::test]
async fn sequential_requests_to_an_http1_app_reuse_one_connection() {
    let (addr, counts) = h1_app(None).await;
    let app = pool(addr, Duration::from_secs(90), 8);
    for _ in 0..5 {
        assert_eq!(get(&app, addr).await, format!("GET / {addr}"));
    }
    assert_eq!(counts.accepted(), 1);
    assert_eq!(app.dials(), 1);
}

#[tokio::test]
async fn requests_go_in_origin_form_and_keep_their_host() {
    let (addr, _) = h1_app(None).await;
    let app = pool(addr, Duration::from_secs(90), 8);
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/orders/7?full=1"))
        .header("host", "orders.example")
        .body(super::full("x"))
        .unwrap();
    assert_eq!(
        send(&app, req).await,
        "POST /orders/7?full=1 orders.example"
    );
    // Without a Host, the app's address (as hyper-util's client set it).
    let req = Request::builder()
        .uri(format!("http://{addr}/a"))
        .body(super::empty())
        .unwrap();
    assert_eq!(send(&app, req).await, format!("GET /a {addr}"));
}

#[tokio::test]
async fn concurrent_requests_open_one_connection_each_and_reuse_them_afterwards() {
    let (addr, counts) = h1_app(Some(4)).await;
    let app = pool(addr, Duration::from_secs(90), 8);
    for _ in 0..2 {
        concurrent_gets(&app, addr, 4).await;
        // All four were in the app at once: four connections, and the second round took them
        // from the stack.
        assert_eq!(counts.accepted(), 4);
        assert_eq!(app.idle_count(), 4);
    }
    assert_eq!(app.dials(), 4);
}

#[tokio::test]
async fn idle_connections_beyond_the_limit_are_closed() {
    let (addr, counts) = h1_app(Some(4)).await;
    let app = pool(addr, Duration::from_secs(90), 2);
    concurrent_gets(&app, addr, 4).await;
    assert_eq!(app.idle_count(), 2);
    for _ in 0..50 {
        if counts.closed() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counts.closed(), 2);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let (addr, counts) = h1_app(None).await;
    let app = pool(addr, Duration::from_millis(200), 8);
    assert_eq!(get(&app, addr).await, format!("GET / {addr}"));
    // Used within each idle period: kept.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(get(&app, addr).await, format!("GET / {addr}"));
    }
    assert_eq!(counts.accepted(), 1);
    // Unused past it: closed, without a request to notice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counts.closed(), 1);
    assert_eq!(app.idle_count(), 0);
    assert_eq!(get(&app, addr).await, format!("GET / {addr}"));
    assert_eq!(counts.accepted(), 2);
}

#[tokio::test]
async fn a_connection_the_app_closed_while_idle_is_not_used_again() {
    let (addr, counts) = closing_app(Duration::from_millis(20), None);
    let app = pool(addr, Duration::from_secs(90), 8);
    assert_eq!(get(&app, addr).await, "ok");
    // The close reaches the pool's connection before the next request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&app, addr).await, "ok");
    assert_eq!(counts.accepted(), 2);
}

#[tokio::test]
async fn a_request_the_app_closed_its_idle_connection_under_is_sent_again_on_a_new_one() {
    let (sig_app, sig) = std::os::unix::net::UnixStream::pair().unwrap();
    sig.set_nonblocking(true).unwrap();
    let mut sig = tokio::net::UnixStream::from_std(sig).unwrap();
    let (addr, counts) = closing_app(Duration::from_millis(50), Some(sig_app));
    let app = pool(addr, Duration::from_secs(90), 8);
    assert_eq!(get(&app, addr).await, "ok");
    // The runtime's only thread is blocked while the app signals and then closes the idle
    // connection: both events come out of one poll of the I/O driver, the signal first, so
    // the request below is handed to the connection in the same turn as its close (the race
    // with an app's keep-alive timeout) and hyper hands it back unsent.
    tokio::spawn(async { std::thread::sleep(Duration::from_millis(300)) });
    sig.read_exact(&mut [0u8; 1]).await.unwrap();
    assert_eq!(app.idle_count(), 1);
    assert_eq!(get(&app, addr).await, "ok");
    assert_eq!(counts.accepted(), 2);
}

#[tokio::test]
async fn an_app_that_is_not_listening_is_a_connect_error() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let app = pool(addr, Duration::from_secs(90), 8);
    let req = Request::builder()
        .uri(format!("http://{addr}/"))
        .body(super::empty())
        .unwrap();
    let err = app.request(req).await.unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
    assert_eq!(app.dials(), 0);
}

/// An app that answers at once, before it has read the request body (read on by a task of
/// its own, its bytes counted in `received`).
async fn early_app() -> (SocketAddr, Arc<Counts>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (counts, received) = (Arc::new(Counts::default()), Arc::new(AtomicUsize::new(0)));
    let (c, r) = (counts.clone(), received.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = r.clone();
                async move {
                    tokio::spawn(async move {
                        if let Ok(b) = req.into_body().collect().await {
                            r.fetch_add(b.to_bytes().len(), Ordering::SeqCst);
                        }
                    });
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    (addr, counts, received)
}

#[tokio::test]
async fn a_connection_still_sending_its_request_body_is_reused_only_once_it_is_sent() {
    let (addr, counts, received) = early_app().await;
    let app = pool(addr, Duration::from_secs(90), 8);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, hyper::Error>>(4);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"first "))))
        .await
        .unwrap();
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/upload"))
        .body(body.boxed())
        .unwrap();
    // The whole response while the upload goes on: its connection is not free yet, so the
    // next request neither waits for it nor takes it (and cuts the upload short).
    assert_eq!(send(&app, req).await, "ok");
    assert_eq!(get(&app, addr).await, "ok");
    assert_eq!(counts.accepted(), 2);
    assert_eq!(app.idle_count(), 1);
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"last"))))
        .await
        .unwrap();
    drop(tx);
    // Sent: the upload's connection is back on the stack too.
    for _ in 0..50 {
        if app.idle_count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.idle_count(), 2);
    assert_eq!(received.load(Ordering::SeqCst), 10);
}
