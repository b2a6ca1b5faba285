//! Validation of `[access]`: `[[access.rule]]` tables saying which identity-provider groups may
//! ask for which services (or the admin role), for how long, approved by whom.

use std::ops::Range;

use toml::Spanned;
use toml::de::DeValue;

use super::raw::{RawAccessRule, SList};
use super::{drop_unknown, rule, shaped, table_array};
use crate::access::{AccessRule, AccessTarget};
use crate::diag::Diags;
use crate::duration::{format_duration, parse_duration};
use crate::spiffe_id::IdPattern;

const ACCESS_KEYS: &[&str] = &["rule"];
const RULE_KEYS: &[&str] = &[
    "groups",
    "to",
    "role",
    "methods",
    "paths",
    "max_ttl",
    "approvals",
    "approvers",
];

/// Longest `max_ttl` of an access rule: people get hours at most, like grants.
const MAX_ACCESS_TTL_SECS: u64 = 24 * 3600;
/// Most approvals a rule may ask for.
const MAX_APPROVALS: i64 = 10;

/// The rules of an `[access]` table, recording every problem.
pub(super) fn load(mut v: Spanned<DeValue<'_>>, d: &mut Diags<'_>) -> Vec<AccessRule> {
    let span = v.span();
    drop_unknown(&mut v, "[access]", ACCESS_KEYS, d);
    let DeValue::Table(t) = v.into_inner() else {
        d.error(span, "`access` must be a table: write `[[access.rule]]`");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, value) in t {
        if k.get_ref() != "rule" {
            continue;
        }
        for mut r in table_array("access.rule", value, d) {
            drop_unknown(&mut r, "[[access.rule]]", RULE_KEYS, d);
            let span = r.span();
            if let Some(raw) = shaped::<RawAccessRule>(r, d) {
                out.extend(check(raw, span, d));
            }
        }
    }
    out
}

fn names(
    key: &str,
    v: Option<&SList>,
    span: &Range<usize>,
    d: &mut Diags<'_>,
) -> Option<Vec<String>> {
    let Some(v) = v else {
        d.error(
            span.clone(),
            format!("an [[access.rule]] needs `{key}` (identity-provider group names)"),
        );
        return None;
    };
    if v.get_ref().is_empty() {
        d.error(
            v.span(),
            format!("`{key}` is empty, so nobody could use the rule"),
        );
        return None;
    }
    rule::collect(v.get_ref(), d, |g| {
        if g.trim().is_empty() || g.trim() != g || g.chars().any(char::is_control) {
            Err(format!(
                "group `{g}` must be a non-empty name without surrounding spaces"
            ))
        } else {
            Ok(g.to_owned())
        }
    })
}

fn target(r: &RawAccessRule, span: &Range<usize>, d: &mut Diags<'_>) -> Option<AccessTarget> {
    match (&r.to, &r.role) {
        (Some(_), Some(role)) => {
            d.error(
                role.span(),
                "an [[access.rule]] has either `to` (services) or `role = \"admin\"`, not both",
            );
            None
        }
        (None, None) => {
            d.error(
                span.clone(),
                "an [[access.rule]] needs `to` (SPIFFE IDs or patterns) or `role = \"admin\"`",
            );
            None
        }
        (None, Some(role)) if role.get_ref() == "admin" => Some(AccessTarget::Admin),
        (None, Some(role)) => {
            d.error(
                role.span(),
                format!("unknown role `{}`, expected \"admin\"", role.get_ref()),
            );
            None
        }
        (Some(to), None) => {
            if to.get_ref().is_empty() {
                d.error(to.span(), "`to` is empty, so nobody could ask for anything");
                return None;
            }
            rule::collect(to.get_ref(), d, |s| match IdPattern::parse(s) {
                Ok(IdPattern::Exact(id)) if is_reserved(&id) => Err(format!(
                    "`{id}` is reserved for the control plane: use `role = \"admin\"` for its operations"
                )),
                Ok(p) => Ok(p),
                Err(e) => Err(e.to_string()),
            })
            .map(AccessTarget::To)
        }
    }
}

/// Whether an exact ID is in the control plane's reserved namespace (`spiffe://<td>/mayfly/...`).
fn is_reserved(id: &str) -> bool {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, path)| path == "mayfly" || path.starts_with("mayfly/"))
}

fn ttl(
    v: Option<&Spanned<String>>,
    span: &Range<usize>,
    d: &mut Diags<'_>,
) -> Option<time::Duration> {
    let Some(v) = v else {
        d.error(
            span.clone(),
            "an [[access.rule]] needs `max_ttl` (such as \"30m\")",
        );
        return None;
    };
    match parse_duration(v.get_ref()) {
        Ok(0) => {
            d.error(v.span(), "`max_ttl` must be more than 0s");
            None
        }
        Ok(secs) if secs > MAX_ACCESS_TTL_SECS => {
            d.error(
                v.span(),
                format!(
                    "`max_ttl` is at most {} (access is short-lived)",
                    format_duration(MAX_ACCESS_TTL_SECS)
                ),
            );
            None
        }
        Ok(secs) => Some(time::Duration::seconds(
            i64::try_from(secs).unwrap_or(i64::MAX),
        )),
        Err(e) => {
            d.error(v.span(), format!("`max_ttl`: {e}"));
            None
        }
    }
}

fn check(r: RawAccessRule, span: Range<usize>, d: &mut Diags<'_>) -> Option<AccessRule> {
    let before = d.items.len();
    let groups = names("groups", r.groups.as_ref(), &span, d);
    let approvers = names("approvers", r.approvers.as_ref(), &span, d);
    let target = target(&r, &span, d);
    let admin = matches!(target, Some(AccessTarget::Admin));
    for (key, v) in [("methods", &r.methods), ("paths", &r.paths)] {
        if let (true, Some(v)) = (admin, v) {
            d.error(
                v.span(),
                format!("`{key}` applies to services (`to`), not to the admin role"),
            );
        }
    }
    let methods = r.methods.as_ref().and_then(|m| rule::methods(m, d));
    let paths = r.paths.as_ref().and_then(|p| rule::paths(p, d));
    let max_ttl = ttl(r.max_ttl.as_ref(), &span, d);
    let approvals = match &r.approvals {
        None => Some(1),
        Some(a) if (1..=MAX_APPROVALS).contains(a.get_ref()) => u8::try_from(*a.get_ref()).ok(),
        Some(a) => {
            d.error(
                a.span(),
                format!(
                    "`approvals` is 1 to {MAX_APPROVALS}: people's access always needs another person's approval"
                ),
            );
            None
        }
    };
    let has_errors = d.items[before..]
        .iter()
        .any(|x| x.severity == crate::Severity::Error);
    if has_errors {
        return None;
    }
    Some(AccessRule {
        groups: groups?,
        target: target?,
        methods,
        paths,
        max_ttl: max_ttl?,
        approvals: approvals?,
        approvers: approvers?,
        pos: d.pos(span.start),
    })
}
