//! The exact bytes of `http.request`, `http.response` and `connection.open` lines: a record's
//! hash is the SHA-256 of its line, so audit verification and older chains depend on every byte
//! (key order, escaping, numbers). These lines are what the writer produced when the record was
//! a `serde_json::Map` serialized through `mayfly_ca::audit::Record`; they must never change.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use mayfly_policy::{DecidedBy, Decision, DryRun};
use tokio::sync::mpsc;

use super::record::RequestRecord;
use crate::audit::FieldList;
use crate::audit::{Auditor, Durability, Event};
use crate::conn::{audit_base, audit_base_fields};
use crate::metrics::Direction;
use crate::policy::Verdict;

const SOURCE: &str = "spiffe://mesh.test/ns/shop/sa/api";
const EPOCH: &str = "5f0c2a9d1e7b4c38";
const PREV: &str = "9a3b1c0d2e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b";

/// The line of `ev` as the writer chains it (seq 41, fixed time), with `duration_ms` (the
/// only field read from a clock) set to 7.
fn line(ev: Event) -> String {
    let (kind, fields) = ev.settle();
    let bytes =
        crate::audit::record::line_of(SOURCE, EPOCH, 41, PREV, 1_767_225_600_123, kind, fields);
    let line = String::from_utf8(bytes).unwrap();
    match line.split_once("\"duration_ms\":") {
        Some((head, tail)) => {
            let rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
            format!("{head}\"duration_ms\":7{rest}")
        }
        None => line,
    }
}

fn decided(allow: bool, by: DecidedBy, dry_run: Option<DryRun>) -> Verdict {
    Verdict::Decided(Decision {
        allow,
        enforced: true,
        decided_by: by,
        dry_run,
        policy_version: Arc::from("sha256:1f2e3d4c"),
        decision_id: "d-0a1b2c3d-2a".into(),
    })
}

fn rule(name: &str) -> DecidedBy {
    DecidedBy::Rule(Arc::from(name))
}

fn inbound_base() -> FieldList {
    audit_base_fields(
        Direction::Inbound,
        "spiffe://mesh.test/ns/shop/sa/api",
        "spiffe://mesh.test/ns/shop/sa/web",
        Some("127.0.0.1:40112"),
        Some("3f9a"),
        "http",
    )
}

fn outbound_base() -> FieldList {
    audit_base_fields(
        Direction::Outbound,
        "spiffe://mesh.test/ns/shop/sa/web",
        "spiffe://mesh.test/ns/shop/sa/api",
        None,
        None,
        "http",
    )
}

fn traced() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    h
}

fn series() -> Arc<crate::metrics::PeerSeries> {
    crate::metrics::Metrics::new()
        .mesh
        .peer(Direction::Inbound, "spiffe://mesh.test/ns/shop/sa/web")
}

fn next(rx: &mut mpsc::Receiver<Event>) -> String {
    line(rx.try_recv().expect("a record was emitted"))
}

#[tokio::test]
async fn an_allowed_traced_inbound_request_writes_the_same_line_as_ever() {
    let (audit, mut rx) = Auditor::capture(Durability::Batched);
    let verdict = decided(true, rule("web-reads"), None);
    let mut r = RequestRecord::new(
        &audit,
        &inbound_base(),
        &Method::GET,
        "/items/7",
        &verdict,
        std::time::Instant::now(),
    );
    r.context(Some(8080), &traced(), &series());
    r.before_forwarding().await.unwrap();
    r.finish(StatusCode::OK);
    assert_eq!(
        next(&mut rx),
        r#"{"v":1,"source":"spiffe://mesh.test/ns/shop/sa/api","epoch":"5f0c2a9d1e7b4c38","seq":41,"prev":"9a3b1c0d2e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b","ts_ms":1767225600123,"kind":"http.request","decision":"allow","decision_id":"d-0a1b2c3d-2a","direction":"inbound","duration_ms":7,"enforced":true,"local_id":"spiffe://mesh.test/ns/shop/sa/api","method":"GET","path":"/items/7","peer_addr":"127.0.0.1:40112","peer_id":"spiffe://mesh.test/ns/shop/sa/web","peer_serial":"3f9a","policy_version":"sha256:1f2e3d4c","port":8080,"protocol":"http","rule":"web-reads","status":200,"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#
    );
    assert!(rx.try_recv().is_err(), "one record per request");
}

#[tokio::test]
async fn a_denied_outbound_request_without_trace_or_port_writes_the_same_line_as_ever() {
    let (audit, mut rx) = Auditor::capture(Durability::Batched);
    let verdict = decided(false, DecidedBy::Default, None);
    let mut r = RequestRecord::new(
        &audit,
        &outbound_base(),
        &Method::POST,
        "/orders",
        &verdict,
        std::time::Instant::now(),
    );
    r.context(None, &HeaderMap::new(), &series());
    r.finish_unforwarded(StatusCode::FORBIDDEN).await.unwrap();
    assert_eq!(
        next(&mut rx),
        r#"{"v":1,"source":"spiffe://mesh.test/ns/shop/sa/api","epoch":"5f0c2a9d1e7b4c38","seq":41,"prev":"9a3b1c0d2e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b","ts_ms":1767225600123,"kind":"http.request","decision":"deny","decision_id":"d-0a1b2c3d-2a","direction":"outbound","duration_ms":7,"enforced":true,"local_id":"spiffe://mesh.test/ns/shop/sa/web","method":"POST","path":"/orders","peer_id":"spiffe://mesh.test/ns/shop/sa/api","policy_version":"sha256:1f2e3d4c","protocol":"http","rule":"default","status":403}"#
    );
}

#[tokio::test]
async fn a_granted_request_with_an_upstream_error_and_escapes_writes_the_same_line_as_ever() {
    let (audit, mut rx) = Auditor::capture(Durability::Batched);
    let dry = DryRun {
        allow: false,
        rule: Arc::from("lockdown \"soon\""),
    };
    let verdict = decided(true, DecidedBy::Grant("g-77\u{e9}".into()), Some(dry));
    let mut b3 = HeaderMap::new();
    b3.insert(
        "b3",
        HeaderValue::from_static("80f198ee56343ba8-e457b5a2e4d86bd1-1"),
    );
    let mut r = RequestRecord::new(
        &audit,
        &outbound_base(),
        &Method::from_bytes(b"PURGE").unwrap(),
        "/a\"b\\c/\u{1}\u{e9}",
        &verdict,
        std::time::Instant::now(),
    );
    r.context(Some(443), &b3, &series());
    r.peer_addr("10.0.0.9:443");
    r.error("upstream_unreachable");
    r.finish(StatusCode::BAD_GATEWAY);
    assert_eq!(
        next(&mut rx),
        r#"{"v":1,"source":"spiffe://mesh.test/ns/shop/sa/api","epoch":"5f0c2a9d1e7b4c38","seq":41,"prev":"9a3b1c0d2e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b","ts_ms":1767225600123,"kind":"http.request","decision":"allow","decision_id":"d-0a1b2c3d-2a","direction":"outbound","dry_run":{"rule":"lockdown \"soon\"","would":"deny"},"duration_ms":7,"enforced":true,"error":"upstream_unreachable","grant":"g-77é","local_id":"spiffe://mesh.test/ns/shop/sa/web","method":"PURGE","path":"/a\"b\\c/\u0001é","peer_addr":"10.0.0.9:443","peer_id":"spiffe://mesh.test/ns/shop/sa/api","policy_version":"sha256:1f2e3d4c","port":443,"protocol":"http","status":502,"trace_id":"80f198ee56343ba8"}"#
    );
}

#[tokio::test]
async fn a_request_with_no_policy_writes_the_same_line_as_ever() {
    let (audit, mut rx) = Auditor::capture(Durability::Batched);
    let mut r = RequestRecord::new(
        &audit,
        &inbound_base(),
        &Method::DELETE,
        "/",
        &Verdict::NoPolicy,
        std::time::Instant::now(),
    );
    r.context(Some(80), &HeaderMap::new(), &series());
    r.finish_unforwarded(StatusCode::FORBIDDEN).await.unwrap();
    assert_eq!(
        next(&mut rx),
        r#"{"v":1,"source":"spiffe://mesh.test/ns/shop/sa/api","epoch":"5f0c2a9d1e7b4c38","seq":41,"prev":"9a3b1c0d2e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b","ts_ms":1767225600123,"kind":"http.request","decision":"deny","direction":"inbound","duration_ms":7,"enforced":true,"local_id":"spiffe://mesh.test/ns/shop/sa/api","method":"DELETE","path":"/","peer_addr":"127.0.0.1:40112","peer_id":"spiffe://mesh.test/ns/shop/sa/web","peer_serial":"3f9a","port":80,"protocol":"http","rule":"no-policy","status":403}"#
    );
}

#[tokio::test]
async fn a_strict_request_writes_the_same_request_and_response_lines_as_ever() {
    let (audit, mut rx) = Auditor::capture(Durability::Strict);
    let verdict = decided(true, rule("web-reads"), None);
    let mut r = RequestRecord::new(
        &audit,
        &inbound_base(),
        &Method::GET,
        "/items/7",
        &verdict,
        std::time::Instant::now(),
    );
    r.context(Some(8080), &traced(), &series());
    let (durable, request) = tokio::join!(r.before_forwarding(), async {
        line(rx.recv().await.expect("the decision is recorded"))
    });
    durable.unwrap();
    r.error("timeout");
    r.finish(StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        request,
        r#"{"v":1,"source":"spiffe://mesh.test/ns/shop/sa/api","epoch":"5f0c2a9d1e7b4c38","seq":41,"prev":"9a3b1c0d2e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b","ts_ms":1767225600123,"kind":"http.request","decision":"allow","decision_id":"d-0a1b2c3d-2a","direction":"inbound","enforced":true,"local_id":"spiffe://mesh.test/ns/shop/sa/api","method":"GET","path":"/items/7","peer_addr":"127.0.0.1:40112","peer_id":"spiffe://mesh.test/ns/shop/sa/web","peer_serial":"3f9a","policy_version":"sha256:1f2e3d4c","port":8080,"protocol":"http","rule":"web-reads","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#
    );
    assert_eq!(
        next(&mut rx),
        r#"{"v":1,"source":"spiffe://mesh.test/ns/shop/sa/api","epoch":"5f0c2a9d1e7b4c38","seq":41,"prev":"9a3b1c0d2e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b","ts_ms":1767225600123,"kind":"http.response","decision_id":"d-0a1b2c3d-2a","direction":"inbound","duration_ms":7,"error":"timeout","local_id":"spiffe://mesh.test/ns/shop/sa/api","method":"GET","path":"/items/7","peer_id":"spiffe://mesh.test/ns/shop/sa/web","protocol":"http","status":504,"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#
    );
}

#[tokio::test]
async fn a_strict_denial_writes_the_same_line_as_ever() {
    let (audit, mut rx) = Auditor::capture(Durability::Strict);
    let verdict = decided(false, rule("no-writes"), None);
    let mut r = RequestRecord::new(
        &audit,
        &outbound_base(),
        &Method::PUT,
        "/items/7",
        &verdict,
        std::time::Instant::now(),
    );
    r.context(Some(8080), &traced(), &series());
    let (durable, denial) = tokio::join!(r.finish_unforwarded(StatusCode::FORBIDDEN), async {
        line(rx.recv().await.expect("the denial is recorded"))
    });
    durable.unwrap();
    assert_eq!(
        denial,
        r#"{"v":1,"source":"spiffe://mesh.test/ns/shop/sa/api","epoch":"5f0c2a9d1e7b4c38","seq":41,"prev":"9a3b1c0d2e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b","ts_ms":1767225600123,"kind":"http.request","decision":"deny","decision_id":"d-0a1b2c3d-2a","direction":"outbound","duration_ms":7,"enforced":true,"local_id":"spiffe://mesh.test/ns/shop/sa/web","method":"PUT","path":"/items/7","peer_id":"spiffe://mesh.test/ns/shop/sa/api","policy_version":"sha256:1f2e3d4c","port":8080,"protocol":"http","rule":"no-writes","status":403,"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#
    );
}

#[test]
fn a_connection_open_record_writes_the_same_line_as_ever() {
    let mut fields = audit_base(
        Direction::Inbound,
        "spiffe://mesh.test/ns/shop/sa/api",
        "spiffe://mesh.test/ns/shop/sa/web",
        Some("127.0.0.1:40112".into()),
        Some("3f9a"),
        "tcp",
    );
    decided(true, rule("web-reads"), None).audit_into(&mut fields);
    fields.insert("port".into(), 5432.into());
    let bytes = crate::audit::record::line_of(
        SOURCE,
        EPOCH,
        41,
        PREV,
        1_767_225_600_123,
        "connection.open",
        fields,
    );
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        r#"{"v":1,"source":"spiffe://mesh.test/ns/shop/sa/api","epoch":"5f0c2a9d1e7b4c38","seq":41,"prev":"9a3b1c0d2e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b","ts_ms":1767225600123,"kind":"connection.open","decision":"allow","decision_id":"d-0a1b2c3d-2a","direction":"inbound","enforced":true,"local_id":"spiffe://mesh.test/ns/shop/sa/api","peer_addr":"127.0.0.1:40112","peer_id":"spiffe://mesh.test/ns/shop/sa/web","peer_serial":"3f9a","policy_version":"sha256:1f2e3d4c","port":5432,"protocol":"tcp","rule":"web-reads"}"#
    );
}

#[tokio::test]
async fn a_strict_response_repeats_only_the_requests_fields_even_if_the_address_comes_later() {
    let (audit, mut rx) = Auditor::capture(Durability::Strict);
    let verdict = decided(true, rule("web-reads"), None);
    let mut r = RequestRecord::new(
        &audit,
        &outbound_base(),
        &Method::GET,
        "/items/7",
        &verdict,
        std::time::Instant::now(),
    );
    r.context(Some(8080), &HeaderMap::new(), &series());
    let (durable, _) = tokio::join!(r.before_forwarding(), async {
        rx.recv().await.expect("the decision is recorded").settle()
    });
    durable.unwrap();
    r.peer_addr("10.0.0.9:8080");
    r.finish(StatusCode::OK);
    assert_eq!(
        next(&mut rx),
        r#"{"v":1,"source":"spiffe://mesh.test/ns/shop/sa/api","epoch":"5f0c2a9d1e7b4c38","seq":41,"prev":"9a3b1c0d2e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b","ts_ms":1767225600123,"kind":"http.response","decision_id":"d-0a1b2c3d-2a","direction":"outbound","duration_ms":7,"local_id":"spiffe://mesh.test/ns/shop/sa/web","method":"GET","path":"/items/7","peer_id":"spiffe://mesh.test/ns/shop/sa/api","protocol":"http","status":200}"#
    );
}
