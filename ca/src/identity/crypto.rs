//! The one crypto provider of the process (aws-lc-rs, TLS 1.3 suites and key exchange groups
//! in mayfly's order), below both [`super::verify`] (its signature algorithms) and
//! [`super::tls`] (its configs), which re-exports these functions.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The key exchange groups, most preferred first: the hybrid post-quantum X25519MLKEM768
/// (what two mayfly peers agree on: a recording of today's traffic stays safe from a future
/// quantum computer), then X25519, P-256 and P-384 for clients without it. rustls' own
/// default (without its `prefer-post-quantum` feature) lists the hybrid last, so two rustls
/// peers settled on plain X25519.
pub fn kx_groups() -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
    use rustls::crypto::aws_lc_rs::kx_group;
    vec![
        kx_group::X25519MLKEM768,
        kx_group::X25519,
        kx_group::SECP256R1,
        kx_group::SECP384R1,
    ]
}

/// The process-wide crypto provider: aws-lc-rs, the only one in the tree.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::aws_lc_rs::default_provider();
            // TLS 1.3 with AES-128-GCM first: as strong as 256-bit AES here and cheaper.
            p.cipher_suites
                .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
            p.kx_groups = kx_groups();
            Arc::new(p)
        })
        .clone()
}

/// The key exchange group a finished handshake agreed on, as IANA names it
/// (`X25519MLKEM768`, `X25519`, `secp256r1`), for logs and metric labels.
pub fn negotiated_group(conn: &rustls::CommonState) -> &'static str {
    conn.negotiated_key_exchange_group()
        .and_then(|g| g.name().as_str())
        .unwrap_or("unknown")
}
