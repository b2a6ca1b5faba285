//! The engine's answer.

use std::fmt;
use std::sync::Arc;

/// What decided a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecidedBy {
    /// The named rule (the first matching deny, else the first matching allow, in file order).
    Rule(Arc<str>),
    /// The JIT grant with this id.
    Grant(String),
    /// No rule or grant allowed it: default deny.
    Default,
    /// The HTTP path was not in normal form (the caller must normalise): denied.
    UnnormalizedPath,
}

impl fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecidedBy::Rule(n) => write!(f, "rule `{n}`"),
            DecidedBy::Grant(id) => write!(f, "grant `{id}`"),
            DecidedBy::Default => f.write_str("default deny"),
            DecidedBy::UnnormalizedPath => f.write_str("unnormalised path"),
        }
    }
}

/// What a dry-run rule would change if it were enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    /// What the decision would be with dry-run rules enforced.
    pub allow: bool,
    /// The dry-run rule that would decide.
    pub rule: Arc<str>,
}

/// A decision on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The verdict of the enforced rules and grants (dry-run rules never change it).
    pub allow: bool,
    /// False when the whole policy is dry-run: the caller lets the traffic pass and records
    /// `allow` as what would have happened. Use [`Decision::permits`].
    pub enforced: bool,
    /// What decided `allow`.
    pub decided_by: DecidedBy,
    /// Set when a matching dry-run rule would decide differently if it were enforced
    /// ("would deny" / "would allow"); record it.
    pub dry_run: Option<DryRun>,
    /// [`crate::Policy::version`] of the policy that decided.
    pub policy_version: Arc<str>,
    /// Unique, log-friendly id: `d-<8 hex of the engine seed>-<counter in hex>`.
    pub decision_id: String,
}

impl Decision {
    /// Whether the caller lets the traffic through: `allow || !enforced`.
    pub fn permits(&self) -> bool {
        self.allow || !self.enforced
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allow { "allow" } else { "deny" };
        let how = if self.enforced {
            "enforced"
        } else {
            "not enforced: policy is dry-run"
        };
        write!(f, "{verdict} ({how}) by {}", self.decided_by)?;
        if let Some(dr) = &self.dry_run {
            let would = if dr.allow { "allow" } else { "deny" };
            write!(f, "; dry-run rule `{}` would {would}", dr.rule)?;
        }
        write!(f, " [{} policy {}]", self.decision_id, self.policy_version)
    }
}
