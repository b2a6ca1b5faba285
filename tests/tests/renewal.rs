//! Renewal and recovery: a control plane that returns before expiry saves the SVID with no
//! failed request, and a sidecar without an SVID picks up a new join token at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mayfly_tests::mesh::Pair;
use mayfly_tests::{Ca, Sidecar, Spec, echo_app, eventually, http_get, policy, round_trip};

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_back_five_seconds_before_expiry_saves_the_svids_and_no_request_fails() {
    let Pair {
        tmp: _tmp,
        mut ca,
        port,
        web,
        orders,
        out,
        ..
    } = Pair::tcp().fixed_port().svid_ttl("30s").start().await;
    round_trip(&out, b"before").await.unwrap();
    let (orders_serial, orders_exp) = orders.svid().await.unwrap();
    let (web_serial, web_exp) = web.svid().await.unwrap();

    // The control plane goes away before either sidecar's first renewal (at 40-60 % of the
    // life) and comes back 5 s before the first SVID expires.
    ca.proc.as_mut().unwrap().kill();
    let expiry = orders_exp.min(web_exp) as f64;
    let end = orders_exp.max(web_exp) as f64 + 3.0;
    let (mut back, mut sent, mut failed) = (false, 0, Vec::new());
    for _ in 0..1000 {
        let now = unix_now();
        if now >= end {
            break;
        }
        if !back && now >= expiry - 5.0 {
            ca.run(&port);
            back = true;
        }
        sent += 1;
        if let Err(e) = round_trip(&out, b"ping").await {
            failed.push(format!("{:.1} s before expiry: {e}", expiry - now));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the control plane was brought back");
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed: {failed:?}\nweb:\n{}\norders:\n{}",
        failed.len(),
        web.proc.log(),
        orders.proc.log()
    );
    for (sc, serial, exp) in [
        (&orders, orders_serial, orders_exp),
        (&web, web_serial, web_exp),
    ] {
        let (now_serial, now_exp) = sc.svid().await.expect("an SVID is held");
        assert!(
            now_serial != serial && now_exp > exp,
            "renewed before expiry:\n{}",
            sc.proc.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_join_token_in_the_file_is_picked_up_within_seconds_after_many_failed_bootstraps() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let ca = Ca::start(&tmp);
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let app = echo_app("orders-app").await;
    // A token for another workload: refused (and not spent) on every attempt.
    let tok = ca.token_file(
        "spiffe://mayfly.local/someone-else",
        &dir.join("orders.token"),
    );
    let orders = Sidecar::start(
        dir,
        "orders",
        &Spec {
            me: "orders",
            ca: &ca.addr,
            token: &tok,
            policy: &pol,
            inbound_app: Some(&app),
            outbound: &[],
            svid_ttl: None,
            extra: "",
        }
        .toml(),
    );
    // Long enough for a doubling backoff to grow past 15 s (0.5 + 1 + 2 + 4 + 8 s).
    tokio::time::sleep(Duration::from_secs(17)).await;
    let (status, body) = orders.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("bootstrap failed"), "{body}");

    ca.token_file("spiffe://mayfly.local/orders", &tok);
    let ready = eventually(Duration::from_secs(5), async || {
        orders.admin_get("/readyz").await.0 == 200
    })
    .await;
    assert!(
        ready,
        "ready within 5 s of the new token:\n{}",
        orders.proc.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_reads_its_token_variable_again() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let ca = Ca::start(&tmp);
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let app = echo_app("orders-app").await;
    let spent = ca.token_file("spiffe://mayfly.local/nobody", &dir.join("wrong.token"));
    let good = ca.token_file("spiffe://mayfly.local/orders", &dir.join("good.token"));
    let config = Spec {
        me: "orders",
        ca: &ca.addr,
        token: &spent,
        policy: &pol,
        inbound_app: Some(&app),
        outbound: &[],
        svid_ttl: None,
        extra: "",
    }
    .toml()
    .replace(
        &format!("token_file = \"{}\"", spent.display()),
        "token_env = \"ORDERS_JOIN_TOKEN\"",
    );
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().trim().to_owned();
    let mut first = Sidecar::start_env(
        dir,
        "orders",
        &config,
        &[("ORDERS_JOIN_TOKEN", &read(&spent))],
    );
    let refused = eventually(Duration::from_secs(10), async || {
        let (s, b) = first.admin_get("/readyz").await;
        s == 503 && b.contains("bootstrap failed")
    })
    .await;
    assert!(refused, "{}", first.proc.log());
    first.proc.stop();
    let second = Sidecar::start_env(
        dir,
        "orders",
        &config,
        &[("ORDERS_JOIN_TOKEN", &read(&good))],
    );
    second.wait_ready().await;
    assert_eq!(http_get(&second.admin, "/svid").await.0, 200);
}
