//! JWK Sets: parsing the cluster issuer's keys (RSA, EC P-256 and P-384 signing keys) and
//! checking a signature with one, by `jsonwebtoken` (on aws-lc-rs, the tree's one provider).

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

use super::AttestError;

/// Why a JWK Set cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The file cannot be read.
    #[error("cannot read the JWK Set {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a JWK Set.
    #[error("the JWK Set is not valid: {0}")]
    Parse(String),
    /// No RSA or EC signing key in it.
    #[error("the JWK Set holds no usable RSA or EC (P-256, P-384) signing key")]
    Empty,
    /// The issuer is empty.
    #[error(
        "the issuer must not be empty (see `kubectl get --raw /.well-known/openid-configuration`)"
    )]
    NoIssuer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
}

impl Alg {
    pub(super) fn parse(s: &str) -> Result<Self, AttestError> {
        Ok(match s {
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            other => {
                return Err(AttestError::Malformed(format!(
                    "algorithm {:?} is not accepted (RS256, RS384, RS512, ES256, ES384)",
                    truncate(other)
                )));
            }
        })
    }

    fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Alg::Rs256 => jsonwebtoken::Algorithm::RS256,
            Alg::Rs384 => jsonwebtoken::Algorithm::RS384,
            Alg::Rs512 => jsonwebtoken::Algorithm::RS512,
            Alg::Es256 => jsonwebtoken::Algorithm::ES256,
            Alg::Es384 => jsonwebtoken::Algorithm::ES384,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Curve {
    P256,
    P384,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyType {
    Rsa,
    Ec(Curve),
}

#[derive(Clone)]
pub(super) struct Jwk {
    pub(super) kid: Option<String>,
    pub(super) alg: Option<String>,
    pub(super) kind: KeyType,
    pub(super) key: jsonwebtoken::DecodingKey,
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwk")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Jwk {
    pub(super) fn suits(&self, alg: Alg) -> bool {
        if self.alg.as_deref().is_some_and(|a| a != alg.name()) {
            return false;
        }
        matches!(
            (self.kind, alg),
            (KeyType::Rsa, Alg::Rs256 | Alg::Rs384 | Alg::Rs512)
                | (KeyType::Ec(Curve::P256), Alg::Es256)
                | (KeyType::Ec(Curve::P384), Alg::Es384)
        )
    }

    /// Whether `sig` (base64url, as in the token) is this key's signature of `msg` by `alg`.
    pub(super) fn verify(&self, alg: Alg, msg: &[u8], sig: &str) -> bool {
        self.suits(alg)
            && jsonwebtoken::crypto::verify(sig, msg, &self.key, alg.jwt()).unwrap_or(false)
    }
}

/// A base64url field that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("{field} is not base64url: {source}")]
pub(super) struct NotBase64 {
    field: String,
    source: base64::DecodeError,
}

pub(super) fn b64(field: &str, s: &str) -> Result<Vec<u8>, NotBase64> {
    URL_SAFE_NO_PAD
        .decode(s.as_bytes())
        .map_err(|source| NotBase64 {
            field: field.to_owned(),
            source,
        })
}

pub(super) fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Parses a JWK Set; keys of other types (`oct`, OKP, ...) or for encryption are skipped.
pub(super) fn parse_jwks(text: &str) -> Result<Vec<Jwk>, JwksError> {
    let v: Value = serde_json::from_str(text).map_err(|e| JwksError::Parse(e.to_string()))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| JwksError::Parse("no \"keys\" array".into()))?;
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let s = |name: &str| k.get(name).and_then(Value::as_str);
        if s("use").is_some_and(|u| u != "sig") {
            continue;
        }
        let bad = |m: String| JwksError::Parse(format!("keys[{i}]: {m}"));
        let (kind, key) = match s("kty") {
            Some("RSA") => {
                let n = b64("n", s("n").unwrap_or_default()).map_err(|e| bad(e.to_string()))?;
                let e = b64("e", s("e").unwrap_or_default()).map_err(|e| bad(e.to_string()))?;
                if n.is_empty() || e.is_empty() {
                    return Err(JwksError::Parse(format!(
                        "keys[{i}]: RSA key without n or e"
                    )));
                }
                (
                    KeyType::Rsa,
                    jsonwebtoken::DecodingKey::from_rsa_raw_components(&n, &e),
                )
            }
            Some("EC") => {
                let (curve, len) = match s("crv") {
                    Some("P-256") => (Curve::P256, 32),
                    Some("P-384") => (Curve::P384, 48),
                    _ => continue,
                };
                let x = b64("x", s("x").unwrap_or_default()).map_err(|e| bad(e.to_string()))?;
                let y = b64("y", s("y").unwrap_or_default()).map_err(|e| bad(e.to_string()))?;
                if x.len() != len || y.len() != len {
                    return Err(JwksError::Parse(format!(
                        "keys[{i}]: EC coordinates must be {len} bytes"
                    )));
                }
                let key = jsonwebtoken::DecodingKey::from_ec_components(
                    s("x").unwrap_or_default(),
                    s("y").unwrap_or_default(),
                )
                .map_err(|e| bad(e.to_string()))?;
                (KeyType::Ec(curve), key)
            }
            _ => continue,
        };
        out.push(Jwk {
            kid: s("kid").map(str::to_owned),
            alg: s("alg").map(str::to_owned),
            kind,
            key,
        });
    }
    if out.is_empty() {
        return Err(JwksError::Empty);
    }
    Ok(out)
}
