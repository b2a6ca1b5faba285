//! A person's credentials as a TLS identity: the user SVID and its key for the client side of
//! mTLS, and the trust bundle to verify the server with.

use std::sync::Arc;

use arc_swap::ArcSwap;
use mayfly_ca::bundle::{BundleSet, TrustBundle};
use mayfly_ca::keys::SecretKey;
use mayfly_ca::tls::{Credentials as TlsCredentials, Svid};
use mayfly_ca::verify::SharedBundles;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use super::creds::Credentials;

/// Why credentials do not make a TLS identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserTlsError {
    /// A part of the credentials does not parse.
    #[error("the credentials' {what} is not valid: {why}")]
    Invalid {
        /// Which part.
        what: &'static str,
        /// Why.
        why: String,
    },
}

fn invalid(what: &'static str) -> impl Fn(String) -> UserTlsError {
    move |why| UserTlsError::Invalid { what, why }
}

/// The user SVID (with its key) and the trust bundle of `creds`.
pub fn identity(creds: &Credentials) -> Result<(Arc<TlsCredentials>, SharedBundles), UserTlsError> {
    let td = mayfly_ca::id::parse_trust_domain(&creds.trust_domain)
        .map_err(|e| invalid("trust domain")(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(creds.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("certificate chain")(e.to_string()))?;
    let key = PrivatePkcs8KeyDer::from_pem_slice(creds.key_pem.as_bytes())
        .map_err(|e| invalid("private key (PKCS#8 PEM)")(e.to_string()))?;
    let key = SecretKey::from_pkcs8(key.secret_pkcs8_der().to_vec())
        .map_err(|e| invalid("private key")(e.to_string()))?;
    let svid = Svid::new(chain, &key).map_err(|e| invalid("user SVID")(e.to_string()))?;
    let tls = TlsCredentials::new();
    tls.set(svid);
    let bundle = TrustBundle::from_pem(td, &creds.bundle_pem)
        .map_err(|e| invalid("trust bundle")(e.to_string()))?;
    Ok((
        tls,
        Arc::new(ArcSwap::from_pointee(BundleSet::single(bundle))),
    ))
}
