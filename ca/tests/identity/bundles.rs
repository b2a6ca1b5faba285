use mayfly_ca::bundle::{BundleError, TrustBundle};
use mayfly_ca::id::parse_trust_domain;
use mayfly_ca::testing::TestCa;

use crate::fixture;

#[test]
fn jwks_round_trips_and_follows_the_spiffe_format() {
    let ca = TestCa::new("mayfly.local");
    let b = ca.bundle();
    let json = b.to_jwks();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["use"], "x509-svid");
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["crv"], "P-256");
    assert!(keys[0].get("kid").is_none());
    assert_eq!(keys[0]["x5c"].as_array().unwrap().len(), 1);
    assert_eq!(v["spiffe_sequence"], 1);
    assert!(v["spiffe_refresh_hint"].as_u64().unwrap() > 0);
    let back = TrustBundle::from_jwks(b.trust_domain().clone(), &json).unwrap();
    assert_eq!(back.roots(), b.roots());
    assert_eq!(back.sequence(), b.sequence());
}

#[test]
fn pem_round_trips() {
    let ca = TestCa::new("mayfly.local");
    let b = ca.bundle();
    let back = TrustBundle::from_pem(b.trust_domain().clone(), &b.to_pem()).unwrap();
    assert_eq!(back.roots(), b.roots());
}

#[test]
fn a_bundle_refuses_roots_of_another_trust_domain() {
    let theirs = TestCa::new("other.org");
    let err = TrustBundle::new(
        parse_trust_domain("mayfly.local").unwrap(),
        theirs.bundle().roots().to_vec(),
        1,
        std::time::Duration::from_secs(60),
    )
    .unwrap_err();
    assert!(matches!(err, BundleError::ForeignDomain { .. }), "{err}");
}

#[test]
fn pins_match_only_their_own_root() {
    let a = TestCa::new("mayfly.local").bundle();
    let b = TestCa::new("mayfly.local").bundle();
    let pin = &a.root_pins()[0];
    assert_eq!(pin.len(), 64);
    assert!(a.matches_pin(pin));
    assert!(!b.matches_pin(pin));
}

fn load(name: &str, td: &str) -> Result<TrustBundle, BundleError> {
    let json = std::fs::read_to_string(fixture(&format!("spiffebundle/{name}"))).unwrap();
    TrustBundle::from_jwks(parse_trust_domain(td).unwrap(), &json)
}

#[test]
fn go_spiffe_bundles_parse_or_fail_as_named() {
    assert_eq!(
        load("spiffebundle_valid_1.json", "local")
            .unwrap()
            .roots()
            .len(),
        1
    );
    let v2 = load("spiffebundle_valid_2.json", "local")
        .or_else(|_| load("spiffebundle_valid_2.json", "example.org"));
    assert!(v2.is_ok() || matches!(v2, Err(BundleError::ForeignDomain { .. })));
    let wit = load("spiffebundle_valid_with_wit.json", "local")
        .or_else(|_| load("spiffebundle_valid_with_wit.json", "example.org"));
    assert!(
        !matches!(wit, Err(BundleError::Json(_))),
        "unknown uses are ignored"
    );
    assert!(matches!(
        load("spiffebundle_multiple_x509.json", "local"),
        Err(BundleError::X5cCount { found: 2, .. })
    ));
    assert!(matches!(
        load("spiffebundle_missing_kid.json", "local"),
        Err(BundleError::Json(_))
    ));
    assert!(matches!(
        load("spiffebundle_no_keys.json", "local"),
        Err(BundleError::Json(_))
    ));
}

#[test]
fn pem_fixtures_that_are_not_ca_certificates_or_not_pem_are_refused() {
    let td = || parse_trust_domain("example.org").unwrap();
    for (f, want_empty) in [
        ("not-pem.pem", true),
        ("empty.pem", true),
        ("certs.pem", false),
        ("corrupted.pem", false),
    ] {
        let pem = std::fs::read_to_string(fixture(&format!("x509bundle/{f}"))).unwrap_or_default();
        let err = TrustBundle::from_pem(td(), &pem).expect_err(f);
        if want_empty {
            assert!(matches!(err, BundleError::Empty), "{f}: {err}");
        }
    }
}

#[test]
fn garbage_jwks_never_panics() {
    let td = parse_trust_domain("mayfly.local").unwrap();
    for s in [
        "",
        "{",
        "[]",
        "{\"keys\": 5}",
        "{\"keys\": [{\"use\": \"x509-svid\", \"x5c\": [\"!!\"]}]}",
        "{\"keys\": [{}]}",
    ] {
        assert!(TrustBundle::from_jwks(td.clone(), s).is_err(), "{s}");
    }
}
