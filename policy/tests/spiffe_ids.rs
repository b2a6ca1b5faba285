//! SPIFFE ID validation against the SPIFFE.md vectors, and ID patterns.

use mayfly_policy::{IdError, IdPattern, IdPatternError, validate_spiffe_id};

#[test]
fn valid_ids_from_the_spec_are_accepted() {
    let long = format!("spiffe://td/{}", "a".repeat(2048 - "spiffe://td/".len()));
    for id in [
        "spiffe://example.org/ns/staging/sa/default",
        "spiffe://trustdomain",
        "spiffe://trustdomain/.path",
        "spiffe://trustdomain/...",
        "spiffe://a_b.example/foo",
        "spiffe://1.2.3.4/service",
        "spiffe://example.org/MyService",
        long.as_str(),
    ] {
        assert_eq!(validate_spiffe_id(id), Ok(()), "{id}");
    }
}

#[test]
fn invalid_ids_from_the_spec_are_refused() {
    let long_td = format!("spiffe://{}/a", "a".repeat(256));
    let too_long = format!("spiffe://td/{}", "a".repeat(2048));
    for id in [
        "",
        "spiffe:/",
        "http://td/a",
        "spiffe://",
        "spiffe:///path",
        "spiffe://td/",
        "spiffe://td/path/",
        "spiffe://td//path",
        "spiffe://td/a//b",
        "spiffe://td/.",
        "spiffe://td/./path",
        "spiffe://td/..",
        "spiffe://td/path/../other",
        "spiffe://%62%61%64/path",
        "spiffe://td/%62%61%64",
        "spiffe://td:8080/a",
        "spiffe://u@td/a",
        "spiffe://td/a?q=1",
        "spiffe://td/a#f",
        "spiffe://t$d/a",
        "spiffe://td/a!b",
        "spiffe://[::1]/a",
        "SPIFFE://td/a",
        long_td.as_str(),
        too_long.as_str(),
    ] {
        assert!(validate_spiffe_id(id).is_err(), "{id} should be refused");
    }
}

#[test]
fn uppercase_trust_domain_is_refused_with_the_lowercase_form() {
    assert_eq!(
        validate_spiffe_id("spiffe://Example.org/a"),
        Err(IdError::TrustDomainUppercase("example.org".into()))
    );
}

#[test]
fn patterns_match_exact_prefix_and_trust_domain() {
    let cases = [
        ("spiffe://td/ns/prod/web", "spiffe://td/ns/prod/web", true),
        ("spiffe://td/ns/prod/web", "spiffe://td/ns/prod/web2", false),
        ("spiffe://td/ns/prod/*", "spiffe://td/ns/prod/web", true),
        ("spiffe://td/ns/prod/*", "spiffe://td/ns/prod/a/b", true),
        ("spiffe://td/ns/prod/*", "spiffe://td/ns/prod", false),
        (
            "spiffe://td/ns/prod/*",
            "spiffe://td/ns/production/web",
            false,
        ),
        ("spiffe://td/*", "spiffe://td/anything/at/all", true),
        ("spiffe://td/*", "spiffe://td", false),
        ("spiffe://td/*", "spiffe://td2/a", false),
        ("spiffe://td/*", "spiffe://td.evil/a", false),
    ];
    for (pat, id, want) in cases {
        let p = IdPattern::parse(pat).expect(pat);
        assert_eq!(p.matches(id), want, "{pat} vs {id}");
    }
}

#[test]
fn bad_patterns_are_refused() {
    assert_eq!(
        IdPattern::parse("spiffe://td/a*"),
        Err(IdPatternError::Wildcard)
    );
    assert_eq!(
        IdPattern::parse("spiffe://td/*/b"),
        Err(IdPatternError::Wildcard)
    );
    assert!(IdPattern::parse("spiffe://*").is_err());
    assert!(matches!(
        IdPattern::parse("spiffe://td"),
        Err(IdPatternError::RootId(_))
    ));
    assert!(matches!(
        IdPattern::parse("spiffe://TD/*"),
        Err(IdPatternError::Id(_))
    ));
}
