//! HTTP mode, a caller the policy allows nothing towards a peer: every request is a 403
//! (gRPC: PERMISSION_DENIED) with a decision ID, never a 502, and the connection-level denial
//! is in the audit trail with that decision ID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use mayfly_tests::mesh::Pair;
use mayfly_tests::{Sidecar, bin, curl, eventually, policy};

pub mod pb {
    #![allow(clippy::all, unreachable_pub, missing_docs)]
    tonic::include_proto!("mayfly.test");
}

// orders lets billing in, and web nothing at all.
const ORDERS_POLICY: &str = r#"version = 1
[[rule]]
name = "billing-reads-orders"
from = ["spiffe://mayfly.local/billing"]
to = ["spiffe://mayfly.local/orders"]
methods = ["GET"]
paths = ["/orders/**"]
"#;

/// web (egress: web -> orders allowed) -> orders (ingress: web allowed nothing), HTTP mode.
async fn mesh(app_protocol: &str) -> Pair {
    Pair::http()
        .policy(ORDERS_POLICY)
        .web_policy(&policy(&[("web", "orders")]))
        .app_protocol(app_protocol)
        .audit_spools()
        .start()
        .await
}

/// The `connection.denied` records in the control plane's trail, once `s` has shipped its
/// spool.
async fn connection_denials(ca_dir: &Path, s: &Sidecar) -> Vec<serde_json::Value> {
    records(ca_dir, s, "connection.denied", |r| !r.is_empty()).await
}

/// The records of `kind` in the control plane's trail, once `done` accepts them.
async fn records(
    ca_dir: &Path,
    s: &Sidecar,
    kind: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let mut found = Vec::new();
    let ok = eventually(Duration::from_secs(30), async || {
        let o = std::process::Command::new(bin("mayfly-ca"))
            .args(["audit", "query", "--json", "--kind", kind])
            .arg("--data-dir")
            .arg(ca_dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        found = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        done(&found)
    })
    .await;
    assert!(
        ok,
        "the {kind} records did not reach the control plane: {found:?}\n{}",
        s.admin_get("/metrics").await.1
    );
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_allowed_nothing_gets_403_with_a_decision_id_that_is_audited() {
    let m = mesh("http1").await;
    let url = format!("http://{}/orders/1", m.out);
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        curl(&["-s", "-i", "-X", "POST", "--data", "x=1", &url, &url])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let lower = out.to_ascii_lowercase();
    // Both requests (the second on the same connection) are denied, none is a 502.
    assert_eq!(lower.matches("http/1.1 403").count(), 2, "{out}");
    assert!(!out.contains("502"), "{out}");
    let id = lower
        .lines()
        .find_map(|l| l.strip_prefix("x-mayfly-decision-id: "))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no decision ID: {out}"));
    assert!(id.starts_with("d-"), "{id}");
    assert!(out.contains(&format!("decision {id}")), "{out}");
    // The app saw nothing: its answer would be JSON naming it.
    assert!(!out.contains("\"name\""), "{out}");
    let denials = connection_denials(&m.ca.dir, &m.orders).await;
    let d = denials
        .iter()
        .find(|r| r["decision_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no connection.denied record with {id}: {denials:?}"));
    assert_eq!(d["direction"], "inbound");
    assert_eq!(d["protocol"], "http");
    assert_eq!(d["peer_id"], "spiffe://mayfly.local/web");
    assert_eq!(d["decision"], "deny");
    // Each request is in the trail too, with the connection's decision ID and its 403.
    let mine = |r: &serde_json::Value| r["decision_id"] == id.as_str();
    let requests = records(&m.ca.dir, &m.orders, "http.request", |r| {
        r.iter().filter(|r| mine(r)).count() >= 2
    })
    .await;
    for r in requests.iter().filter(|r| mine(r)) {
        assert_eq!(
            (
                r["direction"].as_str(),
                r["method"].as_str(),
                r["status"].as_u64()
            ),
            (Some("inbound"), Some("POST"), Some(403)),
            "{r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_caller_allowed_nothing_gets_permission_denied_with_a_decision_id() {
    let m = mesh("http2").await;
    let mut client = pb::echo_client::EchoClient::connect(format!("http://{}", m.out))
        .await
        .unwrap();
    let s = client
        .unary(pb::Msg { text: "hi".into() })
        .await
        .expect_err("web is allowed nothing towards orders");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    let id = s
        .metadata()
        .get("x-mayfly-decision-id")
        .unwrap_or_else(|| panic!("no decision ID: {s:?}"))
        .to_str()
        .unwrap()
        .to_owned();
    assert!(s.message().contains(&format!("decision {id}")), "{s:?}");
    let denials = connection_denials(&m.ca.dir, &m.orders).await;
    assert!(
        denials.iter().any(|r| r["decision_id"] == id.as_str()),
        "no connection.denied record with {id}: {denials:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_connection_gives_way_once_the_policy_lets_the_caller_in() {
    let m = mesh("http1").await;
    let url = format!("http://{}/orders/1", m.out);
    let code = |url: String| async move {
        tokio::task::spawn_blocking(move || {
            curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", &url]).1
        })
        .await
        .unwrap()
    };
    assert_eq!(code(url.clone()).await, "403");
    std::fs::write(
        &m.orders_policy,
        ORDERS_POLICY.replace(
            "\"spiffe://mayfly.local/billing\"",
            "\"spiffe://mayfly.local/web\"",
        ),
    )
    .unwrap();
    // web's pooled HTTP/2 connection was denied as a whole: orders closes it on the change,
    // and the next request, on a new connection, is decided by the new policy.
    let ok = eventually(Duration::from_secs(20), async || {
        code(url.clone()).await == "200"
    })
    .await;
    assert!(
        ok,
        "still {} after the policy change",
        code(url.clone()).await
    );
    assert!(
        m.orders
            .metric("mayfly_sidecar_connections_ended_total{direction=\"inbound\",reason=\"policy_changed\"}")
            .await
            >= 1.0
    );
}
