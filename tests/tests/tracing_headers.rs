//! Tracing headers through a real pair of sidecars: W3C `traceparent` / `tracestate` and B3
//! (`b3`, `x-b3-*`) reach the app exactly as the client sent them, over HTTP/1.1 and HTTP/2;
//! the audit records of both sidecars carry the request's trace ID, joining decision and trace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mayfly_tests::mesh::Pair;
use mayfly_tests::{bin, curl, eventually};
use tokio::net::TcpListener;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Header name, value: as a tracing client sends them.
const SENT: [(&str, &str); 8] = [
    (
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
    ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
    (
        "b3",
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
    ),
    ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
    ("x-b3-spanid", "e457b5a2e4d86bd1"),
    ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
    ("x-b3-sampled", "1"),
    ("x-b3-flags", "0"),
];

/// An app on 127.0.0.1:0 (HTTP/1.1, or HTTP/2 with `h2`) answering with the tracing headers
/// it received, one `name: value` line each, in the order received.
async fn header_app(h2: bool) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let mut seen = String::new();
                        for (k, v) in req.headers() {
                            let k = k.as_str();
                            if k.starts_with("x-b3-")
                                || ["traceparent", "tracestate", "b3"].contains(&k)
                            {
                                seen.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                            }
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(seen)),
                        ))
                    },
                );
                let io = hyper_util::rt::TokioIo::new(s);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, svc)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    addr
}

/// web -> orders in HTTP mode, orders' app speaking HTTP/2 when `h2` (else HTTP/1.1).
async fn pair(h2: bool) -> Pair {
    Pair::http()
        .app(&header_app(h2).await)
        .app_protocol(if h2 { "http2" } else { "http1" })
        .audit_spools()
        .start()
        .await
}

/// Sends the tracing headers through the pair (HTTP/2 with prior knowledge when `h2`).
async fn send(out: &str, h2: bool) -> String {
    let url = format!("http://{out}/orders/1");
    tokio::task::spawn_blocking(move || {
        let headers: Vec<String> = SENT.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let mut args: Vec<&str> = Vec::new();
        if h2 {
            args.push("--http2-prior-knowledge");
        }
        for h in &headers {
            args.extend(["-H", h.as_str()]);
        }
        args.push(&url);
        let (ok, body, err) = curl(&args);
        assert!(ok, "{err}");
        body
    })
    .await
    .unwrap()
}

async fn passes_untouched_and_joins_the_audit_trail(h2: bool) {
    let Pair {
        ca,
        web: _web,
        orders: _orders,
        out,
        ..
    } = pair(h2).await;
    let seen = send(&out, h2).await;
    // Every header once, value byte for byte (the order of different field names carries no
    // meaning in HTTP, and a proxy removing hop-by-hop fields may change it).
    let mut seen: Vec<&str> = seen.lines().collect();
    seen.sort_unstable();
    let mut expected: Vec<String> = SENT.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    expected.sort_unstable();
    assert_eq!(seen, expected);
    // Both sidecars' records of the request carry its trace ID.
    let mut records: Vec<serde_json::Value> = Vec::new();
    let both = eventually(Duration::from_secs(30), async || {
        let o = std::process::Command::new(bin("mayfly-ca"))
            .args([
                "audit",
                "query",
                "--json",
                "--kind",
                "http.request",
                "--data-dir",
            ])
            .arg(&ca.dir)
            .output()
            .unwrap();
        records = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        records.len() >= 2
    })
    .await;
    assert!(both, "{records:?}");
    for r in &records {
        assert_eq!(r["trace_id"], TRACE_ID, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_headers_pass_both_sidecars_untouched_over_http1_and_the_audit_records_carry_the_trace_id()
 {
    passes_untouched_and_joins_the_audit_trail(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_headers_pass_both_sidecars_untouched_over_http2_and_the_audit_records_carry_the_trace_id()
 {
    passes_untouched_and_joins_the_audit_trail(true).await;
}
