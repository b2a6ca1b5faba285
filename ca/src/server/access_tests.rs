//! People's access requests and decisions on a real (SQLite) store: the rules, the approvers,
//! distinct approvals, and who may end a request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use time::OffsetDateTime;

use super::access::{self, AccessError, Person};
use super::ca::{Ca, CaSettings};
use super::distribution::Distribution;
use crate::identity::api::AccessRequest;
use crate::identity::id::parse_trust_domain;
use crate::identity::signing::authority::{Authorities, AuthorityConfig};
use crate::server::store::{GrantState, SqliteStore, Store};

const DB: &str = "spiffe://mayfly.local/db";

const POLICY: &str = r#"version = 1
[[access.rule]]
groups = ["oncall"]
to = ["spiffe://mayfly.local/*"]
max_ttl = "1h"
approvals = 2
approvers = ["db-admins"]
"#;

fn ca(dir: &tempfile::TempDir) -> Arc<Ca> {
    let pol = dir.path().join("policy.toml");
    std::fs::write(&pol, POLICY).unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("ca.db")).unwrap());
    let td = parse_trust_domain("mayfly.local").unwrap();
    let a = Authorities::init(td, AuthorityConfig::default(), OffsetDateTime::now_utc()).unwrap();
    store.save_authorities(&a).unwrap();
    store.set_setting("trust_domain", "mayfly.local").unwrap();
    let dist = Distribution::new(Some(pol)).unwrap();
    Ca::start(store, a, CaSettings::default(), dist).unwrap()
}

/// A second control plane on the same store file, as a replica would be.
fn replica(dir: &tempfile::TempDir) -> Arc<Ca> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("ca.db")).unwrap());
    let a = store
        .load_authorities(AuthorityConfig::default())
        .unwrap()
        .unwrap();
    let dist = Distribution::new(Some(dir.path().join("policy.toml"))).unwrap();
    Ca::start(store, a, CaSettings::default(), dist).unwrap()
}

fn person(name: &str, groups: &[&str]) -> Person {
    Person {
        id: format!("spiffe://mayfly.local/user/{name}"),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        signed_in: true,
    }
}

fn ask(to: &str) -> AccessRequest {
    AccessRequest {
        to: Some(to.into()),
        ttl: "10m".into(),
        reason: "INC-1".into(),
        ..AccessRequest::default()
    }
}

#[test]
fn a_request_needing_two_approvals_is_active_only_after_two_distinct_approvers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(&dir);
    let alice = person("alice", &["oncall"]);
    let (bob, carol) = (
        person("bob", &["db-admins"]),
        person("carol", &["db-admins"]),
    );
    let g = access::request(&ca, &alice, ask(DB)).unwrap();
    assert_eq!(g.state, GrantState::Pending);
    assert_eq!(g.from, alice.id);
    let g1 = access::decide(&ca, &bob, &g.id, "approve").unwrap();
    assert_eq!(g1.state, GrantState::Pending, "one of two approvals");
    let again = access::decide(&ca, &bob, &g.id, "approve").unwrap_err();
    assert!(
        matches!(again, AccessError::AlreadyApproved { .. }),
        "{again}"
    );
    assert!(access::active_grant(&ca, &alice.id, DB).unwrap().is_none());
    let g2 = access::decide(&ca, &carol, &g.id, "approve").unwrap();
    assert_eq!(g2.state, GrantState::Active);
    assert_eq!(g2.access.unwrap().approved_by, [bob.id.clone(), carol.id]);
    assert!(access::active_grant(&ca, &alice.id, DB).unwrap().is_some());
}

#[test]
fn two_approvals_made_at_once_on_two_replicas_both_count() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (ca(&dir), replica(&dir));
    let alice = person("alice", &["oncall"]);
    let (bob, carol) = (
        person("bob", &["db-admins"]),
        person("carol", &["db-admins"]),
    );
    for _ in 0..20 {
        let g = access::request(&one, &alice, ask(DB)).unwrap();
        let barrier = std::sync::Barrier::new(2);
        let (b, c) = std::thread::scope(|s| {
            let b = s.spawn(|| {
                barrier.wait();
                access::decide(&one, &bob, &g.id, "approve")
            });
            let c = s.spawn(|| {
                barrier.wait();
                access::decide(&two, &carol, &g.id, "approve")
            });
            (b.join().unwrap(), c.join().unwrap())
        });
        let (b, c) = (b.unwrap(), c.unwrap());
        // Whichever landed second saw the first and completed the request.
        let last = if b.state == GrantState::Active { b } else { c };
        assert_eq!(last.state, GrantState::Active, "{last:?}");
        let mut by = last.access.unwrap().approved_by;
        by.sort();
        assert_eq!(by, [bob.id.clone(), carol.id.clone()]);
        assert!(access::active_grant(&two, &alice.id, DB).unwrap().is_some());
        access::decide(&one, &alice, &g.id, "revoke").unwrap();
    }
}

#[test]
fn nobody_approves_their_own_request_and_only_approvers_decide() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(&dir);
    let alice = person("alice", &["oncall", "db-admins"]);
    let dan = person("dan", &["devs"]);
    let g = access::request(&ca, &alice, ask(DB)).unwrap();
    let e = access::decide(&ca, &alice, &g.id, "approve").unwrap_err();
    assert!(matches!(e, AccessError::SelfApproval { .. }), "{e}");
    let e = access::decide(&ca, &dan, &g.id, "deny").unwrap_err();
    assert!(matches!(e, AccessError::NotApprover { .. }), "{e}");
    let e = access::decide(&ca, &dan, &g.id, "revoke").unwrap_err();
    assert!(matches!(e, AccessError::NotYours { .. }), "{e}");
    let lapsed = Person {
        signed_in: false,
        groups: Vec::new(),
        ..person("erin", &[])
    };
    let e = access::decide(&ca, &lapsed, &g.id, "approve").unwrap_err();
    assert!(matches!(e, AccessError::NoSignIn(_)), "{e}");
    let g = access::decide(&ca, &alice, &g.id, "revoke").unwrap();
    assert_eq!(
        g.state,
        GrantState::Revoked,
        "the requester may withdraw it"
    );
}

#[test]
fn requests_outside_the_rules_or_for_reserved_ids_are_refused_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(&dir);
    let alice = person("alice", &["oncall"]);
    let e = access::request(&ca, &person("dan", &["devs"]), ask(DB)).unwrap_err();
    assert!(matches!(e, AccessError::NoRule { .. }), "{e}");
    // `spiffe://mayfly.local/*` covers the reserved namespace; the request is refused anyway.
    let e = access::request(&ca, &alice, ask("spiffe://mayfly.local/mayfly/admin")).unwrap_err();
    assert!(matches!(e, AccessError::Bad(_)), "{e}");
    let e = access::request(
        &ca,
        &alice,
        AccessRequest {
            to: None,
            role: Some("admin".into()),
            ..ask(DB)
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, AccessError::NoRule { .. }),
        "oncall is no admin: {e}"
    );
    let e = access::request(
        &ca,
        &alice,
        AccessRequest {
            reason: " ".into(),
            ..ask(DB)
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("reason"), "{e}");
    let e = access::request(
        &ca,
        &alice,
        AccessRequest {
            ttl: "2h".into(),
            ..ask(DB)
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("max_ttl"), "{e}");
    let refusals = ca
        .store()
        .audit_query(&crate::server::store::AuditFilter {
            kind: Some("access.refused".into()),
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(refusals.len(), 5);
}
