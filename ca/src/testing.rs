//! A test CA with options: well-formed SVIDs, and every broken variant the verifier must refuse.
//! Built for tests (`cfg(test)` or the `testing` feature); never used by the binaries.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::identity::bundle::{BundleSet, DEFAULT_REFRESH_HINT, TrustBundle};
use crate::identity::id::{parse_trust_domain, parse_workload_id};
use crate::identity::keys::{SecretKey, random_serial};
use crate::identity::signing::authority::{Authorities, AuthorityConfig, Role};
use crate::identity::signing::issue::issue_for_key;
use crate::identity::tls::{Credentials, Svid};
use crate::identity::verify::SharedBundles;

/// An in-process CA for one trust domain.
pub struct TestCa {
    pub authorities: Authorities,
}

/// How to build a (possibly broken) leaf.
#[derive(Clone)]
pub struct Leaf {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub is_ca: IsCa,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub ekus: Vec<ExtendedKeyUsagePurpose>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Sign with a key other than the intermediate's (a bad signature).
    pub wrong_key: bool,
}

impl Leaf {
    pub fn new(id: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            uris: vec![id.to_owned()],
            dns: Vec::new(),
            is_ca: IsCa::ExplicitNoCa,
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            ekus: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            not_before: now - time::Duration::minutes(1),
            not_after: now + time::Duration::minutes(5),
            wrong_key: false,
        }
    }
}

impl TestCa {
    pub fn new(td: &str) -> Self {
        let td = parse_trust_domain(td).unwrap();
        let authorities =
            Authorities::init(td, AuthorityConfig::default(), OffsetDateTime::now_utc()).unwrap();
        Self { authorities }
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(
            self.authorities.trust_domain().clone(),
            self.authorities.bundle_roots(OffsetDateTime::now_utc()),
            self.authorities.bundle_sequence(),
            DEFAULT_REFRESH_HINT,
        )
        .unwrap()
    }

    pub fn bundles(&self) -> SharedBundles {
        Arc::new(ArcSwap::from_pointee(BundleSet::single(self.bundle())))
    }

    /// A well-formed SVID.
    pub fn svid(&self, id: &str) -> (Vec<CertificateDer<'static>>, SecretKey) {
        let key = SecretKey::generate().unwrap();
        let signer = self.authorities.signer().unwrap();
        let issued = issue_for_key(
            signer,
            &key,
            &parse_workload_id(id).unwrap(),
            Duration::from_secs(300),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        (issued.chain, key)
    }

    /// The control plane's own SVID for this trust domain, as the control plane signs it
    /// (reserved ID, control-plane mark).
    pub fn control_plane_svid(&self) -> (Vec<CertificateDer<'static>>, SecretKey) {
        let key = SecretKey::generate().unwrap();
        let id = crate::identity::id::parse_id(&format!(
            "spiffe://{}{}",
            self.authorities.trust_domain(),
            crate::identity::api::CA_ID_PATH
        ))
        .unwrap();
        let issued = crate::identity::signing::issue::issue_control_plane_svid(
            self.authorities.signer().unwrap(),
            &key,
            &id,
            &["localhost".to_owned()],
            Duration::from_secs(300),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        (issued.chain, key)
    }

    /// Credentials holding a fresh well-formed SVID.
    pub fn credentials(&self, id: &str) -> Arc<Credentials> {
        let (chain, key) = self.svid(id);
        let c = Credentials::new();
        c.set(Svid::new(chain, &key).unwrap());
        c
    }

    /// A leaf built from `leaf`, signed by the active intermediate; chain = [leaf, intermediate].
    pub fn leaf(&self, leaf: &Leaf) -> (Vec<CertificateDer<'static>>, SecretKey) {
        let int = self.authorities.active(Role::Intermediate).unwrap();
        let key = SecretKey::generate().unwrap();
        let mut p = CertificateParams::default();
        p.serial_number = Some(random_serial());
        p.not_before = leaf.not_before;
        p.not_after = leaf.not_after;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, "test");
        p.is_ca = leaf.is_ca;
        p.key_usages = leaf.key_usages.clone();
        p.extended_key_usages = leaf.ekus.clone();
        p.subject_alt_names = leaf
            .uris
            .iter()
            .map(|u| SanType::URI(u.clone().try_into().unwrap()))
            .chain(
                leaf.dns
                    .iter()
                    .map(|d| SanType::DnsName(d.clone().try_into().unwrap())),
            )
            .collect();
        p.use_authority_key_identifier_extension = true;
        let signing_key = if leaf.wrong_key {
            SecretKey::generate().unwrap().key_pair().unwrap()
        } else {
            int.key.key_pair().unwrap()
        };
        let issuer = Issuer::from_ca_cert_der(&int.cert, signing_key).unwrap();
        let cert = p.signed_by(&key.key_pair().unwrap(), &issuer).unwrap();
        (vec![cert.der().clone(), int.cert.clone()], key)
    }

    /// Credentials holding whatever `leaf` describes (rustls does not check the profile).
    pub fn credentials_for(&self, leaf: &Leaf) -> Arc<Credentials> {
        let (chain, key) = self.leaf(leaf);
        let signing = crate::identity::crypto::provider()
            .key_provider
            .load_private_key(key.private_key_der())
            .unwrap();
        let c = Credentials::new();
        c.set_raw(Arc::new(rustls::sign::CertifiedKey::new(chain, signing)));
        c
    }
}
