//! People sign in: the OpenID Connect issuers the control plane trusts, their discovery
//! documents and JWK Sets (cached, refetched on an unknown `kid` at most once per
//! [`keys::MIN_REFETCH`], and at least every `jwks_max_age` so that a key the provider dropped
//! stops verifying), and the verification of an ID token with `jsonwebtoken` (aws-lc-rs).
//!
//! A verified token names a person `spiffe://<td>/user/<claim>`: the configured `user_claim`
//! (`sub` by default) taken as it is, which must be one valid SPIFFE path segment (letters,
//! digits, `.`, `-`, `_`); any other value is refused (`bad_user_claim`), never rewritten.

use std::time::Duration;

use crate::identity::id::SpiffeId;

pub mod config;
pub mod keys;
mod verify;

pub use config::{ConfigError, IssuerConfig, OidcConfig};
pub use verify::{Verifier, peek_issuer};

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECS: i64 = 30;
/// The longest ID token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// The longest (and default) life of a user SVID.
pub const MAX_USER_SVID_TTL: Duration = Duration::from_secs(15 * 60);

/// Why a sign-in was refused. [`SignInError::reason`] is the metric label, the audit event's
/// `reason` and the API's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignInError {
    /// No issuer is configured.
    #[error(
        "sign-in is not enabled on this control plane (start it with --oidc-issuer and --oidc-client-id, or --oidc-config)"
    )]
    NotConfigured,
    /// Not a JWT, bad JSON, a missing or mistyped claim, an algorithm not accepted.
    #[error("malformed ID token: {0}")]
    Malformed(String),
    /// `iss` is not a configured issuer.
    #[error("the ID token's issuer {0:?} is not trusted by this control plane")]
    WrongIssuer(String),
    /// The `kid` is not in the issuer's JWK Set, even after refetching it.
    #[error("the ID token is signed by a key not in the issuer's JWK Set ({0})")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the ID token's signature does not verify")]
    BadSignature,
    /// `aud` does not contain the client ID (or `azp` names another client).
    #[error("the ID token is for {0:?}, not for this control plane's client ID")]
    WrongAudience(Vec<String>),
    /// `exp` has passed.
    #[error("the ID token expired at {0} (unix time): sign in again")]
    Expired(i64),
    /// `nbf` or `iat` is in the future.
    #[error("the ID token is not valid before {0} (unix time)")]
    NotYetValid(i64),
    /// The `nonce` is not the one the flow sent.
    #[error("the ID token's nonce is not the one this sign-in sent")]
    WrongNonce,
    /// The mapped claim cannot name a user.
    #[error("the ID token's {claim} claim cannot name a user: {reason}")]
    BadUserClaim {
        /// The configured `user_claim`.
        claim: String,
        /// Why.
        reason: String,
    },
    /// The identity provider's discovery document or JWK Set cannot be had.
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
}

impl SignInError {
    /// Short reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            SignInError::NotConfigured => "not_configured",
            SignInError::Malformed(_) => "malformed",
            SignInError::WrongIssuer(_) => "wrong_issuer",
            SignInError::UnknownKey(_) => "unknown_key",
            SignInError::BadSignature => "bad_signature",
            SignInError::WrongAudience(_) => "wrong_audience",
            SignInError::Expired(_) => "expired",
            SignInError::NotYetValid(_) => "not_yet_valid",
            SignInError::WrongNonce => "wrong_nonce",
            SignInError::BadUserClaim { .. } => "bad_user_claim",
            SignInError::Unavailable(_) => "idp_unavailable",
        }
    }

    /// HTTP status: 401 for a token that proves nothing, 403 for one this control plane will
    /// not take, 503 when the provider cannot be asked.
    pub fn status(&self) -> u16 {
        match self {
            SignInError::NotConfigured | SignInError::BadUserClaim { .. } => 403,
            SignInError::Unavailable(_) => 503,
            _ => 401,
        }
    }
}

/// What a verified ID token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignIn {
    /// `spiffe://<td>/user/<claim>`.
    pub id: SpiffeId,
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// The groups claim (empty when absent).
    pub groups: Vec<String>,
    /// `exp` (unix seconds).
    pub expires_at: i64,
    /// The longest user SVID this issuer's sign-ins get.
    pub svid_ttl: Duration,
}

#[cfg(test)]
mod tests;
