//! Key generation and the in-memory form of private keys.

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

/// Why a key could not be made or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key generator failed (entropy or the crypto library).
    #[error("cannot generate a P-256 key: {0}")]
    Generate(rcgen::Error),
    /// Stored key bytes are not a PKCS#8 P-256 key.
    #[error("stored private key is not a valid PKCS#8 P-256 key: {0}")]
    Load(rcgen::Error),
}

/// A PKCS#8 private key held in memory; zeroed on drop, never printed.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    /// Generates a fresh ECDSA P-256 key (the mayfly default for CAs and SVIDs).
    pub fn generate() -> Result<Self, KeyError> {
        let kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(KeyError::Generate)?;
        Ok(Self(Zeroizing::new(kp.serialize_der())))
    }

    /// Wraps stored PKCS#8 bytes, checking they hold a P-256 key.
    pub fn from_pkcs8(der: Vec<u8>) -> Result<Self, KeyError> {
        let key = Self(Zeroizing::new(der));
        key.key_pair()?;
        Ok(key)
    }

    /// The PKCS#8 DER bytes (secret: handle with care).
    pub fn pkcs8(&self) -> &[u8] {
        &self.0
    }

    /// The rcgen key pair, for signing certificates and CSRs.
    pub fn key_pair(&self) -> Result<KeyPair, KeyError> {
        KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(self.0.as_slice()),
            &PKCS_ECDSA_P256_SHA256,
        )
        .map_err(KeyError::Load)
    }

    /// The key in the form rustls loads.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.0.to_vec()))
    }

    /// PEM encoding (`PRIVATE KEY`), for `svid mint` output files.
    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem_encode("PRIVATE KEY", &self.0))
    }
}

/// PEM-encodes DER bytes with the given label, 64 columns per line.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A random serial number: 16 bytes with the top bit clear (127 bits of entropy, positive).
pub fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    fill_random(&mut bytes);
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 0x01; // keep 16 bytes on the wire, no leading zero to strip
    }
    rcgen::SerialNumber::from_slice(&bytes)
}

/// Fills `buf` from the operating system's CSPRNG (via aws-lc-rs).
pub fn fill_random(buf: &mut [u8]) {
    use aws_lc_rs::rand::SecureRandom;
    // The system RNG failing is unrecoverable for a CA; aws-lc aborts internally in that case,
    // so the Result carries no recoverable error in practice.
    if aws_lc_rs::rand::SystemRandom::new().fill(buf).is_err() {
        panic!("the operating system's random number generator failed");
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
