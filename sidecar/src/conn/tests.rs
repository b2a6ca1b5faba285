//! The connection layer in-process: real TLS on 127.0.0.1, the real policy and audit spool.

use std::time::Duration;

use mayfly_ca::testing::{Leaf, TestCa};
use mayfly_ca::tls::Credentials;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::testing::{BATCH, Side, WEB, dial, echo_app, eventually, peer_of};
use crate::config::Protocol;
use crate::metrics::{ConnLabels, Direction};

fn decisions(side: &Side, decision: &str) -> u64 {
    side.metrics
        .connections
        .get_or_create(&ConnLabels {
            direction: Direction::Inbound,
            decision: decision.into(),
        })
        .get()
}

#[tokio::test]
async fn an_allowed_peer_reaches_the_app_and_its_connection_is_audited_with_the_decision() {
    let side = Side::new(16);
    let (addr, stop, task) = side.inbound(Protocol::Tcp, echo_app().await).await;
    let peer = side.peer(side.ca.credentials(WEB), &[]);
    let mut tls = dial(&peer, addr).await.unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    let open = side
        .record("connection.open")
        .await
        .expect("no open record");
    assert_eq!(open["peer_id"], WEB);
    assert_eq!(open["decision"], "allow");
    assert!(open["decision_id"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(decisions(&side, "allow"), 1);
    drop(tls);
    stop.send_replace(true);
    task.await.unwrap();
}

#[tokio::test]
async fn a_peer_the_policy_denies_is_closed_after_its_denial_is_recorded() {
    let side = Side::new(16);
    let (addr, _stop, _task) = side.inbound(Protocol::Tcp, echo_app().await).await;
    let peer = side.peer(side.ca.credentials(BATCH), &[]);
    let mut tls = dial(&peer, addr).await.unwrap();
    let _ = tls.write_all(b"ping").await;
    let mut buf = [0u8; 4];
    assert!(
        !matches!(tls.read(&mut buf).await, Ok(n) if n > 0),
        "a denied peer got bytes from the app"
    );
    let denied = side
        .record("connection.denied")
        .await
        .expect("no denial record");
    assert_eq!(denied["peer_id"], BATCH);
    assert_eq!(denied["decision"], "deny");
    assert!(
        side.records()
            .iter()
            .all(|r| r["kind"] != "connection.open")
    );
    assert_eq!(decisions(&side, "deny"), 1);
}

/// Dials with `creds` (trusting our CA) and expects the handshake to fail.
async fn refused(side: &Side, creds: std::sync::Arc<Credentials>) {
    let (addr, _stop, _task) = side.inbound(Protocol::Tcp, echo_app().await).await;
    let peer = peer_of(creds, side.ca.bundles(), &[]);
    // TLS 1.3: the client may finish before the server refuses its certificate; the refusal
    // then shows on the first read.
    if let Ok(mut tls) = dial(&peer, addr).await {
        let mut buf = [0u8; 1];
        let _ = tls.write_all(b"x").await;
        assert!(!matches!(tls.read(&mut buf).await, Ok(1)), "served");
    }
}

#[tokio::test]
async fn an_expired_peer_svid_is_refused_as_expired() {
    let side = Side::new(16);
    let now = OffsetDateTime::now_utc();
    let expired = Leaf {
        not_before: now - time::Duration::hours(2),
        not_after: now - time::Duration::hours(1),
        ..Leaf::new(WEB)
    };
    refused(&side, side.ca.credentials_for(&expired)).await;
    assert!(eventually(|| side.handshake_failures("expired") == 1).await);
    assert_eq!(side.handshake_failures("tls"), 0);
}

#[tokio::test]
async fn a_peer_of_a_trust_domain_without_a_bundle_is_refused_as_unknown_trust_domain() {
    let side = Side::new(16);
    // Its ID says "expired": the reason comes from the check that failed, not from the text.
    let other = TestCa::new("other.test");
    refused(&side, other.credentials("spiffe://other.test/expired-jobs")).await;
    assert!(eventually(|| side.handshake_failures("unknown_trust_domain") == 1).await);
    assert_eq!(side.handshake_failures("expired"), 0);
}

#[tokio::test]
async fn a_peer_without_a_client_certificate_is_refused_as_no_certificate() {
    let side = Side::new(16);
    refused(&side, Credentials::new()).await;
    assert!(eventually(|| side.handshake_failures("no_certificate") == 1).await);
}

#[tokio::test]
async fn a_connection_over_the_limit_is_refused_and_the_stop_signal_closes_the_listener() {
    let side = Side::new(1);
    let (addr, stop, task) = side.inbound(Protocol::Tcp, echo_app().await).await;
    let peer = side.peer(side.ca.credentials(WEB), &[]);
    let mut first = dial(&peer, addr).await.unwrap();
    first.write_all(b"1").await.unwrap();
    let mut buf = [0u8; 1];
    first.read_exact(&mut buf).await.unwrap();
    // The only slot is taken: the next connection is closed at once, unserved.
    let mut second = TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(10), second.read(&mut b)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
    assert_eq!(decisions(&side, "over_limit"), 1);
    stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the listener did not stop")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    // A connection admitted before the stop lives on (the drain is the caller's).
    first.write_all(b"2").await.unwrap();
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"2");
}
