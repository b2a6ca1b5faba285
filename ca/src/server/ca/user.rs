//! People's SVIDs: a verified sign-in ([`SignIn`], checked by `server::oidc`) exchanged for an
//! X.509 SVID `spiffe://<td>/user/<name>` of at most the issuer's `svid_ttl` (15 minutes) and
//! never past the ID token's `exp`, so that only a still-valid sign-in yields one. The sign-in
//! is recorded ([`UserSession`]) before the SVID is signed; the SVID is logged like every other
//! before it is returned.

use std::time::Duration;

use time::OffsetDateTime;

use super::{Ca, Refusal, lock_err};
use crate::identity::signing::issue::{IssueError, IssuedSvid, issue, verify_csr};
use crate::server::metrics::KindLabel;
use crate::server::oidc::{SignIn, SignInError};
use crate::server::store::UserSession;

impl Ca {
    /// Signs the user SVID for `sign_in` with the key of `csr_der` (which must ask for the
    /// sign-in's SPIFFE ID), records the sign-in and audits `user.signed_in`.
    pub fn issue_user_svid(
        &self,
        csr_der: &[u8],
        sign_in: &SignIn,
        peer: &str,
    ) -> Result<IssuedSvid, Refusal> {
        let now = OffsetDateTime::now_utc();
        let result = self.user_svid_inner(csr_der, sign_in, now, peer);
        match &result {
            Ok(_) => {
                self.metrics
                    .issued
                    .get_or_create(&KindLabel {
                        kind: "user".into(),
                    })
                    .inc();
                self.event(
                    "user.signed_in",
                    serde_json::json!({
                        "user": sign_in.id.to_string(), "issuer": sign_in.issuer,
                        "subject": sign_in.subject, "groups": sign_in.groups,
                        "expires_at": sign_in.expires_at, "peer": peer,
                    }),
                );
            }
            Err(r) => self.sign_in_refused(r.reason(), &r.to_string(), Some(&sign_in.issuer), peer),
        }
        result
    }

    /// Audits a refused sign-in (`user.sign_in_refused`) and counts it.
    pub fn sign_in_refused(&self, reason: &str, error: &str, issuer: Option<&str>, peer: &str) {
        self.metrics.refuse(reason);
        self.event(
            "user.sign_in_refused",
            serde_json::json!({ "reason": reason, "error": error, "issuer": issuer, "peer": peer }),
        );
    }

    fn user_svid_inner(
        &self,
        csr_der: &[u8],
        sign_in: &SignIn,
        now: OffsetDateTime,
        peer: &str,
    ) -> Result<IssuedSvid, Refusal> {
        let csr = verify_csr(csr_der)?;
        let left = sign_in.expires_at.saturating_sub(now.unix_timestamp());
        let ttl = sign_in
            .svid_ttl
            .min(Duration::from_secs(u64::try_from(left).unwrap_or(0)));
        if ttl.is_zero() {
            return Err(SignInError::Expired(sign_in.expires_at).into());
        }
        if csr.id != sign_in.id {
            return Err(IssueError::WrongId {
                asked: csr.id.to_string(),
                allowed: sign_in.id.to_string(),
            }
            .into());
        }
        self.store.put_user_session(&UserSession {
            spiffe_id: sign_in.id.to_string(),
            issuer: sign_in.issuer.clone(),
            subject: sign_in.subject.clone(),
            groups: sign_in.groups.clone(),
            signed_in_at: now.unix_timestamp(),
            expires_at: sign_in.expires_at,
        })?;
        let issued = {
            let a = self.authorities.lock().map_err(|_| lock_err())?;
            let signer = a.signer().ok_or(IssueError::NoSigner)?;
            issue(signer, &csr, &sign_in.id, ttl, now)?
        };
        let requester = format!("oidc:{}", sign_in.issuer);
        self.log_issued(&issued, &requester, peer, now, None)?;
        Ok(issued)
    }
}
