#![allow(clippy::unwrap_used)]
use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::json;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::testing::TestIssuer;
use super::*;
use crate::identity::id::parse_trust_domain;

const ISS: &str = "https://kubernetes.default.svc.cluster.local";
const NOW: i64 = 1_800_000_000;

fn issuer() -> &'static TestIssuer {
    static I: OnceLock<TestIssuer> = OnceLock::new();
    I.get_or_init(|| TestIssuer::new(ISS))
}

fn attestor() -> K8sAttestor {
    K8sAttestor::from_jwks(&issuer().jwks(), ISS).unwrap()
}

fn td() -> TrustDomain {
    parse_trust_domain("mayfly.local").unwrap()
}

fn verify(a: &K8sAttestor, token: &str, now: i64) -> Result<Attested, AttestError> {
    a.verify(token, &td(), now)
}

fn reason(token: &str) -> &'static str {
    verify(&attestor(), token, NOW).unwrap_err().reason()
}

#[test]
fn rs256_and_es256_tokens_prove_the_namespace_and_service_account() {
    let i = issuer();
    let c = i.claims("shop", "orders", NOW);
    for t in [i.rs256(&c), i.es256(&c)] {
        let a = verify(&attestor(), &t, NOW).unwrap();
        assert_eq!(a.id.to_string(), "spiffe://mayfly.local/ns/shop/sa/orders");
        assert_eq!(a.pod.as_deref(), Some("orders-7d9f8-abcde"));
        assert_eq!(a.expires_at, NOW + 600);
    }
    // A string audience and no sub are fine too; a token within the leeway is accepted.
    let mut c = i.claims("default", "default", NOW);
    c["aud"] = json!("mayfly");
    c.as_object_mut().unwrap().remove("sub");
    assert!(verify(&attestor(), &i.rs256(&c), NOW + 600 + 20).is_ok());
}

#[test]
fn every_bad_token_is_refused_with_its_reason() {
    let i = issuer();
    let good = i.claims("shop", "orders", NOW);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        f(&mut c);
        i.rs256(&c)
    };
    assert_eq!(
        reason(&with(&|c| c["exp"] = json!(NOW - 31))),
        "k8s_token_expired"
    );
    assert_eq!(
        reason(&with(&|c| c["nbf"] = json!(NOW + 120))),
        "k8s_not_yet_valid"
    );
    assert_eq!(
        reason(&with(&|c| c["iat"] = json!(NOW + 120))),
        "k8s_not_yet_valid"
    );
    assert_eq!(
        reason(&with(
            &|c| c["aud"] = json!(["https://kubernetes.default.svc"])
        )),
        "k8s_wrong_audience"
    );
    assert_eq!(
        reason(&with(&|c| c["iss"] = json!("https://evil.example"))),
        "k8s_wrong_issuer"
    );
    assert_eq!(
        reason(&with(&|c| {
            c.as_object_mut().unwrap().remove("exp");
        })),
        "k8s_malformed"
    );
    assert_eq!(
        reason(&with(&|c| {
            c.as_object_mut().unwrap().remove("kubernetes.io");
        })),
        "k8s_malformed"
    );
    assert_eq!(
        reason(&with(
            &|c| c["sub"] = json!("system:serviceaccount:shop:admin")
        )),
        "k8s_malformed"
    );
    assert_eq!(
        reason(&with(&|c| c["kubernetes.io"]["namespace"] = json!("a/../b"))),
        "k8s_malformed"
    );
    // Forged: the payload changed after signing.
    let t = i.rs256(&good);
    let mut parts: Vec<&str> = t.split('.').collect();
    let mut forged = good.clone();
    forged["kubernetes.io"]["serviceaccount"]["name"] = json!("admin");
    forged["sub"] = json!("system:serviceaccount:shop:admin");
    let p = URL_SAFE_NO_PAD.encode(forged.to_string());
    parts[1] = &p;
    assert_eq!(reason(&parts.join(".")), "k8s_bad_signature");
    // Signed by another issuer's key with the same kid.
    let other = TestIssuer::new(ISS);
    assert_eq!(reason(&other.rs256(&good)), "k8s_bad_signature");
    assert_eq!(reason(&other.es256(&good)), "k8s_bad_signature");
    // A kid not in the set; an algorithm the key does not suit.
    let t = i.sign_raw(&json!({"alg": "RS256", "kid": "rotated-away"}), &good);
    assert_eq!(reason(&t), "k8s_unknown_key");
    let t = i.sign_raw(&json!({"alg": "ES256", "kid": "rsa-1"}), &good);
    assert_eq!(reason(&t), "k8s_unknown_key");
    // alg none, HMAC, crit: refused before any key is tried.
    for h in [
        json!({"alg": "none"}),
        json!({"alg": "HS256", "kid": "rsa-1"}),
        json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}),
    ] {
        let t = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(h.to_string()),
            URL_SAFE_NO_PAD.encode(good.to_string())
        );
        assert_eq!(reason(&t), "k8s_malformed", "{h}");
    }
    for junk in [
        "",
        "a.b",
        "a.b.c.d",
        "!!.!!.!!",
        &"a".repeat(MAX_TOKEN_LEN + 1),
    ] {
        assert_eq!(reason(junk), "k8s_malformed", "{junk:.20}");
    }
}

#[test]
fn jwks_files_are_checked_and_reloaded_when_they_change() {
    assert!(matches!(
        K8sAttestor::from_jwks("{\"keys\": []}", ISS),
        Err(JwksError::Empty)
    ));
    assert!(K8sAttestor::from_jwks("nope", ISS).is_err());
    assert!(matches!(
        K8sAttestor::from_jwks(&issuer().jwks(), " "),
        Err(JwksError::NoIssuer)
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let other = TestIssuer::new(ISS);
    std::fs::write(&path, other.jwks()).unwrap();
    let a = K8sAttestor::load(&path, ISS).unwrap();
    let t = issuer().es256(&issuer().claims("a", "b", NOW));
    assert_eq!(
        verify(&a, &t, NOW).unwrap_err().reason(),
        "k8s_bad_signature"
    );
    std::fs::write(&path, issuer().jwks()).unwrap();
    let later = SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert!(verify(&a, &t, NOW).is_ok());
    // A broken rewrite keeps the last good keys.
    std::fs::write(&path, "garbage").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(later + std::time::Duration::from_secs(5))
        .unwrap();
    assert!(verify(&a, &t, NOW).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn hostile_tokens_never_panic(s in "\\PC{0,300}") {
        let _ = verify(&attestor(), &s, NOW);
    }

    #[test]
    fn hostile_jwt_parts_never_panic(h in prop::collection::vec(any::<u8>(), 0..80),
                                     p in prop::collection::vec(any::<u8>(), 0..200),
                                     sig in prop::collection::vec(any::<u8>(), 0..300)) {
        let t = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(h), URL_SAFE_NO_PAD.encode(p), URL_SAFE_NO_PAD.encode(sig));
        let _ = verify(&attestor(), &t, NOW);
    }

    #[test]
    fn hostile_json_headers_never_panic(alg in "(RS256|ES256|none|\\PC{0,8})", kid in proptest::option::of("\\PC{0,10}")) {
        let h = json!({"alg": alg, "kid": kid});
        let t = format!("{}.{}.AAAA", URL_SAFE_NO_PAD.encode(h.to_string()), URL_SAFE_NO_PAD.encode("{}"));
        let _ = verify(&attestor(), &t, NOW);
    }
}
