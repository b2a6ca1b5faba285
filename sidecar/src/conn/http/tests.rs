//! The inbound HTTP path in-process: a verified peer's requests decided one by one, allowed
//! ones forwarded to a real HTTP app with the caller's identity, denied ones answered 403 with
//! the decision ID that the audit record carries.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{DECISION_ID, XFCC};
use crate::config::Protocol;
use crate::conn::testing::{BATCH, Side, WEB, dial};

/// An HTTP app that answers every request with its path and the identity header it got.
async fn http_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let xfcc = req
                    .headers()
                    .get(XFCC)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                let body = format!("{} {xfcc}", req.uri().path());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    addr
}

/// An HTTP/1.1 connection over mTLS from `peer_id` to `side`'s inbound HTTP listener.
async fn client(side: &Side, peer_id: &str) -> SendRequest<Empty<Bytes>> {
    let (addr, _stop, _task) = side.inbound(Protocol::Http, http_app().await).await;
    let peer = side.peer(side.ca.credentials(peer_id), &[b"http/1.1"]);
    let tls = dial(&peer, addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn get(
    send: &mut SendRequest<Empty<Bytes>>,
    path: &str,
) -> (StatusCode, Option<String>, String) {
    send.ready().await.unwrap();
    let req = Request::get(path)
        .header(http::header::HOST, "orders")
        .body(Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let id = resp
        .headers()
        .get(DECISION_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, id, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn an_allowed_request_reaches_the_app_with_the_callers_identity() {
    let side = Side::new(16);
    let mut send = client(&side, WEB).await;
    let (status, id, body) = get(&mut send, "/orders/1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(id, None);
    assert!(body.starts_with("/orders/1 "), "{body}");
    assert!(
        body.contains(&format!("URI={WEB}")),
        "no identity header: {body}"
    );
    let rec = side
        .record("http.request")
        .await
        .expect("no request record");
    assert_eq!(rec["path"], "/orders/1");
    assert_eq!(rec["decision"], "allow");
}

#[tokio::test]
async fn a_denied_request_gets_403_with_the_decision_id_of_its_audit_record() {
    let side = Side::new(16);
    let mut send = client(&side, WEB).await;
    let (status, id, body) = get(&mut send, "/admin/users").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let id = id.expect("no decision ID on the 403");
    assert!(!body.contains("/admin/users "), "the app answered: {body}");
    let rec = side
        .record("http.request")
        .await
        .expect("no request record");
    assert_eq!(rec["decision_id"], id.as_str());
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["status"], 403);
    // The connection stays usable: the next, allowed request is forwarded.
    let (status, _, body) = get(&mut send, "/orders/2").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_peer_allowed_nothing_gets_403_on_every_request_and_one_connection_denial() {
    let side = Side::new(16);
    let mut send = client(&side, BATCH).await;
    for path in ["/orders/1", "/"] {
        let (status, id, body) = get(&mut send, path).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert!(id.is_some(), "{path}: no decision ID");
    }
    let denied = side
        .record("connection.denied")
        .await
        .expect("no denial record");
    assert_eq!(denied["peer_id"], BATCH);
    assert_eq!(denied["protocol"], "http");
}
