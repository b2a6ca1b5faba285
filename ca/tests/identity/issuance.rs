use std::time::Duration;

use mayfly_ca::authority::Role;
use mayfly_ca::id::parse_workload_id;
use mayfly_ca::issue::{IssueError, MAX_CSR_LEN, issue, make_csr, verify_csr};
use mayfly_ca::keys::SecretKey;
use mayfly_ca::svid::check_leaf;
use mayfly_ca::testing::TestCa;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyUsagePurpose, SanType};
use time::OffsetDateTime;

const ID: &str = "spiffe://mayfly.local/orders";

fn csr_with(f: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let key = SecretKey::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(ID.try_into().unwrap())];
    f(&mut p);
    p.serialize_request(&key.key_pair().unwrap())
        .unwrap()
        .der()
        .to_vec()
}

#[test]
fn a_csr_is_signed_into_a_profile_conformant_svid() {
    let ca = TestCa::new("mayfly.local");
    let key = SecretKey::generate().unwrap();
    let id = parse_workload_id(ID).unwrap();
    let csr = verify_csr(&make_csr(&key, &id).unwrap()).unwrap();
    let now = OffsetDateTime::now_utc();
    let svid = issue(
        ca.authorities.signer().unwrap(),
        &csr,
        &id,
        Duration::from_secs(300),
        now,
    )
    .unwrap();
    assert_eq!(svid.chain.len(), 2);
    let info = check_leaf(&svid.chain[0]).unwrap();
    assert_eq!(info.id, id);
    // NotBefore backdated, NotAfter = now + TTL.
    assert!(info.not_before <= now - time::Duration::seconds(29));
    let ttl = info.not_after - now;
    assert!((299..=300).contains(&ttl.whole_seconds()), "{ttl}");
    // At least 64 bits of serial entropy: 16 random bytes.
    assert!(svid.serial.len() >= 30, "{}", svid.serial);
    // The independent parser from the `spiffe` crate accepts it.
    let der: Vec<u8> = svid.chain.iter().flat_map(|c| c.to_vec()).collect();
    let parsed = spiffe::X509Svid::parse_from_der(&der, key.pkcs8()).unwrap();
    assert_eq!(parsed.spiffe_id().to_string(), ID);
}

#[test]
fn the_same_key_reissued_gets_a_different_serial() {
    let ca = TestCa::new("mayfly.local");
    let key = SecretKey::generate().unwrap();
    let id = parse_workload_id(ID).unwrap();
    let csr = verify_csr(&make_csr(&key, &id).unwrap()).unwrap();
    let signer = ca.authorities.signer().unwrap();
    let now = OffsetDateTime::now_utc();
    let a = issue(signer, &csr, &id, Duration::from_secs(60), now).unwrap();
    let b = issue(signer, &csr, &id, Duration::from_secs(60), now).unwrap();
    assert_ne!(a.serial, b.serial);
}

#[test]
fn ttl_is_capped_by_the_signing_ca() {
    let ca = TestCa::new("mayfly.local");
    let signer = ca.authorities.active(Role::Intermediate).unwrap();
    let key = SecretKey::generate().unwrap();
    let id = parse_workload_id(ID).unwrap();
    let csr = verify_csr(&make_csr(&key, &id).unwrap()).unwrap();
    let late = signer.not_after - time::Duration::seconds(100);
    let svid = issue(signer, &csr, &id, Duration::from_secs(3600), late).unwrap();
    assert_eq!(svid.not_after, signer.not_after);
    assert!(matches!(
        issue(
            signer,
            &csr,
            &id,
            Duration::from_secs(3601),
            OffsetDateTime::now_utc()
        ),
        Err(IssueError::Ttl(_))
    ));
    assert!(matches!(
        issue(
            signer,
            &csr,
            &id,
            Duration::from_secs(60),
            signer.not_after + time::Duration::seconds(1)
        ),
        Err(IssueError::SignerExpired(_))
    ));
}

#[test]
fn a_csr_for_another_id_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let csr = verify_csr(&csr_with(|_| {})).unwrap();
    let other = parse_workload_id("spiffe://mayfly.local/web").unwrap();
    let err = issue(
        ca.authorities.signer().unwrap(),
        &csr,
        &other,
        Duration::from_secs(60),
        OffsetDateTime::now_utc(),
    )
    .unwrap_err();
    assert!(matches!(err, IssueError::WrongId { .. }));
    assert!(err.to_string().contains("spiffe://mayfly.local/web"));
}

#[test]
fn a_csr_asking_for_ca_rights_is_refused() {
    let ca_true = csr_with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
    assert!(matches!(
        verify_csr(&ca_true),
        Err(IssueError::AsksForCa(_))
    ));
    let cert_sign = csr_with(|p| {
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ]
    });
    assert!(matches!(
        verify_csr(&cert_sign),
        Err(IssueError::AsksForCa("keyCertSign"))
    ));
    let crl_sign = csr_with(|p| p.key_usages = vec![KeyUsagePurpose::CrlSign]);
    assert!(matches!(
        verify_csr(&crl_sign),
        Err(IssueError::AsksForCa("cRLSign"))
    ));
}

#[test]
fn a_csr_with_extra_sans_or_none_is_refused() {
    let extra = csr_with(|p| {
        p.subject_alt_names
            .push(SanType::DnsName("evil.example".try_into().unwrap()))
    });
    assert!(matches!(verify_csr(&extra), Err(IssueError::ExtraSans(2))));
    let two_ids = csr_with(|p| {
        p.subject_alt_names
            .push(SanType::URI("spiffe://mayfly.local/db".try_into().unwrap()))
    });
    assert!(matches!(
        verify_csr(&two_ids),
        Err(IssueError::ExtraSans(2))
    ));
    let none = csr_with(|p| p.subject_alt_names.clear());
    assert!(matches!(verify_csr(&none), Err(IssueError::NoId(_))));
    let dns_only =
        csr_with(|p| p.subject_alt_names = vec![SanType::DnsName("a.example".try_into().unwrap())]);
    assert!(matches!(verify_csr(&dns_only), Err(IssueError::NoId(_))));
}

#[test]
fn a_csr_for_an_invalid_or_root_id_is_refused() {
    let root = csr_with(|p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://mayfly.local".try_into().unwrap())]
    });
    assert!(matches!(verify_csr(&root), Err(IssueError::BadId(_))));
    let upper = csr_with(|p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://Mayfly.local/x".try_into().unwrap())]
    });
    assert!(matches!(verify_csr(&upper), Err(IssueError::BadId(_))));
}

#[test]
fn a_tampered_or_garbage_csr_is_refused() {
    let mut csr = csr_with(|_| {});
    let n = csr.len();
    csr[n - 5] ^= 0x55; // inside the signature
    assert!(matches!(verify_csr(&csr), Err(IssueError::BadCsr(_))));
    let mut csr = csr_with(|_| {});
    let pos = csr.windows(6).position(|w| w == b"orders").unwrap();
    csr[pos] = b'x'; // the signed content now differs
    assert!(matches!(verify_csr(&csr), Err(IssueError::BadCsr(_))));
    for garbage in [vec![], vec![0x30], vec![0u8; 100], b"not a csr".to_vec()] {
        assert!(matches!(verify_csr(&garbage), Err(IssueError::BadCsr(_))));
    }
    assert!(matches!(
        verify_csr(&vec![0x30; MAX_CSR_LEN + 1]),
        Err(IssueError::CsrTooLarge(_))
    ));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn random_bytes_never_panic_the_csr_parser(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        let _ = verify_csr(&bytes);
    }

    #[test]
    fn flipping_any_byte_of_a_csr_never_yields_a_different_identity(pos in 0usize..200, bit in 0u8..8) {
        let csr = csr_with(|_| {});
        let mut bad = csr.clone();
        let pos = pos % bad.len();
        bad[pos] ^= 1 << bit;
        if let Ok(v) = verify_csr(&bad) {
            proptest::prop_assert_eq!(v.id.to_string(), ID);
        }
    }
}

#[test]
fn no_workload_issuance_path_signs_the_control_planes_namespace() {
    let ca = TestCa::new("mayfly.local");
    let signer = ca.authorities.signer().unwrap();
    let now = OffsetDateTime::now_utc();
    for reserved in [
        "spiffe://mayfly.local/mayfly/ca",
        "spiffe://mayfly.local/mayfly/anything",
        "spiffe://mayfly.local/Mayfly/ca",
    ] {
        let id = mayfly_ca::id::parse_id(reserved).unwrap();
        let key = SecretKey::generate().unwrap();
        // A CSR asking for it is refused before anything else is looked at (a token for it,
        // created before the namespace was reserved, is then never spent).
        let csr = make_csr(&key, &id).unwrap();
        let e = verify_csr(&csr).err().unwrap();
        assert_eq!(e.reason(), "reserved_id", "{reserved}: {e}");
        // `svid mint` and every other workload path: refused at signing.
        let e = mayfly_ca::issue::issue_for_key(signer, &key, &id, Duration::from_secs(60), now)
            .unwrap_err();
        assert!(matches!(e, IssueError::Reserved(_)), "{reserved}: {e}");
        assert!(
            e.to_string().contains("reserved for the control plane"),
            "{e}"
        );
    }
}

#[test]
fn only_the_control_planes_own_svid_carries_the_control_plane_mark() {
    let ca = TestCa::new("mayfly.local");
    let (cp, _) = ca.control_plane_svid();
    assert!(mayfly_ca::svid::has_control_plane_mark(&cp[0]).unwrap());
    assert_eq!(
        check_leaf(&cp[0]).unwrap().id.to_string(),
        "spiffe://mayfly.local/mayfly/ca"
    );
    let (web, _) = ca.svid("spiffe://mayfly.local/web");
    assert!(!mayfly_ca::svid::has_control_plane_mark(&web[0]).unwrap());
    // A CSR cannot ask for the mark: the subject is the CA's, never the CSR's.
    let csr = csr_with(|p| {
        p.distinguished_name.push(
            rcgen::DnType::OrganizationalUnitName,
            mayfly_ca::svid::CONTROL_PLANE_OU,
        );
    });
    let v = verify_csr(&csr).unwrap();
    let issued = issue(
        ca.authorities.signer().unwrap(),
        &v,
        &v.id.clone(),
        Duration::from_secs(60),
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    assert!(!mayfly_ca::svid::has_control_plane_mark(&issued.chain[0]).unwrap());
}
