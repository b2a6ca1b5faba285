#![allow(clippy::unwrap_used)]
use super::*;
use crate::identity::id::parse_trust_domain;

fn token(id: &str, hash: &str, expires_in: i64) -> TokenRecord {
    let now = OffsetDateTime::now_utc();
    TokenRecord {
        id: id.into(),
        hash: hash.into(),
        spiffe_id: "spiffe://mayfly.local/web".into(),
        created_at: now,
        expires_at: now + time::Duration::seconds(expires_in),
        created_by: "root".into(),
        used_at: None,
        revoked_at: None,
    }
}

#[test]
fn authorities_round_trip() {
    let s = SqliteStore::in_memory().unwrap();
    assert!(
        s.load_authorities(AuthorityConfig::default())
            .unwrap()
            .is_none()
    );
    let a = Authorities::init(
        parse_trust_domain("mayfly.local").unwrap(),
        AuthorityConfig::default(),
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    s.save_authorities(&a).unwrap();
    let b = s
        .load_authorities(AuthorityConfig::default())
        .unwrap()
        .unwrap();
    assert_eq!(b.trust_domain(), a.trust_domain());
    assert_eq!(b.all().len(), 2);
    assert_eq!(b.signer().unwrap().cert, a.signer().unwrap().cert);
    assert_eq!(
        b.signer().unwrap().key.pkcs8(),
        a.signer().unwrap().key.pkcs8()
    );
}

fn store() -> SqliteStore {
    let s = SqliteStore::in_memory().unwrap();
    s.set_setting("trust_domain", "mayfly.local").unwrap();
    s
}

/// Logs an SVID with `serial` paid for by token `id` with secret hash `hash`.
fn spend(
    s: &SqliteStore,
    serial: &str,
    id: &str,
    hash: &str,
) -> Result<Result<(), TokenRefusal>, StoreError> {
    let now = OffsetDateTime::now_utc();
    let rec = IssuedRecord {
        serial: serial.into(),
        spiffe_id: "spiffe://mayfly.local/web".into(),
        not_after: now + time::Duration::minutes(5),
        issued_at: now,
        requester: format!("token:{id}"),
    };
    let claim = TokenClaim {
        id: id.into(),
        hash: hash.into(),
    };
    s.log_issued_with_event(&rec, "svid.issued", "{}", Some(&claim))
}

#[test]
fn tokens_are_single_use_and_refusals_say_why() {
    let s = store();
    let now = OffsetDateTime::now_utc();
    s.insert_token(&token("a", "ha", 600)).unwrap();
    s.insert_token(&token("b", "hb", -1)).unwrap();
    s.insert_token(&token("c", "hc", 600)).unwrap();
    assert_eq!(spend(&s, "01", "a", "ha").unwrap(), Ok(()));
    assert_eq!(
        spend(&s, "02", "a", "ha").unwrap(),
        Err(TokenRefusal::Used("a".into()))
    );
    assert_eq!(
        spend(&s, "03", "b", "hb").unwrap(),
        Err(TokenRefusal::Expired("b".into()))
    );
    assert_eq!(
        spend(&s, "04", "zz", "hc").unwrap(),
        Err(TokenRefusal::Unknown)
    );
    // A secret presented under another live token's ID.
    assert_eq!(
        spend(&s, "05", "c", "ha").unwrap(),
        Err(TokenRefusal::Unknown)
    );
    assert!(s.revoke_token("c", now).unwrap());
    assert!(!s.revoke_token("c", now).unwrap());
    assert_eq!(
        spend(&s, "06", "c", "hc").unwrap(),
        Err(TokenRefusal::Revoked("c".into()))
    );
    assert_eq!(s.list_tokens().unwrap().len(), 3);
    // A refusal logs nothing: only the SVID that spent a token is in the log.
    let issued = s.list_issued(10).unwrap();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].serial, "01");
    assert_eq!(s.find_token("c").unwrap().unwrap().used_at, None);
}

#[test]
fn a_token_is_spent_only_if_its_svid_is_logged() {
    let s = store();
    s.insert_token(&token("a", "ha", 600)).unwrap();
    s.insert_token(&token("b", "hb", 600)).unwrap();
    spend(&s, "01", "b", "hb").unwrap().unwrap();
    // The log refuses a second row with serial 01: the transaction fails as a whole.
    assert!(spend(&s, "01", "a", "ha").is_err());
    assert_eq!(s.find_token("a").unwrap().unwrap().used_at, None);
    assert_eq!(spend(&s, "02", "a", "ha").unwrap(), Ok(()));
    assert!(s.find_token("a").unwrap().unwrap().used_at.is_some());
}

#[test]
fn concurrent_spends_of_one_token_have_exactly_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("t.db")).unwrap();
    s.set_setting("trust_domain", "mayfly.local").unwrap();
    s.insert_token(&token("a", "ha", 600)).unwrap();
    let outcomes: Vec<_> = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..8)
            .map(|i| {
                let s = &s;
                scope.spawn(move || spend(s, &format!("{i:02}"), "a", "ha").unwrap())
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1);
    assert!(
        outcomes
            .iter()
            .all(|o| o.is_ok() || *o == Err(TokenRefusal::Used("a".into())))
    );
    assert_eq!(s.list_issued(100).unwrap().len(), 1);
}

fn grant(s: &SqliteStore, id: &str, state: GrantState, expires: i64) {
    let body = serde_json::json!({ "id": id, "state": state }).to_string();
    s.insert_grant(id, state, expires, &body).unwrap();
}

#[test]
fn only_grants_in_force_are_live_and_each_expiry_is_reported_once() {
    let s = store();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    grant(&s, "live", GrantState::Active, now + 60);
    grant(&s, "later", GrantState::Active, now + 120);
    grant(&s, "ended", GrantState::Active, now - 1);
    grant(&s, "waiting", GrantState::Pending, 0);
    grant(&s, "refused", GrantState::Denied, 0);
    grant(&s, "cut", GrantState::Revoked, now + 60);
    let ids = |bodies: Vec<String>| -> Vec<String> {
        let mut v: Vec<String> = bodies
            .iter()
            .map(|b| serde_json::from_str::<serde_json::Value>(b).unwrap()["id"].to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(ids(s.live_grants(now).unwrap()), ["\"later\"", "\"live\""]);
    assert_eq!(s.next_grant_expiry(now).unwrap(), Some(now + 60));
    let expired = s.expire_grants(now).unwrap();
    assert_eq!(ids(expired.clone()), ["\"ended\""]);
    let body: serde_json::Value = serde_json::from_str(&expired[0]).unwrap();
    assert_eq!(body["state"], "expired");
    assert!(s.expire_grants(now).unwrap().is_empty(), "reported twice");
    assert_eq!(ids(s.expire_grants(now + 60).unwrap()), ["\"live\""]);
    assert_eq!(s.next_grant_expiry(now + 60).unwrap(), Some(now + 120));
}

#[test]
fn a_grant_decision_applies_only_to_the_state_it_was_made_on() {
    let s = store();
    grant(&s, "g", GrantState::Pending, 0);
    let (p, a, r) = (GrantState::Pending, GrantState::Active, GrantState::Revoked);
    assert!(s.update_grant("g", p, a, 60, "{}").unwrap());
    assert!(!s.update_grant("g", p, r, 0, "{}").unwrap(), "stale");
    assert!(s.update_grant("g", a, r, 60, "{}").unwrap());
    assert!(!s.update_grant("nope", p, a, 60, "{}").unwrap());
}

#[test]
fn grant_states_have_one_name_each() {
    for g in [
        GrantState::Pending,
        GrantState::Active,
        GrantState::Denied,
        GrantState::Revoked,
        GrantState::Expired,
    ] {
        assert_eq!(g.as_str().parse::<GrantState>().unwrap(), g);
        assert_eq!(serde_json::to_value(g).unwrap(), g.as_str());
    }
    assert!("approved".parse::<GrantState>().is_err());
}

#[test]
fn migrations_are_versioned_and_a_newer_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    drop(SqliteStore::open(&path).unwrap());
    drop(SqliteStore::open(&path).unwrap()); // idempotent
    let c = Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    assert!(matches!(
        SqliteStore::open(&path),
        Err(StoreError::TooNew { found: 99, .. })
    ));
}

#[test]
fn events_are_sequenced() {
    let s = SqliteStore::in_memory().unwrap();
    s.set_setting("trust_domain", "mayfly.local").unwrap();
    assert_eq!(s.last_own_kind().unwrap(), None);
    let now = OffsetDateTime::now_utc();
    let a = s.append_event(now, "x", "{}").unwrap();
    let b = s.append_event(now, "y", "{}").unwrap();
    assert!(b > a);
    let ev = s.events_after(a, 10).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, "y");
    assert_eq!(s.last_own_kind().unwrap().as_deref(), Some("y"));
}

/// Concurrent issuances are group-committed: every certificate and every event lands, the
/// event chain stays contiguous and verifies, and each caller returns only after its rows.
#[test]
fn issued_with_event_group_commit_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
    s.set_setting("trust_domain", "mayfly.local").unwrap();
    let now = OffsetDateTime::now_utc();
    std::thread::scope(|scope| {
        for t in 0..8 {
            let s = s.clone();
            scope.spawn(move || {
                for i in 0..50 {
                    let serial = format!("{t:02x}{i:04x}");
                    let rec = IssuedRecord {
                        serial: serial.clone(),
                        spiffe_id: format!("spiffe://mayfly.local/w{t}"),
                        not_after: now + time::Duration::minutes(5),
                        issued_at: now,
                        requester: "test".into(),
                    };
                    let detail = format!("{{\"serial\":\"{serial}\"}}");
                    s.log_issued_with_event(&rec, "svid.issued", &detail, None)
                        .unwrap()
                        .unwrap();
                    // Durable and visible once the call returns.
                    let n: i64 = s
                        .with(|c| {
                            c.query_row(
                                "SELECT count(*) FROM issued WHERE serial = ?1",
                                [&serial],
                                |r| r.get(0),
                            )
                            .map_err(db)
                        })
                        .unwrap();
                    assert_eq!(n, 1, "{serial}");
                }
            });
        }
    });
    assert_eq!(s.list_issued(10_000).unwrap().len(), 400);
    let chain = s.own_chain().unwrap().unwrap();
    let lines = s.audit_lines(&chain).unwrap();
    assert_eq!(lines.len(), 400);
    let summary =
        crate::identity::audit::verify_lines(&chain, lines.iter().map(Vec::as_slice), None)
            .unwrap();
    assert_eq!(summary.records, 400);
    // The events are the ones logged, each once.
    let mut serials: Vec<String> = s
        .events_after(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.detail).unwrap();
            v["serial"].as_str().unwrap().to_owned()
        })
        .collect();
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 400);
}
