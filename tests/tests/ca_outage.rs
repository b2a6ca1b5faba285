//! The control plane goes away: sidecars keep serving on their current SVID, fail closed at
//! expiry, and recover when it returns (by renewal before expiry; with a new join token after).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mayfly_tests::mesh::Pair;
use mayfly_tests::{eventually, round_trip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_ride_out_a_control_plane_outage_and_fail_closed_at_expiry() {
    let Pair {
        tmp: _tmp,
        mut ca,
        port,
        web,
        orders,
        out,
        orders_token: orders_tok,
        web_token: web_tok,
        ..
    } = Pair::tcp().fixed_port().svid_ttl("6s").start().await;

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
