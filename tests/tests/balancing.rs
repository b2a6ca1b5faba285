//! An outbound by identity (`spiffe_id`, no `remote`) spreads its connections (TCP) and
//! requests (HTTP) over the live replicas registered under that ID, by power of two choices,
//! and moves to the survivors when one stops gracefully. With none registered, it refuses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mayfly_tests::replicas::{self, upstream};
use mayfly_tests::{Ca, Sidecar, echo_app, eventually, http_app, http_get, round_trip};
use serde_json::Value;
use tokio::io::AsyncReadExt;

/// A replica of `orders` (its own sidecar in front of its own app, named `name`).
async fn replica(ca: &Ca, dir: &Path, name: &'static str, http: bool) -> Sidecar {
    let app = if http {
        http_app(name).await
    } else {
        echo_app(name).await
    };
    replicas::replica(ca, dir, name, &app, http)
}

/// `web`'s sidecar with an outbound to `orders` by SPIFFE ID only.
fn web(ca: &Ca, dir: &Path, http: bool) -> Sidecar {
    replicas::client(ca, dir, if http { "protocol = \"http\"\n" } else { "" })
}

async fn endpoint_count(web: &Sidecar) -> usize {
    upstream(web).await["endpoints"]
        .as_array()
        .map_or(0, |a| a.len())
}

/// Waits until `web` knows exactly `n` endpoints for `orders`.
async fn knows(web: &Sidecar, n: usize) {
    let ok = eventually(Duration::from_secs(15), async || {
        endpoint_count(web).await == n
    });
    assert!(ok.await, "{}\n{}", upstream(web).await, web.proc.log());
}

/// Which replica answered one GET through `web`'s outbound (status 200 required).
async fn get_one(addr: &str) -> String {
    let (status, body) = http_get(addr, "/which").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["name"].as_str().unwrap().to_owned()
}

fn assert_spread(seen: &BTreeMap<String, usize>, total: usize) {
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (name, n) in seen {
        assert!(n * 4 >= total, "{name} got {n} of {total}: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_by_identity_spread_over_both_replicas_and_move_to_the_survivor() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let mut w = web(&ca, tmp.path(), true);
    // No replica yet: ready all the same, and every request is answered 503 with the reason.
    w.wait_ready().await;
    let out = w.outbound("orders");
    let (status, body) = http_get(&out, "/which").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no live endpoint"), "{body}");
    assert_eq!(
        w.metric(
            "mayfly_sidecar_request_failures_total{direction=\"outbound\",reason=\"no_endpoint\"}"
        )
        .await,
        1.0
    );
    let mut one = replica(&ca, tmp.path(), "orders-1", true).await;
    let two = replica(&ca, tmp.path(), "orders-2", true).await;
    one.wait_ready().await;
    two.wait_ready().await;
    knows(&w, 2).await;

    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        let batch = (0..4).map(|_| {
            let out = out.clone();
            async move { get_one(&out).await }
        });
        for name in futures_join(batch).await {
            *seen.entry(name).or_insert(0) += 1;
        }
    }
    assert_spread(&seen, 40);
    let shown = upstream(&w).await;
    for e in shown["endpoints"].as_array().unwrap() {
        assert_eq!(e["outstanding"], 0, "{shown}");
    }

    assert!(one.proc.stop().success());
    knows(&w, 1).await;
    for _ in 0..20 {
        assert_eq!(get_one(&out).await, "orders-2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_by_identity_spread_over_both_replicas_and_move_to_the_survivor() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let mut w = web(&ca, tmp.path(), false);
    w.wait_ready().await;
    let out = w.outbound("orders");
    // No replica yet: ready all the same, and the app's connection is closed.
    assert!(round_trip(&out, b"ping").await.is_err());
    let refused = eventually(Duration::from_secs(5), async || {
        w.metric("mayfly_sidecar_connection_failures_total{direction=\"outbound\",reason=\"no_endpoint\"}")
            .await
            == 1.0
    });
    assert!(refused.await, "{}", w.proc.log());
    let mut one = replica(&ca, tmp.path(), "orders-1", false).await;
    let two = replica(&ca, tmp.path(), "orders-2", false).await;
    one.wait_ready().await;
    two.wait_ready().await;
    knows(&w, 2).await;

    // 40 connections held open: each new one counts against the replica it went to.
    let mut held = Vec::new();
    let mut seen = BTreeMap::new();
    for _ in 0..40 {
        let mut s = tokio::net::TcpStream::connect(&out).await.unwrap();
        let name = read_banner(&mut s).await;
        *seen.entry(name).or_insert(0) += 1;
        held.push(s);
    }
    assert_spread(&seen, 40);
    let shown = upstream(&w).await;
    let outstanding: u64 = shown["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outstanding"].as_u64().unwrap())
        .sum();
    assert_eq!(outstanding, 40, "{shown}");
    drop(held);

    assert!(one.proc.stop().success());
    knows(&w, 1).await;
    for _ in 0..20 {
        assert_eq!(round_trip(&out, b"ping").await.unwrap(), "orders-2");
    }
}

/// The banner line an echo app sends first.
async fn read_banner(s: &mut tokio::net::TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "closed before the banner");
        if b[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(b[0]);
    }
}

/// Runs the futures concurrently, results in order.
async fn futures_join<F: std::future::Future<Output = String> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<String> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
