//! Failures behind an outbound by identity: a replica killed with -9 under load costs no
//! request (its endpoint is ejected and requests retried elsewhere); retries stay within the
//! upstream's budget when every replica fails; a POST that was written is never retried while
//! a GET is; and a request that gets no answer within `request_timeout` is answered 504 and
//! audited.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mayfly_tests::replicas::{
    client, client_records, http_client, http_replica, knows, replica, replica_as, upstream,
};
use mayfly_tests::{Ca, echo_app, http_app, round_trip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One HTTP/1.1 request over plain TCP (`connection: close`): (status, body); status 0 when
/// no answer came within 20 s.
async fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut out)).await;
    let status = out.get(9..12).and_then(|x| x.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// An address where nothing listens (an app that is gone).
async fn gone_app() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().to_string()
}

/// An app that reads each request (head and body) and then, if `answer` is false, drops the
/// connection without a word, or holds it open forever if `hold`; counts requests by method.
async fn bad_app(hold: bool) -> (String, Arc<std::sync::Mutex<BTreeMap<String, usize>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let counts = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                let head_end = loop {
                    let Ok(n) = s.read(&mut b).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&b[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let Ok(n) = s.read(&mut b).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&b[..n]);
                }
                let method = head.split(' ').next().unwrap_or("").to_uppercase();
                *counts.lock().unwrap().entry(method).or_insert(0) += 1;
                if hold {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                drop(s);
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_costs_no_request_and_shows_ejected() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let mut web = http_client(&ca, tmp.path(), "");
    let mut one = http_replica(&ca, tmp.path(), "orders-1", &http_app("orders-1").await);
    let two = http_replica(&ca, tmp.path(), "orders-2", &http_app("orders-2").await);
    web.wait_ready().await;
    one.wait_ready().await;
    two.wait_ready().await;
    knows(&web, 2).await;
    let dead = one.inbound();
    let out = web.outbound("orders");
    let mut failed = Vec::new();
    for i in 0..200 {
        if i == 50 {
            // The replica's sidecar dies without a word: its endpoint stays registered until
            // its lease runs out, so the client finds out by failing to reach it.
            one.proc.kill();
        }
        let (status, body) = request(&out, "GET", "/which", "").await;
        if status != 200 {
            failed.push((i, status, body));
        }
    }
    assert!(failed.is_empty(), "{failed:?}\n{}", web.proc.log());
    // The dead endpoint is ejected (tried again only when its backoff ends, and ejected anew).
    let mut shown = serde_json::Value::Null;
    for _ in 0..50 {
        shown = upstream(&web).await;
        let e = shown["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == dead.as_str())
            .cloned();
        if let Some(e) = e
            && e["state"] == "ejected"
        {
            assert!(e["until"].as_str().unwrap().ends_with('Z'), "{e}");
            assert!(e["failures"].as_u64().unwrap() >= 1, "{e}");
            assert!(e["latency_ms"].as_f64().is_some(), "{e}");
            let ejections = web
                .metric(&format!(
                    "mayfly_sidecar_upstream_ejections_total{{upstream=\"orders\",endpoint=\"{dead}\"}}"
                ))
                .await;
            assert!(ejections >= 1.0, "{}", web.admin_get("/metrics").await.1);
            return;
        }
        assert_eq!(request(&out, "GET", "/which", "").await.0, 200);
    }
    panic!("the dead endpoint never showed as ejected: {shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_replica_fails_retries_stay_within_the_budget() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let web = http_client(&ca, tmp.path(), "");
    let gone = gone_app().await;
    let one = http_replica(&ca, tmp.path(), "orders-1", &gone);
    let two = http_replica(&ca, tmp.path(), "orders-2", &gone);
    web.wait_ready().await;
    one.wait_ready().await;
    two.wait_ready().await;
    knows(&web, 2).await;
    let mut web = web;
    let out = web.outbound("orders");
    const REQUESTS: usize = 200;
    for _ in 0..REQUESTS {
        let (status, body) = request(&out, "GET", "/x", "").await;
        assert_eq!(status, 502, "{body}");
    }
    // Every attempt reached a replica, whose sidecar found no app behind it.
    let unreachable =
        "mayfly_sidecar_request_failures_total{direction=\"inbound\",reason=\"app_unreachable\"}";
    let attempts = one.metric(unreachable).await + two.metric(unreachable).await;
    // The budget: 20 % of the requests, plus a floor of 10/s over its 10 s window; without
    // it, each request would have been tried three times.
    let bound = REQUESTS as f64 * 1.2 + 100.0;
    assert!(attempts > REQUESTS as f64, "no retry at all: {attempts}");
    assert!(
        attempts <= bound,
        "{attempts} attempts for {REQUESTS} requests"
    );
    let retries = web
        .metric("mayfly_sidecar_upstream_retries_total{upstream=\"orders\"}")
        .await;
    assert_eq!(retries + REQUESTS as f64, attempts);
    let refused = web
        .metric("mayfly_sidecar_upstream_retry_budget_exhausted_total{upstream=\"orders\"}")
        .await;
    assert!(refused > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_was_written_is_never_retried_but_a_get_is() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let web = http_client(&ca, tmp.path(), "");
    let (app, seen) = bad_app(false).await;
    let one = http_replica(&ca, tmp.path(), "orders-1", &app);
    let two = http_replica(&ca, tmp.path(), "orders-2", &app);
    web.wait_ready().await;
    one.wait_ready().await;
    two.wait_ready().await;
    knows(&web, 2).await;
    let mut web = web;
    let out = web.outbound("orders");
    let (status, _) = request(&out, "POST", "/orders", "{\"n\":1}").await;
    assert_eq!(status, 502);
    assert_eq!(seen.lock().unwrap().get("POST"), Some(&1), "{seen:?}");
    let (status, _) = request(&out, "GET", "/orders/1", "").await;
    assert_eq!(status, 502);
    let gets = *seen.lock().unwrap().get("GET").unwrap_or(&0);
    assert!(gets >= 2, "the GET was not retried: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_unanswered_within_its_timeout_gets_504_and_an_audit_record() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let web = http_client(&ca, tmp.path(), "request_timeout = \"1s\"\n");
    let (app, seen) = bad_app(true).await;
    let one = http_replica(&ca, tmp.path(), "orders-1", &app);
    web.wait_ready().await;
    one.wait_ready().await;
    knows(&web, 1).await;
    let mut web = web;
    let out = web.outbound("orders");
    let (status, body) = request(&out, "GET", "/slow", "").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("request_timeout"), "{body}");
    assert_eq!(seen.lock().unwrap().get("GET"), Some(&1));
    assert_eq!(
        web.metric(
            "mayfly_sidecar_request_failures_total{direction=\"outbound\",reason=\"timeout\"}"
        )
        .await,
        1.0
    );
    // The attempt cut short counts as an answer that took a second: a peak in the estimate.
    let shown = upstream(&web).await;
    let latency = shown["endpoints"][0]["latency_ms"].as_f64().unwrap();
    assert!(latency >= 900.0, "{shown}");
    let errors = web
        .metric("mayfly_sidecar_upstream_requests_total{upstream=\"orders\"")
        .await;
    assert_eq!(errors, 1.0, "{}", web.admin_get("/metrics").await.1);
    let found = mayfly_tests::eventually(Duration::from_secs(10), async || {
        client_records(tmp.path()).iter().any(|r| {
            r["kind"] == "http.request"
                && r["path"] == "/slow"
                && r["status"] == 504
                && r["error"] == "timeout"
        })
    });
    assert!(found.await, "{:?}", client_records(tmp.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_whose_replica_died_is_dialled_to_another() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let mut web = client(&ca, tmp.path(), "");
    let mut one = replica(
        &ca,
        tmp.path(),
        "orders-1",
        &echo_app("orders-1").await,
        false,
    );
    let two = replica(
        &ca,
        tmp.path(),
        "orders-2",
        &echo_app("orders-2").await,
        false,
    );
    web.wait_ready().await;
    one.wait_ready().await;
    two.wait_ready().await;
    knows(&web, 2).await;
    let out = web.outbound("orders");
    one.proc.kill();
    // Still registered until its lease ends: every connection reaches the survivor.
    for i in 0..30 {
        let got = round_trip(&out, b"ping").await;
        assert_eq!(
            got.as_deref(),
            Ok("orders-2"),
            "connection {i}\n{}",
            web.proc.log()
        );
    }
    let retries = web
        .metric("mayfly_sidecar_upstream_retries_total{upstream=\"orders\"}")
        .await;
    assert!(retries >= 1.0, "{}", web.admin_get("/metrics").await.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_remote_list_with_a_dns_name_balances_and_fails_over_like_discovered_endpoints() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let mut one = http_replica(&ca, tmp.path(), "orders-1", &http_app("orders-1").await);
    let mut two = http_replica(&ca, tmp.path(), "orders-2", &http_app("orders-2").await);
    one.wait_ready().await;
    two.wait_ready().await;
    let first = one.inbound();
    let port = two.inbound().rsplit_once(':').unwrap().1.to_owned();
    let mut web = http_client(
        &ca,
        tmp.path(),
        &format!("remote = [\"{first}\", \"localhost:{port}\"]\n"),
    );
    web.wait_ready().await;
    // `localhost` resolves to 127.0.0.1 (and perhaps ::1, where nothing listens: ejected).
    let resolved = format!("127.0.0.1:{port}");
    let ok = mayfly_tests::eventually(Duration::from_secs(10), async || {
        upstream(&web).await["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["address"] == resolved.as_str())
    });
    assert!(ok.await, "{}", upstream(&web).await);
    let out = web.outbound("orders");
    let mut seen = BTreeMap::new();
    for _ in 0..100 {
        let (status, body) = request(&out, "GET", "/which", "").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        *seen
            .entry(v["name"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    // Identical replicas: a fair share each (sequential requests, so by latency alone).
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (name, n) in &seen {
        assert!(*n >= 25, "{name} got {n} of 100: {seen:?}");
    }
    one.proc.kill();
    for i in 0..40 {
        let (status, body) = request(&out, "GET", "/which", "").await;
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(body.contains("orders-2"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_presenting_another_spiffe_id_is_never_used_and_is_logged_with_that_id() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let mut impostor = replica_as(
        &ca,
        tmp.path(),
        "billing",
        "impostor",
        &http_app("impostor").await,
        true,
    );
    let mut good = http_replica(&ca, tmp.path(), "orders-1", &http_app("orders-1").await);
    impostor.wait_ready().await;
    good.wait_ready().await;
    let bad = impostor.inbound();
    let mut web = http_client(
        &ca,
        tmp.path(),
        &format!("remote = [\"{bad}\", \"{}\"]\n", good.inbound()),
    );
    web.wait_ready().await;
    let out = web.outbound("orders");
    for i in 0..30 {
        let (status, body) = request(&out, "GET", "/which", "").await;
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(body.contains("orders-1"), "{body}");
    }
    let shown = upstream(&web).await;
    let e = shown["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == bad.as_str())
        .cloned()
        .unwrap();
    assert_eq!(e["state"], "ejected", "{shown}");
    let log = web.proc.log();
    assert!(
        log.contains("endpoint ejected") && log.contains("server is spiffe://mayfly.local/billing"),
        "{log}"
    );
}
