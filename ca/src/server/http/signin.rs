//! `POST /v1/user/svid` (a verified ID token and a CSR -> a user SVID) and `GET /v1/oidc` (the
//! issuers people sign in with). Neither needs a client certificate: the ID token is the
//! credential.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{decode_csr, error, json_response, read_json};
use crate::api::{OidcIssuer, OidcIssuers, UserSvidRequest, UserSvidResponse};
use crate::server::ca::Ca;
use crate::server::oidc::peek_issuer;

/// A refusal if `id` is a person's: people reach services through their grants, they never
/// act as a workload. `what` completes "it ...": no endpoint registration (it serves nothing),
/// no JWT-SVIDs (a bearer token would outlive the connection a grant admits), no watch stream
/// (the mesh's endpoints, grants and policy are a workload's to know; a person asks for one
/// service's endpoints under a grant).
pub(super) fn not_a_person(
    ca: &Ca,
    id: &crate::identity::id::SpiffeId,
    what: &str,
) -> Option<Response<Full<Bytes>>> {
    if !crate::identity::id::is_user(id) {
        return None;
    }
    ca.metrics.refuse("user_namespace");
    Some(error(
        403,
        "user_namespace",
        format!("{id} is a person's identity: it {what}"),
    ))
}

/// `GET /v1/oidc`.
pub(super) fn issuers(ca: &Ca) -> Response<Full<Bytes>> {
    let body = OidcIssuers {
        issuers: ca
            .settings()
            .oidc
            .issuers()
            .map(|i| OidcIssuer {
                issuer: i.issuer.clone(),
                client_id: i.client_id.clone(),
                user_claim: i.user_claim.clone(),
            })
            .collect(),
    };
    json_response(
        StatusCode::OK,
        serde_json::to_string(&body).unwrap_or_default(),
    )
}

/// `POST /v1/user/svid`.
pub(super) async fn user_svid(
    ca: Arc<Ca>,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let peer = addr.to_string();
    let expected = r#"{"id_token": "...", "csr": "<base64 DER>"}"#;
    let parsed: UserSvidRequest = match read_json(&ca, req.into_body(), expected).await {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    let csr = match decode_csr(&ca, &parsed.csr) {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let td = ca.bundle().trust_domain().clone();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let verified = ca
        .settings()
        .oidc
        .verify(&parsed.id_token, &td, parsed.nonce.as_deref(), now)
        .await;
    let sign_in = match verified {
        Ok(s) => s,
        Err(e) => {
            let issuer = peek_issuer(&parsed.id_token);
            let ca2 = ca.clone();
            let (reason, text) = (e.reason(), e.to_string());
            let _ = tokio::task::spawn_blocking(move || {
                ca2.sign_in_refused(reason, &text, issuer.as_deref(), &peer)
            })
            .await;
            return error(e.status(), e.reason(), e.to_string());
        }
    };
    let ca2 = ca.clone();
    // Signing and the store's fsync are blocking work.
    let result = tokio::task::spawn_blocking(move || {
        ca2.issue_user_svid(&csr, &sign_in, &peer)
            .map(|issued| (issued, sign_in))
    })
    .await;
    match result {
        Ok(Ok((issued, sign_in))) => {
            let bundle: serde_json::Value =
                serde_json::from_str(&ca.jwks()).unwrap_or(serde_json::Value::Null);
            let resp = UserSvidResponse {
                spiffe_id: issued.id.to_string(),
                chain: issued.chain.iter().map(|c| STANDARD.encode(c)).collect(),
                bundle,
                not_after: issued.not_after.unix_timestamp(),
                issuer: sign_in.issuer,
                sign_in_expires: sign_in.expires_at,
            };
            json_response(
                StatusCode::OK,
                serde_json::to_string(&resp).unwrap_or_default(),
            )
        }
        Ok(Err(refusal)) => error(refusal.status(), refusal.reason(), refusal.to_string()),
        Err(e) => error(500, "internal", format!("issuance task failed: {e}")),
    }
}
