//! Identity core tests: profile, verification of every bad-certificate class, issuance from
//! CSRs, rotation, bundles, and real TLS 1.3 handshakes on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bundles;
mod fixtures;
mod handshake;
mod issuance;
mod key_exchange;
mod rotation;
mod verification;

/// Where the shared go-spiffe fixtures live.
pub fn fixture(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/go-spiffe")
        .join(path)
}
