//! rustls configuration from SVIDs: a hot-swappable certificate resolver (rotation swaps the
//! SVID; every new handshake takes the new one at once), and TLS 1.3-only client and server
//! configs on the one crypto provider (defined in [`super::crypto`], re-exported here).

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use rustls_pki_types::CertificateDer;

pub use crate::identity::crypto::{kx_groups, negotiated_group, provider};
use crate::identity::keys::SecretKey;
use crate::identity::svid::{SvidInfo, check_leaf};
use crate::identity::verify::{
    IdMatcher, SharedBundles, SpiffeClientVerifier, SpiffeServerVerifier,
};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The SVID handed in is not one.
    #[error("SVID is not valid: {0}")]
    Svid(#[from] crate::identity::svid::ProfileError),
    /// The chain is empty.
    #[error("SVID chain is empty")]
    EmptyChain,
}

/// An SVID ready for rustls: chain, signing key, and what the leaf says.
#[derive(Debug)]
pub struct Svid {
    /// The certified key rustls presents.
    pub certified: Arc<CertifiedKey>,
    /// The identity and validity of the leaf.
    pub info: SvidInfo,
}

impl Svid {
    /// Builds an SVID from a chain (leaf first) and its private key.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: &SecretKey) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::EmptyChain)?;
        let info = check_leaf(leaf)?;
        let signing = provider()
            .key_provider
            .load_private_key(key.private_key_der())?;
        Ok(Self {
            certified: Arc::new(CertifiedKey::new(chain, signing)),
            info,
        })
    }
}

/// The current SVID, swapped atomically on rotation. Resolves for both TLS sides.
#[derive(Debug, Default)]
pub struct Credentials {
    current: ArcSwapOption<Svid>,
}

impl Credentials {
    /// Empty credentials (no SVID yet: handshakes needing one fail).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Publishes a new SVID; new handshakes use it at once, established connections go on.
    pub fn set(&self, svid: Svid) {
        self.current.store(Some(Arc::new(svid)));
    }

    /// Publishes a certified key without profile checks (tests that present broken SVIDs).
    #[cfg(any(test, feature = "testing"))]
    pub fn set_raw(&self, certified: Arc<CertifiedKey>) {
        let info = SvidInfo {
            id: crate::identity::id::parse_id("spiffe://invalid.test/raw").expect("constant ID"),
            serial: String::new(),
            not_before: time::OffsetDateTime::UNIX_EPOCH,
            not_after: time::OffsetDateTime::UNIX_EPOCH,
        };
        self.current.store(Some(Arc::new(Svid { certified, info })));
    }

    /// Drops the SVID (fail closed: new handshakes are refused).
    pub fn clear(&self) {
        self.current.store(None);
    }

    /// The current SVID, if any.
    pub fn get(&self) -> Option<Arc<Svid>> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|s| s.certified.clone())
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|s| s.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}

/// A TLS 1.3 server config presenting `creds` and requiring a client SVID from a trusted domain.
pub fn server_config(
    creds: Arc<Credentials>,
    bundles: SharedBundles,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    server_config_with(creds, Arc::new(SpiffeClientVerifier::new(bundles)), alpn)
}

/// A TLS 1.3 server config with a given client verifier.
pub fn server_config_with(
    creds: Arc<Credentials>,
    verifier: Arc<SpiffeClientVerifier>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(creds);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // No session resumption: a resumed TLS 1.3 session carries the identity of the original
    // handshake, whose SVID may have expired or rotated since. Every connection proves a
    // current credential (see ARCHITECTURE.md).
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A TLS 1.3 client config presenting `creds` (if any) and accepting only a server whose
/// SPIFFE ID `expected` matches.
pub fn client_config(
    creds: Arc<Credentials>,
    bundles: SharedBundles,
    expected: IdMatcher,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundles, expected)))
        .with_client_cert_resolver(creds);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.enable_sni = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The name handed to rustls when dialling (SNI is off; the verifier checks the SPIFFE ID).
pub fn dial_name() -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}
