//! Micro-benchmarks of the identity core, one core, in memory.
//!
//! - `issue`: verify a P-256 CSR and sign an SVID with the active intermediate (the CA's cost per
//!   issued SVID; goal: >= 5,000 SVIDs/s per core).
//! - `verify_chain`: verify a leaf + intermediate against a bundle (the per-handshake verify cost).
//! - `make_csr`: generate a P-256 key and a CSR (the sidecar's per-rotation cost).
//! - `mtls_handshake`: a full TLS 1.3 mutual handshake between rustls client and server configs
//!   built by `mayfly_ca::tls`, bytes pumped in memory (handshakes per second, both sides);
//!   they agree on the hybrid X25519MLKEM768. `mtls_handshake_x25519`: the same with a client
//!   that offers X25519 only (what two mayfly peers agreed on before the hybrid was preferred):
//!   the ratio of the two is the price of the post-quantum key exchange.
//!
//! Run: `cargo bench -p mayfly-ca --bench identity`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use divan::{Bencher, black_box};
use mayfly_ca::bundle::BundleSet;
use mayfly_ca::id::parse_workload_id;
use mayfly_ca::keys::SecretKey;
use mayfly_ca::testing::TestCa;
use mayfly_ca::tls::{client_config, dial_name, server_config};
use mayfly_ca::verify::{IdMatcher, Usage, algorithms};
use rustls::{
    ClientConfig, ClientConnection, Connection, HandshakeKind, ServerConfig, ServerConnection,
};
use rustls_pki_types::UnixTime;
use time::OffsetDateTime;

const TD: &str = "mayfly.local";
const CLIENT_ID: &str = "spiffe://mayfly.local/bench-a";
const SERVER_ID: &str = "spiffe://mayfly.local/bench-b";

fn main() {
    divan::main();
}

/// CSR verification + signing of a P-256 SVID by the active intermediate.
#[divan::bench]
fn issue(bencher: Bencher<'_, '_>) {
    let ca = TestCa::new(TD);
    let signer = ca.authorities.signer().unwrap();
    let id = parse_workload_id(CLIENT_ID).unwrap();
    let key = SecretKey::generate().unwrap();
    let csr = mayfly_ca::issue::make_csr(&key, &id).unwrap();
    let now = OffsetDateTime::now_utc();
    bencher.bench_local(|| {
        let verified = mayfly_ca::issue::verify_csr(black_box(&csr)).unwrap();
        mayfly_ca::issue::issue(signer, &verified, &id, Duration::from_secs(300), now).unwrap()
    });
}

/// CSR verification alone (parse + signature check + profile checks).
#[divan::bench]
fn verify_csr(bencher: Bencher<'_, '_>) {
    let id = parse_workload_id(CLIENT_ID).unwrap();
    let key = SecretKey::generate().unwrap();
    let csr = mayfly_ca::issue::make_csr(&key, &id).unwrap();
    bencher.bench_local(|| mayfly_ca::issue::verify_csr(black_box(&csr)).unwrap());
}

/// A presented chain (leaf, intermediate) checked against the trust bundle, as in a handshake.
#[divan::bench]
fn verify_chain(bencher: Bencher<'_, '_>) {
    let ca = TestCa::new(TD);
    let (chain, _key) = ca.svid(CLIENT_ID);
    let bundles = BundleSet::single(ca.bundle());
    let algs = algorithms();
    let now = UnixTime::now();
    bencher.bench_local(|| {
        mayfly_ca::verify::verify_chain(black_box(&chain), &bundles, now, Usage::Client, &algs)
            .unwrap()
    });
}

/// Key generation + CSR: what a sidecar does at every rotation.
#[divan::bench]
fn make_csr(bencher: Bencher<'_, '_>) {
    let id = parse_workload_id(CLIENT_ID).unwrap();
    bencher.bench_local(|| {
        let key = SecretKey::generate().unwrap();
        mayfly_ca::issue::make_csr(&key, black_box(&id)).unwrap()
    });
}

/// Client and server configs as the sidecar builds them (`mayfly_ca::tls`: no session
/// resumption, every connection is a full handshake). `resume`: turn rustls' stateful TLS 1.3
/// resumption back on in this copy, to price what mayfly gives up (BENCH.md goal 5).
fn configs(resume: bool) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let ca = TestCa::new(TD);
    let mut server = server_config(ca.credentials(SERVER_ID), ca.bundles(), &[]).unwrap();
    let mut client = client_config(
        ca.credentials(CLIENT_ID),
        ca.bundles(),
        IdMatcher::Exact(parse_workload_id(SERVER_ID).unwrap()),
        &[],
    )
    .unwrap();
    if resume {
        server.session_storage = rustls::server::ServerSessionMemoryCache::new(256);
        server.send_tls13_tickets = 2;
        client.resumption = rustls::client::Resumption::default();
    }
    (Arc::new(client), Arc::new(server))
}

/// Moves every pending TLS record from one side to the other; returns the bytes moved.
fn transfer(from: &mut Connection, to: &mut Connection) -> usize {
    let mut buf = Vec::with_capacity(8192);
    let mut moved = 0;
    while from.wants_write() {
        buf.clear();
        moved += from.write_tls(&mut buf).unwrap();
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets().unwrap();
        }
    }
    moved
}

fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> Option<HandshakeKind> {
    let mut c = Connection::Client(ClientConnection::new(client.clone(), dial_name()).unwrap());
    let mut s = Connection::Server(ServerConnection::new(server.clone()).unwrap());
    // Bounded: a TLS 1.3 mutual handshake takes 2 round trips (+ tickets).
    for _ in 0..8 {
        let a = transfer(&mut c, &mut s);
        let b = transfer(&mut s, &mut c);
        if a == 0 && b == 0 && !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    let kind = match &c {
        Connection::Client(c) => c.handshake_kind(),
        Connection::Server(_) => None,
    };
    black_box((c, s));
    kind
}

/// A full TLS 1.3 mutual handshake (ECDSA P-256 SVIDs, X25519MLKEM768, SPIFFE verifiers on both
/// sides), client and server in one thread: the figure is handshakes per second for both ends
/// together.
#[divan::bench]
fn mtls_handshake(bencher: Bencher<'_, '_>) {
    let (client, server) = configs(false);
    assert_eq!(handshake(&client, &server), Some(HandshakeKind::Full));
    assert_eq!(group(&client, &server), "X25519MLKEM768");
    bencher.bench_local(|| handshake(&client, &server));
}

/// The same handshake with a client that offers plain X25519 only.
#[divan::bench]
fn mtls_handshake_x25519(bencher: Bencher<'_, '_>) {
    let ca = TestCa::new(TD);
    let server = Arc::new(server_config(ca.credentials(SERVER_ID), ca.bundles(), &[]).unwrap());
    let mut provider = (*mayfly_ca::tls::provider()).clone();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut client = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(mayfly_ca::verify::SpiffeServerVerifier::new(
            ca.bundles(),
            IdMatcher::Exact(parse_workload_id(SERVER_ID).unwrap()),
        )))
        .with_client_cert_resolver(ca.credentials(CLIENT_ID));
    client.enable_sni = false;
    client.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(client);
    assert_eq!(handshake(&client, &server), Some(HandshakeKind::Full));
    assert_eq!(group(&client, &server), "X25519");
    bencher.bench_local(|| handshake(&client, &server));
}

/// The key exchange group one handshake agrees on.
fn group(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> &'static str {
    let mut c = Connection::Client(ClientConnection::new(client.clone(), dial_name()).unwrap());
    let mut s = Connection::Server(ServerConnection::new(server.clone()).unwrap());
    for _ in 0..8 {
        transfer(&mut c, &mut s);
        transfer(&mut s, &mut c);
    }
    mayfly_ca::tls::negotiated_group(&c)
}

/// A resumed TLS 1.3 handshake (ticket from the previous connection, PSK + X25519): no
/// certificates or chain verification. Not what mayfly does (resumption is off by design); the
/// price of that choice.
#[divan::bench]
fn mtls_resumed(bencher: Bencher<'_, '_>) {
    let (client, server) = configs(true);
    handshake(&client, &server);
    assert_eq!(handshake(&client, &server), Some(HandshakeKind::Resumed));
    bencher.bench_local(|| handshake(&client, &server));
}
