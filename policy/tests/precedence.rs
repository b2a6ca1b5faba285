//! Precedence: deny beats allow and grants, dry-run semantics, L4 behaviour, decision ids.

mod common;

use std::net::IpAddr;

use common::*;
use mayfly_policy::{DecidedBy, DryRun, Grant, PathPattern, Request};
use time::Duration;

fn grant(id: &str, methods: &[&str], paths: &[&str]) -> Grant {
    Grant {
        id: id.into(),
        from: WEB.into(),
        to: ORDERS.into(),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        paths: paths
            .iter()
            .map(|p| PathPattern::parse(p).expect("pattern"))
            .collect(),
        not_before: NOW - Duration::minutes(5),
        expires: NOW + Duration::minutes(5),
    }
}

fn by_rule(name: &str) -> DecidedBy {
    DecidedBy::Rule(name.into())
}

#[test]
fn default_is_deny() {
    let e = engine("");
    let d = e.decide(&conn(WEB, ORDERS), &[]);
    assert!(!d.allow && d.enforced && !d.permits());
    assert_eq!(d.decided_by, DecidedBy::Default);
}

#[test]
fn deny_beats_allow_whatever_the_order() {
    for body in [
        rule("a", "allow", "") + &rule("d", "deny", ""),
        rule("d", "deny", "") + &rule("a", "allow", ""),
    ] {
        let d = engine(&body).decide(&conn(WEB, ORDERS), &[]);
        assert!(!d.allow);
        assert_eq!(d.decided_by, by_rule("d"));
    }
}

#[test]
fn first_matching_allow_in_file_order_is_reported() {
    let e = engine(&(rule("a1", "allow", "") + &rule("a2", "allow", "")));
    assert_eq!(e.decide(&conn(WEB, ORDERS), &[]).decided_by, by_rule("a1"));
}

#[test]
fn a_narrow_deny_carves_out_of_a_broad_allow() {
    let body = format!(
        "[[rule]]\nname = \"all\"\nfrom = [\"spiffe://mayfly.local/*\"]\nto = [\"{ORDERS}\"]\n{}",
        rule("no-admin", "deny", "paths = [\"/admin/**\"]")
    );
    let e = engine(&body);
    assert!(e.decide(&http(WEB, ORDERS, "GET", "/orders"), &[]).allow);
    let d = e.decide(&http(WEB, ORDERS, "GET", "/admin/users"), &[]);
    assert_eq!((d.allow, d.decided_by), (false, by_rule("no-admin")));
}

#[test]
fn grants_allow_within_scope_and_time() {
    let e = engine("");
    let g = grant("g1", &["GET"], &["/orders/**"]);
    let d = e.decide(
        &http(WEB, ORDERS, "GET", "/orders/1"),
        std::slice::from_ref(&g),
    );
    assert_eq!(
        (d.allow, d.decided_by),
        (true, DecidedBy::Grant("g1".into()))
    );
    assert!(
        !e.decide(
            &http(WEB, ORDERS, "POST", "/orders/1"),
            std::slice::from_ref(&g)
        )
        .allow
    );
    assert!(
        !e.decide(
            &http(WEB, ORDERS, "GET", "/users"),
            std::slice::from_ref(&g)
        )
        .allow
    );
    // HTTP-scoped grants never admit a raw connection.
    assert!(!e.decide(&conn(WEB, ORDERS), std::slice::from_ref(&g)).allow);
    // Wrong source, expired, not yet valid.
    assert!(
        !e.decide(
            &http(DB, ORDERS, "GET", "/orders/1"),
            std::slice::from_ref(&g)
        )
        .allow
    );
    let expired = Grant {
        expires: NOW,
        ..g.clone()
    };
    assert!(
        !e.decide(&http(WEB, ORDERS, "GET", "/orders/1"), &[expired])
            .allow
    );
    let later = Grant {
        not_before: NOW + Duration::seconds(1),
        ..g
    };
    assert!(
        !e.decide(&http(WEB, ORDERS, "GET", "/orders/1"), &[later])
            .allow
    );
    // A grant without HTTP scope admits the connection.
    assert!(e.decide(&conn(WEB, ORDERS), &[grant("g2", &[], &[])]).allow);
}

#[test]
fn deny_beats_grants() {
    let e = engine(&rule("d", "deny", ""));
    let d = e.decide(&conn(WEB, ORDERS), &[grant("g", &[], &[])]);
    assert_eq!((d.allow, d.decided_by), (false, by_rule("d")));
}

#[test]
fn an_allow_rule_is_reported_before_a_grant() {
    let e = engine(&rule("a", "allow", ""));
    assert_eq!(
        e.decide(&conn(WEB, ORDERS), &[grant("g", &[], &[])])
            .decided_by,
        by_rule("a")
    );
}

#[test]
fn dry_run_deny_records_would_deny_and_does_not_deny() {
    let e = engine(&(rule("a", "allow", "") + &rule("d", "deny", "mode = \"dry-run\"")));
    let d = e.decide(&conn(WEB, ORDERS), &[]);
    assert!(d.allow && d.enforced && d.permits());
    assert_eq!(d.decided_by, by_rule("a"));
    assert_eq!(
        d.dry_run,
        Some(DryRun {
            allow: false,
            rule: "d".into()
        })
    );
}

#[test]
fn dry_run_allow_never_admits_but_records_would_allow() {
    let e = engine(&rule("a", "allow", "mode = \"dry-run\""));
    let d = e.decide(&conn(WEB, ORDERS), &[]);
    assert!(!d.allow && d.enforced && !d.permits());
    assert_eq!(d.decided_by, DecidedBy::Default);
    assert_eq!(
        d.dry_run,
        Some(DryRun {
            allow: true,
            rule: "a".into()
        })
    );
}

#[test]
fn dry_run_allow_is_not_reported_when_an_enforced_allow_decides() {
    let e = engine(&(rule("dry", "allow", "mode = \"dry-run\"") + &rule("a", "allow", "")));
    let d = e.decide(&conn(WEB, ORDERS), &[]);
    assert_eq!(
        (d.allow, d.decided_by, d.dry_run),
        (true, by_rule("a"), None)
    );
}

#[test]
fn enforced_deny_hides_dry_run_rules() {
    let e = engine(&(rule("dd", "deny", "mode = \"dry-run\"") + &rule("d", "deny", "")));
    let d = e.decide(&conn(WEB, ORDERS), &[]);
    assert_eq!(
        (d.allow, d.decided_by, d.dry_run),
        (false, by_rule("d"), None)
    );
}

#[test]
fn dry_run_policy_decides_as_enforce_would_but_enforces_nothing() {
    let body = format!(
        "mode = \"dry-run\"\n{}",
        rule("d", "deny", "paths = [\"/admin\"]")
    ) + &rule("a", "allow", "");
    let e = engine(&body);
    let d = e.decide(&http(WEB, ORDERS, "GET", "/admin"), &[]);
    assert!(!d.allow && !d.enforced && d.permits());
    assert_eq!(d.decided_by, by_rule("d"));
    let d = e.decide(&conn(DB, ORDERS), &[]);
    assert!(!d.allow && !d.enforced && d.permits());
    assert!(e.may_allow_any(&conn(DB, ORDERS), &[]));
}

#[test]
fn http_rules_never_match_a_raw_connection_allow_or_deny() {
    let e = engine(&(rule("a", "allow", "methods = [\"GET\"]")));
    assert!(!e.decide(&conn(WEB, ORDERS), &[]).allow);
    let e = engine(&(rule("a", "allow", "") + &rule("d", "deny", "methods = [\"DELETE\"]")));
    assert!(e.decide(&conn(WEB, ORDERS), &[]).allow);
    assert!(!e.decide(&http(WEB, ORDERS, "DELETE", "/"), &[]).allow);
}

#[test]
fn deny_rules_fail_closed_on_missing_port_or_address() {
    let e = engine(
        &(rule("a", "allow", "")
            + &rule(
                "d",
                "deny",
                "ports = [22]\nsource_cidrs = [\"192.0.2.0/24\"]",
            )),
    );
    let c = conn(WEB, ORDERS);
    assert!(
        e.decide(
            &Request {
                port: Some(8080),
                source_ip: None,
                ..c
            },
            &[]
        )
        .allow
    );
    let ip: IpAddr = "192.0.2.1".parse().expect("ip");
    assert!(
        !e.decide(
            &Request {
                port: Some(22),
                source_ip: Some(ip),
                ..c
            },
            &[]
        )
        .allow
    );
    assert!(
        !e.decide(
            &Request {
                port: None,
                source_ip: Some(ip),
                ..c
            },
            &[]
        )
        .allow
    );
    assert!(
        !e.decide(
            &Request {
                port: Some(22),
                source_ip: None,
                ..c
            },
            &[]
        )
        .allow
    );
}

#[test]
fn deny_headers_match_any_duplicate_value() {
    let e =
        engine(&(rule("a", "allow", "") + &rule("d", "deny", "headers = { x-env = \"prod\" }")));
    let headers = [("x-env", "dev"), ("X-Env", "prod")];
    let req = Request {
        http: Some(mayfly_policy::HttpRequest {
            method: "GET",
            path: "/",
            headers: &headers,
        }),
        ..conn(WEB, ORDERS)
    };
    assert!(!e.decide(&req, &[]).allow);
}

#[test]
fn unnormalised_paths_are_denied() {
    let e = engine(&rule("a", "allow", ""));
    for p in ["/a/../b", "//a", "/a%2fb", "relative", "/a?x=1"] {
        let d = e.decide(&http(WEB, ORDERS, "GET", p), &[]);
        assert_eq!(
            (d.allow, d.decided_by),
            (false, DecidedBy::UnnormalizedPath),
            "{p}"
        );
    }
}

#[test]
fn may_allow_any_looks_past_http_conditions_but_not_l4_denies() {
    let e = engine(&rule("a", "allow", "methods = [\"GET\"]\nports = [8080]"));
    assert!(e.may_allow_any(&conn(WEB, ORDERS), &[]));
    assert!(!e.may_allow_any(
        &Request {
            port: Some(9),
            ..conn(WEB, ORDERS)
        },
        &[]
    ));
    assert!(!e.may_allow_any(&conn(DB, ORDERS), &[]));
    assert!(e.may_allow_any(
        &conn(WEB, DB),
        &[Grant {
            to: DB.into(),
            ..grant("g", &["GET"], &[])
        }]
    ));
    let e = engine(&(rule("a", "allow", "") + &rule("d", "deny", "")));
    assert!(!e.may_allow_any(&conn(WEB, ORDERS), &[]));
    let e = engine(&(rule("a", "allow", "") + &rule("d", "deny", "paths = [\"/admin\"]")));
    assert!(e.may_allow_any(&conn(WEB, ORDERS), &[]));
    let e = engine(&rule("a", "allow", "mode = \"dry-run\""));
    assert!(!e.may_allow_any(&conn(WEB, ORDERS), &[]));
}

#[test]
fn decision_ids_are_unique_and_carry_the_seed() {
    let loaded = mayfly_policy::Policy::from_toml("version = 1\n", "p.toml").expect("loads");
    let e = mayfly_policy::Engine::with_seed(&loaded.policy, 0xdead_beef_cafe_f00d);
    let a = e.decide(&conn(WEB, ORDERS), &[]);
    let b = e.decide(&conn(WEB, ORDERS), &[]);
    assert_eq!(a.decision_id, "d-cafef00d-0");
    assert_eq!(b.decision_id, "d-cafef00d-1");
    assert_eq!(&*a.policy_version, loaded.policy.version());
    assert_eq!(loaded.policy.version().len(), 16);
}

#[test]
fn explain_traces_every_rule_for_the_destination() {
    let body = rule("reads", "allow", "methods = [\"GET\", \"HEAD\"]")
        + &rule(
            "no-admin",
            "deny",
            "paths = [\"/admin/**\"]\nmode = \"dry-run\"",
        )
        + "[[rule]]\nname = \"elsewhere\"\nfrom = [\"spiffe://mayfly.local/web\"]\nto = [\"spiffe://mayfly.local/db\"]\n";
    let e = engine(&body);
    let x = e.explain(
        &http(WEB, ORDERS, "POST", "/admin/x"),
        &[grant("g", &["PUT"], &[])],
    );
    let text = x.to_string();
    assert!(
        text.contains("rule `reads` (allow, line 2): methods: POST not in [GET, HEAD]"),
        "{text}"
    );
    assert!(
        text.contains("rule `no-admin` (deny, dry-run, line 8): matched"),
        "{text}"
    );
    assert!(
        text.contains("grant `g`: methods: POST not in [PUT]"),
        "{text}"
    );
    assert!(!text.contains("elsewhere"), "{text}");
    assert!(
        text.contains(
            "decision: deny (enforced) by default deny; dry-run rule `no-admin` would deny"
        ),
        "{text}"
    );
    assert_eq!(x.steps.len(), 3);
}

#[test]
fn explain_says_when_nothing_names_the_destination() {
    let text = engine("").explain(&conn(WEB, ORDERS), &[]).to_string();
    assert!(
        text.contains("no rule or grant names this destination"),
        "{text}"
    );
}

#[test]
fn explain_states_the_request_time_in_rfc_3339() {
    let x = engine("").explain(&conn(WEB, ORDERS), &[]);
    let t = NOW
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(x.request.ends_with(&format!(" at {t}")), "{}", x.request);
}
