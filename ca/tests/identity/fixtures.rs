//! go-spiffe's fixture SVIDs: each broken one is refused for the reason its name gives.

use mayfly_ca::bundle::{BundleSet, TrustBundle};
use mayfly_ca::id::parse_trust_domain;
use mayfly_ca::svid::{ProfileError, check_ca, check_leaf};
use mayfly_ca::verify::{Usage, VerifyError, algorithms, verify_chain};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::fixture;

fn certs(name: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(fixture(name))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

#[test]
fn good_fixture_leaves_pass_the_profile() {
    for f in [
        "x509svid/good-leaf-only.pem",
        "x509svid/good-leaf-and-intermediate.pem",
    ] {
        let info = check_leaf(&certs(f)[0]).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(info.id.to_string(), "spiffe://example.org/workload-1");
    }
}

#[test]
fn broken_fixture_leaves_fail_for_the_named_reason() {
    type Expect = fn(&ProfileError) -> bool;
    let cases: [(&str, Expect); 5] = [
        ("wrong-leaf-ca-true.pem", |e| {
            matches!(e, ProfileError::LeafIsCa)
        }),
        ("wrong-leaf-cert-sign.pem", |e| {
            matches!(e, ProfileError::LeafKeyCertSign)
        }),
        ("wrong-leaf-crl-sign.pem", |e| {
            matches!(e, ProfileError::LeafCrlSign)
        }),
        ("wrong-leaf-empty-id.pem", |e| {
            matches!(e, ProfileError::NoUriSan | ProfileError::BadId(_))
        }),
        ("wrong-leaf-no-digital-signature.pem", |e| {
            matches!(e, ProfileError::NoDigitalSignature)
        }),
    ];
    for (f, ok) in cases {
        let err = check_leaf(&certs(&format!("x509svid/{f}"))[0]).expect_err(f);
        assert!(ok(&err), "{f}: unexpected {err}");
    }
}

#[test]
fn broken_fixture_intermediates_are_not_cas() {
    for f in [
        "wrong-intermediate-no-ca.pem",
        "wrong-intermediate-no-key-cert-sign.pem",
    ] {
        let chain = certs(&format!("x509svid/{f}"));
        assert!(chain.len() >= 2, "{f}");
        assert!(
            check_ca(&chain[1]).is_err(),
            "{f}: intermediate must fail the CA profile"
        );
    }
}

#[test]
fn fixture_chain_verifies_at_a_time_inside_its_validity_only() {
    let chain = certs("x509svid/good-leaf-and-intermediate.pem");
    // The intermediate is signed by a root we do not have: treat the intermediate as the root
    // of example.org to exercise path building at a fixed time.
    let td = parse_trust_domain("example.org").unwrap();
    let bundle = TrustBundle::new(
        td,
        vec![chain[1].clone()],
        1,
        std::time::Duration::from_secs(60),
    );
    let Ok(bundle) = bundle else { return };
    let set = BundleSet::single(bundle);
    let inside = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_585_059_000)); // 2020-03-24 14:10Z
    let outside = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_700_000_000));
    let algs = algorithms();
    verify_chain(&chain[..1], &set, inside, Usage::Client, &algs).unwrap();
    assert!(matches!(
        verify_chain(&chain[..1], &set, outside, Usage::Client, &algs),
        Err(VerifyError::Expired(_))
    ));
}

#[test]
fn corrupt_fixtures_are_refused() {
    let corrupt = std::fs::read(fixture("x509svid/corrupt-cert.pem")).unwrap();
    let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&corrupt).collect();
    match parsed {
        Err(_) => {}
        Ok(list) => {
            for c in list {
                assert!(check_leaf(&c).is_err());
            }
        }
    }
}
