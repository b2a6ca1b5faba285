//! `PUT` / `DELETE /v1/endpoints`: sidecars registering where they serve.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{error, json_response, read_json};
use crate::api;
use crate::server::ca::Ca;
use crate::svid::SvidInfo;

/// `PUT` / `DELETE /v1/endpoints`: the caller's own endpoints, filed under its certificate's
/// SPIFFE ID (the body cannot name one); a registration's lease never outlives that certificate.
pub(super) async fn endpoints(
    ca: Arc<Ca>,
    peer: Option<SvidInfo>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let Some(peer) = peer else {
        return error(
            401,
            "unauthenticated",
            "endpoint registration needs mTLS with a valid SVID".into(),
        );
    };
    if let Some(refused) = super::signin::not_a_person(&ca, &peer.id, "registers no endpoints") {
        return refused;
    }
    let put = req.method() == Method::PUT;
    let expected = r#"{"endpoints": ["HOST:PORT", ...]} (the SPIFFE ID is your certificate's)"#;
    let parsed: api::EndpointsRequest = match read_json(&ca, req.into_body(), expected).await {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    let id = peer.id.to_string();
    let now = time::OffsetDateTime::now_utc();
    let lease = ca
        .settings()
        .endpoint_lease
        .min(crate::server::registry::MAX_LEASE)
        .min(Duration::try_from(peer.not_after - now).unwrap_or_default());
    // The registry is in the store: blocking work.
    let (ca2, id2, addresses) = (ca.clone(), id.clone(), parsed.endpoints.clone());
    let result = tokio::task::spawn_blocking(move || {
        if put {
            ca2.registry.register(&id2, &addresses, now + lease, now)
        } else {
            ca2.registry.remove(&id2, &addresses, now)
        }
    })
    .await
    .unwrap_or_else(|e| {
        Err(crate::server::registry::RegistryError::Store(format!(
            "registry task failed: {e}"
        )))
    });
    let changed = match result {
        Ok(c) => c,
        Err(e) => {
            ca.metrics.refuse(e.reason());
            return error(e.status(), e.reason(), e.to_string());
        }
    };
    if !changed.is_empty() {
        let (kind, why) = if put {
            ("endpoint.registered", "registered")
        } else {
            ("endpoint.removed", "deregistered")
        };
        tracing::info!(spiffe_id = %id, endpoints = %changed.join(","), "endpoint {why}");
        let (ca2, id2, addrs) = (ca.clone(), id.clone(), changed.clone());
        let _ = tokio::task::spawn_blocking(move || {
            for a in addrs {
                ca2.event(
                    kind,
                    serde_json::json!({ "spiffe_id": id2, "address": a, "why": why }),
                );
            }
        })
        .await;
    }
    let body = if put {
        serde_json::to_string(&api::EndpointsResponse {
            spiffe_id: id,
            endpoints: crate::server::registry::checked(&parsed.endpoints).unwrap_or_default(),
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
        })
    } else {
        serde_json::to_string(&serde_json::json!({ "spiffe_id": id, "removed": changed }))
    };
    json_response(StatusCode::OK, body.unwrap_or_default())
}
