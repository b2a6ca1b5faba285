//! Which key exchange a real handshake agrees on: the hybrid post-quantum X25519MLKEM768
//! between mayfly peers, X25519 or P-256 with a client that offers only those.

use std::sync::Arc;

use mayfly_ca::testing::TestCa;
use mayfly_ca::tls::{client_config, dial_name, negotiated_group, provider, server_config};
use mayfly_ca::verify::{IdMatcher, SpiffeServerVerifier};
use rustls::ClientConfig;
use rustls::crypto::{CryptoProvider, SupportedKxGroup, aws_lc_rs::kx_group};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const SERVER: &str = "spiffe://mayfly.local/orders";
const CLIENT: &str = "spiffe://mayfly.local/web";

/// One handshake on loopback: (the server's negotiated group, the client's).
async fn groups(ca: &TestCa, client: ClientConfig) -> (&'static str, &'static str) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(
        server_config(ca.credentials(SERVER), ca.bundles(), &[]).unwrap(),
    ));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        negotiated_group(tls.get_ref().1)
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(client))
        .connect(dial_name(), tcp)
        .await
        .unwrap();
    let client = negotiated_group(tls.get_ref().1);
    (server.await.unwrap(), client)
}

fn expected() -> IdMatcher {
    IdMatcher::Exact(mayfly_ca::id::parse_id(SERVER).unwrap())
}

/// A client like mayfly's, offering only `kx`.
fn client_offering(ca: &TestCa, kx: &'static dyn SupportedKxGroup) -> ClientConfig {
    let p = CryptoProvider {
        kx_groups: vec![kx],
        ..(*provider()).clone()
    };
    ClientConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            ca.bundles(),
            expected(),
        )))
        .with_client_cert_resolver(ca.credentials(CLIENT))
}

#[tokio::test]
async fn two_mayfly_peers_agree_on_the_hybrid_post_quantum_key_exchange() {
    let ca = TestCa::new("mayfly.local");
    let client = client_config(ca.credentials(CLIENT), ca.bundles(), expected(), &[]).unwrap();
    assert_eq!(
        groups(&ca, client).await,
        ("X25519MLKEM768", "X25519MLKEM768")
    );
}

#[tokio::test]
async fn a_client_without_it_still_gets_x25519_or_p256() {
    let ca = TestCa::new("mayfly.local");
    let c = client_offering(&ca, kx_group::X25519);
    assert_eq!(groups(&ca, c).await, ("X25519", "X25519"));
    let c = client_offering(&ca, kx_group::SECP256R1);
    assert_eq!(groups(&ca, c).await, ("secp256r1", "secp256r1"));
}
