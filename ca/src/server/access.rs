//! People's access: requests made with a user SVID (`spiffe://<td>/user/...`), checked against
//! the policy's `[[access.rule]]`s with the groups of the person's current sign-in, approved by
//! other people, and kept as ordinary grants ([`super::distribution::GrantRecord`] with its
//! [`AccessInfo`]): pushed to sidecars, expiring by themselves, revocable.
//!
//! Above [`super::distribution`], whose records and store transitions it uses.

use mayfly_policy::{AccessAsk, Grant, GrantSettings, PathPattern, find_rule};
use serde_json::json;
use time::OffsetDateTime;

use super::ca::Ca;
use super::distribution::{self, GrantError, GrantRecord};
use crate::identity::api::{ADMIN_ID_PATH, AccessRequest};
use crate::identity::svid::SvidInfo;
use crate::server::store::{GrantState, StoreError};

pub use super::distribution::AccessInfo;

/// Why an access request or decision is refused. Its text is what `mayfly` shows.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The client certificate is not a user SVID of this trust domain.
    #[error("this needs a user SVID (spiffe://{td}/user/...): {got}")]
    NotAUser {
        /// This trust domain.
        td: String,
        /// What was presented.
        got: String,
    },
    /// The person's sign-in has expired or was never recorded: no groups count.
    #[error("{0} has no valid sign-in, so no groups count: run `mayfly login`")]
    NoSignIn(String),
    /// The request is malformed.
    #[error("{0}")]
    Bad(String),
    /// No access rule admits the request.
    #[error("{user} may not ask for this: {why}")]
    NoRule {
        /// The person.
        user: String,
        /// The policy's reason.
        why: mayfly_policy::AccessRefusal,
    },
    /// The person is not a member of an approver group.
    #[error("{user} is not in an approver group of request {id} ({groups})")]
    NotApprover {
        /// The person.
        user: String,
        /// The request.
        id: String,
        /// The approver groups.
        groups: String,
    },
    /// The requester tried to approve their own request.
    #[error("{user} asked for {id} and cannot approve it: another approver must")]
    SelfApproval {
        /// The person.
        user: String,
        /// The request.
        id: String,
    },
    /// The approver already approved.
    #[error("{user} already approved {id}: it needs {needed} distinct approvers")]
    AlreadyApproved {
        /// The person.
        user: String,
        /// The request.
        id: String,
        /// Approvals needed.
        needed: u8,
    },
    /// Only the requester or an approver may revoke.
    #[error("{user} neither asked for nor may approve {id}, so cannot revoke it")]
    NotYours {
        /// The person.
        user: String,
        /// The request.
        id: String,
    },
    /// The grant is not an access request (it was asked for on the admin socket).
    #[error("{0} is not a person's access request: decide it with `mayfly-ca grant`")]
    NotAccess(String),
    /// No active grant lets the caller do this.
    #[error("{0}")]
    NoGrant(String),
    /// The grant layer refused (unknown id, wrong state, store).
    #[error(transparent)]
    Grant(#[from] GrantError),
}

impl AccessError {
    /// The HTTP status and the machine-readable reason.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            AccessError::NotAUser { .. } => (403, "not_a_user"),
            AccessError::NoSignIn(_) => (403, "no_sign_in"),
            AccessError::Bad(_) => (400, "bad_request"),
            AccessError::NoRule { .. } => (403, "no_access_rule"),
            AccessError::NotApprover { .. } => (403, "not_an_approver"),
            AccessError::SelfApproval { .. } => (403, "self_approval"),
            AccessError::AlreadyApproved { .. } => (409, "already_approved"),
            AccessError::NotYours { .. } => (403, "not_yours"),
            AccessError::NotAccess(_) => (409, "not_an_access_request"),
            AccessError::NoGrant(_) => (403, "no_grant"),
            AccessError::Grant(GrantError::NotFound(_)) => (404, "not_found"),
            AccessError::Grant(GrantError::NotAllowed { .. }) => (409, "wrong_state"),
            AccessError::Grant(GrantError::Contended(_)) => (409, "contended"),
            AccessError::Grant(
                GrantError::NoReason
                | GrantError::Ttl(_)
                | GrantError::Path { .. }
                | GrantError::Policy(_)
                | GrantError::TooLong { .. },
            ) => (400, "bad_request"),
            AccessError::Grant(GrantError::Store(StoreError::Unwritable(_))) => {
                (503, "store_unavailable")
            }
            AccessError::Grant(_) => (500, "internal"),
        }
    }
}

impl From<StoreError> for AccessError {
    fn from(e: StoreError) -> Self {
        AccessError::Grant(GrantError::Store(e))
    }
}

/// A person, as the client certificate and the latest sign-in say.
#[derive(Debug, Clone)]
pub struct Person {
    /// The user SVID's SPIFFE ID.
    pub id: String,
    /// The sign-in's groups while it is valid; empty otherwise.
    pub groups: Vec<String>,
    /// Whether the sign-in is valid now.
    pub signed_in: bool,
}

/// The person behind a client certificate: a user SVID of this trust domain (blocking: reads
/// the sign-in from the store).
pub fn person(ca: &Ca, peer: &SvidInfo) -> Result<Person, AccessError> {
    let td = ca.ca_id().trust_domain().to_string();
    let id = peer.id.to_string();
    if peer.id.trust_domain().to_string() != td || !peer.id.path().starts_with("/user/") {
        return Err(AccessError::NotAUser { td, got: id });
    }
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let session = ca.store().user_session(&id)?;
    let valid = session.filter(|s| s.is_valid_at(now));
    Ok(Person {
        signed_in: valid.is_some(),
        groups: valid.map(|s| s.groups).unwrap_or_default(),
        id,
    })
}

/// The reserved target of admin grants: `spiffe://<td>/mayfly/admin`, which no SVID can carry.
pub fn admin_target(ca: &Ca) -> String {
    format!("spiffe://{}{ADMIN_ID_PATH}", ca.ca_id().trust_domain())
}

fn is_reserved(to: &str) -> bool {
    crate::identity::id::parse_id(to).is_ok_and(|id| crate::identity::id::is_reserved(&id))
}

fn refused(ca: &Ca, p: &Person, action: &str, e: AccessError) -> AccessError {
    ca.event(
        "access.refused",
        json!({ "user": p.id, "groups": p.groups, "action": action, "reason": e.to_string() }),
    );
    e
}

/// `mayfly access request`: checked against the access rules with the person's groups; stored
/// pending as a grant from the person's SPIFFE ID (blocking).
pub fn request(ca: &Ca, p: &Person, req: AccessRequest) -> Result<GrantRecord, AccessError> {
    create(ca, p, req).map_err(|e| refused(ca, p, "request", e))
}

fn create(ca: &Ca, p: &Person, req: AccessRequest) -> Result<GrantRecord, AccessError> {
    if !p.signed_in {
        return Err(AccessError::NoSignIn(p.id.clone()));
    }
    if req.reason.trim().is_empty() {
        return Err(GrantError::NoReason.into());
    }
    let (to, kind) = match (req.to.as_deref(), req.role.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(AccessError::Bad(
                "ask for a service (--to) or a role (--role), not both".into(),
            ));
        }
        (None, Some("admin")) => (admin_target(ca), "admin"),
        (None, Some(other)) => {
            return Err(AccessError::Bad(format!(
                "unknown role {other:?}: the only role is \"admin\""
            )));
        }
        (Some(to), None) if is_reserved(to) => {
            return Err(AccessError::Bad(format!(
                "{to} is reserved for the control plane: ask for --role admin instead"
            )));
        }
        (Some(to), None) => (to.to_owned(), "service"),
        (None, None) => {
            return Err(AccessError::Bad(
                "say what for: --to SPIFFE_ID or --role admin".into(),
            ));
        }
    };
    if kind == "admin" && !(req.methods.is_empty() && req.paths.is_empty()) {
        return Err(AccessError::Bad(
            "methods and paths apply to services, not to the admin role".into(),
        ));
    }
    let ttl = crate::identity::duration::parse_duration(&req.ttl).map_err(GrantError::from)?;
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let rules = ca.dist.access_rules();
    let ask = AccessAsk {
        groups: &p.groups,
        to: (kind == "service").then_some(to.as_str()),
        methods: &req.methods,
        paths: &req.paths,
        ttl: time::Duration::seconds(ttl_secs),
    };
    let rule = find_rule(&rules, &ask).map_err(|why| AccessError::NoRule {
        user: p.id.clone(),
        why,
    })?;
    // A request naming no methods or paths gets the rule's.
    let methods = match (req.methods.is_empty(), rule.methods()) {
        (true, Some(m)) => m.to_vec(),
        _ => req.methods,
    };
    let paths = match (req.paths.is_empty(), rule.paths()) {
        (true, Some(ps)) => ps.into_iter().map(str::to_owned).collect(),
        _ => req.paths,
    };
    let now = OffsetDateTime::now_utc();
    let candidate = Grant {
        id: String::new(),
        from: p.id.clone(),
        to: to.clone(),
        methods: methods.clone(),
        paths: paths
            .iter()
            .map(|s| {
                PathPattern::parse(s).map_err(|source| GrantError::Path {
                    path: s.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?,
        not_before: now,
        expires: now + time::Duration::seconds(ttl_secs),
    };
    let limits = GrantSettings {
        max_ttl: rule.max_ttl(),
        approvals: 1,
    };
    candidate.check(&limits).map_err(GrantError::Policy)?;
    let mut id = [0u8; 4];
    crate::identity::keys::fill_random(&mut id);
    let g = GrantRecord {
        id: format!("g-{}", hex::encode(id)),
        from: p.id.clone(),
        to,
        methods,
        paths,
        reason: req.reason,
        ttl_secs,
        requested_by: p.id.clone(),
        requested_at: now.unix_timestamp(),
        state: GrantState::Pending,
        decided_by: None,
        not_before: None,
        expires: None,
        access: Some(AccessInfo {
            kind: kind.to_owned(),
            groups: p
                .groups
                .iter()
                .filter(|g| rule.groups().contains(g))
                .cloned()
                .collect(),
            approvals_needed: rule.approvals(),
            approver_groups: rule.approvers().to_vec(),
            approved_by: Vec::new(),
        }),
    };
    ca.store()
        .insert_grant(&g.id, g.state, 0, &distribution::body(&g)?)?;
    ca.event(
        "access.requested",
        json!({
            "grant": g.id, "user": p.id, "groups": p.groups, "access": kind, "to": g.to,
            "methods": g.methods, "paths": g.paths, "ttl_secs": g.ttl_secs, "reason": g.reason,
            "approvals_needed": rule.approvals(), "approvers": rule.approvers(),
        }),
    );
    Ok(g)
}

fn may_approve(p: &Person, info: &AccessInfo) -> bool {
    p.groups.iter().any(|g| info.approver_groups.contains(g))
}

/// `mayfly access list`: the person's own requests and those the person may approve, newest
/// first (blocking).
pub fn list(ca: &Ca, p: &Person) -> Result<Vec<GrantRecord>, AccessError> {
    Ok(distribution::list(ca)?
        .into_iter()
        .filter(|g| g.requested_by == p.id || g.access.as_ref().is_some_and(|a| may_approve(p, a)))
        .collect())
}

/// `mayfly access approve|deny|revoke` (blocking).
pub fn decide(ca: &Ca, p: &Person, id: &str, action: &str) -> Result<GrantRecord, AccessError> {
    decide_checked(ca, p, id, action).map_err(|e| refused(ca, p, action, e))
}

fn decide_checked(ca: &Ca, p: &Person, id: &str, action: &str) -> Result<GrantRecord, AccessError> {
    let g = distribution::get(ca, id)?;
    let Some(info) = g.access.clone() else {
        return Err(AccessError::NotAccess(id.to_owned()));
    };
    let not_approver = || AccessError::NotApprover {
        user: p.id.clone(),
        id: id.to_owned(),
        groups: info.approver_groups.join(", "),
    };
    match action {
        "approve" | "deny" => {
            if g.requested_by == p.id {
                if action == "deny" {
                    // Withdrawing one's own request is a revocation.
                    return Err(AccessError::Bad(format!(
                        "to withdraw your own request, revoke it: mayfly access revoke {id}"
                    )));
                }
                return Err(AccessError::SelfApproval {
                    user: p.id.clone(),
                    id: id.to_owned(),
                });
            }
            if !p.signed_in {
                return Err(AccessError::NoSignIn(p.id.clone()));
            }
            if !may_approve(p, &info) {
                return Err(not_approver());
            }
            if action == "deny" {
                let g = distribution::decide(ca, &ca.dist, &p.id, id, "deny")?;
                ca.event(
                    "access.denied",
                    json!({ "grant": id, "user": g.requested_by, "approver": p.id,
                            "groups": p.groups, "reason": g.reason }),
                );
                return Ok(g);
            }
            approve(ca, p, id)
        }
        "revoke" => {
            let approver = p.signed_in && may_approve(p, &info);
            if g.requested_by != p.id && !approver {
                return Err(AccessError::NotYours {
                    user: p.id.clone(),
                    id: id.to_owned(),
                });
            }
            let g = distribution::decide(ca, &ca.dist, &p.id, id, "revoke")?;
            ca.event(
                "access.revoked",
                json!({ "grant": id, "user": g.requested_by, "by": p.id, "groups": p.groups,
                        "to": g.to }),
            );
            Ok(g)
        }
        other => Err(AccessError::Bad(format!(
            "unknown action {other:?}: approve, deny or revoke"
        ))),
    }
}

/// Adds the person's approval to a pending request, made on the request as read and applied
/// only if nobody changed it meanwhile (two approvals racing on two replicas, or on one, both
/// count: the one that loses the compare-and-set reads the winner's and adds to it).
fn approve(ca: &Ca, p: &Person, id: &str) -> Result<GrantRecord, AccessError> {
    for _ in 0..APPROVE_ATTEMPTS {
        let (mut g, seen) = distribution::read(ca, id)?;
        let Some(mut info) = g.access.clone() else {
            return Err(AccessError::NotAccess(id.to_owned()));
        };
        if g.state != GrantState::Pending {
            return Err(GrantError::NotAllowed {
                action: "approve".into(),
                id: id.to_owned(),
                state: g.state,
            }
            .into());
        }
        if info.approved_by.contains(&p.id) {
            return Err(AccessError::AlreadyApproved {
                user: p.id.clone(),
                id: id.to_owned(),
                needed: info.approvals_needed,
            });
        }
        info.approved_by.push(p.id.clone());
        let done = info.approved_by.len() >= usize::from(info.approvals_needed);
        g.access = Some(info.clone());
        if done {
            distribution::activate(&mut g);
            g.decided_by = Some(p.id.clone());
        }
        let applied = ca.store().update_grant(
            id,
            GrantState::Pending,
            &seen,
            g.state,
            g.expires.unwrap_or(0),
            &distribution::body(&g)?,
        )?;
        if applied {
            return Ok(approved(ca, p, g, &info, done));
        }
    }
    Err(GrantError::Contended(id.to_owned()).into())
}

/// How often an approval is made again on a request that another decision changed meanwhile:
/// each loss means another approver's change landed, so this bounds it by the approvers racing.
const APPROVE_ATTEMPTS: usize = 8;

/// Records an approval that was applied.
fn approved(ca: &Ca, p: &Person, g: GrantRecord, info: &AccessInfo, done: bool) -> GrantRecord {
    let id = &g.id;
    ca.event(
        "access.approved",
        json!({
            "grant": id, "user": g.requested_by, "approver": p.id, "groups": p.groups,
            "approvals": info.approved_by.len(), "approvals_needed": info.approvals_needed,
            "active": done, "expires": g.expires, "to": g.to, "reason": g.reason,
        }),
    );
    if done {
        ca.event(
            "grant.activated",
            json!({ "grant": id, "expires": g.expires }),
        );
        ca.dist.bump();
    }
    g
}

/// The person's active grant to `to`, if any (blocking).
pub fn active_grant(ca: &Ca, from: &str, to: &str) -> Result<Option<GrantRecord>, AccessError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    for body in ca.store().live_grants(now)? {
        let g = distribution::parse(&body)?;
        if g.from == from && g.to == to && g.expires.is_some_and(|e| e > now) {
            return Ok(Some(g));
        }
    }
    Ok(None)
}
