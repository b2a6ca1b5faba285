//! Kubernetes workload attestation without join tokens.
//!
//! A pod's sidecar sends the projected service-account token the kubelet mounts for it
//! (audience `mayfly`, 10-minute life, refreshed by the kubelet). The control plane verifies
//! it offline, against the cluster issuer's JWK Set (`kubectl get --raw /openid/v1/jwks`), with
//! `jsonwebtoken` on aws-lc-rs: no TokenReview call, so no RBAC and no API-server dependency on the issuance path.
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

use serde_json::Value;
use tracing::warn;

mod jwks;

pub use jwks::JwksError;
use jwks::{Alg, Jwk, b64, parse_jwks, truncate};

use crate::identity::id::{SpiffeId, TrustDomain, parse_issuable_id};

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
        // Checked here so a bad encoding is `malformed`, not a signature that fails.
        b64("signature", s).map_err(|e| AttestError::Malformed(e.to_string()))?;
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
        if !candidates.iter().any(|k| k.verify(alg, signed, s)) {
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
        let time = |name: &str| {
            crate::identity::jwt::numeric_claim(name, c.get(name)).map_err(AttestError::Malformed)
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
    let bytes = b64(what, s).map_err(|e| AttestError::Malformed(e.to_string()))?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| AttestError::Malformed(format!("{what} is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(AttestError::Malformed(format!(
            "{what} is not a JSON object"
        )));
    }
    Ok(v)
}

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;
