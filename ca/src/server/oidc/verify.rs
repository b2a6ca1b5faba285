//! Checking an ID token: shape and header first, then the issuer (read from the unverified
//! payload only to pick the keys), the key (`kid`, refetching the JWK Set once if it is
//! unknown), the signature with `jsonwebtoken` (the algorithm must be one the key allows: no
//! `none`, no HMAC with a public key), and only then the claims: `iss` exact, `aud` contains the
//! client ID (and `azp`, when present or when there are several audiences, is the client ID),
//! `exp` required, `nbf` and `iat` with [`LEEWAY_SECS`], `nonce` when the flow sent one, the
//! user and groups claims.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::keys::IssuerKeys;
use super::{IssuerConfig, LEEWAY_SECS, MAX_TOKEN_LEN, OidcConfig, SignIn, SignInError};
use crate::identity::id::{TrustDomain, user_id};
use crate::identity::oidc::{FetchError, HttpClient};

/// The trusted issuers and their keys.
#[derive(Debug, Default)]
pub struct Verifier {
    issuers: Vec<IssuerKeys>,
}

fn short(s: &str) -> String {
    s.chars().take(128).collect()
}

/// The unverified payload's `iss`, if it can be read (for the refusal's audit record).
pub fn peek_issuer(token: &str) -> Option<String> {
    let payload = token.trim().split('.').nth(1)?;
    let raw = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    v.get("iss").and_then(Value::as_str).map(short)
}

fn payload(token: &str) -> Result<Map<String, Value>, SignInError> {
    let p = token
        .split('.')
        .nth(1)
        .ok_or_else(|| SignInError::Malformed("not a JWS compact serialization".into()))?;
    let raw = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|e| SignInError::Malformed(format!("payload is not base64url: {e}")))?;
    serde_json::from_slice(&raw)
        .map_err(|e| SignInError::Malformed(format!("payload is not a JSON object: {e}")))
}

impl Verifier {
    /// A verifier for `cfg`'s issuers; nothing is fetched yet.
    pub fn new(cfg: &OidcConfig) -> Result<Self, FetchError> {
        let mut issuers = Vec::new();
        for i in &cfg.issuers {
            let http = HttpClient::new(i.ca_file.as_deref())?;
            issuers.push(IssuerKeys::new(i.clone(), http));
        }
        Ok(Self { issuers })
    }

    /// Whether any issuer is configured.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// The configured issuers.
    pub fn issuers(&self) -> impl Iterator<Item = &IssuerConfig> {
        self.issuers.iter().map(IssuerKeys::config)
    }

    /// Verifies `token` at `now` (unix seconds); `nonce` is the one the flow sent, if any.
    pub async fn verify(
        &self,
        token: &str,
        td: &TrustDomain,
        nonce: Option<&str>,
        now: i64,
    ) -> Result<SignIn, SignInError> {
        if self.issuers.is_empty() {
            return Err(SignInError::NotConfigured);
        }
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(SignInError::Malformed(format!(
                "longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        if token.split('.').count() != 3 {
            return Err(SignInError::Malformed(
                "not a JWS compact serialization (three base64url parts)".into(),
            ));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| SignInError::Malformed(format!("header: {e}")))?;
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(SignInError::Malformed(format!(
                "algorithm {:?} is not accepted (a public-key signature is required)",
                header.alg
            )));
        }
        let unverified = payload(token)?;
        let iss = unverified
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| SignInError::Malformed("no iss claim".into()))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.config().issuer == iss)
            .ok_or_else(|| SignInError::WrongIssuer(short(iss)))?;
        let kid = header.kid.as_deref();
        let keys = issuer.keys(kid).await?;
        let candidates: Vec<_> = keys
            .iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .filter(|k| k.algs.contains(&header.alg))
            .collect();
        if candidates.is_empty() {
            return Err(SignInError::UnknownKey(match kid {
                Some(k) => format!("kid {:?}, {:?}", short(k), header.alg),
                None => format!("no kid, {:?}", header.alg),
            }));
        }
        let mut v = Validation::new(header.alg);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        let mut claims = None;
        for k in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, &v) {
                Ok(d) => {
                    claims = Some(d.claims);
                    break;
                }
                Err(e) => match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => {}
                    _ => return Err(SignInError::Malformed(e.to_string())),
                },
            }
        }
        let claims = claims.ok_or(SignInError::BadSignature)?;
        check_claims(issuer.config(), &claims, td, nonce, now)
    }
}

fn check_claims(
    cfg: &IssuerConfig,
    c: &Map<String, Value>,
    td: &TrustDomain,
    nonce: Option<&str>,
    now: i64,
) -> Result<SignIn, SignInError> {
    let malformed = |m: &str| SignInError::Malformed(m.to_owned());
    if c.get("iss").and_then(Value::as_str) != Some(cfg.issuer.as_str()) {
        return Err(SignInError::WrongIssuer(short(
            c.get("iss").and_then(Value::as_str).unwrap_or_default(),
        )));
    }
    let aud: Vec<String> = match c.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(short))
            .collect::<Option<_>>()
            .ok_or_else(|| malformed("aud holds a non-string"))?,
        _ => return Err(malformed("no aud claim")),
    };
    if !aud.contains(&cfg.client_id) {
        return Err(SignInError::WrongAudience(aud));
    }
    match c.get("azp") {
        Some(Value::String(azp)) if *azp == cfg.client_id => {}
        Some(_) => return Err(SignInError::WrongAudience(aud)),
        None if aud.len() > 1 => return Err(SignInError::WrongAudience(aud)),
        None => {}
    }
    let time = |name: &str| {
        crate::identity::jwt::numeric_claim(name, c.get(name)).map_err(SignInError::Malformed)
    };
    let exp = time("exp")?.ok_or_else(|| malformed("no exp claim: ID tokens must expire"))?;
    if now > exp.saturating_add(LEEWAY_SECS) {
        return Err(SignInError::Expired(exp));
    }
    for name in ["nbf", "iat"] {
        if let Some(t) = time(name)?
            && t > now.saturating_add(LEEWAY_SECS)
        {
            return Err(SignInError::NotYetValid(t));
        }
    }
    if let Some(want) = nonce
        && c.get("nonce").and_then(Value::as_str) != Some(want)
    {
        return Err(SignInError::WrongNonce);
    }
    let subject = c
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| malformed("no sub claim"))?;
    let bad_user = |reason: String| SignInError::BadUserClaim {
        claim: cfg.user_claim.clone(),
        reason,
    };
    let name = c
        .get(&cfg.user_claim)
        .and_then(Value::as_str)
        .ok_or_else(|| bad_user("absent or not a string".into()))?;
    let id = user_id(td, name).map_err(|e| bad_user(e.to_string()))?;
    let groups = match c.get(&cfg.groups_claim) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(g)) => vec![g.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                SignInError::Malformed(format!("{} holds a non-string", cfg.groups_claim))
            })?,
        Some(_) => {
            return Err(SignInError::Malformed(format!(
                "{} is not a list of strings",
                cfg.groups_claim
            )));
        }
    };
    Ok(SignIn {
        id,
        issuer: cfg.issuer.clone(),
        subject: short(subject),
        groups,
        expires_at: exp,
        svid_ttl: cfg.svid_ttl.min(Duration::from_secs(
            u64::try_from(exp.saturating_sub(now)).unwrap_or(0),
        )),
    })
}
