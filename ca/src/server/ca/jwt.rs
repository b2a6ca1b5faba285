//! JWT-SVIDs: `POST /v1/jwtsvid` signs with the active JWT key of the authority set.

use time::OffsetDateTime;
use tracing::info;

use super::{Ca, Refusal, lock_err};
use crate::identity::jwt::{JwtError, MintedJwt, mint};
use crate::identity::svid::SvidInfo;

impl Ca {
    /// Handles `POST /v1/jwtsvid`: a JWT-SVID for the authenticated caller's own SPIFFE ID,
    /// living at most 5 minutes and never past the caller's SVID. Counted and audited
    /// (`jwt.minted`, with the audiences).
    pub fn mint_jwt(&self, caller: &SvidInfo, audience: &[String]) -> Result<MintedJwt, Refusal> {
        let now = OffsetDateTime::now_utc();
        if caller.id.trust_domain() != self.bundle.load().trust_domain() {
            return Err(Refusal::ForeignPeer(caller.id.to_string()));
        }
        let (minted, kid) = {
            let a = self.authorities.lock().map_err(|_| lock_err())?;
            let key = a
                .jwt_signer()
                .ok_or(JwtError::Mint("no active JWT key".into()))?;
            let minted = mint(key, &caller.id, audience, now, caller.not_after)?;
            (minted, key.kid().unwrap_or_default().to_owned())
        };
        self.metrics.jwt_issued.inc();
        info!(spiffe_id = %caller.id, audience = ?audience, kid = %kid, "JWT-SVID minted");
        self.event_at(
            now,
            "jwt.minted",
            serde_json::json!({
                "spiffe_id": caller.id.to_string(),
                "audience": audience,
                "kid": kid,
                "expires_at": minted.expires_at.unix_timestamp(),
            }),
        );
        Ok(minted)
    }
}
