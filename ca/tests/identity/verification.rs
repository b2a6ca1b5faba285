use mayfly_ca::bundle::BundleSet;
use mayfly_ca::svid::ProfileError;
use mayfly_ca::testing::{Leaf, TestCa};
use mayfly_ca::verify::{Usage, VerifyError, algorithms, verify_chain};
use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose};
use rustls_pki_types::UnixTime;
use time::OffsetDateTime;

const ID: &str = "spiffe://mayfly.local/web";

fn check(
    ca: &TestCa,
    chain: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<String, VerifyError> {
    let set = BundleSet::single(ca.bundle());
    verify_chain(chain, &set, UnixTime::now(), Usage::Client, &algorithms())
        .map(|i| i.id.to_string())
}

fn leaf_err(ca: &TestCa, leaf: Leaf) -> VerifyError {
    let (chain, _) = ca.leaf(&leaf);
    check(ca, &chain).expect_err("must be refused")
}

#[test]
fn a_well_formed_svid_verifies_and_yields_its_id() {
    let ca = TestCa::new("mayfly.local");
    let (chain, _) = ca.svid(ID);
    assert_eq!(check(&ca, &chain).unwrap(), ID);
    // Also as a server certificate.
    let set = BundleSet::single(ca.bundle());
    assert!(verify_chain(&chain, &set, UnixTime::now(), Usage::Server, &algorithms()).is_ok());
}

#[test]
fn two_uri_sans_are_refused() {
    let ca = TestCa::new("mayfly.local");
    let mut l = Leaf::new(ID);
    l.uris.push("spiffe://mayfly.local/other".into());
    assert!(matches!(
        leaf_err(&ca, l),
        VerifyError::Profile(ProfileError::MultipleUriSans(2))
    ));
}

#[test]
fn no_uri_san_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let mut l = Leaf::new(ID);
    l.uris.clear();
    l.dns.push("web.example".into());
    assert!(matches!(
        leaf_err(&ca, l),
        VerifyError::Profile(ProfileError::NoUriSan)
    ));
}

#[test]
fn a_non_spiffe_uri_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let l = Leaf::new("https://mayfly.local/web");
    assert!(matches!(
        leaf_err(&ca, l),
        VerifyError::Profile(ProfileError::BadId(_))
    ));
}

#[test]
fn a_root_path_id_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let l = Leaf::new("spiffe://mayfly.local");
    assert!(matches!(
        leaf_err(&ca, l),
        VerifyError::Profile(ProfileError::RootPathId(_))
    ));
}

#[test]
fn a_ca_leaf_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let mut l = Leaf::new(ID);
    l.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    l.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    assert!(matches!(
        leaf_err(&ca, l),
        VerifyError::Profile(ProfileError::LeafIsCa)
    ));
}

#[test]
fn a_leaf_without_basic_constraints_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let mut l = Leaf::new(ID);
    l.is_ca = IsCa::NoCa;
    assert!(matches!(
        leaf_err(&ca, l),
        VerifyError::Profile(ProfileError::NoBasicConstraints)
    ));
}

#[test]
fn key_cert_sign_on_a_leaf_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let mut l = Leaf::new(ID);
    l.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    assert!(matches!(
        leaf_err(&ca, l),
        VerifyError::Profile(ProfileError::LeafKeyCertSign)
    ));
}

#[test]
fn crl_sign_on_a_leaf_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let mut l = Leaf::new(ID);
    l.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
    assert!(matches!(
        leaf_err(&ca, l),
        VerifyError::Profile(ProfileError::LeafCrlSign)
    ));
}

#[test]
fn a_missing_digital_signature_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let mut l = Leaf::new(ID);
    l.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    assert!(matches!(
        leaf_err(&ca, l),
        VerifyError::Profile(ProfileError::NoDigitalSignature)
    ));
}

#[test]
fn an_expired_svid_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let mut l = Leaf::new(ID);
    let now = OffsetDateTime::now_utc();
    l.not_before = now - time::Duration::minutes(10);
    l.not_after = now - time::Duration::minutes(1);
    assert!(matches!(leaf_err(&ca, l), VerifyError::Expired(_)));
}

#[test]
fn a_not_yet_valid_svid_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let mut l = Leaf::new(ID);
    let now = OffsetDateTime::now_utc();
    l.not_before = now + time::Duration::minutes(1);
    l.not_after = now + time::Duration::minutes(10);
    assert!(matches!(leaf_err(&ca, l), VerifyError::NotYetValid(_)));
}

#[test]
fn a_foreign_trust_domain_is_refused_even_with_a_valid_chain() {
    let ours = TestCa::new("mayfly.local");
    let theirs = TestCa::new("other.org");
    let (chain, _) = theirs.svid("spiffe://other.org/web");
    assert!(matches!(
        check(&ours, &chain),
        Err(VerifyError::UnknownTrustDomain(..))
    ));
}

#[test]
fn bundles_are_never_pooled_across_trust_domains() {
    // other.org's CA signs an SVID claiming an ID in mayfly.local; we hold both bundles.
    let ours = TestCa::new("mayfly.local");
    let theirs = TestCa::new("other.org");
    let (chain, _) = theirs.leaf(&Leaf::new(ID));
    let mut set = BundleSet::single(ours.bundle());
    set.insert(theirs.bundle());
    let err =
        verify_chain(&chain, &set, UnixTime::now(), Usage::Client, &algorithms()).unwrap_err();
    assert!(matches!(err, VerifyError::UnknownIssuer { .. }), "{err}");
}

#[test]
fn a_wrong_signature_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let mut l = Leaf::new(ID);
    l.wrong_key = true;
    let err = leaf_err(&ca, l);
    assert!(
        matches!(
            err,
            VerifyError::BadSignature(_) | VerifyError::UnknownIssuer { .. }
        ),
        "{err}"
    );
}

#[test]
fn a_chain_through_an_unknown_intermediate_is_refused() {
    let ours = TestCa::new("mayfly.local");
    let rogue = TestCa::new("mayfly.local"); // same name, different keys
    let (chain, _) = rogue.svid(ID);
    let err = check(&ours, &chain).unwrap_err();
    assert!(matches!(err, VerifyError::UnknownIssuer { .. }), "{err}");
    assert!(err.to_string().contains("unknown issuer"));
}

#[test]
fn an_empty_chain_is_refused() {
    let ca = TestCa::new("mayfly.local");
    assert!(matches!(check(&ca, &[]), Err(VerifyError::NoCertificate)));
}

#[test]
fn garbage_bytes_are_refused_without_panicking() {
    let ca = TestCa::new("mayfly.local");
    for bytes in [
        vec![],
        vec![0u8; 10],
        vec![0x30, 0x82, 0xff, 0xff],
        b"-----BEGIN".to_vec(),
    ] {
        let chain = vec![rustls_pki_types::CertificateDer::from(bytes)];
        assert!(matches!(
            check(&ca, &chain),
            Err(VerifyError::Profile(ProfileError::Parse(_)))
        ));
    }
}
