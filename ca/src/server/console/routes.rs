//! The console's routes: the access check, the security headers every answer carries, and
//! the data behind each page (read from the store off the runtime's threads).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use time::OffsetDateTime;

use super::graph::{self, GRAPH_LIMIT, Window};
use super::pages::{self, AuditPage, ChainStatus, IdentityRow};
use super::records::{DECISION_KINDS, Decision, time_bound};
pub use super::state::{Contact, RespBody, State};
use super::{allowed, replay, sse};
use crate::server::audit::verify_some;
use crate::server::ca::Ca;
use crate::server::metrics::PathLabel;
use crate::server::store::AuditFilter;
use crate::svid::SvidInfo;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// Every page's Content-Security-Policy: nothing but this origin's own files, no inline script
/// or style, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The pages whose render time is measured (`mayfly_ca_request_duration_seconds`).
const PAGES: [&str; 6] = [
    "/graph",
    "/identities",
    "/live",
    "/grants",
    "/audit",
    "/replay",
];

/// The most records the audit search shows.
pub const SEARCH_LIMIT: u32 = 500;

fn with_headers(mut r: Response<RespBody>) -> Response<RespBody> {
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    r
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<RespBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn html(status: StatusCode, body: String) -> Response<RespBody> {
    respond(status, "text/html; charset=utf-8", body)
}

/// The query string's parameters (the last of each name; empty values are absent).
fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| (k.into_owned(), v.trim().to_owned()))
        .collect()
}

/// Serves one request.
pub async fn handle(
    state: Arc<State>,
    peer: Option<&SvidInfo>,
    req: Request<Incoming>,
) -> Response<RespBody> {
    if !allowed(&state.opts, peer) && !holds_admin_grant(&state, peer).await {
        return with_headers(respond(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            "forbidden: this console needs a client certificate whose SPIFFE ID is on its \
             allow list (--ui-allow), or a person's user SVID holding an active admin grant \
             (mayfly access request --role admin)\n"
                .into(),
        ));
    }
    // The one POST: a candidate policy for the what-if, which changes nothing.
    let replay_post = req.method() == Method::POST && req.uri().path() == "/replay";
    if req.method() != Method::GET && req.method() != Method::HEAD && !replay_post {
        return with_headers(respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "the console is read-only\n".into(),
        ));
    }
    let q = query(&req);
    let path = req.uri().path().to_owned();
    let start = std::time::Instant::now();
    let resp = match path.as_str() {
        "/" => {
            let mut r = respond(StatusCode::SEE_OTHER, "text/plain", String::new());
            r.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/graph"));
            r
        }
        "/assets/console.css" => respond(StatusCode::OK, "text/css; charset=utf-8", CSS.into()),
        "/assets/console.js" => {
            respond(StatusCode::OK, "text/javascript; charset=utf-8", JS.into())
        }
        "/graph" => graph_page(&state, &q).await,
        "/identities" => identities_page(&state).await,
        "/grants" => grants_page(&state).await,
        "/live" => html(
            StatusCode::OK,
            pages::live(
                q.get("identity").map(String::as_str),
                q.get("decision").map(String::as_str),
            ),
        ),
        "/live/events" => sse::events(&state, q.get("identity").cloned(), decision_filter(&q)),
        "/audit" => audit_page(&state, &q).await,
        "/replay" if replay_post => {
            let (status, page) = replay::submit(&state, req).await;
            html(status, page)
        }
        "/replay" => html(StatusCode::OK, replay::form()),
        _ => html(
            StatusCode::NOT_FOUND,
            pages::message("Not found", "No such page."),
        ),
    };
    if PAGES.contains(&path.as_str()) {
        // Render time beside the API's, as `path="console:/graph"` and so on.
        let label = PathLabel {
            path: format!("console:{path}"),
        };
        state
            .ca
            .metrics
            .latency
            .get_or_create(&label)
            .observe(start.elapsed().as_secs_f64());
    }
    with_headers(resp)
}

/// Over TLS, a person's user SVID (still valid) that holds an active admin grant (an approved
/// `role = "admin"` request) opens the console as an allow-listed ID does: the admin rules of
/// `[[access.rule]]` decide who can see the mesh, and for minutes only.
async fn holds_admin_grant(state: &Arc<State>, peer: Option<&SvidInfo>) -> bool {
    let Some(peer) = peer.filter(|p| state.opts.tls && p.not_after > OffsetDateTime::now_utc())
    else {
        return false;
    };
    let (ca, peer) = (state.ca.clone(), peer.clone());
    tokio::task::spawn_blocking(move || {
        let person = crate::server::access::person(&ca, &peer).ok()?;
        let admin = crate::server::access::admin_target(&ca);
        crate::server::access::active_grant(&ca, &person.id, &admin).ok()?
    })
    .await
    .ok()
    .flatten()
    .is_some()
}

fn decision_filter(q: &HashMap<String, String>) -> Option<String> {
    q.get("decision")
        .filter(|d| *d == "allow" || *d == "deny")
        .cloned()
}

/// Runs blocking store work; an error becomes a 500 page.
async fn blocking<T: Send + 'static>(
    state: &Arc<State>,
    f: impl FnOnce(&Ca) -> Result<T, String> + Send + 'static,
) -> Result<T, Response<RespBody>> {
    let ca = state.ca.clone();
    match tokio::task::spawn_blocking(move || f(&ca)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(html(
            StatusCode::INTERNAL_SERVER_ERROR,
            pages::message("Cannot read the store", &e),
        )),
        Err(e) => Err(html(
            StatusCode::INTERNAL_SERVER_ERROR,
            pages::message("Internal error", &e.to_string()),
        )),
    }
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

async fn graph_page(state: &Arc<State>, q: &HashMap<String, String>) -> Response<RespBody> {
    let window = match q.get("window").map(String::as_str) {
        None => Window::Hour1,
        Some(w) => match Window::parse(w) {
            Some(w) => w,
            None => {
                return html(
                    StatusCode::BAD_REQUEST,
                    pages::message("Bad window", "window must be 15m, 1h or 24h."),
                );
            }
        },
    };
    let since = now_ms() - window.millis();
    let read = blocking(state, move |ca| {
        let mut decisions = Vec::new();
        let mut truncated = false;
        for kind in DECISION_KINDS {
            let lines = ca
                .store()
                .audit_query(&AuditFilter {
                    since_ms: Some(since),
                    kind: Some(kind.to_owned()),
                    limit: GRAPH_LIMIT,
                    ..AuditFilter::default()
                })
                .map_err(|e| e.to_string())?;
            truncated |= lines.len() >= GRAPH_LIMIT as usize;
            decisions.extend(lines.iter().filter_map(|l| Decision::parse(l)));
        }
        Ok((graph::build(decisions), truncated))
    })
    .await;
    match read {
        Ok((mesh, truncated)) => html(StatusCode::OK, pages::graph(&mesh, window, truncated)),
        Err(r) => r,
    }
}

async fn identities_page(state: &Arc<State>) -> Response<RespBody> {
    let contact = state.contact.lock().map(|c| c.clone()).unwrap_or_default();
    let lease_ms = state.ca.settings().endpoint_lease.as_millis() as i64;
    let read = blocking(state, move |ca| {
        let endpoints = ca.store().endpoints().map_err(|e| e.to_string())?;
        let issued = ca.store().list_issued(5000).map_err(|e| e.to_string())?;
        let own = ca.ca_id().to_string();
        let mut rows: std::collections::BTreeMap<String, IdentityRow> = Default::default();
        let now = now_ms();
        for e in endpoints.iter().filter(|e| e.until_ms > now) {
            let r = rows.entry(e.spiffe_id.clone()).or_default();
            r.endpoints.push(e.address.clone());
            r.last_contact_ms = r.last_contact_ms.max(e.until_ms - lease_ms);
        }
        for i in issued.iter().filter(|i| i.spiffe_id != own) {
            let r = rows.entry(i.spiffe_id.clone()).or_default();
            let at = (i.issued_at.unix_timestamp_nanos() / 1_000_000) as i64;
            if at >= r.issued_at_ms {
                r.issued_at_ms = at;
                r.svid_expiry = Some(i.not_after.unix_timestamp());
            }
            r.last_contact_ms = r.last_contact_ms.max(at);
        }
        for (source, c) in contact.iter().filter(|(s, _)| **s != own) {
            let r = rows.entry(source.clone()).or_default();
            r.last_contact_ms = r.last_contact_ms.max(c.last_ms);
            r.policy_version = Some(c.policy_version.clone()).filter(|v| !v.is_empty());
        }
        Ok(rows
            .into_iter()
            .map(|(id, mut r)| {
                r.id = id;
                r
            })
            .collect::<Vec<_>>())
    })
    .await;
    match read {
        Ok(rows) => html(StatusCode::OK, pages::identities(&rows)),
        Err(r) => r,
    }
}

async fn grants_page(state: &Arc<State>) -> Response<RespBody> {
    let read = blocking(state, |ca| {
        crate::server::distribution::list(ca).map_err(|e| e.to_string())
    })
    .await;
    match read {
        Ok(grants) => html(
            StatusCode::OK,
            pages::grants(&grants, OffsetDateTime::now_utc().unix_timestamp()),
        ),
        Err(r) => r,
    }
}

async fn audit_page(state: &Arc<State>, q: &HashMap<String, String>) -> Response<RespBody> {
    let mut page = AuditPage {
        identity: q.get("identity").cloned(),
        decision: decision_filter(q),
        kind: q.get("kind").cloned(),
        since: q.get("since").cloned(),
        until: q.get("until").cloned(),
        ..AuditPage::default()
    };
    let bounds = (
        page.since.as_deref().map(time_bound).transpose(),
        page.until.as_deref().map(time_bound).transpose(),
    );
    let (since_ms, until_ms) = match bounds {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => {
            page.error = Some(e);
            return html(StatusCode::BAD_REQUEST, pages::audit(&page));
        }
    };
    let (identity, decision, kind) = (
        page.identity.clone(),
        page.decision.clone(),
        page.kind.clone(),
    );
    let st = state.clone();
    let read = blocking(state, move |ca| {
        let lines = ca
            .store()
            .audit_query(&AuditFilter {
                since_ms,
                until_ms,
                kind,
                limit: if identity.is_some() || decision.is_some() {
                    20_000
                } else {
                    SEARCH_LIMIT
                },
                ..AuditFilter::default()
            })
            .map_err(|e| e.to_string())?;
        let mut found = Vec::new();
        for line in lines.into_iter().rev() {
            let d = Decision::parse(&line);
            let keep = match &d {
                Some(d) => d.matches(identity.as_deref(), decision.as_deref()),
                None => {
                    decision.is_none()
                        && identity.as_deref().is_none_or(|i| {
                            super::records::head(&line)
                                .is_some_and(|(c, ..)| c.starts_with(&format!("{i}#")))
                        })
                }
            };
            if keep {
                found.push(line);
                if found.len() >= SEARCH_LIMIT as usize {
                    break;
                }
            }
        }
        let chains: BTreeSet<String> = found
            .iter()
            .filter_map(|l| super::records::head(l).map(|(c, ..)| c))
            .collect();
        let statuses = chain_statuses(&st, ca, &chains)?;
        Ok((found, statuses))
    })
    .await;
    match read {
        Ok((found, statuses)) => {
            page.records = found;
            page.chains = statuses;
            html(StatusCode::OK, pages::audit(&page))
        }
        Err(r) => r,
    }
}

/// The verification of each of `chains`: cached per chain head, re-verified (with the
/// existing chain verification) only for chains the follower saw grow since.
fn chain_statuses(
    state: &State,
    ca: &Ca,
    chains: &BTreeSet<String>,
) -> Result<Vec<ChainStatus>, String> {
    let stale: BTreeSet<String> = {
        let dirty = state.dirty.lock().map_err(|e| e.to_string())?;
        let verified = state.verified.lock().map_err(|e| e.to_string())?;
        chains
            .iter()
            .filter(|c| dirty.contains(*c) || !verified.contains_key(*c))
            .cloned()
            .collect()
    };
    if !stale.is_empty() {
        let bundles = ca.bundles().load_full();
        let reports =
            verify_some(ca.store().as_ref(), &bundles, Some(&stale)).map_err(|e| e.to_string())?;
        let mut verified = state.verified.lock().map_err(|e| e.to_string())?;
        let mut dirty = state.dirty.lock().map_err(|e| e.to_string())?;
        for r in reports {
            dirty.remove(&r.chain);
            let status = match &r.result {
                Ok(s) => ChainStatus {
                    chain: r.chain.clone(),
                    ok: true,
                    text: format!(
                        "verified: {} records to seq {}, {} signed checkpoints",
                        s.records, s.last_seq, s.checkpoints
                    ),
                },
                Err(e) => ChainStatus {
                    chain: r.chain.clone(),
                    ok: false,
                    text: format!("BROKEN: {e}"),
                },
            };
            verified.insert(r.chain, status);
        }
    }
    let verified = state.verified.lock().map_err(|e| e.to_string())?;
    Ok(chains
        .iter()
        .map(|c| {
            verified.get(c).cloned().unwrap_or_else(|| ChainStatus {
                chain: c.clone(),
                ok: false,
                text: "not verified".into(),
            })
        })
        .collect())
}
