//! Readiness tells the truth: `/readyz` is 503 with the reason whenever the sidecar would
//! refuse traffic, the traffic listeners stay closed until the SVID and the policy are in
//! force, and `check` / `run` refuse a policy file that does not exist.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mayfly_tests::mesh::{Orders, Pair, http_outbound};
use mayfly_tests::{Ca, Sidecar, Spec, bin, echo_app, eventually, http_get, policy, round_trip};

/// Waits for `/readyz` to answer `status` with a body containing every one of `words`.
async fn readyz_says(sc: &Sidecar, status: u16, words: &[&str]) -> bool {
    eventually(Duration::from_secs(20), async || {
        let (s, body) = sc.admin_get("/readyz").await;
        s == status && words.iter().all(|w| body.contains(w))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_is_answered_before_the_svid_and_the_policy_are_in_force() {
    // A control plane without a policy: sidecars following it get none.
    let Orders {
        tmp,
        mut ca,
        orders,
        inbound: orders_in,
        orders_policy: pol,
        ..
    } = Pair::http().fixed_port().start_orders().await;
    let (dir, port) = (tmp.path(), ca.addr.clone());
    orders.wait_ready().await;

    // web follows the control plane's policy and starts with a token that is refused.
    let web_tok = ca.token_file("spiffe://mayfly.local/other", &dir.join("web.token"));
    let web_app = echo_app("web-app").await;
    let config = Spec {
        me: "web",
        ca: &port,
        token: &web_tok,
        policy: &pol,
        inbound_app: Some(&web_app),
        outbound: &[("orders", &orders_in, "orders")],
        svid_ttl: None,
        extra: "",
    }
    .toml()
    .replace(&format!("[policy]\nfile = \"{}\"\n", pol.display()), "");
    let config = http_outbound(&config, "orders");
    assert!(!config.contains("[policy]"));
    let mut web = Sidecar::start(dir, "web", &config);
    let out = web.outbound("orders");
    let web_in = web.inbound();

    // Hammer web's outbound port (bounded) and keep every answer.
    let answers = Arc::new(Mutex::new(Vec::new()));
    let hammer = {
        let (answers, out) = (answers.clone(), out.clone());
        tokio::spawn(async move {
            for _ in 0..5000 {
                let (status, body) = http_get(&out, "/orders").await;
                let done = status == 200;
                answers.lock().unwrap().push((status, body));
                if done {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // 1. Neither SVID nor policy: both reasons, and both ports refuse connections.
    assert!(
        readyz_says(&web, 503, &["no SVID", "bootstrap failed", "no policy"]).await,
        "{}",
        web.proc.log()
    );
    for addr in [&out, &web_in] {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr}"
        );
    }

    // 2. An SVID (the token file is watched), still no policy.
    ca.token_file("spiffe://mayfly.local/web", &web_tok);
    assert!(
        readyz_says(&web, 503, &["\"svid\":true", "no policy"]).await,
        "{}",
        web.proc.log()
    );
    assert!(tokio::net::TcpStream::connect(&web_in).await.is_err());

    // 3. The control plane comes back with a policy: ready, and traffic flows.
    ca.proc.as_mut().unwrap().stop();
    ca.run_with(&port, &["--policy", pol.to_str().unwrap()]);
    assert!(readyz_says(&web, 200, &["\"reasons\":[]"]).await);
    tokio::time::timeout(Duration::from_secs(30), hammer)
        .await
        .expect("a request succeeds once ready")
        .unwrap();
    assert!(tokio::net::TcpStream::connect(&web_in).await.is_ok());
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let answered: Vec<_> = answers.iter().filter(|(s, _)| *s != 0).collect();
    assert!(
        answered.iter().all(|(s, _)| *s == 200),
        "answers before readiness (status, body): {:?}",
        answered
            .iter()
            .filter(|(s, _)| *s != 200)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert!(
        answers.len() > answered.len(),
        "the port was tried before it opened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_goes_false_with_the_reason_when_the_audit_spool_is_full_and_comes_back() {
    // Both sidecars get a small spool; web's is the one watched.
    let Pair {
        tmp: _tmp,
        mut ca,
        port,
        web,
        orders: _orders,
        out,
        ..
    } = Pair::tcp()
        .fixed_port()
        .extra("[audit]\nmax_spool_bytes = 4096\n")
        .start()
        .await;

    // Delivery stops: the small spool fills and web refuses traffic (fail-closed).
    ca.proc.as_mut().unwrap().kill();
    let mut refused = false;
    for _ in 0..200 {
        if round_trip(&out, b"x").await.is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "the spool filled up");
    assert!(
        readyz_says(
            &web,
            503,
            &[
                "audit spool full",
                "delivery to the control plane is failing"
            ]
        )
        .await,
        "{}",
        web.admin_get("/readyz").await.1
    );
    assert!(round_trip(&out, b"x").await.is_err(), "still refusing");

    // Delivery resumes: the spool drains, readiness and traffic come back.
    ca.run(&port);
    assert!(
        readyz_says(&web, 200, &["\"audit\":true"]).await,
        "{}",
        web.proc.log()
    );
    assert!(round_trip(&out, b"back").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_the_svid_expired_when_it_could_not_be_renewed() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let mut ca = Ca::start(&tmp);
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let app = echo_app("orders-app").await;
    let tok = ca.token_file("spiffe://mayfly.local/orders", &dir.join("orders.token"));
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
            svid_ttl: Some("4s"),
            extra: "",
        }
        .toml(),
    );
    orders.wait_ready().await;
    ca.proc.as_mut().unwrap().kill();
    assert!(
        readyz_says(&orders, 503, &["expired", "without renewal"]).await,
        "{}",
        orders.admin_get("/readyz").await.1
    );
}

#[test]
fn check_and_run_refuse_a_policy_file_that_does_not_exist_with_status_64() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("sidecar.toml");
    std::fs::write(
        &config,
        "spiffe_id = \"spiffe://mayfly.local/orders\"\n[control_plane]\naddress = \"127.0.0.1:1\"\ntoken_file = \"token\"\n[policy]\nfile = \"missing-policy.toml\"\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let out = std::process::Command::new(bin("mayfly-sidecar"))
            .args([cmd, "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {stderr}");
        assert!(
            stderr.contains("`policy.file`") && stderr.contains("missing-policy.toml"),
            "{cmd}: {stderr}"
        );
    }
    std::fs::write(tmp.path().join("missing-policy.toml"), "version = 1\nbad\n").unwrap();
    let out = std::process::Command::new(bin("mayfly-sidecar"))
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "an invalid policy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
