//! The HTTP/2 settings both builders announce, read off the wire, and the inbound's h2c
//! client towards the app (one shared connection, replaced when the app closes it, let go
//! when idle), against a real hyper h2c server on loopback.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::app_h2::H2App;
use super::{
    H2_CONN_WINDOW, H2_MAX_CONCURRENT_STREAMS, H2_MAX_FRAME, H2_PREFACE, H2_STREAM_WINDOW,
    MAX_HEADER_BYTES, full, h2_client, h2_server,
};

const SETTINGS: u8 = 0x4;
const WINDOW_UPDATE: u8 = 0x8;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
const INITIAL_WINDOW_SIZE: u16 = 0x4;
const MAX_FRAME_SIZE: u16 = 0x5;
const MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// One frame: (type, flags, stream, payload).
async fn frame(s: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.unwrap();
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    (head[3], head[4], stream, payload)
}

/// The peer's first SETTINGS frame and the connection-level WINDOW_UPDATE that follows it
/// (0 if none came within the next few frames).
async fn settings_and_window(s: &mut TcpStream) -> (HashMap<u16, u32>, u32) {
    let (kind, flags, _, payload) = frame(s).await;
    assert_eq!((kind, flags), (SETTINGS, 0), "the first frame is SETTINGS");
    let settings = payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    for _ in 0..4 {
        let Ok((kind, _, stream, p)) = tokio::time::timeout(Duration::from_secs(2), frame(s)).await
        else {
            break;
        };
        if kind == WINDOW_UPDATE && stream == 0 {
            return (settings, u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
        }
    }
    (settings, 0)
}

/// What both ends announce: mayfly's stream window, frame size and header-list limit, and a
/// connection window opened from the protocol's 65,535 bytes to mayfly's.
fn assert_windows_and_limits(settings: &HashMap<u16, u32>, window: u32) {
    assert_eq!(settings.get(&INITIAL_WINDOW_SIZE), Some(&H2_STREAM_WINDOW));
    assert_eq!(settings.get(&MAX_FRAME_SIZE), Some(&H2_MAX_FRAME));
    assert_eq!(
        settings.get(&MAX_HEADER_LIST_SIZE),
        Some(&(MAX_HEADER_BYTES as u32))
    );
    assert_eq!(window, H2_CONN_WINDOW - 65_535);
}

#[tokio::test]
async fn the_http2_server_announces_mayflys_windows_and_limits() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let _ = h2_server()
            .serve_connection(
                TokioIo::new(s),
                hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(full("ok")))
                }),
            )
            .await;
    });
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(H2_PREFACE).await.unwrap();
    c.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let (settings, window) = settings_and_window(&mut c).await;
    assert_eq!(
        settings.get(&MAX_CONCURRENT_STREAMS),
        Some(&H2_MAX_CONCURRENT_STREAMS)
    );
    assert_windows_and_limits(&settings, window);
}

#[tokio::test]
async fn the_http2_client_announces_the_same_windows_and_limits() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (_send, conn) = h2_client()
            .handshake::<_, super::Body>(TokioIo::new(tcp))
            .await
            .unwrap();
        let _ = conn.await;
    });
    let (mut s, _) = l.accept().await.unwrap();
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface[..], H2_PREFACE);
    let (settings, window) = settings_and_window(&mut s).await;
    assert_windows_and_limits(&settings, window);
    client.abort();
}

/// An h2c app that answers `ok` and counts the connections it accepted; each connection is
/// closed with GOAWAY after `close_after` requests (if given).
async fn h2c_app(close_after: Option<usize>) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let served = Arc::new(tokio::sync::Notify::new());
            let n = Arc::new(AtomicUsize::new(0));
            let (svc_served, svc_n) = (served.clone(), n.clone());
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let (served, n) = (svc_served.clone(), svc_n.clone());
                async move {
                    if Some(n.fetch_add(1, Ordering::SeqCst) + 1) == close_after {
                        served.notify_one();
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(async move {
                let conn = h2_server().serve_connection(TokioIo::new(s), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = served.notified() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
    });
    (addr, accepted)
}

async fn get(app: &Arc<H2App>, addr: SocketAddr) -> String {
    let req = Request::builder()
        .uri(format!("http://{addr}/"))
        .version(http::Version::HTTP_2)
        .body(super::empty())
        .unwrap();
    let resp = app.request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn concurrent_requests_to_an_http2_app_share_one_connection() {
    let (addr, accepted) = h2c_app(None).await;
    let app = H2App::new(addr, Duration::from_secs(5), Duration::from_secs(90));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { get(&app, addr).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "ok");
    }
    assert_eq!(get(&app, addr).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(app.dials(), 1);
}

#[tokio::test]
async fn a_request_after_the_app_closed_its_connection_goes_on_a_new_one() {
    let (addr, accepted) = h2c_app(Some(1)).await;
    let app = H2App::new(addr, Duration::from_secs(5), Duration::from_secs(90));
    for _ in 0..3 {
        assert_eq!(get(&app, addr).await, "ok");
        // The GOAWAY after each first request reaches the client before the next one.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    assert_eq!(app.dials(), 3);
}

#[tokio::test]
async fn an_idle_connection_to_the_app_is_let_go_and_the_next_request_dials_again() {
    let (addr, accepted) = h2c_app(None).await;
    let app = H2App::new(addr, Duration::from_secs(5), Duration::from_millis(200));
    assert_eq!(get(&app, addr).await, "ok");
    // Used within each idle period: kept.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(get(&app, addr).await, "ok");
    }
    assert_eq!(app.dials(), 1);
    // Unused for two idle periods: let go.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(&app, addr).await, "ok");
    assert_eq!(app.dials(), 2);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_app_that_is_not_listening_is_a_connect_error() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let app = H2App::new(addr, Duration::from_secs(5), Duration::from_secs(90));
    let req = Request::builder()
        .uri(format!("http://{addr}/"))
        .body(super::empty())
        .unwrap();
    let err = app.request(req).await.unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn requests_waiting_for_a_dial_that_times_out_share_its_failure() {
    // A listener whose accept queue is full and never drained: further connects hang.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(1).unwrap();
    let addr = l.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            held.push(c);
        }
    }
    let app = H2App::new(addr, Duration::from_millis(300), Duration::from_secs(90));
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let req = Request::builder()
                    .uri(format!("http://{addr}/"))
                    .body(super::empty())
                    .unwrap();
                app.request(req)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(err.contains("timed out"), "{err}");
    }
    // One dial for the five requests, not one after another.
    assert_eq!(app.attempts(), 1);
    assert_eq!(app.dials(), 0);
    drop((l, held));
}
