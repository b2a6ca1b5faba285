//! Real TLS 1.3 handshakes on 127.0.0.1 between SVIDs.

use std::sync::Arc;

use mayfly_ca::testing::{Leaf, TestCa};
use mayfly_ca::tls::{Credentials, client_config, dial_name, server_config};
use mayfly_ca::verify::{IdMatcher, SharedBundles, describe_tls_error, peer_identity};
use rcgen::KeyUsagePurpose;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const SERVER: &str = "spiffe://mayfly.local/orders";
const CLIENT: &str = "spiffe://mayfly.local/web";

/// Runs one handshake; returns (server's view of the client, client's view of the server).
async fn handshake(
    server_creds: Arc<Credentials>,
    server_bundles: SharedBundles,
    client_creds: Arc<Credentials>,
    client_bundles: SharedBundles,
    expected: IdMatcher,
) -> (Result<String, String>, Result<String, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(
        server_config(server_creds, server_bundles, &[]).unwrap(),
    ));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let id =
                    peer_identity(tls.get_ref().1.peer_certificates()).map(|i| i.id.to_string());
                let _ = tls.write_all(b"ok").await;
                let _ = tls.shutdown().await;
                id.map_err(|e| e.to_string())
            }
            Err(e) => Err(describe_tls_error(&e)),
        }
    });
    let connector = TlsConnector::from(Arc::new(
        client_config(client_creds, client_bundles, expected, &[]).unwrap(),
    ));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = match connector.connect(dial_name(), tcp).await {
        Ok(mut tls) => {
            let id = peer_identity(tls.get_ref().1.peer_certificates()).map(|i| i.id.to_string());
            // TLS 1.3: a client whose certificate is refused learns it on its first read.
            let mut buf = Vec::new();
            match tls.read_to_end(&mut buf).await {
                Ok(_) if buf == b"ok" => id.map_err(|e| e.to_string()),
                Ok(_) => Err("connection closed".into()),
                Err(e) => Err(e.to_string()),
            }
        }
        Err(e) => Err(describe_tls_error(&e)),
    };
    (server.await.unwrap(), client)
}

#[tokio::test]
async fn two_minted_svids_complete_a_tls13_handshake_and_learn_each_others_id() {
    let ca = TestCa::new("mayfly.local");
    let (s, c) = handshake(
        ca.credentials(SERVER),
        ca.bundles(),
        ca.credentials(CLIENT),
        ca.bundles(),
        IdMatcher::Exact(mayfly_ca::id::parse_id(SERVER).unwrap()),
    )
    .await;
    assert_eq!(s.unwrap(), CLIENT);
    assert_eq!(c.unwrap(), SERVER);
}

#[tokio::test]
async fn a_client_refuses_a_server_with_an_unexpected_id() {
    let ca = TestCa::new("mayfly.local");
    let (_, c) = handshake(
        ca.credentials("spiffe://mayfly.local/impostor"),
        ca.bundles(),
        ca.credentials(CLIENT),
        ca.bundles(),
        IdMatcher::Exact(mayfly_ca::id::parse_id(SERVER).unwrap()),
    )
    .await;
    let err = c.unwrap_err();
    assert!(
        err.contains("spiffe://mayfly.local/impostor") && err.contains(SERVER),
        "{err}"
    );
}

#[tokio::test]
async fn a_client_of_the_control_plane_refuses_the_reserved_id_without_the_control_plane_mark() {
    let ca = TestCa::new("mayfly.local");
    let cp_id = mayfly_ca::id::parse_id("spiffe://mayfly.local/mayfly/ca").unwrap();
    let creds = |(chain, key): (Vec<_>, mayfly_ca::keys::SecretKey)| {
        let c = Credentials::new();
        c.set(mayfly_ca::tls::Svid::new(chain, &key).unwrap());
        c
    };
    // The real one: signed by the control plane for itself.
    let (_, c) = handshake(
        creds(ca.control_plane_svid()),
        ca.bundles(),
        ca.credentials(CLIENT),
        ca.bundles(),
        IdMatcher::ControlPlane(cp_id.clone()),
    )
    .await;
    assert_eq!(c.unwrap(), cp_id.to_string());
    // An impostor: the same ID, signed by the same CA (as an older version would have for a
    // token or `svid mint`), without the mark.
    let (_, c) = handshake(
        creds(ca.leaf(&Leaf::new(&cp_id.to_string()))),
        ca.bundles(),
        ca.credentials(CLIENT),
        ca.bundles(),
        IdMatcher::ControlPlane(cp_id.clone()),
    )
    .await;
    let err = c.unwrap_err();
    assert!(err.contains("not the control plane"), "{err}");
}

#[tokio::test]
async fn every_bad_client_certificate_class_fails_the_handshake_naming_the_cause() {
    let ca = TestCa::new("mayfly.local");
    let foreign = TestCa::new("other.org");
    let rogue = TestCa::new("mayfly.local");
    let now = time::OffsetDateTime::now_utc();
    let mk = |f: &dyn Fn(&mut Leaf)| {
        let mut l = Leaf::new(CLIENT);
        f(&mut l);
        ca.credentials_for(&l)
    };
    let cases: Vec<(&str, Arc<Credentials>, &str)> = vec![
        (
            "two URI SANs",
            mk(&|l| l.uris.push("spiffe://mayfly.local/x".into())),
            "2 URI SANs",
        ),
        (
            "no URI SAN",
            mk(&|l| {
                l.uris.clear();
                l.dns.push("a.example".into())
            }),
            "no URI SAN",
        ),
        (
            "non-spiffe URI",
            mk(&|l| l.uris = vec!["https://a.example/x".into()]),
            "not a valid SPIFFE ID",
        ),
        (
            "root-path ID",
            mk(&|l| l.uris = vec!["spiffe://mayfly.local".into()]),
            "has no path",
        ),
        (
            "CA leaf",
            mk(&|l| l.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
            "cA=true",
        ),
        (
            "keyCertSign",
            mk(&|l| l.key_usages.push(KeyUsagePurpose::KeyCertSign)),
            "keyCertSign",
        ),
        (
            "no digitalSignature",
            mk(&|l| l.key_usages = vec![KeyUsagePurpose::KeyEncipherment]),
            "digitalSignature",
        ),
        (
            "expired",
            mk(&|l| {
                l.not_before = now - time::Duration::hours(2);
                l.not_after = now - time::Duration::hours(1)
            }),
            "xpired",
        ),
        (
            "not yet valid",
            mk(&|l| {
                l.not_before = now + time::Duration::hours(1);
                l.not_after = now + time::Duration::hours(2)
            }),
            "not valid yet",
        ),
        ("wrong signature", mk(&|l| l.wrong_key = true), ""),
        (
            "foreign trust domain",
            foreign.credentials("spiffe://other.org/web"),
            "no trust bundle",
        ),
        (
            "unknown intermediate",
            rogue.credentials(CLIENT),
            "unknown issuer",
        ),
    ];
    for (name, creds, cause) in cases {
        let (s, c) = handshake(
            ca.credentials(SERVER),
            ca.bundles(),
            creds,
            ca.bundles(),
            IdMatcher::Exact(mayfly_ca::id::parse_id(SERVER).unwrap()),
        )
        .await;
        let err = s.expect_err(name);
        assert!(
            err.to_lowercase().contains(&cause.to_lowercase()),
            "{name}: server error {err:?} does not name {cause:?}"
        );
        assert!(c.is_err(), "{name}: client must see the failure");
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = TestCa::new("mayfly.local");
    let (s, c) = handshake(
        ca.credentials(SERVER),
        ca.bundles(),
        Credentials::new(),
        ca.bundles(),
        IdMatcher::Exact(mayfly_ca::id::parse_id(SERVER).unwrap()),
    )
    .await;
    assert!(s.unwrap_err().to_lowercase().contains("certificate"));
    assert!(c.is_err());
}

#[tokio::test]
async fn rotation_swaps_the_svid_for_new_handshakes() {
    let ca = TestCa::new("mayfly.local");
    let server = ca.credentials(SERVER);
    let before = server.get().unwrap().info.serial.clone();
    let (chain, key) = ca.svid(SERVER);
    server.set(mayfly_ca::tls::Svid::new(chain, &key).unwrap());
    let after = server.get().unwrap().info.serial.clone();
    assert_ne!(before, after);
    let (s, c) = handshake(
        server,
        ca.bundles(),
        ca.credentials(CLIENT),
        ca.bundles(),
        IdMatcher::TrustDomain(mayfly_ca::id::parse_trust_domain("mayfly.local").unwrap()),
    )
    .await;
    assert!(s.is_ok() && c.is_ok());
}
