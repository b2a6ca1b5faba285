//! The control plane when its store fails and when admins race: unit tests on a real (SQLite)
//! store, wrapped where a failure has to be injected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use time::OffsetDateTime;

use super::ca::{Ca, CaSettings, Caller, TokenCreateError};
use super::distribution::{self, Distribution, GrantError, GrantRequest};
use crate::identity::id::{parse_trust_domain, parse_workload_id};
use crate::identity::keys::SecretKey;
use crate::identity::signing::authority::{Authorities, AuthorityConfig};
use crate::identity::signing::issue::make_csr;
use crate::server::store::faulty::FaultyStore;
use crate::server::store::{SqliteStore, Store};

const WEB: &str = "spiffe://mayfly.local/web";

fn ca_on(store: Arc<dyn Store>) -> Arc<Ca> {
    let td = parse_trust_domain("mayfly.local").unwrap();
    let a = Authorities::init(td, AuthorityConfig::default(), OffsetDateTime::now_utc()).unwrap();
    store.save_authorities(&a).unwrap();
    store.set_setting("trust_domain", "mayfly.local").unwrap();
    Ca::start(
        store,
        a,
        CaSettings::default(),
        Distribution::new(None).unwrap(),
    )
    .unwrap()
}

fn csr(id: &str) -> Vec<u8> {
    make_csr(
        &SecretKey::generate().unwrap(),
        &parse_workload_id(id).unwrap(),
    )
    .unwrap()
}

fn request() -> GrantRequest {
    GrantRequest {
        from: WEB.into(),
        to: "spiffe://mayfly.local/db".into(),
        methods: Vec::new(),
        paths: Vec::new(),
        ttl: "10m".into(),
        reason: "INC-1".into(),
    }
}

fn state_of(ca: &Ca, id: &str) -> String {
    distribution::list(ca)
        .unwrap()
        .into_iter()
        .find(|g| g.id == id)
        .unwrap()
        .state
        .to_string()
}

#[test]
fn a_token_stays_unspent_when_its_svid_cannot_be_logged() {
    let store = Arc::new(FaultyStore::in_memory());
    let ca = ca_on(store.clone());
    let (token, _) = ca
        .create_token(WEB, Duration::from_secs(600), "root")
        .unwrap();
    let text = token.reveal().to_string();
    store.fail_issued_log.store(true, Ordering::SeqCst);
    let err = ca
        .issue_svid(&csr(WEB), Caller::Token(text.clone()), None, "test")
        .unwrap_err();
    assert_eq!(err.status(), 500, "{err}");
    assert_eq!(store.list_tokens().unwrap()[0].used_at, None, "spent");
    store.fail_issued_log.store(false, Ordering::SeqCst);
    let issued = ca
        .issue_svid(&csr(WEB), Caller::Token(text.clone()), None, "test")
        .expect("the token survived the failed issuance");
    assert_eq!(issued.id.to_string(), WEB);
    let again = ca
        .issue_svid(&csr(WEB), Caller::Token(text), None, "test")
        .unwrap_err();
    assert_eq!(again.reason(), "token_used");
}

/// Runs `actions` on grant `id` from as many threads at once; returns who succeeded.
fn race(ca: &Arc<Ca>, id: &str, actions: &[&'static str]) -> Vec<(&'static str, bool)> {
    let start = std::sync::Barrier::new(actions.len());
    std::thread::scope(|s| {
        let runs: Vec<_> = actions
            .iter()
            .map(|&action| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    let won = distribution::decide(ca, &ca.dist, "bob", id, action).is_ok();
                    (action, won)
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

#[test]
fn racing_approvals_and_denials_of_one_grant_have_exactly_one_winner() {
    let ca = ca_on(Arc::new(SqliteStore::in_memory().unwrap()));
    for round in 0..30 {
        let id = distribution::request(&ca, &ca.dist, "alice", request())
            .unwrap()
            .id;
        let results = race(&ca, &id, &["approve", "deny"].repeat(4));
        let winners: Vec<_> = results.iter().filter(|r| r.1).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let expected = if winners[0].0 == "approve" {
            "active"
        } else {
            "denied"
        };
        assert_eq!(state_of(&ca, &id), expected, "round {round}");
    }
}

#[test]
fn a_revocation_racing_approvals_wins_once_and_sticks() {
    let ca = ca_on(Arc::new(SqliteStore::in_memory().unwrap()));
    for round in 0..30 {
        let id = distribution::request(&ca, &ca.dist, "alice", request())
            .unwrap()
            .id;
        let results = race(&ca, &id, &["approve", "revoke"].repeat(4));
        let won = |a: &str| results.iter().filter(|r| r.0 == a && r.1).count();
        assert_eq!(won("revoke"), 1, "round {round}: {results:?}");
        assert!(won("approve") <= 1, "round {round}: {results:?}");
        assert_eq!(state_of(&ca, &id), "revoked", "round {round}: {results:?}");
    }
}

#[tokio::test]
async fn a_store_error_keeps_the_last_good_grants_in_the_watch_snapshot() {
    let store = Arc::new(FaultyStore::in_memory());
    let ca = ca_on(store.clone());
    let g = distribution::request(&ca, &ca.dist, "alice", request()).unwrap();
    distribution::decide(&ca, &ca.dist, "bob", &g.id, "approve").unwrap();
    let ids = |s: Option<crate::identity::api::Snapshot>| -> Vec<String> {
        s.unwrap().grants.into_iter().map(|g| g.id).collect()
    };
    assert_eq!(ids(ca.dist.snapshot(&ca).await), vec![g.id.clone()]);
    store.fail_grant_reads.store(true, Ordering::SeqCst);
    ca.dist.bump();
    assert_eq!(ids(ca.dist.snapshot(&ca).await), vec![g.id.clone()]);
    assert!(
        ca.metrics
            .encode()
            .contains("mayfly_ca_watch_snapshot_errors_total 1"),
        "{}",
        ca.metrics.encode()
    );
    // Once the store answers again, the next change is read.
    store.fail_grant_reads.store(false, Ordering::SeqCst);
    distribution::decide(&ca, &ca.dist, "bob", &g.id, "revoke").unwrap();
    assert!(ids(ca.dist.snapshot(&ca).await).is_empty());
}

#[tokio::test]
async fn a_watch_snapshot_is_withheld_until_the_grants_were_read_once() {
    let store = Arc::new(FaultyStore::in_memory());
    let ca = ca_on(store.clone());
    store.fail_grant_reads.store(true, Ordering::SeqCst);
    assert!(ca.dist.snapshot(&ca).await.is_none());
}

#[test]
fn a_rotation_that_cannot_be_saved_is_made_again_and_saved_once_the_store_can_write() {
    let store = Arc::new(FaultyStore::in_memory());
    let ca = ca_on(store.clone());
    // Past the point where the first intermediate prepares its successor.
    let due = OffsetDateTime::now_utc() + time::Duration::hours(13);
    store.fail_authorities_save.store(true, Ordering::SeqCst);
    assert!(ca.rotate(due).is_err(), "the change could not be saved");
    store.fail_authorities_save.store(false, Ordering::SeqCst);
    ca.rotate(due).unwrap();
    // What the control plane runs on is what a restart would load.
    let ids = |a: &Authorities| -> Vec<(String, String)> {
        let mut v: Vec<_> = a
            .all()
            .iter()
            .map(|x| (x.id.clone(), x.state.to_string()))
            .collect();
        v.sort();
        v
    };
    let stored = store
        .load_authorities(AuthorityConfig::default())
        .unwrap()
        .unwrap();
    let running = ca.authorities().unwrap();
    assert_ne!(ids(&running).len(), 2, "a rotation was due at {due}");
    assert_eq!(ids(&stored), ids(&running));
}

#[test]
fn events_that_cannot_be_stored_become_one_gap_record_once_the_store_can_write() {
    let store = Arc::new(FaultyStore::in_memory());
    let ca = ca_on(store.clone());
    store.fail_events.store(true, Ordering::SeqCst);
    ca.event("svid.refused", serde_json::json!({ "reason": "x" }));
    ca.event("svid.refused", serde_json::json!({ "reason": "y" }));
    ca.event("token.refused", serde_json::json!({ "reason": "z" }));
    assert_eq!(ca.pending.lost_count(), 3);
    // Still failing: nothing recorded, nothing forgotten.
    super::audit::settle(&ca);
    assert_eq!(ca.pending.lost_count(), 3);
    store.fail_events.store(false, Ordering::SeqCst);
    super::audit::settle(&ca);
    assert_eq!(ca.pending.lost_count(), 0);
    let gaps: Vec<serde_json::Value> = store
        .events_after(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "gap")
        .map(|e| serde_json::from_str(&e.detail).unwrap())
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0]["lost_events"], 3);
    assert_eq!(gaps[0]["lost_kinds"]["svid.refused"], 2);
    assert_eq!(gaps[0]["lost_kinds"]["token.refused"], 1);
    assert_eq!(gaps[0]["reason"], "store_unwritable");
    assert!(
        ca.metrics
            .encode()
            .contains("mayfly_ca_audit_events_lost_total 3")
    );
    // Recorded once.
    super::audit::settle(&ca);
    let n = store
        .events_after(0, 1000)
        .unwrap()
        .iter()
        .filter(|e| e.kind == "gap")
        .count();
    assert_eq!(n, 1);
}

#[test]
fn grant_refusals_are_typed_and_keep_the_text_the_admin_cli_shows() {
    let ca = ca_on(Arc::new(SqliteStore::in_memory().unwrap()));
    let g = distribution::request(&ca, &ca.dist, "alice", request()).unwrap();
    let err = distribution::decide(&ca, &ca.dist, "alice", &g.id, "approve").unwrap_err();
    assert!(matches!(err, GrantError::SelfApproval { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "alice requested grant {} and cannot approve it: another admin must",
            g.id
        )
    );
    distribution::decide(&ca, &ca.dist, "bob", &g.id, "deny").unwrap();
    let err = distribution::decide(&ca, &ca.dist, "bob", &g.id, "approve").unwrap_err();
    assert!(matches!(err, GrantError::NotAllowed { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("cannot approve grant {}: it is denied", g.id)
    );
    let err = distribution::decide(&ca, &ca.dist, "bob", "g-none", "approve").unwrap_err();
    assert!(matches!(err, GrantError::NotFound(_)), "{err:?}");
    assert_eq!(err.to_string(), "no grant with id g-none");
    let no_reason = GrantRequest {
        reason: " ".into(),
        ..request()
    };
    let err = distribution::request(&ca, &ca.dist, "alice", no_reason).unwrap_err();
    assert!(matches!(err, GrantError::NoReason), "{err:?}");
    assert_eq!(
        err.to_string(),
        "a reason is required (for example --reason \"INC-42\")"
    );
    let bad_ttl = GrantRequest {
        ttl: "soon".into(),
        ..request()
    };
    let err = distribution::request(&ca, &ca.dist, "alice", bad_ttl).unwrap_err();
    assert!(matches!(err, GrantError::Ttl(_)), "{err:?}");
}

#[test]
fn token_creation_refusals_are_typed_and_keep_their_text() {
    let ca = ca_on(Arc::new(SqliteStore::in_memory().unwrap()));
    let err = ca.create_token(WEB, Duration::ZERO, "root").unwrap_err();
    assert!(matches!(err, TokenCreateError::Ttl { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "token TTL must be between 1s and 15m (the configured maximum)"
    );
    let err = ca
        .create_token("spiffe://other.test/web", Duration::from_secs(60), "root")
        .unwrap_err();
    assert!(
        matches!(err, TokenCreateError::OtherTrustDomain { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "spiffe://other.test/web is not in this control plane's trust domain mayfly.local"
    );
    let err = ca
        .create_token(
            "spiffe://mayfly.local/mayfly/ca",
            Duration::from_secs(60),
            "root",
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            TokenCreateError::Id(crate::identity::id::IdError::Reserved(_))
        ),
        "{err:?}"
    );
}
