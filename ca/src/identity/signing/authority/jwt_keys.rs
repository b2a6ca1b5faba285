//! JWT-SVID signing keys in the authority set: how one is made (a P-256 key whose `kid` is
//! derived from its public key) and how they rotate.

use std::time::Duration;

use time::OffsetDateTime;

use super::{Authorities, Authority, AuthorityError, BACKDATE, Change, Role, State, to_time};
use crate::identity::bundle::JwtKey;
use crate::identity::keys::SecretKey;
use rustls_pki_types::CertificateDer;

/// Lifetime of a JWT signing key: it signs for 5/6 of it and stays in the bundle to the end.
pub const JWT_KEY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

impl Authority {
    /// The JWT `kid` of a [`Role::Jwt`] key.
    pub fn kid(&self) -> Option<&str> {
        match self.role {
            Role::Jwt => self.id.strip_prefix("jwt-"),
            _ => None,
        }
    }
}

/// A JWT signing key: its `kid` is the first 16 bytes (hex) of its public key's SHA-256.
pub(super) fn make_jwt_key(now: OffsetDateTime, state: State) -> Result<Authority, AuthorityError> {
    let key = SecretKey::generate()?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key.key_pair()?);
    let kid = hex::encode(&crate::identity::keys::sha256(&spki)[..16]);
    Ok(Authority {
        id: format!("jwt-{kid}"),
        role: Role::Jwt,
        state,
        cert: CertificateDer::from(spki),
        key,
        parent: None,
        not_before: now - to_time(BACKDATE),
        not_after: now + to_time(JWT_KEY_TTL),
    })
}

impl Authorities {
    /// The key that signs JWT-SVIDs now.
    pub fn jwt_signer(&self) -> Option<&Authority> {
        self.active(Role::Jwt)
    }

    /// The JWT keys published in the trust bundle: every one not yet expired, whatever its state.
    pub fn bundle_jwt_keys(&self, now: OffsetDateTime) -> Vec<JwtKey> {
        self.list
            .iter()
            .filter(|a| a.role == Role::Jwt && a.not_after > now)
            .filter_map(|a| JwtKey::from_spki(a.kid()?, &a.cert))
            .collect()
    }

    /// At most one active JWT key (none in a store written before JWT-SVIDs: the first tick
    /// makes one).
    pub(super) fn check_jwt_keys(&self) -> Result<(), AuthorityError> {
        let jwt = self
            .list
            .iter()
            .filter(|a| a.role == Role::Jwt && a.state == State::Active)
            .count();
        if jwt > 1 {
            return Err(AuthorityError::Inconsistent(format!(
                "{jwt} active JWT keys, expected at most 1"
            )));
        }
        Ok(())
    }

    /// JWT keys: the intermediates' schedule on [`JWT_KEY_TTL`]. Every new key enters the bundle
    /// (a new `spiffe_sequence`) when it is made, before it signs anything.
    pub(super) fn tick_jwt(
        &mut self,
        now: OffsetDateTime,
        changes: &mut Vec<Change>,
    ) -> Result<(), AuthorityError> {
        let active = self.active_index(Role::Jwt);
        let prepared = self
            .list
            .iter()
            .position(|a| a.role == Role::Jwt && a.state == State::Prepared);
        let expired = active.is_none_or(|ai| self.list[ai].not_after <= now);
        if expired {
            // No usable key (a store from before JWT-SVIDs, or a server stopped past the
            // key's life): a prepared one takes over, or a new one is made at once.
            if let Some(ai) = active {
                self.list[ai].state = State::Old;
                changes.push(Change::Retired(Role::Jwt, self.list[ai].id.clone()));
            }
            if let Some(pi) = prepared {
                self.list[pi].state = State::Active;
                changes.push(Change::Activated(Role::Jwt, self.list[pi].id.clone()));
            } else {
                let key = make_jwt_key(now, State::Active)?;
                changes.push(Change::Activated(Role::Jwt, key.id.clone()));
                self.list.push(key);
                self.bundle_sequence += 1;
            }
            return Ok(());
        }
        let Some(ai) = active else {
            return Ok(());
        };
        if prepared.is_none() && now >= self.list[ai].prepare_successor_at() {
            let key = make_jwt_key(now, State::Prepared)?;
            changes.push(Change::Prepared(Role::Jwt, key.id.clone()));
            self.list.push(key);
            self.bundle_sequence += 1;
        } else if let Some(pi) = prepared
            && now >= self.list[ai].hand_over_at()
        {
            self.list[ai].state = State::Old;
            self.list[pi].state = State::Active;
            changes.push(Change::Retired(Role::Jwt, self.list[ai].id.clone()));
            changes.push(Change::Activated(Role::Jwt, self.list[pi].id.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::*;
    use crate::identity::id::parse_trust_domain;

    fn fresh(now: OffsetDateTime) -> Authorities {
        Authorities::init(
            parse_trust_domain("mayfly.local").unwrap(),
            AuthorityConfig::default(),
            now,
        )
        .unwrap()
    }

    fn kids(a: &Authorities, now: OffsetDateTime) -> Vec<String> {
        a.bundle_jwt_keys(now).into_iter().map(|k| k.kid).collect()
    }

    #[test]
    fn a_jwt_key_is_in_the_bundle_before_it_signs_and_after_it_stops() {
        let t0 = OffsetDateTime::now_utc();
        let mut a = fresh(t0);
        let first = a.jwt_signer().unwrap().kid().unwrap().to_owned();
        assert_eq!(kids(&a, t0), vec![first.clone()]);
        // Half-life: the successor is published (a new bundle sequence) but does not sign.
        let t = t0 + time::Duration::days(3) + time::Duration::hours(13);
        let seq = a.bundle_sequence();
        let c = a.tick(t).unwrap();
        assert!(
            c.iter()
                .any(|c| matches!(c, Change::Prepared(Role::Jwt, _))),
            "{c:?}"
        );
        assert_eq!(a.jwt_signer().unwrap().kid().unwrap(), first);
        assert_eq!(kids(&a, t).len(), 2);
        assert!(a.bundle_sequence() > seq);
        // 5/6: the successor signs; the first stays published.
        let t = t0 + time::Duration::days(5) + time::Duration::hours(21);
        a.tick(t).unwrap();
        let second = a.jwt_signer().unwrap().kid().unwrap().to_owned();
        assert_ne!(second, first);
        assert!(kids(&a, t).contains(&first), "the old key left too soon");
        // A token the first key signed last lives 5 minutes; the key outlives it by far.
        let last_signed = t;
        let old = a.all().iter().find(|x| x.kid() == Some(&first)).unwrap();
        assert!(old.not_after > last_signed + time::Duration::hours(1));
        // Expired: it leaves the bundle.
        let t = t0 + time::Duration::days(7) + time::Duration::minutes(1);
        a.tick(t).unwrap();
        assert_eq!(kids(&a, t), vec![second]);
    }

    #[test]
    fn a_set_stored_before_jwt_keys_gets_one_at_the_first_tick() {
        let t0 = OffsetDateTime::now_utc();
        let a = fresh(t0);
        let without: Vec<Authority> = a
            .all()
            .iter()
            .filter(|x| x.role != Role::Jwt)
            .cloned()
            .collect();
        let mut b = Authorities::from_parts(
            a.trust_domain().clone(),
            a.config(),
            without,
            a.bundle_sequence(),
        )
        .unwrap();
        assert!(b.jwt_signer().is_none());
        let c = b.tick(t0).unwrap();
        assert!(
            matches!(c.as_slice(), [Change::Activated(Role::Jwt, _)]),
            "{c:?}"
        );
        assert!(b.jwt_signer().is_some());
        assert_eq!(b.bundle_jwt_keys(t0).len(), 1);
        assert!(b.bundle_sequence() > a.bundle_sequence());
    }
}
