//! Deny rules match a path the way permissive backends read it (parameters, case, trailing dots
//! and spaces); allow rules stay exact; disguised dot segments are refused.

mod common;

use common::*;
use mayfly_policy::{DecidedBy, PathError, PathPattern, deny_form, is_normalized, normalize_path};
use proptest::prelude::*;

/// Everything from WEB to ORDERS is allowed except `/admin` and below.
fn deny_admin() -> mayfly_policy::Engine {
    engine(
        &(rule("all", "allow", "paths = [\"/**\"]")
            + &rule("no-admin", "deny", "paths = [\"/admin\", \"/admin/**\"]")),
    )
}

fn decide(e: &mayfly_policy::Engine, raw: &str) -> (bool, DecidedBy) {
    let path = normalize_path(raw).expect("normalises");
    let d = e.decide(&http(WEB, ORDERS, "GET", &path), &[]);
    (d.allow, d.decided_by)
}

#[test]
fn the_deny_form_removes_parameters_case_and_trailing_dots_and_spaces() {
    let cases = [
        ("/admin", "/admin"),
        ("/ADMIN", "/admin"),
        ("/Admin/Users", "/admin/users"),
        ("/admin.", "/admin"),
        ("/admin%20", "/admin"),
        ("/admin.%20.", "/admin"),
        ("/admin;x", "/admin"),
        ("/admin;jsessionid=1/", "/admin/"),
        ("/admin;/", "/admin/"),
        ("/a/;x/b", "/a/b"),
        ("/a/.../b", "/a/b"),
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/CAF%C3%A9", "/caf%C3%A9"),
        ("/;x", "/"),
        ("/", "/"),
    ];
    for (path, want) in cases {
        assert!(is_normalized(path), "{path}");
        assert_eq!(deny_form(path), want, "{path}");
    }
}

#[test]
fn a_deny_rule_catches_the_spellings_permissive_backends_route_to_it() {
    let e = deny_admin();
    for raw in [
        "/admin",
        "/ADMIN",
        "/Admin",
        "/admin.",
        "/admin%20",
        "/admin;x",
        "/admin;/",
        "/ADMIN;jsessionid=1/users",
        "/admin./users",
        "/%61dmin",
    ] {
        assert_eq!(
            decide(&e, raw),
            (false, DecidedBy::Rule("no-admin".into())),
            "{raw}"
        );
    }
    for raw in ["/", "/public", "/administrator", "/admins;x", "/ad.min"] {
        assert!(decide(&e, raw).0, "{raw} should stay allowed");
    }
}

#[test]
fn a_deny_pattern_written_in_capitals_is_folded_too() {
    let e = engine(
        &(rule("all", "allow", "") + &rule("no-reports", "deny", "paths = [\"/Reports/*/Raw\"]")),
    );
    for raw in [
        "/Reports/1/Raw",
        "/reports/1/raw",
        "/REPORTS/1/raw.",
        "/reports;a/1/raw",
    ] {
        assert!(!decide(&e, raw).0, "{raw}");
    }
    assert!(decide(&e, "/reports/1/cooked").0);
}

#[test]
fn allow_rules_and_grants_stay_exact() {
    let e = engine(&rule("public", "allow", "paths = [\"/public/**\"]"));
    assert!(decide(&e, "/public/x").0);
    for raw in ["/PUBLIC/x", "/Public/x", "/public./x", "/public;x/y"] {
        assert_eq!(decide(&e, raw), (false, DecidedBy::Default), "{raw}");
    }
    let p = PathPattern::parse("/public/**").unwrap();
    assert!(p.matches("/public/x") && !p.matches("/PUBLIC/x"));
    assert!(p.matches_deny("/PUBLIC/x", &deny_form("/PUBLIC/x")));
}

#[test]
fn disguised_dot_segments_are_refused() {
    for raw in [
        "/public/..;/admin",
        "/public/%2e%2e;/admin",
        "/public/%2E%2E;x=1/admin",
        "/public/.;/admin",
        "/public/..%20/admin",
        "/public/.. /admin",
        "/public/..;x%20/admin",
        "/..;",
    ] {
        assert_eq!(
            normalize_path(raw),
            Err(PathError::DisguisedDotSegment),
            "{raw}"
        );
    }
    for p in ["/public/..;/admin", "/a/.;x", "/a/..%20"] {
        assert!(!is_normalized(p), "{p}");
    }
    // Plain dot segments are still resolved, and dots inside names are names.
    assert_eq!(normalize_path("/public/../admin").unwrap(), "/admin");
    assert_eq!(normalize_path("/a/...;x/b").unwrap(), "/a/...;x/b");
    assert_eq!(normalize_path("/a/..x;y").unwrap(), "/a/..x;y");
    assert!(PathPattern::parse("/public/..;/admin").is_err());
}

fn lower_segment() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9_~-]{1,6}").expect("valid regex")
}

/// One way a permissive backend would still read `seg`: capitals, `;params`, trailing dots
/// and spaces.
fn respell(seg: &str, upper: u8, param: bool, tail: &str) -> String {
    let mut s: String = seg
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if upper >> (i % 8) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    s.push_str(tail);
    if param {
        s.push_str(";p=1");
    }
    s
}

proptest! {
    #[test]
    fn every_respelling_of_a_denied_path_is_denied(
        segs in prop::collection::vec(lower_segment(), 1..4),
        upper in any::<u8>(),
        param in any::<bool>(),
        tail in prop::sample::select(vec!["", ".", "%20", "..", ".%20"]),
        which in 0usize..4,
    ) {
        let exact = format!("/{}", segs.join("/"));
        let which = which % segs.len();
        let mut spelled = segs.clone();
        spelled[which] = respell(&segs[which], upper, param, tail);
        let raw = format!("/{}", spelled.join("/"));
        let e = engine(&(rule("all", "allow", "")
            + &rule("no", "deny", &format!("paths = [\"{exact}\", \"{exact}/**\"]"))));
        let path = normalize_path(&raw).expect("a respelling normalises");
        let d = e.decide(&http(WEB, ORDERS, "GET", &path), &[]);
        prop_assert!(!d.allow, "{raw} ({path}) should be denied like {exact}");
    }

    #[test]
    fn the_deny_form_is_idempotent_and_normal(raw in "[/./%a-fA-F0-9;X ~]{0,24}") {
        if let Ok(p) = normalize_path(&raw) {
            let once = deny_form(&p).into_owned();
            prop_assert_eq!(deny_form(&once).into_owned(), once.clone());
            prop_assert!(is_normalized(&once), "{once:?} should be normal");
        }
    }

    #[test]
    fn a_deny_pattern_never_matches_less_than_an_allow_pattern(
        raw in "[/.a-cA-C;%20]{1,16}",
        pat in prop::sample::select(vec!["/a", "/a/**", "/*/b", "/**", "/A/*"]),
    ) {
        let p = PathPattern::parse(pat).unwrap();
        if let Ok(path) = normalize_path(&raw)
            && p.matches(&path)
        {
            prop_assert!(p.matches_deny(&path, &deny_form(&path)));
        }
    }
}
