#![allow(clippy::unwrap_used)]
use super::*;

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

/// The behaviour every store has (the same cases run on PostgreSQL in the end-to-end tests).
#[test]
fn every_conformance_case_holds_on_sqlite() {
    for (name, case) in crate::server::store::conformance::cases() {
        eprintln!("case {name}");
        case(&SqliteStore::in_memory().unwrap());
    }
    for (name, case) in crate::server::store::conformance::replica_cases() {
        eprintln!("case {name}");
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        case(&s, &s);
    }
}
