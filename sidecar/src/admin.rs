//! The admin listener (loopback by default): `/healthz`, `/readyz`, `/metrics`, `/svid`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use mayfly_ca::keys::pem_encode;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{Format, Metrics};
use crate::ready::Readiness;

/// What the admin endpoints read.
pub struct AdminState {
    /// Identity, policy and audit: what `/readyz` reports.
    pub ready: Readiness,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

fn reply(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    r
}

fn handle(s: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            // The same predicate that holds the listeners: ready exactly when the sidecar
            // does not refuse traffic for a reason of its own.
            let reasons = s.ready.reasons();
            let ready = reasons.is_empty();
            let body = json!({
                "ready": ready,
                "reasons": reasons,
                "svid": s.ready.identity.ready(),
                "svid_expires_in": s.ready.identity.expires_in(),
                "policy": s.ready.policy.loaded(),
                "policy_version": s.ready.policy.version(),
                "audit": s.ready.audit.admits(),
            });
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, "application/json", format!("{body}\n"))
        }
        "/metrics" => {
            s.metrics.svid_expiry.set(s.ready.identity.expires_in());
            let accept = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = Format::negotiate(accept);
            reply(
                StatusCode::OK,
                format.content_type(),
                s.metrics.encode_as(format),
            )
        }
        "/svid" => match s.ready.identity.creds.get() {
            Some(svid) => {
                let chain: String = svid
                    .certified
                    .cert
                    .iter()
                    .map(|c| pem_encode("CERTIFICATE", c))
                    .collect();
                let body = json!({
                    "spiffe_id": svid.info.id.to_string(),
                    "serial": svid.info.serial,
                    "not_before": svid.info.not_before.unix_timestamp(),
                    "not_after": svid.info.not_after.unix_timestamp(),
                    "expires_in": s.ready.identity.expires_in(),
                    "chain_pem": chain,
                });
                reply(StatusCode::OK, "application/json", format!("{body}\n"))
            }
            None => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                "{\"error\": \"no SVID held\"}\n".into(),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves the admin listener until `stop` flips.
pub async fn serve(state: Arc<AdminState>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stop.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = handle(&state, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
