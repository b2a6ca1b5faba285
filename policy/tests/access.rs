//! `[access]`: which people may ask for what. Validation with positions, and the choice of rule.

mod common;

use common::errors;
use mayfly_policy::{AccessAsk, AccessRefusal, AccessTarget, Policy, find_rule};

const RULES: &str = r#"[[access.rule]]
groups = ["oncall"]
to = ["spiffe://mayfly.local/db", "spiffe://mayfly.local/reports/*"]
methods = ["GET"]
paths = ["/reports/*"]
max_ttl = "1h"
approvals = 2
approvers = ["db-admins"]
[[access.rule]]
groups = ["sre"]
role = "admin"
max_ttl = "30m"
approvers = ["sre-leads"]
"#;

fn loaded(body: &str) -> Policy {
    Policy::from_toml(&format!("version = 1\n{body}"), "p.toml")
        .unwrap_or_else(|e| panic!("{e}"))
        .policy
}

fn ask<'a>(groups: &'a [String], to: Option<&'a str>, ttl_min: i64) -> AccessAsk<'a> {
    AccessAsk {
        groups,
        to,
        methods: &[],
        paths: &[],
        ttl: time::Duration::minutes(ttl_min),
    }
}

#[test]
fn a_policy_without_access_rules_gives_people_nothing() {
    let p = loaded("");
    assert!(p.access().is_empty());
    let groups = vec!["oncall".to_owned()];
    let e = find_rule(
        p.access(),
        &ask(&groups, Some("spiffe://mayfly.local/db"), 5),
    )
    .unwrap_err();
    assert!(matches!(e, AccessRefusal::NoRule { .. }), "{e}");
}

#[test]
fn access_rules_load_with_their_targets_limits_and_approvers() {
    let p = loaded(RULES);
    let [db, admin] = p.access() else {
        panic!("two rules")
    };
    assert!(matches!(db.target(), AccessTarget::To(ids) if ids.len() == 2));
    assert_eq!(db.approvals(), 2);
    assert_eq!(db.max_ttl(), time::Duration::hours(1));
    assert_eq!(db.methods(), Some(&["GET".to_owned()][..]));
    assert_eq!(db.paths(), Some(vec!["/reports/*"]));
    assert!(matches!(admin.target(), AccessTarget::Admin));
    assert_eq!(admin.approvals(), 1, "one approval by default");
    assert_eq!(admin.approvers(), ["sre-leads".to_owned()]);
    assert_eq!(admin.pos().line, 10);
}

#[test]
fn a_request_is_admitted_only_by_a_rule_naming_one_of_the_groups_and_the_target() {
    let p = loaded(RULES);
    let oncall = vec!["devs".to_owned(), "oncall".to_owned()];
    let sre = vec!["sre".to_owned()];
    let db = "spiffe://mayfly.local/db";
    assert!(find_rule(p.access(), &ask(&oncall, Some(db), 60)).is_ok());
    assert!(
        find_rule(
            p.access(),
            &ask(&oncall, Some("spiffe://mayfly.local/reports/q1"), 5)
        )
        .is_ok()
    );
    assert!(
        find_rule(
            p.access(),
            &ask(&oncall, Some("spiffe://mayfly.local/orders"), 5)
        )
        .is_err()
    );
    assert!(
        find_rule(p.access(), &ask(&oncall, None, 5)).is_err(),
        "oncall is not an admin"
    );
    assert!(
        find_rule(p.access(), &ask(&sre, Some(db), 5)).is_err(),
        "sre may not reach db"
    );
    assert!(find_rule(p.access(), &ask(&sre, None, 30)).is_ok());
    let e = find_rule(p.access(), &ask(&sre, None, 31)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the TTL asked for is over the rule's max_ttl of 30m"
    );
    let methods = vec!["DELETE".to_owned()];
    let wide = AccessAsk {
        methods: &methods,
        ..ask(&oncall, Some(db), 5)
    };
    let e = find_rule(p.access(), &wide).unwrap_err();
    assert!(matches!(e, AccessRefusal::Scope { .. }), "{e}");
}

#[test]
fn bad_access_rules_are_refused_with_positions() {
    let got = errors(
        "[[access.rule]]\ngroups = []\nto = [\"spiffe://td/db\"]\nrole = \"admin\"\nmax_ttl = \"2d\"\napprovals = 0\napprovers = [\"x\"]\ncolour = 1\n",
    );
    assert_eq!(
        got,
        [
            "3:10: `groups` is empty, so nobody could use the rule",
            "5:8: an [[access.rule]] has either `to` (services) or `role = \"admin\"`, not both",
            "6:11: `max_ttl` is at most 1d (access is short-lived)",
            "7:13: `approvals` is 1 to 10: people's access always needs another person's approval",
            "9:1: unknown key `colour` in [[access.rule]], expected one of groups, to, role, methods, paths, max_ttl, approvals, approvers",
        ]
    );
    let got = errors("[[access.rule]]\ngroups = [\"a\"]\nrole = \"root\"\nmethods = [\"GET\"]\n");
    assert_eq!(
        got,
        [
            "2:1: an [[access.rule]] needs `approvers` (identity-provider group names)",
            "2:1: an [[access.rule]] needs `max_ttl` (such as \"30m\")",
            "4:8: unknown role `root`, expected \"admin\"",
        ]
    );
    let got = errors(
        "[[access.rule]]\ngroups = [\"a\"]\nto = [\"spiffe://td/mayfly/ca\"]\nmax_ttl = \"1m\"\napprovers = [\"b\"]\n",
    );
    assert_eq!(
        got,
        [
            "4:7: `spiffe://td/mayfly/ca` is reserved for the control plane: use `role = \"admin\"` for its operations"
        ]
    );
    let got = errors("[access]\nwho = 1\n");
    assert_eq!(
        got,
        ["3:1: unknown key `who` in [access], expected one of rule"]
    );
}
