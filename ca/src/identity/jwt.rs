//! JWT-SVIDs: minting (ES256, by the control plane's JWT key) and validation against a trust
//! bundle's `jwt-svid` keys, as the SPIFFE JWT-SVID standard has them: `sub` is the SPIFFE ID,
//! `aud` and `exp` are required, the header's `kid` names the bundle key.

use std::collections::BTreeSet;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::identity::bundle::TrustBundle;
use crate::identity::id::{SpiffeId, parse_id};
use crate::identity::signing::authority::Authority;

/// The longest life of a JWT-SVID mayfly mints.
pub const MAX_JWT_TTL: Duration = Duration::from_secs(300);
/// The most audiences one JWT-SVID carries.
pub const MAX_AUDIENCES: usize = 8;
/// The longest audience string accepted.
pub const MAX_AUDIENCE_LEN: usize = 256;
/// Clock skew tolerated on `exp` when validating, in seconds.
pub const LEEWAY_SECS: u64 = 30;
/// The longest token accepted for validation, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a JWT-SVID could not be minted or does not validate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The requested audiences are unacceptable.
    #[error("bad audience: {0}")]
    Audience(String),
    /// No JWT key signs now, or the caller's SVID expires now.
    #[error("cannot mint a JWT-SVID: {0}")]
    Mint(String),
    /// Not a JWT-SVID: bad shape, header or claims.
    #[error("malformed JWT-SVID: {0}")]
    Malformed(String),
    /// The `kid` is not in the bundle of the token's trust domain.
    #[error("the JWT-SVID's key {0:?} is not in the trust bundle")]
    UnknownKey(String),
    /// Signature, expiry or audience check failed.
    #[error("the JWT-SVID does not validate: {0}")]
    Invalid(String),
}

/// The claims mayfly puts in a JWT-SVID.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JwtClaims {
    /// The SPIFFE ID.
    pub sub: String,
    /// The audiences.
    pub aud: Vec<String>,
    /// Expiry (unix seconds).
    pub exp: i64,
    /// Issued at (unix seconds).
    pub iat: i64,
}

/// A minted JWT-SVID.
#[derive(Debug, Clone)]
pub struct MintedJwt {
    /// The compact JWS.
    pub token: String,
    /// Its expiry.
    pub expires_at: OffsetDateTime,
}

/// Checks a request's audiences: 1 to [`MAX_AUDIENCES`] non-empty strings of printable text.
/// A NumericDate claim `name` (RFC 7519 §2: seconds, possibly fractional) as found in a
/// decoded claim set: `None` when absent, `Err(what is wrong)` when not a finite number.
pub fn numeric_claim(name: &str, value: Option<&serde_json::Value>) -> Result<Option<i64>, String> {
    match value {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| format!("{name} is not a number")),
    }
}

pub fn check_audiences(aud: &[String]) -> Result<(), JwtError> {
    if aud.is_empty() {
        return Err(JwtError::Audience(
            "at least one audience is required".into(),
        ));
    }
    if aud.len() > MAX_AUDIENCES {
        return Err(JwtError::Audience(format!(
            "at most {MAX_AUDIENCES} audiences, got {}",
            aud.len()
        )));
    }
    for a in aud {
        if a.trim().is_empty() || a.len() > MAX_AUDIENCE_LEN || a.chars().any(char::is_control) {
            return Err(JwtError::Audience(format!(
                "{a:?}: an audience is 1 to {MAX_AUDIENCE_LEN} bytes of printable text"
            )));
        }
    }
    Ok(())
}

/// Mints a JWT-SVID for `id` with `key` (a [`Role::Jwt`](crate::authority::Role::Jwt) key),
/// living at most [`MAX_JWT_TTL`] and never past `cap` (the caller's own SVID's NotAfter).
pub fn mint(
    key: &Authority,
    id: &SpiffeId,
    audience: &[String],
    now: OffsetDateTime,
    cap: OffsetDateTime,
) -> Result<MintedJwt, JwtError> {
    check_audiences(audience)?;
    let kid = key
        .kid()
        .ok_or_else(|| JwtError::Mint(format!("{} is not a JWT key", key.id)))?;
    let max =
        OffsetDateTime::from_unix_timestamp(now.unix_timestamp() + MAX_JWT_TTL.as_secs() as i64)
            .map_err(|e| JwtError::Mint(e.to_string()))?;
    let expires_at = max.min(cap).min(key.not_after);
    if expires_at <= now {
        return Err(JwtError::Mint("the caller's SVID has expired".into()));
    }
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    header.typ = Some("JWT".into());
    let claims = JwtClaims {
        sub: id.to_string(),
        aud: audience.to_vec(),
        exp: expires_at.unix_timestamp(),
        iat: now.unix_timestamp(),
    };
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(key.key.pkcs8()))
        .map_err(|e| JwtError::Mint(e.to_string()))?;
    Ok(MintedJwt { token, expires_at })
}

/// The SPIFFE ID a token claims, read without checking anything: which bundle to check it with.
pub fn peek_subject(token: &str) -> Result<SpiffeId, JwtError> {
    use base64::Engine;
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed(format!(
            "longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| JwtError::Malformed("not a compact JWS".into()))?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| JwtError::Malformed(format!("payload: {e}")))?;
    #[derive(Deserialize)]
    struct Sub {
        sub: String,
    }
    let s: Sub =
        serde_json::from_slice(&raw).map_err(|e| JwtError::Malformed(format!("claims: {e}")))?;
    parse_id(&s.sub).map_err(|e| JwtError::Malformed(format!("sub: {e}")))
}

/// Validates a JWT-SVID against `bundle` (its trust domain's): algorithm ES256/ES384, a `kid`
/// in the bundle, the signature, `exp` (required), `aud` containing `audience`, and a `sub`
/// in the bundle's trust domain. Returns the SPIFFE ID and every claim.
pub fn validate(
    token: &str,
    audience: &str,
    bundle: &TrustBundle,
) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), JwtError> {
    let id = peek_subject(token)?;
    if id.trust_domain() != bundle.trust_domain() {
        return Err(JwtError::Invalid(format!(
            "{id} is not in the trust domain {}",
            bundle.trust_domain()
        )));
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
    if !matches!(header.alg, Algorithm::ES256 | Algorithm::ES384) {
        return Err(JwtError::Malformed(format!(
            "algorithm {:?} is not accepted",
            header.alg
        )));
    }
    let kid = header
        .kid
        .ok_or_else(|| JwtError::Malformed("no kid in the header".into()))?;
    let key = bundle
        .jwt_keys()
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| JwtError::UnknownKey(kid.clone()))?;
    let dk = DecodingKey::from_ec_components(&key.x, &key.y)
        .map_err(|e| JwtError::Invalid(format!("bundle key {kid}: {e}")))?;
    let mut v = Validation::new(header.alg);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    v.leeway = LEEWAY_SECS;
    let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &dk, &v)
        .map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        JwtError::Invalid(match e.kind() {
            ErrorKind::InvalidAudience => format!("its audience does not include {audience:?}"),
            ErrorKind::ExpiredSignature => "it has expired".into(),
            ErrorKind::InvalidSignature => "its signature does not verify".into(),
            ErrorKind::MissingRequiredClaim(c) => format!("it has no {c:?} claim"),
            _ => e.to_string(),
        })
    })?;
    Ok((id, data.claims))
}

/// Audience sets as a cache key (order and repeats do not matter).
pub fn audience_key(aud: &[String]) -> BTreeSet<String> {
    aud.iter().cloned().collect()
}
