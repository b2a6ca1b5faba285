//! One sidecar, several inbound listeners (`[[inbound]]`): each app port is meshed on its own
//! mTLS port, in its own mode, and reached through its own upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use mayfly_tests::{Ca, Sidecar, Spec, curl, echo_app, http_app, policy, round_trip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_inbound_listener_reaches_its_own_app() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let dir = tmp.path();
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let tcp_app = echo_app("orders-tcp").await;
    let http = http_app("orders-http").await;
    let second =
        format!("[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{http}\"\nprotocol = \"http\"\n");
    let tok = ca.token_file("spiffe://mayfly.local/orders", &dir.join("o.token"));
    let mut orders = Sidecar::start(
        dir,
        "orders",
        &Spec {
            me: "orders",
            ca: &ca.addr,
            token: &tok,
            policy: &pol,
            inbound_app: Some(&tcp_app),
            outbound: &[],
            svid_ttl: None,
            extra: &second,
        }
        .toml()
        .replace("\n[inbound]\n", "\n[[inbound]]\n"),
    );
    let tcp_in = orders.inbound();
    let http_in = orders.proc.addr("mayfly-sidecar inbound[1]");
    assert_ne!(tcp_in, http_in);
    let tok = ca.token_file("spiffe://mayfly.local/web", &dir.join("w.token"));
    let mut web = Sidecar::start(
        dir,
        "web",
        &Spec {
            me: "web",
            ca: &ca.addr,
            token: &tok,
            policy: &pol,
            inbound_app: None,
            outbound: &[
                ("orders-tcp", &tcp_in, "orders"),
                ("orders-http", &http_in, "orders"),
            ],
            svid_ttl: None,
            extra: "",
        }
        .toml()
        .replace(
            "name = \"orders-http\"\n",
            "name = \"orders-http\"\nprotocol = \"http\"\n",
        ),
    );
    let tcp_out = web.outbound("orders-tcp");
    let http_out = web.outbound("orders-http");
    orders.wait_ready().await;
    web.wait_ready().await;
    assert_eq!(round_trip(&tcp_out, b"ping").await.unwrap(), "orders-tcp");
    let url = format!("http://{http_out}/orders/1");
    let (ok, out, err) = tokio::task::spawn_blocking(move || curl(&["-s", &url]))
        .await
        .unwrap();
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["name"], "orders-http");
    assert_eq!(v["path"], "/orders/1");
}
