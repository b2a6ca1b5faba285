//! Decision records as the console shows them, read from stored audit lines.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::identity::audit::Record;

/// The record kinds that carry a sidecar's decision on a call.
pub const DECISION_KINDS: [&str; 3] = ["http.request", "connection.open", "connection.denied"];

/// One decision: who called whom and what the sidecar that recorded it decided.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Decision {
    /// Unix ms.
    pub ts_ms: i64,
    /// Record kind.
    pub kind: String,
    /// The sidecar that recorded it.
    pub source: String,
    /// `inbound` (recorded by the callee's sidecar) or `outbound` (the caller's).
    pub direction: String,
    /// The calling SPIFFE ID (`unknown` when the caller showed none).
    pub caller: String,
    /// The called SPIFFE ID.
    pub callee: String,
    /// `allow`, `deny` or `dry_run_deny`.
    pub decision: String,
    /// The deciding rule, or `grant ID`.
    pub rule: String,
    /// The decision ID.
    pub decision_id: String,
    /// The policy version that decided, when recorded.
    pub policy_version: String,
    /// `METHOD PATH` of an HTTP request, empty for a connection.
    pub request: String,
    /// The chain (`source#epoch`) and seq of the record.
    pub chain: String,
    /// Seq in its chain.
    pub seq: u64,
}

fn text(m: &Map<String, Value>, k: &str) -> String {
    match m.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

impl Decision {
    /// The decision in a stored line, if it is a decision record.
    pub fn parse(line: &[u8]) -> Option<Decision> {
        let r: Record = serde_json::from_slice(line).ok()?;
        if !DECISION_KINDS.contains(&r.kind.as_str()) {
            return None;
        }
        let f = &r.fields;
        let decision = text(f, "decision");
        if decision.is_empty() {
            return None;
        }
        let direction = text(f, "direction");
        let local = Some(text(f, "local_id"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| r.source.clone());
        let peer = Some(text(f, "peer_id"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".to_owned());
        let (caller, callee) = if direction == "inbound" {
            (peer, local)
        } else {
            (local, peer)
        };
        let grant = text(f, "grant");
        let rule = if grant.is_empty() {
            text(f, "rule")
        } else {
            format!("grant {grant}")
        };
        let method = text(f, "method");
        let request = if method.is_empty() {
            String::new()
        } else {
            format!("{method} {}", text(f, "path"))
        };
        Some(Decision {
            ts_ms: r.ts_ms,
            kind: r.kind.clone(),
            chain: format!("{}#{}", r.source, r.epoch),
            seq: r.seq,
            source: r.source,
            direction,
            caller,
            callee,
            decision,
            rule,
            decision_id: text(f, "decision_id"),
            policy_version: text(f, "policy_version"),
            request,
        })
    }

    /// Whether the decision denied the call.
    pub fn denied(&self) -> bool {
        self.decision != "allow"
    }

    /// Whether it matches the live view's and the search's filters: `identity` (either side),
    /// `decision` (`allow` or `deny`; `deny` includes dry-run denials).
    pub fn matches(&self, identity: Option<&str>, decision: Option<&str>) -> bool {
        let id_ok = identity.is_none_or(|i| self.caller == i || self.callee == i);
        let d_ok = match decision {
            None => true,
            Some("allow") => !self.denied(),
            Some(_) => self.denied(),
        };
        id_ok && d_ok
    }
}

/// What the live follower needs of every stored line, parsed once and borrowed: its chain,
/// time, and, for a decision record, the policy version that decided. The event's other fields
/// are checked for JSON syntax and skipped, not built (a line that parses as a [`Record`]
/// parses as a glance, and the reverse).
#[derive(serde::Deserialize)]
pub struct Glance<'a> {
    #[allow(dead_code)] // required (a record without it does not parse), not used
    v: u8,
    #[serde(borrow)]
    source: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    epoch: std::borrow::Cow<'a, str>,
    #[allow(dead_code)] // required, as above
    seq: u64,
    #[allow(dead_code)] // required, as above
    #[serde(borrow)]
    prev: std::borrow::Cow<'a, str>,
    /// Unix ms.
    pub ts_ms: i64,
    #[serde(borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    decision: Option<Value>,
    #[serde(default)]
    policy_version: Option<Value>,
}

/// [`text`] of an optional field.
fn text_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

impl<'a> Glance<'a> {
    /// The glance of a stored line, if it is a record.
    pub fn parse(line: &'a [u8]) -> Option<Glance<'a>> {
        serde_json::from_slice(line).ok()
    }

    /// The chain `source#epoch`.
    pub fn chain(&self) -> String {
        format!("{}#{}", self.source, self.epoch)
    }

    /// The writer's SPIFFE ID.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether [`Decision::parse`] finds a decision in this line.
    pub fn is_decision(&self) -> bool {
        DECISION_KINDS.contains(&self.kind.as_ref()) && !text_of(self.decision.as_ref()).is_empty()
    }

    /// The decision's `policy_version` as [`Decision::parse`] reads it.
    pub fn policy_version(&self) -> String {
        text_of(self.policy_version.as_ref())
    }
}

/// The head of any stored record: its chain, seq and kind (for lines that are no decision).
pub fn head(line: &[u8]) -> Option<(String, u64, String, i64)> {
    let r: Record = serde_json::from_slice(line).ok()?;
    Some((format!("{}#{}", r.source, r.epoch), r.seq, r.kind, r.ts_ms))
}

/// A time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_ms(ts_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| ts_ms.to_string())
}

/// A time bound of the search: a duration ago (`15m`, `2h`) or a UTC time
/// (`2026-11-30T10:00`, seconds optional).
pub fn time_bound(s: &str) -> Result<i64, String> {
    if let Ok(d) = crate::identity::duration::parse_duration(s) {
        let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        return Ok(now_ms - d.as_millis() as i64);
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]");
    let fmt_s = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    time::PrimitiveDateTime::parse(s, &fmt_s)
        .or_else(|_| time::PrimitiveDateTime::parse(s, &fmt))
        .map(|t| (t.assume_utc().unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| {
            format!("{s:?} is neither a duration ago (15m, 2h) nor a UTC time (2026-11-30T10:00)")
        })
}
