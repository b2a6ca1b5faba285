//! The console's HTML: one layout and a function per page. maud escapes every value it
//! interpolates, and everything shown here came from the network or the store.

use maud::{DOCTYPE, Markup, html};

use super::graph::{self, Mesh, Window};
use super::records::{Decision, format_ms};
use crate::server::distribution::GrantRecord;
use crate::server::store::GrantState;

/// One identity's row on the identities page.
#[derive(Debug, Clone, Default)]
pub struct IdentityRow {
    /// SPIFFE ID.
    pub id: String,
    /// Its live registered endpoints.
    pub endpoints: Vec<String>,
    /// The newest SVID's NotAfter (Unix seconds), from the issuance log.
    pub svid_expiry: Option<i64>,
    /// When that SVID was issued (Unix ms).
    pub issued_at_ms: i64,
    /// The policy version its newest decision names.
    pub policy_version: Option<String>,
    /// The latest issuance, registration or audit record (Unix ms).
    pub last_contact_ms: i64,
}

/// One chain's verification status.
#[derive(Debug, Clone)]
pub struct ChainStatus {
    /// The chain key.
    pub chain: String,
    /// Whether it verified.
    pub ok: bool,
    /// What verification said.
    pub text: String,
}

/// The audit search: its filters and what it found.
#[derive(Debug, Clone, Default)]
pub struct AuditPage {
    /// Either side's SPIFFE ID (or a record's writer).
    pub identity: Option<String>,
    /// `allow` or `deny`.
    pub decision: Option<String>,
    /// Record kind.
    pub kind: Option<String>,
    /// From (a duration ago or a UTC time).
    pub since: Option<String>,
    /// Until.
    pub until: Option<String>,
    /// A filter that could not be read.
    pub error: Option<String>,
    /// Matching records, newest first.
    pub records: Vec<Vec<u8>>,
    /// The verification of each chain the records are on.
    pub chains: Vec<ChainStatus>,
}

const NAV: [(&str, &str); 6] = [
    ("/graph", "Mesh"),
    ("/identities", "Identities"),
    ("/live", "Live"),
    ("/grants", "Grants"),
    ("/audit", "Audit"),
    ("/replay", "What-if"),
];

/// The page frame: navigation, title, body.
pub(super) fn layout(title: &str, current: &str, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · mayfly console" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header {
                    span.brand { "mayfly" }
                    nav {
                        @for (href, name) in NAV {
                            a href=(href) class=(if href == current { "current" } else { "" }) { (name) }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
    .into_string()
}

/// A page that only says something (errors, not found).
pub fn message(title: &str, text: &str) -> String {
    layout(title, "", html! { p.message { (text) } })
}

/// The mesh graph page.
pub fn graph(mesh: &Mesh, window: Window, truncated: bool) -> String {
    let body = html! {
        p.windows {
            "Window: "
            @for w in Window::ALL {
                a href=(format!("/graph?window={}", w.as_str()))
                    class=(if w == window { "current" } else { "" }) { (w.as_str()) }
                " "
            }
        }
        @if truncated {
            p.warning { "Too many records in this window: counts are of the oldest "
                (graph::GRAPH_LIMIT) " of each kind." }
        }
        @if mesh.nodes.is_empty() {
            p.empty { "No decisions recorded in the last " (window.as_str()) "." }
        } @else {
            (graph::svg(mesh, window))
            table #edges {
                thead { tr { th { "caller" } th { "callee" } th { "allowed" } th { "denied" } th { "rate" } } }
                tbody {
                    @for e in &mesh.edges {
                        tr class=(if e.denied > 0 { "denied" } else { "allowed" }) {
                            td { (e.caller) } td { (e.callee) }
                            td.num { (e.allowed) } td.num { (e.denied) }
                            td { (graph::rate(e.allowed + e.denied, window)) }
                        }
                    }
                }
            }
        }
    };
    layout(&format!("Mesh: last {}", window.as_str()), "/graph", body)
}

fn ts_text(unix: i64) -> String {
    format_ms(unix.saturating_mul(1000))
}

/// The identities page.
pub fn identities(rows: &[IdentityRow]) -> String {
    let body = html! {
        @if rows.is_empty() { p.empty { "No identity has been issued an SVID yet." } }
        @else {
            table #identities {
                thead { tr { th { "SPIFFE ID" } th { "endpoints" } th { "newest SVID expires" }
                    th { "policy version" } th { "last contact" } } }
                tbody {
                    @for r in rows {
                        tr data-id=(r.id) {
                            td { (r.id) }
                            td { @if r.endpoints.is_empty() { "none registered" }
                                 @else { @for e in &r.endpoints { code { (e) } " " } } }
                            td { @match r.svid_expiry {
                                Some(t) => span data-expires=(t) { (ts_text(t)) },
                                None => "unknown",
                            } }
                            td { @match &r.policy_version { Some(v) => code { (v) }, None => "unknown" } }
                            td { @if r.last_contact_ms > 0 { (format_ms(r.last_contact_ms)) } @else { "unknown" } }
                        }
                    }
                }
            }
        }
    };
    layout("Identities", "/identities", body)
}

/// The live decisions page: the stream's rows are added by the embedded script.
pub fn live(identity: Option<&str>, decision: Option<&str>) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    if let Some(i) = identity {
        q.append_pair("identity", i);
    }
    if let Some(d) = decision.filter(|d| *d == "allow" || *d == "deny") {
        q.append_pair("decision", d);
    }
    let src = format!("/live/events?{}", q.finish());
    let body = html! {
        form.filters method="get" action="/live" {
            label { "identity " input name="identity" value=(identity.unwrap_or("")) size="40"; }
            label { " decision "
                select name="decision" {
                    option value="" { "any" }
                    option value="allow" selected[decision == Some("allow")] { "allow" }
                    option value="deny" selected[decision == Some("deny")] { "deny" }
                }
            }
            " " button type="submit" { "filter" }
        }
        p #live-status data-src=(src) { "connecting…" }
        table #live {
            thead { tr { th { "time" } th { "caller" } th { "callee" } th { "decision" }
                th { "rule" } th { "request" } th { "decision ID" } } }
            tbody {}
        }
    };
    layout("Live decisions", "/live", body)
}

fn grant_state(g: &GrantRecord) -> &'static str {
    g.state.as_str()
}

/// The grants page, with a live countdown on each grant's expiry.
pub fn grants(list: &[GrantRecord], now: i64) -> String {
    let body = html! {
        @if list.is_empty() { p.empty { "No grants." } }
        @else {
            table #grants {
                thead { tr { th { "id" } th { "state" } th { "grantee" } th { "target" }
                    th { "requested by" } th { "decided by" } th { "reason" } th { "expires" }
                    th { "remaining" } } }
                tbody {
                    @for g in list {
                        tr class=(grant_state(g)) data-id=(g.id) {
                            td { code { (g.id) } }
                            td { (grant_state(g)) }
                            td { (g.from) }
                            td { (g.to)
                                @if !g.methods.is_empty() || !g.paths.is_empty() {
                                    br; small { (g.methods.join(",")) " " (g.paths.join(" ")) }
                                } }
                            td { (g.requested_by)
                                @if let Some(a) = &g.access {
                                    @if !a.groups.is_empty() { br; small.groups { "as " (a.groups.join(", ")) } }
                                } }
                            td {
                                @match &g.access {
                                    // A person's request: every approver so far, of how many.
                                    Some(a) if !a.approved_by.is_empty() => {
                                        (a.approved_by.join(", "))
                                        @if usize::from(a.approvals_needed) > 1 {
                                            " (" (a.approved_by.len()) "/" (a.approvals_needed) ")"
                                        }
                                        @if g.state != GrantState::Active && g.state != GrantState::Pending {
                                            @if let Some(d) = &g.decided_by { br; small { (grant_state(g)) " by " (d) } }
                                        }
                                    }
                                    _ => (g.decided_by.as_deref().unwrap_or("-")),
                                }
                            }
                            td.reason { (g.reason) }
                            td { @match g.expires { Some(e) => (ts_text(e)), None => "-" } }
                            td {
                                @match (g.expires, g.state) {
                                    (Some(e), GrantState::Active) => span.countdown data-expires=(e) {
                                        (remaining(e - now))
                                    },
                                    _ => "-",
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    layout("Grants", "/grants", body)
}

/// `1h02m03s` left, or `expired`.
pub fn remaining(secs: i64) -> String {
    if secs <= 0 {
        return "expired".into();
    }
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The audit search page.
pub fn audit(p: &AuditPage) -> String {
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    let body = html! {
        form.filters method="get" action="/audit" {
            label { "identity " input name="identity" value=(v(&p.identity)) size="36"; }
            label { " decision "
                select name="decision" {
                    option value="" { "any" }
                    option value="allow" selected[p.decision.as_deref() == Some("allow")] { "allow" }
                    option value="deny" selected[p.decision.as_deref() == Some("deny")] { "deny" }
                }
            }
            label { " kind " input name="kind" value=(v(&p.kind)) size="16" placeholder="http.request"; }
            label { " since " input name="since" value=(v(&p.since)) size="16" placeholder="1h or 2026-11-30T10:00"; }
            label { " until " input name="until" value=(v(&p.until)) size="16"; }
            " " button type="submit" { "search" }
        }
        @if let Some(e) = &p.error { p.error { (e) } }
        @if !p.chains.is_empty() {
            h2 { "Chains" }
            table #chains {
                thead { tr { th { "chain" } th { "verification" } } }
                tbody { @for c in &p.chains {
                    tr class=(if c.ok { "ok" } else { "broken" }) { td { code { (c.chain) } } td { (c.text) } }
                } }
            }
        }
        h2 { (p.records.len()) " records (newest first)" }
        table #records {
            thead { tr { th { "time" } th { "chain / seq" } th { "kind" } th { "record" } } }
            tbody { @for line in &p.records { (record_row(line)) } }
        }
    };
    layout("Audit search", "/audit", body)
}

fn record_row(line: &[u8]) -> Markup {
    match Decision::parse(line) {
        Some(d) => html! {
            tr class=(if d.denied() { "denied" } else { "allowed" }) {
                td { (format_ms(d.ts_ms)) }
                td { code { (d.chain) } " #" (d.seq) }
                td { (d.kind) }
                td { (d.caller) " → " (d.callee) " " strong { (d.decision) } " (" (d.rule) ") "
                     (d.request) " " code { (d.decision_id) } }
            }
        },
        None => {
            let (chain, seq, kind, ts) = super::records::head(line).unwrap_or_default();
            html! {
                tr {
                    td { (format_ms(ts)) }
                    td { code { (chain) } " #" (seq) }
                    td { (kind) }
                    td { code { (crate::server::audit::render(line)) } }
                }
            }
        }
    }
}
