//! The live decision stream: one task follows the audit store (the `audit_after` cursor) and
//! broadcasts each new decision; each `GET /live/events` is a server-sent event stream of those
//! that pass its filters. The broadcast buffer is bounded: a client that falls behind it is
//! dropped (it reconnects), and nothing ever waits for a client.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::sync::{broadcast, watch};
use tracing::debug;

use super::records::{Decision, Glance};
use super::state::{Contact, RespBody, State};
use crate::server::ca::Ca;

/// How often the store is asked for new records.
pub const POLL: Duration = Duration::from_millis(250);
/// A comment line keeps idle streams open through proxies.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Records read per store call.
const PAGE: u32 = 1000;

/// What one pass over the new records found.
struct Pass {
    cursor: i64,
    decisions: Vec<Decision>,
}

/// Reads every record after `cursor` (at most `pages` pages): marks their chains for
/// re-verification, notes each source's last contact and policy version, and returns the
/// decisions.
fn read_new(ca: &Ca, state: &State, mut cursor: i64, pages: usize) -> Pass {
    let mut decisions = Vec::new();
    for _ in 0..pages {
        let rows = match ca.store().audit_after(cursor, PAGE) {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "console: cannot read new audit records");
                break;
            }
        };
        let full = rows.len() == PAGE as usize;
        // Decisions are built only for live views to send them to: with nobody watching,
        // a record is read once, for its chain, time and policy version.
        let watched = state.live.receiver_count() > 0;
        let mut chains = BTreeSet::new();
        for (id, line) in rows {
            cursor = cursor.max(id);
            let Some(g) = Glance::parse(&line) else {
                continue;
            };
            let ts_ms = g.ts_ms;
            let is_decision = g.is_decision();
            if let Ok(mut contact) = state.contact.lock() {
                let c = contact
                    .entry(g.source().to_owned())
                    .or_insert_with(Contact::default);
                c.last_ms = c.last_ms.max(ts_ms);
                if is_decision && ts_ms >= c.policy_ms {
                    let version = g.policy_version();
                    if !version.is_empty() {
                        c.policy_version = version;
                        c.policy_ms = ts_ms;
                    }
                }
            }
            chains.insert(g.chain());
            if watched && is_decision {
                decisions.extend(Decision::parse(&line));
            }
        }
        if let Ok(mut dirty) = state.dirty.lock() {
            dirty.extend(chains);
        }
        if !full {
            break;
        }
    }
    Pass { cursor, decisions }
}

/// Follows the store until `shutdown`: first through every stored record (nothing is
/// broadcast), then every [`POLL`].
pub async fn poll(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let mut cursor = 0;
    let mut first = true;
    loop {
        let st = state.clone();
        let pages = if first { usize::MAX } else { 20 };
        let pass =
            tokio::task::spawn_blocking(move || read_new(&st.ca.clone(), &st, cursor, pages)).await;
        match pass {
            Ok(pass) => {
                cursor = pass.cursor;
                if !first {
                    for d in pass.decisions {
                        // No receiver is not an error: nobody is watching.
                        let _ = state.live.send(Arc::new(d));
                    }
                }
                first = false;
            }
            Err(e) => debug!(error = %e, "console: the audit follower task failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One decision as an event (`data:` holds its JSON, which the page shows as text).
fn event(d: &Decision) -> Bytes {
    let json = serde_json::to_string(d).unwrap_or_default();
    Bytes::from(format!("event: decision\ndata: {json}\n\n"))
}

/// The event stream of one live view: a greeting, then each decision from `rx` that passes
/// the filters, a comment every [`KEEPALIVE`]; it ends on shutdown, or as soon as the view has
/// fallen more than the broadcast buffer behind.
pub fn stream(
    rx: broadcast::Receiver<Arc<Decision>>,
    stop: watch::Receiver<bool>,
    identity: Option<String>,
    decision: Option<String>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static {
    let filters = Arc::new((identity, decision));
    futures_util::stream::unfold(
        (rx, stop, true),
        move |(mut rx, mut stop, first): (broadcast::Receiver<Arc<Decision>>, _, bool)| {
            let filters = filters.clone();
            async move {
                if first {
                    let hello = Bytes::from_static(b"retry: 2000\n: connected\n\n");
                    return Some((Ok::<_, Infallible>(Frame::data(hello)), (rx, stop, false)));
                }
                loop {
                    tokio::select! {
                        r = rx.recv() => match r {
                            Ok(d) => {
                                if d.matches(filters.0.as_deref(), filters.1.as_deref()) {
                                    return Some((Ok(Frame::data(event(&d))), (rx, stop, false)));
                                }
                            }
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                debug!(missed = n, "console: dropping a live view that fell behind");
                                return None;
                            }
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                        _ = tokio::time::sleep(KEEPALIVE) => {
                            let ping = Bytes::from_static(b": keepalive\n\n");
                            return Some((Ok(Frame::data(ping)), (rx, stop, false)));
                        }
                        _ = stop.changed() => return None,
                    }
                }
            }
        },
    )
}

/// `GET /live/events?identity=ID&decision=allow|deny`: new decisions as server-sent events.
pub fn events(
    state: &State,
    identity: Option<String>,
    decision: Option<String>,
) -> Response<RespBody> {
    let stream = stream(
        state.live.subscribe(),
        state.shutdown.clone(),
        identity,
        decision,
    );
    let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed());
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}
