//! The API for people, over mTLS with a user SVID: access requests and decisions
//! ([`super::access`]), the endpoints of a service the caller holds a grant to (for
//! `mayfly connect`), and the admin operations for holders of an admin grant.

use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use serde_json::json;

use super::access::{self, AccessError, Person};
use super::admin::{AdminRequest, AdminResponse};
use super::ca::Ca;
use crate::api::{self, AccessDecision, AccessRequest, EndpointsFound, EndpointsLookup, ErrorBody};
use crate::svid::SvidInfo;

/// Whether `path` is served here.
pub fn serves(path: &str) -> bool {
    matches!(
        path,
        api::ACCESS_PATH | api::ACCESS_DECIDE_PATH | api::ACCESS_ENDPOINTS_PATH | api::ADMIN_PATH
    )
}

/// An answer: the HTTP status and its JSON body.
pub type Answer = (u16, String);

fn error(status: u16, reason: &str, msg: String) -> Answer {
    let body = ErrorBody {
        error: msg,
        reason: reason.to_owned(),
    };
    (status, serde_json::to_string(&body).unwrap_or_default())
}

fn refused(e: &AccessError) -> Answer {
    let (status, reason) = e.status();
    error(status, reason, e.to_string())
}

/// Answers one request on one of the paths of [`serves`], its body already read.
pub async fn answer(
    ca: Arc<Ca>,
    peer: Option<SvidInfo>,
    method: Method,
    path: String,
    body: Bytes,
) -> Answer {
    let Some(peer) = peer else {
        ca.metrics.refuse("unauthenticated");
        return error(
            401,
            "unauthenticated",
            "this needs mTLS with a user SVID: run `mayfly login`".into(),
        );
    };
    let ca2 = ca.clone();
    // The sign-in, the grants and the audit events are in the store: blocking work.
    let answer = tokio::task::spawn_blocking(move || {
        let person = match access::person(&ca2, &peer) {
            Ok(p) => p,
            Err(e) => return refused(&e),
        };
        route(&ca2, &person, &method, &path, &body)
    })
    .await;
    answer.unwrap_or_else(|e| error(500, "internal", format!("request task failed: {e}")))
}

fn parsed<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, AccessError> {
    serde_json::from_slice(body).map_err(|e| AccessError::Bad(format!("expected {what}: {e}")))
}

fn ok(v: impl serde::Serialize) -> Answer {
    (200, serde_json::to_string(&v).unwrap_or_default())
}

fn route(ca: &Ca, p: &Person, method: &Method, path: &str, body: &[u8]) -> Answer {
    let result = match (method, path) {
        (&Method::POST, api::ACCESS_PATH) => parsed::<AccessRequest>(body, "an access request")
            .and_then(|r| access::request(ca, p, r))
            .map(ok),
        (&Method::GET, api::ACCESS_PATH) => access::list(ca, p).map(ok),
        (&Method::POST, api::ACCESS_DECIDE_PATH) => {
            parsed::<AccessDecision>(body, "{\"id\": ..., \"action\": ...}")
                .and_then(|d| access::decide(ca, p, &d.id, &d.action))
                .map(ok)
        }
        (&Method::POST, api::ACCESS_ENDPOINTS_PATH) => {
            parsed::<EndpointsLookup>(body, "{\"spiffe_id\": ...}")
                .and_then(|l| endpoints(ca, p, l))
                .map(ok)
        }
        (&Method::POST, api::ADMIN_PATH) => return admin(ca, p, body),
        _ => return error(405, "method_not_allowed", "method not allowed".into()),
    };
    result.unwrap_or_else(|e| refused(&e))
}

/// The live endpoints of a service, for a person holding an active grant to it.
fn endpoints(ca: &Ca, p: &Person, l: EndpointsLookup) -> Result<EndpointsFound, AccessError> {
    let Some(g) = access::active_grant(ca, &p.id, &l.spiffe_id)? else {
        return Err(AccessError::NoGrant(format!(
            "{} holds no active grant to {}: ask with `mayfly access request --to {}`",
            p.id, l.spiffe_id, l.spiffe_id
        )));
    };
    let now = time::OffsetDateTime::now_utc();
    let endpoints = ca
        .registry
        .addresses_of([l.spiffe_id.as_str()], now)
        .remove(&l.spiffe_id)
        .unwrap_or_default();
    Ok(EndpointsFound {
        spiffe_id: l.spiffe_id,
        endpoints,
        grant: g.id,
        expires: g.expires.unwrap_or(0),
    })
}

/// `POST /v1/admin`: one admin-socket request, for a person holding an active admin grant.
fn admin(ca: &Ca, p: &Person, body: &[u8]) -> Answer {
    let target = access::admin_target(ca);
    let grant = match access::active_grant(ca, &p.id, &target) {
        Ok(Some(g)) => g,
        Ok(None) => {
            let why = format!(
                "{} holds no active admin grant: ask with `mayfly access request --role admin`",
                p.id
            );
            ca.event(
                "admin.refused",
                json!({ "user": p.id, "via": "mtls", "reason": why }),
            );
            return error(403, "no_admin_grant", why);
        }
        Err(e) => return refused(&e),
    };
    let req: AdminRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(400, "bad_request", format!("bad admin request: {e}")),
    };
    ca.event(
        "admin.operation",
        json!({ "user": p.id, "op": req.op(), "grant": grant.id, "via": "mtls" }),
    );
    // Answered as the socket answers: `{"ok": false, "error": ...}` when the operation fails.
    let resp: AdminResponse = super::admin::dispatch(ca, &p.id, req);
    ok(resp)
}
