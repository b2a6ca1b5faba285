//! JWK Sets: parsing the cluster issuer's keys (RSA, EC P-256 and P-384 signing keys) and
//! checking a signature with one.

use std::path::PathBuf;

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
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

#[derive(Debug, Clone)]
pub(super) enum KeyMaterial {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    Ec { curve: Curve, point: Vec<u8> },
}

#[derive(Debug, Clone)]
pub(super) struct Jwk {
    pub(super) kid: Option<String>,
    pub(super) alg: Option<String>,
    pub(super) key: KeyMaterial,
}

impl Jwk {
    pub(super) fn suits(&self, alg: Alg) -> bool {
        if self.alg.as_deref().is_some_and(|a| a != alg.name()) {
            return false;
        }
        matches!(
            (&self.key, alg),
            (
                KeyMaterial::Rsa { .. },
                Alg::Rs256 | Alg::Rs384 | Alg::Rs512
            ) | (
                KeyMaterial::Ec {
                    curve: Curve::P256,
                    ..
                },
                Alg::Es256
            ) | (
                KeyMaterial::Ec {
                    curve: Curve::P384,
                    ..
                },
                Alg::Es384
            )
        )
    }

    pub(super) fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
        match &self.key {
            KeyMaterial::Rsa { n, e } => {
                let params = match alg {
                    Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    _ => return false,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok()
            }
            KeyMaterial::Ec { point, .. } => {
                let algorithm = match alg {
                    Alg::Es256 => &signature::ECDSA_P256_SHA256_FIXED,
                    Alg::Es384 => &signature::ECDSA_P384_SHA384_FIXED,
                    _ => return false,
                };
                UnparsedPublicKey::new(algorithm, point)
                    .verify(msg, sig)
                    .is_ok()
            }
        }
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
        let key = match s("kty") {
            Some("RSA") => {
                let n = b64("n", s("n").unwrap_or_default()).map_err(|e| bad(e.to_string()))?;
                let e = b64("e", s("e").unwrap_or_default()).map_err(|e| bad(e.to_string()))?;
                if n.is_empty() || e.is_empty() {
                    return Err(JwksError::Parse(format!(
                        "keys[{i}]: RSA key without n or e"
                    )));
                }
                KeyMaterial::Rsa { n, e }
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
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                KeyMaterial::Ec { curve, point }
            }
            _ => continue,
        };
        out.push(Jwk {
            kid: s("kid").map(str::to_owned),
            alg: s("alg").map(str::to_owned),
            key,
        });
    }
    if out.is_empty() {
        return Err(JwksError::Empty);
    }
    Ok(out)
}
