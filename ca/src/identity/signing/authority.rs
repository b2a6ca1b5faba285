//! The CA hierarchy: a self-signed root and intermediate signing CAs, and their rotation.
//!
//! Every authority goes through `prepared -> active -> old`, then leaves:
//!
//! - **Roots** are trust anchors: they are in the trust bundle from the moment they are
//!   prepared. A root is prepared at half of the active root's life and activated at 5/6 of it,
//!   so a new root is in every sidecar's bundle for 1/3 of a root lifetime (4 months at the
//!   1-year default) before anything it signed is presented. The old root stays in the bundle
//!   until it expires, which outlasts everything it signed (intermediates are capped at their
//!   root's NotAfter).
//! - **Intermediates** sign SVIDs and travel in the SVID chain, not in the bundle. They follow
//!   the same schedule (prepared at 1/2, active at 5/6 of the active one's life: 8 h of
//!   preparation at the 24 h default), which leaves 1/6 of a lifetime (4 h) between the last
//!   SVID an intermediate signs and its expiry: more than the 60-minute SVID TTL cap, so an
//!   SVID is never cut short by its issuer's expiry.
//!
//! - **JWT keys** sign JWT-SVIDs (ES256). They are not certificates: each is a P-256 key with a
//!   `kid`, published in the trust bundle as a `jwt-svid` JWK from the moment it is prepared. They
//!   follow the same schedule on their own lifetime ([`JWT_KEY_TTL`], 7 days): prepared at 1/2,
//!   active at 5/6, and kept in the bundle until they expire, 1/6 of a lifetime after they stop
//!   signing: far more than the 5-minute JWT-SVID cap, so a token outlives no key in the bundle.
//!
//! [`Authorities::tick`] moves the state machine; it is a pure function of the current time.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::identity::id::{TrustDomain, TrustDomainId};
use crate::identity::keys::{KeyError, SecretKey, random_serial};

mod display;
mod jwt_keys;
pub use jwt_keys::JWT_KEY_TTL;
use jwt_keys::make_jwt_key;

/// How far NotBefore is backdated on every certificate mayfly signs, for clock skew.
pub const BACKDATE: Duration = Duration::from_secs(30);

/// Lifetimes of the authorities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthorityConfig {
    /// Lifetime of a root CA (default 365 days).
    pub root_ttl: Duration,
    /// Lifetime of an intermediate CA (default 24 h).
    pub intermediate_ttl: Duration,
}

impl Default for AuthorityConfig {
    fn default() -> Self {
        Self {
            root_ttl: Duration::from_secs(365 * 24 * 3600),
            intermediate_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Root or intermediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Self-signed trust anchor, published in the bundle.
    Root,
    /// Signs SVIDs; signed by a root.
    Intermediate,
    /// Signs JWT-SVIDs; its public key is published in the bundle under its `kid`.
    Jwt,
}

/// Where an authority is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Created and published (roots: in the bundle) but not signing yet.
    Prepared,
    /// The one that signs.
    Active,
    /// Replaced; kept (roots: in the bundle) until it expires.
    Old,
}

/// One CA: its certificate, its key, and its place in the rotation.
#[derive(Debug, Clone)]
pub struct Authority {
    /// Stable identifier: role and the certificate's serial.
    pub id: String,
    /// Root or intermediate.
    pub role: Role,
    /// Rotation state.
    pub state: State,
    /// The CA certificate; for a [`Role::Jwt`] key, its SubjectPublicKeyInfo (DER).
    pub cert: CertificateDer<'static>,
    /// The CA's private key (never leaves the control plane).
    pub key: SecretKey,
    /// The `id` of the root that signed it (intermediates only).
    pub parent: Option<String>,
    /// Validity start.
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
}

impl Authority {
    fn life(&self) -> time::Duration {
        self.not_after - self.not_before
    }

    /// When this authority's successor is prepared.
    pub fn prepare_successor_at(&self) -> OffsetDateTime {
        self.not_before + self.life() / 2
    }

    /// When this authority's successor takes over.
    pub fn hand_over_at(&self) -> OffsetDateTime {
        self.not_before + self.life() * 5 / 6
    }

    /// An rcgen issuer for signing with this authority.
    pub fn issuer(&self) -> Result<Issuer<'static, KeyPair>, AuthorityError> {
        Issuer::from_ca_cert_der(&self.cert, self.key.key_pair()?).map_err(AuthorityError::Sign)
    }
}

/// What went wrong creating or using an authority.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// Key generation or loading failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Certificate signing failed.
    #[error("cannot sign CA certificate: {0}")]
    Sign(rcgen::Error),
    /// The configured lifetimes make no sense.
    #[error("invalid CA configuration: {0}")]
    Config(String),
    /// The set of authorities read from the store is inconsistent.
    #[error("authority set is inconsistent: {0}")]
    Inconsistent(String),
}

/// A change [`Authorities::tick`] made, for logs and audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new authority was created in the prepared state.
    Prepared(Role, String),
    /// An authority became the active one.
    Activated(Role, String),
    /// An authority was replaced and is now old.
    Retired(Role, String),
    /// An expired authority was removed.
    Removed(Role, String),
    /// The active root had expired with no successor: a new root was made. Sidecars holding only
    /// the old bundle must bootstrap again.
    EmergencyRoot(String),
}

/// All authorities of one trust domain.
#[derive(Debug, Clone)]
pub struct Authorities {
    trust_domain: TrustDomain,
    config: AuthorityConfig,
    list: Vec<Authority>,
    /// Bumped on every change of the bundle's roots (`spiffe_sequence`).
    bundle_sequence: u64,
}

fn to_time(d: Duration) -> time::Duration {
    time::Duration::new(
        i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        d.subsec_nanos() as i32,
    )
}

fn ca_params(
    td: &TrustDomain,
    role: Role,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, AuthorityError> {
    let mut p = CertificateParams::default();
    let serial = random_serial();
    let serial_text = hex::encode(serial.to_bytes());
    p.serial_number = Some(serial);
    p.not_before = not_before;
    p.not_after = not_after;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "mayfly");
    let cn = match role {
        Role::Root => format!("mayfly root CA {td}"),
        Role::Intermediate | Role::Jwt => format!("mayfly intermediate CA {td}"),
    };
    p.distinguished_name.push(DnType::CommonName, cn);
    // A unique subject per CA (as SPIRE does): rotation never yields two CAs with one name.
    // X520SerialNumber must be a PrintableString (hex digits are printable).
    let serial_value = rcgen::DnValue::PrintableString(
        serial_text
            .try_into()
            .map_err(|e| AuthorityError::Config(format!("serial as PrintableString: {e}")))?,
    );
    p.distinguished_name
        .push(DnType::CustomDnType(vec![2, 5, 4, 5]), serial_value);
    p.is_ca = match role {
        Role::Root => IsCa::Ca(BasicConstraints::Unconstrained),
        Role::Intermediate | Role::Jwt => IsCa::Ca(BasicConstraints::Constrained(0)),
    };
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    p.extended_key_usages = Vec::new();
    p.name_constraints = None;
    let td_id = TrustDomainId(td).to_string();
    p.subject_alt_names =
        vec![SanType::URI(td_id.try_into().map_err(|e| {
            AuthorityError::Config(format!("trust domain ID: {e}"))
        })?)];
    p.use_authority_key_identifier_extension = role == Role::Intermediate;
    Ok(p)
}

fn make_root(
    td: &TrustDomain,
    ttl: Duration,
    now: OffsetDateTime,
    state: State,
) -> Result<Authority, AuthorityError> {
    let key = SecretKey::generate()?;
    let kp = key.key_pair()?;
    let not_before = now - to_time(BACKDATE);
    let not_after = now + to_time(ttl);
    let params = ca_params(td, Role::Root, not_before, not_after)?;
    let cert = params.self_signed(&kp).map_err(AuthorityError::Sign)?;
    let cert = cert.der().clone();
    Ok(Authority {
        id: authority_id(Role::Root, &cert),
        role: Role::Root,
        state,
        cert,
        key,
        parent: None,
        not_before,
        not_after,
    })
}

fn make_intermediate(
    td: &TrustDomain,
    root: &Authority,
    ttl: Duration,
    now: OffsetDateTime,
    state: State,
) -> Result<Authority, AuthorityError> {
    let key = SecretKey::generate()?;
    let kp = key.key_pair()?;
    let not_before = now - to_time(BACKDATE);
    let not_after = (now + to_time(ttl)).min(root.not_after);
    let params = ca_params(td, Role::Intermediate, not_before, not_after)?;
    let issuer = root.issuer()?;
    let cert = params
        .signed_by(&kp, &issuer)
        .map_err(AuthorityError::Sign)?;
    let cert = cert.der().clone();
    Ok(Authority {
        id: authority_id(Role::Intermediate, &cert),
        role: Role::Intermediate,
        state,
        cert,
        key,
        parent: Some(root.id.clone()),
        not_before,
        not_after,
    })
}

fn authority_id(role: Role, cert: &[u8]) -> String {
    let serial = crate::identity::svid::validity(cert)
        .ok()
        .and(x509_serial(cert))
        .unwrap_or_default();
    let prefix = match role {
        Role::Root => "root",
        Role::Intermediate => "int",
        Role::Jwt => "jwt",
    };
    format!("{prefix}-{}", &serial[..serial.len().min(12)])
}

fn x509_serial(cert: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    Some(crate::identity::svid::serial_hex(c.raw_serial()))
}

impl Authorities {
    /// Creates a fresh hierarchy: one active root and one active intermediate.
    pub fn init(
        trust_domain: TrustDomain,
        config: AuthorityConfig,
        now: OffsetDateTime,
    ) -> Result<Self, AuthorityError> {
        if config.intermediate_ttl >= config.root_ttl {
            return Err(AuthorityError::Config(
                "the intermediate TTL must be shorter than the root TTL".into(),
            ));
        }
        if config.intermediate_ttl < Duration::from_secs(6 * 3600) {
            return Err(AuthorityError::Config(
                "the intermediate TTL must be at least 6h (its last 1/6 must outlast the 60 min SVID cap)"
                    .into(),
            ));
        }
        let root = make_root(&trust_domain, config.root_ttl, now, State::Active)?;
        let int = make_intermediate(
            &trust_domain,
            &root,
            config.intermediate_ttl,
            now,
            State::Active,
        )?;
        let jwt = make_jwt_key(now, State::Active)?;
        Ok(Self {
            trust_domain,
            config,
            list: vec![root, int, jwt],
            bundle_sequence: 1,
        })
    }

    /// Rebuilds the set from stored authorities.
    pub fn from_parts(
        trust_domain: TrustDomain,
        config: AuthorityConfig,
        list: Vec<Authority>,
        bundle_sequence: u64,
    ) -> Result<Self, AuthorityError> {
        let s = Self {
            trust_domain,
            config,
            list,
            bundle_sequence,
        };
        for role in [Role::Root, Role::Intermediate] {
            let n = s
                .list
                .iter()
                .filter(|a| a.role == role && a.state == State::Active)
                .count();
            if n != 1 {
                return Err(AuthorityError::Inconsistent(format!(
                    "{n} active {role:?} authorities, expected 1"
                )));
            }
        }
        s.check_jwt_keys()?;
        Ok(s)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The lifetimes in force.
    pub fn config(&self) -> AuthorityConfig {
        self.config
    }

    /// Every authority, roots first.
    pub fn all(&self) -> &[Authority] {
        &self.list
    }

    /// The bundle's `spiffe_sequence`.
    pub fn bundle_sequence(&self) -> u64 {
        self.bundle_sequence
    }

    fn active_index(&self, role: Role) -> Option<usize> {
        self.list
            .iter()
            .position(|a| a.role == role && a.state == State::Active)
    }

    /// The active authority of a role.
    pub fn active(&self, role: Role) -> Option<&Authority> {
        self.active_index(role).map(|i| &self.list[i])
    }

    /// The intermediate that signs SVIDs now.
    pub fn signer(&self) -> Option<&Authority> {
        self.active(Role::Intermediate)
    }

    /// The roots published in the trust bundle: every root not yet expired, whatever its state.
    pub fn bundle_roots(&self, now: OffsetDateTime) -> Vec<CertificateDer<'static>> {
        self.list
            .iter()
            .filter(|a| a.role == Role::Root && a.not_after > now)
            .map(|a| a.cert.clone())
            .collect()
    }

    /// The next time [`Self::tick`] has something to do (at most an hour from `now`).
    pub fn next_change_at(&self, now: OffsetDateTime) -> OffsetDateTime {
        let mut t = now + time::Duration::hours(1);
        for a in &self.list {
            t = t.min(match a.state {
                State::Active if self.has_prepared(a.role) => a.hand_over_at(),
                State::Active => a.prepare_successor_at(),
                State::Old | State::Prepared => a.not_after,
            });
        }
        t
    }

    fn has_prepared(&self, role: Role) -> bool {
        self.list
            .iter()
            .any(|a| a.role == role && a.state == State::Prepared)
    }

    /// Advances rotation to `now`: prepares, activates, retires and removes authorities.
    pub fn tick(&mut self, now: OffsetDateTime) -> Result<Vec<Change>, AuthorityError> {
        let mut changes = Vec::new();
        self.tick_roots(now, &mut changes)?;
        self.tick_intermediates(now, &mut changes)?;
        self.tick_jwt(now, &mut changes)?;
        // Remove what has expired (never the active ones: tick_* replaced them above).
        let before = self.list.len();
        let mut removed = Vec::new();
        self.list.retain(|a| {
            let keep = a.state == State::Active || a.not_after > now;
            if !keep {
                removed.push(Change::Removed(a.role, a.id.clone()));
            }
            keep
        });
        if removed
            .iter()
            .any(|c| matches!(c, Change::Removed(Role::Root | Role::Jwt, _)))
        {
            self.bundle_sequence += 1;
        }
        debug_assert!(self.list.len() + removed.len() == before);
        changes.extend(removed);
        Ok(changes)
    }

    fn tick_roots(
        &mut self,
        now: OffsetDateTime,
        changes: &mut Vec<Change>,
    ) -> Result<(), AuthorityError> {
        let Some(ai) = self.active_index(Role::Root) else {
            return Err(AuthorityError::Inconsistent("no active root".into()));
        };
        let active = &self.list[ai];
        let prepared = self
            .list
            .iter()
            .position(|a| a.role == Role::Root && a.state == State::Prepared);
        if active.not_after <= now && prepared.is_none() {
            let root = make_root(&self.trust_domain, self.config.root_ttl, now, State::Active)?;
            changes.push(Change::EmergencyRoot(root.id.clone()));
            self.list[ai].state = State::Old;
            self.list.push(root);
            self.bundle_sequence += 1;
            self.replace_intermediate(now, changes)?;
            return Ok(());
        }
        if prepared.is_none() && now >= active.prepare_successor_at() {
            let root = make_root(
                &self.trust_domain,
                self.config.root_ttl,
                now,
                State::Prepared,
            )?;
            changes.push(Change::Prepared(Role::Root, root.id.clone()));
            self.list.push(root);
            self.bundle_sequence += 1;
            return Ok(());
        }
        if let Some(pi) = prepared
            && now >= self.list[ai].hand_over_at()
        {
            self.list[ai].state = State::Old;
            self.list[pi].state = State::Active;
            changes.push(Change::Retired(Role::Root, self.list[ai].id.clone()));
            changes.push(Change::Activated(Role::Root, self.list[pi].id.clone()));
            // Intermediates of the old root stop signing now: the next one chains to the new root.
            self.replace_intermediate(now, changes)?;
        }
        Ok(())
    }

    /// Makes a new active intermediate under the active root at once, retiring the current one
    /// and discarding any prepared one.
    fn replace_intermediate(
        &mut self,
        now: OffsetDateTime,
        changes: &mut Vec<Change>,
    ) -> Result<(), AuthorityError> {
        let root = self
            .active(Role::Root)
            .ok_or_else(|| AuthorityError::Inconsistent("no active root".into()))?;
        let int = make_intermediate(
            &self.trust_domain,
            root,
            self.config.intermediate_ttl,
            now,
            State::Active,
        )?;
        self.list
            .retain(|a| !(a.role == Role::Intermediate && a.state == State::Prepared));
        for a in &mut self.list {
            if a.role == Role::Intermediate && a.state == State::Active {
                a.state = State::Old;
                changes.push(Change::Retired(Role::Intermediate, a.id.clone()));
            }
        }
        changes.push(Change::Activated(Role::Intermediate, int.id.clone()));
        self.list.push(int);
        Ok(())
    }

    fn tick_intermediates(
        &mut self,
        now: OffsetDateTime,
        changes: &mut Vec<Change>,
    ) -> Result<(), AuthorityError> {
        let Some(ai) = self.active_index(Role::Intermediate) else {
            return self.replace_intermediate(now, changes);
        };
        if self.list[ai].not_after <= now {
            return self.replace_intermediate(now, changes);
        }
        let prepared = self
            .list
            .iter()
            .position(|a| a.role == Role::Intermediate && a.state == State::Prepared);
        if prepared.is_none() && now >= self.list[ai].prepare_successor_at() {
            let root = self
                .active(Role::Root)
                .ok_or_else(|| AuthorityError::Inconsistent("no active root".into()))?;
            let int = make_intermediate(
                &self.trust_domain,
                root,
                self.config.intermediate_ttl,
                now,
                State::Prepared,
            )?;
            changes.push(Change::Prepared(Role::Intermediate, int.id.clone()));
            self.list.push(int);
        } else if let Some(pi) = prepared
            && now >= self.list[ai].hand_over_at()
        {
            self.list[ai].state = State::Old;
            self.list[pi].state = State::Active;
            changes.push(Change::Retired(
                Role::Intermediate,
                self.list[ai].id.clone(),
            ));
            changes.push(Change::Activated(
                Role::Intermediate,
                self.list[pi].id.clone(),
            ));
        }
        Ok(())
    }
}
