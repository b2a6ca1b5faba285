//! The control plane's core: authorities, issuance, tokens, and the state the API serves.
//!
//! Below `distribution`, `audit`, `http` and `admin`, which are built on [`Ca`]; what the `Ca`
//! holds for them is defined below it too ([`Pending`] here, the
//! [`Distribution`](super::policy::Distribution) in `policy`).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tracing::{debug, info, warn};

mod jwt;
mod pending;
mod refusal;
mod settings;
mod user;
pub use refusal::{Caller, Refusal};
pub use settings::{CaSettings, DEFAULT_MAX_CONNECTIONS};

pub use pending::Pending;

use super::metrics::{AuthorityLabel, KindLabel, Metrics};
use crate::identity::bundle::{BundleSet, DEFAULT_REFRESH_HINT, TrustBundle};
use crate::identity::id::{SpiffeId, is_user, parse_id, parse_workload_id};
use crate::identity::keys::SecretKey;
use crate::identity::signing::authority::{Authorities, Change, Role};
use crate::identity::signing::issue::{
    IssueError, IssuedSvid, issue, issue_control_plane_svid, verify_csr,
};
use crate::identity::tls::{Credentials, Svid};
use crate::identity::token::JoinToken;
use crate::identity::verify::SharedBundles;
use crate::server::store::{
    IssuedRecord, Store, StoreError, TokenClaim, TokenRecord, TokenRefusal,
};

/// Why a join token could not be created. Its text is what `mayfly-ca token create` shows.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenCreateError {
    /// The SPIFFE ID is not one a token may be created for.
    #[error(transparent)]
    Id(#[from] crate::identity::id::IdError),
    /// The TTL is zero or over the configured maximum.
    #[error(
        "token TTL must be between 1s and {} (the configured maximum)",
        crate::identity::duration::format_duration(*max)
    )]
    Ttl {
        /// The configured maximum (`--token-max-ttl`).
        max: Duration,
    },
    /// The SPIFFE ID is in another trust domain.
    #[error("{id} is not in this control plane's trust domain {trust_domain}")]
    OtherTrustDomain {
        /// The SPIFFE ID.
        id: String,
        /// This control plane's trust domain.
        trust_domain: String,
    },
    /// The SPIFFE ID names a person: only a sign-in yields those.
    #[error(
        "{0} is a person's identity (/user/...): people sign in with `mayfly login`; no join token is made for it"
    )]
    User(String),
    /// There is no active root CA to pin.
    #[error("no active root")]
    NoActiveRoot,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The running control plane.
pub struct Ca {
    store: Arc<dyn Store>,
    authorities: Mutex<Authorities>,
    /// The store's authorities change counter that `authorities` reflects: a rotation is saved
    /// only if it still holds (another replica rotated otherwise).
    authorities_seen: AtomicI64,
    bundle: ArcSwap<TrustBundle>,
    bundles: SharedBundles,
    jwks: ArcSwap<String>,
    creds: Arc<Credentials>,
    ca_id: SpiffeId,
    settings: CaSettings,
    /// Metrics.
    pub metrics: Metrics,
    /// Central policy and grants.
    pub dist: Arc<super::policy::Distribution>,
    /// What the control plane still has to write on its own audit chain (anchors, lost events).
    pub pending: Pending,
    /// The sidecars' inbound endpoints, by SPIFFE ID.
    pub registry: super::registry::Registry,
}

fn lock_err() -> StoreError {
    StoreError::Db("authority lock poisoned".into())
}

impl Ca {
    /// Loads the authorities from the store, rotates them to now, and issues the control
    /// plane's own SVID.
    pub fn start(
        store: Arc<dyn Store>,
        authorities: Authorities,
        settings: CaSettings,
        dist: Arc<super::policy::Distribution>,
    ) -> Result<Arc<Self>, Refusal> {
        let td = authorities.trust_domain().clone();
        let ca_id = parse_id(&format!(
            "spiffe://{td}{}",
            crate::identity::api::CA_ID_PATH
        ))
        .map_err(|e| Refusal::Issue(IssueError::BadId(e)))?;
        let now = OffsetDateTime::now_utc();
        let bundle = Self::make_bundle(&authorities, now)?;
        let metrics = Metrics::new();
        let ca = Arc::new(Self {
            bundles: Arc::new(ArcSwap::from_pointee(BundleSet::single(bundle.clone()))),
            jwks: ArcSwap::from_pointee(bundle.to_jwks()),
            bundle: ArcSwap::from_pointee(bundle),
            authorities: Mutex::new(authorities),
            authorities_seen: AtomicI64::new(0),
            creds: Credentials::new(),
            ca_id,
            settings,
            registry: super::registry::Registry::new(
                store.clone(),
                metrics.endpoints_known.clone(),
            ),
            store,
            metrics,
            dist,
            pending: Pending::default(),
        });
        // The counter is read before the set, so a rotation by another replica in between is
        // seen as one when this replica next saves.
        ca.reload_authorities()?;
        ca.registry
            .reload(now)
            .map_err(|e| Refusal::Store(StoreError::Db(e.to_string())))?;
        ca.rotate(now)?;
        ca.renew_own_svid(now)?;
        Ok(ca)
    }

    fn make_bundle(a: &Authorities, now: OffsetDateTime) -> Result<TrustBundle, Refusal> {
        TrustBundle::new(
            a.trust_domain().clone(),
            a.bundle_roots(now),
            a.bundle_sequence(),
            DEFAULT_REFRESH_HINT,
        )
        .map(|b| b.with_jwt_keys(a.bundle_jwt_keys(now)))
        .map_err(|e| Refusal::Store(StoreError::Corrupt(e.to_string())))
    }

    /// The control plane's own SPIFFE ID.
    pub fn ca_id(&self) -> &SpiffeId {
        &self.ca_id
    }

    /// The server's own SVID (for its TLS listener).
    pub fn credentials(&self) -> Arc<Credentials> {
        self.creds.clone()
    }

    /// The trust bundles the listener verifies clients against.
    pub fn bundles(&self) -> SharedBundles {
        self.bundles.clone()
    }

    /// The current bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// The current bundle as a JWK Set (cached).
    pub fn jwks(&self) -> Arc<String> {
        self.jwks.load_full()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Settings.
    pub fn settings(&self) -> &CaSettings {
        &self.settings
    }

    /// Advances authority rotation to `now`, persisting and publishing any change.
    /// Returns when the next change is due.
    ///
    /// With several replicas, one rotates: the change is saved only if no other replica
    /// saved a set since this one's (compare-and-set in the store); the loser discards its
    /// change, loads the winner's set and ticks that instead.
    pub fn rotate(&self, now: OffsetDateTime) -> Result<OffsetDateTime, Refusal> {
        for _ in 0..3 {
            let mut a = self.authorities.lock().map_err(|_| lock_err())?;
            let mut next = a.clone();
            let changes = next
                .tick(now)
                .map_err(|e| Refusal::Store(StoreError::Corrupt(e.to_string())))?;
            if !changes.is_empty() {
                // A change that cannot be saved (a full disk) is not made: the next tick makes
                // it again and saves it, instead of running on authorities the store never
                // learns of.
                let seen = self.authorities_seen.load(Ordering::SeqCst);
                match self.store.replace_authorities(&next, seen)? {
                    Some(n) => {
                        self.authorities_seen.store(n, Ordering::SeqCst);
                        *a = next;
                    }
                    None => {
                        drop(a);
                        info!("another replica rotated the CA authorities first; taking its set");
                        self.reload_authorities()?;
                        continue;
                    }
                }
                for c in &changes {
                    match c {
                        Change::EmergencyRoot(id) => warn!(
                            authority = %id,
                            "the active root had expired with no successor; a new root was made: sidecars must bootstrap again"
                        ),
                        other => info!(change = %other, "CA rotation"),
                    }
                    self.event_at(
                        now,
                        "ca.rotation",
                        serde_json::json!({ "change": c.to_string() }),
                    );
                }
            }
            self.publish(&a, now)?;
            return Ok(a.next_change_at(now));
        }
        Err(Refusal::RotationContended)
    }

    /// Takes the store's authority set (another replica rotated): the bundle served and the
    /// signer follow it. Returns whether the bundle's roots changed.
    pub fn reload_authorities(&self) -> Result<bool, Refusal> {
        let seen = self.store.changes()?.authorities;
        let config = self.authorities.lock().map_err(|_| lock_err())?.config();
        let loaded = self
            .store
            .load_authorities(config)?
            .ok_or(StoreError::NotInitialised)?;
        let mut a = self.authorities.lock().map_err(|_| lock_err())?;
        *a = loaded;
        self.authorities_seen.store(seen, Ordering::SeqCst);
        self.publish(&a, OffsetDateTime::now_utc())
    }

    /// The store's authorities change counter this replica's set reflects.
    pub fn authorities_seen(&self) -> i64 {
        self.authorities_seen.load(Ordering::SeqCst)
    }

    /// Serves the bundle of `a` at `now` and updates the authority metrics; returns whether
    /// the bundle's roots changed.
    fn publish(&self, a: &Authorities, now: OffsetDateTime) -> Result<bool, Refusal> {
        let bundle = Self::make_bundle(a, now)?;
        let changed = {
            let served = self.bundle.load();
            bundle.roots() != served.roots() || bundle.jwt_keys() != served.jwt_keys()
        };
        if changed {
            self.jwks.store(Arc::new(bundle.to_jwks()));
            self.bundles
                .store(Arc::new(BundleSet::single(bundle.clone())));
            self.bundle.store(Arc::new(bundle));
            // Watch streams push the new bundle at once.
            self.dist.bump();
        }
        self.metrics.authority_expiry.clear();
        for x in a.all() {
            self.metrics
                .authority_expiry
                .get_or_create(&AuthorityLabel {
                    role: x.role.to_string(),
                    id: x.id.clone(),
                    state: x.state.to_string(),
                })
                .set(x.not_after.unix_timestamp());
        }
        Ok(changed)
    }

    /// Issues a new SVID for the control plane itself. Returns its expiry.
    pub fn renew_own_svid(&self, now: OffsetDateTime) -> Result<OffsetDateTime, Refusal> {
        let key = SecretKey::generate().map_err(|e| {
            Refusal::Issue(IssueError::Sign(
                crate::identity::signing::authority::AuthorityError::Key(e),
            ))
        })?;
        let issued = {
            let a = self.authorities.lock().map_err(|_| lock_err())?;
            let signer = a.signer().ok_or(IssueError::NoSigner)?;
            issue_control_plane_svid(
                signer,
                &key,
                &self.ca_id,
                &self.settings.server_names,
                self.settings.svid_max_ttl,
                now,
            )?
        };
        self.log(&issued, "self", now);
        let svid = Svid::new(issued.chain.clone(), &key)
            .map_err(|e| Refusal::Store(StoreError::Corrupt(e.to_string())))?;
        self.creds.set(svid);
        self.metrics
            .issued
            .get_or_create(&KindLabel {
                kind: "self".into(),
            })
            .inc();
        Ok(issued.not_after)
    }

    fn log(&self, issued: &IssuedSvid, requester: &str, now: OffsetDateTime) {
        let rec = IssuedRecord {
            serial: issued.serial.clone(),
            spiffe_id: issued.id.to_string(),
            not_after: issued.not_after,
            issued_at: now,
            requester: requester.to_owned(),
        };
        match self.store.log_issued(&rec) {
            Ok(()) => {}
            // Said once, when the store's condition changes.
            Err(e @ StoreError::Unwritable(_)) => debug!(error = %e, "cannot log issued SVID"),
            Err(e) => warn!(error = %e, "cannot log issued SVID"),
        }
    }

    /// Records a control-plane event (audit trail).
    pub fn event(&self, kind: &str, detail: serde_json::Value) {
        self.event_at(OffsetDateTime::now_utc(), kind, detail);
    }

    /// Records a control-plane event that happened at `at`. One that cannot be stored is
    /// counted, and recorded as lost (a `gap` on the chain) once the store can write again.
    fn event_at(&self, at: OffsetDateTime, kind: &str, detail: serde_json::Value) {
        // A kind missing from KINDS could never be queried (`audit query --kind`).
        debug_assert!(
            crate::identity::audit::KINDS.contains(&kind),
            "audit kind {kind:?} is not in KINDS: list it there and in the README"
        );
        if let Err(e) = self.store.append_event(at, kind, &detail.to_string()) {
            self.pending
                .lost(kind, (at.unix_timestamp_nanos() / 1_000_000) as i64);
            self.metrics.audit_events_lost.inc();
            match e {
                // The log line for every event is the only copy of it.
                StoreError::Unwritable(_) => {
                    debug!(error = %e, kind, detail = %detail, "cannot record control-plane event")
                }
                e => warn!(error = %e, kind, detail = %detail, "cannot record control-plane event"),
            }
        }
    }

    /// Logs an issued SVID and its `svid.issued` event in one transaction (spending `token`
    /// in it too): an SVID that cannot be logged is never returned.
    fn log_issued(
        &self,
        issued: &crate::identity::signing::issue::IssuedSvid,
        requester: &str,
        peer: &str,
        now: OffsetDateTime,
        token: Option<&crate::server::store::TokenClaim>,
    ) -> Result<(), Refusal> {
        let detail = serde_json::json!({
            "spiffe_id": issued.id.to_string(), "serial": issued.serial,
            "not_after": issued.not_after.unix_timestamp(), "requester": requester,
            "peer": peer,
        });
        let rec = IssuedRecord {
            serial: issued.serial.clone(),
            spiffe_id: issued.id.to_string(),
            not_after: issued.not_after,
            issued_at: now,
            requester: requester.to_owned(),
        };
        self.store
            .log_issued_with_event(&rec, "svid.issued", &detail.to_string(), token)??;
        Ok(())
    }

    /// Handles `POST /v1/svid`: authenticates the caller, checks the CSR, signs.
    pub fn issue_svid(
        &self,
        csr_der: &[u8],
        caller: Caller,
        ttl: Option<Duration>,
        peer: &str,
    ) -> Result<IssuedSvid, Refusal> {
        let now = OffsetDateTime::now_utc();
        // Nothing leaves unrecorded: an SVID whose issuance cannot be logged is not returned.
        let result = self.issue_inner(csr_der, &caller, ttl, now).and_then(
            |(issued, requester, kind, token)| {
                // A join token is spent in the same transaction, or not at all.
                self.log_issued(&issued, &requester, peer, now, token.as_ref())?;
                if let Some(t) = token {
                    self.event(
                        "token.used",
                        serde_json::json!({ "token": t.id, "spiffe_id": issued.id.to_string() }),
                    );
                }
                Ok((issued, requester, kind))
            },
        );
        match &result {
            Ok((_, _, kind)) => {
                self.metrics
                    .issued
                    .get_or_create(&KindLabel {
                        kind: (*kind).into(),
                    })
                    .inc();
            }
            Err(r) => {
                self.metrics.refuse(r.reason());
                let kind = match r {
                    Refusal::Token(_) | Refusal::TokenFormat(_) => "token.refused",
                    Refusal::K8s(_) => "attestation.refused",
                    _ => "svid.refused",
                };
                let who = match &caller {
                    Caller::Token(_) => "token".to_owned(),
                    Caller::Svid(info) => info.id.to_string(),
                    Caller::K8s(_) => "k8s".to_owned(),
                    Caller::Anonymous => "anonymous".to_owned(),
                };
                self.event(
                    kind,
                    serde_json::json!({ "reason": r.reason(), "error": r.to_string(), "caller": who, "peer": peer }),
                );
            }
        }
        result.map(|(issued, _, _)| issued)
    }

    fn issue_inner(
        &self,
        csr_der: &[u8],
        caller: &Caller,
        ttl: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<(IssuedSvid, String, &'static str, Option<TokenClaim>), Refusal> {
        // Check the CSR before spending the token: a malformed CSR must not burn it.
        let csr = verify_csr(csr_der)?;
        let ttl = ttl
            .unwrap_or(self.settings.svid_default_ttl)
            .min(self.settings.svid_max_ttl);
        let mut claim = None;
        let (allowed, requester, kind) = match caller {
            Caller::Anonymous => return Err(Refusal::Unauthenticated),
            Caller::Svid(info) => {
                if info.id.trust_domain() != self.bundle.load().trust_domain() {
                    return Err(Refusal::ForeignPeer(info.id.to_string()));
                }
                // A user SVID is renewed only by a still-valid sign-in (POST /v1/user/svid).
                if is_user(&info.id) {
                    return Err(Refusal::UserNamespace(info.id.to_string()));
                }
                (info.id.clone(), format!("svid:{}", info.serial), "renewal")
            }
            Caller::Token(text) => {
                let token =
                    JoinToken::parse(text).map_err(|e| Refusal::TokenFormat(e.to_string()))?;
                // Checked before signing (a bad token costs no signature), spent only with the
                // issuance's log entry. The token's SPIFFE ID must match the CSR.
                let rec = self.peek_token(&token, now)?;
                if rec.spiffe_id != csr.id.to_string() {
                    return Err(IssueError::WrongId {
                        asked: csr.id.to_string(),
                        allowed: rec.spiffe_id,
                    }
                    .into());
                }
                let id = parse_workload_id(&rec.spiffe_id)
                    .map_err(|e| Refusal::Store(StoreError::Corrupt(e.to_string())))?;
                if is_user(&id) {
                    return Err(Refusal::UserNamespace(rec.spiffe_id));
                }
                claim = Some(TokenClaim {
                    id: rec.id.clone(),
                    hash: token.hash(),
                });
                (id, format!("token:{}", rec.id), "bootstrap")
            }
            Caller::K8s(jwt) => {
                let attestor = self
                    .settings
                    .k8s
                    .as_ref()
                    .ok_or(super::attest::AttestError::NotConfigured)?;
                let td = self.bundle.load().trust_domain().clone();
                let a = attestor.verify(jwt, &td, now.unix_timestamp())?;
                let pod = a.pod.unwrap_or_default();
                (a.id, format!("k8s:{pod}"), "bootstrap")
            }
        };
        let issued = {
            let a = self.authorities.lock().map_err(|_| lock_err())?;
            let signer = a.signer().ok_or(IssueError::NoSigner)?;
            issue(signer, &csr, &allowed, ttl, now)?
        };
        Ok((issued, requester, kind, claim))
    }

    /// The token with this ID, if its secret matches (compared in constant time) and it is
    /// still redeemable at `now`.
    fn peek_token(&self, token: &JoinToken, now: OffsetDateTime) -> Result<TokenRecord, Refusal> {
        let rec = self
            .store
            .find_token(&token.id)?
            .ok_or(TokenRefusal::Unknown)?;
        rec.check(&token.hash(), now)?;
        Ok(rec)
    }

    /// Creates a join token for `id`. Returns the token (print it once) and its record.
    pub fn create_token(
        &self,
        id: &str,
        ttl: Duration,
        by: &str,
    ) -> Result<(JoinToken, TokenRecord), TokenCreateError> {
        // The control plane's namespace is never handed out: a token for it would let its
        // holder serve sidecars as their control plane.
        let id = crate::identity::id::parse_issuable_id(id)?;
        if is_user(&id) {
            return Err(TokenCreateError::User(id.to_string()));
        }
        if ttl > self.settings.token_max_ttl || ttl.is_zero() {
            return Err(TokenCreateError::Ttl {
                max: self.settings.token_max_ttl,
            });
        }
        if id.trust_domain() != self.bundle.load().trust_domain() {
            return Err(TokenCreateError::OtherTrustDomain {
                id: id.to_string(),
                trust_domain: self.bundle.load().trust_domain().to_string(),
            });
        }
        let pin = self
            .active_root_pin()
            .ok_or(TokenCreateError::NoActiveRoot)?;
        let token = JoinToken::generate(&pin);
        let now = OffsetDateTime::now_utc();
        let rec = TokenRecord {
            id: token.id.clone(),
            hash: token.hash(),
            spiffe_id: id.to_string(),
            created_at: now,
            expires_at: now + time::Duration::seconds(ttl.as_secs() as i64),
            created_by: by.to_owned(),
            used_at: None,
            revoked_at: None,
        };
        self.store.insert_token(&rec)?;
        self.event(
            "token.created",
            serde_json::json!({ "token": rec.id, "spiffe_id": rec.spiffe_id, "by": by,
                                 "expires_at": rec.expires_at.unix_timestamp() }),
        );
        Ok((token, rec))
    }

    fn active_root_pin(&self) -> Option<String> {
        let a = self.authorities.lock().ok()?;
        let root = a.active(Role::Root)?;
        let spki = crate::identity::svid::spki_der(&root.cert).ok()?;
        Some(hex::encode(crate::identity::keys::sha256(&spki)))
    }

    /// A snapshot of the authorities for status output.
    pub fn authorities(&self) -> Result<Authorities, Refusal> {
        Ok(self.authorities.lock().map_err(|_| lock_err())?.clone())
    }
}
