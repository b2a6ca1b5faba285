//! The loaded, validated policy.

use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;
use time::OffsetDateTime;

use crate::diag::{Diagnostic, Pos, Severity};
use crate::pattern::PathPattern;
use crate::spiffe_id::IdPattern;
use crate::timewin::TimeWindow;

/// Whether decisions are enforced or only recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Decisions are enforced.
    Enforce,
    /// Decisions are computed and recorded but not enforced (see POLICY.md, "Dry run").
    DryRun,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::DryRun => "dry-run",
        })
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Admit the request (unless a deny rule also matches).
    Allow,
    /// Refuse the request, whatever allows it.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// The protocol a declared service speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Raw TCP: rules naming it exactly may not use HTTP conditions.
    Tcp,
    /// HTTP: requests are checked one by one.
    Http,
}

/// A `[[service]]` declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The service's exact SPIFFE ID.
    pub id: String,
    /// What it speaks.
    pub protocol: Protocol,
}

/// The `[grants]` section: limits on JIT grants, applied by the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantSettings {
    /// Longest lifetime a grant may have (default 1 hour, at most 24 hours).
    pub max_ttl: time::Duration,
    /// Approvals a grant needs before it is issued: 0 or 1 (default 1).
    pub approvals: u8,
}

impl Default for GrantSettings {
    fn default() -> Self {
        GrantSettings {
            max_ttl: time::Duration::hours(1),
            approvals: 1,
        }
    }
}

/// One `[[rule]]`, validated.
#[derive(Debug, Clone)]
pub struct Rule {
    pub(crate) name: Arc<str>,
    pub(crate) action: Action,
    pub(crate) mode: Mode,
    pub(crate) from: Vec<IdPattern>,
    pub(crate) to: Vec<IdPattern>,
    pub(crate) ports: Option<Vec<u16>>,
    pub(crate) methods: Option<Vec<String>>,
    pub(crate) paths: Option<Vec<PathPattern>>,
    /// Lower-case name, exact value.
    pub(crate) headers: Option<Vec<(String, String)>>,
    pub(crate) source_cidrs: Option<Vec<IpNet>>,
    pub(crate) time: Option<TimeWindow>,
    pub(crate) not_before: Option<OffsetDateTime>,
    pub(crate) expires: Option<OffsetDateTime>,
    pub(crate) pos: Pos,
}

impl Rule {
    /// The rule's unique name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Allow or deny.
    pub fn action(&self) -> Action {
        self.action
    }
    /// The rule's own mode (the policy's mode applies on top).
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Sources.
    pub fn from(&self) -> &[IdPattern] {
        &self.from
    }
    /// Destinations.
    pub fn to(&self) -> &[IdPattern] {
        &self.to
    }
    /// Where the rule starts in the policy file.
    pub fn pos(&self) -> Pos {
        self.pos
    }
    /// True if the rule has a `headers` condition (headers are not in the audit trail, so a
    /// replay of recorded requests cannot evaluate it).
    pub fn has_headers(&self) -> bool {
        self.headers.is_some()
    }
    /// The rule's ports condition, if any.
    pub fn ports(&self) -> Option<&[u16]> {
        self.ports.as_deref()
    }
    /// The first of the rule's path patterns that matches `path` (`None` without a `paths`
    /// condition or when none matches).
    pub fn path_pattern_for(&self, path: &str) -> Option<&crate::PathPattern> {
        self.paths.as_ref()?.iter().find(|p| p.matches(path))
    }
    /// True if the rule has a `methods`, `paths` or `headers` condition.
    pub fn has_http(&self) -> bool {
        self.methods.is_some() || self.paths.is_some() || self.headers.is_some()
    }
}

/// A validated policy. Build with [`Policy::from_toml`], then [`Policy::compile`].
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) mode: Mode,
    pub(crate) grants: GrantSettings,
    pub(crate) services: Vec<Service>,
    pub(crate) rules: Vec<Rule>,
    pub(crate) access: Vec<crate::access::AccessRule>,
    pub(crate) version: Arc<str>,
    pub(crate) file: String,
}

/// A policy that loaded, with its warnings.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The policy.
    pub policy: Policy,
    /// Things worth a look that do not stop the policy from loading.
    pub warnings: Vec<Diagnostic>,
}

impl Policy {
    /// A stable content hash of the source: the first 16 hex digits of its SHA-256.
    pub fn version(&self) -> &str {
        &self.version
    }
    /// The policy-wide mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// The `[grants]` settings (defaults when the section is absent).
    pub fn grants(&self) -> &GrantSettings {
        &self.grants
    }
    /// The declared services, in file order.
    pub fn services(&self) -> &[Service] {
        &self.services
    }
    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The `[[access.rule]]`s, in file order: what people may ask for (none: nothing).
    pub fn access(&self) -> &[crate::access::AccessRule] {
        &self.access
    }

    /// Warnings that depend on the time, which loading cannot know: rules that have expired
    /// by `now`.
    pub fn warnings_at(&self, now: OffsetDateTime) -> Vec<Diagnostic> {
        self.rules
            .iter()
            .filter(|r| r.expires.is_some_and(|e| e <= now))
            .map(|r| Diagnostic {
                file: self.file.clone(),
                line: r.pos.line,
                col: r.pos.col,
                severity: Severity::Warning,
                message: format!("rule `{}` has expired and never matches", r.name),
            })
            .collect()
    }
}
