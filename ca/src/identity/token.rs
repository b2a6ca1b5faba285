//! Join tokens: `mayfly1.<id>.<secret>.<pin>`.
//!
//! - `id`: 8 hex characters, public (for `token list` and `token revoke`);
//! - `secret`: 32 random bytes, base64url; the control plane keeps only its SHA-256;
//! - `pin`: hex SHA-256 of the trust bundle root's SubjectPublicKeyInfo, so the sidecar can
//!   trust the control plane on first contact without any other file (like `kubeadm join`'s
//!   `--discovery-token-ca-cert-hash`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

use crate::identity::keys::{fill_random, sha256};

const PREFIX: &str = "mayfly1";

/// A parsed join token.
pub struct JoinToken {
    /// Public identifier.
    pub id: String,
    secret: Zeroizing<String>,
    /// Pin of the trust bundle's root (hex SHA-256 of its SPKI).
    pub pin: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "JoinToken({}, <secret>, pin {})",
            self.id,
            &self.pin[..12]
        )
    }
}

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed join token: {0} (expected mayfly1.<id>.<secret>.<pin>, as printed by `mayfly-ca token create`)"
)]
pub struct TokenFormatError(&'static str);

impl JoinToken {
    /// A fresh token pinned to `pin`.
    pub fn generate(pin: &str) -> Self {
        let mut id = [0u8; 4];
        fill_random(&mut id);
        let mut secret = [0u8; 32];
        fill_random(&mut secret);
        Self {
            id: hex::encode(id),
            secret: Zeroizing::new(URL_SAFE_NO_PAD.encode(secret)),
            pin: pin.to_ascii_lowercase(),
        }
    }

    /// Parses the printed form.
    pub fn parse(s: &str) -> Result<Self, TokenFormatError> {
        let s = s.trim();
        let mut parts = s.split('.');
        if parts.next() != Some(PREFIX) {
            return Err(TokenFormatError("wrong prefix"));
        }
        let id = parts.next().ok_or(TokenFormatError("no id"))?;
        let secret = parts.next().ok_or(TokenFormatError("no secret"))?;
        let pin = parts.next().ok_or(TokenFormatError("no pin"))?;
        if parts.next().is_some() {
            return Err(TokenFormatError("too many parts"));
        }
        if id.len() != 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenFormatError("bad id"));
        }
        match URL_SAFE_NO_PAD.decode(secret) {
            Ok(b) if b.len() == 32 => {}
            _ => return Err(TokenFormatError("bad secret")),
        }
        if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenFormatError("bad pin"));
        }
        Ok(Self {
            id: id.to_ascii_lowercase(),
            secret: Zeroizing::new(secret.to_owned()),
            pin: pin.to_ascii_lowercase(),
        })
    }

    /// The hash the control plane stores and looks up (hex SHA-256 of the secret).
    pub fn hash(&self) -> String {
        hex::encode(sha256(self.secret.as_bytes()))
    }

    /// The printed form (contains the secret: show it once, never log it).
    pub fn reveal(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{PREFIX}.{}.{}.{}",
            self.id,
            self.secret.as_str(),
            self.pin
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_and_hashes_stably() {
        let t = JoinToken::generate(&"ab".repeat(32));
        let p = JoinToken::parse(&t.reveal()).unwrap();
        assert_eq!(p.id, t.id);
        assert_eq!(p.hash(), t.hash());
        assert_eq!(p.pin, t.pin);
        assert!(!format!("{p:?}").contains(t.secret.as_str()));
    }

    #[test]
    fn refuses_malformed_tokens() {
        let good = JoinToken::generate(&"ab".repeat(32)).reveal().to_string();
        let mut parts: Vec<&str> = good.split('.').collect();
        for bad in [
            "",
            "mayfly1",
            "x.y.z.w",
            &good[..good.len() - 1],
            &format!("{good}.x"),
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
        parts[2] = "short";
        assert!(JoinToken::parse(&parts.join(".")).is_err());
    }
}
