//! The inbound TLS handshake (with its timeout, the peer's identity, its expiry) and why
//! handshakes fail, as the `handshake_failures{reason}` metric spells it.

use mayfly_ca::svid::SvidInfo;
use mayfly_ca::verify::{VerifyError, describe_tls_error, peer_identity};
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::Shared;
use crate::metrics::Direction;

/// TLS handshake with a timeout, then the peer's identity; counts and logs failures.
pub(crate) async fn accept_peer(
    shared: &Shared,
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, SvidInfo)> {
    let m = &shared.metrics;
    let tls =
        match tokio::time::timeout(shared.limits.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let why = describe_tls_error(&e);
                m.handshake_failed(Direction::Inbound, failure_reason(&e));
                info!(error = %why, "inbound TLS handshake refused");
                return None;
            }
            Err(_) => {
                m.handshake_failed(Direction::Inbound, "timeout");
                debug!("inbound TLS handshake timed out");
                return None;
            }
        };
    let peer: SvidInfo = match peer_identity(tls.get_ref().1.peer_certificates()) {
        Ok(p) => p,
        Err(e) => {
            m.handshake_failed(Direction::Inbound, e.reason());
            return None;
        }
    };
    let kx = mayfly_ca::tls::negotiated_group(tls.get_ref().1);
    m.handshake(Direction::Inbound, kx);
    tracing::Span::current()
        .record("spiffe_id", tracing::field::display(&peer.id))
        .record("kx", tracing::field::display(kx));
    if peer.not_after <= OffsetDateTime::now_utc() {
        m.handshake_failed(Direction::Inbound, "expired");
        return None;
    }
    Some((tls, peer))
}

/// Why a TLS handshake failed, as the `handshake_failures{reason}` label spells it: read from
/// the typed error rustls returns (our verifier's [`VerifyError`] travels inside it as
/// `CertificateError::Other`), never from its text. Failures without a label of their own
/// (a bad signature, a broken chain, an I/O error) are `tls`.
pub(crate) fn failure_reason(err: &std::io::Error) -> &'static str {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .map_or("tls", rustls_reason)
}

fn rustls_reason(e: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError, Error, OtherError};
    match e {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => {
            e.downcast_ref::<VerifyError>().map_or("tls", verify_reason)
        }
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not_yet_valid",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        // The peer refused our SVID as expired (a sidecar whose own SVID lapsed).
        Error::AlertReceived(AlertDescription::CertificateExpired) => "expired",
        _ => "tls",
    }
}

/// The label of a failed SVID check. A leaf that breaks the profile is `not_an_svid` here (the
/// label documented for handshakes); checks without a label of their own are `tls`.
fn verify_reason(e: &VerifyError) -> &'static str {
    match e {
        VerifyError::Profile(_) => "not_an_svid",
        VerifyError::BadSignature(_)
        | VerifyError::Chain { .. }
        | VerifyError::NotControlPlane(_) => "tls",
        other => other.reason(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{AlertDescription, CertificateError, Error, OtherError};

    use super::*;

    fn io(e: Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    fn ours(e: VerifyError) -> std::io::Error {
        io(Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(e)),
        )))
    }

    #[test]
    fn rustls_errors_are_classified_by_variant() {
        let cases = [
            (Error::NoCertificatesPresented, "no_certificate"),
            (
                Error::InvalidCertificate(CertificateError::Expired),
                "expired",
            ),
            (
                Error::InvalidCertificate(CertificateError::NotValidYet),
                "not_yet_valid",
            ),
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "unknown_issuer",
            ),
            (
                Error::AlertReceived(AlertDescription::CertificateExpired),
                "expired",
            ),
            (
                Error::AlertReceived(AlertDescription::BadCertificate),
                "tls",
            ),
            (Error::General("certificate expired".into()), "tls"),
        ];
        for (e, want) in cases {
            let shown = e.to_string();
            assert_eq!(failure_reason(&io(e)), want, "{shown}");
        }
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(failure_reason(&reset), "tls");
    }

    #[test]
    fn our_svid_checks_travel_typed_through_rustls() {
        let id = "spiffe://other.test/expired-jobs".to_owned();
        let cases = [
            (VerifyError::NoCertificate, "no_certificate"),
            (
                VerifyError::UnknownTrustDomain("other.test".into(), id.clone()),
                "unknown_trust_domain",
            ),
            (
                VerifyError::UnknownIssuer {
                    id: id.clone(),
                    td: "other.test".into(),
                },
                "unknown_issuer",
            ),
            (
                VerifyError::UnexpectedServer {
                    expected: "spiffe://mayfly.test/db".into(),
                    got: id.clone(),
                },
                "unexpected_server_id",
            ),
            (VerifyError::BadSignature(id.clone()), "tls"),
        ];
        for (e, want) in cases {
            let shown = e.to_string();
            assert_eq!(failure_reason(&ours(e)), want, "{shown}");
        }
    }
}
