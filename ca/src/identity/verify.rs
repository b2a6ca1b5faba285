//! Verifying a peer's X.509-SVID: profile, then the chain against the bundle of the peer ID's
//! own trust domain only (SPIFFE X509-SVID §5), then — for servers — the expected ID.
//!
//! The rustls verifiers here reject inside the handshake; nothing is checked "afterwards".

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::bundle::BundleSet;
use crate::identity::id::{SpiffeId, TrustDomain};
use crate::identity::svid::{ProfileError, SvidInfo, check_leaf};

/// Why a presented SVID chain was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// No certificate was presented.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The leaf breaks the X.509-SVID profile.
    #[error("peer certificate is not a valid X.509-SVID: {0}")]
    Profile(#[from] ProfileError),
    /// No bundle is held for the peer's trust domain.
    #[error("no trust bundle for trust domain {0:?}: peer {1} is untrusted")]
    UnknownTrustDomain(String, String),
    /// The leaf or an intermediate has expired.
    #[error("peer certificate chain has expired (SVID {0})")]
    Expired(String),
    /// The leaf or an intermediate is not valid yet.
    #[error("peer certificate chain is not valid yet (SVID {0})")]
    NotYetValid(String),
    /// The chain does not lead to a root of the peer's trust domain.
    #[error("SVID {id} does not chain to a root of trust domain {td:?} (unknown issuer)")]
    UnknownIssuer {
        /// The peer's ID.
        id: String,
        /// Its trust domain.
        td: String,
    },
    /// A signature in the chain does not verify.
    #[error("a signature in the chain of SVID {0} does not verify")]
    BadSignature(String),
    /// Any other chain failure (key usage, basic constraints of an intermediate, ...).
    #[error("chain of SVID {id} is invalid: {reason}")]
    Chain {
        /// The peer's ID.
        id: String,
        /// webpki's reason.
        reason: String,
    },
    /// A server's SPIFFE ID is not the one expected.
    #[error("server is {got}, expected {expected}")]
    UnexpectedServer {
        /// What the caller wanted.
        expected: String,
        /// Who answered.
        got: String,
    },
    /// A server presents the control plane's ID without the mark only the control plane's own
    /// SVID carries: an impostor (or an SVID from before the namespace was reserved).
    #[error(
        "server presents the control plane's ID {0} without the control-plane mark in its subject: not the control plane"
    )]
    NotControlPlane(String),
}

impl VerifyError {
    /// A short machine-readable reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::NoCertificate => "no_certificate",
            VerifyError::Profile(_) => "profile",
            VerifyError::UnknownTrustDomain(..) => "unknown_trust_domain",
            VerifyError::Expired(_) => "expired",
            VerifyError::NotYetValid(_) => "not_yet_valid",
            VerifyError::UnknownIssuer { .. } => "unknown_issuer",
            VerifyError::BadSignature(_) => "bad_signature",
            VerifyError::Chain { .. } => "chain",
            VerifyError::UnexpectedServer { .. } => "unexpected_server_id",
            VerifyError::NotControlPlane(_) => "not_control_plane",
        }
    }

    fn into_rustls(self) -> rustls::Error {
        let ce = match self {
            // Specific variants produce the specific TLS alerts; the log line on this side
            // (from the handshake error) keeps our full message in the Other case.
            VerifyError::Expired(_) => CertificateError::Expired,
            VerifyError::NotYetValid(_) => CertificateError::NotValidYet,
            other => CertificateError::Other(OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(ce)
    }
}

/// Which SVID usage a chain is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A client presenting to a server (EKU clientAuth).
    Client,
    /// A server presenting to a client (EKU serverAuth).
    Server,
}

/// The signature algorithms of the one crypto provider.
pub fn algorithms() -> WebPkiSupportedAlgorithms {
    crate::identity::crypto::provider().signature_verification_algorithms
}

/// Verifies a presented chain (leaf first) and returns the peer's identity.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: UnixTime,
    usage: Usage,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<SvidInfo, VerifyError> {
    let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::NoCertificate)?;
    let info = check_leaf(leaf)?;
    let id = info.id.to_string();
    let td = info.id.trust_domain();
    let bundle = bundles
        .get(td)
        .ok_or_else(|| VerifyError::UnknownTrustDomain(td.to_string(), id.clone()))?;
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| VerifyError::Profile(ProfileError::Parse(e.to_string())))?;
    let eku = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    ee.verify_for_usage(
        algs.all,
        bundle.anchors(),
        intermediates,
        now,
        eku,
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { .. } => VerifyError::Expired(id.clone()),
        webpki::Error::CertNotValidYet { .. } => VerifyError::NotYetValid(id.clone()),
        webpki::Error::UnknownIssuer => VerifyError::UnknownIssuer {
            id: id.clone(),
            td: td.to_string(),
        },
        webpki::Error::InvalidSignatureForPublicKey => VerifyError::BadSignature(id.clone()),
        other => VerifyError::Chain {
            id: id.clone(),
            reason: format!("{other:?}"),
        },
    })?;
    Ok(info)
}

/// Which server identities a client accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdMatcher {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any of these IDs.
    OneOf(Vec<SpiffeId>),
    /// Any ID of this trust domain.
    TrustDomain(TrustDomain),
    /// The control plane: exactly this (reserved) ID, and the control-plane mark
    /// ([`crate::identity::svid::CONTROL_PLANE_OU`]) in the certificate.
    ControlPlane(SpiffeId),
}

impl IdMatcher {
    /// Whether `id` is accepted.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdMatcher::Exact(want) | IdMatcher::ControlPlane(want) => want == id,
            IdMatcher::OneOf(ids) => ids.contains(id),
            IdMatcher::TrustDomain(td) => id.trust_domain() == td,
        }
    }
}

impl std::fmt::Display for IdMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdMatcher::Exact(id) => write!(f, "{id}"),
            IdMatcher::ControlPlane(id) => write!(f, "the control plane {id}"),
            IdMatcher::OneOf(ids) => {
                let v: Vec<String> = ids.iter().map(ToString::to_string).collect();
                write!(f, "one of [{}]", v.join(", "))
            }
            IdMatcher::TrustDomain(td) => write!(f, "any ID in trust domain {td}"),
        }
    }
}

/// Shared, hot-swappable bundles.
pub type SharedBundles = Arc<ArcSwap<BundleSet>>;

/// rustls client-certificate verifier: SVID chain against the peer's own trust domain bundle.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: SharedBundles,
    algs: WebPkiSupportedAlgorithms,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    /// A verifier requiring a client SVID.
    pub fn new(bundles: SharedBundles) -> Self {
        Self {
            bundles,
            algs: algorithms(),
            mandatory: true,
        }
    }

    /// A verifier that accepts clients without a certificate (the control plane's bootstrap
    /// path, where a join token authenticates instead); a certificate, if sent, is verified.
    pub fn optional(bundles: SharedBundles) -> Self {
        Self {
            mandatory: false,
            ..Self::new(bundles)
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let bundles = self.bundles.load();
        verify_chain(&chain, &bundles, now, Usage::Client, &self.algs)
            .map_err(VerifyError::into_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// rustls server-certificate verifier: SVID chain, then the expected SPIFFE ID instead of a DNS
/// name.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: SharedBundles,
    expected: IdMatcher,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier accepting servers whose ID `expected` matches.
    pub fn new(bundles: SharedBundles, expected: IdMatcher) -> Self {
        Self {
            bundles,
            expected,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let bundles = self.bundles.load();
        let info = verify_chain(&chain, &bundles, now, Usage::Server, &self.algs)
            .map_err(VerifyError::into_rustls)?;
        if !self.expected.matches(&info.id) {
            return Err(VerifyError::UnexpectedServer {
                expected: self.expected.to_string(),
                got: info.id.to_string(),
            }
            .into_rustls());
        }
        if let IdMatcher::ControlPlane(_) = &self.expected {
            let marked = crate::identity::svid::has_control_plane_mark(end_entity)
                .map_err(|e| VerifyError::Profile(e).into_rustls())?;
            if !marked {
                return Err(VerifyError::NotControlPlane(info.id.to_string()).into_rustls());
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The identity of the peer of an established connection (its verified leaf).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SvidInfo, VerifyError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(VerifyError::NoCertificate)?;
    Ok(check_leaf(leaf)?)
}

/// A readable account of a failed TLS handshake: the SVID check that failed when there is one
/// (rustls prints its own wrapper with `Debug`), else the error itself.
pub fn describe_tls_error(err: &std::io::Error) -> String {
    let Some(inner) = err.get_ref() else {
        return err.to_string();
    };
    match inner.downcast_ref::<rustls::Error>() {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e)))) => {
            e.to_string()
        }
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => "peer certificate chain has expired".into(),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        )) => "peer certificate chain is not valid yet".into(),
        Some(other) => other.to_string(),
        None => err.to_string(),
    }
}
