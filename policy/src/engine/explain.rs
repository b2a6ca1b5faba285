//! `explain`: a readable trace of every rule and grant that names the destination.

use std::fmt;

use super::Engine;
use super::matching::{Scope, check_grant, check_rule_full};
use crate::decision::Decision;
use crate::grant::Grant;
use crate::model::Mode;
use crate::request::Request;

/// One rule or grant considered by `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// `rule \`name\` (allow, line 12)` or `grant \`id\``.
    pub subject: String,
    /// `None` if it matched, else the first condition that failed.
    pub failed: Option<String>,
}

/// The trace of a decision. `Display` prints one line per step, then the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The request, summarised.
    pub request: String,
    /// Every rule whose `to` matches the destination (file order), then every grant for it.
    pub steps: Vec<Step>,
    /// The decision, exactly as `decide` returns it.
    pub decision: Decision,
}

fn summary(req: &Request<'_>) -> String {
    let mut s = format!("{} -> {}", req.source, req.destination);
    if let Some(p) = req.port {
        s.push_str(&format!(" port {p}"));
    }
    if let Some(ip) = req.source_ip {
        s.push_str(&format!(" from {ip}"));
    }
    match &req.http {
        Some(h) => s.push_str(&format!(" {} {}", h.method, h.path)),
        None => s.push_str(" (connection)"),
    }
    // RFC 3339, the form policy files and `--at` use (not `time`'s own display).
    match req
        .now
        .format(&time::format_description::well_known::Rfc3339)
    {
        Ok(t) => s.push_str(&format!(" at {t}")),
        Err(_) => s.push_str(&format!(" at {}", req.now)),
    }
    s
}

impl Engine {
    /// Explains the decision on `req`: every rule that names its destination with the first
    /// condition that failed (or "matched"), every grant for it, and the decision.
    pub fn explain(&self, req: &Request<'_>, grants: &[Grant]) -> Explanation {
        let mut steps = Vec::new();
        for r in &self.rules {
            if !r.to.iter().any(|t| t.matches(req.destination)) {
                continue;
            }
            let mut subject = format!("rule `{}` ({}", r.name, r.action);
            if r.mode == Mode::DryRun {
                subject.push_str(", dry-run");
            }
            subject.push_str(&format!(", line {})", r.pos.line));
            let failed = check_rule_full(r, req, Scope::Request)
                .err()
                .map(|m| m.to_string());
            steps.push(Step { subject, failed });
        }
        for g in grants.iter().filter(|g| g.to == req.destination) {
            let failed = check_grant(g, req, Scope::Request)
                .err()
                .map(|m| m.to_string());
            steps.push(Step {
                subject: format!("grant `{}`", g.id),
                failed,
            });
        }
        Explanation {
            request: summary(req),
            steps,
            decision: self.decide(req, grants),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "request: {}", self.request)?;
        if self.steps.is_empty() {
            writeln!(f, "  no rule or grant names this destination")?;
        }
        for s in &self.steps {
            match &s.failed {
                None => writeln!(f, "  {}: matched", s.subject)?,
                Some(why) => writeln!(f, "  {}: {why}", s.subject)?,
            }
        }
        write!(f, "decision: {}", self.decision)
    }
}

impl Engine {
    /// Every rule that matches `req` on its own (file order, dry-run rules too), whether or not
    /// it decides: what a replay of recorded traffic needs to tell which rules are used.
    pub fn matching_rules(&self, req: &Request<'_>) -> Vec<&crate::model::Rule> {
        self.rules
            .iter()
            .filter(|r| check_rule_full(r, req, Scope::Request).is_ok())
            .collect()
    }
}
