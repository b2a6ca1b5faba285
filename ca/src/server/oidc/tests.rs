#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use super::keys::parse_jwks;
use super::*;

#[test]
fn an_oidc_config_file_takes_defaults_and_refuses_what_it_cannot_honour() {
    let c = OidcConfig::parse(
        "[[oidc]]\nissuer = \"https://idp.example.com\"\nclient_id = \"mayfly-cli\"\n\n[[oidc]]\nissuer = \"http://127.0.0.1:5556\"\nclient_id = \"x\"\nuser_claim = \"preferred_username\"\nsvid_ttl = \"5m\"\n",
        Path::new("oidc.toml"),
    )
    .unwrap();
    assert_eq!(c.issuers.len(), 2);
    assert_eq!(c.issuers[0].user_claim, "sub");
    assert_eq!(c.issuers[0].groups_claim, "groups");
    assert_eq!(c.issuers[0].svid_ttl, MAX_USER_SVID_TTL);
    assert_eq!(c.issuers[1].svid_ttl, Duration::from_secs(300));
    for (bad, why) in [
        (
            "issuer = \"http://idp.example.com\"\nclient_id = \"x\"",
            "https",
        ),
        (
            "issuer = \"https://idp.example.com\"\nclient_id = \"\"",
            "client_id",
        ),
        (
            "issuer = \"https://idp.example.com\"\nclient_id = \"x\"\nsvid_ttl = \"16m\"",
            "15m",
        ),
        (
            "issuer = \"https://idp.example.com\"\nclient_id = \"x\"\nuser_clam = \"sub\"",
            "unknown field",
        ),
    ] {
        let e = OidcConfig::parse(&format!("[[oidc]]\n{bad}\n"), Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
    let mut twice = OidcConfig::default();
    twice
        .add(IssuerConfig::new("https://a.example", "x").unwrap())
        .unwrap();
    assert!(matches!(
        twice.add(IssuerConfig::new("https://a.example", "y").unwrap()),
        Err(ConfigError::Duplicate(_))
    ));
}

#[test]
fn a_jwks_yields_only_public_signing_keys_with_the_algorithms_they_allow() {
    let keys = parse_jwks(
        r#"{"keys":[
          {"kty":"EC","crv":"P-256","kid":"ec","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
          {"kty":"oct","kid":"hmac","k":"c2VjcmV0"},
          {"kty":"EC","crv":"P-256","kid":"enc","use":"enc","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
          {"kty":"EC","crv":"P-256","kid":"lies","alg":"RS256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
        ]}"#,
    )
    .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].kid.as_deref(), Some("ec"));
    assert_eq!(keys[0].algs, vec![jsonwebtoken::Algorithm::ES256]);
    assert!(parse_jwks("{}").is_err());
}

#[test]
fn refusal_reasons_are_the_api_contract() {
    assert_eq!(
        SignInError::WrongIssuer("x".into()).reason(),
        "wrong_issuer"
    );
    assert_eq!(
        SignInError::WrongAudience(vec![]).reason(),
        "wrong_audience"
    );
    assert_eq!(SignInError::Expired(0).reason(), "expired");
    assert_eq!(SignInError::UnknownKey("k".into()).reason(), "unknown_key");
    assert_eq!(SignInError::BadSignature.reason(), "bad_signature");
    assert_eq!(SignInError::Malformed("m".into()).reason(), "malformed");
    assert_eq!(SignInError::NotConfigured.reason(), "not_configured");
    assert_eq!(SignInError::Expired(0).status(), 401);
    assert_eq!(SignInError::NotConfigured.status(), 403);
}
