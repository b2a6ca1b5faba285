//! The control plane's background work: rotation of the authorities and of its own SVID,
//! the audit chain's upkeep, the endpoint sweep, and the metrics listener.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{Ca, audit};

/// Rotation of authorities and of the control plane's own SVID.
pub(super) async fn maintain(ca: Arc<Ca>, mut shutdown: watch::Receiver<bool>) {
    let mut svid_renew_at = OffsetDateTime::now_utc()
        + time::Duration::seconds((ca.settings().svid_max_ttl.as_secs() / 2) as i64);
    loop {
        let now = OffsetDateTime::now_utc();
        let next_rotation = match ca.rotate(now) {
            Ok(t) => t,
            Err(e) => {
                error!(error = %e, "CA rotation failed; retrying in 30s");
                now + time::Duration::seconds(30)
            }
        };
        if now >= svid_renew_at {
            match ca.renew_own_svid(now) {
                Ok(not_after) => svid_renew_at = now + (not_after - now) / 2,
                Err(e) => {
                    warn!(error = %e, "cannot renew the control plane's SVID; retrying in 10s");
                    svid_renew_at = now + time::Duration::seconds(10);
                }
            }
        }
        let wake = next_rotation.min(svid_renew_at);
        let wait = (wake - OffsetDateTime::now_utc())
            .clamp(time::Duration::seconds(1), time::Duration::seconds(60));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(wait.as_seconds_f64())) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The control plane's own audit upkeep every [`audit::ANCHOR_INTERVAL`]: the store's
/// condition, lost events, anchors of the sidecar chains that advanced, a signed checkpoint.
pub(super) async fn keep_audit(ca: Arc<Ca>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(audit::ANCHOR_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        let ca = ca.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || audit::settle(&ca)).await {
            error!(error = %e, "the audit upkeep task failed");
        }
    }
}

/// Drops endpoint registrations whose lease ended, waking when the next one ends (a new
/// registration wakes it too), and records each as `endpoint.removed`.
pub(super) async fn sweep_endpoints(ca: Arc<Ca>, mut shutdown: watch::Receiver<bool>) {
    let mut changes = ca.registry.subscribe();
    loop {
        changes.borrow_and_update();
        let ca2 = ca.clone();
        let swept =
            tokio::task::spawn_blocking(move || ca2.registry.sweep(OffsetDateTime::now_utc()))
                .await;
        let gone = match swept {
            Ok(Ok(gone)) => gone,
            Ok(Err(e)) => {
                // This replica's copy was swept; the store's rows go at a later sweep (here
                // or on another replica).
                debug!(error = %e, "cannot sweep expired endpoints from the store");
                Vec::new()
            }
            Err(e) => {
                error!(error = %e, "the endpoint sweep task failed");
                Vec::new()
            }
        };
        if !gone.is_empty() {
            for (id, a) in &gone {
                info!(spiffe_id = %id, endpoint = %a, "endpoint lease ended without refresh");
            }
            let ca2 = ca.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for (id, a) in gone {
                    ca2.event(
                        "endpoint.removed",
                        json!({ "spiffe_id": id, "address": a, "why": "expired" }),
                    );
                }
            })
            .await;
        }
        let wait = ca
            .registry
            .next_expiry()
            .map_or(Duration::from_secs(5), |t| {
                Duration::try_from(t - OffsetDateTime::now_utc())
                    .unwrap_or_default()
                    .clamp(Duration::from_millis(10), Duration::from_secs(5))
            });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = changes.changed() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// `/healthz`: 200 while the control plane can do its work, 503 with the reason while its
/// store cannot write (it refuses SVIDs and audit records then).
fn health(ca: &Ca) -> (u16, String) {
    match ca.store().unwritable() {
        None => (200, "ok\n".to_owned()),
        Some(why) => (503, format!("store cannot write: {why}\n")),
    }
}

pub(super) async fn serve_metrics(
    ca: Arc<Ca>,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    crate::accept::serve(
        "metrics",
        listener,
        shutdown,
        crate::accept::Unlimited,
        |tcp, _| (tracing::Span::none(), metrics_conn(ca.clone(), tcp)),
    )
    .await;
}

/// One connection to the metrics listener: `/metrics` and `/healthz`.
async fn metrics_conn(ca: Arc<Ca>, tcp: tokio::net::TcpStream) {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let svc = hyper::service::service_fn(move |req: ::http::Request<hyper::body::Incoming>| {
        let ca = ca.clone();
        async move {
            let mut content_type = "text/plain; charset=utf-8";
            let (status, body) = match req.uri().path() {
                "/metrics" => {
                    let writable = ca.store().unwritable().is_none();
                    ca.metrics.store_writable.set(i64::from(writable));
                    let accept = req
                        .headers()
                        .get(::http::header::ACCEPT)
                        .and_then(|v| v.to_str().ok());
                    let format = crate::identity::exposition::Format::negotiate(accept);
                    content_type = format.content_type();
                    let om = ca.metrics.encode();
                    let body = match format {
                        crate::identity::exposition::Format::OpenMetrics => om,
                        crate::identity::exposition::Format::Text => {
                            crate::identity::exposition::openmetrics_to_text(&om)
                        }
                    };
                    (200, body)
                }
                "/healthz" => health(&ca),
                _ => (404, "not found\n".to_owned()),
            };
            let mut r = ::http::Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = ::http::StatusCode::from_u16(status).unwrap_or_default();
            r.headers_mut().insert(
                ::http::header::CONTENT_TYPE,
                ::http::HeaderValue::from_static(content_type),
            );
            Ok::<_, std::convert::Infallible>(r)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(tcp), svc)
        .await;
}
