//! The admin listener (loopback by default): `/healthz`, `/readyz`, `/metrics`, `/svid`, and
//! `/app-health/<container>/<probe>`: the app's own HTTP probes, forwarded to its loopback
//! port (set up by `mayfly-sidecar inject`, which rewrites the pod's probes to these paths).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use mayfly_ca::accept::{self, Unlimited};
use mayfly_ca::keys::pem_encode;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use mayfly_inject::probes::{APP_HEALTH_PREFIX, APP_PROBES_ENV, AppProbe, parse_app_probes};

use crate::metrics::{Format, Metrics};
use crate::ready::Readiness;

/// What the admin endpoints read.
pub struct AdminState {
    /// Identity, policy and audit: what `/readyz` reports.
    pub ready: Readiness,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The endpoints the control plane pushed for each outbound's SPIFFE ID.
    pub upstreams: Arc<crate::upstreams::Upstreams>,
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
            let client = s.ready.identity.client();
            s.metrics
                .control_plane_reached(client.address_in_use(), client.failovers());
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
        "/upstreams" => reply(
            StatusCode::OK,
            "application/json",
            format!("{}\n", s.upstreams.json()),
        ),
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

/// How long a forwarded probe may take (the kubelet's own timeout is usually shorter).
const APP_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The app probes from the environment (read once; `mayfly-sidecar run` refuses a bad value
/// before starting, so an error here only means none).
pub fn app_probes() -> &'static HashMap<String, AppProbe> {
    static PROBES: OnceLock<HashMap<String, AppProbe>> = OnceLock::new();
    PROBES.get_or_init(|| {
        parse_app_probes(std::env::var(APP_PROBES_ENV).ok().as_deref()).unwrap_or_default()
    })
}

/// Forwards one app probe to loopback: the app's status (the kubelet counts 200-399 as
/// success), or 503 when the app does not answer.
pub async fn forward_app_probe(
    probes: &HashMap<String, AppProbe>,
    route: &str,
) -> Response<Full<Bytes>> {
    let Some(p) = probes.get(route) else {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such app probe\n".into(),
        );
    };
    match tokio::time::timeout(APP_PROBE_TIMEOUT, probe_app(p)).await {
        Ok(Ok(status)) => reply(status, "text/plain", format!("app answered {status}\n")),
        Ok(Err(e)) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("app probe to 127.0.0.1:{}{} failed: {e}\n", p.port, p.path),
        ),
        Err(_) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("app probe to 127.0.0.1:{}{} timed out\n", p.port, p.path),
        ),
    }
}

async fn probe_app(p: &AppProbe) -> Result<StatusCode, String> {
    let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, p.port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::get(p.path.as_str())
        .header(http::header::HOST, format!("127.0.0.1:{}", p.port))
        .header(http::header::USER_AGENT, "mayfly-sidecar-app-probe");
    for (k, v) in &p.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

/// Serves the admin listener until `stop` flips.
pub async fn serve(state: Arc<AdminState>, listener: TcpListener, stop: watch::Receiver<bool>) {
    accept::serve("admin", listener, stop, Unlimited, |tcp, _| {
        let state = state.clone();
        (tracing::Span::none(), async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let route = req
                    .uri()
                    .path()
                    .starts_with(APP_HEALTH_PREFIX)
                    .then(|| req.uri().path().to_owned());
                let r = match route {
                    Some(_) => None,
                    None => Some(handle(&state, &req)),
                };
                async move {
                    Ok::<_, Infallible>(match (r, route) {
                        (Some(r), _) => r,
                        (None, route) => {
                            forward_app_probe(app_probes(), route.as_deref().unwrap_or_default())
                                .await
                        }
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        })
    })
    .await;
}
