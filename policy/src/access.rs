//! `[access]`: which people (by identity-provider group) may ask for what, for how long, and who
//! must approve. No rule, no access: the policy gives people nothing by default.

use crate::diag::Pos;
use crate::pattern::PathPattern;
use crate::spiffe_id::IdPattern;

/// What an access rule lets people ask for.
#[derive(Debug, Clone)]
pub enum AccessTarget {
    /// Services: exact SPIFFE IDs or `/...` patterns, as in allow rules.
    To(Vec<IdPattern>),
    /// The control plane's admin operations.
    Admin,
}

/// One `[[access.rule]]`, validated.
#[derive(Debug, Clone)]
pub struct AccessRule {
    pub(crate) groups: Vec<String>,
    pub(crate) target: AccessTarget,
    pub(crate) methods: Option<Vec<String>>,
    pub(crate) paths: Option<Vec<PathPattern>>,
    pub(crate) max_ttl: time::Duration,
    pub(crate) approvals: u8,
    pub(crate) approvers: Vec<String>,
    pub(crate) pos: Pos,
}

/// What a person asks for, checked against the rules by [`AccessRule::admits`].
#[derive(Debug, Clone, Copy)]
pub struct AccessAsk<'a> {
    /// The groups of the person's sign-in.
    pub groups: &'a [String],
    /// An exact SPIFFE ID, or `None` for the admin role.
    pub to: Option<&'a str>,
    /// Methods asked for (empty: the rule's own, see [`AccessRule::methods`]).
    pub methods: &'a [String],
    /// Paths asked for (empty: the rule's own, see [`AccessRule::paths`]).
    pub paths: &'a [String],
    /// The lifetime asked for.
    pub ttl: time::Duration,
}

/// Why no access rule admits a request: the closest reason, for the person asking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccessRefusal {
    /// No rule names any of the person's groups for this target.
    #[error("no [[access.rule]] lets groups [{groups}] ask for {target}")]
    NoRule {
        /// The person's groups, comma-separated.
        groups: String,
        /// What was asked for.
        target: String,
    },
    /// A rule would, but not for so long.
    #[error("the TTL asked for is over the rule's max_ttl of {max}")]
    TooLong {
        /// The rule's limit.
        max: String,
    },
    /// A rule would, but not these methods or paths.
    #[error("the rule for {target} allows only methods [{methods}] and paths [{paths}]")]
    Scope {
        /// What was asked for.
        target: String,
        /// The rule's methods.
        methods: String,
        /// The rule's paths.
        paths: String,
    },
}

impl AccessRule {
    /// IdP groups allowed to ask (any of).
    pub fn groups(&self) -> &[String] {
        &self.groups
    }
    /// What may be asked for.
    pub fn target(&self) -> &AccessTarget {
        &self.target
    }
    /// The longest lifetime a request may have.
    pub fn max_ttl(&self) -> time::Duration {
        self.max_ttl
    }
    /// Distinct approvers needed (at least 1).
    pub fn approvals(&self) -> u8 {
        self.approvals
    }
    /// Groups whose members may approve.
    pub fn approvers(&self) -> &[String] {
        &self.approvers
    }
    /// Methods the grant may carry (`None`: any).
    pub fn methods(&self) -> Option<&[String]> {
        self.methods.as_deref()
    }
    /// Path patterns the grant may carry (`None`: any).
    pub fn paths(&self) -> Option<Vec<&str>> {
        self.paths
            .as_ref()
            .map(|p| p.iter().map(PathPattern::as_str).collect())
    }
    /// Where the rule starts in the policy file.
    pub fn pos(&self) -> Pos {
        self.pos
    }

    fn covers(&self, to: Option<&str>) -> bool {
        match (&self.target, to) {
            (AccessTarget::Admin, None) => true,
            (AccessTarget::To(ids), Some(to)) => ids.iter().any(|p| p.matches(to)),
            _ => false,
        }
    }

    /// Whether this rule admits `ask`; the reason when it covers the target for one of the
    /// groups but refuses the TTL or the scope. `Ok(false)` when it does not apply at all.
    pub fn admits(&self, ask: &AccessAsk<'_>) -> Result<bool, AccessRefusal> {
        if !self.groups.iter().any(|g| ask.groups.contains(g)) || !self.covers(ask.to) {
            return Ok(false);
        }
        if ask.ttl > self.max_ttl {
            return Err(AccessRefusal::TooLong {
                max: crate::format_duration(self.max_ttl.whole_seconds().max(0) as u64),
            });
        }
        let methods_ok = match &self.methods {
            None => true,
            Some(allowed) => ask.methods.iter().all(|m| allowed.contains(m)),
        };
        let paths_ok = match &self.paths {
            None => true,
            Some(allowed) => ask
                .paths
                .iter()
                .all(|p| allowed.iter().any(|a| a.as_str() == p)),
        };
        if methods_ok && paths_ok {
            return Ok(true);
        }
        let join = |v: Option<Vec<&str>>| v.map_or("any".to_owned(), |v| v.join(", "));
        Err(AccessRefusal::Scope {
            target: ask.to.unwrap_or("the admin role").to_owned(),
            methods: join(
                self.methods
                    .as_ref()
                    .map(|m| m.iter().map(String::as_str).collect()),
            ),
            paths: join(self.paths()),
        })
    }
}

/// The first rule that admits `ask`, or the most telling refusal.
pub fn find_rule<'r>(
    rules: &'r [AccessRule],
    ask: &AccessAsk<'_>,
) -> Result<&'r AccessRule, AccessRefusal> {
    let mut refusal = None;
    for r in rules {
        match r.admits(ask) {
            Ok(true) => return Ok(r),
            Ok(false) => {}
            Err(e) => refusal = refusal.or(Some(e)),
        }
    }
    Err(refusal.unwrap_or_else(|| AccessRefusal::NoRule {
        groups: ask.groups.join(", "),
        target: ask.to.unwrap_or("the admin role").to_owned(),
    }))
}
