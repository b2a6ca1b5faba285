//! A `postgres://` URL: the connection settings, the TLS mode, and how the server is named in
//! errors (host, port and database: never the password).

use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::server::store::StoreError;

/// A parsed store URL, ready to connect.
pub(super) struct Target {
    /// tokio-postgres's settings (`sslmode` and `sslrootcert` taken out).
    pub(super) config: tokio_postgres::Config,
    /// TLS, unless `sslmode=disable`.
    pub(super) tls: Option<MakeRustlsConnect>,
    /// `host:port/dbname`, for errors and logs.
    pub(super) described: String,
}

fn bad(why: impl std::fmt::Display) -> StoreError {
    StoreError::BadUrl(format!("invalid PostgreSQL URL: {why}"))
}

/// Parses `postgres://user:password@host:port/db?sslmode=...&sslrootcert=...`.
///
/// `sslmode` follows libpq: `disable` (plain), `prefer` (the default: TLS if the server offers
/// it, unauthenticated), `require` (TLS, the server not authenticated), `verify-full` (TLS, the
/// server's certificate checked against `sslrootcert` and its name against the host).
pub(super) fn parse(url: &str) -> Result<Target, StoreError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut rest = Vec::new();
    let (mut mode, mut root) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_owned()),
            Some(("sslrootcert", v)) => root = Some(v.to_owned()),
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let mut config = tokio_postgres::Config::from_str(&url).map_err(bad)?;
    config.connect_timeout(std::time::Duration::from_secs(5));
    if config.get_application_name().is_none() {
        config.application_name("mayfly-ca");
    }
    let described = describe(&config);
    let tls = match mode.as_deref().unwrap_or("prefer") {
        "disable" => {
            config.ssl_mode(SslMode::Disable);
            None
        }
        "prefer" => {
            config.ssl_mode(SslMode::Prefer);
            Some(encrypt_only()?)
        }
        "require" => {
            config.ssl_mode(SslMode::Require);
            Some(encrypt_only()?)
        }
        "verify-full" => {
            config.ssl_mode(SslMode::Require);
            let root = root.ok_or_else(|| {
                bad("sslmode=verify-full needs sslrootcert=FILE (the PEM CA certificates that sign the server's certificate)")
            })?;
            Some(verify_full(&root)?)
        }
        other => {
            return Err(bad(format!(
                "sslmode={other} is not supported (use disable, prefer, require or verify-full)"
            )));
        }
    };
    Ok(Target {
        config,
        tls,
        described,
    })
}

/// `host:port/dbname` (the first host; a Unix socket shows its directory).
fn describe(c: &tokio_postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let db = c.get_dbname().or(c.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

fn tls_config(
    verifier: Option<Arc<dyn ServerCertVerifier>>,
    roots: Option<rustls::RootCertStore>,
) -> Result<MakeRustlsConnect, StoreError> {
    let provider = crate::identity::crypto::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::BadUrl(format!("TLS to PostgreSQL: {e}")))?;
    let config = match (verifier, roots) {
        (Some(v), _) => builder
            .dangerous()
            .with_custom_certificate_verifier(v)
            .with_no_client_auth(),
        (None, Some(r)) => builder.with_root_certificates(r).with_no_client_auth(),
        (None, None) => builder
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

fn encrypt_only() -> Result<MakeRustlsConnect, StoreError> {
    let provider = crate::identity::crypto::provider();
    tls_config(Some(Arc::new(EncryptOnly(provider))), None)
}

fn verify_full(root: &str) -> Result<MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs =
        CertificateDer::pem_file_iter(root).map_err(|e| bad(format!("sslrootcert {root}: {e}")))?;
    for c in certs {
        let c = c.map_err(|e| bad(format!("sslrootcert {root}: {e}")))?;
        roots
            .add(c)
            .map_err(|e| bad(format!("sslrootcert {root}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad(format!("sslrootcert {root} holds no certificate")));
    }
    tls_config(None, Some(roots))
}

/// `sslmode=require`/`prefer`: the connection is encrypted and the handshake's signatures
/// checked, but the server's certificate is not (libpq's meaning of these modes).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_url_is_described_by_host_port_and_database_never_the_password() {
        let t = parse("postgres://mayfly:s3cret@db.example:6432/ca?sslmode=disable").unwrap();
        assert_eq!(t.described, "db.example:6432/ca");
        assert!(t.tls.is_none());
        let e = parse("postgres://mayfly:s3cret@db/ca?sslmode=verify-ca")
            .err()
            .unwrap();
        assert!(e.to_string().contains("verify-ca"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = parse("postgres://mayfly:s3cret@db/ca?sslmode=verify-full")
            .err()
            .unwrap();
        assert!(e.to_string().contains("sslrootcert"), "{e}");
        assert!(
            parse("postgres://db/ca?sslmode=require")
                .unwrap()
                .tls
                .is_some()
        );
    }
}
