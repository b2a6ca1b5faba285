#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};

use super::{Change, replay_records};
use mayfly_policy::Policy;

const WEB: &str = "spiffe://mayfly.local/web";
const ORDERS: &str = "spiffe://mayfly.local/orders";
const DB: &str = "spiffe://mayfly.local/db";

fn policy(src: &str) -> Policy {
    Policy::from_toml(src, "candidate.toml").unwrap().policy
}

fn http(id: &str, method: &str, path: &str, decision: &str, rule: &str) -> Value {
    json!({
        "kind": "http.request", "ts_ms": 1_700_000_000_000i64, "direction": "inbound",
        "local_id": ORDERS, "peer_id": WEB, "peer_addr": "127.0.0.1:4000", "protocol": "http",
        "method": method, "path": path, "decision": decision, "rule": rule,
        "decision_id": id, "port": 8080, "status": 200,
    })
}

fn tcp(id: &str, decision: &str, port: u16) -> Value {
    json!({
        "kind": if decision == "allow" { "connection.open" } else { "connection.denied" },
        "ts_ms": 1_700_000_000_000i64, "direction": "outbound", "local_id": ORDERS,
        "peer_id": DB, "protocol": "tcp", "decision": decision, "rule": "x",
        "decision_id": id, "port": port,
    })
}

const CANDIDATE: &str = r#"version = 1
[[rule]]
name = "web-reads-orders"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
methods = ["GET"]
paths = ["/orders/*"]

[[rule]]
name = "nobody-uses-this"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/db"]
"#;

#[test]
fn changed_requests_are_grouped_by_flow_with_a_count_and_the_first_decision_id() {
    let records = [
        http("d-1", "POST", "/orders/1", "allow", "web-writes"),
        http("d-2", "POST", "/orders/1", "allow", "web-writes"),
        http("d-3", "GET", "/orders/1", "allow", "web-reads-orders"),
        http("d-4", "GET", "/orders/2", "deny", "default"),
        http("d-5", "GET", "/orders/3", "deny", "default"),
        tcp("d-6", "allow", 5432),
    ];
    let r = replay_records(&records, &policy(CANDIDATE), None);
    assert_eq!((r.decisions, r.unchanged), (6, 1));
    let got: Vec<_> = r
        .changes
        .iter()
        .map(|c| {
            (
                c.change,
                c.flow.method.clone(),
                c.flow.target.clone(),
                c.count,
                c.example_decision_id.clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                Change::AllowToDeny,
                Some("POST".into()),
                "/orders/1".into(),
                2,
                "d-1".into()
            ),
            (
                Change::AllowToDeny,
                None,
                "port 5432".into(),
                1,
                "d-6".into()
            ),
            (
                Change::DenyToAllow,
                Some("GET".into()),
                "/orders/*".into(),
                2,
                "d-4".into()
            ),
        ]
    );
    assert_eq!(r.changes[0].flow.caller, WEB);
    assert_eq!(r.changes[1].flow.caller, ORDERS);
    assert!(r.changes_anything());
    assert_eq!(r.unused_allow_rules, ["nobody-uses-this"]);
}

#[test]
fn a_removed_rule_is_named_by_the_published_policys_path_pattern() {
    let old = policy(
        r#"version = 1
[[rule]]
name = "web-writes"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
methods = ["POST"]
paths = ["/orders/**"]
"#,
    );
    let mut a = http("d-1", "POST", "/orders/1", "allow", "web-writes");
    let mut b = http("d-2", "POST", "/orders/2/items", "allow", "web-writes");
    for r in [&mut a, &mut b] {
        r["policy_version"] = old.version().into();
    }
    let r = replay_records(&[a, b], &policy(CANDIDATE), Some(&old));
    assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
    assert_eq!(r.changes[0].flow.target, "/orders/**");
    assert_eq!(r.changes[0].count, 2);
}

#[test]
fn a_grant_allowed_decision_counts_as_unchanged_and_apart() {
    let mut rec = http("d-1", "DELETE", "/orders/1", "allow", "");
    let o = rec.as_object_mut().unwrap();
    o.remove("rule");
    o.insert("grant".into(), "g-1".into());
    let r = replay_records(&[rec], &policy(CANDIDATE), None);
    assert_eq!((r.decisions, r.unchanged, r.allowed_by_grant), (1, 1, 1));
    assert!(!r.changes_anything());
}

#[test]
fn records_without_a_decision_are_counted_unreadable_not_replayed() {
    let mut rec = http("d-1", "GET", "/orders/1", "allow", "web-reads-orders");
    rec.as_object_mut().unwrap().remove("decision");
    let r = replay_records(&[rec, json!("junk")], &policy(CANDIDATE), None);
    assert_eq!((r.decisions, r.unreadable), (0, 2));
    assert!(!r.changes_anything());
}

#[test]
fn the_same_decisions_change_nothing() {
    let records = [
        http("d-1", "GET", "/orders/1", "allow", "web-reads-orders"),
        http("d-2", "GET", "/elsewhere", "deny", "default"),
    ];
    let r = replay_records(&records, &policy(CANDIDATE), None);
    assert!(!r.changes_anything(), "{:?}", r.changes);
    assert_eq!(r.unchanged, 2);
}

#[test]
fn rules_the_candidate_drops_are_reported_with_what_they_matched() {
    let in_force = policy(&format!(
        "{CANDIDATE}\n[[rule]]\nname = \"web-writes\"\nfrom = [\"{WEB}\"]\nto = [\"{ORDERS}\"]\nmethods = [\"POST\"]\n"
    ));
    let records = [
        http("d-1", "GET", "/orders/1", "allow", "web-reads-orders"),
        http("d-2", "POST", "/orders/1", "allow", "web-writes"),
    ];
    // Dropping an unused rule changes nothing, and says it was unused.
    let unused_gone = policy(CANDIDATE.split("[[rule]]\nname = \"nobody").next().unwrap());
    let mut both_gone = replay_records(&records, &unused_gone, Some(&in_force));
    let got: Vec<_> = both_gone
        .removed_rules
        .iter()
        .map(|r| (r.name.as_str(), r.matched))
        .collect();
    assert_eq!(got, [("nobody-uses-this", 0), ("web-writes", 1)]);
    assert_eq!(both_gone.changes.len(), 1, "{:?}", both_gone.changes);
    both_gone = replay_records(&records[..1], &unused_gone, Some(&in_force));
    assert!(!both_gone.changes_anything());
}

#[test]
fn a_denied_http_connection_is_replayed_through_its_requests_only() {
    let mut conn = http("d-9", "GET", "/orders/1", "deny", "default");
    let o = conn.as_object_mut().unwrap();
    o.insert("kind".into(), "connection.denied".into());
    o.remove("method");
    o.remove("path");
    let request = http("d-9", "GET", "/orders/1", "deny", "default");
    let r = replay_records(&[conn, request], &policy(CANDIDATE), None);
    assert_eq!(r.decisions, 1);
    assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
    assert_eq!(
        (r.changes[0].change, r.changes[0].count),
        (Change::DenyToAllow, 1)
    );
}
