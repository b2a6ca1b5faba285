//! One issuer's discovery document and JWK Set, fetched with [`HttpClient`] and cached.
//!
//! The set is fetched on first use, again once it is older than the issuer's `jwks_max_age`
//! (so a key the provider removed stops verifying within that time), and again at once when a
//! token names a `kid` the cache does not hold; fetches are at most one per [`MIN_REFETCH`] (or
//! per `jwks_max_age`, if shorter), so tokens with made-up `kid`s cannot make the control plane
//! hammer the provider. A failed refetch keeps the keys it had.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tracing::{info, warn};

use super::{IssuerConfig, SignInError};
use crate::identity::oidc::{Discovery, HttpClient, Url};

/// The least time between two fetches of one issuer's JWK Set.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);

/// A verification key and the algorithms it may verify.
#[derive(Clone)]
pub struct Key {
    /// `kid`, if the set gives one.
    pub kid: Option<String>,
    /// The algorithms this key verifies: its `alg` if stated, else every signature algorithm
    /// of its type and curve. Never `none` or HMAC.
    pub algs: Vec<Algorithm>,
    /// The key.
    pub key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algs", &self.algs)
            .finish_non_exhaustive()
    }
}

const RSA_ALGS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

fn stated_alg(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        _ => return None,
    })
}

/// The signing keys of a JWK Set: RSA and EC P-256/P-384 keys for signatures; anything else
/// (HMAC secrets, encryption keys, unknown types) is skipped.
pub fn parse_jwks(text: &str) -> Result<Vec<Key>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let list = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no \"keys\" array")?;
    let mut out = Vec::new();
    for k in list {
        if k.get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
        {
            continue;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(k.clone()) else {
            continue;
        };
        let by_type: Vec<Algorithm> = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA_ALGS.to_vec(),
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => continue,
            },
            _ => continue,
        };
        let algs = match jwk.common.key_algorithm {
            None => by_type,
            Some(a) => match stated_alg(a) {
                Some(a) if by_type.contains(&a) => vec![a],
                _ => continue,
            },
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        out.push(Key {
            kid: jwk.common.key_id.clone(),
            algs,
            key,
        });
    }
    Ok(out)
}

#[derive(Default)]
struct State {
    keys: Arc<Vec<Key>>,
    fetched: Option<Instant>,
    tried: Option<Instant>,
    last_error: Option<String>,
}

/// One issuer's keys.
pub struct IssuerKeys {
    cfg: IssuerConfig,
    http: HttpClient,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for IssuerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerKeys")
            .field("issuer", &self.cfg.issuer)
            .finish_non_exhaustive()
    }
}

impl IssuerKeys {
    /// Nothing is fetched until the first token.
    pub fn new(cfg: IssuerConfig, http: HttpClient) -> Self {
        Self {
            cfg,
            http,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// The issuer's configuration.
    pub fn config(&self) -> &IssuerConfig {
        &self.cfg
    }

    fn min_refetch(&self) -> Duration {
        MIN_REFETCH.min(self.cfg.jwks_max_age)
    }

    /// The keys to check a token naming `kid` with: fetched if there are none yet, if they are
    /// older than `jwks_max_age`, or if `kid` is not among them (rate limited).
    pub async fn keys(&self, kid: Option<&str>) -> Result<Arc<Vec<Key>>, SignInError> {
        let mut s = self.state.lock().await;
        let may_try = s.tried.is_none_or(|t| t.elapsed() >= self.min_refetch());
        let stale = s
            .fetched
            .is_none_or(|t| t.elapsed() >= self.cfg.jwks_max_age);
        let missing = kid.is_some_and(|k| !s.keys.iter().any(|x| x.kid.as_deref() == Some(k)));
        if may_try && (stale || missing) {
            s.tried = Some(Instant::now());
            match self.fetch().await {
                Ok(keys) => {
                    info!(issuer = %self.cfg.issuer, keys = keys.len(), "fetched the identity provider's JWK Set");
                    s.keys = Arc::new(keys);
                    s.fetched = Some(Instant::now());
                    s.last_error = None;
                }
                Err(e) => {
                    warn!(issuer = %self.cfg.issuer, error = %e, "cannot fetch the identity provider's keys; keeping those cached");
                    s.last_error = Some(e);
                }
            }
        }
        if s.fetched.is_none() {
            return Err(SignInError::Unavailable(
                s.last_error
                    .clone()
                    .unwrap_or_else(|| "its keys were never fetched".into()),
            ));
        }
        Ok(s.keys.clone())
    }

    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let url = Url::discovery(&self.cfg.issuer).map_err(|e| e.to_string())?;
        let d: Discovery = self
            .http
            .get_json(&url.text)
            .await
            .map_err(|e| e.to_string())?;
        if d.issuer != self.cfg.issuer {
            return Err(format!(
                "the discovery document names the issuer {:?}, not {:?} (they must match exactly)",
                d.issuer, self.cfg.issuer
            ));
        }
        let (status, body) = self
            .http
            .get(&d.jwks_uri)
            .await
            .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("{}: HTTP {status}", d.jwks_uri));
        }
        let text = std::str::from_utf8(&body).map_err(|e| format!("{}: {e}", d.jwks_uri))?;
        let keys = parse_jwks(text).map_err(|e| format!("{}: {e}", d.jwks_uri))?;
        if keys.is_empty() {
            return Err(format!("{}: no RSA or EC signing key", d.jwks_uri));
        }
        Ok(keys)
    }
}
