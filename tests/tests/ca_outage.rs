//! The control plane goes away: sidecars keep serving on their current SVID, fail closed at
//! expiry, and recover when it returns (by renewal before expiry; with a new join token after).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use mayfly_tests::{Ca, Sidecar, Spec, echo_app, eventually, policy, round_trip};

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_ride_out_a_control_plane_outage_and_fail_closed_at_expiry() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let mut ca = Ca::start(&tmp);
    // Move the CA to a fixed port so it can come back at the same address.
    let port = free_port();
    ca.proc.as_mut().unwrap().stop();
    ca.run(&port);
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let app = echo_app("orders-app").await;
    let orders_tok = ca.token_file("spiffe://mayfly.local/orders", &dir.join("orders.token"));
    let mut orders = Sidecar::start(
        dir,
        "orders",
        &Spec {
            me: "orders",
            ca: &port,
            token: &orders_tok,
            policy: &pol,
            inbound_app: Some(&app),
            outbound: &[],
            svid_ttl: Some("6s"),
            extra: "",
        }
        .toml(),
    );
    let orders_in = orders.inbound();
    let web_tok = ca.token_file("spiffe://mayfly.local/web", &dir.join("web.token"));
    let mut web = Sidecar::start(
        dir,
        "web",
        &Spec {
            me: "web",
            ca: &port,
            token: &web_tok,
            policy: &pol,
            inbound_app: None,
            outbound: &[("orders", &orders_in, "orders")],
            svid_ttl: Some("6s"),
            extra: "",
        }
        .toml(),
    );
    let out = web.outbound("orders");
    orders.wait_ready().await;
    web.wait_ready().await;

    // 1. A short outage (shorter than the SVID's life): renewal resumes by itself.
    ca.proc.as_mut().unwrap().kill();
    round_trip(&out, b"during outage")
        .await
        .expect("traffic continues on the current SVID");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ca.run(&port);
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        round_trip(&out, b"x")
            .await
            .expect("no failure when the CA returns before expiry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 2. A long outage: the SVIDs expire, the sidecars fail closed and say so.
    ca.proc.as_mut().unwrap().kill();
    round_trip(&out, b"still fine").await.unwrap();
    let closed = eventually(Duration::from_secs(15), async || {
        web.admin_get("/readyz").await.0 == 503
    })
    .await;
    assert!(closed, "readiness goes false at expiry");
    assert!(
        round_trip(&out, b"after expiry").await.is_err(),
        "fail closed: no connection without a valid SVID"
    );
    assert!(web.admin_get("/readyz").await.1.contains("\"svid\":false"));

    // 3. The CA returns; an expired SVID cannot renew, so the operator hands out new tokens
    //    (the sidecars re-read their token files) and the mesh recovers by itself.
    ca.run(&port);
    ca.token_file("spiffe://mayfly.local/orders", &orders_tok);
    ca.token_file("spiffe://mayfly.local/web", &web_tok);
    orders.wait_ready().await;
    web.wait_ready().await;
    let back = eventually(Duration::from_secs(10), async || {
        round_trip(&out, b"back").await.is_ok()
    })
    .await;
    assert!(back, "traffic flows again");
}
