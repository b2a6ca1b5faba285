//! `decide` and `may_allow_any`.

use std::sync::Arc;

use super::Engine;
use super::index::{ENFORCED_ALLOW, ENFORCED_DENY};
use super::matching::{Scope, check_grant};
use crate::decision::{DecidedBy, Decision, DryRun};
use crate::grant::Grant;
use crate::model::Mode;
use crate::path::is_normalized;
use crate::request::Request;

/// A decision before it gets its id.
pub(super) struct Verdict {
    pub(super) allow: bool,
    pub(super) decided_by: DecidedBy,
    pub(super) dry_run: Option<DryRun>,
}

impl Engine {
    fn rule_name(&self, i: u32) -> Arc<str> {
        self.rules
            .get(i as usize)
            .map_or_else(|| Arc::from(""), |r| r.name.clone())
    }

    /// Decides on a connection (`req.http == None`) or an HTTP request.
    ///
    /// Precedence: an enforced deny rule that matches wins; else the first matching enforced
    /// allow rule, else the first matching grant; else default deny. Dry-run rules never change
    /// `allow`: they are reported in `dry_run`. With `http: None`, rules with HTTP conditions
    /// (allow or deny) do not match.
    pub fn decide(&self, req: &Request<'_>, grants: &[Grant]) -> Decision {
        let v = self.verdict(req, grants);
        Decision {
            allow: v.allow,
            enforced: self.mode == Mode::Enforce,
            decided_by: v.decided_by,
            dry_run: v.dry_run,
            policy_version: self.version.clone(),
            decision_id: self.next_id(),
        }
    }

    pub(super) fn verdict(&self, req: &Request<'_>, grants: &[Grant]) -> Verdict {
        if req.http.is_some_and(|h| !is_normalized(h.path)) {
            return Verdict {
                allow: false,
                decided_by: DecidedBy::UnnormalizedPath,
                dry_run: None,
            };
        }
        let [ed, dd, ea, da] =
            self.index
                .first_matches(&self.rules, req, Scope::Request, [true; 4]);
        let grant = || {
            grants
                .iter()
                .find(|g| check_grant(g, req, Scope::Request).is_ok())
        };
        let (allow, decided_by) = if let Some(i) = ed {
            (false, DecidedBy::Rule(self.rule_name(i)))
        } else if let Some(i) = ea {
            (true, DecidedBy::Rule(self.rule_name(i)))
        } else if let Some(g) = grant() {
            (true, DecidedBy::Grant(g.id.clone()))
        } else {
            (false, DecidedBy::Default)
        };
        let dry_run = match (ed, dd, da) {
            (Some(_), _, _) => None,
            (None, Some(i), _) => Some(DryRun {
                allow: false,
                rule: self.rule_name(i),
            }),
            (None, None, Some(i)) if !allow => Some(DryRun {
                allow: true,
                rule: self.rule_name(i),
            }),
            _ => None,
        };
        Verdict {
            allow,
            decided_by,
            dry_run,
        }
    }

    /// True if some HTTP request from `req.source` to `req.destination` (with the port, source
    /// IP and time of `req`; `req.http` is ignored) might be permitted: no enforced deny rule
    /// without HTTP conditions matches, and some enforced allow rule or grant matches when its
    /// HTTP conditions are left aside. Always true when the policy is dry-run. The HTTP sidecar
    /// uses it to accept or refuse a connection before checking each request.
    pub fn may_allow_any(&self, req: &Request<'_>, grants: &[Grant]) -> bool {
        if self.mode == Mode::DryRun {
            return true;
        }
        let l4 = Request { http: None, ..*req };
        let deny = self.index.first_matches(
            &self.rules,
            &l4,
            Scope::Request,
            [true, false, false, false],
        );
        if deny[ENFORCED_DENY].is_some() {
            return false;
        }
        let allow = self.index.first_matches(
            &self.rules,
            &l4,
            Scope::AnyRequest,
            [false, false, true, false],
        );
        allow[ENFORCED_ALLOW].is_some()
            || grants
                .iter()
                .any(|g| check_grant(g, &l4, Scope::AnyRequest).is_ok())
    }
}
