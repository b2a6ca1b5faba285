//! Policy what-if: the recorded decisions of a window replayed against a candidate policy.
//!
//! Every decision the sidecars recorded (`http.request`; for TCP `connection.open` and
//! `connection.denied`) is put to the candidate again with what the record says: caller,
//! callee, port, source IP, method and path, at the time it was made. Decisions a JIT grant
//! allowed are kept as they were (the grant was in force then; the record does not say whether
//! the candidate would have needed it) and counted apart. Request headers are not recorded, so
//! a candidate rule with a `headers` condition is evaluated as if the request had none, and
//! the report names such rules. `replay` is pure (no clock, no output): the CLI and the console
//! format its [`ReplayReport`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use mayfly_policy::{DecidedBy, Engine, HttpRequest, Policy, Request};
use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::server::store::{AuditFilter, Store, StoreError};

/// The record kinds that carry a decision.
pub const DECISION_KINDS: [&str; 3] = ["http.request", "connection.open", "connection.denied"];

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The audit store could not be read.
    #[error("cannot read the audit store")]
    Store(#[from] StoreError),
}

/// Which way a flow's decision would turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Allowed then, denied by the candidate.
    AllowToDeny,
    /// Denied then, allowed by the candidate.
    DenyToAllow,
}

impl Change {
    /// `allow -> deny` or `deny -> allow`.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::AllowToDeny => "allow -> deny",
            Change::DenyToAllow => "deny -> allow",
        }
    }
}

/// A flow: who called whom, and what (method and path pattern for HTTP, port for TCP).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Flow {
    /// Which sidecar decided: `inbound` (the callee's) or `outbound` (the caller's, egress).
    pub direction: String,
    /// The caller's SPIFFE ID.
    pub caller: String,
    /// The callee's SPIFFE ID.
    pub callee: String,
    /// The HTTP method, absent for TCP.
    pub method: Option<String>,
    /// HTTP: the path pattern of the rule that decides (the candidate's, else the published
    /// policy's rule named in the record), else the path as recorded. TCP: `port N` (or `*`).
    pub target: String,
}

/// One flow whose decisions change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowChange {
    /// The flow.
    #[serde(flatten)]
    pub flow: Flow,
    /// Which way.
    pub change: Change,
    /// How many recorded decisions change.
    pub count: u64,
    /// The ID of one of them (the first in the window).
    pub example_decision_id: String,
}

/// A rule of the policy in force that the candidate no longer has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemovedRule {
    /// Its name.
    pub name: String,
    /// `allow` or `deny`.
    pub action: String,
    /// Replayed requests it matched in the window.
    pub matched: u64,
}

/// What the candidate would change in the window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// The candidate's version.
    pub candidate_version: String,
    /// Start of the window (Unix ms).
    pub since_ms: i64,
    /// Decisions replayed (grant-allowed ones included).
    pub decisions: u64,
    /// Decisions the candidate makes the same way.
    pub unchanged: u64,
    /// Decisions a JIT grant allowed: kept as they were (included in `unchanged`).
    pub allowed_by_grant: u64,
    /// Records of a decision kind that could not be read (no caller, callee or decision).
    pub unreadable: u64,
    /// The flows that change, `allow -> deny` first, then by flow.
    pub changes: Vec<FlowChange>,
    /// The candidate's allow rules no replayed request matched (standing privilege nobody
    /// used in the window).
    pub unused_allow_rules: Vec<String>,
    /// The rules of the policy in force (the newest published in the store) that the candidate
    /// drops, each with the number of replayed requests it matched (0: nobody used it).
    pub removed_rules: Vec<RemovedRule>,
    /// The candidate's rules with a `headers` condition: headers are not recorded, so they were
    /// evaluated as if no header was sent.
    pub header_rules: Vec<String>,
}

impl ReplayReport {
    /// True if some recorded decision would change (a CI gate fails on it).
    pub fn changes_anything(&self) -> bool {
        !self.changes.is_empty()
    }
}

/// Replays the decisions recorded since `since` against `candidate`.
pub fn replay(
    store: &dyn Store,
    candidate: &Policy,
    since: OffsetDateTime,
) -> Result<ReplayReport, ReplayError> {
    let since_ms = (since.unix_timestamp_nanos() / 1_000_000) as i64;
    let mut lines = Vec::new();
    for kind in DECISION_KINDS {
        lines.extend(store.audit_query(&AuditFilter {
            since_ms: Some(since_ms),
            kind: Some(kind.to_owned()),
            limit: u32::MAX,
            ..AuditFilter::default()
        })?);
    }
    // The published policy (when the control plane publishes one) names the path patterns of
    // the rules recorded decisions cite.
    let published = store
        .policy()?
        .and_then(|p| Policy::from_toml(&p.source, "published").ok())
        .map(|l| l.policy);
    let mut records: Vec<Value> = Vec::with_capacity(lines.len());
    let mut unreadable = 0;
    for l in &lines {
        match serde_json::from_slice::<Value>(l) {
            Ok(v) => records.push(v),
            Err(_) => unreadable += 1,
        }
    }
    records.sort_by_key(|r| r.get("ts_ms").and_then(Value::as_i64).unwrap_or(0));
    let mut report = replay_records(&records, candidate, published.as_ref());
    report.since_ms = since_ms;
    report.unreadable += unreadable;
    Ok(report)
}

/// What a record says about its decision.
struct Recorded<'a> {
    direction: &'a str,
    caller: &'a str,
    callee: &'a str,
    allow: bool,
    grant: bool,
    rule: Option<&'a str>,
    policy_version: Option<&'a str>,
    decision_id: &'a str,
    port: Option<u16>,
    source_ip: Option<IpAddr>,
    /// Method and path; `None` for TCP.
    http: Option<(&'a str, &'a str)>,
    at: OffsetDateTime,
}

fn read(r: &Map<String, Value>) -> Option<Recorded<'_>> {
    let s = |k: &str| r.get(k).and_then(Value::as_str);
    let kind = s("kind")?;
    let direction = s("direction")?;
    let (local, peer) = (s("local_id")?, s("peer_id")?);
    let (caller, callee) = match direction {
        "inbound" => (peer, local),
        "outbound" => (local, peer),
        _ => return None,
    };
    let allow = match s("decision")? {
        "allow" => true,
        "deny" => false,
        _ => return None,
    };
    let http = match (s("protocol"), kind) {
        (Some("http"), "http.request") => Some((s("method")?, s("path")?)),
        (Some("http"), _) => return None,
        _ => None,
    };
    // The inbound side decides with the caller's address; egress decisions have none.
    let source_ip = match direction {
        "inbound" => s("peer_addr").and_then(|a| a.parse::<SocketAddr>().ok().map(|a| a.ip())),
        _ => None,
    };
    let at = r.get("ts_ms").and_then(Value::as_i64).and_then(|ms| {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
    })?;
    Some(Recorded {
        direction,
        caller,
        callee,
        allow,
        grant: r.contains_key("grant"),
        rule: s("rule"),
        policy_version: s("policy_version"),
        decision_id: s("decision_id").unwrap_or(""),
        port: r
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok()),
        source_ip,
        http,
        at,
    })
}

/// The path pattern of the rule `name` of `policy` that matches `path`.
fn pattern_of(policy: Option<&Policy>, name: &str, path: &str) -> Option<String> {
    policy?
        .rules()
        .iter()
        .find(|r| r.name() == name)?
        .path_pattern_for(path)
        .map(|p| p.as_str().to_owned())
}

struct Tally {
    count: u64,
    example: String,
}

/// The replay itself, over parsed records (oldest first): pure, for the unit tests.
pub(crate) fn replay_records(
    records: &[Value],
    candidate: &Policy,
    published: Option<&Policy>,
) -> ReplayReport {
    let engine = Engine::new(candidate);
    let mut report = ReplayReport {
        candidate_version: candidate.version().to_owned(),
        header_rules: candidate
            .rules()
            .iter()
            .filter(|r| r.has_headers())
            .map(|r| r.name().to_owned())
            .collect(),
        ..ReplayReport::default()
    };
    let mut used: BTreeSet<String> = BTreeSet::new();
    let baseline = published.map(Engine::new);
    let mut baseline_used: BTreeMap<String, u64> = BTreeMap::new();
    let mut changes: BTreeMap<(Change, Flow), Tally> = BTreeMap::new();
    for v in records {
        // A denied HTTP connection: each request on it has its own `http.request` record
        // (answered 403 with the connection's decision ID), replayed one by one instead.
        if v["protocol"] == "http" && v["kind"] != "http.request" {
            continue;
        }
        let Some(rec) = v.as_object().and_then(read) else {
            report.unreadable += 1;
            continue;
        };
        report.decisions += 1;
        if rec.grant {
            report.allowed_by_grant += 1;
            report.unchanged += 1;
            continue;
        }
        let req = Request {
            source: rec.caller,
            destination: rec.callee,
            port: rec.port,
            source_ip: rec.source_ip,
            http: rec.http.map(|(method, path)| HttpRequest {
                method,
                path,
                headers: &[],
            }),
            now: rec.at,
        };
        for r in engine.matching_rules(&req) {
            used.insert(r.name().to_owned());
        }
        for r in baseline.iter().flat_map(|b| b.matching_rules(&req)) {
            *baseline_used.entry(r.name().to_owned()).or_default() += 1;
        }
        let d = engine.decide(&req, &[]);
        if d.allow == rec.allow {
            report.unchanged += 1;
            continue;
        }
        let change = if rec.allow {
            Change::AllowToDeny
        } else {
            Change::DenyToAllow
        };
        let (method, target) = match rec.http {
            None => (
                None,
                rec.port
                    .map_or_else(|| "*".to_owned(), |p| format!("port {p}")),
            ),
            Some((method, path)) => {
                let new_rule = match &d.decided_by {
                    DecidedBy::Rule(n) => Some(n.as_ref()),
                    _ => None,
                };
                let old = published.filter(|p| Some(p.version()) == rec.policy_version);
                let target = new_rule
                    .and_then(|n| pattern_of(Some(candidate), n, path))
                    .or_else(|| rec.rule.and_then(|n| pattern_of(old, n, path)))
                    .unwrap_or_else(|| path.to_owned());
                (Some(method.to_owned()), target)
            }
        };
        let flow = Flow {
            direction: rec.direction.to_owned(),
            caller: rec.caller.to_owned(),
            callee: rec.callee.to_owned(),
            method,
            target,
        };
        changes
            .entry((change, flow))
            .or_insert_with(|| Tally {
                count: 0,
                example: rec.decision_id.to_owned(),
            })
            .count += 1;
    }
    report.changes = changes
        .into_iter()
        .map(|((change, flow), t)| FlowChange {
            flow,
            change,
            count: t.count,
            example_decision_id: t.example,
        })
        .collect();
    report.unused_allow_rules = candidate
        .rules()
        .iter()
        .filter(|r| r.action() == mayfly_policy::Action::Allow && !used.contains(r.name()))
        .map(|r| r.name().to_owned())
        .collect();
    let kept: BTreeSet<&str> = candidate.rules().iter().map(|r| r.name()).collect();
    report.removed_rules = published
        .map(Policy::rules)
        .unwrap_or_default()
        .iter()
        .filter(|r| !kept.contains(r.name()))
        .map(|r| RemovedRule {
            name: r.name().to_owned(),
            action: r.action().to_string(),
            matched: baseline_used.get(r.name()).copied().unwrap_or(0),
        })
        .collect();
    report
}

#[cfg(test)]
#[path = "replay_tests.rs"]
mod tests;
