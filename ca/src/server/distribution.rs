//! Just-in-time grants (requests, decisions compare-and-set in the store so that racing admins
//! cannot both win a conflicting transition, expiry), and what the control plane pushes to
//! every sidecar on `GET /v1/watch`: snapshots of the policy, the grants in force and the
//! bundle, and policy reloads.
//!
//! The grants in force are read from the store once per change, off the runtime's threads, and
//! shared by every watcher; a failed read keeps the last good set.
//!
//! Above [`super::ca`]: the [`Distribution`] the `Ca` holds (the policy in force and the change
//! generation) is defined below it, in [`super::policy`], and re-exported here; its methods
//! that need the `Ca` are here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_policy::{Grant, PathPattern};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::ca::Ca;
pub use super::policy::{Distribution, LoadedPolicy, PolicyFileError};
use super::policy::{RETRY_FAILED_READ, load};
use crate::identity::api::{GrantWire, Snapshot};
use crate::identity::duration::{DurationError, format_duration};
use crate::server::store::{GrantState, StoreError};

/// Why a grant request or decision failed, or the grants could not be read. Its text is what
/// the admin CLI shows.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// The request gives no reason.
    #[error("a reason is required (for example --reason \"INC-42\")")]
    NoReason,
    /// The TTL is not a duration.
    #[error(transparent)]
    Ttl(#[from] DurationError),
    /// A path pattern is not valid.
    #[error("path {path:?}: {source}")]
    Path {
        /// The pattern as given.
        path: String,
        /// Why it is not valid.
        source: mayfly_policy::PatternError,
    },
    /// The TTL is over the policy's `grants.max_ttl`.
    #[error(
        "TTL {} is over the policy's grants.max_ttl of {}",
        format_duration(*ttl),
        format_duration(*max)
    )]
    TooLong {
        /// The TTL asked for.
        ttl: Duration,
        /// The policy's limit.
        max: Duration,
    },
    /// The policy's `[grants]` limits refuse the grant.
    #[error(transparent)]
    Policy(mayfly_policy::GrantError),
    /// No grant has this id.
    #[error("no grant with id {0}")]
    NotFound(String),
    /// The requester tried to approve their own grant.
    #[error("{by} requested grant {id} and cannot approve it: another admin must")]
    SelfApproval {
        /// The admin.
        by: String,
        /// The grant.
        id: String,
    },
    /// The action does not apply to the grant's state.
    #[error("cannot {action} grant {id}: it is {state}")]
    NotAllowed {
        /// `approve`, `deny`, `revoke` or what was asked.
        action: String,
        /// The grant.
        id: String,
        /// Its state.
        state: GrantState,
    },
    /// Concurrent decisions kept changing the grant.
    #[error("grant {0} kept changing under concurrent decisions; look at it and try again")]
    Contended(String),
    /// A stored grant does not parse.
    #[error("stored grant is unreadable: {0}")]
    Unreadable(serde_json::Error),
    /// A grant cannot be encoded for the store.
    #[error("{0}")]
    Encode(serde_json::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blocking read task failed.
    #[error("grant read task failed: {0}")]
    Task(String),
}

/// A grant as the control plane keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantRecord {
    /// Id.
    pub id: String,
    /// Exact source.
    pub from: String,
    /// Exact destination.
    pub to: String,
    /// Methods (empty = any).
    pub methods: Vec<String>,
    /// Paths (empty = any).
    pub paths: Vec<String>,
    /// Why (required).
    pub reason: String,
    /// Lifetime once active.
    pub ttl_secs: i64,
    /// Requesting OS user.
    pub requested_by: String,
    /// Unix seconds.
    pub requested_at: i64,
    /// `pending`, `active`, `denied`, `revoked` or `expired` (listings show an active grant
    /// past its expiry as expired at once; the store records it within seconds).
    pub state: GrantState,
    /// Who approved, denied or revoked it.
    pub decided_by: Option<String>,
    /// Start of validity (set on activation).
    pub not_before: Option<i64>,
    /// End of validity (set on activation).
    pub expires: Option<i64>,
    /// For a person's access request (`mayfly access request`): who asked with which groups,
    /// who must and who did approve. Absent for grants asked for on the admin socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessInfo>,
}

/// What a person's access request (`super::access`) carries beyond a grant: who asked with which groups, who must and who
/// did approve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessInfo {
    /// `service` or `admin`.
    pub kind: String,
    /// The requester's groups that the access rule named.
    pub groups: Vec<String>,
    /// Distinct approvals needed.
    pub approvals_needed: u8,
    /// Groups whose members may approve.
    pub approver_groups: Vec<String>,
    /// Who approved so far (user SPIFFE IDs), in order.
    pub approved_by: Vec<String>,
}

/// A grant request from the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantRequest {
    /// Exact source.
    pub from: String,
    /// Exact destination.
    pub to: String,
    /// Methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths.
    #[serde(default)]
    pub paths: Vec<String>,
    /// TTL such as `15m`.
    pub ttl: String,
    /// Reason.
    pub reason: String,
}

pub(super) fn parse(body: &str) -> Result<GrantRecord, GrantError> {
    serde_json::from_str(body).map_err(GrantError::Unreadable)
}

/// An active grant past its expiry shows as expired before the store records it.
fn with_expiry(mut g: GrantRecord, now: i64) -> GrantRecord {
    if g.state == GrantState::Active && g.expires.is_some_and(|e| e <= now) {
        g.state = GrantState::Expired;
    }
    g
}

/// The grants in force now, as pushed to sidecars (blocking: a store read).
fn read_live(ca: &Ca) -> Result<Vec<GrantWire>, GrantError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let bodies = ca.store().live_grants(now)?;
    bodies
        .iter()
        .map(|b| {
            let g = parse(b)?;
            Ok(GrantWire {
                not_before: g.not_before.unwrap_or(now),
                expires: g.expires.unwrap_or(now),
                id: g.id,
                from: g.from,
                to: g.to,
                methods: g.methods,
                paths: g.paths,
            })
        })
        .collect()
}

pub(super) fn body(g: &GrantRecord) -> Result<String, GrantError> {
    serde_json::to_string(g).map_err(GrantError::Encode)
}

/// Every grant, with `expired` computed.
pub fn list(ca: &Ca) -> Result<Vec<GrantRecord>, GrantError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    ca.store()
        .list_grants()?
        .iter()
        .map(|b| parse(b).map(|g| with_expiry(g, now)))
        .collect()
}

pub(super) fn get(ca: &Ca, id: &str) -> Result<GrantRecord, GrantError> {
    read(ca, id).map(|(g, _)| g)
}

/// One grant and the body it was read from: a decision on it is applied only if that body is
/// still the stored one (`Store::update_grant`).
pub(super) fn read(ca: &Ca, id: &str) -> Result<(GrantRecord, String), GrantError> {
    let body = ca
        .store()
        .grant(id)?
        .ok_or_else(|| GrantError::NotFound(id.to_owned()))?;
    let g = with_expiry(parse(&body)?, OffsetDateTime::now_utc().unix_timestamp());
    Ok((g, body))
}

pub(super) fn activate(g: &mut GrantRecord) {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    g.state = GrantState::Active;
    g.not_before = Some(now);
    g.expires = Some(now + g.ttl_secs);
}

/// `grant request`: checked against the policy's `[grants]` limits; active at once when the
/// policy needs no approval, pending otherwise.
pub fn request(
    ca: &Ca,
    dist: &Distribution,
    by: &str,
    req: GrantRequest,
) -> Result<GrantRecord, GrantError> {
    if req.reason.trim().is_empty() {
        return Err(GrantError::NoReason);
    }
    let ttl = crate::identity::duration::parse_duration(&req.ttl)?;
    let settings = dist.settings();
    let now = OffsetDateTime::now_utc();
    let paths = req
        .paths
        .iter()
        .map(|p| {
            PathPattern::parse(p).map_err(|source| GrantError::Path {
                path: p.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let candidate = Grant {
        id: String::new(),
        from: req.from.clone(),
        to: req.to.clone(),
        methods: req.methods.clone(),
        paths,
        not_before: now,
        expires: now + time::Duration::seconds(ttl.as_secs() as i64),
    };
    candidate.check(&settings).map_err(|e| match e {
        mayfly_policy::GrantError::TooLong { .. } => GrantError::TooLong {
            ttl,
            max: Duration::from_secs(settings.max_ttl.whole_seconds().max(0) as u64),
        },
        other => GrantError::Policy(other),
    })?;
    let mut id = [0u8; 4];
    crate::identity::keys::fill_random(&mut id);
    let mut g = GrantRecord {
        id: format!("g-{}", hex::encode(id)),
        from: req.from,
        to: req.to,
        methods: req.methods,
        paths: req.paths,
        reason: req.reason,
        ttl_secs: ttl.as_secs() as i64,
        requested_by: by.to_owned(),
        requested_at: now.unix_timestamp(),
        state: GrantState::Pending,
        decided_by: None,
        not_before: None,
        expires: None,
        access: None,
    };
    if settings.approvals == 0 {
        activate(&mut g);
    }
    ca.store()
        .insert_grant(&g.id, g.state, g.expires.unwrap_or(0), &body(&g)?)?;
    ca.event(
        "grant.requested",
        serde_json::to_value(&g).unwrap_or_default(),
    );
    if g.state == GrantState::Active {
        ca.event(
            "grant.activated",
            json!({ "grant": g.id, "expires": g.expires }),
        );
        dist.bump();
    }
    Ok(g)
}

/// How often a decision is re-made on a grant that another decision changed meanwhile (states
/// only move forward, so two retries always settle it).
const DECIDE_ATTEMPTS: usize = 4;

/// `grant approve|deny|revoke`: made on the grant's current state and applied only if that
/// state still holds (compare-and-set); otherwise made again on the new state.
pub fn decide(
    ca: &Ca,
    dist: &Distribution,
    by: &str,
    id: &str,
    action: &str,
) -> Result<GrantRecord, GrantError> {
    for _ in 0..DECIDE_ATTEMPTS {
        let (mut g, seen) = read(ca, id)?;
        let from = g.state;
        match (action, from) {
            ("approve", GrantState::Pending) => {
                if g.requested_by == by {
                    ca.event(
                        "grant.self_approval_refused",
                        json!({ "grant": g.id, "user": by }),
                    );
                    return Err(GrantError::SelfApproval {
                        by: by.to_owned(),
                        id: id.to_owned(),
                    });
                }
                activate(&mut g);
            }
            ("deny", GrantState::Pending) => g.state = GrantState::Denied,
            ("revoke", GrantState::Active | GrantState::Pending) => g.state = GrantState::Revoked,
            (a, s) => {
                return Err(GrantError::NotAllowed {
                    action: a.to_owned(),
                    id: id.to_owned(),
                    state: s,
                });
            }
        }
        g.decided_by = Some(by.to_owned());
        let applied = ca.store().update_grant(
            id,
            from,
            &seen,
            g.state,
            g.expires.unwrap_or(0),
            &body(&g)?,
        )?;
        if !applied {
            // Another decision came first: decide again on what it left.
            continue;
        }
        ca.event(
            &format!(
                "grant.{}",
                match action {
                    "approve" => "approved",
                    "deny" => "denied",
                    _ => "revoked",
                }
            ),
            json!({ "grant": g.id, "by": by, "from": g.from, "to": g.to, "expires": g.expires }),
        );
        dist.bump();
        return Ok(g);
    }
    Err(GrantError::Contended(id.to_owned()))
}

/// Records each grant expiry once (`grant.expired`) and wakes the watchers, waking at the next
/// expiry (at least every 5 s, and on every change). The store marks a grant expired exactly
/// once, so nothing is kept in memory and a restart records nothing twice.
pub async fn expiry_events(ca: Arc<Ca>, dist: Arc<Distribution>, mut stop: watch::Receiver<bool>) {
    let mut changes = dist.subscribe();
    loop {
        let ca2 = ca.clone();
        let scan = tokio::task::spawn_blocking(move || expire_due(&ca2))
            .await
            .unwrap_or_else(|e| Err(StoreError::Db(format!("expiry task failed: {e}"))));
        let wait = match scan {
            Ok((expired, next)) => {
                if expired > 0 {
                    dist.bump();
                }
                let now = OffsetDateTime::now_utc().unix_timestamp();
                next.map(|e| (e - now).clamp(0, 5)).unwrap_or(5)
            }
            Err(e) => {
                warn!(error = %e, "cannot scan grants for expiry; retrying in 5s");
                5
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait as u64 * 1000 + 50)) => {}
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// Marks the grants due as expired and records each; returns how many, and the next expiry.
fn expire_due(ca: &Ca) -> Result<(usize, Option<i64>), StoreError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let expired = ca.store().expire_grants(now)?;
    for b in &expired {
        match parse(b) {
            Ok(g) => ca.event(
                "grant.expired",
                json!({ "grant": g.id, "from": g.from, "to": g.to }),
            ),
            Err(e) => warn!(error = %e, "grant expired but its record is unreadable"),
        }
    }
    Ok((expired.len(), ca.store().next_grant_expiry(now)?))
}

impl Distribution {
    /// The snapshot to push now, or `None` while the grants have never been read: a sidecar
    /// must not take "no grants known" for "no grants". The grants are read from the store at
    /// most once per change, off the runtime's threads, and shared by every watcher; when a
    /// read fails the last good grants stay (the error is logged and counted).
    pub async fn snapshot(&self, ca: &Arc<Ca>) -> Option<Snapshot> {
        let (generation, grants) = self.live_grants(ca).await?;
        let p = self.policy.load();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        Some(Snapshot {
            generation,
            policy_version: p.as_ref().map(|p| p.version.clone()),
            policy: p.as_ref().map(|p| p.source.clone()),
            // A grant read before it expired is not pushed after.
            grants: grants.iter().filter(|g| g.expires > now).cloned().collect(),
            bundle: serde_json::from_str(&ca.jwks()).unwrap_or(serde_json::Value::Null),
            endpoints: Default::default(),
        })
    }

    async fn live_grants(&self, ca: &Arc<Ca>) -> Option<(u64, Arc<Vec<GrantWire>>)> {
        let generation = *self.changes.borrow();
        let mut cache = self.live.lock().await;
        let fresh = matches!(&cache.good, Some((g, _)) if *g == generation);
        let failed_lately = matches!(cache.failed,
            Some((g, at)) if g == generation && at.elapsed() < RETRY_FAILED_READ);
        if !fresh && !failed_lately {
            let ca2 = ca.clone();
            let read = tokio::task::spawn_blocking(move || read_live(&ca2))
                .await
                .unwrap_or_else(|e| Err(GrantError::Task(e.to_string())));
            match read {
                Ok(grants) => {
                    cache.good = Some((generation, Arc::new(grants)));
                    cache.failed = None;
                }
                Err(e) => {
                    ca.metrics.snapshot_errors.inc();
                    error!(error = %e, "cannot read the grants in force; watchers keep the last good set");
                    cache.failed = Some((generation, Instant::now()));
                }
            }
        }
        cache.good.clone()
    }

    /// Polls the policy file every second; on a change, validates it, puts it in force here
    /// and publishes it to the store, where every other replica picks it up (the last
    /// published wins). A publication the store refuses (it is down) is retried every second.
    pub async fn watch_file(self: Arc<Self>, ca: Arc<Ca>, mut stop: watch::Receiver<bool>) {
        let Some(file) = self.file.clone() else {
            return;
        };
        let mut last = std::fs::read(&file).ok();
        let mut unpublished: Option<Arc<LoadedPolicy>> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
            if let Some(p) = unpublished.clone()
                && super::sync::publish(&ca, &file, p).await
            {
                unpublished = None;
            }
            let now = std::fs::read(&file).ok();
            if now == last {
                continue;
            }
            last = now;
            match load(&file) {
                Ok(p) if Some(&p.version) == self.version().as_ref() => {}
                Ok(p) => {
                    info!(version = %p.version, "policy reloaded; pushing it to every sidecar");
                    ca.event(
                        "policy.loaded",
                        json!({ "version": p.version, "file": file.display().to_string() }),
                    );
                    let p = Arc::new(p);
                    self.policy.store(Some(p.clone()));
                    self.bump();
                    if !super::sync::publish(&ca, &file, p.clone()).await {
                        unpublished = Some(p);
                    }
                }
                Err(e) => {
                    error!(
                        in_force = self.version().as_deref().unwrap_or("none"),
                        "policy file refused; the last good policy stays in force:\n{e}"
                    );
                    ca.event(
                        "policy.refused",
                        json!({ "error": e.to_string(), "in_force": self.version() }),
                    );
                }
            }
        }
    }
}
