//! End-to-end, HTTP mode: curl through a real sidecar pair, per-request policy, identity
//! header, hostile input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mayfly_tests::mesh::{Pair, PairBuilder};
use mayfly_tests::{curl, eventually};

const ORDERS_POLICY: &str = r#"version = 1
[[service]]
id = "spiffe://mayfly.local/orders"
protocol = "http"

[[rule]]
name = "web-reads-orders"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
methods = ["GET", "HEAD"]
paths = ["/orders", "/orders/**"]
"#;

// web's egress policy is wider than orders' ingress: the inbound side still decides.
const WEB_POLICY: &str = r#"version = 1
[[rule]]
name = "web-calls-orders"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
"#;

/// web -> orders in HTTP mode, each sidecar with its policy above.
fn setup() -> PairBuilder {
    Pair::http().policy(ORDERS_POLICY).web_policy(WEB_POLICY)
}

async fn mesh() -> Pair {
    setup().start().await
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http1_and_http2_reach_the_app_with_the_callers_identity() {
    let m = mesh().await;
    let u = format!("{}/orders/42?x=1", m.url);
    let (ok, out, err) = tokio::task::spawn_blocking(move || curl(&[&u]))
        .await
        .unwrap();
    assert!(ok, "{err}");
    let v = json(&out);
    assert_eq!(v["path"], "/orders/42?x=1");
    let xfcc = v["xfcc"].as_array().unwrap();
    assert_eq!(xfcc.len(), 1);
    let x = xfcc[0].as_str().unwrap();
    assert!(
        x.starts_with("By=spiffe://mayfly.local/orders;Hash="),
        "{x}"
    );
    assert!(x.ends_with(";URI=spiffe://mayfly.local/web"), "{x}");
    let u = format!("{}/orders", m.url);
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || curl(&["--http2-prior-knowledge", &u]))
            .await
            .unwrap();
    assert!(ok, "{err}");
    assert_eq!(json(&out)["path"], "/orders");
    assert!(
        m.orders
            .metric("mayfly_sidecar_requests_total{direction=\"inbound\",decision=\"allow\"}")
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_identity_header_is_stripped() {
    let m = mesh().await;
    let u = format!("{}/orders", m.url);
    let (ok, out, _) = tokio::task::spawn_blocking(move || {
        curl(&[
            "-H",
            "x-forwarded-client-cert: By=x;URI=spiffe://mayfly.local/admin",
            &u,
        ])
    })
    .await
    .unwrap();
    assert!(ok);
    let v = json(&out);
    let xfcc = v["xfcc"].as_array().unwrap();
    assert_eq!(xfcc.len(), 1, "{v}");
    assert!(
        xfcc[0]
            .as_str()
            .unwrap()
            .ends_with("URI=spiffe://mayfly.local/web")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_and_path_rules_allow_and_deny_with_a_decision_id() {
    let m = mesh().await;
    let base = m.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut r = Vec::new();
        for (method, path) in [
            ("POST", "/orders"),
            ("GET", "/admin"),
            ("GET", "/orders/../admin"),
            ("GET", "/orders/%2e%2e/admin"),
            ("DELETE", "/orders/1"),
        ] {
            let u = format!("{base}{path}");
            r.push((
                method,
                path,
                curl(&[
                    "--path-as-is",
                    "-X",
                    method,
                    "-o",
                    "/dev/null",
                    "-D",
                    "-",
                    "-w",
                    "%{http_code}",
                    &u,
                ]),
            ));
        }
        r
    })
    .await
    .unwrap();
    for (method, path, (_, head, _)) in out {
        assert!(head.trim_end().ends_with("403"), "{method} {path}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("x-mayfly-decision-id: d-"),
            "{method} {path}: {head}"
        );
    }
    // An encoded slash is refused outright (an app might decode it into a guarded path).
    let u = format!("{}/orders%2F..%2Fadmin", m.url);
    let (_, code, _) = tokio::task::spawn_blocking(move || {
        curl(&["--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", &u])
    })
    .await
    .unwrap();
    assert_eq!(code, "400");
    let denied = m
        .orders
        .metric("mayfly_sidecar_requests_total{direction=\"inbound\",decision=\"deny\"}")
        .await;
    assert!(
        denied >= 5.0,
        "{denied}: {}",
        m.orders.admin_get("/metrics").await.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_denies_the_next_request_on_an_open_connection() {
    let m = mesh().await;
    // One keep-alive HTTP/1.1 connection from the app; one pooled HTTP/2 connection between
    // the sidecars. Same connections before and after the change.
    let u = format!("{}/orders", m.url);
    let (ok, out, _) = tokio::task::spawn_blocking({
        let u = u.clone();
        move || curl(&["-o", "/dev/null", "-w", "%{http_code}", &u])
    })
    .await
    .unwrap();
    assert!(ok);
    assert_eq!(out, "200");
    let before = m
        .web
        .metric("mayfly_sidecar_open_connections{direction=\"outbound\"}")
        .await;
    std::fs::write(
        &m.orders_policy,
        ORDERS_POLICY.replace("\"GET\", \"HEAD\"", "\"HEAD\""),
    )
    .unwrap();
    let denied = eventually(Duration::from_secs(5), async || {
        let u = u.clone();
        let (_, code, _) = tokio::task::spawn_blocking(move || {
            curl(&["-o", "/dev/null", "-w", "%{http_code}", &u])
        })
        .await
        .unwrap();
        code == "403"
    })
    .await;
    assert!(denied, "GET must be denied after the policy change");
    let after = m
        .web
        .metric("mayfly_sidecar_open_connections{direction=\"outbound\"}")
        .await;
    assert_eq!(
        before, after,
        "the same upstream connection carried the denied request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_is_refused_cleanly() {
    let m = mesh().await;
    let addr = m.url.trim_start_matches("http://").to_owned();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn send(addr: &str, raw: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(raw).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
    // Request smuggling: Content-Length and Transfer-Encoding together. The sidecar frames
    // by Transfer-Encoding alone (RFC 9112 §6.1), answers once and closes the connection,
    // so the bytes after the chunked body never become a second request.
    let r = send(&addr, b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 44\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /orders/smuggled HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{r}");
    assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
    // Conflicting Content-Length values.
    let r = send(
        &addr,
        b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nabcde",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // Too many headers.
    let mut many = String::from("GET /orders HTTP/1.1\r\nhost: x\r\n");
    for i in 0..200 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = send(&addr, many.as_bytes()).await;
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 4"), "{r}");
    // A huge header.
    let big = format!(
        "GET /orders HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let r = send(&addr, big.as_bytes()).await;
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 4"), "{r}");
    // Garbage and a malformed HTTP/2 preface.
    let _ = send(&addr, b"\x00\x01\x02garbage\r\n\r\n").await;
    let _ = send(
        &addr,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x09\x00\x00\x00\x00\x00garb",
    )
    .await;
    // Slowloris: headers never finish; the sidecar closes the connection by itself.
    let t0 = std::time::Instant::now();
    let r = send(&addr, b"GET /orders HTTP/1.1\r\nhost: x\r\n").await;
    assert!(
        t0.elapsed() < Duration::from_secs(14),
        "slow client must be cut by the header timeout"
    );
    assert!(!r.contains("200 OK"));
    // Still healthy.
    let u = format!("{}/orders", m.url);
    let (ok, _, err) = tokio::task::spawn_blocking(move || curl(&[&u]))
        .await
        .unwrap();
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_traffic_survives_rotations_and_connections_are_drained_at_expiry() {
    let m = setup().svid_ttl("4s").start().await;
    let base = m.url.clone();
    // ~16 s of requests on keep-alive connections while both sidecars rotate every ~2 s.
    let (ok, failed) = tokio::task::spawn_blocking(move || {
        let t0 = std::time::Instant::now();
        let (mut ok, mut failed) = (0u32, Vec::new());
        while t0.elapsed() < Duration::from_secs(16) {
            let u = format!("{base}/orders/1");
            // Four requests on one keep-alive connection.
            let (_, codes, err) = curl(&[
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}\\n",
                &u,
                &u,
                &u,
                &u,
            ]);
            for c in codes.lines() {
                if c == "200" {
                    ok += 1
                } else {
                    failed.push(format!("{c} {err}"))
                }
            }
        }
        (ok, failed)
    })
    .await
    .unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 40, "{ok}");
    assert!(
        m.web
            .metric("mayfly_sidecar_svid_rotations_total{result=\"ok\"}")
            .await
            >= 5.0
    );
    // Many requests shared few upstream connections: one per rotation, not one per request.
    let conns = m
        .orders
        .metric("mayfly_sidecar_connections_total{direction=\"inbound\",decision=\"allow\"}")
        .await;
    assert!(
        conns < f64::from(ok) / 4.0,
        "{conns} connections for {ok} requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_connection_is_drained_when_the_clients_svid_expires() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl is required in CI"
        );
        return;
    }
    let mut m = mesh().await;
    let inbound = m.orders.inbound();
    // A client holding a 3-second SVID of web keeps one HTTP/1.1 connection open.
    let out = m.tmp.path().join("short");
    let ca_dir = m.ca.dir.clone();
    let o = std::process::Command::new(mayfly_tests::bin("mayfly-ca"))
        .args([
            "svid",
            "mint",
            "--data-dir",
            ca_dir.to_str().unwrap(),
            "--spiffe-id",
            "spiffe://mayfly.local/web",
            "--ttl",
            "3s",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let mut child = tokio::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &inbound, "-cert"])
        .arg(out.join("svid.pem"))
        .arg("-cert_chain")
        .arg(out.join("svid.pem"))
        .arg("-key")
        .arg(out.join("svid.key"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"GET /orders HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let t0 = std::time::Instant::now();
    let mut seen = Vec::new();
    // The connection stays open (stdin is kept open) until the server drains it at expiry.
    let r = tokio::time::timeout(Duration::from_secs(20), stdout.read_to_end(&mut seen)).await;
    assert!(r.is_ok(), "the server never closed the connection");
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("200 OK"), "{text}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        t0.elapsed()
    );
    let drained = m.orders.metric("mayfly_sidecar_connections_ended_total{direction=\"inbound\",reason=\"peer_svid_expired\"}").await;
    assert!(drained >= 1.0);
    drop(stdin);
}
