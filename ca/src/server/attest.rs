//! Kubernetes workload attestation without join tokens.
//!
//! A pod's sidecar sends the projected service-account token the kubelet mounts for it
//! (audience `mayfly`, 10-minute life, refreshed by the kubelet). The control plane verifies
//! it offline, against the cluster issuer's JWK Set (`kubectl get --raw /openid/v1/jwks`), with
//! aws-lc-rs: no TokenReview call, so no RBAC and no API-server dependency on the issuance path.
//! A good token proves `spiffe://<td>/ns/<namespace>/sa/<service account>`.
//!
//! What is checked, in this order: shape and size, header (`alg` in RS256/384/512,
//! ES256/384; no `crit`), the key (`kid` in the JWK Set), the signature, and only then the
//! claims: `iss`, `aud` contains `mayfly`, `exp` (required), `nbf` and `iat` with a small
//! leeway, `kubernetes.io.{namespace, serviceaccount.name}`, and `sub` if present must agree.
//!
//! Unlike a join token a service-account token is not single-use: a restarted sidecar presents
//! the same file again. Its short life (the kubelet refreshes it at 80 %) bounds a replay.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use tracing::warn;

use crate::id::{SpiffeId, TrustDomain, parse_issuable_id};

/// The audience a projected token must carry.
pub const AUDIENCE: &str = "mayfly";
/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECS: i64 = 30;
/// The longest token accepted, in bytes (Kubernetes tokens are about 1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a service-account token was refused. [`AttestError::reason`] is the metric label and
/// the API's `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// Not a JWT, bad base64 or JSON, a missing or mistyped claim, an unaccepted algorithm.
    #[error("malformed service-account token: {0}")]
    Malformed(String),
    /// No key of the JWK Set verifies the signature.
    #[error("the service-account token's signature does not verify")]
    BadSignature,
    /// The `kid` is not in the JWK Set (or no key suits the algorithm).
    #[error(
        "the service-account token is signed by a key not in the JWK Set ({0}); refresh --k8s-jwks from `kubectl get --raw /openid/v1/jwks`"
    )]
    UnknownKey(String),
    /// `exp` has passed.
    #[error("the service-account token expired at {0} (unix time)")]
    Expired(i64),
    /// `nbf` or `iat` is in the future.
    #[error("the service-account token is not valid before {0} (unix time)")]
    NotYetValid(i64),
    /// `aud` does not contain `mayfly`.
    #[error(
        "the service-account token's audience is {0:?}, not \"mayfly\": project it with `audience: mayfly`"
    )]
    WrongAudience(Vec<String>),
    /// `iss` is not the configured issuer.
    #[error("the service-account token's issuer is {got:?}, expected {want:?}")]
    WrongIssuer {
        /// The token's `iss`.
        got: String,
        /// `--k8s-issuer`.
        want: String,
    },
    /// The control plane runs without `--k8s-jwks`/`--k8s-issuer`.
    #[error(
        "Kubernetes attestation is not enabled on this control plane (start it with --k8s-jwks and --k8s-issuer)"
    )]
    NotConfigured,
}

impl AttestError {
    /// Short reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            AttestError::Malformed(_) => "k8s_malformed",
            AttestError::BadSignature => "k8s_bad_signature",
            AttestError::UnknownKey(_) => "k8s_unknown_key",
            AttestError::Expired(_) => "k8s_token_expired",
            AttestError::NotYetValid(_) => "k8s_not_yet_valid",
            AttestError::WrongAudience(_) => "k8s_wrong_audience",
            AttestError::WrongIssuer { .. } => "k8s_wrong_issuer",
            AttestError::NotConfigured => "k8s_not_configured",
        }
    }
}

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
enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
}

impl Alg {
    fn parse(s: &str) -> Result<Self, AttestError> {
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

    fn name(self) -> &'static str {
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
enum Curve {
    P256,
    P384,
}

#[derive(Debug, Clone)]
enum KeyMaterial {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    Ec { curve: Curve, point: Vec<u8> },
}

#[derive(Debug, Clone)]
struct Jwk {
    kid: Option<String>,
    alg: Option<String>,
    key: KeyMaterial,
}

impl Jwk {
    fn suits(&self, alg: Alg) -> bool {
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

    fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
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

fn b64(field: &str, s: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(s.as_bytes())
        .map_err(|e| format!("{field} is not base64url: {e}"))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Parses a JWK Set; keys of other types (`oct`, OKP, ...) or for encryption are skipped.
fn parse_jwks(text: &str) -> Result<Vec<Jwk>, JwksError> {
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
                let n = b64("n", s("n").unwrap_or_default()).map_err(bad)?;
                let e = b64("e", s("e").unwrap_or_default()).map_err(bad)?;
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
                let x = b64("x", s("x").unwrap_or_default()).map_err(bad)?;
                let y = b64("y", s("y").unwrap_or_default()).map_err(bad)?;
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

struct Loaded {
    keys: Vec<Jwk>,
    modified: Option<SystemTime>,
}

/// What a verified token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// `spiffe://<td>/ns/<namespace>/sa/<service account>`.
    pub id: SpiffeId,
    /// The pod the token is bound to, when it is.
    pub pod: Option<String>,
    /// The token's `exp`.
    pub expires_at: i64,
}

/// Verifies Kubernetes service-account tokens against one issuer's JWK Set.
pub struct K8sAttestor {
    issuer: String,
    path: Option<PathBuf>,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for K8sAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sAttestor")
            .field("issuer", &self.issuer)
            .field("jwks", &self.path)
            .finish_non_exhaustive()
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl K8sAttestor {
    /// Reads the JWK Set at `path` (re-read whenever the file changes, so a ConfigMap update
    /// after a key rotation needs no restart).
    pub fn load(path: &Path, issuer: &str) -> Result<Self, JwksError> {
        let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut a = Self::from_jwks(&text, issuer)?;
        a.path = Some(path.to_path_buf());
        if let Ok(l) = a.loaded.get_mut() {
            l.modified = mtime(path);
        }
        Ok(a)
    }

    /// From JWK Set text (never re-read).
    pub fn from_jwks(text: &str, issuer: &str) -> Result<Self, JwksError> {
        if issuer.trim().is_empty() {
            return Err(JwksError::NoIssuer);
        }
        Ok(Self {
            issuer: issuer.to_owned(),
            path: None,
            loaded: Mutex::new(Loaded {
                keys: parse_jwks(text)?,
                modified: None,
            }),
        })
    }

    /// The configured issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The current keys, re-reading the file if it changed. A broken new file keeps the old
    /// keys (and says so).
    fn keys(&self) -> Vec<Jwk> {
        let Ok(mut l) = self.loaded.lock() else {
            return Vec::new();
        };
        if let Some(p) = &self.path {
            let m = mtime(p);
            if m.is_some() && m != l.modified {
                l.modified = m;
                match std::fs::read_to_string(p)
                    .map_err(|e| JwksError::Read {
                        path: p.clone(),
                        source: e,
                    })
                    .and_then(|t| parse_jwks(&t))
                {
                    Ok(k) => l.keys = k,
                    Err(e) => warn!(error = %e, "keeping the previous Kubernetes JWK Set"),
                }
            }
        }
        l.keys.clone()
    }

    /// Verifies `token` at `now` (unix seconds); the ID it proves is in `td`.
    pub fn verify(&self, token: &str, td: &TrustDomain, now: i64) -> Result<Attested, AttestError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(AttestError::Malformed(format!(
                "longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AttestError::Malformed(
                "not a JWS compact serialization (three base64url parts)".into(),
            ));
        };
        let header = json_part("header", h)?;
        if header.get("crit").is_some() {
            return Err(AttestError::Malformed(
                "critical header parameters are not supported".into(),
            ));
        }
        let alg = Alg::parse(
            header
                .get("alg")
                .and_then(Value::as_str)
                .ok_or_else(|| AttestError::Malformed("header has no alg".into()))?,
        )?;
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(AttestError::Malformed("kid is not a string".into())),
        };
        let sig = b64("signature", s).map_err(AttestError::Malformed)?;
        let keys = self.keys();
        let candidates: Vec<&Jwk> = keys
            .iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .filter(|k| k.suits(alg))
            .collect();
        if candidates.is_empty() {
            return Err(AttestError::UnknownKey(match kid {
                Some(k) => format!("kid {:?}, {}", truncate(k), alg.name()),
                None => format!("no kid, {}", alg.name()),
            }));
        }
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        if !candidates.iter().any(|k| k.verify(alg, signed, &sig)) {
            return Err(AttestError::BadSignature);
        }
        // Only a signed payload is looked at.
        let claims = json_part("payload", p)?;
        self.check_claims(&claims, td, now)
    }

    fn check_claims(&self, c: &Value, td: &TrustDomain, now: i64) -> Result<Attested, AttestError> {
        let iss = c
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| AttestError::Malformed("no iss claim".into()))?;
        if iss != self.issuer {
            return Err(AttestError::WrongIssuer {
                got: truncate(iss),
                want: self.issuer.clone(),
            });
        }
        let aud: Vec<String> = match c.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(truncate))
                .collect::<Option<_>>()
                .ok_or_else(|| AttestError::Malformed("aud holds a non-string".into()))?,
            _ => return Err(AttestError::Malformed("no aud claim".into())),
        };
        if !aud.iter().any(|a| a == AUDIENCE) {
            return Err(AttestError::WrongAudience(aud));
        }
        let time = |name: &str| -> Result<Option<i64>, AttestError> {
            match c.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_i64()
                    .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
                    .map(Some)
                    .ok_or_else(|| AttestError::Malformed(format!("{name} is not a number"))),
            }
        };
        let exp = time("exp")?
            .ok_or_else(|| AttestError::Malformed("no exp claim: tokens must expire".into()))?;
        if now > exp.saturating_add(LEEWAY_SECS) {
            return Err(AttestError::Expired(exp));
        }
        for name in ["nbf", "iat"] {
            if let Some(t) = time(name)?
                && t > now.saturating_add(LEEWAY_SECS)
            {
                return Err(AttestError::NotYetValid(t));
            }
        }
        let k8s = c
            .get("kubernetes.io")
            .ok_or_else(|| AttestError::Malformed("no kubernetes.io claim".into()))?;
        let ns = k8s
            .get("namespace")
            .and_then(Value::as_str)
            .ok_or_else(|| AttestError::Malformed("no kubernetes.io.namespace".into()))?;
        let sa = k8s
            .pointer("/serviceaccount/name")
            .and_then(Value::as_str)
            .ok_or_else(|| AttestError::Malformed("no kubernetes.io.serviceaccount.name".into()))?;
        for (what, name) in [("namespace", ns), ("service account", sa)] {
            if name.is_empty() || name.contains('/') {
                return Err(AttestError::Malformed(format!(
                    "{what} {:?} is not a Kubernetes name",
                    truncate(name)
                )));
            }
        }
        if let Some(sub) = c.get("sub")
            && sub.as_str() != Some(format!("system:serviceaccount:{ns}:{sa}").as_str())
        {
            return Err(AttestError::Malformed(
                "sub does not match kubernetes.io.namespace and serviceaccount".into(),
            ));
        }
        let id = parse_issuable_id(&format!("spiffe://{td}/ns/{ns}/sa/{sa}"))
            .map_err(|e| AttestError::Malformed(e.to_string()))?;
        let pod = k8s
            .pointer("/pod/name")
            .and_then(Value::as_str)
            .map(truncate);
        Ok(Attested {
            id,
            pod,
            expires_at: exp,
        })
    }
}

fn json_part(what: &str, s: &str) -> Result<Value, AttestError> {
    let bytes = b64(what, s).map_err(AttestError::Malformed)?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| AttestError::Malformed(format!("{what} is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(AttestError::Malformed(format!(
            "{what} is not a JSON object"
        )));
    }
    Ok(v)
}

/// A test issuer: an RSA and a P-256 key, their JWK Set, and real signed tokens.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    #![allow(clippy::expect_used, missing_docs)]

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde_json::{Value, json};

    /// Signs Kubernetes-like service-account tokens.
    pub struct TestIssuer {
        /// `iss` of the tokens.
        pub issuer: String,
        rsa: RsaKeyPair,
        ec: EcdsaKeyPair,
    }

    /// (n, e) from a DER RSAPublicKey.
    fn rsa_components(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
        fn tlv(b: &[u8]) -> (u8, &[u8], &[u8]) {
            let tag = b[0];
            let (len, hdr) = if b[1] < 0x80 {
                (b[1] as usize, 2)
            } else {
                let n = (b[1] & 0x7f) as usize;
                let mut l = 0usize;
                for x in &b[2..2 + n] {
                    l = (l << 8) | *x as usize;
                }
                (l, 2 + n)
            };
            (tag, &b[hdr..hdr + len], &b[hdr + len..])
        }
        let (_, seq, _) = tlv(der);
        let (_, n, rest) = tlv(seq);
        let (_, e, _) = tlv(rest);
        let strip = |x: &[u8]| {
            let i = x.iter().position(|b| *b != 0).unwrap_or(x.len());
            x[i..].to_vec()
        };
        (strip(n), strip(e))
    }

    impl TestIssuer {
        /// New keys (an RSA-2048 key takes a moment).
        pub fn new(issuer: &str) -> Self {
            Self {
                issuer: issuer.to_owned(),
                rsa: RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key"),
                ec: EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
                    .expect("EC key"),
            }
        }

        /// The JWK Set: `rsa-1` (RS256) and `ec-1` (ES256).
        pub fn jwks(&self) -> String {
            let (n, e) = rsa_components(self.rsa.public_key().as_ref());
            let point = self.ec.public_key().as_ref();
            json!({ "keys": [
                { "use": "sig", "kty": "RSA", "kid": "rsa-1", "alg": "RS256",
                  "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e) },
                { "use": "sig", "kty": "EC", "kid": "ec-1", "alg": "ES256", "crv": "P-256",
                  "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]) },
            ]})
            .to_string()
        }

        /// The claims the kubelet's token for `ns`/`sa` carries, issued at `now`, 600 s.
        pub fn claims(&self, ns: &str, sa: &str, now: i64) -> Value {
            json!({
                "aud": ["mayfly"],
                "exp": now + 600,
                "iat": now,
                "nbf": now,
                "iss": self.issuer,
                "sub": format!("system:serviceaccount:{ns}:{sa}"),
                "kubernetes.io": {
                    "namespace": ns,
                    "pod": { "name": format!("{sa}-7d9f8-abcde"), "uid": "0b1c5a2e-0000-4000-8000-000000000001" },
                    "serviceaccount": { "name": sa, "uid": "0b1c5a2e-0000-4000-8000-000000000002" },
                },
            })
        }

        /// A token with `header` and `claims`, signed with the key `alg` names.
        pub fn sign_raw(&self, header: &Value, claims: &Value) -> String {
            let msg = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let rng = SystemRandom::new();
            let sig = if header["alg"] == "ES256" {
                self.ec
                    .sign(&rng, msg.as_bytes())
                    .expect("sign")
                    .as_ref()
                    .to_vec()
            } else {
                let mut sig = vec![0u8; self.rsa.public_modulus_len()];
                self.rsa
                    .sign(&signature::RSA_PKCS1_SHA256, &rng, msg.as_bytes(), &mut sig)
                    .expect("sign");
                sig
            };
            format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig))
        }

        /// An RS256 token (kid `rsa-1`).
        pub fn rs256(&self, claims: &Value) -> String {
            self.sign_raw(
                &json!({"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}),
                claims,
            )
        }

        /// An ES256 token (kid `ec-1`).
        pub fn es256(&self, claims: &Value) -> String {
            self.sign_raw(
                &json!({"alg": "ES256", "kid": "ec-1", "typ": "JWT"}),
                claims,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::OnceLock;

    use proptest::prelude::*;
    use serde_json::json;

    use super::testing::TestIssuer;
    use super::*;
    use crate::id::parse_trust_domain;

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    const NOW: i64 = 1_800_000_000;

    fn issuer() -> &'static TestIssuer {
        static I: OnceLock<TestIssuer> = OnceLock::new();
        I.get_or_init(|| TestIssuer::new(ISS))
    }

    fn attestor() -> K8sAttestor {
        K8sAttestor::from_jwks(&issuer().jwks(), ISS).unwrap()
    }

    fn td() -> TrustDomain {
        parse_trust_domain("mayfly.local").unwrap()
    }

    fn verify(a: &K8sAttestor, token: &str, now: i64) -> Result<Attested, AttestError> {
        a.verify(token, &td(), now)
    }

    fn reason(token: &str) -> &'static str {
        verify(&attestor(), token, NOW).unwrap_err().reason()
    }

    #[test]
    fn rs256_and_es256_tokens_prove_the_namespace_and_service_account() {
        let i = issuer();
        let c = i.claims("shop", "orders", NOW);
        for t in [i.rs256(&c), i.es256(&c)] {
            let a = verify(&attestor(), &t, NOW).unwrap();
            assert_eq!(a.id.to_string(), "spiffe://mayfly.local/ns/shop/sa/orders");
            assert_eq!(a.pod.as_deref(), Some("orders-7d9f8-abcde"));
            assert_eq!(a.expires_at, NOW + 600);
        }
        // A string audience and no sub are fine too; a token within the leeway is accepted.
        let mut c = i.claims("default", "default", NOW);
        c["aud"] = json!("mayfly");
        c.as_object_mut().unwrap().remove("sub");
        assert!(verify(&attestor(), &i.rs256(&c), NOW + 600 + 20).is_ok());
    }

    #[test]
    fn every_bad_token_is_refused_with_its_reason() {
        let i = issuer();
        let good = i.claims("shop", "orders", NOW);
        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = good.clone();
            f(&mut c);
            i.rs256(&c)
        };
        assert_eq!(
            reason(&with(&|c| c["exp"] = json!(NOW - 31))),
            "k8s_token_expired"
        );
        assert_eq!(
            reason(&with(&|c| c["nbf"] = json!(NOW + 120))),
            "k8s_not_yet_valid"
        );
        assert_eq!(
            reason(&with(&|c| c["iat"] = json!(NOW + 120))),
            "k8s_not_yet_valid"
        );
        assert_eq!(
            reason(&with(
                &|c| c["aud"] = json!(["https://kubernetes.default.svc"])
            )),
            "k8s_wrong_audience"
        );
        assert_eq!(
            reason(&with(&|c| c["iss"] = json!("https://evil.example"))),
            "k8s_wrong_issuer"
        );
        assert_eq!(
            reason(&with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
            "k8s_malformed"
        );
        assert_eq!(
            reason(&with(&|c| {
                c.as_object_mut().unwrap().remove("kubernetes.io");
            })),
            "k8s_malformed"
        );
        assert_eq!(
            reason(&with(
                &|c| c["sub"] = json!("system:serviceaccount:shop:admin")
            )),
            "k8s_malformed"
        );
        assert_eq!(
            reason(&with(&|c| c["kubernetes.io"]["namespace"] = json!("a/../b"))),
            "k8s_malformed"
        );
        // Forged: the payload changed after signing.
        let t = i.rs256(&good);
        let mut parts: Vec<&str> = t.split('.').collect();
        let mut forged = good.clone();
        forged["kubernetes.io"]["serviceaccount"]["name"] = json!("admin");
        forged["sub"] = json!("system:serviceaccount:shop:admin");
        let p = URL_SAFE_NO_PAD.encode(forged.to_string());
        parts[1] = &p;
        assert_eq!(reason(&parts.join(".")), "k8s_bad_signature");
        // Signed by another issuer's key with the same kid.
        let other = TestIssuer::new(ISS);
        assert_eq!(reason(&other.rs256(&good)), "k8s_bad_signature");
        assert_eq!(reason(&other.es256(&good)), "k8s_bad_signature");
        // A kid not in the set; an algorithm the key does not suit.
        let t = i.sign_raw(&json!({"alg": "RS256", "kid": "rotated-away"}), &good);
        assert_eq!(reason(&t), "k8s_unknown_key");
        let t = i.sign_raw(&json!({"alg": "ES256", "kid": "rsa-1"}), &good);
        assert_eq!(reason(&t), "k8s_unknown_key");
        // alg none, HMAC, crit: refused before any key is tried.
        for h in [
            json!({"alg": "none"}),
            json!({"alg": "HS256", "kid": "rsa-1"}),
            json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}),
        ] {
            let t = format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(h.to_string()),
                URL_SAFE_NO_PAD.encode(good.to_string())
            );
            assert_eq!(reason(&t), "k8s_malformed", "{h}");
        }
        for junk in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.!!.!!",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert_eq!(reason(junk), "k8s_malformed", "{junk:.20}");
        }
    }

    #[test]
    fn jwks_files_are_checked_and_reloaded_when_they_change() {
        assert!(matches!(
            K8sAttestor::from_jwks("{\"keys\": []}", ISS),
            Err(JwksError::Empty)
        ));
        assert!(K8sAttestor::from_jwks("nope", ISS).is_err());
        assert!(matches!(
            K8sAttestor::from_jwks(&issuer().jwks(), " "),
            Err(JwksError::NoIssuer)
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let other = TestIssuer::new(ISS);
        std::fs::write(&path, other.jwks()).unwrap();
        let a = K8sAttestor::load(&path, ISS).unwrap();
        let t = issuer().es256(&issuer().claims("a", "b", NOW));
        assert_eq!(
            verify(&a, &t, NOW).unwrap_err().reason(),
            "k8s_bad_signature"
        );
        std::fs::write(&path, issuer().jwks()).unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(verify(&a, &t, NOW).is_ok());
        // A broken rewrite keeps the last good keys.
        std::fs::write(&path, "garbage").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(5))
            .unwrap();
        assert!(verify(&a, &t, NOW).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn hostile_tokens_never_panic(s in "\\PC{0,300}") {
            let _ = verify(&attestor(), &s, NOW);
        }

        #[test]
        fn hostile_jwt_parts_never_panic(h in prop::collection::vec(any::<u8>(), 0..80),
                                         p in prop::collection::vec(any::<u8>(), 0..200),
                                         sig in prop::collection::vec(any::<u8>(), 0..300)) {
            let t = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(h), URL_SAFE_NO_PAD.encode(p), URL_SAFE_NO_PAD.encode(sig));
            let _ = verify(&attestor(), &t, NOW);
        }

        #[test]
        fn hostile_json_headers_never_panic(alg in "(RS256|ES256|none|\\PC{0,8})", kid in proptest::option::of("\\PC{0,10}")) {
            let h = json!({"alg": alg, "kid": kid});
            let t = format!("{}.{}.AAAA", URL_SAFE_NO_PAD.encode(h.to_string()), URL_SAFE_NO_PAD.encode("{}"));
            let _ = verify(&attestor(), &t, NOW);
        }
    }
}
