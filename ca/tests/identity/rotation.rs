use mayfly_ca::authority::{Authorities, AuthorityConfig, Change, Role, State};
use mayfly_ca::id::parse_trust_domain;
use time::{Duration, OffsetDateTime};

fn fresh(now: OffsetDateTime) -> Authorities {
    Authorities::init(
        parse_trust_domain("mayfly.local").unwrap(),
        AuthorityConfig::default(),
        now,
    )
    .unwrap()
}

fn states(a: &Authorities, role: Role) -> Vec<State> {
    a.all()
        .iter()
        .filter(|x| x.role == role)
        .map(|x| x.state)
        .collect()
}

#[test]
fn init_makes_an_active_root_and_intermediate_with_distinct_subjects() {
    let now = OffsetDateTime::now_utc();
    let a = fresh(now);
    let root = a.active(Role::Root).unwrap();
    let int = a.active(Role::Intermediate).unwrap();
    assert!((root.not_after - now - Duration::days(365)).abs() < Duration::seconds(5));
    assert!((int.not_after - now - Duration::hours(24)).abs() < Duration::seconds(5));
    let s1 = mayfly_ca::svid::subject(&root.cert).unwrap();
    let s2 = mayfly_ca::svid::subject(&int.cert).unwrap();
    assert_ne!(s1, s2);
    assert_ne!(
        s1,
        mayfly_ca::svid::subject(&fresh(now).active(Role::Root).unwrap().cert).unwrap()
    );
    assert_eq!(
        mayfly_ca::svid::check_ca(&root.cert)
            .unwrap()
            .unwrap()
            .to_string(),
        "spiffe://mayfly.local"
    );
    assert!(mayfly_ca::svid::check_ca(&int.cert).is_ok());
}

#[test]
fn intermediates_rotate_prepared_active_old_and_leave() {
    let t0 = OffsetDateTime::now_utc();
    let mut a = fresh(t0);
    let first = a.signer().unwrap().id.clone();
    assert!(a.tick(t0 + Duration::hours(1)).unwrap().is_empty());
    // Half-life: a successor is prepared, the first still signs.
    let c = a
        .tick(t0 + Duration::hours(12) + Duration::minutes(1))
        .unwrap();
    assert!(
        matches!(c.as_slice(), [Change::Prepared(Role::Intermediate, _)]),
        "{c:?}"
    );
    assert_eq!(a.signer().unwrap().id, first);
    assert_eq!(
        states(&a, Role::Intermediate),
        vec![State::Active, State::Prepared]
    );
    // 5/6 of life: hand over, >= 8 h after preparation.
    let c = a
        .tick(t0 + Duration::hours(20) + Duration::minutes(1))
        .unwrap();
    assert_eq!(c.len(), 2, "{c:?}");
    assert_ne!(a.signer().unwrap().id, first);
    assert_eq!(
        states(&a, Role::Intermediate),
        vec![State::Old, State::Active]
    );
    // The old one leaves when it expires; the new one outlives every SVID the old one signed.
    let c = a
        .tick(t0 + Duration::hours(24) + Duration::minutes(1))
        .unwrap();
    assert!(
        c.iter()
            .any(|c| matches!(c, Change::Removed(Role::Intermediate, x) if *x == first)),
        "{c:?}"
    );
    let left = states(&a, Role::Intermediate);
    assert_eq!(
        left.iter().filter(|s| **s == State::Active).count(),
        1,
        "{left:?}"
    );
    assert!(!left.contains(&State::Old), "{left:?}");
    // Intermediates never change the bundle.
    assert_eq!(a.bundle_sequence(), 1);
}

#[test]
fn roots_rotate_with_overlap_so_a_root_never_expires_under_the_mesh() {
    let t0 = OffsetDateTime::now_utc();
    let mut a = fresh(t0);
    let old_root = a.active(Role::Root).unwrap().id.clone();
    // Walk the clock in 6-hour steps over 13 months, as a running server would.
    let mut t = t0;
    let mut seen_two_roots_before_switch = false;
    while t < t0 + Duration::days(400) {
        t += Duration::hours(6);
        a.tick(t).unwrap();
        let root = a.active(Role::Root).unwrap();
        assert!(root.not_after > t, "active root expired at {t}");
        let int = a.signer().unwrap();
        assert!(int.not_after > t, "active intermediate expired at {t}");
        assert_eq!(
            int.parent.as_deref(),
            Some(root.id.as_str()),
            "intermediate chains to the active root"
        );
        if root.id == old_root && a.bundle_roots(t).len() == 2 {
            seen_two_roots_before_switch = true;
        }
        // Whatever signs now chains to a root in the bundle.
        let roots = a.bundle_roots(t);
        assert!(roots.contains(&root.cert));
    }
    assert!(
        seen_two_roots_before_switch,
        "the next root was published before it signed"
    );
    assert_ne!(a.active(Role::Root).unwrap().id, old_root);
    assert!(a.bundle_sequence() >= 3);
}

#[test]
fn a_ca_that_slept_past_its_intermediates_expiry_recovers() {
    let t0 = OffsetDateTime::now_utc();
    let mut a = fresh(t0);
    let t = t0 + Duration::hours(30);
    a.tick(t).unwrap();
    assert!(a.signer().unwrap().not_after > t);
}

#[test]
fn next_change_is_never_later_than_the_next_rotation() {
    let t0 = OffsetDateTime::now_utc();
    let a = fresh(t0);
    let next = a.next_change_at(t0);
    assert!(next <= t0 + Duration::hours(1));
}

#[test]
fn nonsense_lifetimes_are_refused() {
    let td = parse_trust_domain("mayfly.local").unwrap();
    let bad = AuthorityConfig {
        root_ttl: std::time::Duration::from_secs(3600),
        intermediate_ttl: std::time::Duration::from_secs(7200),
    };
    assert!(Authorities::init(td.clone(), bad, OffsetDateTime::now_utc()).is_err());
    let short = AuthorityConfig {
        intermediate_ttl: std::time::Duration::from_secs(3600),
        ..AuthorityConfig::default()
    };
    assert!(Authorities::init(td, short, OffsetDateTime::now_utc()).is_err());
}

#[test]
fn rotation_changes_read_as_words_in_logs_and_events() {
    assert_eq!(
        Change::Prepared(Role::Intermediate, "i-1".into()).to_string(),
        "prepared intermediate i-1"
    );
    assert_eq!(
        Change::EmergencyRoot("r-2".into()).to_string(),
        "emergency root r-2"
    );
}
