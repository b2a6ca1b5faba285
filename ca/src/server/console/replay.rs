//! The console's policy what-if (`/replay`): a candidate policy pasted into a form is replayed
//! against the recorded decisions of a window by [`crate::server::replay::replay`], the same
//! function as `mayfly-ca policy replay`, and the report is shown. Nothing is stored or
//! changed: the POST only carries the candidate (so the console stays read-only).

use std::collections::HashMap;
use std::sync::Arc;

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use maud::html;
use mayfly_policy::Policy;
use time::OffsetDateTime;

use super::pages::layout;
use super::records::time_bound;
use super::state::State;
use crate::server::replay::{ReplayReport, replay};

/// The largest candidate accepted.
pub const BODY_LIMIT: usize = 256 * 1024;

/// The form's fields and what became of them.
#[derive(Debug, Default)]
pub struct ReplayPage {
    /// The candidate policy (TOML).
    pub policy: String,
    /// The window's start: a duration ago or a UTC time.
    pub since: String,
    /// Why the candidate or the window could not be used.
    pub error: Option<String>,
    /// The report, once replayed.
    pub report: Option<ReplayReport>,
}

/// `GET /replay`: the empty form.
pub fn form() -> String {
    render(&ReplayPage {
        since: "24h".into(),
        ..ReplayPage::default()
    })
}

/// `POST /replay`: replays the candidate in the form; the status and the page.
pub async fn submit(state: &Arc<State>, req: Request<Incoming>) -> (StatusCode, String) {
    let body = match Limited::new(req.into_body(), BODY_LIMIT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let page = ReplayPage {
                error: Some(format!(
                    "the form is larger than {} KiB or was cut off",
                    BODY_LIMIT / 1024
                )),
                since: "24h".into(),
                ..ReplayPage::default()
            };
            return (StatusCode::PAYLOAD_TOO_LARGE, render(&page));
        }
    };
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let mut page = ReplayPage {
        policy: form.get("policy").cloned().unwrap_or_default(),
        since: form
            .get("since")
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "24h".into()),
        ..ReplayPage::default()
    };
    let since_ms = match time_bound(&page.since) {
        Ok(ms) => ms,
        Err(e) => {
            page.error = Some(e);
            return (StatusCode::BAD_REQUEST, render(&page));
        }
    };
    let now = OffsetDateTime::now_utc();
    let candidate = match Policy::from_toml_at(&page.policy, "candidate", now) {
        Ok(loaded) => loaded.policy,
        Err(e) => {
            page.error = Some(e.to_string());
            return (StatusCode::UNPROCESSABLE_ENTITY, render(&page));
        }
    };
    let Ok(since) = OffsetDateTime::from_unix_timestamp_nanos(i128::from(since_ms) * 1_000_000)
    else {
        page.error = Some(format!("{:?} is out of range", page.since));
        return (StatusCode::BAD_REQUEST, render(&page));
    };
    let ca = state.ca.clone();
    let result =
        tokio::task::spawn_blocking(move || replay(ca.store().as_ref(), &candidate, since)).await;
    match result {
        Ok(Ok(report)) => {
            page.report = Some(report);
            (StatusCode::OK, render(&page))
        }
        Ok(Err(e)) => {
            page.error = Some(format!("{e}: {}", error_chain(&e)));
            (StatusCode::INTERNAL_SERVER_ERROR, render(&page))
        }
        Err(e) => {
            page.error = Some(e.to_string());
            (StatusCode::INTERNAL_SERVER_ERROR, render(&page))
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

/// The page: the form, then the report or the error.
pub fn render(p: &ReplayPage) -> String {
    let body = html! {
        p.hint {
            "Paste a candidate policy: the decisions recorded since the start of the window are \
             decided again under it, and every flow whose decision would change is listed. \
             The same as " code { "mayfly-ca policy replay --policy FILE --since 24h" } "."
        }
        form #replay-form method="post" action="/replay" {
            label { "Since " input name="since" value=(p.since) size="20"; }
            textarea #candidate name="policy" rows="16" cols="100" spellcheck="false" { (p.policy) }
            button type="submit" { "Replay" }
        }
        @if let Some(e) = &p.error { pre.error #replay-error { (e) } }
        @if let Some(r) = &p.report {
            p #replay-summary {
                "Version " (r.candidate_version) ": " (r.decisions) " decisions replayed, "
                (r.unchanged) " unchanged (" (r.allowed_by_grant) " allowed by a grant, kept), "
                (r.unreadable) " unreadable. "
                @if r.changes_anything() { strong { "Something would change." } }
                @else { "No decision would change." }
            }
            @if !r.changes.is_empty() {
                table #changes {
                    thead { tr { th { "Change" } th { "Count" } th { "Side" } th { "Caller" }
                        th { "Callee" } th { "Method" } th { "Path / port" } th { "Example decision" } } }
                    tbody {
                        @for c in &r.changes {
                            tr.change {
                                td { (c.change.as_str()) } td { (c.count) } td { (c.flow.direction) }
                                td { (c.flow.caller) } td { (c.flow.callee) }
                                td { (c.flow.method.as_deref().unwrap_or("")) } td { (c.flow.target) }
                                td { code { (c.example_decision_id) } }
                            }
                        }
                    }
                }
            }
            @if !r.removed_rules.is_empty() {
                h2 { "Rules in force that the candidate drops" }
                table #removed {
                    thead { tr { th { "Rule" } th { "Action" } th { "Requests it matched" } } }
                    tbody {
                        @for rule in &r.removed_rules {
                            tr.removed { td { (rule.name) } td { (rule.action) } td { (rule.matched) } }
                        }
                    }
                }
            }
            @if !r.unused_allow_rules.is_empty() {
                h2 { "Allow rules nobody used in the window" }
                ul #unused { @for name in &r.unused_allow_rules { li { (name) } } }
            }
            @if !r.header_rules.is_empty() {
                p.hint { "Rules with a headers condition were decided as if no header was sent \
                          (headers are not recorded): " (r.header_rules.join(", ")) }
            }
        }
    };
    layout("Policy what-if", "/replay", body)
}
