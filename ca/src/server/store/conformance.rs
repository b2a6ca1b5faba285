//! The behaviour every [`Store`] implementation must have, as functions over `&dyn Store`
//! (feature `testing`): the end-to-end tests run each against SQLite and PostgreSQL. Each
//! case takes a fresh, empty store; the replica cases take two handles on one database.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use time::OffsetDateTime;

use super::{AuditConflict, AuditFilter, AuditRow, GrantState, IssuedRecord, Store, TokenClaim};
use super::{StoreError, TokenRecord, TokenRefusal, UserSession};
use crate::identity::id::parse_trust_domain;
use crate::identity::signing::authority::{Authorities, AuthorityConfig};

/// A behaviour case on one fresh store.
pub type Case = fn(&dyn Store);
/// A behaviour case on two handles of one fresh database ("two replicas").
pub type ReplicaCase = fn(&dyn Store, &dyn Store);

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

fn init(s: &dyn Store) {
    if s.setting("trust_domain").unwrap().is_none() {
        s.set_setting("trust_domain", "mayfly.local").unwrap();
    }
}

/// Logs an SVID with `serial` paid for by token `id` with secret hash `hash`.
fn spend(
    s: &dyn Store,
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
    s.log_issued_with_event(&rec, "svid.issued", "{\"serial\":\"x\"}", Some(&claim))
}

/// Authorities come back as saved, keys included.
pub fn authorities_round_trip(s: &dyn Store) {
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
    s.save_authorities(&a).unwrap(); // replaces, does not add
    let b = s
        .load_authorities(AuthorityConfig::default())
        .unwrap()
        .unwrap();
    assert_eq!(b.trust_domain(), a.trust_domain());
    assert_eq!(s.trust_domain().unwrap().as_ref(), Some(a.trust_domain()));
    assert_eq!(b.all().len(), 3);
    assert_eq!(b.bundle_sequence(), a.bundle_sequence());
    assert_eq!(b.signer().unwrap().cert, a.signer().unwrap().cert);
    assert_eq!(
        b.signer().unwrap().key.pkcs8(),
        a.signer().unwrap().key.pkcs8()
    );
    // The JWT key: same kid, same key, same place in its rotation, same JWK in the bundle.
    let (ja, jb) = (a.jwt_signer().unwrap(), b.jwt_signer().unwrap());
    assert_eq!(jb.kid(), ja.kid());
    assert!(jb.kid().is_some_and(|k| k.len() == 32), "{:?}", jb.kid());
    assert_eq!(jb.key.pkcs8(), ja.key.pkcs8());
    assert_eq!(
        (jb.state, jb.not_after.unix_timestamp()),
        (ja.state, ja.not_after.unix_timestamp())
    );
    let now = OffsetDateTime::now_utc();
    assert_eq!(b.bundle_jwt_keys(now), a.bundle_jwt_keys(now));
}

/// Tokens are single use; each refusal says why and writes nothing.
pub fn tokens_are_single_use_and_refusals_say_why(s: &dyn Store) {
    init(s);
    let now = OffsetDateTime::now_utc();
    s.insert_token(&token("a", "ha", 600)).unwrap();
    s.insert_token(&token("b", "hb", -1)).unwrap();
    s.insert_token(&token("c", "hc", 600)).unwrap();
    assert!(
        s.insert_token(&token("a", "hz", 600)).is_err(),
        "duplicate id"
    );
    assert_eq!(spend(s, "01", "a", "ha").unwrap(), Ok(()));
    assert_eq!(
        spend(s, "02", "a", "ha").unwrap(),
        Err(TokenRefusal::Used("a".into()))
    );
    assert_eq!(
        spend(s, "03", "b", "hb").unwrap(),
        Err(TokenRefusal::Expired("b".into()))
    );
    assert_eq!(
        spend(s, "04", "zz", "hc").unwrap(),
        Err(TokenRefusal::Unknown)
    );
    assert_eq!(
        spend(s, "05", "c", "ha").unwrap(),
        Err(TokenRefusal::Unknown)
    );
    assert!(s.revoke_token("c", now).unwrap());
    assert!(!s.revoke_token("c", now).unwrap());
    assert_eq!(
        spend(s, "06", "c", "hc").unwrap(),
        Err(TokenRefusal::Revoked("c".into()))
    );
    assert_eq!(s.list_tokens().unwrap().len(), 3);
    let issued = s.list_issued(10).unwrap();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].serial, "01");
    assert_eq!(s.find_token("c").unwrap().unwrap().used_at, None);
    assert!(s.find_token("a").unwrap().unwrap().used_at.is_some());
    assert_eq!(s.find_token("nope").unwrap(), None);
}

/// A token is spent only in the transaction that logs its SVID.
pub fn a_token_is_spent_only_if_its_svid_is_logged(s: &dyn Store) {
    init(s);
    s.insert_token(&token("a", "ha", 600)).unwrap();
    s.insert_token(&token("b", "hb", 600)).unwrap();
    spend(s, "01", "b", "hb").unwrap().unwrap();
    // A second row with serial 01 is refused: the transaction fails as a whole.
    assert!(spend(s, "01", "a", "ha").is_err());
    assert_eq!(s.find_token("a").unwrap().unwrap().used_at, None);
    assert_eq!(spend(s, "02", "a", "ha").unwrap(), Ok(()));
}

/// Grants in force are live; each expiry is reported once.
pub fn only_grants_in_force_are_live_and_each_expiry_is_reported_once(s: &dyn Store) {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let grant = |id: &str, state: GrantState, expires: i64| {
        let body = serde_json::json!({ "id": id, "state": state }).to_string();
        s.insert_grant(id, state, expires, &body).unwrap();
    };
    grant("live", GrantState::Active, now + 60);
    grant("later", GrantState::Active, now + 120);
    grant("ended", GrantState::Active, now - 1);
    grant("waiting", GrantState::Pending, 0);
    grant("refused", GrantState::Denied, 0);
    grant("cut", GrantState::Revoked, now + 60);
    let ids = |bodies: Vec<String>| -> Vec<String> {
        let mut v: Vec<String> = bodies
            .iter()
            .map(|b| serde_json::from_str::<serde_json::Value>(b).unwrap()["id"].to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(ids(s.live_grants(now).unwrap()), ["\"later\"", "\"live\""]);
    assert_eq!(s.list_grants().unwrap().len(), 6);
    assert_eq!(s.next_grant_expiry(now).unwrap(), Some(now + 60));
    let expired = s.expire_grants(now).unwrap();
    assert_eq!(ids(expired.clone()), ["\"ended\""]);
    let body: serde_json::Value = serde_json::from_str(&expired[0]).unwrap();
    assert_eq!(body["state"], "expired");
    let stored: serde_json::Value =
        serde_json::from_str(&s.grant("ended").unwrap().unwrap()).unwrap();
    assert_eq!(stored["state"], "expired");
    assert!(s.expire_grants(now).unwrap().is_empty(), "reported twice");
    assert_eq!(ids(s.expire_grants(now + 60).unwrap()), ["\"live\""]);
    assert_eq!(s.next_grant_expiry(now + 60).unwrap(), Some(now + 120));
    assert_eq!(s.grant("nope").unwrap(), None);
}

/// A grant decision applies only to the state and body it was made on.
pub fn a_grant_decision_applies_only_to_the_state_it_was_made_on(s: &dyn Store) {
    s.insert_grant("g", GrantState::Pending, 0, "{}").unwrap();
    let (p, a, r) = (GrantState::Pending, GrantState::Active, GrantState::Revoked);
    assert!(s.update_grant("g", p, "{}", a, 60, "{\"v\":1}").unwrap());
    assert!(!s.update_grant("g", p, "{}", r, 0, "{}").unwrap(), "stale");
    assert_eq!(s.grant("g").unwrap().as_deref(), Some("{\"v\":1}"));
    assert!(s.update_grant("g", a, "{\"v\":1}", r, 60, "{}").unwrap());
    assert!(!s.update_grant("nope", p, "{}", a, 60, "{}").unwrap());
}

/// A decision that leaves the state as it was (one of two approvals: pending to pending) still
/// applies only to the body it was made on: a second one made on the same read is refused
/// instead of overwriting the first.
pub fn a_grant_decision_made_on_a_stale_body_is_refused_even_in_the_same_state(s: &dyn Store) {
    let p = GrantState::Pending;
    s.insert_grant("g", p, 0, "{\"approved_by\":[]}").unwrap();
    let seen = s.grant("g").unwrap().unwrap();
    let bob = "{\"approved_by\":[\"bob\"]}";
    assert!(s.update_grant("g", p, &seen, p, 0, bob).unwrap());
    let carol = "{\"approved_by\":[\"carol\"]}";
    assert!(
        !s.update_grant("g", p, &seen, p, 0, carol).unwrap(),
        "made on a body that is no longer stored"
    );
    assert_eq!(s.grant("g").unwrap().as_deref(), Some(bob));
}

/// Control-plane events are sequenced on the store's own chain, which verifies.
pub fn events_are_sequenced_on_a_chain_that_verifies(s: &dyn Store) {
    init(s);
    assert_eq!(s.last_own_kind().unwrap(), None);
    let now = OffsetDateTime::now_utc();
    let a = s.append_event(now, "x", "{\"n\":1}").unwrap();
    let b = s.append_event(now, "y", "not json").unwrap();
    assert_eq!(b, a + 1);
    let c = s
        .append_own(now, "ca.test", &|seq, prev| {
            let mut m = serde_json::Map::new();
            m.insert("signed".into(), format!("{seq}/{prev}").into());
            m
        })
        .unwrap();
    assert_eq!(c, b + 1);
    let ev = s.events_after(a, 10).unwrap();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[0].kind, "y");
    assert!(ev[0].detail.contains("not json"));
    assert_eq!(s.last_own_kind().unwrap().as_deref(), Some("ca.test"));
    let chain = s.own_chain().unwrap().unwrap();
    assert_eq!(s.audit_chains().unwrap(), std::slice::from_ref(&chain));
    let lines = s.audit_lines(&chain).unwrap();
    let summary =
        crate::identity::audit::verify_lines(&chain, lines.iter().map(Vec::as_slice), None)
            .unwrap();
    assert_eq!(summary.records, 3);
    let rows = s.audit_rows(&chain).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2].line, lines[2]);
    let after = s.audit_after(0, 10).unwrap();
    assert_eq!(after.len(), 3);
    assert_eq!(s.audit_after(after[1].0, 10).unwrap().len(), 1);
}

/// A chain of `n` records from `source`, as a sidecar writes it.
pub fn chain_rows(source: &str, epoch: &str, n: u64, kind: &str) -> (String, Vec<AuditRow>) {
    use crate::identity::audit::{GENESIS, Record, VERSION, line_hash};
    let chain = format!("{source}#{epoch}");
    let mut prev = GENESIS.to_owned();
    let mut rows = Vec::new();
    for seq in 1..=n {
        let mut fields = serde_json::Map::new();
        fields.insert("direction".into(), "inbound".into());
        fields.insert("peer_id".into(), "spiffe://mayfly.local/caller".into());
        fields.insert("local_id".into(), source.into());
        fields.insert(
            "decision".into(),
            if seq % 2 == 0 { "deny" } else { "allow" }.into(),
        );
        let rec = Record {
            v: VERSION,
            source: source.to_owned(),
            epoch: epoch.to_owned(),
            seq,
            prev: prev.clone(),
            ts_ms: 1_700_000_000_000 + seq as i64,
            kind: kind.to_owned(),
            fields,
        };
        let line = rec.line();
        let hash = line_hash(&line);
        rows.push(AuditRow {
            chain: chain.clone(),
            seq,
            prev: prev.clone(),
            hash: hash.clone(),
            source: source.to_owned(),
            ts_ms: rec.ts_ms,
            kind: kind.to_owned(),
            line,
        });
        prev = hash;
    }
    (chain, rows)
}

/// Audit batches continue their chain; a redelivery is stored once; gaps and divergences are
/// refused with what the store expects.
pub fn audit_batches_continue_their_chain_exactly_once(s: &dyn Store) {
    let (chain, rows) = chain_rows("spiffe://mayfly.local/web", "e1", 6, "http.request");
    assert_eq!(s.audit_append(&chain, &rows[..3]).unwrap(), Ok(3));
    assert_eq!(
        s.audit_append(&chain, &rows[..4]).unwrap(),
        Ok(4),
        "redelivery"
    );
    assert_eq!(
        s.audit_append(&chain, &rows[5..]).unwrap(),
        Err(AuditConflict::Gap {
            chain: chain.clone(),
            expected: 5
        })
    );
    let mut forged = rows[1].clone();
    forged.hash = "f".repeat(64);
    assert_eq!(
        s.audit_append(&chain, &[forged]).unwrap(),
        Err(AuditConflict::Diverged {
            chain: chain.clone(),
            seq: 2
        })
    );
    assert_eq!(s.audit_append(&chain, &rows[4..]).unwrap(), Ok(6));
    assert_eq!(s.audit_lines(&chain).unwrap().len(), 6);
    let denies = s
        .audit_query(&AuditFilter {
            decision: Some("deny".into()),
            source: Some("spiffe://mayfly.local/caller".into()),
            kind: Some("http.request".into()),
            limit: 100,
            ..AuditFilter::default()
        })
        .unwrap();
    assert_eq!(denies.len(), 3);
    let window = s
        .audit_query(&AuditFilter {
            since_ms: Some(1_700_000_000_002),
            until_ms: Some(1_700_000_000_004),
            limit: 100,
            ..AuditFilter::default()
        })
        .unwrap();
    assert_eq!(window.len(), 2);
    assert_eq!(window[0], rows[1].line);
}

/// Settings are stored and replaced; a probe write succeeds and the store says it can write.
pub fn settings_replace_and_a_probe_write_succeeds(s: &dyn Store) {
    assert_eq!(s.setting("k").unwrap(), None);
    s.set_setting("k", "1").unwrap();
    s.set_setting("k", "2").unwrap();
    assert_eq!(s.setting("k").unwrap().as_deref(), Some("2"));
    s.probe_write().unwrap();
    assert_eq!(s.unwritable(), None);
    let now = OffsetDateTime::now_utc();
    s.log_issued(&IssuedRecord {
        serial: "aa".into(),
        spiffe_id: "spiffe://mayfly.local/x".into(),
        not_after: now,
        issued_at: now,
        requester: "self".into(),
    })
    .unwrap();
    assert_eq!(s.list_issued(10).unwrap()[0].serial, "aa");
}

fn authorities() -> Authorities {
    Authorities::init(
        parse_trust_domain("mayfly.local").unwrap(),
        AuthorityConfig::default(),
        OffsetDateTime::now_utc(),
    )
    .unwrap()
}

fn addrs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Each write of shared state moves its change counter (and a write that changes nothing
/// does not), so replicas polling the counters see every change.
pub fn change_counters_move_with_each_shared_write(s: &dyn Store) {
    let c0 = s.changes().unwrap();
    s.insert_grant("g1", GrantState::Pending, 0, "{}").unwrap();
    let c1 = s.changes().unwrap();
    assert!(c1.grants > c0.grants, "{c0:?} {c1:?}");
    assert!(
        !s.update_grant("g1", GrantState::Active, "{}", GrantState::Revoked, 0, "{}")
            .unwrap()
    );
    assert_eq!(s.changes().unwrap(), c1, "a refused decision is no change");
    assert!(
        s.update_grant("g1", GrantState::Pending, "{}", GrantState::Active, 9, "{}")
            .unwrap()
    );
    let c2 = s.changes().unwrap();
    assert!(c2.grants > c1.grants);
    assert!(s.expire_grants(10).unwrap().len() == 1);
    let c3 = s.changes().unwrap();
    assert!(c3.grants > c2.grants);
    assert_eq!(
        s.register_endpoints("spiffe://mayfly.local/a", &addrs(&["10.0.0.1:1"]), 5_000, 0)
            .unwrap(),
        addrs(&["10.0.0.1:1"])
    );
    let c4 = s.changes().unwrap();
    assert!(c4.endpoints > c3.endpoints);
    s.register_endpoints(
        "spiffe://mayfly.local/a",
        &addrs(&["10.0.0.1:1"]),
        9_000,
        1_000,
    )
    .unwrap();
    assert_eq!(s.changes().unwrap(), c4, "a lease refresh is no change");
    let now = OffsetDateTime::now_utc();
    assert!(s.publish_policy("v1", "# one", now, "test").unwrap());
    let c5 = s.changes().unwrap();
    assert!(c5.policy > c4.policy);
    assert!(!s.publish_policy("v1", "# one", now, "test").unwrap());
    assert_eq!(
        s.changes().unwrap(),
        c5,
        "the same version again is no change"
    );
    s.save_authorities(&authorities()).unwrap();
    let c6 = s.changes().unwrap();
    assert!(c6.authorities > c5.authorities);
    assert_eq!(
        (c6.grants, c6.endpoints, c6.policy),
        (c5.grants, c5.endpoints, c5.policy)
    );
}

/// An endpoint keeps its first registration time while refreshed; removal and the sweep
/// report only what was there, each once.
pub fn endpoints_are_leased_refreshed_removed_and_swept_once(s: &dyn Store) {
    const A: &str = "spiffe://mayfly.local/a";
    const B: &str = "spiffe://mayfly.local/b";
    let new = s
        .register_endpoints(A, &addrs(&["10.0.0.1:1", "10.0.0.2:1"]), 10_000, 0)
        .unwrap();
    assert_eq!(new.len(), 2);
    s.register_endpoints(B, &addrs(&["10.0.0.3:1"]), 30_000, 0)
        .unwrap();
    // Refreshed before its lease ends: not new, first registration kept.
    assert!(
        s.register_endpoints(A, &addrs(&["10.0.0.1:1"]), 20_000, 5_000)
            .unwrap()
            .is_empty()
    );
    // Re-registered after its lease ended: new again, from now.
    assert_eq!(
        s.register_endpoints(A, &addrs(&["10.0.0.2:1"]), 25_000, 12_000)
            .unwrap(),
        addrs(&["10.0.0.2:1"])
    );
    let rows = s.endpoints().unwrap();
    assert_eq!(rows.len(), 3);
    let one = rows.iter().find(|r| r.address == "10.0.0.1:1").unwrap();
    assert_eq!(
        (one.spiffe_id.as_str(), one.since_ms, one.until_ms),
        (A, 0, 20_000)
    );
    let two = rows.iter().find(|r| r.address == "10.0.0.2:1").unwrap();
    assert_eq!(two.since_ms, 12_000);
    // Only the caller's own, and only what was there.
    assert!(
        s.remove_endpoints(B, &addrs(&["10.0.0.1:1"]), 13_000)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.remove_endpoints(A, &addrs(&["10.0.0.1:1", "10.0.0.9:1"]), 13_000)
            .unwrap(),
        addrs(&["10.0.0.1:1"])
    );
    assert!(s.sweep_endpoints(24_999).unwrap().is_empty());
    assert_eq!(
        s.sweep_endpoints(25_000).unwrap(),
        vec![(A.to_owned(), "10.0.0.2:1".to_owned())]
    );
    assert!(
        s.sweep_endpoints(25_000).unwrap().is_empty(),
        "reported once"
    );
    assert_eq!(s.endpoints().unwrap().len(), 1);
}

/// The newest published policy is the one served; publishing it again changes nothing.
pub fn the_newest_published_policy_is_served(s: &dyn Store) {
    assert_eq!(s.policy().unwrap(), None);
    let now = OffsetDateTime::now_utc();
    assert!(s.publish_policy("v1", "# one", now, "a").unwrap());
    assert!(s.publish_policy("v2", "# two", now, "b").unwrap());
    let p = s.policy().unwrap().unwrap();
    assert_eq!((p.version.as_str(), p.source.as_str()), ("v2", "# two"));
    assert_eq!(p.published_by, "b");
    assert_eq!(p.published_at, now.unix_timestamp());
    // Going back to an older version is a new publication, and wins.
    assert!(s.publish_policy("v1", "# one", now, "a").unwrap());
    assert_eq!(s.policy().unwrap().unwrap().version, "v1");
}

/// An authority set is replaced only over the one it was derived from.
pub fn authorities_are_replaced_only_over_the_set_seen(s: &dyn Store) {
    let a = authorities();
    s.save_authorities(&a).unwrap();
    let seen = s.changes().unwrap().authorities;
    let b = authorities();
    let n = s.replace_authorities(&b, seen).unwrap().unwrap();
    assert_eq!(s.changes().unwrap().authorities, n);
    assert_eq!(s.replace_authorities(&a, seen).unwrap(), None, "stale");
    let now = s
        .load_authorities(AuthorityConfig::default())
        .unwrap()
        .unwrap();
    assert_eq!(now.signer().unwrap().cert, b.signer().unwrap().cert);
}

/// A sign-in is found by its SPIFFE ID and replaced by the next one of the same person.
pub fn a_user_session_is_kept_per_person_and_replaced_by_the_next(s: &dyn Store) {
    let id = "spiffe://mayfly.local/user/alice";
    assert_eq!(s.user_session(id).unwrap(), None);
    let first = UserSession {
        spiffe_id: id.into(),
        issuer: "https://idp.example".into(),
        subject: "alice".into(),
        groups: vec!["oncall".into(), "db-admins".into()],
        signed_in_at: 1_000,
        expires_at: 4_600,
    };
    s.put_user_session(&first).unwrap();
    assert_eq!(s.user_session(id).unwrap().as_ref(), Some(&first));
    assert!(first.is_valid_at(4_599) && !first.is_valid_at(4_600));
    let next = UserSession {
        groups: vec![],
        signed_in_at: 5_000,
        expires_at: 8_600,
        ..first.clone()
    };
    s.put_user_session(&next).unwrap();
    assert_eq!(s.user_session(id).unwrap(), Some(next));
    assert_eq!(
        s.user_session("spiffe://mayfly.local/user/bob").unwrap(),
        None
    );
}

/// Every single-store case, by name.
pub fn cases() -> Vec<(&'static str, Case)> {
    vec![
        ("authorities_round_trip", authorities_round_trip),
        (
            "tokens_are_single_use_and_refusals_say_why",
            tokens_are_single_use_and_refusals_say_why,
        ),
        (
            "a_token_is_spent_only_if_its_svid_is_logged",
            a_token_is_spent_only_if_its_svid_is_logged,
        ),
        (
            "only_grants_in_force_are_live_and_each_expiry_is_reported_once",
            only_grants_in_force_are_live_and_each_expiry_is_reported_once,
        ),
        (
            "a_grant_decision_applies_only_to_the_state_it_was_made_on",
            a_grant_decision_applies_only_to_the_state_it_was_made_on,
        ),
        (
            "a_grant_decision_made_on_a_stale_body_is_refused_even_in_the_same_state",
            a_grant_decision_made_on_a_stale_body_is_refused_even_in_the_same_state,
        ),
        (
            "events_are_sequenced_on_a_chain_that_verifies",
            events_are_sequenced_on_a_chain_that_verifies,
        ),
        (
            "audit_batches_continue_their_chain_exactly_once",
            audit_batches_continue_their_chain_exactly_once,
        ),
        (
            "settings_replace_and_a_probe_write_succeeds",
            settings_replace_and_a_probe_write_succeeds,
        ),
        (
            "change_counters_move_with_each_shared_write",
            change_counters_move_with_each_shared_write,
        ),
        (
            "endpoints_are_leased_refreshed_removed_and_swept_once",
            endpoints_are_leased_refreshed_removed_and_swept_once,
        ),
        (
            "the_newest_published_policy_is_served",
            the_newest_published_policy_is_served,
        ),
        (
            "authorities_are_replaced_only_over_the_set_seen",
            authorities_are_replaced_only_over_the_set_seen,
        ),
        (
            "a_user_session_is_kept_per_person_and_replaced_by_the_next",
            a_user_session_is_kept_per_person_and_replaced_by_the_next,
        ),
    ]
}

/// Runs `f` on `n` threads at once (released together), returning their results.
fn race<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let gate = std::sync::Barrier::new(n);
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..n)
            .map(|i| {
                let (gate, f) = (&gate, &f);
                scope.spawn(move || {
                    gate.wait();
                    f(i)
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

/// A join token spent concurrently through two replicas is won exactly once.
pub fn a_token_spent_through_two_replicas_is_won_exactly_once(a: &dyn Store, b: &dyn Store) {
    init(a);
    for round in 0..5 {
        let id = format!("t{round}");
        a.insert_token(&token(&id, &format!("h{round}"), 600))
            .unwrap();
        let outcomes = race(8, |i| {
            let s = if i % 2 == 0 { a } else { b };
            spend(s, &format!("{round}-{i}"), &id, &format!("h{round}")).unwrap()
        });
        assert_eq!(
            outcomes.iter().filter(|o| o.is_ok()).count(),
            1,
            "{outcomes:?}"
        );
        assert!(
            outcomes
                .iter()
                .all(|o| o.is_ok() || *o == Err(TokenRefusal::Used(id.clone()))),
            "{outcomes:?}"
        );
    }
    assert_eq!(b.list_issued(100).unwrap().len(), 5);
    // The control plane's own chain took one event per issuance, in order, from both.
    let chain = b.own_chain().unwrap().unwrap();
    let lines = a.audit_lines(&chain).unwrap();
    assert_eq!(lines.len(), 5);
    crate::identity::audit::verify_lines(&chain, lines.iter().map(Vec::as_slice), None).unwrap();
}

/// The same audit batch appended through two replicas at once is stored once, and both are
/// told the chain's head.
pub fn an_audit_batch_delivered_to_two_replicas_is_stored_once(a: &dyn Store, b: &dyn Store) {
    for round in 0..5 {
        let (chain, rows) = chain_rows(
            "spiffe://mayfly.local/web",
            &format!("e{round}"),
            20,
            "http.request",
        );
        let outcomes = race(4, |i| {
            let s = if i % 2 == 0 { a } else { b };
            s.audit_append(&chain, &rows).unwrap()
        });
        assert!(outcomes.iter().all(|o| *o == Ok(20)), "{outcomes:?}");
        assert_eq!(b.audit_rows(&chain).unwrap().len(), 20);
    }
}

/// An approve and a revoke of one grant racing on two replicas: exactly one wins, the other
/// is told it lost.
pub fn a_racing_approve_and_revoke_on_two_replicas_have_one_winner(a: &dyn Store, b: &dyn Store) {
    for round in 0..10 {
        let id = format!("g{round}");
        a.insert_grant(&id, GrantState::Pending, 0, "{}").unwrap();
        let outcomes = race(2, |i| {
            let (s, to, body) = if i == 0 {
                (a, GrantState::Active, "{\"by\":\"a\"}")
            } else {
                (b, GrantState::Denied, "{\"by\":\"b\"}")
            };
            s.update_grant(&id, GrantState::Pending, "{}", to, 60, body)
                .unwrap()
        });
        assert_eq!(outcomes.iter().filter(|w| **w).count(), 1, "{outcomes:?}");
        let body = a.grant(&id).unwrap().unwrap();
        let winner = if outcomes[0] { "a" } else { "b" };
        assert!(body.contains(winner), "{body} after {outcomes:?}");
    }
}

/// Two approvals of one request racing on two replicas, each leaving it pending (one of three
/// approvals): exactly one applies, the other is told it lost and nothing is overwritten.
pub fn two_approvals_racing_on_two_replicas_never_overwrite_each_other(
    a: &dyn Store,
    b: &dyn Store,
) {
    for round in 0..10 {
        let id = format!("p{round}");
        a.insert_grant(&id, GrantState::Pending, 0, "[]").unwrap();
        let outcomes = race(2, |i| {
            let (s, body) = if i == 0 {
                (a, "[\"a\"]")
            } else {
                (b, "[\"b\"]")
            };
            s.update_grant(&id, GrantState::Pending, "[]", GrantState::Pending, 0, body)
                .unwrap()
        });
        assert_eq!(outcomes.iter().filter(|w| **w).count(), 1, "{outcomes:?}");
        let winner = if outcomes[0] { "[\"a\"]" } else { "[\"b\"]" };
        assert_eq!(
            b.grant(&id).unwrap().as_deref(),
            Some(winner),
            "{outcomes:?}"
        );
    }
}

/// Two replicas rotating at once over the same set: exactly one saves.
pub fn a_rotation_racing_on_two_replicas_is_saved_once(a: &dyn Store, b: &dyn Store) {
    for _ in 0..5 {
        let seen = a.changes().unwrap().authorities;
        let sets = [authorities(), authorities()];
        let outcomes = race(2, |i| {
            let s = if i == 0 { a } else { b };
            s.replace_authorities(&sets[i], seen).unwrap()
        });
        assert_eq!(
            outcomes.iter().filter(|o| o.is_some()).count(),
            1,
            "{outcomes:?}"
        );
        let winner = usize::from(outcomes[0].is_none());
        // Read through the winner (the test's replicas may hold different KEKs).
        let stored = [a, b][winner]
            .load_authorities(AuthorityConfig::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            stored.signer().unwrap().cert,
            sets[winner].signer().unwrap().cert
        );
        assert_eq!(Some(b.changes().unwrap().authorities), outcomes[winner]);
    }
}

/// An endpoint registered through one replica is seen by the other, and its expiry swept by
/// both at once is reported once.
pub fn an_endpoint_expiry_swept_by_two_replicas_is_reported_once(a: &dyn Store, b: &dyn Store) {
    for round in 0..5i64 {
        let base = round * 100_000;
        let list: Vec<String> = (1..=10).map(|p| format!("10.0.0.1:{p}")).collect();
        a.register_endpoints("spiffe://mayfly.local/a", &list, base + 1_000, base)
            .unwrap();
        assert_eq!(b.endpoints().unwrap().len(), 10);
        let swept = race(4, |i| {
            let s = if i % 2 == 0 { a } else { b };
            s.sweep_endpoints(base + 1_000).unwrap()
        });
        assert_eq!(swept.iter().map(Vec::len).sum::<usize>(), 10, "{swept:?}");
        assert!(a.endpoints().unwrap().is_empty());
    }
}

/// Every replica case, by name.
pub fn replica_cases() -> Vec<(&'static str, ReplicaCase)> {
    vec![
        (
            "a_token_spent_through_two_replicas_is_won_exactly_once",
            a_token_spent_through_two_replicas_is_won_exactly_once,
        ),
        (
            "an_audit_batch_delivered_to_two_replicas_is_stored_once",
            an_audit_batch_delivered_to_two_replicas_is_stored_once,
        ),
        (
            "a_racing_approve_and_revoke_on_two_replicas_have_one_winner",
            a_racing_approve_and_revoke_on_two_replicas_have_one_winner,
        ),
        (
            "two_approvals_racing_on_two_replicas_never_overwrite_each_other",
            two_approvals_racing_on_two_replicas_never_overwrite_each_other,
        ),
        (
            "a_rotation_racing_on_two_replicas_is_saved_once",
            a_rotation_racing_on_two_replicas_is_saved_once,
        ),
        (
            "an_endpoint_expiry_swept_by_two_replicas_is_reported_once",
            an_endpoint_expiry_swept_by_two_replicas_is_reported_once,
        ),
    ]
}
