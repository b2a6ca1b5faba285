#![allow(clippy::unwrap_used)]

use time::OffsetDateTime;

use super::graph::{self, Window};
use super::pages;
use super::records::Decision;
use super::{ConsoleError, ConsoleOptions, allowed};
use crate::server::distribution::GrantRecord;
use crate::server::store::GrantState;
use crate::svid::SvidInfo;

fn opts(listen: &str, tls: bool, allow: &[&str]) -> ConsoleOptions {
    ConsoleOptions {
        listen: listen.parse().unwrap(),
        tls,
        allow: allow.iter().map(|s| s.to_string()).collect(),
        must_bind: true,
    }
}

fn peer(id: &str, valid_for: i64) -> SvidInfo {
    let now = OffsetDateTime::now_utc();
    SvidInfo {
        id: crate::identity::id::parse_id(id).unwrap(),
        serial: "01".into(),
        not_before: now - time::Duration::minutes(1),
        not_after: now + time::Duration::seconds(valid_for),
    }
}

#[test]
fn a_console_off_loopback_without_tls_is_refused() {
    let e = opts("0.0.0.0:8445", false, &[]).check().unwrap_err();
    assert!(matches!(e, ConsoleError::NotLoopback(_)), "{e}");
    assert!(opts("127.0.0.1:8445", false, &[]).check().is_ok());
    assert!(opts("[::1]:8445", false, &[]).check().is_ok());
}

#[test]
fn a_tls_console_needs_an_allow_list_of_valid_spiffe_ids() {
    let none = opts("0.0.0.0:8445", true, &[]).check().unwrap_err();
    assert!(matches!(none, ConsoleError::NoneAllowed), "{none}");
    let bad = opts("0.0.0.0:8445", true, &["alice"]).check().unwrap_err();
    assert!(matches!(bad, ConsoleError::BadId(..)), "{bad}");
    assert!(
        opts("0.0.0.0:8445", true, &["spiffe://mayfly.local/user/alice"])
            .check()
            .is_ok()
    );
}

#[test]
fn over_tls_only_a_current_svid_on_the_allow_list_gets_in() {
    let o = opts("0.0.0.0:8445", true, &["spiffe://mayfly.local/user/alice"]);
    assert!(!allowed(&o, None));
    assert!(!allowed(&o, Some(&peer("spiffe://mayfly.local/web", 60))));
    assert!(!allowed(
        &o,
        Some(&peer("spiffe://mayfly.local/user/alice", -1))
    ));
    assert!(allowed(
        &o,
        Some(&peer("spiffe://mayfly.local/user/alice", 60))
    ));
    // Plain HTTP only ever on loopback.
    assert!(allowed(&opts("127.0.0.1:0", false, &[]), None));
    assert!(!allowed(&opts("0.0.0.0:0", false, &[]), None));
}

fn line(source: &str, direction: &str, peer: &str, decision: &str, extra: &str) -> Vec<u8> {
    format!(
        r#"{{"v":1,"source":"{source}","epoch":"e1","seq":1,"prev":"00","ts_ms":1000,"kind":"http.request","direction":"{direction}","local_id":"{source}","peer_id":"{peer}","decision":"{decision}","rule":"r","decision_id":"d1","method":"GET","path":"/x"{extra}}}"#
    )
    .into_bytes()
}

#[test]
fn an_edge_counts_the_callees_decisions_and_the_callers_denials_once_each() {
    let web = "spiffe://td/web";
    let orders = "spiffe://td/orders";
    let db = "spiffe://td/db";
    let lines = [
        // web -> orders allowed: recorded by both sidecars, counted once.
        line(web, "outbound", orders, "allow", ""),
        line(orders, "inbound", web, "allow", ""),
        // web -> db: sent by web's sidecar, denied by db's.
        line(web, "outbound", db, "allow", ""),
        line(db, "inbound", web, "deny", ""),
        // orders -> db: refused on the way out, never reached db.
        line(orders, "outbound", db, "deny", ""),
    ];
    let mesh = graph::build(lines.iter().filter_map(|l| Decision::parse(l)));
    assert_eq!(mesh.nodes, vec![db, orders, web]);
    let edge = |a: &str, b: &str| {
        mesh.edges
            .iter()
            .find(|e| e.caller == a && e.callee == b)
            .map(|e| (e.allowed, e.denied))
    };
    assert_eq!(edge(web, orders), Some((1, 0)));
    assert_eq!(edge(web, db), Some((0, 1)));
    assert_eq!(edge(orders, db), Some((0, 1)));
    assert_eq!(Window::parse("24h"), Some(Window::Hours24));
    assert_eq!(Window::parse("2h"), None);
}

const HOSTILE: &str = "<script>alert(1)</script>";

fn assert_escaped(html: &str) {
    assert!(!html.contains(HOSTILE), "unescaped: {html}");
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{html}"
    );
}

#[test]
fn hostile_ids_and_reasons_are_shown_as_text_on_every_page() {
    let hostile_id = format!("spiffe://td/{HOSTILE}");
    let lines = [line(
        "spiffe://td/db",
        "inbound",
        &hostile_id.replace('"', "\\\""),
        "deny",
        &format!(r#","rule":"{HOSTILE}""#),
    )];
    let decisions: Vec<Decision> = lines.iter().filter_map(|l| Decision::parse(l)).collect();
    assert_eq!(decisions.len(), 1);
    let mesh = graph::build(decisions);
    assert_escaped(&pages::graph(&mesh, Window::Hour1, false));
    assert_escaped(&pages::audit(&pages::AuditPage {
        records: lines.to_vec(),
        ..Default::default()
    }));
    assert_escaped(&pages::identities(&[pages::IdentityRow {
        id: hostile_id.clone(),
        policy_version: Some(HOSTILE.into()),
        ..Default::default()
    }]));
    let grant = GrantRecord {
        id: "g1".into(),
        from: hostile_id.clone(),
        to: "spiffe://td/db".into(),
        methods: vec![],
        paths: vec![],
        reason: HOSTILE.into(),
        ttl_secs: 60,
        requested_by: HOSTILE.into(),
        requested_at: 0,
        state: GrantState::Active,
        decided_by: None,
        not_before: Some(0),
        expires: Some(4_000_000_000),
        access: None,
    };
    let html = pages::grants(&[grant], 3_999_999_000);
    assert_escaped(&html);
    assert!(html.contains(r#"data-expires="4000000000""#), "{html}");
    assert!(html.contains("16m40s"), "{html}");
    assert_escaped(&pages::live(Some(HOSTILE), Some("deny")));
}

async fn next_text(
    s: &mut (
             impl futures_util::Stream<
        Item = Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    > + Unpin
         ),
) -> Option<String> {
    use futures_util::StreamExt;
    let frame = tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
        .await
        .unwrap()?;
    let data = frame.unwrap().into_data().unwrap();
    Some(String::from_utf8(data.to_vec()).unwrap())
}

fn decided(source: &str, peer: &str, decision: &str) -> std::sync::Arc<Decision> {
    std::sync::Arc::new(Decision::parse(&line(source, "inbound", peer, decision, "")).unwrap())
}

#[tokio::test]
async fn a_live_view_gets_only_the_decisions_its_filters_pass() {
    let (tx, _) = tokio::sync::broadcast::channel(super::state::BUFFER);
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let s = super::sse::stream(
        tx.subscribe(),
        stop,
        Some("spiffe://td/db".into()),
        Some("deny".into()),
    );
    let mut s = Box::pin(s);
    assert!(next_text(&mut s).await.unwrap().contains(": connected"));
    tx.send(decided("spiffe://td/db", "spiffe://td/orders", "allow"))
        .unwrap();
    tx.send(decided("spiffe://td/orders", "spiffe://td/web", "deny"))
        .unwrap();
    tx.send(decided("spiffe://td/db", "spiffe://td/web", "deny"))
        .unwrap();
    let event = next_text(&mut s).await.unwrap();
    assert!(event.starts_with("event: decision\ndata: {"), "{event}");
    let json: serde_json::Value =
        serde_json::from_str(event.lines().nth(1).unwrap().trim_start_matches("data: ")).unwrap();
    assert_eq!(json["caller"], "spiffe://td/web");
    assert_eq!(json["callee"], "spiffe://td/db");
    assert_eq!(json["decision"], "deny");
}

#[tokio::test]
async fn a_live_view_that_falls_behind_is_dropped_and_never_holds_up_the_sender() {
    let (tx, _) = tokio::sync::broadcast::channel(super::state::BUFFER);
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let mut s = Box::pin(super::sse::stream(tx.subscribe(), stop, None, None));
    assert!(next_text(&mut s).await.unwrap().contains(": connected"));
    let d = decided("spiffe://td/db", "spiffe://td/web", "deny");
    // The view reads nothing while more than its buffer is sent: sending never waits for it.
    for _ in 0..super::state::BUFFER + 10 {
        tx.send(d.clone()).unwrap();
    }
    assert_eq!(next_text(&mut s).await, None, "the lagging view ends");
}

#[test]
fn the_what_if_page_escapes_the_candidate_and_the_report() {
    use crate::server::replay::{Change, Flow, FlowChange, ReplayReport};
    let hostile = "</textarea><script>alert(1)</script>";
    let page = super::replay::ReplayPage {
        policy: hostile.into(),
        since: "\"><b>".into(),
        error: Some("<i>bad</i>".into()),
        report: Some(ReplayReport {
            changes: vec![FlowChange {
                flow: Flow {
                    direction: "inbound".into(),
                    caller: "spiffe://td/<img>".into(),
                    callee: "spiffe://td/db".into(),
                    method: Some("GET".into()),
                    target: "/<x>".into(),
                },
                change: Change::AllowToDeny,
                count: 3,
                example_decision_id: "d1".into(),
            }],
            ..ReplayReport::default()
        }),
    };
    let html = super::replay::render(&page);
    for raw in [hostile, "\"><b>", "<i>bad</i>", "spiffe://td/<img>", "/<x>"] {
        assert!(!html.contains(raw), "{raw} unescaped in:\n{html}");
    }
    assert!(html.contains("&lt;/textarea&gt;&lt;script&gt;"));
    assert!(html.contains("allow -&gt; deny"));
}

#[test]
fn a_persons_grant_shows_the_groups_it_was_asked_as_and_every_approver() {
    use crate::server::distribution::AccessInfo;
    let grant = GrantRecord {
        id: "g1".into(),
        from: "spiffe://td/user/alice".into(),
        to: "spiffe://td/db".into(),
        methods: vec![],
        paths: vec![],
        reason: "incident 42".into(),
        ttl_secs: 600,
        requested_by: "spiffe://td/user/alice".into(),
        requested_at: 0,
        state: GrantState::Active,
        decided_by: Some("spiffe://td/user/carol".into()),
        not_before: Some(0),
        expires: Some(4_000_000_000),
        access: Some(AccessInfo {
            kind: "service".into(),
            groups: vec!["oncall".into()],
            approvals_needed: 2,
            approver_groups: vec!["db-admins".into()],
            approved_by: vec![
                "spiffe://td/user/bob".into(),
                "spiffe://td/user/carol".into(),
            ],
        }),
    };
    let html = pages::grants(&[grant], 3_999_999_000);
    assert!(html.contains("as oncall"), "{html}");
    assert!(
        html.contains("spiffe://td/user/bob, spiffe://td/user/carol (2/2)"),
        "{html}"
    );
}

#[test]
fn the_followers_glance_reads_a_line_as_the_full_decision_parse_does() {
    let head = r#"{"v":1,"source":"spiffe://t/a","epoch":"e1","seq":3,"prev":"00","ts_ms":7"#;
    let cases = [
        r#","kind":"http.request","decision":"allow","policy_version":"sha256:1f"}"#,
        r#","kind":"connection.open","decision":"deny"}"#,
        r#","kind":"connection.denied","decision":"allow","policy_version":null}"#,
        r#","kind":"http.request","decision":"","policy_version":"sha256:1f"}"#,
        r#","kind":"http.request","decision":null}"#,
        r#","kind":"http.request","decision":true,"policy_version":7}"#,
        r#","kind":"http.response","decision":"allow","policy_version":"sha256:1f"}"#,
        r#","kind":"gap","dropped":4}"#,
        r#","kind":"http.request","decision":"allow","path":"/a\"b\\c\u00e9","nested":{"x":[1,{"y":"z"}]}}"#,
    ];
    for tail in cases {
        let line = format!("{head}{tail}");
        let g = super::records::Glance::parse(line.as_bytes()).unwrap();
        let d = Decision::parse(line.as_bytes());
        assert_eq!(g.is_decision(), d.is_some(), "{line}");
        assert_eq!(g.chain(), "spiffe://t/a#e1");
        assert_eq!(g.source(), "spiffe://t/a");
        assert_eq!(g.ts_ms, 7);
        if let Some(d) = d {
            assert_eq!(g.policy_version(), d.policy_version, "{line}");
        }
    }
    // What does not parse as a record is no glance either.
    for bad in [
        r#"{"v":1,"source":"spiffe://t/a","epoch":"e1","seq":3,"ts_ms":7,"kind":"gap"}"#,
        "not json",
    ] {
        assert!(
            super::records::Glance::parse(bad.as_bytes()).is_none(),
            "{bad}"
        );
        assert!(super::records::head(bad.as_bytes()).is_none(), "{bad}");
    }
}
