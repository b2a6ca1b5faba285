//! The inbound TLS handshake (with its timeout, the peer's identity, its expiry) and why
//! handshakes fail, as the `handshake_failures{reason}` metric spells it.

use mayfly_ca::svid::SvidInfo;
use mayfly_ca::verify::{describe_tls_error, peer_identity};
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
                m.handshake_failed(Direction::Inbound, reason_of(&why));
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

/// The reason label of a failed handshake, from its description.
pub(crate) fn reason_of(msg: &str) -> &'static str {
    let m = msg.to_ascii_lowercase();
    if m.contains("expired") {
        "expired"
    } else if m.contains("not valid yet") {
        "not_yet_valid"
    } else if m.contains("no trust bundle") {
        "unknown_trust_domain"
    } else if m.contains("unknown issuer") {
        "unknown_issuer"
    } else if m.contains("no certificate")
        || m.contains("peer sent no certificates")
        || m.contains("nocertificates")
    {
        "no_certificate"
    } else if m.contains("x.509-svid") {
        "not_an_svid"
    } else if m.contains("expected") {
        "unexpected_server_id"
    } else {
        "tls"
    }
}
