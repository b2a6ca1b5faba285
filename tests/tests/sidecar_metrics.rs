//! The sidecar's `/metrics` as a scraper and an operator see it: the format the client asks
//! for, accepted by `promtool check metrics`, lowercase label values, and one decision per
//! request even when the request then fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mayfly_tests::mesh::Pair;
use mayfly_tests::{curl, free_port};

const POLICY: &str = r#"version = 1
[[service]]
id = "spiffe://mayfly.local/orders"
protocol = "http"

[[rule]]
name = "web-reads-orders"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
"#;

/// web -> orders in HTTP mode, where orders' app is not listening: every request is allowed
/// by both sidecars, then fails at orders (502, `app_unreachable`).
async fn mesh_to_a_missing_app() -> Pair {
    Pair::http().policy(POLICY).app(&free_port()).start().await
}

/// `GET /metrics` with `accept` (if any): (content type, body).
async fn scrape(admin: &str, accept: Option<&str>) -> (String, String) {
    let url = format!("http://{admin}/metrics");
    let accept = accept.map(|a| format!("accept: {a}"));
    tokio::task::spawn_blocking(move || {
        let mut args = vec!["-w", "\n%{content_type}", url.as_str()];
        if let Some(h) = &accept {
            args.extend(["-H", h.as_str()]);
        }
        let (ok, out, err) = curl(&args);
        assert!(ok, "{err}");
        let (body, ctype) = out.rsplit_once('\n').unwrap();
        (ctype.to_owned(), body.to_owned())
    })
    .await
    .unwrap()
}

/// `promtool check metrics` on `body`: None when promtool is not installed (outside CI).
fn promtool(body: &str) -> Option<(bool, String)> {
    mayfly_tests::observe::promtool(&["check", "metrics"], body)
        .map(|(ok, text)| (ok && text.trim().is_empty(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_counts_one_decision_and_one_failure() {
    let Pair {
        ca: _ca,
        mut web,
        orders,
        ..
    } = mesh_to_a_missing_app().await;
    let url = format!("http://{}/orders", web.outbound("orders"));
    // POST: a GET answered 502 by the replica's sidecar would be retried (README, "Failures,
    // retries and timeouts"), and each retry is a decision of its own there.
    for _ in 0..8 {
        let u = url.clone();
        let (_, _, err) = tokio::task::spawn_blocking(move || {
            curl(&["-X", "POST", "-o", "/dev/null", "-w", "%{http_code}", &u])
        })
        .await
        .unwrap();
        assert!(err.is_empty(), "{err}");
    }
    let decisions = orders
        .metric("mayfly_sidecar_requests_total{direction=\"inbound\"")
        .await;
    let allowed = orders
        .metric("mayfly_sidecar_requests_total{direction=\"inbound\",decision=\"allow\"}")
        .await;
    let failed = orders
        .metric(
            "mayfly_sidecar_request_failures_total{direction=\"inbound\",reason=\"app_unreachable\"}",
        )
        .await;
    let (_, body) = scrape(&orders.admin, None).await;
    assert_eq!((decisions, allowed, failed), (8.0, 8.0, 8.0), "{body}");
    let web_decisions = web
        .metric("mayfly_sidecar_requests_total{direction=\"outbound\"")
        .await;
    assert_eq!(web_decisions, 8.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_agree_on_the_hybrid_post_quantum_key_exchange_and_say_so() {
    let Pair {
        ca: _ca,
        mut web,
        orders,
        ..
    } = mesh_to_a_missing_app().await;
    let url = format!("http://{}/orders", web.outbound("orders"));
    let (ok, _, err) = tokio::task::spawn_blocking(move || curl(&["-o", "/dev/null", &url]))
        .await
        .unwrap();
    assert!(ok, "{err}");
    let hybrid = orders
        .metric("mayfly_sidecar_handshakes_total{direction=\"inbound\",group=\"X25519MLKEM768\"}")
        .await;
    let (_, body) = scrape(&orders.admin, None).await;
    assert!(hybrid >= 1.0, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_span_names_the_key_exchange_group() {
    // TCP mode, orders' policy admits nobody: its denial is logged inside the connection's span.
    let Pair {
        ca: _ca,
        web: _web,
        orders,
        out,
        ..
    } = Pair::tcp()
        .policy(&mayfly_tests::policy(&[("nobody", "orders")]))
        .web_policy(&mayfly_tests::policy(&[("web", "orders")]))
        .start()
        .await;
    assert!(mayfly_tests::round_trip(&out, b"hi").await.is_err());
    let seen = mayfly_tests::eventually(std::time::Duration::from_secs(10), async || {
        orders.proc.log().contains("inbound connection denied")
    })
    .await;
    let log = orders.proc.log();
    assert!(seen, "{log}");
    let denied = log
        .lines()
        .find(|l| l.contains("inbound connection denied"))
        .unwrap();
    assert!(denied.contains("kx=X25519MLKEM768"), "{denied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_come_in_the_negotiated_format_and_pass_promtool() {
    let Pair {
        ca: _ca,
        mut web,
        orders,
        ..
    } = mesh_to_a_missing_app().await;
    let url = format!("http://{}/orders", web.outbound("orders"));
    let (ok, _, err) = tokio::task::spawn_blocking(move || curl(&["-o", "/dev/null", &url]))
        .await
        .unwrap();
    assert!(ok, "{err}");

    for s in [&web, &orders] {
        // No Accept header (curl, promtool, older agents): the Prometheus text format.
        let (ctype, text) = scrape(&s.admin, None).await;
        assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains("# TYPE mayfly_sidecar_audit_dropped_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP mayfly_sidecar_requests_total "),
            "{text}"
        );
        assert!(!text.contains("direction=\"Inbound\""), "{text}");
        assert!(!text.contains("direction=\"Outbound\""), "{text}");
        if let Some((ok, out)) = promtool(&text) {
            assert!(ok, "promtool check metrics:\n{out}\n--- input\n{text}");
        }
        // What Prometheus sends: OpenMetrics first.
        let (ctype, om) = scrape(
            &s.admin,
            Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
        )
        .await;
        assert_eq!(
            ctype,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(
            om.contains("# TYPE mayfly_sidecar_audit_dropped counter\n"),
            "{om}"
        );
    }
}
