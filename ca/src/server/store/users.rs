//! People's sign-ins: what the control plane learned from an identity provider when it
//! exchanged a verified ID token for a user SVID. Access requests read the groups from here
//! (the user SVID names the person; the groups it signed in with decide what it may ask for),
//! and a sign-in that has expired renews nothing.

use serde::{Deserialize, Serialize};

/// A person's latest sign-in, keyed by the user SVID's SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSession {
    /// The user's SPIFFE ID (`spiffe://<td>/user/...`).
    pub spiffe_id: String,
    /// The ID token's `iss`.
    pub issuer: String,
    /// The ID token's `sub`.
    pub subject: String,
    /// The groups claim at sign-in (empty when the token has none).
    pub groups: Vec<String>,
    /// When the exchange happened (Unix seconds).
    pub signed_in_at: i64,
    /// When the sign-in stops counting: the ID token's `exp` (Unix seconds).
    pub expires_at: i64,
}

impl UserSession {
    /// Whether the sign-in still counts at `now` (Unix seconds).
    pub fn is_valid_at(&self, now: i64) -> bool {
        now < self.expires_at
    }
}
